"""Layers of the SOLO heads: deformable convs, CoordConv, the level split, SOLOv2 dynamic convs."""

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import DeformBottleneckBlock

from helpers import solo_cfg, tiny_cfg
from solo.modeling.backbone import FoldedFrozenBNConv2d
from solo.modeling.heads import SOLOv2Head
from solo.modeling.heads.base import split_features
from solo.modeling.layers import ConvGNReLU, DeformConv, DeformConvPack, coord_features


@pytest.mark.parametrize("modulated", [False, True])
def test_deformable_conv_with_zero_offsets_equals_a_plain_conv(modulated):
    torch.manual_seed(0)
    layer = DeformConvPack(8, 16, 3, padding=1, modulated=modulated)
    x = torch.randn(2, 8, 11, 13)
    expected = F.conv2d(x, layer.weight, padding=1)
    if modulated:
        # Zero-initialised offset conv gives masks sigmoid(0) = 0.5 on every tap.
        expected = expected * 0.5
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


def test_deformable_conv_with_integer_offsets_samples_shifted_pixels():
    """An offset of (dy, dx) = (0, 1) on every tap reads the input one pixel to the right."""
    torch.manual_seed(0)
    conv = DeformConv(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 9, 9)
    offset = torch.zeros(1, 18, 9, 9)
    offset[:, 1::2] = 1.0
    shifted = torch.zeros_like(x)
    shifted[..., :-1] = x[..., 1:]
    # Column 0 differs by construction: its left taps read x[..., 0] instead of zero padding.
    torch.testing.assert_close(
        conv(x, offset)[..., 1:],
        F.conv2d(shifted, conv.weight, padding=1)[..., 1:],
        rtol=1e-4,
        atol=1e-5,
    )


def test_deformable_layers_get_gradients_for_weights_and_offsets():
    torch.manual_seed(0)
    layer = ConvGNReLU(32, 32, 3, dcn="DCNv2")
    layer(torch.randn(2, 32, 8, 8)).square().mean().backward()
    assert layer.conv.weight.grad.abs().sum() > 0
    assert layer.conv.conv_offset.weight.grad.abs().sum() > 0


def test_unknown_dcn_type_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="DCNv2"):
        ConvGNReLU(32, 32, dcn="dcn3")


@pytest.mark.parametrize("modulated", [False, True])
def test_backbone_deformable_blocks_run_on_cpu_without_detectron2_ops(modulated):
    cfg = solo_cfg(
        "SOLO/Base-SOLO.yaml",
        [
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]",
            "MODEL.RESNETS.DEFORM_MODULATED", str(modulated),
        ],
    )  # fmt: skip
    model = build_model(cfg)
    blocks = [m for m in model.backbone.modules() if isinstance(m, DeformBottleneckBlock)]
    assert len(blocks) == 4 + 6 + 3  # res3, res4, res5 of ResNet-50
    assert all(isinstance(b.conv2, DeformConv) for b in blocks)
    # detectron2's parameter names are kept, so its checkpoints load unchanged.
    keys = model.state_dict().keys()
    assert "backbone.bottom_up.res3.0.conv2.weight" in keys
    assert "backbone.bottom_up.res3.0.conv2_offset.weight" in keys
    out = model.backbone(torch.randn(1, 3, 64, 64))
    out["p2"].mean().backward()
    assert blocks[0].conv2_offset.weight.grad is not None


def test_frozen_batchnorm_folding_matches_conv_then_norm_and_keeps_gradients():
    """FrozenBN convs fold the norm into their weights when no gradient is needed; the
    result equals the unfolded conv + norm, and training still gets gradients."""
    torch.manual_seed(0)
    opts = ["MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2"]
    cfg = tiny_cfg("SOLOv2Head", opts)
    backbone = build_model(cfg).backbone
    convs = [m for m in backbone.modules() if isinstance(m, FoldedFrozenBNConv2d)]
    assert convs and all(isinstance(c.norm, FrozenBatchNorm2d) for c in convs if c.norm)
    for conv in convs:  # non-trivial statistics, so that folding has something to get wrong
        if isinstance(conv.norm, FrozenBatchNorm2d):
            n = conv.norm.weight.numel()
            conv.norm.weight.uniform_(0.5, 1.5)
            conv.norm.bias.normal_()
            conv.norm.running_mean.normal_()
            conv.norm.running_var.uniform_(0.5, 2.0)
            assert conv.norm.running_var.numel() == n
    backbone.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        folded = backbone(x)
    unfolded = backbone(x.clone().requires_grad_())  # needs a gradient: conv, then the norm
    for name in folded:
        torch.testing.assert_close(folded[name], unfolded[name], rtol=1e-4, atol=1e-4)
    # The stem is frozen (FREEZE_AT=2) and sees the image: it folds even in training, while
    # trainable convs run conv + norm.
    norm_calls = []
    for conv in (backbone.bottom_up.stem.conv1, backbone.bottom_up.res3[0].conv1):
        conv.norm.register_forward_hook(lambda m, i, o, name=conv: norm_calls.append(name))
    backbone.train()
    backbone(x)["p2"].sum().backward()
    assert norm_calls == [backbone.bottom_up.res3[0].conv1]
    res3 = backbone.bottom_up.res3[0].conv1
    assert res3.weight.grad is not None and res3.weight.grad.abs().sum() > 0


def test_coord_features_are_normalised_x_then_y():
    coords = coord_features(torch.zeros(2, 5, 3, 4))
    assert coords.shape == (2, 2, 3, 4)
    torch.testing.assert_close(coords[0, 0, 0], torch.linspace(-1, 1, 4))
    torch.testing.assert_close(coords[1, 1, :, 2], torch.linspace(-1, 1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_coord_features_from_arange_equal_official_linspace(dtype):
    # The official heads use torch.linspace; ours is built from arange (exportable with dynamic
    # H, W) and must give the same values, including a single row/column (-1).
    for h, w in [(1, 1), (1, 7), (2, 3), (13, 200), (336, 100), (1000, 999)]:
        coords = coord_features(torch.zeros(1, 1, h, w, dtype=dtype))
        assert coords.dtype == dtype
        tol = 1e-7 if dtype != torch.float16 else 1e-3
        torch.testing.assert_close(
            coords[0, 0, 0], torch.linspace(-1, 1, w, dtype=dtype), rtol=0, atol=tol
        )
        torch.testing.assert_close(
            coords[0, 1, :, 0], torch.linspace(-1, 1, h, dtype=dtype), rtol=0, atol=tol
        )


def test_coord_features_export_keeps_height_and_width_dynamic():
    class Coords(torch.nn.Module):
        def forward(self, x):
            return coord_features(x)

    height, width = torch.export.Dim("height", max=4096), torch.export.Dim("width", max=4096)
    program = torch.export.export(
        Coords(), (torch.zeros(1, 1, 8, 12),), dynamic_shapes={"x": {2: height, 3: width}}
    )
    for h, w in [(5, 9), (40, 3)]:
        x = torch.zeros(1, 1, h, w)
        torch.testing.assert_close(program.module()(x), coord_features(x), rtol=0, atol=0)


def test_coord_features_traced_at_one_size_run_at_others():
    # torch.jit.trace (TorchScript and the ONNX exporter) sees the sizes as tensors.
    class Coords(torch.nn.Module):
        def forward(self, x):
            return coord_features(x)

    traced = torch.jit.trace(Coords(), (torch.zeros(1, 1, 8, 12),))
    for h, w in [(5, 9), (1, 1), (40, 3)]:
        x = torch.zeros(1, 1, h, w)
        torch.testing.assert_close(traced(x), coord_features(x), rtol=0, atol=0)


def test_level_split_halves_p2_and_brings_p6_to_p5_size():
    feats = [torch.randn(1, 4, 64 // 2**i, 96 // 2**i) for i in range(4)]
    feats.append(F.max_pool2d(feats[-1], kernel_size=1, stride=2))  # P6 as detectron2 builds it
    split = split_features(feats)
    assert [tuple(f.shape[-2:]) for f in split] == [(32, 48), (32, 48), (16, 24), (8, 12), (8, 12)]
    # Bilinear halving of an even-sized map averages 2x2 blocks.
    torch.testing.assert_close(split[0], F.avg_pool2d(feats[0], 2))


def test_solov2_batched_dynamic_conv_equals_a_naive_conv_per_instance():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("SOLOv2Head"))
    head: SOLOv2Head = model.head
    features = model.backbone(torch.randn(3, 3, 64, 96))
    outputs = head([features[f] for f in model.head_in_features])
    kernels, mask_features = outputs.mask_outputs
    level = 1
    images = torch.tensor([2, 0, 2, 1, 0, 2])
    cells = torch.tensor([5, 17, 5, 99, 0, 42])
    probs = head.training_mask_probs(outputs, level, images, cells)
    for k, (image, cell) in enumerate(zip(images, cells)):
        weight = kernels[level][image].flatten(1)[:, cell].view(1, -1, 1, 1)
        naive = F.conv2d(mask_features[image : image + 1], weight)[0, 0].sigmoid()
        torch.testing.assert_close(probs[k], naive, rtol=1e-4, atol=1e-6)

    # Inference path: all candidates of one image, across levels, as one product.
    levels = torch.tensor([0, 1, 4, 1])
    cells = torch.tensor([3, 7, 15, 0])
    size = tuple(mask_features.shape[-2:])
    probs = head.inference_mask_probs(outputs, 1, levels, cells, size)
    for k, (level, cell) in enumerate(zip(levels, cells)):
        weight = kernels[level][1].flatten(1)[:, cell].view(1, -1, 1, 1)
        naive = F.conv2d(mask_features[1:2], weight)[0, 0].sigmoid()
        torch.testing.assert_close(probs[k], naive, rtol=1e-4, atol=1e-6)


def test_solov2_mask_features_are_at_stride_4():
    model = build_model(tiny_cfg("SOLOv2Head"))
    features = model.backbone(torch.randn(1, 3, 96, 128))
    mask_features = model.head.mask_features([features[f] for f in ("p2", "p3", "p4", "p5")])
    assert mask_features.shape == (1, 32, 24, 32)
