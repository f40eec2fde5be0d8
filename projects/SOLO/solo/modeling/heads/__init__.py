"""SOLO instance heads; importing this package registers them in SOLO_HEAD_REGISTRY."""

from .base import HeadOutputs, SOLOHeadBase
from .decoupled_head import DecoupledSOLOHead, DecoupledSOLOLightHead
from .registry import SOLO_HEAD_REGISTRY, build_solo_head
from .solo_head import SOLOHead
from .solov2_head import SOLOv2Head

__all__ = [
    "HeadOutputs",
    "SOLOHeadBase",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "SOLOHead",
    "DecoupledSOLOHead",
    "DecoupledSOLOLightHead",
    "SOLOv2Head",
]
