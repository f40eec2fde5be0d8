"""COCO evaluation of SOLO models: Detectron2's ``COCOEvaluator`` that sees every detection.

    build_solo_evaluator(cfg, dataset_name, output_folder=None) -> SOLOCOCOEvaluator

What it adds to ``COCOEvaluator`` (bbox and segm AP):

* COCO's ``maxDets`` is ``TEST.DETECTIONS_PER_IMAGE`` (COCO's default 100 would ignore the
  detections after the 100th of an image: 150 perfect ones would score 66.3 AP, not 100);
* 0 AP instead of NaN when the model predicts nothing for a dataset that has objects
  (precision is 0 at every recall, as COCO scores a category without detections; NaN breaks
  best-checkpoint selection and plots);
* ground truth without ``area``, ``iscrowd`` or ``bbox`` (hand-written or converted JSON files,
  on which pycocotools fails with ``KeyError: 'area'`` / ``'bbox'`` after the whole inference) is
  completed when the evaluator is built, as Detectron2's ``convert_to_coco_json`` derives them:
  ``area`` from the mask (else the box), ``iscrowd`` 0, ``bbox`` the mask's box; one warning
  names the file and the counts. Ground truth that cannot be completed (an object without
  ``segmentation`` for mask AP, an annotation without ``category_id``) is an error then, before
  inference;
* datasets without a JSON file are converted with their uncompressed RLE and array masks
  compressed first.
"""

import copy
import logging
import math
import numpy as np
import os
import pycocotools.mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import convert_to_coco_json
from detectron2.evaluation import COCOEvaluator

from .data import compress_rle, ensure_shapes_dataset, mask_areas

__all__ = ["SOLOCOCOEvaluator", "build_solo_evaluator", "complete_coco_annotations"]

logger = logging.getLogger(__name__)


def build_solo_evaluator(cfg, dataset_name: str, output_folder=None) -> "SOLOCOCOEvaluator":
    """The evaluator ``train_net.Trainer.build_evaluator`` returns.

    Args:
        cfg: the SOLO config (reads ``TEST.DETECTIONS_PER_IMAGE`` and ``OUTPUT_DIR``).
        dataset_name: a registered dataset with instance annotations.
        output_folder: where predictions and converted ground truth go; default
            ``OUTPUT_DIR/inference``.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    # COCOEvaluator reads the annotation file directly: make sure a built-in dataset exists.
    ensure_shapes_dataset(dataset_name)
    return SOLOCOCOEvaluator(
        dataset_name,
        tasks=("bbox", "segm"),
        output_dir=output_folder,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


class SOLOCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` with the additions listed in the module docstring; same arguments."""

    def __init__(self, dataset_name: str, tasks=None, distributed=True, output_dir=None, **kwargs):
        if MetadataCatalog.get(dataset_name).get("json_file") is None and output_dir is not None:
            _convert_to_coco_json(dataset_name, output_dir, kwargs.get("allow_cached_coco", True))
        try:
            super().__init__(dataset_name, tasks, distributed, output_dir, **kwargs)
        except KeyError as e:  # pycocotools indexing annotations without 'image_id'/'category_id'
            json_file = MetadataCatalog.get(dataset_name).get("json_file")
            raise ValueError(
                f"Ground truth '{json_file}' of dataset '{dataset_name}': an annotation has no "
                f"{e} (pycocotools needs 'id', 'image_id', 'category_id' in every annotation); "
                "add it to the file."
            ) from e
        if self._do_evaluation:
            # COCOEvaluator has no public hook for its ground truth: the COCO object it loaded
            # is completed in place (its index holds the same annotation dicts).
            if "segm" in self._tasks:
                _check_segmentations(self._coco_api, self._metadata.json_file)
            complete_coco_annotations(self._coco_api, self._metadata.json_file)

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        has_objects = self._do_evaluation and len(self._coco_api.getAnnIds()) > 0
        for task, metrics in (results or {}).items():
            # Detectron2 returns all-NaN metrics exactly when a task had no detection at all.
            if has_objects and metrics and all(math.isnan(v) for v in metrics.values()):
                logger.warning(f"No {task} predictions above the score threshold: AP is 0.")
                results[task] = {metric: 0.0 for metric in metrics}
        return results


def _check_segmentations(coco_api, source: str) -> None:
    """Mask AP needs a mask for every ground-truth object; pycocotools would fail on the first
    one without (``KeyError: 'segmentation'``) after the whole inference."""
    annotations = coco_api.dataset.get("annotations", [])
    missing = [ann.get("id") for ann in annotations if not ann.get("segmentation")]
    if missing:
        raise ValueError(
            f"Ground truth '{source}': {len(missing)} of {len(annotations)} annotations"
            f" have no 'segmentation' (ids {', '.join(map(str, missing[:5]))}"
            + (", ..." if len(missing) > 5 else "")
            + "), so mask AP cannot be computed. Add a polygon or RLE mask to each, or remove "
            "those annotations from the evaluation file."
        )


def complete_coco_annotations(coco_api, source: str = "") -> int:
    """Add ``area``, ``iscrowd`` and ``bbox`` where a ground-truth annotation lacks them, in place.

    As ``convert_to_coco_dict``: ``area`` is the polygons' area, the RLE mask's pixel count, or
    the box's ``w * h`` without a mask; ``iscrowd`` is 0; ``bbox`` is the mask's box
    (``pycocotools.mask.toBbox``, XYWH).

    Args:
        coco_api: a ``pycocotools.coco.COCO`` object with images and annotations.
        source: the JSON file, for the warning.

    Returns:
        The number of annotations completed.
    """
    annotations = coco_api.dataset.get("annotations", [])
    no_box = [ann for ann in annotations if "bbox" not in ann and ann.get("segmentation")]
    if no_box:
        boxes = mask_util.toBbox([coco_api.annToRLE(ann) for ann in no_box])
        for ann, box in zip(no_box, boxes.tolist()):
            ann["bbox"] = box
    no_crowd = [ann for ann in annotations if "iscrowd" not in ann]
    for ann in no_crowd:
        ann["iscrowd"] = 0
    no_area = [ann for ann in annotations if "area" not in ann]
    with_mask = [ann for ann in no_area if ann.get("segmentation")]
    # One vectorised pass over the dataset: a PolygonMasks per annotation would take minutes
    # on a COCO-sized file.
    for ann, area in zip(with_mask, mask_areas([ann["segmentation"] for ann in with_mask])):
        ann["area"] = float(area)
    for ann in no_area:
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    missing_area, missing_crowd, missing_box = len(no_area), len(no_crowd), len(no_box)
    if missing_area or missing_crowd or missing_box:
        logger.warning(
            f"Ground truth '{source}': {missing_area} annotations without 'area', "
            f"{missing_crowd} without 'iscrowd' and {missing_box} without 'bbox' (of "
            f"{len(annotations)}); derived as Detectron2's "
            "convert_to_coco_json does (area from the mask, else the box; iscrowd 0; bbox from "
            "the mask). Add them to the file to silence this warning."
        )
    return max(missing_area, missing_crowd, missing_box)


def _convert_to_coco_json(dataset_name: str, output_dir: str, allow_cached: bool) -> None:
    """What COCOEvaluator does for datasets without a JSON file, with uncompressed RLE and array
    masks compressed first (``convert_to_coco_dict`` computes areas with ``mask_util.area``,
    which rejects list counts, and refuses arrays)."""

    def compressed_dicts():
        dicts = copy.deepcopy(DatasetCatalog.get(dataset_name))
        for record in dicts:
            for anno in record.get("annotations", ()):
                if isinstance(anno.get("segmentation"), (dict, np.ndarray)):
                    anno["segmentation"] = compress_rle(anno["segmentation"])
        return dicts

    # convert_to_coco_json reads a registered dataset: register the compressed copy briefly.
    staging = f"{dataset_name}__solo_coco_conversion"
    DatasetCatalog.register(staging, compressed_dicts)
    metadata = MetadataCatalog.get(dataset_name).as_dict()
    metadata.pop("name", None)
    MetadataCatalog.get(staging).set(**metadata)
    cache_path = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
    try:
        convert_to_coco_json(staging, cache_path, allow_cached=allow_cached)
    finally:
        DatasetCatalog.remove(staging)
        MetadataCatalog.remove(staging)
    MetadataCatalog.get(dataset_name).set(json_file=cache_path)
