"""SOLOv2 R-50 1x as a LazyConfig (SOLOv2/R50_1x.yaml): warm-up from lr x 0.01."""

from ..common.data.coco import dataloader
from ..common.models.solov2 import model
from ..common.optim import SGD as optimizer
from ..common.schedules import solov2_lr_multiplier_1x as lr_multiplier
from ..common.train import train

train.init_checkpoint = "checkpoints/torchvision-R-50.pkl"
train.output_dir = "output/SOLOv2/R50_1x"
