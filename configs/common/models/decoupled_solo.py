"""Decoupled SOLO on ResNet-50 + FPN (configs/DecoupledSOLO/R50_1x.yaml); ``light_model`` is the
light head (one 4-conv mask tower, Light_R50_3x.yaml's scale ranges)."""

import copy

from solo.modeling.heads import DecoupledSOLOHead, DecoupledSOLOLightHead

from .solo import model as _solo

model = copy.deepcopy(_solo)
model.head._target_ = DecoupledSOLOHead

light_model = copy.deepcopy(model)
light_model.head._target_ = DecoupledSOLOLightHead
light_model.head.num_convs = 4
light_model.target_assigner.scale_ranges = [[1, 64], [32, 128], [64, 256], [128, 512], [256, 2048]]
