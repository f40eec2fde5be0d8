"""Backbones: the official ResNet norm (frozen statistics, trainable affine)."""

import torch

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from helpers import build, random_batch, tiny_cfg, train_step
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
