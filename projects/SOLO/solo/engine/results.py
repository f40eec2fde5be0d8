"""Prediction files: ``Instances`` as COCO results (the format of ``coco_instances_results.json``
that ``COCOEvaluator`` writes and ``pycocotools``' ``COCO.loadRes`` reads), with category ids
in the dataset's own id space, optional polygon contours, track ids for video frames, and image
ids taken from the dataset's JSON when the images are in it."""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data.catalog import Metadata
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.visualizer import GenericMask

__all__ = [
    "dataset_category_ids",
    "image_ids_by_file",
    "instances_to_coco_results",
    "write_json",
]

logger = logging.getLogger(__name__)


def _json_categories(json_file: str) -> List[dict]:
    with PathManager.open(json_file) as f:
        return json.load(f).get("categories") or []


def dataset_category_ids(metadata: Metadata, num_classes: int) -> List[int]:
    """Contiguous class index -> the dataset's category id, as ``COCOEvaluator`` maps results.

    From ``thing_dataset_id_to_contiguous_id`` (set when a COCO dataset is loaded), else from the
    categories of the dataset's ``json_file`` sorted by id (the order in which
    ``load_coco_json`` numbers them), else the indices themselves (0-based), said once.

    Raises:
        ValueError: the mapping covers another number of classes than the model predicts.
    """
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    if mapping:
        ids = [dataset_id for dataset_id, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
        source = "thing_dataset_id_to_contiguous_id"
    elif metadata.get("json_file"):
        ids = sorted(c["id"] for c in _json_categories(metadata.json_file))
        source = f"the categories of '{metadata.json_file}'"
    else:
        logger.warning(
            f"Dataset '{metadata.get('name')}' has no category ids (no "
            "thing_dataset_id_to_contiguous_id, no json_file): results use the model's 0-based "
            "class indices as category_id."
        )
        return list(range(num_classes))
    if len(ids) != num_classes:
        raise ValueError(
            f"{source} of dataset '{metadata.get('name')}' gives {len(ids)} categories but the "
            f"model predicts MODEL.SOLO.NUM_CLASSES={num_classes}."
        )
    return ids


def image_ids_by_file(json_file: str, image_root: str) -> Dict[str, int]:
    """``{key: image id}`` of a COCO JSON's images, keyed by the real path of
    ``image_root/file_name`` and by the base name where that is unique in the file."""
    with PathManager.open(json_file) as f:
        images = json.load(f).get("images") or []
    ids: Dict[str, int] = {}
    base_names: Dict[str, List[int]] = {}
    for image in images:
        ids[os.path.realpath(os.path.join(image_root, image["file_name"]))] = image["id"]
        base_names.setdefault(os.path.basename(image["file_name"]), []).append(image["id"])
    ids.update({name: found[0] for name, found in base_names.items() if len(found) == 1})
    return ids


def lookup_image_id(ids: Dict[str, int], path: str) -> Optional[int]:
    """The id of ``path`` in :func:`image_ids_by_file`'s map (real path first, then base name)."""
    found = ids.get(os.path.realpath(path))
    return found if found is not None else ids.get(os.path.basename(path))


def mask_polygons(mask) -> List[List[float]]:
    """Outer and hole contours of a bool (H, W) mask as COCO polygons ``[x0, y0, x1, ...]``
    (pixel-corner coordinates, Detectron2's ``GenericMask``), 2 decimals."""
    height, width = mask.shape
    polygons = GenericMask(mask.numpy().astype("uint8"), height, width).polygons
    return [[round(float(v), 2) for v in polygon] for polygon in polygons]


def instances_to_coco_results(
    instances: Instances,
    image_id: int,
    category_ids: Sequence[int],
    polygons: bool = False,
    extra: Optional[dict] = None,
) -> List[dict]:
    """COCO results of one image's CPU ``Instances`` (Detectron2's ``instances_to_coco_json``:
    RLE ``segmentation``, XYWH ``bbox`` in pixels, ``score``), with ``category_id`` mapped
    through ``category_ids`` (:func:`dataset_category_ids`).

    Args:
        polygons: also give each result ``"polygons"``, the mask's contours (:func:`mask_polygons`),
            for labelling tools; ``segmentation`` stays the exact RLE.
        extra: keys added to every result (``file_name``; ``track_id`` comes from ``instances.ID``).
    """
    results = instances_to_coco_json(instances, image_id)
    track_ids = instances.ID if instances.has("ID") else None
    for index, result in enumerate(results):
        result["category_id"] = int(category_ids[result["category_id"]])
        if polygons:
            result["polygons"] = mask_polygons(instances.pred_masks[index])
        if track_ids is not None:
            result["track_id"] = int(track_ids[index])
        result.update(extra or {})
    return results


def write_json(path: str, results: List[dict]) -> None:
    """Write ``results`` to ``path`` (directories created), through a temporary file so that
    an interrupted run leaves no truncated JSON."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f)
    os.replace(path + ".tmp", path)
