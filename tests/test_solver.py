"""SOLVER.OPTIMIZER: Detectron2's SGD by default, AdamW on request, both with its param groups."""
import pytest
import torch

from detectron2.modeling import build_model

from conftest import tiny_cfg
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


def test_unknown_optimizer_is_rejected_with_the_choices():
    model, cfg = _model_and_cfg(["SOLVER.OPTIMIZER", "RMSprop"])
    with pytest.raises(ValueError, match=r"SOLVER.OPTIMIZER='RMSprop'.*SGD.*ADAMW"):
        build_solo_optimizer(cfg, model)
