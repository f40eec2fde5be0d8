"""Backbones: the official ResNet norm (frozen statistics, trainable affine); MobileNetV3 and
RegNet FPN configs build, train, predict independently of the batch and export."""

import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from helpers import (
    assert_onnx_export_is_exact,
    build,
    force_candidates,
    random_batch,
    solo_cfg,
    tiny_cfg,
    train_step,
)
from solo.export import ExportedModel, compare_predictions, export_model
from solo.modeling.backbone import FrozenStatsBatchNorm2d
from solo.solver import build_solo_optimizer


def _randomise_norms(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)):
            n = norm.num_features
            norm.weight.copy_(torch.rand(n, generator=generator) + 0.5)
            norm.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            norm.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def test_official_norm_keeps_statistics_and_trains_affine_of_unfrozen_stages_only():
    cfg = tiny_cfg("SOLOv2Head")  # Base-SOLO: NORM FrozenBNTrainableAffine, FREEZE_AT 2
    assert cfg.MODEL.RESNETS.NORM == "FrozenBNTrainableAffine"
    model = build(cfg)
    _randomise_norms(model)
    resnet = model.backbone.bottom_up
    frozen = [resnet.stem, resnet.res2]
    for stage in frozen:  # stem and res2: Detectron2's FrozenBN, nothing to train
        norms = [m for m in stage.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert norms and all(type(m) is FrozenBatchNorm2d for m in norms)
    trainable = [m for m in resnet.modules() if isinstance(m, FrozenStatsBatchNorm2d)]
    stages = (resnet.res3, resnet.res4, resnet.res5)
    assert len(trainable) == sum(
        isinstance(m, FrozenBatchNorm2d) for s in stages for m in s.modules()
    )
    statistics = [(m.running_mean.clone(), m.running_var.clone()) for m in trainable]
    affine = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in trainable]

    optimizer = build_solo_optimizer(cfg, model)
    train_step(model, random_batch([((64, 96), 3), ((72, 80), 2)], 5))
    for norm in trainable:
        assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
        assert norm.bias.grad is not None and norm.bias.grad.abs().sum() > 0
    optimizer.step()
    for norm, (mean, var), (weight, bias) in zip(trainable, statistics, affine):
        assert torch.equal(norm.running_mean, mean) and torch.equal(norm.running_var, var)
        assert not torch.equal(norm.weight.detach(), weight)
        assert not torch.equal(norm.bias.detach(), bias)


def test_official_norm_has_frozen_bn_keys_and_outputs():
    """Same state-dict keys as Detectron2's FrozenBN (checkpoints load into either) and, with
    the same values, the same features in inference (folded) and training (unfolded)."""
    official = build(tiny_cfg("SOLOv2Head"))
    frozen = build(tiny_cfg("SOLOv2Head", ["MODEL.RESNETS.NORM", "FrozenBN"]))
    _randomise_norms(official)
    state = official.state_dict()
    assert list(state) == list(frozen.state_dict())
    frozen.load_state_dict(state)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ours, theirs = official.backbone(x), frozen.backbone(x)
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-4)


def test_official_r50_trains_the_84_affine_tensors_of_res3_to_res5():
    # mmdetection's ResNet-50 with frozen_stages=1 hands SGD 84 BN weight/bias tensors of
    # res3-res5 (4 + 6 + 3 blocks, 3 norms each, plus one shortcut norm per stage).
    cfg = tiny_cfg("SOLOv2Head", ["MODEL.RESNETS.DEPTH", "50"])
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
    backbone = BACKBONE_REGISTRY.get(cfg.MODEL.BACKBONE.NAME)(cfg, ShapeSpec(channels=3))
    norm_params = [
        p
        for m in backbone.modules()
        if isinstance(m, FrozenStatsBatchNorm2d)
        for p in m.parameters()
        if p.requires_grad
    ]
    assert len(norm_params) == 84


# The new bottom-up networks, shrunk (narrow FPN and head, small grids) to run in seconds.
NEW_BACKBONE_CONFIGS = [
    "SOLOv2/Light_448_MobileNetV3_3x.yaml",
    "SOLOv2/RegNetX_4GF_3x.yaml",
    "SOLOv2/RegNetY_4GF_3x.yaml",
    "Shapes/SOLOv2_MobileNetV3.yaml",
]
SMALL = [
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLO.HEAD_CHANNELS", "64",
    "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32", "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "MODEL.SOLO.NUM_CLASSES", "5", "MODEL.SOLO.NUM_GRIDS", "[12, 10, 8, 6, 4]",
    "MODEL.SOLO.SCALE_RANGES", "[[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]]",
    "MODEL.SOLO.NMS_PRE", "100",
]  # fmt: skip


def small_model(config_file, seed=0):
    return build(solo_cfg(config_file, SMALL), seed)


def predict(model, images):
    with torch.no_grad():
        return [o["instances"] for o in model([{"image": im} for im in images])]


@pytest.mark.parametrize("config_file", NEW_BACKBONE_CONFIGS)
def test_new_backbone_trains_with_finite_losses_and_feeds_every_level(config_file):
    cfg = solo_cfg(config_file, SMALL)
    model = build(cfg)
    shapes = model.backbone.output_shape()
    assert [shapes[f].stride for f in cfg.MODEL.SOLO.IN_FEATURES] == [4, 8, 16, 32, 64]
    optimizer = build_solo_optimizer(cfg, model)
    batch = random_batch([((96, 128), 3), ((80, 112), 2)], 5, seed=1)
    for _ in range(3):
        losses = train_step(model, batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.step()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not [n for n in trainable if dict(model.named_parameters())[n].grad is None]


@pytest.mark.parametrize("config_file", NEW_BACKBONE_CONFIGS)
def test_new_backbone_predictions_do_not_depend_on_the_batch(config_file):
    model = small_model(config_file)
    force_candidates(model)
    model.eval()
    generator = torch.Generator().manual_seed(5)
    sizes = [(75, 140), (128, 96), (41, 60)]  # three padded sizes
    images = [torch.randint(0, 256, (3, *s), generator=generator).to(torch.uint8) for s in sizes]
    for image, batched in zip(images, predict(model, images)):
        (alone,) = predict(model, [image])
        assert len(alone) > 0 and batched.image_size == alone.image_size
        assert torch.equal(batched.pred_classes, alone.pred_classes)
        torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=1e-5)
        assert torch.equal(batched.pred_masks, alone.pred_masks)


def calibrate_batchnorm(model, seed=0):
    """BatchNorm statistics of random images: a random MobileNetV3 with identity statistics
    shrinks its features to ~1e-8 by stride 16, and the predictions of such a model are ties that
    float rounding orders differently in an exported graph."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.backbone.train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.backbone(torch.randn(4, 3, 128, 160, generator=generator))
    model.backbone.eval()


# MobileNetV3 with BatchNorm (calibrated), RegNets with FrozenBN.
EXPORTED = ["Shapes/SOLOv2_MobileNetV3.yaml"] + NEW_BACKBONE_CONFIGS[1:3]


@pytest.mark.parametrize("config_file", EXPORTED)
def test_new_backbone_exports_to_onnx_with_the_eager_predictions(config_file, tmp_path):
    pytest.importorskip("onnxruntime")
    model = small_model(config_file)
    force_candidates(model)
    model.eval()
    calibrate_batchnorm(model)
    sample = torch.randint(0, 256, (3, 97, 133), generator=torch.Generator().manual_seed(0))
    path = export_model(model, "onnx", str(tmp_path), sample.to(torch.uint8), max_candidates=1500)
    exported = ExportedModel(path)
    image = torch.randint(0, 256, (3, 128, 96), generator=torch.Generator().manual_seed(1))
    inputs = [{"image": image.to(torch.uint8)}]
    with torch.no_grad():
        (expected,) = [r["instances"] for r in model(inputs)]
    (actual,) = [r["instances"] for r in exported(inputs)]
    assert len(expected) > 0 and compare_predictions(expected, actual) == []


def test_mobilenet_v3_with_frozen_bn_exports_to_onnx_with_the_eager_predictions(tmp_path):
    """The COCO MobileNetV3 config (FrozenBN, FREEZE_AT 2) at two sizes other than the sample's.
    Seeded random FrozenBN statistics: identity ones shrink the features to ties."""
    pytest.importorskip("onnxruntime")
    model = small_model("SOLOv2/Light_448_MobileNetV3_3x.yaml")
    assert any(type(m) is FrozenBatchNorm2d for m in model.backbone.modules())
    _randomise_norms(model, seed=2)
    force_candidates(model)
    assert_onnx_export_is_exact(model.eval(), tmp_path, (97, 133), [(128, 96), (75, 150)])


def test_levels_the_head_cannot_find_are_named_with_the_key_to_set():
    opts = SMALL + ["MODEL.SOLO.IN_FEATURES", "['s1', 's2', 's3', 's4', 's5']"]
    with pytest.raises(ValueError, match=r"MODEL.SOLO.IN_FEATURES .*'s1'.*outputs \['p2', 'p3'"):
        build(solo_cfg("SOLOv2/Light_448_MobileNetV3_3x.yaml", opts))


def test_mobilenet_v3_freeze_at_freezes_stem_and_s1_only():
    model = small_model("SOLOv2/Light_448_MobileNetV3_3x.yaml")  # FREEZE_AT 2
    features = model.backbone.bottom_up.features
    frozen = [all(not p.requires_grad for p in m.parameters()) for m in features]
    assert frozen == [True] * 4 + [False] * (len(features) - 4)
    assert all(type(m) is not torch.nn.BatchNorm2d for m in features.modules())  # FrozenBN


def test_unsupported_bottom_up_norm_is_refused_naming_the_key():
    cfg = solo_cfg("Shapes/SOLOv2_MobileNetV3.yaml", SMALL + ["MODEL.BOTTOM_UP.NORM", "GN"])
    with pytest.raises(ValueError, match=r"MODEL.BOTTOM_UP.NORM='GN'.*FrozenBN"):
        build(cfg)
