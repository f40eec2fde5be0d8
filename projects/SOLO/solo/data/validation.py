"""Validating dataset dicts: what would crash the mapper or the model, or train on wrong
targets, named with the dataset, image, annotation and the fix. Every error is a
:class:`DatasetError`; data-loader workers forward its message unchanged."""

import math
import numpy as np
from typing import Optional, Sequence

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

__all__ = ["DatasetError", "check_dataset_dicts", "check_num_classes", "check_record", "describe"]

# How many individual problems a dataset check lists before summarising the rest.
MAX_LISTED_PROBLEMS = 5


class DatasetError(RuntimeError):
    """Bad or unreadable data; the message names the dataset, the file and what to fix."""


def describe(dataset_name: str, file_name: Optional[str] = None) -> str:
    """``dataset 'name', image 'file'``: how every message names its culprit."""
    where = f"dataset '{dataset_name}'" if dataset_name else "dataset <unknown>"
    return f"{where}, image '{file_name}'" if file_name is not None else where


def check_num_classes(num_classes: int, dataset_names: Sequence[str], key: str) -> None:
    """``num_classes`` (the config value of ``key``) must equal every dataset's class count.

    Datasets whose metadata has no ``thing_classes`` (yet: ``load_coco_json`` sets it on first
    load) are skipped; call again after loading them.

    Raises:
        ValueError: naming both counts, the dataset and the key to change.
    """
    for name in dataset_names:
        if name not in MetadataCatalog.list():
            continue
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != num_classes:
            preview = list(classes[:8]) + (["..."] if len(classes) > 8 else [])
            raise ValueError(
                f"{key}={num_classes} but dataset '{name}' has {len(classes)} classes "
                f"(thing_classes={preview}). Set {key} {len(classes)}, or use a dataset with "
                f"{num_classes} classes."
            )


def check_dataset_dicts(
    dicts: Sequence[dict], dataset_name: str, num_classes: Optional[int], use_masks: bool = True
) -> None:
    """Validate every annotation of ``dicts`` (see :func:`check_record`).

    Raises:
        DatasetError: listing the first problems and how many records have one.
    """
    problems, bad_records = [], 0
    for record in dicts:
        try:
            check_record(record, dataset_name, num_classes, use_masks)
        except DatasetError as e:
            bad_records += 1
            if len(problems) < MAX_LISTED_PROBLEMS:
                problems.append(str(e))
    if bad_records:
        more = bad_records - len(problems)
        listing = "\n  ".join(problems + ([f"... and {more} more images"] if more else []))
        raise DatasetError(
            f"{bad_records} of {len(dicts)} images of dataset '{dataset_name}' have invalid "
            f"annotations:\n  {listing}"
        )


def check_record(
    record: dict, dataset_name: str, num_classes: Optional[int], use_masks: bool = True
) -> None:
    """Raise :class:`DatasetError` for the first annotation of ``record`` SOLO cannot train on.

    Crowd annotations (``iscrowd=1``) are not checked: they are not trained on (see
    :func:`drop_unusable`), as in Detectron2 and the official SOLO.
    """
    where = describe(dataset_name, record.get("file_name"))
    for i, anno in enumerate(record.get("annotations", [])):
        if anno.get("iscrowd", 0):
            continue
        _check_category(anno, i, num_classes, where)
        if "bbox" not in anno or "bbox_mode" not in anno:
            raise DatasetError(
                f"{where}: annotation {i} has no 'bbox'/'bbox_mode'; SOLO assigns instances to "
                "levels by their box size. Add the box (BoxMode.XYWH_ABS for COCO boxes)."
            )
        _check_box(anno, i, where)
        if use_masks:
            _check_segmentation(anno, i, where, (record.get("height"), record.get("width")))


_BOX_MODES = frozenset(BoxMode)  # an IntEnum: plain ints of valid modes are members too


def _check_box(anno: dict, index: int, where: str) -> None:
    # A malformed box would otherwise fail in numpy when the dataset's boxes are stacked, or
    # (None, NaN) be dropped as an "empty box". Plain Python per annotation (math.isfinite
    # raises TypeError for None and strings): this runs for every annotation of the dataset.
    mode, bbox = anno["bbox_mode"], anno["bbox"]
    size = 5 if mode == BoxMode.XYWHA_ABS else 4
    try:
        valid = len(bbox) == size and all(math.isfinite(v) for v in bbox)
    except TypeError:
        valid = False
    if mode not in _BOX_MODES or isinstance(bbox, str) or not valid:
        raise DatasetError(
            f"{where}: annotation {index} has bbox={bbox!r} with bbox_mode={mode!r}; "
            f"expected a detectron2.structures.BoxMode and {size} finite numbers "
            "([x, y, width, height] for BoxMode.XYWH_ABS, the COCO boxes). Fix the box."
        )


def _check_category(anno: dict, index: int, num_classes: Optional[int], where: str) -> None:
    category = anno.get("category_id")
    valid = isinstance(category, (int, np.integer)) and not isinstance(category, bool)
    if valid and (num_classes is None or 0 <= category < num_classes):
        return
    raise DatasetError(
        f"{where}: annotation {index} has category_id={category!r}, not a class index in "
        f"[0, {num_classes}) (MODEL.SOLO.NUM_CLASSES={num_classes}). Dataset dicts need "
        "contiguous 0-based ids (load_coco_json maps the JSON's ids through its 'categories'); "
        "fix the annotation, its dataset's categories, or MODEL.SOLO.NUM_CLASSES."
    )


def _check_segmentation(anno: dict, index: int, where: str, image_hw) -> None:
    segm = anno.get("segmentation")
    if segm is None or (isinstance(segm, (list, tuple)) and len(segm) == 0):
        raise DatasetError(
            f"{where}: annotation {index} has no 'segmentation'. SOLO learns from instance "
            "masks: add a polygon or RLE mask, mark the object iscrowd=1 to ignore it, or "
            "remove the annotation."
        )
    if isinstance(segm, dict):
        _check_rle(segm, index, where, image_hw)
        return
    if isinstance(segm, np.ndarray):  # binary mask
        if None not in image_hw and segm.shape != tuple(image_hw):
            raise DatasetError(
                f"{where}: annotation {index} has an array mask of shape {list(segm.shape)} but "
                f"the image is recorded as {list(image_hw)} (height, width); give an HxW mask "
                "of the image's size."
            )
        return
    if not isinstance(segm, (list, tuple)) or not all(
        isinstance(p, (list, tuple, np.ndarray)) for p in segm
    ):
        raise DatasetError(
            f"{where}: annotation {index} has a 'segmentation' of type {type(segm).__name__} "
            "holding a flat list or other values; expected a list of polygons "
            "[[x1, y1, x2, y2, ...], ...], a COCO RLE dict or an HxW numpy mask."
        )
    for j, polygon in enumerate(segm):
        if np.ndim(polygon) != 1:  # [(x1, y1), (x2, y2), ...] as labelme / shapely give them
            raise DatasetError(
                f"{where}: polygon {j} of annotation {index} is a list of (x, y) points (shape "
                f"{list(np.shape(polygon))}); Detectron2 polygons are flat lists [x1, y1, x2, "
                "y2, ...]. Flatten it, e.g. np.asarray(points).ravel().tolist()."
            )
        if len(polygon) < 6 or len(polygon) % 2:
            raise DatasetError(
                f"{where}: polygon {j} of annotation {index} has {len(polygon)} coordinates; a "
                "polygon needs at least 3 (x, y) points (6 numbers, an even count). Remove the "
                "degenerate polygon (or the annotation if it has no other)."
            )


def _check_rle(segm: dict, index: int, where: str, image_hw) -> None:
    if "counts" not in segm or "size" not in segm:
        raise DatasetError(
            f"{where}: annotation {index} has an RLE 'segmentation' without 'counts'/'size'."
        )
    size = tuple(segm["size"])
    if None not in image_hw and size != tuple(image_hw):
        raise DatasetError(
            f"{where}: annotation {index} has an RLE mask of size {list(size)} (height, width) "
            f"but the image is recorded as {list(image_hw)}; the mask belongs to another image "
            "or was encoded transposed (pycocotools expects a Fortran-ordered HxW array)."
        )
    counts = segm["counts"]
    if isinstance(counts, list) and sum(counts) != size[0] * size[1]:
        raise DatasetError(
            f"{where}: annotation {index} has uncompressed RLE counts summing to {sum(counts)} "
            f"pixels, but its size {list(size)} has {size[0] * size[1]}; re-encode the mask."
        )
