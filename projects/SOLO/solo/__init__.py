"""SOLO, Decoupled SOLO and SOLOv2 for Detectron2.

Importing ``solo`` registers the ``SOLO`` meta-architecture, its heads and the
``build_solo_resnet_fpn_backbone`` backbone; ``add_solo_config`` adds ``MODEL.SOLO``.
"""

from . import backbone  # noqa: F401  (registers build_solo_resnet_fpn_backbone)
from .config import add_solo_config, check_solo_config, get_solo_cfg
from .heads import SOLO_HEAD_REGISTRY, build_solo_head
from .meta_arch import SOLO

__all__ = [
    "add_solo_config",
    "check_solo_config",
    "get_solo_cfg",
    "SOLO",
    "SOLO_HEAD_REGISTRY",
    "build_solo_head",
]
