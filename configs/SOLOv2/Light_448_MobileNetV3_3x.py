"""SOLOv2-Light 448 on torchvision's MobileNetV3-Large + FPN (Light_448_MobileNetV3_3x.yaml):
the CPU / edge config."""

from ..common.models.backbones import IMAGENET_RGB, MOBILENET_V3_CHECKPOINT, mobilenet_v3_large_fpn
from .Light_448_R50_3x import dataloader, lr_multiplier, model, optimizer, train

model.backbone = mobilenet_v3_large_fpn
model.update(IMAGENET_RGB)
train.init_checkpoint = MOBILENET_V3_CHECKPOINT
train.output_dir = "output/SOLOv2/Light_448_MobileNetV3_3x"
