"""train_net.py end to end on the built-in shapes dataset, on CPU: train, resume, evaluate, DDP."""

import math
import os
import subprocess
import sys
import pytest
import torch

from detectron2.engine import default_argument_parser

import solo.engine.trainer as solo_engine_trainer
from helpers import REPO_ROOT
from helpers import SHAPES_CONFIG as CONFIG
from helpers import SMALL_SHAPES_OPTS as SMALL
from helpers import capture_warnings, load_train_net, read_metrics, run_main, shapes_cache
from solo.data.shapes import register_shapes_datasets

EVAL_SPLIT = "shapes_val_tiny"


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """Generate the shapes dataset once for this module, in a temporary cache."""
    with shapes_cache(tmp_path_factory.mktemp("shapes")) as root:
        register_shapes_datasets(str(root), splits={EVAL_SPLIT: dict(num_images=12, seed=5)})
        yield root


@pytest.fixture(scope="module")
def train_net():
    return load_train_net()


def test_train_checkpoint_resume_and_evaluate(train_net, shapes_root, tmp_path):
    out = str(tmp_path / "run")
    common = ["--config-file", str(REPO_ROOT / CONFIG)]
    opts = SMALL + ["OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", "4"]
    run_main(train_net, common + opts + ["SOLVER.MAX_ITER", "4"])
    assert os.path.isfile(os.path.join(out, "model_0000003.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read().strip() == "model_final.pth"
    first = read_metrics(out)
    assert [m["iteration"] for m in first if "loss_cate" in m][-1] == 3
    assert all(math.isfinite(m["loss_mask"]) for m in first if "loss_mask" in m)

    # --resume continues at the saved iteration, with the saved optimizer and scheduler.
    run_main(train_net, common + ["--resume"] + opts + ["SOLVER.MAX_ITER", "6"])
    resumed = [m["iteration"] for m in read_metrics(out) if "loss_cate" in m]
    assert resumed[-1] == 5 and 4 not in resumed[: len(first)]
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == 5
    # Optimizer and LR scheduler states travel with the trainer state, so --resume restores them.
    assert "optimizer" in final["trainer"]["_trainer"]
    assert "LRScheduler" in final["trainer"]["hooks"]

    # --eval-only loads MODEL.WEIGHTS and returns COCO bbox and segm metrics.
    weights = os.path.join(out, "model_final.pth")
    results = run_main(
        train_net,
        common
        + ["--eval-only"]
        + SMALL
        + ["OUTPUT_DIR", out, "MODEL.WEIGHTS", weights, "DATASETS.TEST", f"('{EVAL_SPLIT}',)"],
    )
    metrics = results  # Detectron2 un-nests the results of a single test dataset
    assert {"bbox", "segm"} <= set(metrics)
    for task in ("bbox", "segm"):
        assert all(math.isfinite(metrics[task][k]) for k in ("AP", "AP50", "AP75"))


@pytest.mark.parametrize("cuda", [False, True])
def test_model_device_falls_back_to_cpu_without_cuda(train_net, monkeypatch, cuda):
    """Checked on every machine: without CUDA train_net's config gets MODEL.DEVICE cpu, with
    CUDA it keeps cuda; a MODEL.DEVICE given on the command line is always kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    config = str(REPO_ROOT / CONFIG)
    assert solo_engine_trainer.get_solo_cfg(config, []).MODEL.DEVICE == ("cuda" if cuda else "cpu")
    assert solo_engine_trainer.get_solo_cfg(config, ["MODEL.DEVICE", "cuda"]).MODEL.DEVICE == "cuda"


def test_amp_on_cpu_trains_in_bfloat16_where_native_else_float32(
    train_net, shapes_root, tmp_path, monkeypatch, caplog
):
    """Detectron2's AMPTrainer needs CUDA; on CPU SOLVER.AMP.ENABLED picks solo.engine's
    bfloat16 trainer, or float32 with a warning where bfloat16 would be emulated."""
    from detectron2.engine import SimpleTrainer

    import solo.engine.train_loop

    opts = SMALL + ["OUTPUT_DIR", str(tmp_path), "SOLVER.AMP.ENABLED", "True"]
    opts += ["SOLVER.MAX_ITER", "3", "MODEL.DEVICE", "cpu"]
    args = default_argument_parser().parse_args(["--config-file", str(REPO_ROOT / CONFIG)])
    args.opts = opts
    cfg = train_net.setup(args)

    monkeypatch.setattr(solo.engine.train_loop, "cpu_has_native_bfloat16", lambda: False)
    with capture_warnings(caplog, "solo.engine"):
        trainer = train_net.Trainer(cfg)
    assert type(trainer._trainer) is SimpleTrainer
    assert "without native bfloat16" in caplog.text

    monkeypatch.setattr(solo.engine.train_loop, "cpu_has_native_bfloat16", lambda: True)
    trainer = train_net.Trainer(cfg)
    assert type(trainer._trainer) is solo.engine.CPUAutocastTrainer
    seen = []
    head = trainer.model.head
    head.cate_pred.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer.train()
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    last = [m for m in read_metrics(str(tmp_path)) if "loss_cate" in m][-1]
    assert last["iteration"] == 2 and math.isfinite(last["loss_cate"] + last["loss_mask"])


DDP_CHECK = r"""
import sys, torch
sys.path.insert(0, {repo!r})
import train_net
from detectron2.engine import default_argument_parser, launch
import detectron2.utils.comm as comm

def worker(args):
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    sums = comm.all_gather(flat)
    if comm.is_main_process():
        assert type(trainer.model).__name__ == "DistributedDataParallel", type(trainer.model)
        assert all(torch.equal(sums[0], s) for s in sums[1:]), "ranks diverged"
        print("RANKS_IN_SYNC", comm.get_world_size())

if __name__ == "__main__":
    args = default_argument_parser().parse_args(sys.argv[1:])
    launch(worker, args.num_gpus, dist_url="auto", args=(args,))
"""


def test_two_process_cpu_ddp_trains_and_keeps_ranks_in_sync(shapes_root, tmp_path):
    script = tmp_path / "ddp_check.py"
    script.write_text(DDP_CHECK.format(repo=str(REPO_ROOT)))
    cmd = [sys.executable, str(script), "--num-gpus", "2", "--config-file", str(REPO_ROOT / CONFIG)]
    cmd += SMALL + ["SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path / "ddp")]
    env = dict(os.environ, SOLO_SHAPES_ROOT=str(shapes_root), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RANKS_IN_SYNC 2" in proc.stdout


def test_eval_only_from_the_runs_config_yaml_keeps_it_and_saves_its_own_next_to_it(tmp_path):
    """``--eval-only --config-file OUTPUT_DIR/config.yaml`` with overrides: Detectron2 saved the
    evaluation's config over the run's record (also when the evaluation then failed)."""
    run = tmp_path / "run"
    run.mkdir()
    written = solo_engine_trainer.get_solo_cfg(str(REPO_ROOT / CONFIG), ["OUTPUT_DIR", str(run)])
    (run / "config.yaml").write_text(written.dump())
    original = (run / "config.yaml").read_text()
    parser = default_argument_parser()
    args = parser.parse_args(
        ["--config-file", str(run / "config.yaml"), "--eval-only", "MODEL.SOLO.SCORE_THRESH", "0.3"]
    )
    cfg = solo_engine_trainer.setup(args)
    assert cfg.MODEL.SOLO.SCORE_THRESH == 0.3
    assert (run / "config.yaml").read_text() == original
    assert "SCORE_THRESH: 0.3" in (run / "config_eval.yaml").read_text()
    # Training (or another OUTPUT_DIR) writes config.yaml as Detectron2 does.
    with solo_engine_trainer.keep_run_config(str(run / "config.yaml"), str(run), eval_only=False):
        (run / "config.yaml").write_text("changed")
    assert (run / "config.yaml").read_text() == "changed"
