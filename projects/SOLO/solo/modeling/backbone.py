"""ResNet + FPN (P2-P6, P6 by max-pooling) with deformable convs that run without detectron2._C.

Detectron2's ``build_resnet_fpn_backbone`` already builds the official SOLO neck (mmdetection's FPN
with ``num_outs=5`` and no extra convs = detectron2's FPN with ``LastLevelMaxPool``). The only
change: deformable stages (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``) use torchvision's
``deform_conv2d`` (:class:`solo.layers.DeformConv`), so DCN models train and run on CPU and GPU
alike, with detectron2's parameter names. Convolutions followed by a ``FrozenBatchNorm2d`` fold
that fixed affine map into their weights whenever no gradient is needed (inference, frozen
stages), which saves one pass over every activation map; parameters and checkpoints are unchanged.

``MODEL.RESNETS.NORM: "FrozenBNTrainableAffine"`` is the official ResNet's norm (mmdetection's BN
with ``norm_eval=True``, ``requires_grad=True``): statistics fixed, gamma/beta trained (and
weight-decayed) in the stages that ``MODEL.BACKBONE.FREEZE_AT`` leaves trainable.
"""

from typing import Sequence
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock, ResNet

from .layers import DeformConv

# MODEL.RESNETS.NORM value of the official ResNets: see FrozenStatsBatchNorm2d.
TRAINABLE_AFFINE_NORM = "FrozenBNTrainableAffine"


class FrozenStatsBatchNorm2d(FrozenBatchNorm2d):
    """Detectron2's ``FrozenBatchNorm2d`` whose ``weight`` (gamma) and ``bias`` (beta) are
    trainable ``nn.Parameter`` s; ``running_mean``/``running_var`` stay fixed buffers, in
    training and inference alike.

    This is mmdetection's ``BN`` with ``norm_eval=True`` and ``requires_grad=True``, the norm of
    the official SOLO ResNets. Same state-dict keys as ``FrozenBatchNorm2d``, so checkpoints
    load into either. The optimizer (``solo.solver``) treats the parameters as norm parameters
    (``SOLVER.WEIGHT_DECAY_NORM``).
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps)
        weight, bias = self.weight, self.bias
        del self.weight, self.bias  # buffers in FrozenBatchNorm2d
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    @classmethod
    def from_frozen(cls, frozen: FrozenBatchNorm2d) -> "FrozenStatsBatchNorm2d":
        """A copy of ``frozen`` (values, eps, device, dtype) with trainable affine."""
        norm = cls(frozen.num_features, frozen.eps).to(frozen.running_mean)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name).copy_(getattr(frozen, name))
        return norm

    def __repr__(self):
        return f"FrozenStatsBatchNorm2d(num_features={self.num_features}, eps={self.eps})"


def make_frozen_norm_affine_trainable(module: nn.Module) -> nn.Module:
    """Give, in place, every ``FrozenBatchNorm2d`` that follows a trainable convolution (the
    stages ``MODEL.BACKBONE.FREEZE_AT`` leaves trainable) trainable affine parameters
    (:class:`FrozenStatsBatchNorm2d`); frozen stages keep ``FrozenBatchNorm2d``. Returns
    ``module``."""
    for child in module.modules():
        norm = getattr(child, "norm", None)
        weight = getattr(child, "weight", None)
        if type(norm) is FrozenBatchNorm2d and weight is not None and weight.requires_grad:
            child.norm = FrozenStatsBatchNorm2d.from_frozen(norm)
    return module


class FoldedFrozenBNConv2d(Conv2d):
    """Detectron2's ``Conv2d`` that, when its norm is a ``FrozenBatchNorm2d`` and nothing needs a
    gradient, applies conv and norm as one convolution with scaled weights and a bias.

    The folded weights are recomputed on every call (cheap next to the convolution), so they
    can never be stale after loading a checkpoint or a training step.
    """

    def forward(self, x):
        norm = self.norm
        if not isinstance(norm, FrozenBatchNorm2d):
            return super().forward(x)
        trainable = self.weight.requires_grad or norm.weight.requires_grad  # FrozenStatsBatchNorm2d
        if torch.is_grad_enabled() and (x.requires_grad or trainable):
            return super().forward(x)
        weight, bias = fuse_conv_bn_weights(
            self.weight, self.bias, norm.running_mean, norm.running_var, norm.eps,
            norm.weight, norm.bias,
        )  # fmt: skip
        x = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        return self.activation(x) if self.activation is not None else x


def make_stages_deformable(
    resnet: nn.Module,
    deform_on_per_stage: Sequence[bool],
    modulated: bool = False,
    num_groups: int = 1,
) -> nn.Module:
    """Turn, in place, the bottleneck blocks of the stages chosen by ``deform_on_per_stage``
    (``MODEL.RESNETS.DEFORM_ON_PER_STAGE``, res2-res5) into Detectron2's
    ``DeformBottleneckBlock``: same parameter names, ``conv2`` a :class:`solo.layers.DeformConv`
    (torchvision's ``deform_conv2d``; Detectron2's needs ``detectron2._C``) with the 3x3 conv's
    weights and norm, and a zero-initialised ``conv2_offset`` (Detectron2's initialisation).
    ``modulated``/``num_groups``: ``MODEL.RESNETS.DEFORM_MODULATED``/``DEFORM_NUM_GROUPS``.
    Returns ``resnet``.
    """
    for index, deformable in enumerate(deform_on_per_stage):
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


def solo_resnet(
    resnet: ResNet,
    *,
    deform_on_per_stage: Sequence[bool] = (False, False, False, False),
    deform_modulated: bool = False,
    deform_num_groups: int = 1,
    trainable_affine_norm: bool = False,
) -> ResNet:
    """SOLO's changes to a Detectron2 ``ResNet`` built with ``FrozenBN`` or another norm and no
    deformable stages, in place: :func:`make_stages_deformable`,
    :func:`make_frozen_norm_affine_trainable` (if ``trainable_affine_norm``: the official
    ResNet's norm) and :func:`fold_frozen_batchnorm_convs`. Returns ``resnet``.
    The LazyConfig files call it on ``L(ResNet)``; YAML configs through
    :func:`build_solo_resnet_fpn_backbone`."""
    make_stages_deformable(resnet, deform_on_per_stage, deform_modulated, deform_num_groups)
    if trainable_affine_norm:
        make_frozen_norm_affine_trainable(resnet)
    return fold_frozen_batchnorm_convs(resnet)


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
    """Detectron2's ResNet-FPN backbone built without deformable stages (and with ``FrozenBN``
    for ``MODEL.RESNETS.NORM: "FrozenBNTrainableAffine"``), then :func:`solo_resnet` with the
    ``MODEL.RESNETS`` deformable-stage keys on the ResNet."""
    r = cfg.MODEL.RESNETS
    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False] * 4
    trainable_affine = r.NORM == TRAINABLE_AFFINE_NORM
    if trainable_affine:
        plain.MODEL.RESNETS.NORM = "FrozenBN"
    backbone = build_resnet_fpn_backbone(plain, input_shape)
    solo_resnet(
        backbone.bottom_up,
        deform_on_per_stage=r.DEFORM_ON_PER_STAGE,
        deform_modulated=r.DEFORM_MODULATED,
        deform_num_groups=r.DEFORM_NUM_GROUPS,
        trainable_affine_norm=trainable_affine,
    )
    return backbone
