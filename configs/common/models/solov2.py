"""SOLOv2 on ResNet-50 + FPN (configs/SOLOv2/Base-SOLOv2.yaml); ``light_model`` is SOLOv2-Light
448 (2-conv towers 256 wide, E = 128, Light_448_R50_3x.yaml's scale ranges)."""

import copy

from detectron2.config import LazyCall as L

from solo.modeling.heads import SOLOv2Head

from .solo import model as _solo

model = copy.deepcopy(_solo)
model.head = L(SOLOv2Head)(
    in_channels="${..backbone.out_channels}",
    num_classes="${..num_classes}",
    num_grids=_solo.head.num_grids,
    channels=512,
    num_convs=4,
    mask_in_features_count=4,  # P2-P5 feed the mask feature branch
    mask_kernel_channels=256,
    mask_feature_channels=128,
)
model.target_assigner.mask_strides = [4, 4, 4, 4, 4]  # unified mask features at stride 4
model.target_assigner.keep_overlapping_masks = True

light_model = copy.deepcopy(model)
light_model.head.update(channels=256, num_convs=2, mask_kernel_channels=128)
light_model.target_assigner.scale_ranges = [[1, 56], [28, 112], [56, 224], [112, 448], [224, 896]]
