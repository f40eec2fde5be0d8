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
    on_fused_devices = all(
        p.device.type in ("cpu", "cuda") for group in params for p in group["params"]
    )
    adamw = FusedAdamW if on_fused_devices else torch.optim.AdamW
    optimizer = adamw(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return maybe_add_gradient_clipping(cfg, optimizer)


class FusedAdamW(torch.optim.AdamW):
    """AdamW with the fused kernel: one pass over all tensors, on CPU ~5x faster than foreach
    (16 vs 80 ms per step for a ResNet-18), same result up to float rounding.

    The CPU fused kernel walks a parameter and its gradient as flat memory, so a gradient laid
    out differently (an NCHW gradient of a channels-last weight) would silently update the wrong
    elements (torch 2.x). Autograd already gives gradients their parameter's layout; gradients
    set by hand are re-laid out here before the update.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None and grad.stride() != param.stride():
                    param.grad = torch.empty_like(param).copy_(grad)
        return super().step(closure)
