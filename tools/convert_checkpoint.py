#!/usr/bin/env python
"""Convert published SOLO / SOLOv2 / ImageNet weights for this project's models.

Examples (run from the repository root)::

    # WXinlong/SOLO model zoo (mmdetection v1) -> Detectron2 checkpoint
    python tools/convert_checkpoint.py --source official --config configs/SOLOv2/R50_3x.yaml \\
        SOLOv2_R50_3x.pth checkpoints/SOLOv2_R50_3x.pth

    # mmdetection 2.x / 3.x model zoo (also training checkpoints, without mmengine installed)
    python tools/convert_checkpoint.py --source mmdet --config configs/SOLOv2/R50_3x.yaml \\
        solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth checkpoints/mmdet_SOLOv2_R50_3x.pth

    # AdelaiDet SOLOv2: its own config (MSRA ResNet, BGR input, std 1), nothing else to set
    python tools/convert_checkpoint.py --source adelaidet \\
        --config configs/SOLOv2/AdelaiDet_R50_3x.yaml \\
        SOLOv2_R50_3x.pth checkpoints/AdelaiDet_SOLOv2_R50_3x.pth

    # torchvision ImageNet backbone -> the .pkl the configs' MODEL.WEIGHTS point to
    python tools/convert_checkpoint.py --source torchvision --config configs/SOLO/R50_1x.yaml \\
        resnet50-0676ba61.pth checkpoints/torchvision-R-50.pkl

    # a model of this project saved with torch.save (DDP, torch.compile, Lightning, EMA copy)
    python tools/convert_checkpoint.py --source solo --config configs/SOLOv2/R50_3x.yaml \\
        model_ddp.pth checkpoints/model.pth

Use the result with ``MODEL.WEIGHTS DST`` and the same config (and the same ``KEY VALUE``
overrides, written after SRC DST). The tool builds
the config's model and refuses to write a checkpoint that does not fit it exactly. Wrappers are
found for every source: ``state_dict`` / ``model`` nesting, ``module.`` / ``model.`` /
``_orig_mod.`` key prefixes, and EMA copies (``state_dict_ema``, ``ema_state``, ``model_ema`` are
used instead of the raw weights; mmengine's ``state_dict`` already holds the EMA weights).
"""

import solo  # noqa: F401  isort: skip  (first: it hides known start-up warnings, solo.utils.cli)
import argparse
import logging
import sys

from detectron2.config import get_cfg

import solo
from solo.checkpoint.convert import SOURCES, ConversionError, convert_checkpoint
from solo.utils.cli import add_opts_argument, parse_args

logger = logging.getLogger("convert_checkpoint")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n",
    )
    parser.add_argument("--source", required=True, choices=SOURCES, help="layout of SRC")
    parser.add_argument(
        "--config",
        metavar="CONFIG",
        help="config of the model to convert for (required except for --source torchvision, "
        "where it enables the checks)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow SRC to contain arbitrary pickled objects (only for files you trust)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("src", metavar="SRC", help="checkpoint to convert")
    parser.add_argument("dst", metavar="DST", help="output (.pth; .pkl for --source torchvision)")
    add_opts_argument(parser)
    return parser


def setup_cfg(config_file: str, opts):
    cfg = get_cfg()
    solo.add_solo_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (OSError, KeyError, ValueError, AssertionError) as e:
        raise ConversionError(f"Cannot use config {config_file} with overrides {opts}: {e}") from e
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def main(argv=None) -> int:
    args = parse_args(get_parser(), argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        cfg = setup_cfg(args.config, args.opts) if args.config else None
        if cfg is None and args.opts:
            raise ConversionError(f"config overrides {args.opts} need --config.")
        convert_checkpoint(args.src, args.dst, args.source, cfg, trust_pickle=args.trust_pickle)
    except ConversionError as e:
        logger.error("%s", e)
        return 1
    logger.info("Done: use MODEL.WEIGHTS %s", args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
