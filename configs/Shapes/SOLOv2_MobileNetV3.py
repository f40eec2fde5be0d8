"""The shapes recipe on MobileNetV3-Large + FPN (Shapes/SOLOv2_MobileNetV3.yaml): BatchNorm,
trained from scratch, nothing frozen."""

from detectron2.config import LazyCall as L

from solo.modeling.bottom_up import MobileNetV3

from ..common.models.backbones import STAGES, fpn
from .SOLOv2_R18 import dataloader, lr_multiplier, model, optimizer, train

model.backbone = fpn(L(MobileNetV3)(out_features=STAGES, norm="BN", freeze_at=0), STAGES)
model.backbone.update(out_channels=128, norm="GN")
train.amp.enabled = False  # float32: faster than bfloat16 autocast for this backbone on CPU
# Twice the R-18 recipe's lr and 2,100 iterations, as the YAML twin (measured there).
optimizer.lr = 0.002
train.max_iter = 2100
lr_multiplier.warmup_length = 100 / 2100
train.output_dir = "output/shapes/SOLOv2_MobileNetV3_lazy"
