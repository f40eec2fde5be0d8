"""SOLOv2-Light 448 R-50 3x as a LazyConfig (SOLOv2/Light_448_R50_3x.yaml): short side 352-512
(max 768), tested at 448."""

from ..common.data.coco import dataloader
from ..common.models.solov2 import light_model as model
from ..common.optim import SGD as optimizer
from ..common.schedules import solov2_lr_multiplier_3x as lr_multiplier
from ..common.train import train

dataloader.train.mapper.augmentations[0].short_edge_length = (352, 384, 416, 448, 480, 512)
dataloader.train.mapper.augmentations[0].max_size = 768
dataloader.test.mapper.augmentations[0].short_edge_length = 448
dataloader.test.mapper.augmentations[0].max_size = 768
train.max_iter = 36 * 7330
train.init_checkpoint = "checkpoints/torchvision-R-50.pkl"
train.output_dir = "output/SOLOv2/Light_448_R50_3x"
