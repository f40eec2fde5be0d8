"""SOLO instance heads; importing this package registers them in SOLO_HEAD_REGISTRY."""

from .base import CandidateMaskProbs, HeadOutputs, PredictionLayers, SOLOHeadBase
from .decoupled_head import DecoupledMaskOutputs, DecoupledSOLOHead, DecoupledSOLOLightHead
from .registry import SOLO_HEAD_REGISTRY, build_solo_head
from .solo_head import SOLOHead, SOLOMaskOutputs
from .solov2_head import SOLOv2Head, SOLOv2MaskOutputs

__all__ = [
    "CandidateMaskProbs",
    "HeadOutputs",
    "PredictionLayers",
    "SOLOHeadBase",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
    "SOLOHead",
    "SOLOMaskOutputs",
    "DecoupledSOLOHead",
    "DecoupledSOLOLightHead",
    "DecoupledMaskOutputs",
    "SOLOv2Head",
    "SOLOv2MaskOutputs",
]
