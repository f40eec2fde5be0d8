"""Loading dataset dicts and validating them once per dataset, before training starts.

Detectron2's own loader fails deep inside (``KeyError: 'segmentation'``, a crash on
``gt_masks`` many iterations later, ``TypeError: Expected bytes, got list`` for uncompressed RLE)
and drops data with at most a count. Here:

* :func:`load_dataset_dicts` loads the datasets one by one (errors name the dataset and its
  annotation file), compresses uncompressed RLE masks (as ``load_coco_json`` does for JSON
  files), validates every annotation (:func:`check_dataset_dicts`) and removes what SOLO cannot
  train on, counted per reason and reported once per dataset (:func:`drop_unusable`);
* :func:`check_num_classes` compares ``MODEL.SOLO.NUM_CLASSES`` with the datasets' metadata.

Every error is a :class:`DatasetError`; data-loader workers forward its message unchanged.
"""

import collections
import logging
import math
import numpy as np
from typing import Dict, List, Optional, Sequence, Union
import pycocotools.mask as mask_util
import torch

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode

__all__ = [
    "DatasetError",
    "check_dataset_dicts",
    "check_num_classes",
    "check_record",
    "compress_rle",
    "drop_unusable",
    "load_dataset_dicts",
    "mask_areas",
]

logger = logging.getLogger(__name__)

# How many individual problems a dataset check lists before summarising the rest.
MAX_LISTED_PROBLEMS = 5
# Share of skipped annotations or images above which the per-dataset report is a warning.
SKIPPED_WARNING_SHARE = 0.01


class DatasetError(RuntimeError):
    """Bad or unreadable data; the message names the dataset, the file and what to fix."""


def describe(dataset_name: str, file_name: Optional[str] = None) -> str:
    """``dataset 'name', image 'file'``: how every message names its culprit."""
    where = f"dataset '{dataset_name}'" if dataset_name else "dataset <unknown>"
    return f"{where}, image '{file_name}'" if file_name is not None else where


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_dataset_dicts(
    names: Sequence[str],
    *,
    num_classes: Optional[int] = None,
    check_annotations: bool = False,
    use_masks: bool = True,
    filter_empty: bool = True,
    **kwargs,
) -> Union[List[dict], torch.utils.data.Dataset]:
    """``get_detection_dataset_dicts`` one dataset at a time, so that every error names its dataset.

    After loading each dataset (which is when ``load_coco_json`` sets ``thing_classes``), its
    class count is compared with ``num_classes`` (if given, see :func:`check_num_classes`) and
    uncompressed RLE masks are compressed (:func:`compress_rle`). With ``check_annotations``
    (training), all annotations are validated (:func:`check_dataset_dicts`) and the unusable ones
    removed (:func:`drop_unusable`, which also applies ``filter_empty``). Other ``kwargs`` go to
    :func:`detectron2.data.get_detection_dataset_dicts`; ``proposal_files``, if given, is a list
    aligned with ``names``. A dataset registered as a torch ``Dataset`` is returned as is (it
    cannot be combined with others, as in Detectron2).

    Raises:
        DatasetError: a dataset cannot be loaded, has invalid annotations, or nothing usable.
        ValueError: ``num_classes`` differs from a dataset's class count.
    """
    proposal_files = kwargs.pop("proposal_files", None)
    dicts = []
    for i, name in enumerate(names):
        files = None if proposal_files is None else [proposal_files[i]]
        # Unusable annotations and images are removed (and counted) below, not by Detectron2.
        empty_filter = filter_empty and not check_annotations
        try:
            part = get_detection_dataset_dicts(
                [name], filter_empty=empty_filter, proposal_files=files, **kwargs
            )
        except Exception as e:
            json_file = MetadataCatalog.get(name).get("json_file")
            source = f" (annotation file '{json_file}')" if json_file else ""
            raise DatasetError(
                f"Could not load dataset '{name}'{source}: {type(e).__name__}: {e}"
            ) from e
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
        for record in part:
            for anno in record.get("annotations", ()):
                if isinstance(anno.get("segmentation"), (dict, np.ndarray)):
                    anno["segmentation"] = compress_rle(anno["segmentation"])
        if check_annotations:
            part = drop_unusable(part, name, filter_empty, use_masks)
        dicts.extend(part)
    return dicts


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


# ----------------------------------------------------------------------------------------------
# Validation: what would crash the mapper or the model, or train on wrong targets
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# What SOLO does not train on: removed once per dataset, counted per reason
# ----------------------------------------------------------------------------------------------

CROWD = "crowd regions (iscrowd=1, ignored as in the official SOLO)"
EMPTY_BOX = "empty boxes (zero width or height)"
EMPTY_MASK = "empty masks (zero area)"


def drop_unusable(
    dicts: Sequence[dict], dataset_name: str, filter_empty: bool = True, use_masks: bool = True
) -> List[dict]:
    """Remove the annotations SOLO does not train on, and images left without any.

    Removed per annotation: crowd regions, boxes of zero width or height and masks of zero area
    (the mapper's ``filter_empty_instances`` would drop the last two at every iteration).
    Images left without annotations are removed with ``filter_empty``
    (``DATALOADER.FILTER_EMPTY_ANNOTATIONS``), else kept as all-background images. The counts
    per reason are logged once, at WARNING level when more than 1% of the annotations or images
    are removed, else at INFO. Records must have passed :func:`check_dataset_dicts`.

    Returns:
        The kept records (annotation lists are replaced, records are not copied otherwise).

    Raises:
        DatasetError: nothing is left; the message gives the counts per reason.
    """
    annotations = [anno for record in dicts for anno in record.get("annotations", ())]
    reasons = _unusable_reasons(annotations, use_masks)
    skipped = collections.Counter(r for r in reasons if r is not None)
    kept_records, empty_images, reason_of = [], 0, iter(reasons)
    for record in dicts:
        annos = record.get("annotations", ())
        usable = [anno for anno in annos if next(reason_of) is None]
        if len(usable) != len(annos):
            record["annotations"] = usable
        if not usable:
            empty_images += 1
            if filter_empty:
                continue
        kept_records.append(record)
    _report_skipped(dataset_name, skipped, len(annotations), empty_images, len(dicts), filter_empty)
    if not kept_records:
        raise DatasetError(
            f"Dataset '{dataset_name}' has no image with an annotation SOLO can train on: "
            f"{_summary(skipped, len(annotations), empty_images, len(dicts))}. Check its "
            "annotation file (masks, boxes, iscrowd), or set DATALOADER.FILTER_EMPTY_ANNOTATIONS "
            "False to train on its images as background."
        )
    return kept_records


def _unusable_reasons(annotations: Sequence[dict], use_masks: bool) -> List[Optional[str]]:
    """Why each annotation is not trained on (None: it is). Vectorised over the dataset: a
    BoxMode.convert per annotation (a torch round trip each) would dominate loading."""
    reasons = [CROWD if anno.get("iscrowd", 0) else None for anno in annotations]
    by_mode = collections.defaultdict(list)
    for i, anno in enumerate(annotations):
        if reasons[i] is None:
            by_mode[anno["bbox_mode"]].append(i)
    for mode, indices in by_mode.items():
        boxes = np.array([annotations[i]["bbox"] for i in indices], dtype=np.float64)
        x0, y0, x1, y1 = BoxMode.convert(boxes, mode, BoxMode.XYXY_ABS)[:, :4].T
        for i in np.asarray(indices)[~((x1 > x0) & (y1 > y0))]:
            reasons[i] = EMPTY_BOX
    if use_masks:
        indices = [i for i, reason in enumerate(reasons) if reason is None]
        areas = mask_areas([annotations[i]["segmentation"] for i in indices])
        for i in np.asarray(indices, dtype=np.int64)[areas <= 0]:
            reasons[i] = EMPTY_MASK
    return reasons


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


def _summary(skipped: Dict[str, int], num_annotations, empty_images, num_images) -> str:
    parts = [f"{n} of {num_annotations} annotations are {reason}" for reason, n in skipped.items()]
    parts.append(f"{empty_images} of {num_images} images have no usable annotation")
    summary = "; ".join(parts)
    if skipped.get(CROWD, 0) * 2 > num_annotations:
        # Crowd regions are rare in real data (1% of COCO); a majority is usually an export
        # setting, not the annotator's intent.
        summary += (
            " (most annotations are marked iscrowd=1: some annotation tools export every RLE "
            'mask that way; if they are single objects, set "iscrowd": 0 in the annotation '
            "file)"
        )
    return summary


def _report_skipped(name, skipped, num_annotations, empty_images, num_images, filter_empty):
    if not skipped and not empty_images:
        return
    noticeable = sum(skipped.values()) > SKIPPED_WARNING_SHARE * max(num_annotations, 1) or (
        empty_images > SKIPPED_WARNING_SHARE * max(num_images, 1)
    )
    what = "removed" if filter_empty else "kept as all-background images"
    logger.log(
        logging.WARNING if noticeable else logging.INFO,
        f"Dataset '{name}': {_summary(skipped, num_annotations, empty_images, num_images)} "
        f"(those images are {what}: DATALOADER.FILTER_EMPTY_ANNOTATIONS={filter_empty}). "
        "Removed annotations are not trained on.",
    )
