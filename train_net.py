#!/usr/bin/env python
"""Train and evaluate SOLO / Decoupled SOLO / SOLOv2 with Detectron2.

    python train_net.py --config-file configs/SOLOv2/R50_3x.yaml --num-gpus 8
    python train_net.py --config-file configs/SOLOv2/R50_3x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/Shapes/SOLOv2_R18_tiny.yaml   # CPU, built-in data

This is Detectron2's own ``tools/train_net.py`` with the SOLO config and a COCO evaluator; it
also runs on machines without CUDA (``MODEL.DEVICE`` falls back to ``cpu``, DDP over gloo).
"""
import logging
import os
import sys
from contextlib import contextmanager
from unittest import mock

import torch

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.engine import defaults as engine_defaults
from detectron2.evaluation import COCOEvaluator, verify_results

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "projects", "SOLO"))
from solo import add_solo_config  # noqa: E402
from solo.data import ensure_shapes_dataset, register_builtin_datasets  # noqa: E402

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


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with cpu_capable_ddp():
            super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        # COCOEvaluator reads the annotation file directly: make sure a built-in dataset exists.
        ensure_shapes_dataset(dataset_name)
        return COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)


def setup(args):
    cfg = get_cfg()
    add_solo_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if not torch.cuda.is_available() and "MODEL.DEVICE" not in args.opts[::2]:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    register_builtin_datasets()
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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
