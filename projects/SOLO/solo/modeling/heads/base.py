"""What every SOLO instance head shares: level features, the category branch, the interface.

A head turns the five FPN levels into
* ``cate_logits``: one (N, C, S, S) tensor per level, and
* mask predictions in a head-specific form (``mask_outputs``),
and answers questions about the latter, so that targets, losses, post-processing, export and
calibration are written once for the whole family and nothing outside ``heads/`` asks which head
it has:
* :meth:`training_mask_probs`: mask probabilities of given (image, cell) pairs at the level's
  mask-target stride (``mask_strides``);
* :meth:`inference_mask_probs`: mask probabilities of given candidates of one image at stride 4;
* :meth:`fixed_size_mask_probs`: the same with shapes that do not depend on the data (the
  exported graph, :meth:`solo.modeling.postprocess.SOLOPostProcessor.fixed_size`);
* :meth:`prediction_layers` / :meth:`mask_layer_logits`: the convs whose outputs are category
  and mask logits (forced candidates in tests, the benchmark's calibration).
"""

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import Callable, Generic, List, Optional, Sequence, Tuple, TypeVar
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec

from ..layers import ConvGNReLU, resize

#: A head's mask predictions; each head documents its own type (``SOLOMaskOutputs``,
#: ``DecoupledMaskOutputs``, ``SOLOv2MaskOutputs``).
MaskOutputs = TypeVar("MaskOutputs")

#: ``(levels, cells) -> (K, h, w)`` float mask probabilities at stride 4 of K candidates of one
#: image given by their level index and flat cell ``i * S + j`` (int64 (K,) tensors).
CandidateMaskProbs = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class HeadOutputs(Generic[MaskOutputs]):
    """What a head's ``forward`` returns.

    Attributes:
        cate_logits: per level, (N, C, S, S) category logits.
        mask_outputs: the head's mask predictions, of the type its ``forward`` documents.
    """

    cate_logits: List[torch.Tensor]
    mask_outputs: MaskOutputs


@dataclass
class PredictionLayers:
    """The convs of a head whose outputs are logits.

    Attributes:
        category: the (C-channel) category conv, shared by all levels.
        masks: convs each of whose output channels is a map of mask logits (one per cell, or
            per row / column of the grid); empty when masks come from dynamic kernels (SOLOv2).
        mask_factors: how many of those maps' sigmoids multiply into one mask (2 for
            decoupled heads' X_j * Y_i, else 1).
    """

    category: nn.Conv2d
    masks: List[nn.Conv2d]
    mask_factors: int = 1


def split_features(features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The official level split: P2 halved (stride 8), P6 brought to P5's size (stride 32)."""
    features = list(features)
    features[0] = F.interpolate(features[0], scale_factor=0.5, mode="bilinear", align_corners=False)
    features[-1] = resize(features[-1], features[-2].shape[-2:])
    return features


def split_strides(strides: Sequence[int]) -> List[int]:
    """Strides of the levels after :func:`split_features`, from the FPN strides (4, 8, ..., 64):
    the first level's doubled, the last level's equal to the one before it."""
    return [2 * strides[0], *strides[1:-1], strides[-2]]


def tower_dcn_types(num_convs: int, dcn: str, layers: str) -> List[str]:
    """Deformable conv type of each tower conv: everywhere, or only on the last one."""
    if layers not in ("all", "last"):
        raise ValueError(f"MODEL.SOLO.TOWER_DCN_LAYERS must be 'all' or 'last', got {layers!r}.")
    if layers == "all":
        return [dcn] * num_convs
    return ["none"] * (num_convs - 1) + [dcn]


def build_tower(in_channels: int, channels: int, dcn_types: Sequence[str]) -> nn.Sequential:
    return nn.Sequential(
        *[
            ConvGNReLU(in_channels if i == 0 else channels, channels, 3, dcn=dcn)
            for i, dcn in enumerate(dcn_types)
        ]
    )


def init_prediction(conv: nn.Conv2d, prior_prob: float = None):
    """Normal(0, 0.01) weights; bias 0, or set so that sigmoid(bias) = prior_prob."""
    nn.init.normal_(conv.weight, std=0.01)
    bias = 0.0 if prior_prob is None else -math.log((1 - prior_prob) / prior_prob)
    nn.init.constant_(conv.bias, bias)


class SOLOHeadBase(nn.Module, metaclass=ABCMeta):
    """Category branch and level handling common to SOLO, Decoupled SOLO and SOLOv2."""

    #: SOLOv2 keeps every (instance, cell) pair of overlapping centre regions for the mask loss;
    #: SOLO v1 lets the later instance overwrite the cell.
    keep_overlapping_masks = False

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        num_grids: Sequence[int],
        channels: int = 256,
        num_convs: int = 7,
        cate_down_pos: int = 0,
        tower_dcn: str = "none",
        tower_dcn_layers: str = "all",
        prior_prob: float = 0.01,
    ):
        super().__init__()
        if not 0 <= cate_down_pos < num_convs:
            raise ValueError(
                f"MODEL.SOLO.CATE_DOWN_POS={cate_down_pos} must index one of the "
                f"{num_convs} tower convs (MODEL.SOLO.NUM_STACKED_CONVS)."
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_grids = list(num_grids)
        self.channels = channels
        self.num_convs = num_convs
        self.cate_down_pos = cate_down_pos
        self.prior_prob = prior_prob
        self.dcn_types = tower_dcn_types(num_convs, tower_dcn, tower_dcn_layers)
        self.cate_tower = build_tower(in_channels, channels, self.dcn_types)
        self.cate_pred = nn.Conv2d(channels, num_classes, 3, padding=1)
        init_prediction(self.cate_pred, prior_prob)

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(
                f"MODEL.SOLO.IN_FEATURES must all have the same channels, got {sorted(channels)}."
            )
        return {
            "in_channels": channels.pop(),
            "num_classes": cfg.MODEL.SOLO.NUM_CLASSES,
            "num_grids": cfg.MODEL.SOLO.NUM_GRIDS,
            "channels": cfg.MODEL.SOLO.HEAD_CHANNELS,
            "num_convs": cfg.MODEL.SOLO.NUM_STACKED_CONVS,
            "cate_down_pos": cfg.MODEL.SOLO.CATE_DOWN_POS,
            "tower_dcn": cfg.MODEL.SOLO.TOWER_DCN,
            "tower_dcn_layers": cfg.MODEL.SOLO.TOWER_DCN_LAYERS,
            "prior_prob": cfg.MODEL.SOLO.PRIOR_PROB,
        }

    def category_logits(self, feature: torch.Tensor, level: int) -> torch.Tensor:
        """(N, C, S, S) logits; features are resized to S x S before conv ``cate_down_pos``."""
        x = feature
        for i, conv in enumerate(self.cate_tower):
            if i == self.cate_down_pos:
                x = resize(x, (self.num_grids[level],) * 2)
            x = conv(x)
        return self.cate_pred(x)

    @abstractmethod
    def mask_strides(self, level_strides: Sequence[int]) -> List[int]:
        """Stride of each level's mask predictions (and targets) w.r.t. the input image."""

    @abstractmethod
    def forward(self, features: Sequence[torch.Tensor]) -> HeadOutputs:
        """Category logits and mask outputs of the five FPN levels (finest first)."""

    @abstractmethod
    def training_mask_probs(
        self, outputs: HeadOutputs, level: int, images: torch.Tensor, cells: torch.Tensor
    ) -> torch.Tensor:
        """(K, h, w) mask probabilities of cells ``cells`` (flat i * S + j) of images ``images``
        at the level's mask stride."""

    @abstractmethod
    def inference_mask_probs(
        self,
        outputs: HeadOutputs,
        image: int,
        levels: torch.Tensor,
        cells: torch.Tensor,
        size,
        out: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """(K, *size) mask probabilities of candidates (level, cell) of one image at stride 4.

        ``out``: an optional (K, *size) buffer to write them into (the post-processor's kept CPU
        buffer); it is used, and returned, when it has the dtype the head computes in (outside
        autocast, for SOLOv2), otherwise a new tensor is returned. Same values either way."""

    @abstractmethod
    def fixed_size_mask_probs(
        self, outputs: HeadOutputs, size: Tuple[int, int]
    ) -> CandidateMaskProbs:
        """:meth:`inference_mask_probs` of image 0 as a callable ``(levels, cells) -> (K, *size)``
        whose operations have shapes fixed by K and ``size`` only (no ``nonzero``, no per-level
        grouping of the candidates): what an exported graph can hold. Same probabilities."""

    def prediction_layers(self) -> PredictionLayers:
        """The convs predicting category and mask logits (see :class:`PredictionLayers`)."""
        return PredictionLayers(category=self.cate_pred, masks=[])

    def mask_layer_logits(self, outputs: HeadOutputs, image: int = 0) -> List[torch.Tensor]:
        """Per conv of ``prediction_layers().masks``, its (1, channels, h, w) output on image
        ``image`` of ``outputs`` (empty when there are no such convs)."""
        return []


def gather_per_level(
    levels: torch.Tensor,
    num_levels: int,
    compute,
    size,
    like: torch.Tensor,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(K, *size) rows ``compute(level, positions)`` for the candidates of each level, in the
    dtype ``compute`` returns (under autocast a resize may return float32 from bfloat16
    features): written into ``out`` when it has that dtype, else into a new tensor (``like``'s
    device; ``like``'s dtype when there are no candidates)."""
    result, filled = out, False
    for level in range(num_levels):
        positions = (levels == level).nonzero().flatten()
        if len(positions):
            values = compute(level, positions)
            if result is None or result.dtype != values.dtype:
                fresh = values.new_empty((len(levels), *size))
                result = fresh.copy_(result) if filled else fresh
            result[positions] = values
            filled = True
    return like.new_empty((len(levels), *size)) if result is None else result
