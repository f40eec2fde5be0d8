"""Optimizer construction: Detectron2's SGD, or AdamW (``SOLVER.OPTIMIZER``).

Detectron2's ``build_optimizer`` only knows SGD. AdamW converges much faster when a small model
is trained from scratch for a few hundred iterations (the CPU-sized shapes configs); the COCO
configs keep the official SGD recipe.
"""
import torch

from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

OPTIMIZERS = ("SGD", "ADAMW")


def build_solo_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``SOLVER.OPTIMIZER``, with Detectron2's parameter groups
    (``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ...) and gradient clipping."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not one of {OPTIMIZERS}.")
    if name == "SGD":
        return build_optimizer(cfg, model)
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    optimizer = torch.optim.AdamW(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
