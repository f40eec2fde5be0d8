#!/usr/bin/env python
"""Train and evaluate SOLO / Decoupled SOLO / SOLOv2 with Detectron2.

    python train_net.py --config-file configs/SOLOv2/R50_3x.yaml --num-gpus 8
    python train_net.py --config-file configs/SOLOv2/R50_3x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/Shapes/SOLOv2_R18.yaml   # CPU, built-in data

This is Detectron2's own ``tools/train_net.py`` with the SOLO config and a COCO evaluator; it
also runs on machines without CUDA (``MODEL.DEVICE`` falls back to ``cpu``, DDP over gloo).
"""
import functools
import logging
import os
import sys
from contextlib import contextmanager
from unittest import mock

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.engine import defaults as engine_defaults
from detectron2.evaluation import COCOEvaluator, verify_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "projects", "SOLO"))
from solo import get_solo_cfg  # noqa: E402
from solo.checkpoint import SOLOCheckpointer  # noqa: E402
from solo.data import (  # noqa: E402
    SOLODatasetMapper,
    check_num_classes,
    ensure_shapes_dataset,
    load_dataset_dicts,
    register_builtin_datasets,
)
from solo.engine import build_amp_trainer  # noqa: E402
from solo.solver import build_solo_optimizer  # noqa: E402

logger = logging.getLogger("detectron2")


@contextmanager
def cpu_capable_ddp():
    """Detectron2 always passes ``device_ids=[local_rank]`` to DDP, which CPU models reject."""
    create = engine_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return create(model, **kwargs)

    with mock.patch.object(engine_defaults, "create_ddp_model", create_ddp_model):
        yield


@contextmanager
def cpu_capable_amp():
    """Detectron2's AMPTrainer requires CUDA; on CPU, SOLVER.AMP.ENABLED means bfloat16."""
    amp_trainer = functools.partial(build_amp_trainer, engine_defaults.AMPTrainer)
    with mock.patch.object(engine_defaults, "AMPTrainer", amp_trainer):
        yield


class SOLOCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator that reports 0 AP (not NaN) when the model predicts nothing at all.

    With no detections, precision is 0 at every recall level, which is what COCO's own
    evaluation gives a category that has ground truth but no detections; Detectron2 only skips
    pycocotools (which cannot load an empty result list) and returns NaN, which then breaks
    best-checkpoint selection and plots.
    """

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names)
        if coco_eval is None:
            self._logger.warning(f"No {iou_type} predictions above the score threshold: AP is 0.")
            results = {metric: 0.0 for metric in results}
        return results


def check_solo_num_classes(cfg, dataset_names):
    """MODEL.SOLO.NUM_CLASSES must equal the class count of every dataset (metadata)."""
    check_num_classes(cfg.MODEL.SOLO.NUM_CLASSES, dataset_names, "MODEL.SOLO.NUM_CLASSES")


class Trainer(DefaultTrainer):
    """DefaultTrainer with SOLO's data checks and mapper, atomic checkpoints, COCO evaluation."""

    def __init__(self, cfg):
        # Before the (possibly long) model and dataset construction: the datasets whose metadata
        # is already known are checked now, the others as soon as they are loaded.
        check_solo_num_classes(cfg, list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
        with cpu_capable_ddp(), cpu_capable_amp():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ creates a plain DetectionCheckpointer right before building the
        # hooks; swap it for the atomic one here, so that PeriodicCheckpointer (built below),
        # resume_or_load and the final save all use it.
        old = self.checkpointer
        self.checkpointer = SOLOCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        return super().build_hooks()

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
        mapper = SOLODatasetMapper(cfg, is_train=True)
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
        mapper = SOLODatasetMapper(cfg, is_train=False, dataset_name=dataset_name)
        return build_detection_test_loader(
            dataset, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # COCOEvaluator reads the annotation file directly: make sure a built-in dataset exists.
        ensure_shapes_dataset(dataset_name)
        return SOLOCOCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)


def setup(args):
    cfg = get_solo_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    register_builtin_datasets()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_solo_num_classes(cfg, cfg.DATASETS.TEST)
        model = Trainer.build_model(cfg)
        # Strict: evaluating a checkpoint that only partly fits the model (e.g. trained with a
        # different NUM_CLASSES) is an error listing the keys, not a warning and random weights.
        SOLOCheckpointer(model, save_dir=cfg.OUTPUT_DIR, strict=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
