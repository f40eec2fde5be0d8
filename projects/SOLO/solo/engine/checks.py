"""Checks that stop a training or evaluation run before it does something other than asked.

Detectron2 accepts several settings that only fail at the end of a schedule, fail with a bare
assertion, or are silently ignored. Each function here raises :class:`RunConfigError` naming the
key, its value and what to write instead, before the model is built:

* :func:`check_run_config`: dataset names (``DATASETS.TEST = ("name")`` is a string, whose letters
  Detectron2 would take as names), registration (with the multi-process cause), class counts,
  schedule, batch and input-size keys, ``MODEL.WEIGHTS`` and ``MODEL.DEVICE``.
"""

import difflib
import logging
import os
import re
from typing import Tuple
import torch
import torchvision

from detectron2.data import DatasetCatalog

from ..data import check_num_classes

__all__ = [
    "RunConfigError",
    "check_run_config",
    "check_weights_file",
]

logger = logging.getLogger(__name__)

SAMPLING_STYLES = ("choice", "range")


class RunConfigError(ValueError):
    """A config that cannot give the run the user asked for; the message names key and fix."""


# ----------------------------------------------------------------------------------------------
# Before building the model
# ----------------------------------------------------------------------------------------------


def dataset_names(cfg, key: str) -> Tuple[str, ...]:
    """``cfg.DATASETS.<key>`` as a tuple of names; a string or non-string entries are refused."""
    value = cfg.DATASETS[key]
    if isinstance(value, str):
        raise RunConfigError(
            f"DATASETS.{key} is the string {value!r}, not a tuple of dataset names: in Python, "
            f"('{value}') without a comma is a string. Write cfg.DATASETS.{key} = ('{value}',) "
            f"(on the command line: DATASETS.{key} \"('{value}',)\")."
        )
    bad = [name for name in value if not isinstance(name, str) or not name]
    if bad:
        raise RunConfigError(f"DATASETS.{key}={tuple(value)!r}: {bad} are not dataset names.")
    return tuple(value)


def _not_registered(key: str, name: str, world_size: int) -> RunConfigError:
    registered = sorted(DatasetCatalog.list())
    close = difflib.get_close_matches(name, registered, n=3)
    parts = [f"DATASETS.{key} names dataset '{name}', which is not registered."]
    if close:
        parts.append(f"Did you mean {close}?")
    if world_size > 1:
        parts.append(
            "This is one of the processes of a multi-process run (--num-gpus/--num-machines): "
            "they are started afresh and never run the launching script's "
            '`if __name__ == "__main__":` block, so a dataset registered there is unknown '
            "here. Register it at module level, or at the start of the function given to "
            "detectron2.engine.launch (e.g. in main())."
        )
    else:
        parts.append(
            "For a COCO-format JSON and image folder, name them on the command line (or in the "
            f"YAML file): DATASETS.COCO_FORMAT \"[['{name}', 'path/to/{name}.json', "
            "'path/to/images']]\". From Python, register it (e.g. register_coco_instances) "
            "before calling main() or building the trainer; or fix the name."
        )
    parts.append(f"Registered datasets: {registered}")
    return RunConfigError(" ".join(parts))


def _check_datasets(cfg, train: bool, world_size: int) -> None:
    keys = ("TRAIN", "TEST") if train else ("TEST",)
    names = {key: dataset_names(cfg, key) for key in keys}
    if train and not names["TRAIN"]:
        raise RunConfigError("DATASETS.TRAIN is empty: name at least one registered dataset.")
    if not train and not names["TEST"]:
        raise RunConfigError("DATASETS.TEST is empty: --eval-only has nothing to evaluate.")
    registered = set(DatasetCatalog.list())
    for key, key_names in names.items():
        for name in key_names:
            if name not in registered:
                raise _not_registered(key, name, world_size)
        check_num_classes(cfg.MODEL.SOLO.NUM_CLASSES, key_names, "MODEL.SOLO.NUM_CLASSES")
    if cfg.MODEL.LOAD_PROPOSALS:
        for key in keys:
            files = cfg.DATASETS[f"PROPOSAL_FILES_{key}"]
            if len(files) != len(names[key]):
                raise RunConfigError(
                    f"MODEL.LOAD_PROPOSALS: DATASETS.PROPOSAL_FILES_{key} has {len(files)} "
                    f"files for the {len(names[key])} datasets of DATASETS.{key}; give one each."
                )


def _check_schedule(cfg, world_size: int) -> None:
    solver = cfg.SOLVER
    if solver.MAX_ITER <= 0:
        raise RunConfigError(f"SOLVER.MAX_ITER={solver.MAX_ITER}: train at least 1 iteration.")
    if solver.CHECKPOINT_PERIOD <= 0:
        raise RunConfigError(
            f"SOLVER.CHECKPOINT_PERIOD={solver.CHECKPOINT_PERIOD} must be positive; use a value "
            "above SOLVER.MAX_ITER to save only the final model."
        )
    if cfg.TEST.EVAL_PERIOD < 0:
        raise RunConfigError(f"TEST.EVAL_PERIOD={cfg.TEST.EVAL_PERIOD}: 0 (off) or positive.")
    steps = list(solver.STEPS)
    if solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and steps != sorted(set(steps)):
        raise RunConfigError(
            f"SOLVER.STEPS={tuple(steps)} must be strictly increasing iterations, e.g. "
            f"{tuple(sorted(set(steps)))}."
        )
    # Detectron2 scales the batch to the world size first (REFERENCE_WORLD_SIZE), then splits it.
    reference = solver.REFERENCE_WORLD_SIZE
    batch = solver.IMS_PER_BATCH
    if reference and world_size != reference:
        if batch % reference:
            raise RunConfigError(
                f"SOLVER.IMS_PER_BATCH={batch} is not divisible by "
                f"SOLVER.REFERENCE_WORLD_SIZE={reference}."
            )
        batch = batch // reference * world_size
    if batch % world_size:
        raise RunConfigError(
            f"SOLVER.IMS_PER_BATCH={batch} cannot be split over {world_size} processes: use a "
            f"multiple of {world_size}."
        )


def _check_input(cfg) -> None:
    style = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    if style not in SAMPLING_STYLES:
        raise RunConfigError(
            f"INPUT.MIN_SIZE_TRAIN_SAMPLING={style!r} is not one of {SAMPLING_STYLES}."
        )
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    if isinstance(sizes, int):
        sizes = (sizes,)
    if style == "range" and len(sizes) != 2:
        raise RunConfigError(
            f"INPUT.MIN_SIZE_TRAIN_SAMPLING 'range' needs INPUT.MIN_SIZE_TRAIN (min, max), got "
            f"{tuple(sizes)}; use 'choice' to pick among these sizes."
        )


def _check_device(cfg) -> None:
    device = torch.device(cfg.MODEL.DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunConfigError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but CUDA is not available here: use MODEL.DEVICE "
            "cpu (or leave it out of the command line: it then falls back to cpu)."
        )


def check_weights_file(cfg) -> None:
    """A local ``MODEL.WEIGHTS`` must exist (Detectron2 asserts it after building everything)."""
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and os.path.isdir(weights):
        found = sorted(f for f in os.listdir(weights) if f.endswith((".pth", ".pkl", ".onnx")))
        raise RunConfigError(
            f"MODEL.WEIGHTS '{weights}' is a directory: give a file in it"
            + (f", e.g. {os.path.join(weights, found[-1])}" if found else " (it holds none)")
            + "."
        )
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise RunConfigError(f"MODEL.WEIGHTS '{weights}' does not exist.{_how_to_make(weights)}")


def _how_to_make(weights: str) -> str:
    """How to produce a missing ImageNet backbone file that the COCO configs name
    (``checkpoints/torchvision-R-50.pkl``, ``checkpoints/X-101-64x4d.pkl``)."""
    match = re.fullmatch(r"(?:.*/)?(?:torchvision-R-(\d+)|X-101-64x4d)\.pkl", weights)
    if not match:
        return ""
    model = f"resnet{match.group(1)}" if match.group(1) else "resnext101_64x4d"
    try:
        url = torchvision.models.get_model_weights(model).IMAGENET1K_V1.url
    except (ValueError, AttributeError):  # a depth torchvision does not publish
        return ""
    return (
        f" It is torchvision's ImageNet {model}, converted: download {url} and run "
        f"python tools/convert_checkpoint.py --source torchvision {url.rsplit('/', 1)[1]} "
        f"{weights}"
    )


def check_run_config(cfg, *, train: bool, world_size: int = 1, uses_weights: bool = True) -> None:
    """Refuse, before any model or data is built, a config that cannot run as asked.

    Args:
        cfg: a SOLO config.
        train: checks for training (``DATASETS.TRAIN``, schedule, input sampling) on top of
            those for evaluation (``DATASETS.TEST``, device, weights).
        world_size: processes of the run (``comm.get_world_size()``), for the batch split and
            the multi-process registration hint.
        uses_weights: whether ``MODEL.WEIGHTS`` will be read (not when resuming from
            ``OUTPUT_DIR``'s last checkpoint).

    Raises:
        RunConfigError: naming the key, its value and the fix.
        ValueError: ``MODEL.SOLO.NUM_CLASSES`` differs from a dataset's class count.
    """
    _check_datasets(cfg, train, world_size)
    if train:
        _check_schedule(cfg, world_size)
        _check_input(cfg)
    _check_device(cfg)
    if uses_weights:
        check_weights_file(cfg)
