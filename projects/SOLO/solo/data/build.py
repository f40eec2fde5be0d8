"""Loading dataset dicts for training and testing, once per dataset, before training starts.

Detectron2's own loader fails deep inside (``KeyError: 'segmentation'``, a crash on
``gt_masks`` many iterations later, ``TypeError: Expected bytes, got list`` for uncompressed RLE)
and drops data with at most a count. Here :func:`load_dataset_dicts` loads the datasets one by
one (errors name the dataset and its annotation file), compresses uncompressed RLE masks (as
``load_coco_json`` does for JSON files), validates every annotation
(:func:`solo.data.validation.check_dataset_dicts`) and removes what SOLO cannot train on, counted
per reason and reported once per dataset (:func:`drop_unusable`).
"""

import collections
import logging
import numpy as np
from typing import Dict, List, Optional, Sequence, Union
import torch

from detectron2.data import MetadataCatalog, get_detection_dataset_dicts
from detectron2.structures import BoxMode

from .masks import compress_rle, mask_areas
from .validation import DatasetError, check_dataset_dicts, check_num_classes

__all__ = ["drop_unusable", "load_dataset_dicts"]

logger = logging.getLogger(__name__)

# Share of skipped annotations or images above which the per-dataset report is a warning.
SKIPPED_WARNING_SHARE = 0.01


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
