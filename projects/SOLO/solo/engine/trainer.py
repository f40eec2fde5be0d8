"""SOLO's trainer: Detectron2's ``DefaultTrainer`` overriding only what differs (data checks and
mapper, atomic checkpoints, SOLO's evaluator and optimizer, CPU mixed precision and DDP, checked
resumption), and :func:`setup`, the config and logging of one run (``train_net.py``)."""

import logging
import os
import warnings
from collections import OrderedDict
from contextlib import contextmanager

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as engine_defaults
from detectron2.engine import hooks
from detectron2.utils.logger import setup_logger

from ..checkpoint import SOLOCheckpointer
from ..config import get_solo_cfg
from ..data import (
    ensure_panoptic_shapes_dataset,
    ensure_shapes_dataset,
    load_dataset_dicts,
    register_datasets,
)
from ..data.panoptic_mapper import build_solo_dataset_mapper, check_dataset_tasks
from ..evaluation import build_solo_evaluator
from ..modeling import SOLOWithTTA
from ..solver import build_solo_optimizer
from .checks import check_run_config, check_weights_file
from .hooks import WriteAfterEvaluation
from .resume import compare_resumed_solver, describe_changes
from .train_loop import trainer_for_cpu_amp

__all__ = ["Trainer", "cpu_ddp_without_device_ids", "setup"]

logger = logging.getLogger("detectron2")


@contextmanager
def cpu_ddp_without_device_ids():
    """The one adapter around Detectron2: ``DefaultTrainer.__init__`` wraps the model with
    ``create_ddp_model``, which always passes ``device_ids=[local_rank]``, and DDP rejects
    ``device_ids`` for a CPU model. Detectron2 has no hook there, so while the trainer is built,
    ``detectron2.engine.defaults.create_ddp_model`` passes ``device_ids=None`` for CPU models."""
    create = engine_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    engine_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        engine_defaults.create_ddp_model = create


class Trainer(DefaultTrainer):
    """DefaultTrainer with SOLO's data checks and mapper, atomic checkpoints, COCO evaluation,
    CPU mixed precision and DDP, checked resumption, and every evaluation written."""

    def __init__(self, cfg):
        # Before the (possibly long) model and dataset construction; MODEL.WEIGHTS is checked
        # in resume_or_load, which knows whether it is used.
        check_run_config(cfg, train=True, world_size=comm.get_world_size(), uses_weights=False)
        with cpu_ddp_without_device_ids(), warnings.catch_warnings():
            if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
                # The CUDA AMPTrainer built here is replaced below; its GradScaler would warn.
                warnings.filterwarnings("ignore", ".*GradScaler", category=UserWarning)
                warnings.filterwarnings("ignore", ".*GradScaler", category=FutureWarning)
            super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:  # Detectron2 built its CUDA-only AMPTrainer
            self._trainer = trainer_for_cpu_amp(self._trainer)

    def resume_or_load(self, resume=True):
        resuming = resume and self.checkpointer.has_checkpoint()
        if not resuming:
            check_weights_file(self.cfg)
            if resume:
                logger.warning(
                    f"--resume: no checkpoint in OUTPUT_DIR '{self.cfg.OUTPUT_DIR}'; starting at "
                    f"iteration 0 from MODEL.WEIGHTS '{self.cfg.MODEL.WEIGHTS}'."
                )
        super().resume_or_load(resume=resume)

    def load_state_dict(self, state_dict):
        """Restore the trainer state of a checkpoint (``--resume``) after comparing its solver
        with the config's (:func:`solo.engine.resume.compare_resumed_solver`): an incompatible one
        stops here, before any iteration; changed learning rates, weight decays and momentum
        are applied, with a warning."""
        checkpoint = self.checkpointer.get_checkpoint_file()
        new_groups = self.optimizer.state_dict()["param_groups"]
        changes = compare_resumed_solver(
            state_dict["_trainer"]["optimizer"]["param_groups"],
            new_groups,
            state_dict["iteration"],
            self.max_iter,
            checkpoint,
        )
        super().load_state_dict(state_dict)
        if state_dict["iteration"] + 1 == self.max_iter:
            logger.warning(
                f"--resume: '{checkpoint}' completed SOLVER.MAX_ITER={self.max_iter} "
                "iterations: nothing left to train, only the final evaluation runs."
            )
        groups, base_lrs = self.optimizer.param_groups, self.scheduler.base_lrs
        for index, key, _, new in changes:
            groups[index][key] = new
            if key == "initial_lr":  # what the LR scheduler multiplies
                base_lrs[index] = new
        if changes:
            logger.warning(f"--resume: applying the config's solver: {describe_changes(changes)}")
        # The first resumed iteration follows the config's schedule too (its MAX_ITER and STEPS
        # may differ from the checkpoint's), not the learning rate saved with the optimizer.
        for group, lr in zip(groups, self.scheduler.get_lr()):
            group["lr"] = lr

    def build_writers(self):
        self._writers = super().build_writers()
        return self._writers

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a plain DetectionCheckpointer right before building the
        # hooks; swap it for the atomic one here, so that PeriodicCheckpointer (built below),
        # resume_or_load and the final save all use it.
        old = self.checkpointer
        self.checkpointer = SOLOCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        ret = super().build_hooks()
        if self.cfg.TEST.AUG.ENABLED:
            # After the plain final evaluation, before the writer, which then records it.
            evaluation = max(i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook))
            tta = hooks.EvalHook(0, lambda: self.test_with_TTA(self.cfg, self.model))
            ret.insert(evaluation + 1, tta)
        if comm.is_main_process() and self.cfg.TEST.EVAL_PERIOD > 0:
            ret.append(WriteAfterEvaluation(self._writers, self.cfg.TEST.EVAL_PERIOD))
        return ret

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_solo_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        names = list(cfg.DATASETS.TRAIN)
        dataset = load_dataset_dicts(
            names,
            num_classes=cfg.MODEL.SOLO.NUM_CLASSES,
            check_annotations=True,
            use_masks=cfg.MODEL.MASK_ON,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        check_dataset_tasks(cfg, names, "TRAIN", dataset)
        mapper = build_solo_dataset_mapper(cfg, is_train=True)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        proposals = None
        if cfg.MODEL.LOAD_PROPOSALS:
            proposals = [
                cfg.DATASETS.PROPOSAL_FILES_TEST[list(cfg.DATASETS.TEST).index(dataset_name)]
            ]
        dataset = load_dataset_dicts(
            [dataset_name],
            num_classes=cfg.MODEL.SOLO.NUM_CLASSES,
            filter_empty=False,
            proposal_files=proposals,
        )
        check_dataset_tasks(cfg, [dataset_name], "TEST")
        mapper = build_solo_dataset_mapper(cfg, is_train=False, dataset_name=dataset_name)
        return build_detection_test_loader(
            dataset, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
        )

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluate ``model`` with test-time augmentation (``TEST.AUG``, :class:`SOLOWithTTA`) as
        Detectron2's ``train_net.py`` does for R-CNN: results under ``<metric group>_TTA``,
        predictions in ``OUTPUT_DIR/inference_TTA``."""
        aug = cfg.TEST.AUG
        logger.info(
            f"Running inference with test-time augmentation: short sides {tuple(aug.MIN_SIZES)} "
            f"(long side <= {aug.MAX_SIZE}), flip {aug.FLIP}; merged by one Matrix NMS."
        )
        evaluators = [
            cls.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference_TTA"))
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, SOLOWithTTA(cfg, model), evaluators)
        return OrderedDict((key + "_TTA", value) for key, value in results.items())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The dataset's evaluator by its ``evaluator_type`` (:func:`build_solo_evaluator`); a
        built-in shapes split is generated first (its evaluator reads the JSON file)."""
        ensure_shapes_dataset(dataset_name)
        ensure_panoptic_shapes_dataset(dataset_name)
        return build_solo_evaluator(cfg, dataset_name, output_folder)


# Loggers a run writes to log.txt; the handlers that setup() adds to them belong to that run.
RUN_LOGGERS = ("detectron2", "fvcore", "solo")
_run_handlers = []


@contextmanager
def keep_run_config(config_file: str, output_dir: str, eval_only: bool):
    """``--eval-only --config-file OUTPUT_DIR/config.yaml`` (how a run is evaluated again):
    Detectron2's ``default_setup`` saves the config it runs with over that very file, so the
    training run's record would take the evaluation's overrides, also those of an evaluation
    that then fails. The run's file is kept; the evaluation's config is saved next to it as
    ``config_eval.yaml``."""
    target = os.path.join(output_dir, "config.yaml") if output_dir else ""
    same = (
        eval_only
        and comm.is_main_process()
        and os.path.isfile(target)
        and os.path.isfile(config_file)
        and os.path.samefile(config_file, target)
    )
    kept = open(target).read() if same else None
    try:
        yield
    finally:
        if kept is not None:
            if os.path.isfile(target):
                os.replace(target, os.path.join(output_dir, "config_eval.yaml"))
            with open(target, "w") as f:
                f.write(kept)


def setup(args):
    cfg = get_solo_cfg(args.config_file, args.opts)
    cfg.freeze()
    # A second run in the same process (notebook, sweep) must not also log into the first run's
    # log.txt: drop the previous run's handlers, and let Detectron2's cached setup_logger add
    # this run's.
    for name, handler in _run_handlers:
        logging.getLogger(name).removeHandler(handler)
    setup_logger.cache_clear()
    before = {name: list(logging.getLogger(name).handlers) for name in RUN_LOGGERS}
    with keep_run_config(args.config_file, cfg.OUTPUT_DIR, args.eval_only):
        default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="solo")
    _run_handlers[:] = [
        (name, handler)
        for name in RUN_LOGGERS
        for handler in logging.getLogger(name).handlers
        if handler not in before[name]
    ]
    register_datasets(cfg)  # here, so that every --num-gpus worker registers them too
    return cfg
