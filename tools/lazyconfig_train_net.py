#!/usr/bin/env python
"""Train and evaluate SOLO models from LazyConfig Python files (configs/**/*.py), as Detectron2's
``tools/lazyconfig_train_net.py`` does:

    python tools/lazyconfig_train_net.py --config-file configs/SOLOv2/R50_1x.py --num-gpus 8
    python tools/lazyconfig_train_net.py --config-file configs/SOLOv2/R50_1x.py --eval-only \\
        train.init_checkpoint=model_final.pth
    python tools/lazyconfig_train_net.py --config-file configs/Shapes/SOLOv2_R18.py  # CPU

Overrides are ``key=value`` pairs (``train.max_iter=100``). Compared with Detectron2's script:
the config is checked first (missing sections, unregistered datasets, the batch split over the
processes, a missing checkpoint file: each named with its fix); evaluation loads weights
strictly (a checkpoint that only partly fits is an error, not an evaluation of random weights);
checkpoints are written atomically; ``train.device`` falls back to ``cpu`` without CUDA, where
``train.amp.enabled`` runs the forward pass in bfloat16.
"""

import solo  # noqa: F401  isort: skip  (first: it hides known start-up warnings)
import logging
import os
import torch

import detectron2.utils.comm as comm
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    create_ddp_model,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format

from solo.checkpoint import SOLOCheckpointer
from solo.data import ensure_shapes_dataset, register_shapes_datasets
from solo.engine.train_loop import CPUAutocastTrainer
from solo.utils.cli import check_processes, use_free_port_by_default

logger = logging.getLogger("solo")

#: Sections a config needs, for training and for evaluation.
TRAIN_KEYS = ("model", "train", "optimizer", "lr_multiplier", "dataloader.train")
EVAL_KEYS = ("model", "train", "dataloader.test", "dataloader.evaluator")


class LazyConfigError(ValueError):
    """A LazyConfig that cannot run as asked; the message names the key and the fix."""


def _has(cfg, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def check_lazy_config(cfg, config_file: str, *, train: bool, world_size: int = 1) -> None:
    """Refuse, before building anything, a config that lacks a section, names unregistered
    datasets, splits its batch unevenly or names a checkpoint file that does not exist."""
    keys = TRAIN_KEYS if train else EVAL_KEYS
    missing = [k for k in keys if not _has(cfg, k)]
    if missing:
        raise LazyConfigError(
            f"{config_file} has no {missing} (needed to {'train' if train else 'evaluate'}); "
            "define them in the file or import them from configs/common/ as the recipes in "
            "configs/ do."
        )
    loaders = ["train"] if train else ["test"]
    for split in loaders:
        names = cfg.dataloader[split].dataset.get("names", [])
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            if name not in DatasetCatalog.list():
                raise LazyConfigError(
                    f"dataloader.{split}.dataset.names: dataset '{name}' is not registered; "
                    f"registered: {sorted(DatasetCatalog.list())[:20]} ... Register it "
                    "(detectron2.data.datasets.register_coco_instances) or name another."
                )
    if train:
        batch = cfg.dataloader.train.get("total_batch_size", world_size)
        if batch % world_size:
            raise LazyConfigError(
                f"dataloader.train.total_batch_size={batch} does not split over {world_size} "
                f"processes; use a multiple of {world_size}."
            )
    weights = cfg.train.get("init_checkpoint", "")
    if not train and not weights:
        raise LazyConfigError(
            "--eval-only needs weights: set train.init_checkpoint=path/to/model_final.pth."
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise LazyConfigError(
            f"train.init_checkpoint='{weights}' does not exist; download or convert it "
            "(tools/convert_checkpoint.py, see the comment next to it in the config) or set "
            "train.init_checkpoint=''."
        )


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    ensure_shapes_dataset(cfg.dataloader.evaluator.dataset_name)  # a built-in split: generate
    evaluator = instantiate(cfg.dataloader.evaluator)
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), evaluator)
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optim = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    if not cfg.train.amp.enabled:
        trainer = SimpleTrainer(model, train_loader, optim)
    elif cfg.train.device == "cpu":
        trainer = CPUAutocastTrainer(model, train_loader, optim)
    else:
        trainer = AMPTrainer(model, train_loader, optim)
    checkpointer = SOLOCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if comm.is_main_process()
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        cfg.train.device = "cpu"
    default_setup(cfg, args)
    register_shapes_datasets()  # the built-in splits, in every process; generated on first use
    check_lazy_config(
        cfg, args.config_file, train=not args.eval_only, world_size=comm.get_world_size()
    )
    if args.eval_only:
        model = instantiate(cfg.model)
        model.to(cfg.train.device)
        model = create_ddp_model(model)
        SOLOCheckpointer(model, cfg.train.output_dir, strict=True).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(args, cfg)


def invoke_main() -> None:
    parser = default_argument_parser()
    use_free_port_by_default(parser)
    args = parser.parse_args()
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
    invoke_main()  # pragma: no cover
