"""Checking a conversion against the model it is for: keys and shapes, the config settings that
shapes cannot show (ResNet stride placement), and the class names a checkpoint's meta data give."""

import logging
import re
from typing import Dict, Mapping, Optional, Sequence, Tuple
import torch

from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model

from .errors import ConversionError, listing
from .sources import get_source

__all__ = [
    "check_against_model",
    "check_class_names",
    "check_config",
    "checkpoint_class_names",
    "model_shapes",
]

logger = logging.getLogger(__name__)


def model_shapes(cfg) -> Dict[str, Tuple[int, ...]]:
    """Shapes of every parameter and persistent buffer of the model ``cfg`` builds (on CPU)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_against_model(
    converted: Mapping[str, torch.Tensor],
    expected: Mapping[str, Tuple[int, ...]],
    prefix: str = "",
    optional: Optional[str] = None,
    origin: str = "the checkpoint",
):
    """Every converted key ``prefix + key`` must be a model key with the same shape, and every
    model key under ``prefix`` must be converted (except those matching ``optional``).

    Raises :class:`ConversionError` listing missing, unexpected and mismatched keys.
    """
    optional_re = re.compile(optional) if optional else None
    unexpected, mismatched = [], []
    for key, value in converted.items():
        name = prefix + key
        if name not in expected:
            unexpected.append(name)
        elif tuple(value.shape) != tuple(expected[name]):
            mismatched.append(
                f"{name}: converted {tuple(value.shape)}, model {tuple(expected[name])}"
            )
    have = {prefix + k for k in converted}
    missing = [
        k
        for k in expected
        if k.startswith(prefix) and k not in have and not (optional_re and optional_re.search(k))
    ]
    if missing or unexpected or mismatched:
        parts = [
            listing(title, items)
            for title, items in (
                ("model keys missing from the conversion", missing),
                ("converted keys the model does not have", unexpected),
                ("shape mismatches", mismatched),
            )
            if items
        ]
        raise ConversionError(
            f"{origin} does not fit the model of the given config (wrong config for this "
            "checkpoint?):\n" + "\n".join(parts)
        )


def check_config(cfg, source: str):
    """Settings of the target config that must match how the source network was built.

    Raises :class:`ConversionError` naming the setting and the value it needs.
    """
    if "resnet" not in cfg.MODEL.BACKBONE.NAME:
        return  # the ResNet keys below do not describe another bottom-up network
    r, wanted = cfg.MODEL.RESNETS, get_source(source).stride_in_1x1
    # Shapes do not tell where a bottleneck strides, so a wrong setting would load silently.
    if wanted is not None and r.DEPTH >= 50 and bool(r.STRIDE_IN_1X1) != wanted:
        style = "MSRA/caffe-style (stride in the 1x1 conv)" if wanted else "pytorch-style"
        raise ConversionError(
            f"{source} ResNets are {style}: the target config needs "
            f"MODEL.RESNETS.STRIDE_IN_1X1 {wanted} (e.g. MODEL.RESNETS.STRIDE_IN_1X1 "
            f"{wanted} after the tool's arguments). Shapes would match, outputs would not."
        )


def checkpoint_class_names(loaded) -> Optional[Tuple[str, ...]]:
    """Class names the checkpoint's meta data give, in label order, or ``None``: mmdetection
    v1 / 2.x ``meta["CLASSES"]``, mmdetection 3.x (mmengine) ``meta["dataset_meta"]["classes"]``."""
    meta = loaded.get("meta") if isinstance(loaded, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    names = meta.get("CLASSES")
    if names is None and isinstance(meta.get("dataset_meta"), Mapping):
        names = meta["dataset_meta"].get("classes")
    if isinstance(names, str):  # a single-class dataset may store the bare name
        names = (names,)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return None
    return tuple(names)


def check_class_names(names: Sequence[str], cfg, origin: str = "the checkpoint"):
    """The checkpoint's class count must be the config's ``MODEL.SOLO.NUM_CLASSES``; names that
    differ from the test dataset's ``thing_classes`` (same count) are logged as a warning.

    Raises :class:`ConversionError` naming both counts.
    """
    num_classes = cfg.MODEL.SOLO.NUM_CLASSES
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    if len(names) != num_classes:
        raise ConversionError(
            f"{origin} was trained on {len(names)} classes ({shown}) but the config has "
            f"MODEL.SOLO.NUM_CLASSES {num_classes}: use a config for {len(names)} classes "
            f"(e.g. MODEL.SOLO.NUM_CLASSES {len(names)} after the arguments, with a matching "
            f"DATASETS.TEST)."
        )
    logger.info("%s: %d classes: %s.", origin, len(names), shown)
    if not cfg.DATASETS.TEST:
        return
    dataset = cfg.DATASETS.TEST[0]
    ours = MetadataCatalog.get(dataset).get("thing_classes", None)
    if ours is not None and len(ours) == len(names):
        differ = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(names, ours)) if a != b]
        if differ:
            logger.warning(
                "%s: %d class names differ from %s's thing_classes (label: checkpoint vs "
                "dataset): %s. Labels are converted by index; check the order.",
                origin,
                len(differ),
                dataset,
                "; ".join(differ[:5]) + ("; ..." if len(differ) > 5 else ""),
            )
