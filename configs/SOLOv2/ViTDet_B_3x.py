"""SOLOv2 on ViT-B/16 + simple feature pyramid (ViTDet, MAE weights), SOLOv2's 3x schedule with
ViTDet's optimizer (AdamW, layer-wise lr decay 0.7); images at most 1024 on their long side,
padded to 1024 x 1024."""

from functools import partial

from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from ..common.data.coco import dataloader
from ..common.models.backbones import IMAGENET_RGB, VIT_B_CHECKPOINT, vit_b_sfp
from ..common.models.solov2 import model
from ..common.optim import AdamW as optimizer
from ..common.schedules import solov2_lr_multiplier_3x as lr_multiplier
from ..common.train import train

model.backbone = vit_b_sfp
model.update(IMAGENET_RGB)
dataloader.train.mapper.augmentations[0].update(
    short_edge_length=(640, 672, 704, 736, 768, 800), max_size=1024
)
dataloader.test.mapper.augmentations[0].max_size = 1024
optimizer.update(lr=1e-4, weight_decay=0.1)
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}
train.max_iter = 36 * 7330
train.amp.enabled = True
train.init_checkpoint = VIT_B_CHECKPOINT
train.output_dir = "output/SOLOv2/ViTDet_B_3x"
