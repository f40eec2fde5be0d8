"""Optimizer construction: SGD or AdamW (``SOLVER.OPTIMIZER``), with the official gradient clipping.

Detectron2's ``build_optimizer`` only knows SGD, and its ``CLIP_GRADIENTS.CLIP_TYPE "norm"``
clips every parameter tensor on its own. The official SOLO recipe (mmdetection's
``grad_clip=dict(max_norm=35, norm_type=2)``) clips the norm of *all* gradients together, which
is ``CLIP_TYPE "full_model"`` here (the name Mask2Former uses for the same thing).

AdamW converges much faster when a small model is trained from scratch for a few hundred
iterations (the CPU-sized shapes configs); the COCO configs keep the official SGD recipe.
"""

import torch

from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)

from .modeling.backbone import FrozenStatsBatchNorm2d

OPTIMIZERS = ("SGD", "ADAMW")
CLIP_TYPES = ("full_model", "norm", "value")


def build_solo_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by ``SOLVER.OPTIMIZER``, with Detectron2's parameter groups
    (``WEIGHT_DECAY_NORM``, ``BIAS_LR_FACTOR``, ...) and ``SOLVER.CLIP_GRADIENTS``."""
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not one of {OPTIMIZERS}.")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE not in CLIP_TYPES:
        raise ValueError(
            f"SOLVER.CLIP_GRADIENTS.CLIP_TYPE={clip.CLIP_TYPE!r} is not one of {CLIP_TYPES}."
        )
    params = optimizer_param_groups(cfg, model)
    if name == "SGD":
        # Detectron2's build_optimizer SGD; clipping is added below, where "full_model" is known.
        optimizer = torch.optim.SGD(
            params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True,
        )  # fmt: skip
    else:
        on_fused_devices = all(
            p.device.type in ("cpu", "cuda") for group in params for p in group["params"]
        )
        adamw = FusedAdamW if on_fused_devices else torch.optim.AdamW
        optimizer = adamw(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    if not clip.ENABLED or clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer)  # Detectron2's per-tensor kinds
    # Detectron2's way of adding clipping to an optimizer instance: a subclass with a new step.
    optimizer.__class__ = _with_full_model_clipping(
        type(optimizer), clip.CLIP_VALUE, clip.NORM_TYPE
    )
    return optimizer


def optimizer_param_groups(cfg, model: torch.nn.Module) -> list:
    """:func:`solo_param_groups` with ``SOLVER.BASE_LR``, ``WEIGHT_DECAY_NORM``,
    ``BIAS_LR_FACTOR`` and ``WEIGHT_DECAY_BIAS``."""
    s = cfg.SOLVER
    return solo_param_groups(
        model, s.BASE_LR, s.WEIGHT_DECAY_NORM, s.BIAS_LR_FACTOR, s.WEIGHT_DECAY_BIAS
    )


def solo_param_groups(
    model: torch.nn.Module,
    base_lr: float = None,
    weight_decay_norm: float = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: float = None,
    lr_factor_func=None,
    overrides: dict = None,
) -> list:
    """Detectron2's parameter groups (``get_default_optimizer_params``, same arguments), in
    which the trainable gamma/beta of :class:`FrozenStatsBatchNorm2d` count as norm parameters,
    as BatchNorm's do (Detectron2 lists the norm types it knows; this one is ours)."""
    groups = get_default_optimizer_params(
        model,
        base_lr=base_lr,
        weight_decay_norm=weight_decay_norm,
        bias_lr_factor=bias_lr_factor,
        weight_decay_bias=weight_decay_bias,
        lr_factor_func=lr_factor_func,
        overrides=overrides,
    )
    norm_params = {
        p: name
        for module in model.modules()
        if isinstance(module, FrozenStatsBatchNorm2d)
        for name, p in module.named_parameters(recurse=False)
    }
    if not norm_params or weight_decay_norm is None:
        return groups
    regrouped = []
    for group in groups:
        others = [p for p in group["params"] if p not in norm_params]
        regrouped += [{**group, "params": others}] if others else []
        for p in (p for p in group["params"] if p in norm_params):
            # Detectron2's order: the norm's decay, then the "bias" override if there is one.
            bias_decay = weight_decay_bias if norm_params[p] == "bias" else None
            decay = weight_decay_norm if bias_decay is None else bias_decay
            regrouped.append({**group, "params": [p], "weight_decay": decay})
    return reduce_param_groups(regrouped)


def full_model_clipped_optimizer(
    optimizer_class, params, *, max_norm=None, norm_type: float = 2.0, **kwargs
) -> torch.optim.Optimizer:
    """``optimizer_class(params, **kwargs)`` clipping the norm of all gradients together at
    ``max_norm`` (``None``: no clipping) before each step, as ``CLIP_TYPE "full_model"`` does for
    YAML configs: the optimizer of SOLO's LazyConfig files (``configs/common/optim.py``), with
    ``params`` from :func:`solo_param_groups`."""
    optimizer = optimizer_class(params, **kwargs)
    if max_norm is not None:
        optimizer.__class__ = _with_full_model_clipping(type(optimizer), max_norm, norm_type)
    return optimizer


def _with_full_model_clipping(optimizer_class, max_norm: float, norm_type: float):
    def step(self, closure=None):
        grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(grads, max_norm, norm_type)
        return optimizer_class.step(self, closure)

    name = optimizer_class.__name__ + "WithFullModelGradientClip"
    return type(name, (optimizer_class,), {"step": step})


class FusedAdamW(torch.optim.AdamW):
    """AdamW with the fused kernel: one pass over all tensors, on CPU faster than foreach
    (docs/benchmarks_notes.md), same result up to float rounding.

    The CPU fused kernel walks a parameter and its gradient as flat memory, so a gradient laid
    out differently (an NCHW gradient of a channels-last weight) would silently update the wrong
    elements (torch 2.x). Autograd already gives gradients their parameter's layout; gradients
    set by hand are re-laid out here before the update.
    """

    def __init__(self, params, **kwargs):
        super().__init__(params, fused=True, **kwargs)
        # A fused optimizer tells GradScaler (GPU AMP) to pass it the gradients still scaled
        # and unscale them in the kernel, after gradient clipping has seen them scaled. Let
        # GradScaler unscale them first instead, as for any other optimizer.
        self._step_supports_amp_scaling = False

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                grad = param.grad
                if grad is not None and grad.stride() != param.stride():
                    param.grad = torch.empty_like(param).copy_(grad)
        return super().step(closure)
