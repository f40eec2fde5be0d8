"""Decoupled SOLO heads: the mask of cell (i, j) is sigmoid(X_j) * sigmoid(Y_i).

Instead of S^2 mask channels, a level predicts S "column" maps X and S "row" maps Y, which
cuts the output channels from S^2 to 2S.
"""

import numpy as np
from typing import List, Sequence, Tuple
import torch
from torch import nn

from detectron2.config import configurable

from ..layers import coord_features, resize
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
from .solo_head import upsample2x

#: Decoupled heads' ``HeadOutputs.mask_outputs``: per level, the (X, Y) logits, each
#: (N, S, 2h, 2w): column maps X_j and row maps Y_i; the mask of cell (i, j) is
#: sigmoid(X_j) * sigmoid(Y_i).
DecoupledMaskOutputs = List[Tuple[torch.Tensor, torch.Tensor]]


class _DecoupledBase(SOLOHeadBase):
    """Shared by both decoupled heads: X/Y predictions and their combination."""

    def _init_xy_preds(self):
        self.mask_preds_x = nn.ModuleList(
            nn.Conv2d(self.channels, s, 3, padding=1) for s in self.num_grids
        )
        self.mask_preds_y = nn.ModuleList(
            nn.Conv2d(self.channels, s, 3, padding=1) for s in self.num_grids
        )
        for conv in [*self.mask_preds_x, *self.mask_preds_y]:
            init_prediction(conv, self.prior_prob)

    def mask_strides(self, level_strides: Sequence[int]) -> List[int]:
        return [s // 2 for s in level_strides]

    def forward(self, features) -> HeadOutputs[DecoupledMaskOutputs]:
        features = split_features(features)
        cate_logits, xy_logits = [], []
        for level, x in enumerate(features):
            feat_x, feat_y = self.xy_features(x)
            xy_logits.append((self.mask_preds_x[level](feat_x), self.mask_preds_y[level](feat_y)))
            cate_logits.append(self.category_logits(x, level))
        return HeadOutputs(cate_logits, xy_logits)

    def training_mask_probs(self, outputs, level, images, cells):
        logits_x, logits_y = outputs.mask_outputs[level]
        rows, cols = cells // self.num_grids[level], cells % self.num_grids[level]
        return logits_x[images, cols].sigmoid() * logits_y[images, rows].sigmoid()

    def inference_mask_probs(self, outputs, image, levels, cells, size, out=None):
        xy_logits = outputs.mask_outputs

        def compute(level, positions):
            logits_x, logits_y = xy_logits[level]
            grid = self.num_grids[level]
            rows, cols = cells[positions] // grid, cells[positions] % grid
            # Official order: sigmoid, upsample to stride 4, then multiply.
            probs_x = resize(logits_x[image, cols].sigmoid()[None], size)[0]
            probs_y = resize(logits_y[image, rows].sigmoid()[None], size)[0]
            return probs_x * probs_y

        return gather_per_level(levels, len(xy_logits), compute, size, xy_logits[0][0], out)

    def fixed_size_mask_probs(self, outputs, size):
        # All S column maps X and S row maps Y of every level, at stride 4 (2 * sum S maps,
        # fewer than the candidates), then one gather and product per candidate: the official
        # sigmoid -> upsample -> multiply order.
        xs = torch.cat([resize(x[:1].sigmoid(), size)[0] for x, _ in outputs.mask_outputs])
        ys = torch.cat([resize(y[:1].sigmoid(), size)[0] for _, y in outputs.mask_outputs])
        offsets = np.cumsum([0] + self.num_grids[:-1]).tolist()
        offsets = torch.tensor(offsets, device=xs.device)
        grid = torch.tensor(self.num_grids, device=xs.device)

        def probs(levels, cells):
            rows, cols = cells // grid[levels], cells % grid[levels]
            return xs[offsets[levels] + cols] * ys[offsets[levels] + rows]

        return probs

    def prediction_layers(self):
        masks = [*self.mask_preds_x, *self.mask_preds_y]
        return PredictionLayers(category=self.cate_pred, masks=masks, mask_factors=2)

    def mask_layer_logits(self, outputs, image=0):
        # The X convs' outputs, then the Y convs', as prediction_layers() lists them.
        return [xy[axis][image : image + 1] for axis in (0, 1) for xy in outputs.mask_outputs]


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOHead(_DecoupledBase):
    """Two mask towers: X sees the x coordinate only, Y the y coordinate only."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mask_tower_x = build_tower(self.in_channels + 1, self.channels, self.dcn_types)
        self.mask_tower_y = build_tower(self.in_channels + 1, self.channels, self.dcn_types)
        self._init_xy_preds()

    def xy_features(self, x):
        """Upsampled (x2) features of the X and Y predictions."""
        coords = coord_features(x)
        feat_x = self.mask_tower_x(torch.cat([x, coords[:, :1]], dim=1))
        feat_y = self.mask_tower_y(torch.cat([x, coords[:, 1:]], dim=1))
        return upsample2x(feat_x), upsample2x(feat_y)


@SOLO_HEAD_REGISTRY.register()
class DecoupledSOLOLightHead(_DecoupledBase):
    """One shared mask tower (with both coordinates) feeding the X and Y predictions."""

    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.mask_tower = build_tower(self.in_channels + 2, self.channels, self.dcn_types)
        self._init_xy_preds()

    def xy_features(self, x):
        feat = upsample2x(self.mask_tower(torch.cat([x, coord_features(x)], dim=1)))
        return feat, feat
