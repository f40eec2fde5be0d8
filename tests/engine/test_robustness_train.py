"""Robustness of train_net.py: interrupted runs lose nothing, checkpoints that do not fit and
datasets that do not match the config fail clearly, evaluation without predictions gives 0 AP,
and CPU DDP survives a rank whose batches never contain an instance."""

import json
import os
import subprocess
import sys
import pytest
import torch
from torch import nn

from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser, hooks
from detectron2.modeling import build_model

from helpers import REPO_ROOT
from helpers import SHAPES_CONFIG as CONFIG
from helpers import SMALL_SHAPES_OPTS as SMALL
from helpers import capture_warnings, load_train_net, run_main, shapes_cache, tiny_cfg
from solo.checkpoint import CheckpointMismatchError, SOLOCheckpointer, atomic_write
from solo.data.shapes import ensure_shapes_dataset, register_shapes_datasets

TRAIN = "shapes_robust_train"
VAL = "shapes_robust_val"  # 6 images, one of them without any object (seed 14)
# Small and fast: 8 training images at half size, NMS on at most 50 candidates.
OPTS = SMALL + ["DATASETS.TRAIN", f"('{TRAIN}',)", "MODEL.SOLO.NMS_PRE", "50"]
OPTS += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "80"]
OPTS += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    splits = {TRAIN: dict(num_images=8, seed=11), VAL: dict(num_images=6, seed=14)}
    with shapes_cache(tmp_path_factory.mktemp("shapes_robust")) as root:
        register_shapes_datasets(str(root), splits=splits)
        for name in splits:
            ensure_shapes_dataset(name)  # once here, not in every DDP rank
        yield root


@pytest.fixture(scope="module")
def train_net():
    return load_train_net()


def setup_cfg(train_net, output_dir, extra=()):
    args = default_argument_parser().parse_args(["--config-file", str(REPO_ROOT / CONFIG)])
    args.opts = OPTS + ["OUTPUT_DIR", str(output_dir)] + list(extra)
    return train_net.setup(args)


class SimulatedKill(Exception):
    """Stands for the job being killed (or the disk filling up) in the middle of a write."""


def torch_save_killed_on_call(number, real_save=torch.save):
    """A torch.save that writes half a checkpoint and dies on its ``number``-th call."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise SimulatedKill()
        return real_save(obj, f, *args, **kwargs)

    return save


# ----------------------------------------------------------------------------------------------
# Atomic checkpoint writes
# ----------------------------------------------------------------------------------------------


def test_failed_checkpoint_write_keeps_previous_file_and_last_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    checkpointer = SOLOCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_final", iteration=1)
    good = (tmp_path / "model_final.pth").read_bytes()

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", torch_save_killed_on_call(1))
    with pytest.raises(SimulatedKill):
        checkpointer.save("model_final", iteration=2)  # same name: would overwrite in place
    monkeypatch.undo()

    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"], "no temp file"
    restored = nn.Linear(3, 2)
    extra = SOLOCheckpointer(restored, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 1
    assert not torch.equal(restored.weight, model.weight)


def test_failed_last_checkpoint_write_keeps_the_previous_tag(tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000001.pth")

    def write_half(f):
        f.write("model_00")
        raise SimulatedKill()

    with pytest.raises(SimulatedKill):
        atomic_write(str(tmp_path / "last_checkpoint"), write_half, mode="w")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_saved_checkpoint_has_the_usual_file_permissions(tmp_path):
    SOLOCheckpointer(nn.Linear(1, 1), str(tmp_path), save_to_disk=True).save("model")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "model.pth").st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------------------------
# Killed mid-run, resumed with --resume
# ----------------------------------------------------------------------------------------------


def optimizer_state_tensors(state_dict):
    return {
        (param, name): value
        for param, state in state_dict["state"].items()
        for name, value in state.items()
        if isinstance(value, torch.Tensor)
    }


def test_run_killed_while_checkpointing_resumes_from_last_good_checkpoint_with_its_state(
    train_net, shapes_root, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = setup_cfg(train_net, out, ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1"])
    trainer = train_net.Trainer(cfg)
    # The atomic checkpointer is the one the periodic hook saves with; fine-tuning from
    # MODEL.WEIGHTS keeps Detectron2's lenient loading.
    assert isinstance(trainer.checkpointer, SOLOCheckpointer) and not trainer.checkpointer.strict
    (periodic,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic.checkpointer is trainer.checkpointer

    # Iteration 0 runs and is saved (model_0000000); the job dies while saving iteration 1.
    trainer.resume_or_load(resume=False)
    monkeypatch.setattr(torch, "save", torch_save_killed_on_call(2))
    with pytest.raises(SimulatedKill):
        trainer.train()
    monkeypatch.undo()
    files = sorted(f for f in os.listdir(out) if "model" in f)
    assert files == ["model_0000000.pth"], "no partial model_0000001.pth, no temp file"
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"

    resumed = train_net.Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 1
    saved = torch.load(out / "model_0000000.pth", map_location="cpu", weights_only=False)
    assert saved["iteration"] == 0
    expected = optimizer_state_tensors(saved["trainer"]["_trainer"]["optimizer"])
    restored = optimizer_state_tensors(resumed._trainer.optimizer.state_dict())
    assert expected.keys() == restored.keys() and len(expected) > 0
    assert all(torch.equal(expected[k], restored[k]) for k in expected)
    assert any(v.abs().sum() > 0 for v in expected.values()), "momentum was accumulated"
    assert resumed.scheduler.last_epoch == saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"]
    assert resumed.scheduler.last_epoch == 1
    model_state = resumed.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in saved["model"].items())

    resumed.train()
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 2
    with open(out / "metrics.json") as f:
        logged = [json.loads(line)["iteration"] for line in f if "loss_cate" in line]
    assert logged[-1] == 2


# ----------------------------------------------------------------------------------------------
# Checkpoints that do not fit the model
# ----------------------------------------------------------------------------------------------


def save_weights(model, path):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_strict_load_lists_parameters_with_other_shapes(tmp_path):
    """A checkpoint trained with 3 classes, loaded into a 5-class model."""
    path = save_weights(
        build_model(tiny_cfg(opts=["MODEL.SOLO.NUM_CLASSES", 3])), tmp_path / "c3.pth"
    )
    with pytest.raises(CheckpointMismatchError) as info:
        SOLOCheckpointer(build_model(tiny_cfg()), strict=True).load(path)
    message = str(info.value)
    assert "Parameters with different shapes (2)" in message
    assert "head.cate_pred.weight: checkpoint (3, 64, 3, 3) vs model (5, 64, 3, 3)" in message
    assert "head.cate_pred.bias: checkpoint (3,) vs model (5,)" in message
    assert "MODEL.SOLO.NUM_CLASSES" in message


def test_strict_load_lists_model_parameters_missing_from_the_checkpoint(tmp_path):
    path = save_weights(build_model(tiny_cfg("SOLOHead")), tmp_path / "solo.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        SOLOCheckpointer(build_model(tiny_cfg("DecoupledSOLOHead")), strict=True).load(path)
    message = str(info.value)
    assert "Model parameters missing from the checkpoint" in message
    assert "head.mask_preds_x.0.weight" in message
    assert "Checkpoint keys the model does not have" in message and "head.mask_preds.0" in message


def test_lenient_load_for_fine_tuning_keeps_detectron2_warning_and_loads_the_rest(tmp_path, caplog):
    source = build_model(tiny_cfg(opts=["MODEL.SOLO.NUM_CLASSES", 3]))
    path = save_weights(source, tmp_path / "c3.pth")
    target = build_model(tiny_cfg())
    with capture_warnings(caplog, "fvcore"):
        SOLOCheckpointer(target).load(path)
    assert "head.cate_pred.weight" in caplog.text and "shape" in caplog.text
    conv = "head.cate_tower.0.conv.weight"
    assert torch.equal(target.state_dict()[conv], source.state_dict()[conv])


def test_eval_only_with_a_checkpoint_of_another_architecture_is_an_error(
    train_net, shapes_root, tmp_path
):
    other = setup_cfg(train_net, tmp_path, ["MODEL.SOLO.MASK_KERNEL_CHANNELS", "64"])
    weights = save_weights(train_net.Trainer.build_model(other), tmp_path / "other.pth")
    argv = ["--config-file", str(REPO_ROOT / CONFIG), "--eval-only"] + OPTS
    argv += ["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{VAL}',)"]
    with pytest.raises(CheckpointMismatchError, match="head.kernel_pred.weight: checkpoint"):
        run_main(train_net, argv)


# ----------------------------------------------------------------------------------------------
# Datasets that do not match the config
# ----------------------------------------------------------------------------------------------


def test_num_classes_not_matching_the_dataset_fails_before_training(
    train_net, shapes_root, tmp_path
):
    cfg = setup_cfg(train_net, tmp_path, ["MODEL.SOLO.NUM_CLASSES", "5"])
    message = f"MODEL.SOLO.NUM_CLASSES=5 but dataset '{TRAIN}' has 3 classes"
    with pytest.raises(ValueError, match=message + r".*Set MODEL.SOLO.NUM_CLASSES 3"):
        train_net.Trainer(cfg)
    argv = ["--config-file", str(REPO_ROOT / CONFIG), "--eval-only"] + OPTS
    argv += ["OUTPUT_DIR", str(tmp_path), "MODEL.SOLO.NUM_CLASSES", "5"]
    argv += ["DATASETS.TEST", f"('{VAL}',)"]
    with pytest.raises(ValueError, match=f"MODEL.SOLO.NUM_CLASSES=5 but dataset '{VAL}'"):
        run_main(train_net, argv)


# ----------------------------------------------------------------------------------------------
# Evaluation without any prediction, on a split with an image without objects
# ----------------------------------------------------------------------------------------------


def test_evaluation_without_any_prediction_reports_zero_ap(train_net, shapes_root, tmp_path):
    cfg = setup_cfg(train_net, tmp_path, ["DATASETS.TEST", f"('{VAL}',)"])
    assert any(not d["annotations"] for d in DatasetCatalog.get(VAL)), "an image without objects"
    model = train_net.Trainer.build_model(cfg)
    with torch.no_grad():
        model.head.cate_pred.bias.fill_(-20.0)  # no cell above the score threshold
    results = train_net.Trainer.test(cfg, model.eval())
    for task in ("bbox", "segm"):
        assert results[task]["AP"] == 0.0 and results[task]["AP50"] == 0.0


# ----------------------------------------------------------------------------------------------
# DDP: a rank whose batches never hold an instance
# ----------------------------------------------------------------------------------------------

DDP_EMPTY_RANK = r"""
import sys, torch
sys.path.insert(0, {repo!r})
import train_net
import detectron2.utils.comm as comm
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser, launch
from solo.data.shapes import register_shapes_datasets

def nothing_to_learn_on_rank_1():
    dicts = DatasetCatalog.get({train!r})
    if comm.get_rank() == 1:
        # Images without annotations, or with crowd annotations only (which the mapper drops).
        dicts = [
            dict(d, annotations=[dict(a, iscrowd=1) for a in d["annotations"]] if i % 2 else [])
            for i, d in enumerate(dicts)
        ]
    return dicts

def worker(args):
    cfg = train_net.setup(args)
    register_shapes_datasets(splits={splits!r})
    DatasetCatalog.register("rank1_empty", nothing_to_learn_on_rank_1)
    MetadataCatalog.get("rank1_empty").thing_classes = ["circle", "triangle", "rectangle"]
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    positives = sum(
        v for k in trainer.storage.histories() if k.startswith("solo/num_pos")
        for v, _ in trainer.storage.history(k).values()
    )
    model = trainer.model.module
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = comm.all_gather((flat, positives))
    if comm.is_main_process():
        assert all(torch.equal(gathered[0][0], g[0]) for g in gathered[1:]), "ranks diverged"
        assert gathered[0][1] > 0 and gathered[1][1] == 0, [g[1] for g in gathered]
        print("EMPTY_RANK_IN_SYNC", comm.get_world_size())

if __name__ == "__main__":
    args = default_argument_parser().parse_args(sys.argv[1:])
    launch(worker, args.num_gpus, dist_url="auto", args=(args,))
"""


def test_ddp_rank_without_any_instance_neither_hangs_nor_desynchronises(shapes_root, tmp_path):
    script = tmp_path / "ddp_empty_rank.py"
    splits = {TRAIN: dict(num_images=8, seed=11)}
    script.write_text(DDP_EMPTY_RANK.format(repo=str(REPO_ROOT), train=TRAIN, splits=splits))
    cmd = [sys.executable, str(script), "--num-gpus", "2", "--config-file", str(REPO_ROOT / CONFIG)]
    cmd += OPTS + ["DATASETS.TRAIN", "('rank1_empty',)", "DATALOADER.FILTER_EMPTY_ANNOTATIONS"]
    cmd += ["False", "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path / "ddp")]
    env = dict(os.environ, SOLO_SHAPES_ROOT=str(shapes_root), OMP_NUM_THREADS="1")
    # A desynchronised DDP job hangs in an all-reduce: the timeout turns that into a failure.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EMPTY_RANK_IN_SYNC 2" in proc.stdout
