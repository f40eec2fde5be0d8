"""SOLOv2 head: per-cell dynamic 1x1 mask kernels applied to unified stride-4 mask features."""

from typing import List, NamedTuple, Sequence
import torch
from torch import nn

from detectron2.config import configurable

from ..layers import coord_features, per_image_dynamic_conv, resize
from .base import HeadOutputs, SOLOHeadBase, build_tower, init_prediction, split_features
from .mask_feature_branch import MaskFeatureBranch
from .registry import SOLO_HEAD_REGISTRY


class SOLOv2MaskOutputs(NamedTuple):
    """``SOLOv2Head``'s ``HeadOutputs.mask_outputs``.

    Attributes:
        kernels: per level, (N, E, S, S) dynamic 1x1 kernel weights of each grid cell.
        features: (N, E, H/4, W/4) unified mask features; a cell's mask logits are its kernel
            applied to them.
    """

    kernels: List[torch.Tensor]
    features: torch.Tensor


@SOLO_HEAD_REGISTRY.register()
class SOLOv2Head(SOLOHeadBase):
    """Kernel branch: CoordConv input resized to S x S, conv tower, 3x3 conv to E kernel weights
    per cell. Category branch as SOLO with ``cate_down_pos = 0``. Masks of selected cells are
    ``sigmoid(kernel . F)`` with F the unified mask features, computed as matrix products.
    """

    keep_overlapping_masks = True

    @configurable
    def __init__(
        self,
        *,
        mask_in_features_count: int,
        mask_kernel_channels: int = 256,
        mask_feature_channels: int = 128,
        mask_feature_dcn: str = "none",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_tower = build_tower(self.in_channels + 2, self.channels, self.dcn_types)
        self.kernel_pred = nn.Conv2d(self.channels, mask_kernel_channels, 3, padding=1)
        init_prediction(self.kernel_pred)
        self.mask_features = MaskFeatureBranch(
            self.in_channels,
            mask_feature_channels,
            mask_kernel_channels,
            mask_in_features_count,
            dcn=mask_feature_dcn,
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        args = super().from_config(cfg, input_shape)
        args.update(
            mask_in_features_count=len(cfg.MODEL.SOLO.MASK_FEATURE_IN_FEATURES),
            mask_kernel_channels=cfg.MODEL.SOLO.MASK_KERNEL_CHANNELS,
            mask_feature_channels=cfg.MODEL.SOLO.MASK_FEATURE_CHANNELS,
            mask_feature_dcn=cfg.MODEL.SOLO.MASK_FEATURE_DCN,
        )
        return args

    def mask_strides(self, level_strides: Sequence[int]) -> List[int]:
        return [4] * len(level_strides)

    def forward(self, features) -> HeadOutputs[SOLOv2MaskOutputs]:
        """``features``: the head's levels P2-P6; P2-P5 also feed the mask feature branch."""
        mask_features = self.mask_features(features[: len(self.mask_features.levels)])
        # The dynamic convolutions read (E, H*W) rows: make channels-last maps NCHW once here.
        mask_features = mask_features.contiguous()
        cate_logits, kernels = [], []
        for level, x in enumerate(split_features(features)):
            grid = (self.num_grids[level],) * 2
            kernel_feat = resize(torch.cat([x, coord_features(x)], dim=1), grid)
            kernels.append(self.kernel_pred(self.kernel_tower(kernel_feat)))
            cate_logits.append(self.category_logits(x, level))
        return HeadOutputs(cate_logits, SOLOv2MaskOutputs(kernels, mask_features))

    def training_mask_probs(self, outputs, level, images, cells):
        kernels, mask_features = outputs.mask_outputs
        selected = kernels[level].flatten(2)[images, :, cells]  # (K, E)
        return per_image_dynamic_conv(selected, images, mask_features).sigmoid()

    def inference_mask_probs(self, outputs, image, levels, cells, size, out=None):
        kernels, mask_features = outputs.mask_outputs
        offsets = [0]
        for k in kernels:
            offsets.append(offsets[-1] + k.shape[-2] * k.shape[-1])
        all_kernels = torch.cat([k[image].flatten(1) for k in kernels], dim=1).t()  # (sum S^2, E)
        # Rows gathered into a contiguous (K, E) operand: the product is faster than on a
        # transposed view.
        selected = all_kernels[cells + cells.new_tensor(offsets[:-1])[levels]]
        features = mask_features[image]
        same_size = tuple(features.shape[-2:]) == tuple(size)
        # Straight into the caller's buffer (the post-processor keeps one on CPU) when that is
        # the same computation: mm(out=) skips autocast, and a resize makes a new tensor anyway.
        if (
            out is not None
            and same_size
            and out.dtype == features.dtype == selected.dtype
            and not torch.is_autocast_enabled(features.device.type)
        ):
            torch.mm(selected, features.flatten(1), out=out.view(len(selected), -1))
            return out.sigmoid_()
        logits = selected @ features.flatten(1)
        probs = logits.view(-1, *features.shape[-2:]).sigmoid_()  # in place: a fresh product
        if not same_size:
            probs = resize(probs[None], size)[0]
        return probs

    def fixed_size_mask_probs(self, outputs, size):
        # Already fixed-size: one gather of the dynamic kernels and one matrix product.
        return lambda levels, cells: self.inference_mask_probs(outputs, 0, levels, cells, size)
