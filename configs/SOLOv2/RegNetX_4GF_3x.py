"""SOLOv2 on Detectron2's RegNetX-4GF + FPN, SOLOv2's 3x recipe (RegNetX_4GF_3x.yaml)."""

from ..common.data.coco import dataloader
from ..common.models.backbones import PYCLS_BGR, REGNETX_4GF_CHECKPOINT, regnetx_4gf_fpn
from ..common.models.solov2 import model
from ..common.optim import SGD as optimizer
from ..common.schedules import solov2_lr_multiplier_3x as lr_multiplier
from ..common.train import train

model.backbone = regnetx_4gf_fpn
model.update(PYCLS_BGR, input_format="BGR")
dataloader.train.mapper.image_format = "BGR"
dataloader.train.mapper.augmentations[0].short_edge_length = (640, 672, 704, 736, 768, 800)
train.max_iter = 36 * 7330
train.init_checkpoint = REGNETX_4GF_CHECKPOINT  # download it; Detectron2's format already
train.output_dir = "output/SOLOv2/RegNetX_4GF_3x"
