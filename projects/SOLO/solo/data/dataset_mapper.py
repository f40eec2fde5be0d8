"""Loading and mapping dataset dicts for SOLO, with errors that name the culprit and the fix.

Detectron2's own loader and ``DatasetMapper`` fail deep inside (``KeyError: 'segmentation'``,
``FileNotFoundError`` of a path without the dataset, a model crash on ``gt_masks`` many
iterations later). Here:

* :func:`load_dataset_dicts` loads the datasets one by one and re-raises loading errors naming
  the dataset (and its annotation file when known);
* :func:`check_num_classes` compares ``MODEL.SOLO.NUM_CLASSES`` with the datasets' metadata;
* :func:`check_dataset_dicts` validates every annotation once, before training starts (unknown
  category, missing mask, polygon with fewer than 3 points, missing box);
* :class:`SOLODatasetMapper` validates each record again (for datasets that never went through
  the check), wraps image reading/transform errors with the file and dataset name, and always
  gives training records an ``instances`` field, empty for images without (non-crowd) objects.

Every error is a :class:`DatasetError`; data-loader workers forward its message unchanged.
"""
import importlib.util
import logging
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data import get_detection_dataset_dicts
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = [
    "DatasetError",
    "SOLODatasetMapper",
    "check_dataset_dicts",
    "check_num_classes",
    "check_record",
    "load_dataset_dicts",
]

logger = logging.getLogger(__name__)

# How many individual problems a dataset check lists before summarising the rest.
MAX_LISTED_PROBLEMS = 5


class DatasetError(RuntimeError):
    """Bad or unreadable data; the message names the dataset, the file and what to fix."""


def _describe(dataset_name: str, file_name: Optional[str] = None) -> str:
    where = f"dataset '{dataset_name}'" if dataset_name else "dataset <unknown>"
    return f"{where}, image '{file_name}'" if file_name is not None else where


# ----------------------------------------------------------------------------------------------
# Loading and dataset-level checks
# ----------------------------------------------------------------------------------------------


def load_dataset_dicts(
    names: Sequence[str],
    *,
    num_classes: Optional[int] = None,
    check_annotations: bool = False,
    use_masks: bool = True,
    **kwargs,
) -> Union[List[dict], torch.utils.data.Dataset]:
    """``get_detection_dataset_dicts`` one dataset at a time, so that every error names its dataset.

    After loading each dataset (which is when ``load_coco_json`` sets ``thing_classes``), its
    class count is compared with ``num_classes`` (if given, see :func:`check_num_classes`) and,
    with ``check_annotations``, all its annotations are validated (:func:`check_dataset_dicts`).
    Other ``kwargs`` go to :func:`detectron2.data.get_detection_dataset_dicts`;
    ``proposal_files``, if given, is a list aligned with ``names``. A dataset registered as a
    torch ``Dataset`` is returned as is (it cannot be combined with others, as in Detectron2).
    """
    proposal_files = kwargs.pop("proposal_files", None)
    dicts = []
    for i, name in enumerate(names):
        files = None if proposal_files is None else [proposal_files[i]]
        part = _load_one(name, proposal_files=files, **kwargs)
        if num_classes is not None:
            check_num_classes(num_classes, [name], "MODEL.SOLO.NUM_CLASSES")
        if isinstance(part, torch.utils.data.Dataset):
            if len(names) > 1:
                raise DatasetError(
                    f"Dataset '{name}' is a torch Dataset, which cannot be combined with other "
                    f"datasets ({list(names)}); train or test on it alone."
                )
            return part
        if check_annotations:
            check_dataset_dicts(part, name, num_classes, use_masks)
        dicts.extend(part)
    return dicts


def _load_one(name: str, **kwargs):
    if name not in DatasetCatalog.list():
        raise DatasetError(
            f"Dataset '{name}' is not registered. Registered datasets: "
            f"{sorted(DatasetCatalog.list())}. Register it (e.g. register_coco_instances) before "
            "building the trainer, or fix DATASETS.TRAIN / DATASETS.TEST."
        )
    try:
        return get_detection_dataset_dicts([name], **kwargs)
    except Exception as e:
        json_file = MetadataCatalog.get(name).get("json_file")
        source = f" (annotation file '{json_file}')" if json_file else ""
        raise DatasetError(
            f"Could not load dataset '{name}'{source}: {type(e).__name__}: {e}"
        ) from e


def check_num_classes(num_classes: int, dataset_names: Sequence[str], key: str) -> None:
    """``num_classes`` (the config value of ``key``) must equal every dataset's class count.

    Datasets whose metadata has no ``thing_classes`` (yet: ``load_coco_json`` sets it on first
    load) are skipped; call again after loading them.
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
    """Validate every annotation of ``dicts`` (see :func:`check_record`); raise one
    :class:`DatasetError` listing the first problems and how many records have one."""
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

    Crowd annotations (``iscrowd=1``) are skipped: the mapper drops them, as Detectron2 does.
    """
    where = _describe(dataset_name, record.get("file_name"))
    for i, anno in enumerate(record.get("annotations", [])):
        if anno.get("iscrowd", 0):
            continue
        _check_category(anno, i, num_classes, where)
        if "bbox" not in anno or "bbox_mode" not in anno:
            raise DatasetError(
                f"{where}: annotation {i} has no 'bbox'/'bbox_mode'; SOLO assigns instances to "
                "levels by their box size. Add the box (BoxMode.XYWH_ABS for COCO boxes)."
            )
        if use_masks:
            _check_segmentation(anno, i, where)


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


def _check_segmentation(anno: dict, index: int, where: str) -> None:
    segm = anno.get("segmentation")
    if segm is None or (isinstance(segm, (list, tuple)) and len(segm) == 0):
        raise DatasetError(
            f"{where}: annotation {index} has no 'segmentation'. SOLO learns from instance "
            "masks: add a polygon or RLE mask, mark the object iscrowd=1 to ignore it, or "
            "remove the annotation."
        )
    if isinstance(segm, dict):  # COCO RLE
        if "counts" not in segm or "size" not in segm:
            raise DatasetError(
                f"{where}: annotation {index} has an RLE 'segmentation' without 'counts'/'size'."
            )
        return
    if isinstance(segm, np.ndarray):  # binary mask
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
        if len(polygon) < 6 or len(polygon) % 2:
            raise DatasetError(
                f"{where}: polygon {j} of annotation {index} has {len(polygon)} coordinates; a "
                "polygon needs at least 3 (x, y) points (6 numbers, an even count). Remove the "
                "degenerate polygon (or the annotation if it has no other)."
            )


# ----------------------------------------------------------------------------------------------
# The mapper
# ----------------------------------------------------------------------------------------------


def _hint(error: Exception) -> str:
    if isinstance(error, (OSError, SizeMismatchError)):
        return (
            "Check that the image file exists, is a readable image, and has the height/width "
            "recorded for it in the dataset."
        )
    return "The image was read, but transforming it or its annotations failed."


class SOLODatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with clear errors and empty ``instances`` when needed.

    Args (besides ``DatasetMapper``'s):
        dataset_name: used in error messages (several train datasets: their names, joined).
        num_classes: valid category ids are ``[0, num_classes)``; ``None`` skips that check.
    """

    @configurable
    def __init__(self, is_train: bool, *, dataset_name: str = "", num_classes=None, **kwargs):
        super().__init__(is_train, **kwargs)
        self.dataset_name = dataset_name
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: Optional[str] = None):
        if is_train and not cfg.MODEL.MASK_ON:
            # Without it Detectron2's mapper drops every mask and the model fails much later.
            raise ValueError(
                "MODEL.MASK_ON is False, so the data loader would drop the instance masks SOLO "
                "trains on; set MODEL.MASK_ON True (every config in configs/ does)."
            )
        if is_train and cfg.INPUT.CROP.ENABLED and importlib.util.find_spec("shapely") is None:
            logger.warning(
                "INPUT.CROP.ENABLED: Detectron2 crops polygon annotations with shapely, which is "
                "not installed (pip install shapely); RLE and bitmask annotations work without."
            )
        ret = super().from_config(cfg, is_train)
        if dataset_name is None:
            dataset_name = ", ".join(cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST)
        ret["dataset_name"] = dataset_name
        ret["num_classes"] = cfg.MODEL.SOLO.NUM_CLASSES
        return ret

    def __call__(self, dataset_dict):
        file_name = dataset_dict.get("file_name")
        if self.is_train:
            check_record(dataset_dict, self.dataset_name, self.num_classes, self.use_instance_mask)
        try:
            result = super().__call__(dataset_dict)
        except Exception as e:
            # Exceptions propagate through Detectron2's MapDataset (only a None result is
            # retried with another image), so this message is what the user sees.
            raise DatasetError(
                f"{_describe(self.dataset_name, file_name)}: {type(e).__name__}: {e}. " + _hint(e)
            ) from e
        if self.is_train:
            result["instances"] = self._complete_instances(result)
        return result

    def _complete_instances(self, result: dict) -> Instances:
        """Images without (non-crowd) annotations get typed empty instances: the model trains
        on them as all-background images."""
        height, width = result["image"].shape[-2:]
        instances = result.get("instances")
        if instances is None:
            instances = Instances((height, width))
        if not instances.has("gt_boxes") or len(instances) == 0:
            instances.gt_boxes = Boxes(torch.zeros((0, 4)))
            instances.gt_classes = torch.zeros((0,), dtype=torch.int64)
            if self.use_instance_mask:
                instances.gt_masks = BitMasks(torch.zeros((0, height, width), dtype=torch.bool))
        return instances
