"""Decoupled SOLO R-50 1x as a LazyConfig (DecoupledSOLO/R50_1x.yaml)."""

from ..common.data.coco import dataloader
from ..common.models.decoupled_solo import model
from ..common.optim import SGD as optimizer
from ..common.schedules import lr_multiplier_1x as lr_multiplier
from ..common.train import train

train.init_checkpoint = "checkpoints/torchvision-R-50.pkl"
train.output_dir = "output/DecoupledSOLO/R50_1x"
