"""SOLOv2 on MViTv2-T + FPN (Detectron2's backbone and ImageNet-1k weights), SOLOv2's 3x schedule
with AdamW (lr 1e-4, weight decay 0.05) as Detectron2's transformer configs train."""

from ..common.data.coco import dataloader
from ..common.models.backbones import IMAGENET_RGB, MVITV2_T_CHECKPOINT, mvitv2_t_fpn
from ..common.models.solov2 import model
from ..common.optim import AdamW as optimizer
from ..common.schedules import solov2_lr_multiplier_3x as lr_multiplier
from ..common.train import train

model.backbone = mvitv2_t_fpn
model.update(IMAGENET_RGB)
dataloader.train.mapper.augmentations[0].short_edge_length = (640, 672, 704, 736, 768, 800)
optimizer.update(lr=1e-4, weight_decay=0.05)
train.max_iter = 36 * 7330
train.amp.enabled = True
train.init_checkpoint = MVITV2_T_CHECKPOINT
train.output_dir = "output/SOLOv2/MViTv2_T_3x"
