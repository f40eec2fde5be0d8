"""Bottom-up networks besides ResNet, with Detectron2's FPN, for YAML configs.

* :class:`MobileNetV3` -- torchvision's MobileNetV3-Large feature extractor as a Detectron2
  ``Backbone`` (outputs ``s1``-``s4`` at strides 4-32, RegNet's names); its parameter names are
  torchvision's (``features.N.*``), so torchvision's ImageNet weights load after
  ``tools/convert_checkpoint.py --source torchvision``.
* RegNetX-4GF / RegNetY-4GF: Detectron2's ``RegNet`` with the parameters of Detectron2's
  ``mask_rcnn_regnet{x,y}_4gf_dds_fpn_1x`` configs (pycls's DDS baselines), whose ImageNet
  checkpoints (``RegNet{X,Y}-4.0GF_dds_8gpu.pyth``) load as they are.

Each ``build_solo_*_fpn_backbone`` reads ``MODEL.BOTTOM_UP.NORM``/``OUT_FEATURES``,
``MODEL.BACKBONE.FREEZE_AT`` and ``MODEL.FPN.*`` and adds P6 by max-pooling, as SOLO's ResNet FPN.
Any other Detectron2 backbone (ViT + SimpleFeaturePyramid, Swin, MViTv2) plugs into SOLO through
the LazyConfig files under ``configs/common/models/``.
"""

from typing import Dict
import torch
from torch import nn
from torchvision.models import mobilenet_v3_large

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.regnet import RegNet, ResBottleneckBlock, SimpleStem

#: Index of the last ``features`` module of each MobileNetV3-Large stage, and its stride: the
#: stem (stride 2), then the last block before each resolution change.
MOBILENET_V3_STAGES = {"stem": (0, 2), "s1": (3, 4), "s2": (6, 8), "s3": (12, 16), "s4": (16, 32)}

#: RegNet parameters of Detectron2's COCO configs (pycls DDS baselines), by name.
REGNETS = {
    "RegNetX-4GF": dict(depth=23, w_a=38.65, w_0=96, w_m=2.43, group_width=40),
    "RegNetY-4GF": dict(depth=22, w_a=31.41, w_0=96, w_m=2.24, group_width=64, se_ratio=0.25),
}

NORMS = ("FrozenBN", "BN", "SyncBN")


def convert_batchnorm(module: nn.Module, norm: str, key: str) -> nn.Module:
    """torchvision's ``BatchNorm2d`` layers as ``norm`` (one of :data:`NORMS`); ``key`` names
    the config key in the error for any other value."""
    if norm == "FrozenBN":
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    if norm == "SyncBN":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if norm == "BN":
        return module
    raise ValueError(
        f"{key}={norm!r} is not supported for this network (its BatchNorm layers have 16-960 "
        f"channels, not multiples of GroupNorm's 32 groups); use one of {NORMS}."
    )


class MobileNetV3(Backbone):
    """torchvision's MobileNetV3-Large ``features`` (no classifier) with Detectron2's outputs.

    Args:
        out_features: names among ``stem``, ``s1``-``s4`` (strides 2, 4, 8, 16, 32; channels
            16, 24, 40, 112, 960).
        norm: "FrozenBN" (fine-tuning ImageNet weights at a few images per GPU, Detectron2's
            default), "BN" or "SyncBN".
        freeze_at: Detectron2's meaning: 1 freezes the stem, 2 the stem and ``s1``, ...
    Input (N, 3, H, W) float, ImageNet-normalised RGB for torchvision's weights.
    """

    def __init__(self, out_features=("s1", "s2", "s3", "s4"), norm="FrozenBN", freeze_at=0):
        super().__init__()
        unknown = [f for f in out_features if f not in MOBILENET_V3_STAGES]
        if unknown or not out_features:
            raise ValueError(
                f"MobileNetV3 outputs {unknown or out_features} are not among "
                f"{list(MOBILENET_V3_STAGES)} (MODEL.BOTTOM_UP.OUT_FEATURES)."
            )
        self.features = mobilenet_v3_large(weights=None).features
        self._out_features = list(out_features)
        last = max(MOBILENET_V3_STAGES[f][0] for f in out_features)
        del self.features[last + 1 :]  # layers no output needs
        self._taps = {MOBILENET_V3_STAGES[f][0]: f for f in out_features}
        channels = {i: _out_channels(m) for i, m in enumerate(self.features)}
        self._out_feature_strides = {f: MOBILENET_V3_STAGES[f][1] for f in out_features}
        self._out_feature_channels = {f: channels[MOBILENET_V3_STAGES[f][0]] for f in out_features}
        self.features = convert_batchnorm(self.features, norm, "MODEL.BOTTOM_UP.NORM")
        stage_ends = [index for index, _ in MOBILENET_V3_STAGES.values()]
        for index, module in enumerate(self.features):
            stage = sum(index > end for end in stage_ends) + 1  # stem: 1, s1: 2, ...
            if stage <= freeze_at:
                module.requires_grad_(False)
                FrozenBatchNorm2d.convert_frozen_batchnorm(module)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self._taps:
                outputs[self._taps[index]] = x
        return outputs


def _out_channels(module: nn.Module) -> int:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _fpn(cfg, bottom_up: Backbone) -> FPN:
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_solo_mobilenetv3_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """MobileNetV3-Large (:class:`MobileNetV3`) + FPN with P6 by max-pooling."""
    if input_shape.channels != 3:
        raise ValueError(f"MobileNetV3 takes 3-channel images, got {input_shape.channels}.")
    b = cfg.MODEL.BOTTOM_UP
    bottom_up = MobileNetV3(b.OUT_FEATURES, b.NORM, cfg.MODEL.BACKBONE.FREEZE_AT)
    return _fpn(cfg, bottom_up)


def build_regnet(name: str, cfg, input_shape: ShapeSpec) -> RegNet:
    """Detectron2's ``RegNet`` ``name`` (a key of :data:`REGNETS`) as Detectron2's COCO configs
    build it: simple stem 32 wide, bottleneck blocks, ``MODEL.BOTTOM_UP`` norm and outputs."""
    b = cfg.MODEL.BOTTOM_UP
    if b.NORM not in NORMS + ("GN",):
        raise ValueError(f"MODEL.BOTTOM_UP.NORM={b.NORM!r} is not one of {NORMS + ('GN',)}.")
    return RegNet(
        stem_class=SimpleStem,
        stem_width=32,
        block_class=ResBottleneckBlock,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        norm=b.NORM,
        out_features=list(b.OUT_FEATURES),
        **REGNETS[name],
    )


@BACKBONE_REGISTRY.register()
def build_solo_regnetx_4gf_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """RegNetX-4GF + FPN with P6 by max-pooling."""
    return _fpn(cfg, build_regnet("RegNetX-4GF", cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_solo_regnety_4gf_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """RegNetY-4GF (squeeze-and-excitation) + FPN with P6 by max-pooling."""
    return _fpn(cfg, build_regnet("RegNetY-4GF", cfg, input_shape))
