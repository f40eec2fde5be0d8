"""SOLO, Decoupled SOLO and SOLOv2 for Detectron2.

Importing ``solo`` registers the ``SOLO`` meta-architecture, its heads and the
``build_solo_resnet_fpn_backbone`` backbone; ``add_solo_config`` adds ``MODEL.SOLO``.
Layout (Detectron2's rooms): ``solo.modeling``, ``solo.data``, ``solo.engine``,
``solo.checkpoint``, ``solo.export``, ``solo.evaluation``, ``solo.solver``, ``solo.utils``.
"""

# First: .modeling imports detectron2.modeling and fvcore.nn, which print a torch.jit.script
# deprecation warning nobody using solo can act on (solo.utils.cli.KNOWN_WARNINGS).
from .utils.cli import filter_known_warnings

filter_known_warnings()

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
