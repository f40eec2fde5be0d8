"""ResNet + FPN (P2-P6, P6 by max-pooling) with deformable convs that run without detectron2._C.

Detectron2's ``build_resnet_fpn_backbone`` already builds the official SOLO neck (mmdetection's FPN
with ``num_outs=5`` and no extra convs = detectron2's FPN with ``LastLevelMaxPool``). The only
change: deformable stages (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) use torchvision's
``deform_conv2d`` (:class:`solo.layers.DeformConv`), so DCN models train and run on CPU and GPU
alike, with detectron2's parameter names. Convolutions followed by a ``FrozenBatchNorm2d`` fold
that fixed affine map into their weights whenever no gradient is needed (inference, frozen
stages), which saves one pass over every activation map; parameters and checkpoints are unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock

from .layers import DeformConv


class FoldedFrozenBNConv2d(Conv2d):
    """Detectron2's ``Conv2d`` that, when its norm is a ``FrozenBatchNorm2d`` and nothing needs a
    gradient, applies conv and norm as one convolution with scaled weights and a bias.

    The folded weights are recomputed on every call (cheap next to the convolution), so they
    can never be stale after loading a checkpoint or a training step.
    """

    def forward(self, x):
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad or not isinstance(self.norm, FrozenBatchNorm2d):
            return super().forward(x)
        norm = self.norm
        weight, bias = fuse_conv_bn_weights(
            self.weight, self.bias, norm.running_mean, norm.running_var, norm.eps,
            norm.weight, norm.bias,
        )  # fmt: skip
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return self.activation(x) if self.activation is not None else x


def make_stages_deformable(resnet: nn.Module, cfg) -> nn.Module:
    """Turn, in place, the bottleneck blocks of the stages chosen by
    ``MODEL.RESNETS.DEFORM_ON_PER_STAGE`` into Detectron2's ``DeformBottleneckBlock``: same
    parameter names, ``conv2`` a :class:`solo.layers.DeformConv` (torchvision's
    ``deform_conv2d``; Detectron2's needs ``detectron2._C``) with the 3x3 conv's weights and norm,
    and a zero-initialised ``conv2_offset`` (Detectron2's initialisation). Returns ``resnet``.
    """
    modulated = cfg.MODEL.RESNETS.DEFORM_MODULATED
    num_groups = cfg.MODEL.RESNETS.DEFORM_NUM_GROUPS
    for index, deformable in enumerate(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        stage = getattr(resnet, f"res{index + 2}", None)
        for block in stage if deformable and stage is not None else ():
            conv = block.conv2
            offset = Conv2d(
                conv.in_channels, (27 if modulated else 18) * num_groups, kernel_size=3,
                stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
            )  # fmt: skip
            nn.init.zeros_(offset.weight)
            nn.init.zeros_(offset.bias)
            offset.requires_grad_(conv.weight.requires_grad)  # frozen stages stay frozen
            deform = DeformConv(
                conv.in_channels, conv.out_channels, 3, conv.stride, conv.padding,
                conv.dilation, conv.groups, num_groups, norm=conv.norm,
            )  # fmt: skip
            deform.weight = conv.weight
            block.conv2_offset, block.conv2 = offset.to(conv.weight.device), deform
            block.deform_modulated = modulated
            block.__class__ = DeformBottleneckBlock  # its forward, for the modules set above
    return resnet


def fold_frozen_batchnorm_convs(module: nn.Module) -> nn.Module:
    """Replace, in place, every Detectron2 ``Conv2d`` followed by a ``FrozenBatchNorm2d`` with a
    :class:`FoldedFrozenBNConv2d` holding the same parameters and norm. Returns ``module``."""
    for name, child in module.named_children():
        if type(child) is Conv2d and isinstance(child.norm, FrozenBatchNorm2d):
            folded = FoldedFrozenBNConv2d(
                child.in_channels, child.out_channels, child.kernel_size, child.stride,
                child.padding, child.dilation, child.groups, bias=child.bias is not None,
                padding_mode=child.padding_mode, norm=child.norm, activation=child.activation,
            )  # fmt: skip
            folded.weight, folded.bias = child.weight, child.bias
            setattr(module, name, folded)
        else:
            fold_frozen_batchnorm_convs(child)
    return module


@BACKBONE_REGISTRY.register()
def build_solo_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ResNet-FPN backbone built without deformable stages, then
    :func:`make_stages_deformable` and :func:`fold_frozen_batchnorm_convs` on the ResNet."""
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    backbone = build_resnet_fpn_backbone(plain, input_shape)
    fold_frozen_batchnorm_convs(make_stages_deformable(backbone.bottom_up, cfg))
    return backbone
