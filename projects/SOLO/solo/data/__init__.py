"""Datasets shipped with the project (the procedural ``shapes`` dataset)."""
from .shapes import ensure_shapes_dataset, register_shapes_datasets


def register_builtin_datasets():
    """Register ``shapes_train`` and ``shapes_val`` (generated on first use); idempotent."""
    register_shapes_datasets()


__all__ = ["ensure_shapes_dataset", "register_builtin_datasets", "register_shapes_datasets"]
