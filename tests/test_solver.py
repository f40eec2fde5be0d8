"""SOLVER.OPTIMIZER: Detectron2's SGD by default, AdamW on request, both with its param groups."""

import pytest
import torch

from detectron2.modeling import build_model

from helpers import tiny_cfg
from solo.solver import build_solo_optimizer


def _model_and_cfg(opts):
    torch.manual_seed(0)
    cfg = tiny_cfg("SOLOv2Head", opts)
    return build_model(cfg), cfg


def test_default_optimizer_is_detectron2_sgd():
    model, cfg = _model_and_cfg([])
    optimizer = build_solo_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == cfg.SOLVER.MOMENTUM


def test_adamw_uses_detectron2_param_groups_clipping_and_updates_weights():
    opts = [
        "SOLVER.OPTIMIZER", "adamw", "SOLVER.BASE_LR", "0.001", "SOLVER.WEIGHT_DECAY", "0.05",
        "SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
    ]  # fmt: skip
    model, cfg = _model_and_cfg(opts)
    optimizer = build_solo_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert type(optimizer) is not torch.optim.AdamW  # Detectron2's gradient-clipping subclass
    decays = {g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.0, 0.05}  # GroupNorm parameters are not decayed
    assert all(g["lr"] == pytest.approx(0.001) for g in optimizer.param_groups)

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    loss = sum(((p.float() - 0.37) ** 2).sum() for p in params)  # non-zero gradient everywhere
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert changed == len(params)


def test_adamw_step_equals_the_reference_adamw_update():
    opts = [
        "SOLVER.OPTIMIZER", "ADAMW", "SOLVER.BASE_LR", "0.01", "SOLVER.WEIGHT_DECAY", "0.1",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
    ]  # fmt: skip
    model, cfg = _model_and_cfg(opts)
    optimizer = build_solo_optimizer(cfg, model)
    assert optimizer.defaults["fused"]  # CPU parameters: the fused kernel
    # Channels-last weights (MODEL.SOLO.CHANNELS_LAST_ON_CPU) get NCHW gradients below: the
    # fused kernel alone would pair the wrong elements.
    assert any(
        p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        for p in model.parameters()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    copies = [p.detach().clone().requires_grad_() for p in params]
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    reference = torch.optim.AdamW(
        [{"params": [c], "weight_decay": decays[id(p)]} for p, c in zip(params, copies)],
        lr=0.01,
        foreach=False,
    )
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, c in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=generator)
            c.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-5, atol=1e-6)


def _step_with_gradients(opts, scale):
    """One plain SGD step (lr 1, no momentum/decay) with random gradients of total norm about
    ``scale``: returns the gradients and the applied updates, per parameter."""
    opts = [
        "SOLVER.BASE_LR", "1.0", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
        "SOLVER.WEIGHT_DECAY_NORM", "0.0", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "35.0",
        *opts,
    ]  # fmt: skip
    model, cfg = _model_and_cfg(opts)
    optimizer = build_solo_optimizer(cfg, model)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(p.shape, generator=generator) for p in params]
    total = torch.stack([g.norm() for g in grads]).norm()
    grads = [g * (scale / total) for g in grads]
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optimizer.step()
    return grads, [b - p.detach() for b, p in zip(before, params)]


def test_full_model_clipping_scales_all_gradients_together_like_the_official_grad_clip():
    # mmdetection's grad_clip=dict(max_norm=35): one factor 35 / total norm for every tensor.
    grads, updates = _step_with_gradients(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"], 70.0)
    for g, u in zip(grads, updates):
        torch.testing.assert_close(u, g * 0.5, rtol=1e-4, atol=1e-7)
    # Below the threshold the gradients are left as they are.
    grads, updates = _step_with_gradients(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model"], 20.0)
    for g, u in zip(grads, updates):
        torch.testing.assert_close(u, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_clipping_sees_unscaled_gradients_under_a_grad_scaler(optimizer):
    """GPU AMP steps through GradScaler: clipping must act on the true gradients, so a scaled
    backward + scaler.step gives the same update as a plain one."""
    opts = [
        "SOLVER.OPTIMIZER", optimizer, "SOLVER.BASE_LR", "0.01",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5",
    ]  # fmt: skip
    results = []
    for scale in (None, 1024.0):
        model, cfg = _model_and_cfg(opts)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_solo_optimizer(cfg, model)
        loss = sum(((p.float() - 0.37) ** 2).sum() for p in params)
        if scale is None:
            loss.backward()
            optimizer.step()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_norm_clipping_stays_detectron2_per_tensor():
    grads, updates = _step_with_gradients(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "norm"], 200.0)
    # Each tensor on its own: the large ones are cut to norm 35, the small ones pass unchanged.
    clipped = [g.norm() > 35.0 for g in grads]
    assert 0 < sum(clipped) < len(grads)
    for g, u, cut in zip(grads, updates, clipped):
        expected = g * (35.0 / g.norm()) if cut else g
        torch.testing.assert_close(u, expected, rtol=1e-4, atol=1e-6)


def test_unknown_clip_type_is_rejected_with_the_choices():
    model, cfg = _model_and_cfg(["SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "global"])
    with pytest.raises(ValueError, match=r"CLIP_TYPE='global' is not one of .*full_model"):
        build_solo_optimizer(cfg, model)


def test_unknown_optimizer_is_rejected_with_the_choices():
    model, cfg = _model_and_cfg(["SOLVER.OPTIMIZER", "RMSprop"])
    with pytest.raises(ValueError, match=r"SOLVER.OPTIMIZER='RMSprop'.*SGD.*ADAMW"):
        build_solo_optimizer(cfg, model)
