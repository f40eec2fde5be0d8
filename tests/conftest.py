"""Shared helpers for the SOLO tests: configs, tiny models and random instance sets."""

import importlib.util
import json
import logging
import numpy as np
import os
import sys
from contextlib import contextmanager
from pathlib import Path
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

from solo import add_solo_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"

# Keep the suite predictable on 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def solo_cfg(config_file=None, opts=()):
    """A frozen-free SOLO config on CPU with no weights to load."""
    cfg = get_cfg()
    add_solo_config(cfg)
    if config_file is not None:
        cfg.merge_from_file(str(CONFIG_DIR / config_file))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(list(opts))
    return cfg


def tiny_cfg(head_name="SOLOHead", opts=()):
    """A small but complete SOLO model (ResNet-18, 64-channel FPN and heads, small grids)."""
    base = "SOLOv2/Base-SOLOv2.yaml" if head_name == "SOLOv2Head" else "SOLO/Base-SOLO.yaml"
    cfg = solo_cfg(base)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.SOLO.HEAD_NAME = head_name
    cfg.MODEL.SOLO.NUM_CLASSES = 5
    cfg.MODEL.SOLO.NUM_GRIDS = [12, 10, 8, 6, 4]
    cfg.MODEL.SOLO.SCALE_RANGES = [[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]]
    cfg.MODEL.SOLO.NUM_STACKED_CONVS = 2
    cfg.MODEL.SOLO.HEAD_CHANNELS = 64
    cfg.MODEL.SOLO.MASK_KERNEL_CHANNELS = 32
    cfg.MODEL.SOLO.MASK_FEATURE_CHANNELS = 32
    cfg.merge_from_list(list(opts))
    return cfg


def random_instances(height, width, num_instances, num_classes, rng, min_size=6):
    """Random ellipses and rectangles with their masks, boxes (XYXY, x2 = x + w) and classes."""
    inst = Instances((height, width))
    masks = np.zeros((num_instances, height, width), dtype=bool)
    yy, xx = np.mgrid[:height, :width]
    for i in range(num_instances):
        w = rng.integers(min_size, max(min_size + 1, width // 2))
        h = rng.integers(min_size, max(min_size + 1, height // 2))
        x0 = rng.integers(0, width - w + 1)
        y0 = rng.integers(0, height - h + 1)
        if rng.random() < 0.5:
            masks[i, y0 : y0 + h, x0 : x0 + w] = True
        else:
            cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
            masks[i] = ((xx - cx) / (w / 2)) ** 2 + ((yy - cy) / (h / 2)) ** 2 <= 1
    boxes = np.zeros((num_instances, 4), dtype=np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    inst.gt_boxes = Boxes(torch.from_numpy(boxes))
    inst.gt_classes = torch.from_numpy(rng.integers(0, num_classes, num_instances)).long()
    inst.gt_masks = BitMasks(torch.from_numpy(masks))
    return inst


def random_batch(sizes_and_counts, num_classes, seed=0):
    """Detectron2 training inputs: uint8 images with random instances."""
    rng = np.random.default_rng(seed)
    batch = []
    for (h, w), n in sizes_and_counts:
        image = torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8))
        batch.append({"image": image, "instances": random_instances(h, w, n, num_classes, rng)})
    return batch


def load_script(relative_path, module_name):
    """Import a repository script (train_net.py, tools/*.py, demo/*.py) as a module, with its
    directory first on ``sys.path`` while it loads, as ``python <script>`` has it (demo.py
    imports predictor.py next to it)."""
    path = REPO_ROOT / relative_path
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


# train_net.py on the shapes config, narrowed so that a few iterations take seconds.
SHAPES_CONFIG = "configs/Shapes/SOLOv2_R18.yaml"
SMALL_SHAPES_OPTS = [
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.SOLO.HEAD_CHANNELS", "64",
    "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "TEST.EVAL_PERIOD", "0",
    # Training runs skip the final evaluation unless a test sets DATASETS.TEST.
    "DATASETS.TEST", "()",
]  # fmt: skip


def load_train_net():
    return load_script("train_net.py", "train_net")


def run_main(train_net, argv):
    """``train_net.main`` with a parsed command line (``--config-file ... KEY VALUE ...``)."""
    from detectron2.engine import default_argument_parser

    return train_net.main(default_argument_parser().parse_args(argv))


def read_metrics(output_dir):
    """The records of ``OUTPUT_DIR/metrics.json``."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextmanager
def shapes_cache(root):
    """Point the built-in shapes datasets (SOLO_SHAPES_ROOT) at ``root`` for a while."""
    old = os.environ.get("SOLO_SHAPES_ROOT")
    os.environ["SOLO_SHAPES_ROOT"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("SOLO_SHAPES_ROOT")
        else:
            os.environ["SOLO_SHAPES_ROOT"] = old


@contextmanager
def capture_warnings(caplog, name):
    """caplog for a logger that Detectron2's setup_logger (run by earlier train_net tests in the
    same session) stopped from propagating to the root logger."""
    logger = logging.getLogger(name)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=name):
            yield
    finally:
        logger.removeHandler(caplog.handler)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
