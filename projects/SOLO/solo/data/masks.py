"""Mask utilities shared by the loader, the mapper and the evaluator: RLE compression and areas
of any Detectron2 segmentation (polygons, RLE, HxW arrays)."""

import numpy as np
from typing import Sequence, Union
import pycocotools.mask as mask_util

__all__ = ["compress_rle", "mask_areas"]


def compress_rle(segm: Union[dict, np.ndarray]) -> dict:
    """A COCO RLE dict with compressed ``counts``: uncompressed RLE (``counts`` a list of run
    lengths, as COCO writes crowd regions) goes through ``pycocotools.mask.frPyObjects``, as
    Detectron2's ``load_coco_json`` does, and an HxW array mask (nonzero = object) through
    ``pycocotools.mask.encode``; any other dict is returned unchanged. Detectron2's and
    pycocotools' mask code reject list counts (``TypeError: Expected bytes``), and Detectron2's
    transforms and COCO conversion reject arrays ("Cannot transform segmentation of type")."""
    if isinstance(segm, np.ndarray):
        return mask_util.encode(np.asfortranarray(segm != 0, dtype=np.uint8))
    if isinstance(segm.get("counts"), list) and "size" in segm:
        height, width = segm["size"]
        return mask_util.frPyObjects(segm, height, width)
    return segm


def mask_areas(segms: Sequence) -> np.ndarray:
    """Area of each mask, as Detectron2's ``PolygonMasks.area`` and ``pycocotools.mask.area``
    give it, for a whole dataset at once (a structure per mask would dominate loading).

    Args:
        segms: per mask, a list of polygons (``[x1, y1, x2, y2, ...]`` each), a COCO RLE dict
            (compressed or not) or an HxW array.

    Returns:
        float64 array (len(segms),): polygons: the sum of their shoelace areas (a polygon of
        fewer than 3 points counts 0; a trailing odd coordinate is ignored); RLE and arrays: the
        pixel count.
    """
    areas = np.zeros(len(segms))
    rles = [k for k, segm in enumerate(segms) if isinstance(segm, dict)]
    if rles:
        areas[rles] = mask_util.area([compress_rle(segms[k]) for k in rles])
    for k, segm in enumerate(segms):
        if isinstance(segm, np.ndarray):
            areas[k] = segm.sum()
    polygons = [
        (k, np.asarray(p, dtype=np.float64)[: len(p) // 2 * 2])
        for k, segm in enumerate(segms)
        if isinstance(segm, (list, tuple))
        for p in segm
        if len(p) >= 6
    ]
    if polygons:
        owners = np.array([k for k, _ in polygons])
        lengths = np.array([len(p) // 2 for _, p in polygons])
        xy = np.concatenate([p for _, p in polygons]).reshape(-1, 2)
        starts = np.cumsum(lengths) - lengths
        following = np.arange(len(xy)) + 1
        following[starts + lengths - 1] = starts  # each polygon closes on its first point
        cross = xy[:, 0] * xy[following, 1] - xy[:, 1] * xy[following, 0]
        polygon_areas = np.abs(np.add.reduceat(cross, starts)) / 2
        areas += np.bincount(owners, weights=polygon_areas, minlength=len(segms))
    return areas
