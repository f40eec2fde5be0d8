"""Datasets shipped with the project (the procedural ``shapes`` dataset), the dataset checks,
the image reader and the SOLO mapper."""

from .build import drop_unusable, load_dataset_dicts
from .dataset_mapper import SOLODatasetMapper
from .image_io import ImageReadError, read_image, stretch_to_8bit
from .masks import compress_rle, mask_areas
from .register import register_coco_format_datasets, register_datasets
from .panoptic_shapes import ensure_panoptic_shapes_dataset, register_panoptic_shapes_datasets
from .shapes import ensure_shapes_dataset, register_shapes_datasets
from .validation import DatasetError, check_dataset_dicts, check_num_classes, check_record


def register_builtin_datasets():
    """Register ``shapes_train``, ``shapes_val`` and their panoptic versions
    (``shapes_{train,val}_panoptic_separated``), generated on first use; idempotent."""
    register_shapes_datasets()
    register_panoptic_shapes_datasets()


__all__ = [
    "DatasetError",
    "ImageReadError",
    "SOLODatasetMapper",
    "check_dataset_dicts",
    "check_num_classes",
    "check_record",
    "compress_rle",
    "drop_unusable",
    "ensure_panoptic_shapes_dataset",
    "ensure_shapes_dataset",
    "load_dataset_dicts",
    "mask_areas",
    "read_image",
    "stretch_to_8bit",
    "register_builtin_datasets",
    "register_coco_format_datasets",
    "register_datasets",
    "register_panoptic_shapes_datasets",
    "register_shapes_datasets",
]
