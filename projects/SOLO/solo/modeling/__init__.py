"""The SOLO model: meta-architecture, backbone, layers, heads, targets, losses, NMS and
post-processing. Importing it registers ``SOLO``, the heads and the SOLO backbone."""

from . import backbone  # noqa: F401  (registers build_solo_resnet_fpn_backbone)
from .heads import SOLO_HEAD_REGISTRY, build_solo_head
from .meta_arch import SOLO
from .paste import masks_to_boxes, paste_masks
from .postprocess import SOLOPostProcessor

__all__ = [
    "SOLO",
    "SOLO_HEAD_REGISTRY",
    "SOLOPostProcessor",
    "build_solo_head",
    "masks_to_boxes",
    "paste_masks",
]
