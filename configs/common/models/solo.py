"""SOLO (ECCV 2020) on ResNet-50 + FPN as a LazyConfig: the model of configs/SOLO/Base-SOLO.yaml.

The head families (decoupled_solo.py, solov2.py, ...) change ``model.head`` (and the target
assigner's mask strides, which follow from the head). Every value is the YAML default; the
comments of solo/config.py give meanings and paper symbols.
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from solo.modeling import SOLO, SOLOPostProcessor
from solo.modeling.backbone import solo_resnet
from solo.modeling.heads import SOLOHead
from solo.modeling.targets import SOLOTargetAssigner

# P2-P6 of an FPN (strides 4-64): SOLO's level strides once P2 is halved and P6 resized to P5.
LEVEL_STRIDES = [8, 8, 16, 32, 32]
NUM_CLASSES = 80
NUM_GRIDS = [40, 36, 24, 16, 12]
SCALE_RANGES = [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]

model = L(SOLO)(
    backbone=L(FPN)(
        # MODEL.RESNETS.NORM "FrozenBNTrainableAffine": FrozenBN made trainable in res3-res5.
        bottom_up=L(solo_resnet)(
            resnet=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm="FrozenBN"),
                stages=L(ResNet.make_default_stages)(
                    depth=50, stride_in_1x1=False, norm="FrozenBN"
                ),
                out_features=["res2", "res3", "res4", "res5"],
                freeze_at=2,
            ),
            trainable_affine_norm=True,
        ),
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=256,
        top_block=L(LastLevelMaxPool)(),
    ),
    head=L(SOLOHead)(
        in_channels="${..backbone.out_channels}",
        num_classes="${..num_classes}",
        num_grids=NUM_GRIDS,
        channels=256,
        num_convs=7,
    ),
    head_in_features=["p2", "p3", "p4", "p5", "p6"],
    target_assigner=L(SOLOTargetAssigner)(
        num_classes="${..num_classes}",
        num_grids="${..head.num_grids}",
        scale_ranges=SCALE_RANGES,
        # SOLO's masks are predicted at half the level stride (SOLOv2's at stride 4).
        mask_strides=[s // 2 for s in LEVEL_STRIDES],
        sigma=0.2,
        keep_overlapping_masks=False,
    ),
    # Empty MODEL.SOLO.MIN_MASK_AREAS: the official rule, the level strides.
    postprocessor=L(SOLOPostProcessor)(min_mask_areas=LEVEL_STRIDES),
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    num_classes=NUM_CLASSES,
    input_format="RGB",
    # MODEL.SOLO.CHANNELS_LAST_ON_CPU: set True for CPU runs (the shapes recipe does).
    channels_last=False,
)
