"""ResNet + FPN (P2-P6, P6 by max-pooling) with deformable convs that run without detectron2._C.

Detectron2's ``build_resnet_fpn_backbone`` already builds the official SOLO neck (mmdetection's FPN
with ``num_outs=5`` and no extra convs = detectron2's FPN with ``LastLevelMaxPool``). The only
change: deformable stages (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) use torchvision's
``deform_conv2d`` (:class:`solo.layers.DeformConv`), so DCN models train and run on CPU and GPU
alike, with detectron2's parameter names. Convolutions followed by a ``FrozenBatchNorm2d`` fold
that fixed affine map into their weights whenever no gradient is needed (inference, frozen
stages), which saves one pass over every activation map; parameters and checkpoints are unchanged.
"""
from contextlib import contextmanager
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import resnet
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

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


@contextmanager
def solo_resnet_layers():
    """Make detectron2's ResNet build :class:`DeformConv` deformable layers (no detectron2._C)
    and :class:`FoldedFrozenBNConv2d` convolutions."""
    with mock.patch.object(resnet, "DeformConv", DeformConv), mock.patch.object(
        resnet, "ModulatedDeformConv", DeformConv
    ), mock.patch.object(resnet, "Conv2d", FoldedFrozenBNConv2d):
        yield


@BACKBONE_REGISTRY.register()
def build_solo_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    with solo_resnet_layers():
        return build_resnet_fpn_backbone(cfg, input_shape)
