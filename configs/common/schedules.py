"""COCO schedules of the official SOLO configs, as Detectron2 LazyConfig lr multipliers: 16 images
per iteration, 7,330 iterations per epoch; 1x = 12 epochs (x0.1 after epochs 9 and 11), 3x = 36
(after 27 and 33); linear warm-up over 500 iterations from 1/3 (SOLO, Decoupled SOLO) or 0.01
(SOLOv2: every official configs/solov2/*.py has warmup_ratio=0.01)."""

from fvcore.common.param_scheduler import MultiStepParamScheduler

from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

EPOCH = 7330


def schedule(epochs, steps, warmup_factor, warmup_iters=500):
    """The lr multiplier of ``epochs`` epochs with x0.1 steps after the epochs in ``steps``."""
    max_iter = epochs * EPOCH
    return L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(
            values=[0.1**i for i in range(len(steps) + 1)],
            milestones=[s * EPOCH for s in steps],
            num_updates=max_iter,
        ),
        warmup_length=warmup_iters / max_iter,
        warmup_method="linear",
        warmup_factor=warmup_factor,
    )


lr_multiplier_1x = schedule(12, (9, 11), 1 / 3)
lr_multiplier_3x = schedule(36, (27, 33), 1 / 3)
solov2_lr_multiplier_1x = schedule(12, (9, 11), 0.01)
solov2_lr_multiplier_3x = schedule(36, (27, 33), 0.01)
