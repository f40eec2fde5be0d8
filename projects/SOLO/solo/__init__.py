"""SOLO, Decoupled SOLO and SOLOv2 for Detectron2.

Importing ``solo`` registers the ``SOLO`` meta-architecture, its heads and the
``build_solo_resnet_fpn_backbone`` backbone; ``add_solo_config`` adds ``MODEL.SOLO``.
Layout (Detectron2's rooms): ``solo.modeling``, ``solo.data``, ``solo.engine``,
``solo.checkpoint``, ``solo.export``, ``solo.evaluation``, ``solo.solver``, ``solo.utils``.
"""

from .config import add_solo_config, check_solo_config, get_solo_cfg
from .modeling import SOLO, SOLO_HEAD_REGISTRY, build_solo_head

__all__ = [
    "add_solo_config",
    "check_solo_config",
    "get_solo_cfg",
    "SOLO",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
]
