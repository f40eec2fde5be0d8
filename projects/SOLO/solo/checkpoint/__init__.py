"""Loading and saving weights: the strict, atomic :class:`SOLOCheckpointer` and the converters of
published checkpoints (official SOLO, AdelaiDet, mmdetection, torchvision)."""

from .checkpointer import CheckpointMismatchError, SOLOCheckpointer, atomic_write
from .files import is_exported_model_file
from .inference import build_inference_model

__all__ = [
    "CheckpointMismatchError",
    "SOLOCheckpointer",
    "atomic_write",
    "build_inference_model",
    "is_exported_model_file",
]
