"""Datasets shipped with the project (the procedural ``shapes`` dataset) and the SOLO mapper."""
from .dataset_mapper import (
    DatasetError,
    SOLODatasetMapper,
    check_dataset_dicts,
    check_num_classes,
    check_record,
    load_dataset_dicts,
)
from .image_io import ImageReadError, read_image
from .shapes import ensure_shapes_dataset, register_shapes_datasets


def register_builtin_datasets():
    """Register ``shapes_train`` and ``shapes_val`` (generated on first use); idempotent."""
    register_shapes_datasets()


__all__ = [
    "DatasetError",
    "SOLODatasetMapper",
    "check_dataset_dicts",
    "check_num_classes",
    "check_record",
    "ImageReadError",
    "ensure_shapes_dataset",
    "load_dataset_dicts",
    "read_image",
    "register_builtin_datasets",
    "register_shapes_datasets",
]
