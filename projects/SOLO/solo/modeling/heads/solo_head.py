"""Vanilla SOLO head: one S^2-channel mask map per level, channel k = mask of grid cell k.

Only a few of the S^2 channels are ever used (the positive cells in training, the candidates at
inference), and channel k of a 1x1 conv is the dot product of the features with row k of its
weight. So the head returns the (upsampled) mask features and applies the rows it needs: the same
logits as the official full S^2-channel conv, without computing (1600 + 1296 + ...) maps.
"""

import numpy as np
from typing import List, Sequence
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable

from ..layers import coord_features, per_image_dynamic_conv, resize
from .base import (
    HeadOutputs,
    PredictionLayers,
    SOLOHeadBase,
    build_tower,
    gather_per_level,
    init_prediction,
    split_features,
)
from .registry import SOLO_HEAD_REGISTRY

#: ``SOLOHead``'s ``HeadOutputs.mask_outputs``: per level, the x2-upsampled mask tower features
#: (N, channels, 2h, 2w), which the level's S^2-channel 1x1 conv turns into mask logits.
SOLOMaskOutputs = List[torch.Tensor]


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


@SOLO_HEAD_REGISTRY.register()
class SOLOHead(SOLOHeadBase):
    """Mask branch: CoordConv + tower, x2 upsampling, then a 1x1 conv to S^2 channels per level."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mask_tower = build_tower(self.in_channels + 2, self.channels, self.dcn_types)
        self.mask_preds = nn.ModuleList(nn.Conv2d(self.channels, s * s, 1) for s in self.num_grids)
        for conv in self.mask_preds:
            init_prediction(conv, self.prior_prob)

    def mask_strides(self, level_strides: Sequence[int]) -> List[int]:
        return [s // 2 for s in level_strides]

    def forward(self, features) -> HeadOutputs[SOLOMaskOutputs]:
        """``mask_outputs``: per level, the x2-upsampled mask tower features (N, C, 2h, 2w)."""
        features = split_features(features)
        cate_logits, mask_features = [], []
        for level, x in enumerate(features):
            mask_feat = self.mask_tower(torch.cat([x, coord_features(x)], dim=1))
            mask_features.append(upsample2x(mask_feat))
            cate_logits.append(self.category_logits(x, level))
        return HeadOutputs(cate_logits, mask_features)

    def mask_logits(self, features, level, images, cells):
        """Channels ``cells`` of the level's S^2-channel mask conv on ``features[images]``."""
        conv = self.mask_preds[level]
        weight = conv.weight.flatten(1)[cells]  # (K, C)
        return per_image_dynamic_conv(weight, images, features, conv.bias[cells])

    def training_mask_probs(self, outputs, level, images, cells):
        return self.mask_logits(outputs.mask_outputs[level], level, images, cells).sigmoid()

    def inference_mask_probs(self, outputs, image, levels, cells, size, out=None):
        num_levels = len(outputs.mask_outputs)

        def compute(level, positions):
            features = outputs.mask_outputs[level][image : image + 1]
            images = torch.zeros_like(positions)
            probs = self.mask_logits(features, level, images, cells[positions]).sigmoid()
            return resize(probs[None], size)[0]

        return gather_per_level(levels, num_levels, compute, size, outputs.mask_outputs[0], out)

    def fixed_size_mask_probs(self, outputs, size):
        # Channel k of level l's 1x1 conv is row k of its weight: gather the K candidates' rows
        # from all levels, apply them to every level's features and keep each candidate's own
        # level (the levels' features differ in size, so a per-level gather would be
        # data-dependent).
        weight = torch.cat([conv.weight.flatten(1) for conv in self.mask_preds])
        bias = torch.cat([conv.bias for conv in self.mask_preds])
        sizes = [s * s for s in self.num_grids]
        offsets = torch.tensor(np.cumsum([0] + sizes[:-1]).tolist(), device=weight.device)

        def probs(levels, cells):
            rows = offsets[levels] + cells
            w, b = weight[rows], bias[rows]
            out = None
            for level, features in enumerate(outputs.mask_outputs):
                h, wd = features.shape[-2:]
                logits = (w @ features[0].flatten(1) + b[:, None]).view(-1, h, wd)
                p = resize(logits.sigmoid()[None], size)[0]
                out = p if out is None else torch.where((levels == level)[:, None, None], p, out)
            return out

        return probs

    def prediction_layers(self):
        return PredictionLayers(category=self.cate_pred, masks=list(self.mask_preds))

    def mask_layer_logits(self, outputs, image=0):
        # The head applies only the channels it needs; here all S^2 of each level are computed.
        return [
            conv(features[image : image + 1])
            for conv, features in zip(self.mask_preds, outputs.mask_outputs)
        ]
