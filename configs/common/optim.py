"""Optimizers of SOLO's LazyConfig files.

``SGD``: the official recipe (the SOLVER of configs/SOLO/Base-SOLO.yaml): lr 0.01, momentum 0.9,
weight decay 1e-4 on every parameter (norms included), the norm of all gradients clipped at 35
together. ``AdamW``: the shapes recipe's (solo/solver.py).
"""

import torch

from detectron2.config import LazyCall as L

from solo.solver import FusedAdamW, full_model_clipped_optimizer, solo_param_groups

SGD = L(full_model_clipped_optimizer)(
    optimizer_class=torch.optim.SGD,
    # params.model is set by tools/lazyconfig_train_net.py (Detectron2's convention).
    params=L(solo_param_groups)(base_lr="${..lr}", weight_decay_norm=1e-4),
    lr=0.01,
    momentum=0.9,
    weight_decay=1e-4,
    foreach=True,
    max_norm=35.0,
    norm_type=2.0,
)

AdamW = L(full_model_clipped_optimizer)(
    optimizer_class=FusedAdamW,
    params=L(solo_param_groups)(base_lr="${..lr}", weight_decay_norm=0.0),
    lr=0.001,
    weight_decay=0.01,
    max_norm=35.0,
    norm_type=2.0,
)
