"""ResNet + FPN (P2-P6, P6 by max-pooling) with deformable convs that run without detectron2._C.

Detectron2's ``build_resnet_fpn_backbone`` already builds the official SOLO neck (mmdetection's FPN
with ``num_outs=5`` and no extra convs = detectron2's FPN with ``LastLevelMaxPool``). The only
change: deformable stages (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) use torchvision's
``deform_conv2d`` (:class:`solo.layers.DeformConv`), so DCN models train and run on CPU and GPU
alike, with detectron2's parameter names.
"""
from contextlib import contextmanager
from unittest import mock

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import resnet
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

from .layers import DeformConv


@contextmanager
def torchvision_deform_convs():
    """Make detectron2's ``DeformBottleneckBlock`` build :class:`DeformConv` layers."""
    with mock.patch.object(resnet, "DeformConv", DeformConv), mock.patch.object(
        resnet, "ModulatedDeformConv", DeformConv
    ):
        yield


@BACKBONE_REGISTRY.register()
def build_solo_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    with torchvision_deform_convs():
        return build_resnet_fpn_backbone(cfg, input_shape)
