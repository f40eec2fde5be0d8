"""The SOLO model: meta-architecture, backbone, layers, heads, targets, losses, NMS and
post-processing. Importing it registers ``SOLO``, the heads and the SOLO backbone."""

from . import backbone  # noqa: F401  (registers build_solo_resnet_fpn_backbone)
from . import bottom_up  # noqa: F401  (registers the MobileNetV3 and RegNet FPN backbones)
from .heads import SOLO_HEAD_REGISTRY, build_solo_head
from .meta_arch import SOLO
from .panoptic import PanopticSOLOv2, SOLOv2SemSegHead
from .paste import masks_to_boxes, paste_masks
from .postprocess import SOLOPostProcessor
from .test_time_augmentation import SOLOWithTTA

__all__ = [
    "PanopticSOLOv2",
    "SOLO",
    "SOLO_HEAD_REGISTRY",
    "SOLOPostProcessor",
    "SOLOv2SemSegHead",
    "SOLOWithTTA",
    "build_solo_head",
    "masks_to_boxes",
    "paste_masks",
]
