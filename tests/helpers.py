"""Helpers shared by the model tests: seeded models, training steps, forced candidates, and
crafted head outputs for the post-processing tests."""

import functools
import numpy as np
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from solo.heads import DecoupledSOLOHead, HeadOutputs, SOLOHead, SOLOv2Head

HEADS = ["SOLOHead", "DecoupledSOLOHead", "DecoupledSOLOLightHead", "SOLOv2Head"]


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def train_step(model, batch):
    model.train()
    with EventStorage():
        losses = model(batch)
        total = sum(losses.values())
        model.zero_grad()
        total.backward()
    return losses


def force_candidates(model, logit=4.0):
    """Random weights give no confident cell; a high category bias makes every cell a
    candidate, and mask biases make masks cover part of the image, so that inference exercises
    the full post-processing."""
    head = model.head
    with torch.no_grad():
        head.cate_pred.bias.fill_(logit)
        mask_preds = [getattr(head, n, []) for n in ("mask_preds", "mask_preds_x", "mask_preds_y")]
        for conv in [c for preds in mask_preds for c in preds]:
            conv.bias.fill_(1.0 if hasattr(head, "mask_preds") else 2.0)


# Crafted head outputs (three levels, one or two images) for the post-processing tests.
NUM_CLASSES = 3
GRIDS = [12, 8, 6]
LEVEL_STRIDES = [8, 16, 32]  # SOLO mask strides 4, 8, 16
PADDED = (64, 96)
STRIDE4 = (16, 24)
IMAGE_SIZES = [(60, 90), (64, 72)]
OUTPUT_SIZES = [(60, 90), (32, 36)]  # first at image size, second downscaled
EMBED = 8  # SOLOv2 kernel / mask feature channels

HEAD_ARGS = dict(in_channels=32, num_classes=NUM_CLASSES, num_grids=GRIDS, channels=32, num_convs=1)


def make_head(kind):
    if kind == "solo":
        # The crafted SOLO outputs are the S^2 mask logits themselves: identity 1x1 mask convs
        # make the head's per-cell kernels read them back channel by channel.
        head = SOLOHead(**HEAD_ARGS)
        head.mask_preds = torch.nn.ModuleList(identity_conv(s * s) for s in GRIDS)
        return head
    if kind == "decoupled":
        return DecoupledSOLOHead(**HEAD_ARGS)
    return SOLOv2Head(
        **HEAD_ARGS, mask_in_features_count=2, mask_kernel_channels=32, mask_feature_channels=32
    )


def mask_probs_of(kind, outputs):
    """The post-processor's mask-probability callable: the head's, bound to ``outputs``."""
    return functools.partial(make_head(kind).inference_mask_probs, outputs)


def identity_conv(channels):
    conv = torch.nn.Conv2d(channels, channels, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        conv.bias.zero_()
    return conv


def blob_logits(rng, n, size, centres, axis=None):
    """(n, h, w) logits of blobs around a few shared centres (so that masks overlap):
    ``amplitude * (1 - d^2 / r^2)``, d measured along ``axis`` only if given (decoupled X/Y)."""
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w
    out = np.empty((n, h, w), dtype=np.float32)
    for k in range(n):
        cy, cx = centres[rng.integers(0, len(centres))] + rng.normal(0, 0.03, 2)
        r = rng.uniform(0.05, 0.35)
        d2 = {None: (yy - cy) ** 2 + (xx - cx) ** 2, "x": (xx - cx) ** 2, "y": (yy - cy) ** 2}[axis]
        out[k] = rng.uniform(2, 6) * (1 - d2 / r**2)
    return np.maximum(out, -8)


def random_outputs(kind, seed, batch=2, cate_mean=-3.0):
    """Head outputs whose masks are blobs around 4 object centres per image."""
    rng = np.random.default_rng(seed)
    cate = [
        torch.from_numpy(rng.normal(cate_mean, 1.5, (batch, NUM_CLASSES, s, s)).astype(np.float32))
        for s in GRIDS
    ]
    centres = [rng.uniform(0.15, 0.85, (4, 2)) for _ in range(batch)]
    if kind == "solo":
        masks = []
        for s, stride in zip(GRIDS, (4, 8, 16)):
            size = (PADDED[0] // stride, PADDED[1] // stride)
            masks.append(
                torch.from_numpy(np.stack([blob_logits(rng, s * s, size, c) for c in centres]))
            )
        return HeadOutputs(cate, masks)
    if kind == "decoupled":
        xy = []
        for s, stride in zip(GRIDS, (4, 8, 16)):
            size = (PADDED[0] // stride, PADDED[1] // stride)
            x = np.stack([blob_logits(rng, s, size, c, "x") for c in centres])
            y = np.stack([blob_logits(rng, s, size, c, "y") for c in centres])
            xy.append((torch.from_numpy(x), torch.from_numpy(y)))
        return HeadOutputs(cate, xy)
    # SOLOv2: mask feature channel e is a blob, each cell's kernel mostly picks one channel.
    features = torch.from_numpy(np.stack([blob_logits(rng, EMBED, STRIDE4, c) for c in centres]))
    kernels = []
    for s in GRIDS:
        k = rng.normal(0, 0.05, (batch, EMBED, s, s))
        pick = rng.integers(0, EMBED, (batch, s, s))
        np.put_along_axis(k, pick[:, None], rng.uniform(0.8, 1.2, (batch, 1, s, s)), axis=1)
        kernels.append(torch.from_numpy(k.astype(np.float32)))
    return HeadOutputs(cate, (kernels, features))
