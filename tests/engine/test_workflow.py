"""The workflow does what was asked: weights always loaded for evaluation, --resume with a changed
solver applied or refused before training, config mistakes caught before the model is built,
every evaluation written, each run's log its own, messages that name the real cause."""

import os
import shutil
import subprocess
import sys
import pytest
import torch
from torch import nn

from detectron2.engine import SimpleTrainer, default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import REPO_ROOT
from helpers import SHAPES_CONFIG as CONFIG
from helpers import SMALL_SHAPES_OPTS as SMALL
from helpers import load_train_net, read_metrics, run_main, shapes_cache, tiny_cfg
from solo.checkpoint import CheckpointMismatchError, SOLOCheckpointer
from solo.data.shapes import ensure_shapes_dataset, register_shapes_datasets
from solo.engine import CPUAutocastTrainer
from solo.engine.checks import RunConfigError, check_run_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TRAIN = "shapes_workflow_train"
VAL = "shapes_workflow_val"
# 8 small training images, NMS on at most 50 candidates, test at 64 px.
OPTS = SMALL + ["DATASETS.TRAIN", f"('{TRAIN}',)", "MODEL.SOLO.NMS_PRE", "50"]
OPTS += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "80"]
OPTS += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80"]
# The shapes config trains with AdamW; SGD here, so that momentum and nesterov are compared too.
OPTS += ["SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "0"]


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    splits = {TRAIN: dict(num_images=8, seed=21), VAL: dict(num_images=4, seed=22)}
    with shapes_cache(tmp_path_factory.mktemp("shapes_workflow")) as root:
        register_shapes_datasets(str(root), splits=splits)
        for name in splits:
            ensure_shapes_dataset(name)
        yield root


@pytest.fixture(scope="module")
def train_net():
    return load_train_net()


def argv(output_dir, *opts, flags=()):
    return ["--config-file", str(REPO_ROOT / CONFIG), *flags] + OPTS + [
        "OUTPUT_DIR", str(output_dir), *opts
    ]  # fmt: skip


def setup_cfg(train_net, output_dir, *opts):
    return train_net.setup(default_argument_parser().parse_args(argv(output_dir, *opts)))


@pytest.fixture(scope="module")
def trained_run(train_net, shapes_root, tmp_path_factory):
    """A 3-iteration SGD run with its checkpoint (model_final.pth, iteration 2)."""
    out = tmp_path_factory.mktemp("trained")
    run_main(train_net, argv(out, "SOLVER.MAX_ITER", "3"))
    return out


def copy_of(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


# ----------------------------------------------------------------------------------------------
# 1. Evaluation never runs on missing weights
# ----------------------------------------------------------------------------------------------


def test_eval_only_without_weights_is_refused(train_net, shapes_root, tmp_path):
    args = argv(tmp_path, "DATASETS.TEST", f"('{VAL}',)", flags=["--eval-only"])
    with pytest.raises(CheckpointMismatchError, match="MODEL.WEIGHTS is empty"):
        run_main(train_net, args)


def test_eval_only_resume_on_an_output_dir_without_checkpoint_is_refused(
    train_net, shapes_root, tmp_path
):
    typo = tmp_path / "ouput"
    args = argv(typo, "DATASETS.TEST", f"('{VAL}',)", flags=["--eval-only", "--resume"])
    with pytest.raises(CheckpointMismatchError, match="has no checkpoint") as info:
        run_main(train_net, args)
    assert str(typo) in str(info.value) and "without --resume" in str(info.value)


def test_checkpoint_with_layers_the_model_lacks_is_refused_for_prediction(tmp_path):
    """A DCN checkpoint evaluated with a config without DCN loaded every other weight and
    predicted without the learned offsets (a warning only); fine-tuning still loads it."""
    dcn = ["MODEL.SOLO.TOWER_DCN", "DCNv2", "MODEL.SOLO.TOWER_DCN_LAYERS", "last"]
    path = tmp_path / "dcn.pth"
    torch.save({"model": build_model(tiny_cfg("SOLOv2Head", dcn)).state_dict()}, path)
    plain = build_model(tiny_cfg("SOLOv2Head"))
    with pytest.raises(CheckpointMismatchError) as info:
        SOLOCheckpointer(plain, strict=True).load(str(path))
    message = str(info.value)
    assert "Checkpoint keys the model does not have (4)" in message
    assert "head.cate_tower.1.conv.conv_offset.weight" in message and "_DCN" in message
    SOLOCheckpointer(plain).load(str(path))  # not strict: Detectron2's warning


def test_fine_tuning_from_weights_of_which_nothing_fits_is_refused(
    train_net, trained_run, tmp_path
):
    """Keys under another prefix: fvcore warned about every key and trained from scratch."""
    state = torch.load(trained_run / "model_final.pth", weights_only=False)["model"]
    path = tmp_path / "prefixed.pth"
    torch.save({"model": {f"detector.{k}": v for k, v in state.items()}}, path)
    args = argv(tmp_path / "out", "SOLVER.MAX_ITER", "1", "MODEL.WEIGHTS", str(path))
    with pytest.raises(CheckpointMismatchError, match="nothing would be loaded") as info:
        run_main(train_net, args)
    assert "Checkpoint keys the model does not have" in str(info.value)
    assert "detector.backbone." in str(info.value)
    assert not (tmp_path / "out" / "model_final.pth").exists()
    # Weights under 'state_dict' (mmdetection, official SOLO): fvcore's "Unsupported type".
    torch.save({"state_dict": state, "meta": {"epoch": 36}}, path)
    with pytest.raises(
        CheckpointMismatchError, match=r"under \['state_dict'\].*convert_checkpoint"
    ):
        run_main(train_net, args)


# ----------------------------------------------------------------------------------------------
# 2. --resume means what the user asked
# ----------------------------------------------------------------------------------------------


def resumed_trainer(train_net, out, *opts):
    trainer = train_net.Trainer(setup_cfg(train_net, out, *opts))
    trainer.resume_or_load(resume=True)
    return trainer


def test_resume_with_max_iter_below_the_checkpoint_stops(train_net, trained_run, tmp_path):
    out = copy_of(trained_run, tmp_path)
    with pytest.raises(RunConfigError, match="already trained 3 iterations, more than "
                       "SOLVER.MAX_ITER=2") as info:  # fmt: skip
        resumed_trainer(train_net, out, "SOLVER.MAX_ITER", "2")
    assert "--eval-only MODEL.WEIGHTS" in str(info.value)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["SOLVER.OPTIMIZER", "ADAMW"], "trained with SOLVER.OPTIMIZER SGD, the config asks "
         "for ADAMW"),
        (["SOLVER.BIAS_LR_FACTOR", "2.0"], "parameter groups differ"),
    ],
)  # fmt: skip
def test_resume_with_an_incompatible_solver_stops_before_training(
    train_net, trained_run, tmp_path, opts, message
):
    """Detectron2 died in the first step (KeyError: 'momentum') or while loading ("different
    number of parameter groups")."""
    out = copy_of(trained_run, tmp_path)
    with pytest.raises(RunConfigError, match=message) as info:
        resumed_trainer(train_net, out, "SOLVER.MAX_ITER", "5", *opts)
    assert "MODEL.WEIGHTS" in str(info.value) and "model_final.pth" in str(info.value)


def test_resume_applies_a_new_base_lr_weight_decay_and_momentum(train_net, trained_run, tmp_path):
    """Detectron2 silently kept the checkpoint's base learning rates (LR scheduler state)."""
    out = copy_of(trained_run, tmp_path)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    saved_groups = saved["trainer"]["_trainer"]["optimizer"]["param_groups"]
    opts = ["SOLVER.MAX_ITER", "5", "SOLVER.BASE_LR", "0.002", "SOLVER.WEIGHT_DECAY", "0.001"]
    trainer = resumed_trainer(train_net, out, *opts, "SOLVER.MOMENTUM", "0.8")
    assert trainer.start_iter == 3
    for group, old in zip(trainer.optimizer.param_groups, saved_groups):
        assert group["initial_lr"] == pytest.approx(old["initial_lr"] / 5)
        # The resumed iteration 3 of 5 follows the cosine schedule of MAX_ITER 5, at the new
        # rate (the checkpoint's rate is 0: iteration 3 of 3).
        assert old["lr"] == 0.0
        multiplier = trainer.scheduler._multiplier(3 / 5)
        assert group["lr"] == pytest.approx(group["initial_lr"] * multiplier)
        assert group["momentum"] == 0.8
        assert group["weight_decay"] in (0.001, 0.0)  # norms keep WEIGHT_DECAY_NORM
    assert trainer.scheduler.base_lrs == [g["initial_lr"] for g in trainer.optimizer.param_groups]
    trainer.train()
    lrs = {it: lr for lr, it in trainer.storage.history("lr").values()}
    assert lrs[3] == pytest.approx(0.002 * trainer.scheduler._multiplier(3 / 5))


@pytest.mark.parametrize("eval_only", [False, True])
def test_resume_whose_last_checkpoint_was_deleted_names_the_files_left(
    train_net, trained_run, tmp_path, eval_only
):
    """fvcore failed with a bare "AssertionError: Checkpoint ... not found!"."""
    out = copy_of(trained_run, tmp_path)
    (out / "last_checkpoint").write_text("model_0000099.pth")
    flags = ["--resume", "--eval-only"] if eval_only else ["--resume"]
    args = argv(out, "SOLVER.MAX_ITER", "5", "DATASETS.TEST", f"('{VAL}',)", flags=flags)
    with pytest.raises(CheckpointMismatchError, match="does not exist") as info:
        run_main(train_net, args)
    assert "model_0000099.pth" in str(info.value) and "['model_final.pth']" in str(info.value)


def test_resume_with_an_unchanged_solver_changes_nothing(train_net, trained_run, tmp_path):
    out = copy_of(trained_run, tmp_path)
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    trainer = resumed_trainer(train_net, out, "SOLVER.MAX_ITER", "5")
    saved_groups = saved["trainer"]["_trainer"]["optimizer"]["param_groups"]
    for group, old in zip(trainer.optimizer.param_groups, saved_groups):
        kept = [k for k in old if k not in ("params", "lr")]
        assert {k: group[k] for k in kept} == {k: old[k] for k in kept}
    assert trainer.scheduler.base_lrs == [g["initial_lr"] for g in saved_groups]


# ----------------------------------------------------------------------------------------------
# 3. Config mistakes caught before the model is built
# ----------------------------------------------------------------------------------------------


def test_dataset_name_written_as_a_string_fails_before_training(train_net, shapes_root, tmp_path):
    """cfg.DATASETS.TEST = ("name") is a string: Detectron2 trained the whole schedule, then
    failed on dataset 'n' (the early class-count check walked the letters)."""
    cfg = setup_cfg(train_net, tmp_path)
    cfg.defrost()
    cfg.DATASETS.TEST = VAL  # what a notebook user writes
    with pytest.raises(RunConfigError, match="DATASETS.TEST is the string") as info:
        train_net.Trainer(cfg)
    assert f"('{VAL}',)" in str(info.value)


def test_unregistered_dataset_is_named_with_close_matches(train_net, shapes_root, tmp_path):
    cfg = setup_cfg(train_net, tmp_path, "DATASETS.TEST", "('shapes_workflow_vla',)")
    with pytest.raises(RunConfigError, match=f"'shapes_workflow_vla'.*Did you mean.*'{VAL}'"):
        train_net.Trainer(cfg)


@pytest.mark.parametrize(
    "opts, message",
    [
        (["DATASETS.TRAIN", "()"], "DATASETS.TRAIN is empty"),
        (["SOLVER.CHECKPOINT_PERIOD", "0"], "SOLVER.CHECKPOINT_PERIOD=0 must be positive"),
        (["SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR", "SOLVER.STEPS", "(30, 20)"],
         r"SOLVER.STEPS=\(30, 20\) must be strictly increasing"),
        (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "range", "INPUT.MIN_SIZE_TRAIN", "(48, 56, 64)"],
         "'range' needs INPUT.MIN_SIZE_TRAIN"),
        (["INPUT.MIN_SIZE_TRAIN_SAMPLING", "ranges"], "is not one of"),
        (["MODEL.LOAD_PROPOSALS", "True"], "PROPOSAL_FILES_TRAIN has 0 files"),
        (["MODEL.DEVICE", "cuda"], "CUDA is not available"),
    ],
)  # fmt: skip
def test_config_mistakes_fail_before_building(
    train_net, shapes_root, tmp_path, monkeypatch, opts, message
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = setup_cfg(train_net, tmp_path, *opts)
    with pytest.raises(RunConfigError, match=message):
        train_net.Trainer(cfg)


def test_batch_that_cannot_be_split_over_the_processes_is_named(train_net, shapes_root, tmp_path):
    cfg = setup_cfg(train_net, tmp_path, "SOLVER.IMS_PER_BATCH", "3")
    with pytest.raises(RunConfigError, match="IMS_PER_BATCH=3 cannot be split over 2 processes"):
        check_run_config(cfg, train=True, world_size=2)


def test_missing_weights_file_fails_before_training(train_net, shapes_root, tmp_path):
    cfg = setup_cfg(train_net, tmp_path, "MODEL.WEIGHTS", str(tmp_path / "missing.pth"))
    trainer = train_net.Trainer(cfg)
    with pytest.raises(RunConfigError, match="MODEL.WEIGHTS .*missing.pth' does not exist"):
        trainer.resume_or_load(resume=False)


# ----------------------------------------------------------------------------------------------
# 4. No metric or log line lost
# ----------------------------------------------------------------------------------------------


def test_every_evaluation_reaches_metrics_json(train_net, shapes_root, tmp_path):
    """TEST.EVAL_PERIOD 2 < the writers' period (20): evaluations after iterations 1 and 3, and
    the final one (recorded at iteration 6 = MAX_ITER, as Detectron2 does)."""
    opts = ["SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "2", "DATASETS.TEST", f"('{VAL}',)"]
    run_main(train_net, argv(tmp_path, *opts))
    evaluated = [m["iteration"] for m in read_metrics(tmp_path) if "segm/AP" in m]
    assert evaluated == [1, 3, 6]
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("segm/AP")] == [1, 3, 6]


def test_two_runs_in_one_process_keep_their_own_logs(train_net, shapes_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_main(train_net, argv(first, "SOLVER.MAX_ITER", "1"))
    run_main(train_net, argv(second, "SOLVER.MAX_ITER", "1"))
    first_log = (first / "log.txt").read_text()
    second_log = (second / "log.txt").read_text()
    assert str(first) in first_log and str(second) not in first_log
    assert str(second) in second_log and str(first) not in second_log
    assert first_log.count("Starting training from iteration 0") == 1
    assert [m["iteration"] for m in read_metrics(second) if "loss_cate" in m] == [0]


# ----------------------------------------------------------------------------------------------
# 5. Messages that name the real cause
# ----------------------------------------------------------------------------------------------

REGISTERED_UNDER_MAIN = r"""
import sys
import train_net
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser, launch

if __name__ == "__main__":
    DatasetCatalog.register("registered_under_main", lambda: [])
    args = default_argument_parser().parse_args(sys.argv[1:])
    launch(train_net.main, args.num_gpus, dist_url="auto", args=(args,))
"""


def test_dataset_registered_under_main_in_a_multi_process_run_says_why(shapes_root, tmp_path):
    script = tmp_path / "my_train.py"
    script.write_text(REGISTERED_UNDER_MAIN)
    cmd = [sys.executable, str(script), "--num-gpus", "2"] + argv(
        tmp_path / "out", "DATASETS.TRAIN", "('registered_under_main',)"
    )
    env = dict(os.environ, SOLO_SHAPES_ROOT=str(shapes_root), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "'registered_under_main', which is not registered" in proc.stderr
    assert 'never run the launching script\'s `if __name__ == "__main__":` block' in proc.stderr


# ----------------------------------------------------------------------------------------------
# CPU mixed precision keeps SimpleTrainer's options
# ----------------------------------------------------------------------------------------------


class GradientsAtForward(nn.Module):
    """A linear regression that records, at each forward pass, whether gradients were zeroed."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)
        self.grad_was_none = []

    def forward(self, batch):
        self.grad_was_none.append(self.linear.weight.grad is None)
        return {"loss_l2": ((self.linear(batch).float() - 1.0) ** 2).mean()}


@pytest.mark.parametrize("zero_grad_before_forward", [False, True])
def test_cpu_autocast_trainer_keeps_simple_trainer_options(zero_grad_before_forward):
    torch.manual_seed(0)
    model = GradientsAtForward()
    data = [torch.randn(8, 4) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = CPUAutocastTrainer(
        model, data, optimizer, zero_grad_before_forward=zero_grad_before_forward,
        async_write_metrics=True,
    )  # fmt: skip
    with EventStorage(0) as storage:
        trainer.storage = storage
        for trainer.iter in range(3):
            trainer.run_step()
        trainer.concurrent_executor.shutdown(wait=True)
    assert model.grad_was_none == [True] + [zero_grad_before_forward] * 2
    # Written by the executor with each step's iteration (synchronous writes use storage.iter).
    assert [it for _, it in storage.history("total_loss").values()] == [0, 1, 2]


def test_amp_trainer_for_a_cpu_model_keeps_its_options(monkeypatch):
    import solo.engine.train_loop

    model, data = GradientsAtForward(), [torch.randn(2, 4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    built = SimpleTrainer(model, data, optimizer, gather_metric_period=3,
                          zero_grad_before_forward=True, async_write_metrics=True)  # fmt: skip
    for native, expected in ((True, CPUAutocastTrainer), (False, SimpleTrainer)):
        monkeypatch.setattr(solo.engine.train_loop, "cpu_has_native_bfloat16", lambda: native)
        trainer = solo.engine.trainer_for_cpu_amp(built)
        assert type(trainer) is expected
        assert (trainer.gather_metric_period, trainer.zero_grad_before_forward) == (3, True)
        assert trainer.async_write_metrics and trainer.optimizer is optimizer
