"""Decoupled SOLO light R-50 3x as a LazyConfig (DecoupledSOLO/Light_R50_3x.yaml): short side
352-512 (max 852), tested at 512."""

from ..common.data.coco import dataloader
from ..common.models.decoupled_solo import light_model as model
from ..common.optim import SGD as optimizer
from ..common.schedules import lr_multiplier_3x as lr_multiplier
from ..common.train import train

dataloader.train.mapper.augmentations[0].short_edge_length = (352, 384, 416, 448, 480, 512)
dataloader.train.mapper.augmentations[0].max_size = 852
dataloader.test.mapper.augmentations[0].short_edge_length = 512
dataloader.test.mapper.augmentations[0].max_size = 852
train.max_iter = 36 * 7330
train.init_checkpoint = "checkpoints/torchvision-R-50.pkl"
train.output_dir = "output/DecoupledSOLO/Light_R50_3x"
