#!/usr/bin/env python
"""Train and evaluate SOLO / Decoupled SOLO / SOLOv2 with Detectron2.

    python train_net.py --config-file configs/SOLOv2/R50_3x.yaml --num-gpus 8
    python train_net.py --config-file configs/SOLOv2/R50_3x.yaml --eval-only MODEL.WEIGHTS model.pth
    python train_net.py --config-file configs/Shapes/SOLOv2_R18.yaml   # CPU, built-in data

This is Detectron2's own ``tools/train_net.py`` with the SOLO config and a COCO evaluator; it
also runs on machines without CUDA (``MODEL.DEVICE`` falls back to ``cpu``, DDP over gloo).
``--dist-url`` defaults to ``auto`` (a free port); COCO-format datasets are named with
``DATASETS.COCO_FORMAT`` (solo.data.register).
"""

import solo  # noqa: F401  isort: skip  (first: it hides known start-up warnings, solo.utils.cli)
import torch

import detectron2.utils.comm as comm
from detectron2.engine import default_argument_parser, launch
from detectron2.evaluation import verify_results

from solo.checkpoint import build_inference_model
from solo.engine.checks import check_run_config
from solo.engine.trainer import Trainer, setup
from solo.utils.cli import check_processes, parse_args, use_free_port_by_default


def main(args):
    cfg = setup(args)
    if args.eval_only:
        check_run_config(
            cfg, train=False, world_size=comm.get_world_size(), uses_weights=not args.resume
        )
        # Strict: a checkpoint that only partly fits the model (e.g. trained with another
        # NUM_CLASSES), no MODEL.WEIGHTS, or --resume without a checkpoint is an error, not a
        # warning and an evaluation of random weights.
        model = build_inference_model(cfg, resume=args.resume, save_dir=cfg.OUTPUT_DIR)
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            res.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parse_command_line(argv=None):
    """Detectron2's arguments; ``KEY VALUE`` overrides after the flags (or after ``--opts``),
    ``--dist-url auto`` (a free port) unless given."""
    parser = default_argument_parser()
    use_free_port_by_default(parser)
    return parse_args(parser, argv)


def invoke_main() -> None:
    args = parse_command_line()
    print("Command Line Args:", args)
    check_processes(args.num_gpus, args.num_machines, args.dist_url, torch.cuda.is_available())
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
