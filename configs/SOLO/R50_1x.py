"""SOLO R-50 1x as a LazyConfig (the model and recipe of SOLO/R50_1x.yaml)."""

from ..common.data.coco import dataloader
from ..common.models.solo import model
from ..common.optim import SGD as optimizer
from ..common.schedules import lr_multiplier_1x as lr_multiplier
from ..common.train import train

train.init_checkpoint = "checkpoints/torchvision-R-50.pkl"  # tools/convert_checkpoint.py
train.output_dir = "output/SOLO/R50_1x"
