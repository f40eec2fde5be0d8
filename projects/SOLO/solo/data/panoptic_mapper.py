"""Panoptic data for ``PanopticSOLOv2``: the mapper that adds semantic targets, and the checks
that a config and its datasets agree on the task.

Datasets are Detectron2's "separated" panoptic datasets (``register_coco_panoptic_separated``,
``coco_2017_<split>_panoptic_separated``, the built-in ``shapes_<split>_panoptic_separated``):
instance annotations as for SOLO, plus per record ``sem_seg_file_name``, a uint8 PNG with 0 for
every thing pixel, 1..K for the stuff classes and ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` (255) for
unlabelled pixels.
"""

import logging
import numpy as np
import os
from typing import List, Optional, Sequence

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils

from .dataset_mapper import SOLODatasetMapper
from .validation import DatasetError

__all__ = [
    "PANOPTIC_META_ARCHITECTURES",
    "PanopticDatasetMapper",
    "build_solo_dataset_mapper",
    "check_dataset_tasks",
    "check_semantic_files",
    "is_panoptic_dataset",
]

logger = logging.getLogger(__name__)

#: Meta-architectures that train on and predict semantic (stuff) labels.
PANOPTIC_META_ARCHITECTURES = ("PanopticSOLOv2",)


class PanopticDatasetMapper(SOLODatasetMapper):
    """``SOLODatasetMapper`` that also gives training records ``sem_seg``: (H, W) int64 labels
    read from ``sem_seg_file_name``, resized and flipped with the image and the masks.

    A training record without ``sem_seg_file_name`` (an image without stuff annotations) gets an
    all-``ignore_value`` target: it trains the instance head only. At inference nothing semantic
    is read (the evaluator reads the ground truth itself).

    Raises (from ``__call__``, as ``DatasetError`` naming the dataset and image):
        FileNotFoundError: the semantic PNG is missing (its path is named).
        ValueError: its size differs from the image's, or it holds labels outside
            ``[0, num_sem_classes)`` and ``ignore_value``.
    """

    @configurable
    def __init__(self, is_train: bool, *, ignore_value: int = 255, num_sem_classes=None, **kwargs):
        super().__init__(is_train, **kwargs)
        self.ignore_value = ignore_value
        self.num_sem_classes = num_sem_classes

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: Optional[str] = None):
        ret = super().from_config(cfg, is_train, dataset_name)
        ret["ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        ret["num_sem_classes"] = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        return ret

    def _read_sem_seg(self, dataset_dict: dict) -> Optional[np.ndarray]:
        path = dataset_dict.pop("sem_seg_file_name", None)
        if not self.is_train:
            return None
        shape = (dataset_dict["height"], dataset_dict["width"])
        if path is None:
            return np.full(shape, self.ignore_value, dtype=np.uint8)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"semantic PNG '{path}' (sem_seg_file_name) does not exist")
        labels = utils.read_image(path, "L").squeeze(2)
        if labels.shape != shape:
            raise ValueError(
                f"semantic PNG '{path}' is {labels.shape[1]}x{labels.shape[0]} (WxH), the image "
                f"{shape[1]}x{shape[0]}"
            )
        values = np.unique(labels)
        bad = values[(values >= (self.num_sem_classes or 256)) & (values != self.ignore_value)]
        if len(bad):
            raise ValueError(
                f"semantic PNG '{path}' holds labels {bad.tolist()}, outside [0, "
                f"{self.num_sem_classes}) (MODEL.SEM_SEG_HEAD.NUM_CLASSES) and the ignore value "
                f"{self.ignore_value} (MODEL.SEM_SEG_HEAD.IGNORE_VALUE)"
            )
        return labels


def is_panoptic_dataset(name: str) -> bool:
    """Whether a registered dataset carries stuff annotations: Detectron2's separated panoptic
    metadata (``evaluator_type`` ``"coco_panoptic_seg"``, or a ``sem_seg_root``)."""
    metadata = MetadataCatalog.get(name)
    return (
        metadata.get("evaluator_type") == "coco_panoptic_seg"
        or metadata.get("sem_seg_root") is not None
    )


def check_dataset_tasks(
    cfg, names: Sequence[str], key: str, dicts: Optional[Sequence[dict]] = None
) -> None:
    """A panoptic config needs panoptic datasets, an instance config instance datasets.

    Args:
        cfg: the SOLO config (``MODEL.META_ARCHITECTURE``, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``).
        names: registered dataset names of ``DATASETS.<key>``.
        key: "TRAIN" or "TEST", for the message.
        dicts: the loaded records of ``names`` (training): with a panoptic config, their
            semantic PNGs are checked too (:func:`check_semantic_files`).

    Raises:
        DatasetError: naming the dataset, the key and the fix.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    panoptic = arch in PANOPTIC_META_ARCHITECTURES
    for name in names:
        if panoptic and not is_panoptic_dataset(name):
            raise DatasetError(
                f"DATASETS.{key} names '{name}', which has no stuff (semantic) annotations (its "
                "metadata has no sem_seg_root and evaluator_type "
                f"{MetadataCatalog.get(name).get('evaluator_type')!r}), but "
                f"MODEL.META_ARCHITECTURE={arch!r} trains and predicts stuff. Use a panoptic "
                "dataset registered like Detectron2's coco_2017_train_panoptic_separated (the "
                "built-in shapes_train_panoptic_separated / shapes_val_panoptic_separated), or "
                "MODEL.META_ARCHITECTURE 'SOLO' for instances only."
            )
        if not panoptic and is_panoptic_dataset(name):
            raise DatasetError(
                f"DATASETS.{key} names '{name}', a dataset with stuff annotations (evaluator_type "
                f"{MetadataCatalog.get(name).get('evaluator_type')!r}), but "
                f"MODEL.META_ARCHITECTURE={arch!r} predicts instances "
                "only: its stuff annotations would be ignored and its panoptic evaluation has "
                "no 'panoptic_seg' to read. Use MODEL.META_ARCHITECTURE 'PanopticSOLOv2' "
                "(configs/Panoptic/, configs/Shapes/PanopticSOLOv2_R18.yaml), or the instance "
                "version of the dataset (e.g. 'shapes_train', 'coco_2017_train')."
            )
        stuff_classes = MetadataCatalog.get(name).get("stuff_classes")
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if panoptic and stuff_classes is not None and len(stuff_classes) != num_classes:
            raise DatasetError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={num_classes}, but dataset '{name}' of "
                f"DATASETS.{key} has {len(stuff_classes)} semantic classes ('things' and the "
                f"stuff classes: {list(stuff_classes)}); set MODEL.SEM_SEG_HEAD.NUM_CLASSES "
                f"{len(stuff_classes)}."
            )
    if panoptic and dicts is not None:
        check_semantic_files(dicts, ", ".join(names))


def check_semantic_files(dicts: Sequence[dict], dataset_name: str) -> None:
    """Before training: every ``sem_seg_file_name`` must exist, and some record must have one.

    Records without the key (images without stuff annotations) are counted and logged; they
    train with an all-ignored semantic target.

    Raises:
        DatasetError: naming the dataset and the missing PNGs (up to 5, and their count).
    """
    paths = [record.get("sem_seg_file_name") for record in dicts]
    named = [p for p in paths if p is not None]
    if not named:
        raise DatasetError(
            f"Dataset '{dataset_name}': none of its {len(dicts)} records has a "
            "'sem_seg_file_name', so PanopticSOLOv2 has no semantic targets. Register it with "
            "detectron2.data.datasets.register_coco_panoptic_separated (semantic PNGs from "
            "Detectron2's datasets/prepare_panoptic_fpn.py)."
        )
    missing: List[str] = [p for p in named if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(f"'{p}'" for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(
            f"Dataset '{dataset_name}': {len(missing)} of {len(named)} semantic PNGs "
            f"(sem_seg_file_name) do not exist: {shown}. Generate them (for COCO: Detectron2's "
            "datasets/prepare_panoptic_fpn.py) or fix the dataset's sem_seg_root."
        )
    if len(named) < len(paths):
        logger.info(
            f"Dataset '{dataset_name}': {len(paths) - len(named)} of {len(paths)} images have no "
            "stuff annotation (no sem_seg_file_name); they train the instance head only."
        )


def build_solo_dataset_mapper(cfg, is_train: bool, dataset_name: Optional[str] = None):
    """The mapper of ``cfg``'s meta-architecture: ``PanopticDatasetMapper`` for panoptic ones,
    else ``SOLODatasetMapper``."""
    panoptic = cfg.MODEL.META_ARCHITECTURE in PANOPTIC_META_ARCHITECTURES
    mapper = PanopticDatasetMapper if panoptic else SOLODatasetMapper
    return mapper(cfg, is_train=is_train, dataset_name=dataset_name)
