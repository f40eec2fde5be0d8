"""SOLOv2 on Detectron2's RegNetY-4GF + FPN, SOLOv2's 3x recipe (RegNetY_4GF_3x.yaml)."""

from ..common.data.coco import dataloader
from ..common.models.backbones import PYCLS_BGR, REGNETY_4GF_CHECKPOINT, regnety_4gf_fpn
from ..common.models.solov2 import model
from ..common.optim import SGD as optimizer
from ..common.schedules import solov2_lr_multiplier_3x as lr_multiplier
from ..common.train import train

model.backbone = regnety_4gf_fpn
model.update(PYCLS_BGR, input_format="BGR")
dataloader.train.mapper.image_format = "BGR"
dataloader.train.mapper.augmentations[0].short_edge_length = (640, 672, 704, 736, 768, 800)
train.max_iter = 36 * 7330
train.init_checkpoint = REGNETY_4GF_CHECKPOINT  # download it; Detectron2's format already
train.output_dir = "output/SOLOv2/RegNetY_4GF_3x"
