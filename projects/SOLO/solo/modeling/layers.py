"""Building blocks shared by the SOLO heads: conv units, CoordConv inputs, deformable convs.

Detectron2's compiled deformable convolution (``detectron2._C``) is not always available (and its
CPU path has no backward), so deformable layers here run on ``torchvision.ops.deform_conv2d``,
which works on CPU and GPU.
"""

from typing import Optional
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from detectron2.layers import Conv2d

DCN_TYPES = ("none", "DCN", "DCNv2")


class DeformConv(nn.Module):
    """Deformable convolution with detectron2's parameter layout (``weight``, ``bias``, ``norm``).

    ``forward(x, offset, mask=None)``: ``offset`` holds (dy, dx) pairs per kernel tap (and
    deformable group, inferred from its channels), ``mask`` (modulated, DCNv2) the per-tap sigmoid
    weights. Drop-in for detectron2's ``DeformConv`` and ``ModulatedDeformConv`` inside
    ``DeformBottleneckBlock``, with the same constructor.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deformable_groups=1,
        bias=False,
        norm: Optional[nn.Module] = None,
        activation=None,
    ):
        super().__init__()
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *_pair(kernel_size))
        )
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.norm = norm
        self.activation = activation
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x, offset, mask=None):
        x = deform_conv2d(
            x,
            offset.to(x.dtype),
            self.weight.to(x.dtype),
            None if self.bias is None else self.bias.to(x.dtype),
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=None if mask is None else mask.to(x.dtype),
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class DeformConvPack(nn.Module):
    """A deformable conv that predicts its own offsets (and, for DCNv2, modulation masks).

    The offsets come from a zero-initialised plain conv (``conv_offset``), so at initialisation
    the layer is exactly a regular convolution. Parameter names follow mmdet's
    ``DeformConvPack`` / ``ModulatedDeformConvPack`` (``weight``, ``conv_offset.*``).
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1, modulated=False):
        super().__init__()
        self.padding = _pair(padding)
        self.num_taps = kernel_size * kernel_size
        self.modulated = modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.conv_offset = nn.Conv2d(
            in_channels, (3 if modulated else 2) * self.num_taps, kernel_size, padding=padding
        )
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        out = self.conv_offset(x)
        offset, mask = out[:, : 2 * self.num_taps], None
        if self.modulated:
            mask = out[:, 2 * self.num_taps :].sigmoid()
        return deform_conv2d(x, offset, self.weight.to(x.dtype), padding=self.padding, mask=mask)


class ConvGNReLU(nn.Sequential):
    """conv (no bias) + GroupNorm(32) + ReLU: the unit of every SOLO tower.

    ``dcn`` selects a plain conv ("none") or a deformable one ("DCN", "DCNv2").
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, dcn="none", num_groups=32):
        if dcn not in DCN_TYPES:
            raise ValueError(
                f"Deformable conv type {dcn!r} (MODEL.SOLO.TOWER_DCN or MASK_FEATURE_DCN) is not "
                f"one of {DCN_TYPES}."
            )
        padding = kernel_size // 2
        if dcn == "none":
            conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        else:
            conv = DeformConvPack(
                in_channels, out_channels, kernel_size, padding, modulated=dcn == "DCNv2"
            )
        super().__init__()
        self.conv = conv
        self.norm = nn.GroupNorm(num_groups, out_channels)
        self.relu = nn.ReLU(inplace=True)
        nn.init.normal_(conv.weight, std=0.01)


def coord_features(x: torch.Tensor) -> torch.Tensor:
    """(N, 2, H, W) normalised x and y coordinates in [-1, 1] (CoordConv), x first, in x's dtype.

    The values of the official ``torch.linspace(-1, 1, size)`` (to within 1e-7), built from
    ``torch.arange`` because linspace's int ``steps`` freezes H and W in the dynamo exporter.
    """
    n, _, h, w = x.shape

    def axis(size):
        # 2i / (size - 1) - 1, computed in float32. A single position divides 0 by 0: nan_to_num
        # makes it -1 as in linspace, without a branch on the size, which works for ints, the
        # symbolic sizes of torch.export and the tensor sizes of torch.jit.trace alike.
        steps = torch.arange(size, device=x.device, dtype=torch.float32)
        return ((steps * 2 / (size - 1)).nan_to_num(0.0) - 1).to(x.dtype)

    grid_y, grid_x = torch.meshgrid(axis(h), axis(w), indexing="ij")
    return torch.stack([grid_x, grid_y]).expand(n, 2, h, w)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize without corner alignment (the official heads' F.interpolate default)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def per_image_dynamic_conv(
    kernels: torch.Tensor, images: torch.Tensor, features: torch.Tensor, bias=None
) -> torch.Tensor:
    """1x1 convolutions of ``features[images[k]]`` (N, C, H, W) with ``kernels[k]`` (K, C).

    Returns (K, H, W) logits from one batched product: the kernels are grouped per image into a
    zero-padded (N, Kmax, C) tensor, so there is no loop over images or instances.
    """
    n, c, h, w = features.shape
    counts = torch.bincount(images, minlength=n)
    order = torch.argsort(images, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[images[order]]
    padded = kernels.new_zeros((n, int(counts.max()) if n else 0, c))
    padded[images, rank] = kernels.to(padded.dtype)
    logits = torch.bmm(padded, features.flatten(2).to(padded.dtype))[images, rank]
    if bias is not None:
        logits = logits + bias[:, None]
    return logits.view(-1, h, w)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


__all__ = [
    "Conv2d",
    "ConvGNReLU",
    "DeformConv",
    "DeformConvPack",
    "coord_features",
    "per_image_dynamic_conv",
    "resize",
]
