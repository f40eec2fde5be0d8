"""Deterministic synthetic inputs for the benchmark: a smooth random image and a training batch
of random rectangles and ellipses with tight boxes."""

import numpy as np
from typing import List, Sequence
import torch
import torch.nn.functional as F

from detectron2.structures import BitMasks, Instances

__all__ = ["make_image", "train_inputs"]


def make_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A deterministic uint8 (3, H, W) image: smooth random blobs plus noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, max(height // 32, 2), max(width // 32, 2)), generator=gen)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = image * 200 + torch.rand((3, height, width), generator=gen) * 55
    return image.clamp(0, 255).to(torch.uint8)


def train_inputs(
    input_size: Sequence[int], batch_size: int, instances: int, seed: int, num_classes: int
) -> List[dict]:
    """``batch_size`` images of ``input_size`` (H, W) with ``instances`` random rectangles and
    ellipses each (sides 8 .. half the image), classes uniform in [0, num_classes)."""
    h, w = input_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    batch = []
    for i in range(batch_size):
        size = rng.integers(8, [max(9, h // 2), max(9, w // 2)], size=(instances, 2))  # (h, w)
        y0, x0 = rng.integers(0, h - size[:, 0] + 1), rng.integers(0, w - size[:, 1] + 1)
        cy, cx = y0 + (size[:, 0] - 1) / 2, x0 + (size[:, 1] - 1) / 2
        rect = rng.random(instances) < 0.5
        dy = np.abs(yy - cy[:, None, None]) / (size[:, 0, None, None] / 2)  # (n, h, w)
        dx = np.abs(xx - cx[:, None, None]) / (size[:, 1, None, None] / 2)
        inside = np.where(rect[:, None, None], np.maximum(dy, dx) <= 1, dy**2 + dx**2 <= 1)
        inst = Instances((h, w))
        inst.gt_masks = BitMasks(torch.from_numpy(inside))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.from_numpy(rng.integers(0, num_classes, instances)).long()
        batch.append({"image": make_image(h, w, seed + i), "instances": inst})
    return batch
