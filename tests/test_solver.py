"""SOLVER.OPTIMIZER: Detectron2's SGD by default, AdamW on request, both with its param groups."""

import pytest
import torch

from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler

from helpers import CONFIG_DIR, solo_cfg, tiny_cfg
from solo.modeling.backbone import FrozenStatsBatchNorm2d
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
    # Channels-last weights (CHANNELS_LAST_ON_CPU) get NCHW gradients below: the
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


# The official solver settings, one row per config: WXinlong/SOLO's mmdetection files (SGD lr
# 0.01, momentum 0.9, weight decay 1e-4 on every parameter, 8 GPUs x 2 images, grad_clip
# max_norm=35 on all gradients together, linear warm-up over 500 iterations from warmup_ratio,
# epoch steps) and AdelaiDet's Detectron2 files (Detectron2's optimizer defaults: no clipping, no
# weight decay on norm layers). An epoch is 7,330 iterations of 16 images (117,266 COCO images).
EPOCH = 7330


def _mmdet(file, epochs, steps, warmup_ratio):
    return dict(
        source=f"WXinlong/SOLO configs/{file}", BASE_LR=0.01, MOMENTUM=0.9, WEIGHT_DECAY=1e-4,
        WEIGHT_DECAY_NORM=1e-4, IMS_PER_BATCH=16, MAX_ITER=epochs * EPOCH,
        STEPS=tuple(s * EPOCH for s in steps), WARMUP_ITERS=500, WARMUP_FACTOR=warmup_ratio,
        CLIP=("full_model", 35.0, 2.0),
    )  # fmt: skip


def _adelaidet(file, max_iter, steps):
    return dict(
        source=f"aim-uofa/AdelaiDet configs/SOLOv2/{file}", BASE_LR=0.01, MOMENTUM=0.9,
        WEIGHT_DECAY=1e-4, WEIGHT_DECAY_NORM=0.0, IMS_PER_BATCH=16, MAX_ITER=max_iter,
        STEPS=steps, WARMUP_ITERS=1000, WARMUP_FACTOR=0.01, CLIP=None,
    )  # fmt: skip


OFFICIAL_SOLVERS = {
    "SOLO/R50_1x.yaml": _mmdet("solo/solo_r50_fpn_8gpu_1x.py", 12, (9, 11), 1 / 3),
    "SOLO/R50_3x.yaml": _mmdet("solo/solo_r50_fpn_8gpu_3x.py", 36, (27, 33), 1 / 3),
    "SOLO/R101_3x.yaml": _mmdet("solo/solo_r101_fpn_8gpu_3x.py", 36, (27, 33), 1 / 3),
    "DecoupledSOLO/R50_1x.yaml": _mmdet(
        "solo/decoupled_solo_r50_fpn_8gpu_1x.py", 12, (9, 11), 1 / 3
    ),
    "DecoupledSOLO/R50_3x.yaml": _mmdet(
        "solo/decoupled_solo_r50_fpn_8gpu_3x.py", 36, (27, 33), 1 / 3
    ),
    "DecoupledSOLO/R101_3x.yaml": _mmdet(
        "solo/decoupled_solo_r101_fpn_8gpu_3x.py", 36, (27, 33), 1 / 3
    ),
    "DecoupledSOLO/Light_R50_3x.yaml": _mmdet(
        "solo/decoupled_solo_light_r50_fpn_8gpu_3x.py", 36, (27, 33), 1 / 3
    ),
    "DecoupledSOLO/Light_DCN_R50_3x.yaml": _mmdet(
        "solo/decoupled_solo_light_dcn_r50_fpn_8gpu_3x.py", 36, (27, 33), 1 / 3
    ),
    "SOLOv2/R50_1x.yaml": _mmdet("solov2/solov2_r50_fpn_8gpu_1x.py", 12, (9, 11), 0.01),
    "SOLOv2/R50_3x.yaml": _mmdet("solov2/solov2_r50_fpn_8gpu_3x.py", 36, (27, 33), 0.01),
    "SOLOv2/R101_3x.yaml": _mmdet("solov2/solov2_r101_fpn_8gpu_3x.py", 36, (27, 33), 0.01),
    "SOLOv2/R101_DCN_3x.yaml": _mmdet("solov2/solov2_r101_dcn_fpn_8gpu_3x.py", 36, (27, 33), 0.01),
    "SOLOv2/X101_DCN_3x.yaml": _mmdet("solov2/solov2_x101_dcn_fpn_8gpu_3x.py", 36, (27, 33), 0.01),
    "SOLOv2/Light_448_R18_3x.yaml": _mmdet(
        "solov2/solov2_light_448_r18_fpn_8gpu_3x.py", 36, (27, 33), 0.01
    ),
    "SOLOv2/Light_448_R34_3x.yaml": _mmdet(
        "solov2/solov2_light_448_r34_fpn_8gpu_3x.py", 36, (27, 33), 0.01
    ),
    "SOLOv2/Light_448_R50_3x.yaml": _mmdet(
        "solov2/solov2_light_448_r50_fpn_8gpu_3x.py", 36, (27, 33), 0.01
    ),
    "SOLOv2/Light_512_DCN_R50_3x.yaml": _mmdet(
        "solov2/solov2_light_512_dcn_r50_fpn_8gpu_3x.py", 36, (27, 33), 0.01
    ),
    "SOLOv2/AdelaiDet_R50_3x.yaml": _adelaidet("R50_3x.yaml", 270000, (210000, 250000)),
    "SOLOv2/AdelaiDet_R101_3x.yaml": _adelaidet("R101_3x.yaml", 270000, (210000, 250000)),
}


# Backbones no official codebase trained SOLO with: SOLOv2's official recipe, as every SOLOv2 row.
NEW_BACKBONES = {
    "SOLOv2/Light_448_MobileNetV3_3x.yaml": "SOLOv2/Light_448_R50_3x.yaml",
    "SOLOv2/RegNetX_4GF_3x.yaml": "SOLOv2/R50_3x.yaml",
    "SOLOv2/RegNetY_4GF_3x.yaml": "SOLOv2/R50_3x.yaml",
}


def test_every_coco_config_has_a_row_in_the_official_solver_table():
    families = ("SOLO", "DecoupledSOLO", "SOLOv2")
    ours = {
        f"{family}/{path.name}"
        for family in families
        for path in (CONFIG_DIR / family).glob("*.yaml")
        if not path.name.startswith("Base-")
    }
    assert ours == set(OFFICIAL_SOLVERS) | set(NEW_BACKBONES)


@pytest.mark.parametrize("config_file", sorted(NEW_BACKBONES))
def test_new_backbone_configs_keep_the_solver_of_their_resnet_counterpart(config_file):
    assert solo_cfg(config_file).SOLVER == solo_cfg(NEW_BACKBONES[config_file]).SOLVER


@pytest.mark.parametrize("config_file", sorted(OFFICIAL_SOLVERS))
def test_config_solver_keys_equal_the_official_config(config_file):
    official = OFFICIAL_SOLVERS[config_file]
    solver = solo_cfg(config_file).SOLVER
    assert solver.OPTIMIZER == "SGD" and solver.WARMUP_METHOD == "linear"
    assert solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and solver.GAMMA == 0.1
    assert solver.BIAS_LR_FACTOR == 1.0 and solver.WEIGHT_DECAY_BIAS in (None, solver.WEIGHT_DECAY)
    for key in ("BASE_LR", "MOMENTUM", "WEIGHT_DECAY", "WEIGHT_DECAY_NORM", "IMS_PER_BATCH"):
        assert solver[key] == pytest.approx(official[key]), (key, official["source"])
    for key in ("MAX_ITER", "WARMUP_ITERS"):
        assert solver[key] == official[key], (key, official["source"])
    assert tuple(solver.STEPS) == official["STEPS"], official["source"]
    assert solver.WARMUP_FACTOR == pytest.approx(official["WARMUP_FACTOR"]), official["source"]
    clip = solver.CLIP_GRADIENTS
    ours = (clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) if clip.ENABLED else None
    assert ours == official["CLIP"], official["source"]


def test_solov2_learning_rate_at_iteration_zero_is_one_hundredth_of_base_lr():
    # mmcv's linear warm-up: lr = base * (1 - (1 - i / warmup_iters) * (1 - warmup_ratio)).
    cfg = solo_cfg("SOLOv2/R50_3x.yaml")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(501):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    for i in (0, 1, 250, 499, 500):
        official = 0.01 * (1 - (1 - min(i, 500) / 500) * (1 - 0.01))
        assert lrs[i] == pytest.approx(official, rel=1e-6), i


def test_trainable_affine_norm_parameters_get_weight_decay_norm_like_batchnorm():
    opts = ["SOLVER.WEIGHT_DECAY", "0.001", "SOLVER.WEIGHT_DECAY_NORM", "0.0"]
    model, cfg = _model_and_cfg(opts)
    optimizer = build_solo_optimizer(cfg, model)
    default = optimizer.defaults["weight_decay"]
    decay = {p: g.get("weight_decay", default) for g in optimizer.param_groups for p in g["params"]}
    norms = [m for m in model.modules() if isinstance(m, FrozenStatsBatchNorm2d)]
    assert norms  # Base-SOLO's official ResNet norm
    assert all(decay[p] == 0.0 for m in norms for p in m.parameters())
    conv = model.backbone.bottom_up.res3[0].conv1
    assert decay[conv.weight] == pytest.approx(0.001)
    assert len(decay) == sum(p.requires_grad for p in model.parameters())  # each once
    # The official recipe: every parameter decayed alike.
    model, cfg = _model_and_cfg([])
    optimizer = build_solo_optimizer(cfg, model)
    default = optimizer.defaults["weight_decay"]
    decays = {g.get("weight_decay", default) for g in optimizer.param_groups}
    assert decays == {1e-4}
