"""Evaluation of SOLO models by each dataset's own rules, chosen from its ``evaluator_type``.

    build_solo_evaluator(cfg, dataset_name, output_folder=None) -> DatasetEvaluator

As Detectron2's ``tools/train_net.py``, the metadata's ``evaluator_type`` picks the evaluator
(:data:`EVALUATORS`; a dataset registered without one is evaluated as COCO, converted by
``convert_to_coco_json``):

* ``"coco"``: :class:`SOLOCOCOEvaluator` (bbox and segm AP);
* ``"lvis"``: Detectron2's ``LVISEvaluator`` (``pip install lvis``): LVIS's federated AP with
  AP_r/AP_c/AP_f, ``TEST.DETECTIONS_PER_IMAGE`` detections per image (LVIS's protocol and
  ``configs/LVIS`` use 300), LVIS's 1-based category ids restored from the model's 0-based ones
  (the COCO evaluator would compare them as they are and score a perfect model 0 AP);
* ``"coco_panoptic_seg"`` (Detectron2's ``coco_2017_*_panoptic_separated``, the built-in
  ``shapes_*_panoptic_separated``): ``COCOPanopticEvaluator`` (PQ, PQ^Th, PQ^St; ``pip install
  panopticapi-lite``), ``SemSegEvaluator`` (mIoU) and :class:`SOLOCOCOEvaluator` (things);
* ``"cityscapes_instance"``: Detectron2's ``CityscapesInstanceEvaluator``
  (``pip install cityscapesscripts``): the official Cityscapes mask AP and AP50;
* any other type is refused, naming it and how to pass an evaluator.

What :class:`SOLOCOCOEvaluator` adds to ``COCOEvaluator``:

* COCO's ``maxDets`` is ``TEST.DETECTIONS_PER_IMAGE`` (COCO's default 100 would ignore the
  detections after the 100th of an image: 150 perfect ones would score 66.3 AP, not 100);
* 0 AP instead of NaN when the model predicts nothing for a dataset that has objects
  (precision is 0 at every recall, as COCO scores a category without detections; NaN breaks
  best-checkpoint selection and plots); the LVIS evaluator does the same;
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
import importlib.util
import json
import logging
import math
import numpy as np
import os
import tempfile
from contextlib import contextmanager
import pycocotools.mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import convert_to_coco_json
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    COCOEvaluator,
    DatasetEvaluator,
    LVISEvaluator,
)
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from detectron2.utils.file_io import PathManager

from .data import compress_rle, mask_areas
from .structures import CroppedMasks

__all__ = [
    "EVALUATORS",
    "SOLOCOCOEvaluator",
    "SOLOLVISEvaluator",
    "build_solo_evaluator",
    "complete_coco_annotations",
]

logger = logging.getLogger(__name__)

#: Detections per image of LVIS's protocol (``LVISEval``'s ``max_dets``, Detectron2's LVIS configs).
LVIS_DETECTIONS_PER_IMAGE = 300


def build_solo_evaluator(cfg, dataset_name: str, output_folder=None) -> DatasetEvaluator:
    """The evaluator ``Trainer.build_evaluator`` returns: :data:`EVALUATORS` entry of the
    dataset's ``evaluator_type`` (``"coco"`` when the metadata has none).

    Args:
        cfg: the SOLO config (reads ``TEST.DETECTIONS_PER_IMAGE``).
        dataset_name: a registered dataset with instance annotations; a built-in shapes split
            must be generated first (``solo.data.ensure_shapes_dataset``, which the trainer
            calls).
        output_folder: where predictions and converted ground truth go; default
            ``OUTPUT_DIR/inference``.

    Raises:
        ValueError: an ``evaluator_type`` without an entry (naming it and how to pass an
            evaluator), or ground truth the chosen evaluator cannot score.
        ImportError: the evaluator's package (``lvis``, ``cityscapesscripts``) is missing,
            naming the pip command.
    """
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
    build = EVALUATORS.get(evaluator_type)
    if build is None:
        raise ValueError(
            f"Dataset '{dataset_name}' has evaluator_type {evaluator_type!r}, for which SOLO has "
            f"no evaluator (it evaluates {sorted(EVALUATORS)}). Pass one yourself: "
            "Trainer.test(cfg, model, evaluators=[...]) or a Trainer subclass overriding "
            "build_evaluator; or add an entry to solo.evaluation.EVALUATORS, "
            "{type: build(cfg, dataset_name, output_folder) -> DatasetEvaluator}."
        )
    return build(cfg, dataset_name, output_folder)


def _coco(cfg, dataset_name: str, output_folder: str) -> "SOLOCOCOEvaluator":
    return SOLOCOCOEvaluator(
        dataset_name,
        tasks=("bbox", "segm"),
        output_dir=output_folder,
        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
    )


def _lvis(cfg, dataset_name: str, output_folder: str) -> DatasetEvaluator:
    _require("lvis", "lvis", dataset_name)
    max_dets = cfg.TEST.DETECTIONS_PER_IMAGE
    if max_dets < LVIS_DETECTIONS_PER_IMAGE:
        logger.warning(
            f"Dataset '{dataset_name}' is evaluated by LVIS's protocol, which scores "
            f"{LVIS_DETECTIONS_PER_IMAGE} detections per image; TEST.DETECTIONS_PER_IMAGE="
            f"{max_dets} gives fewer, and a lower AP than published LVIS results. Set "
            f"TEST.DETECTIONS_PER_IMAGE {LVIS_DETECTIONS_PER_IMAGE} (configs/LVIS do)."
        )
    _check_lvis_category_ids(dataset_name)
    return SOLOLVISEvaluator(
        dataset_name,
        tasks=("bbox", "segm"),
        output_dir=output_folder,
        max_dets_per_image=max_dets,
    )


class SOLOLVISEvaluator(LVISEvaluator):
    """Detectron2's ``LVISEvaluator`` (same arguments) whose evaluation runs with the ``np.float``
    alias that ``lvis`` 0.5.3 (its last release) uses and NumPy 1.24 removed, and that gives 0 AP
    instead of NaN when the model predicts nothing for ground truth with objects."""

    def evaluate(self):
        with numpy_float_alias_for_lvis():
            results = super().evaluate()
        return _zero_instead_of_nan(results, self._do_evaluation)


@contextmanager
def numpy_float_alias_for_lvis():
    """``np.float = float`` while it lasts, when NumPy lacks it (``lvis.LVISEval.accumulate``
    casts with ``np.float``: "module 'numpy' has no attribute 'float'" on NumPy >= 1.24)."""
    if hasattr(np, "float"):
        yield
        return
    np.float = float
    try:
        yield
    finally:
        del np.float


def _cityscapes_instance(cfg, dataset_name: str, output_folder: str) -> DatasetEvaluator:
    _require("cityscapesscripts", "cityscapes", dataset_name)
    from cityscapesscripts.helpers.labels import name2label

    metadata = MetadataCatalog.get(dataset_name)
    # CityscapesInstanceEvaluator writes each prediction under its class's Cityscapes label id,
    # found by name: an unknown name would fail in the middle of inference.
    unknown = [name for name in metadata.get("thing_classes", []) if name not in name2label]
    if unknown or metadata.get("gt_dir") is None:
        raise ValueError(
            f"Dataset '{dataset_name}' (evaluator_type 'cityscapes_instance') needs metadata "
            "'gt_dir' (the gtFine folder with *_gtFine_instanceIds.png) and thing_classes that "
            f"are Cityscapes label names; gt_dir={metadata.get('gt_dir')!r}, unknown class "
            f"names {unknown}. Register it as Detectron2's builtin Cityscapes datasets do "
            "(load_cityscapes_instances, evaluator_type='cityscapes_instance', gt_dir=...)."
        )
    return SOLOCityscapesInstanceEvaluator(dataset_name)


class SOLOCityscapesInstanceEvaluator(CityscapesInstanceEvaluator):
    """Detectron2's evaluator, run in a scratch directory: cityscapesscripts writes its
    ``matches.json`` into the current working directory (hard-coded), which would leave a file in
    the user's checkout after every evaluation."""

    def evaluate(self):
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory(prefix="cityscapes_eval_") as scratch:
            os.chdir(scratch)
            try:
                return super().evaluate()
            finally:
                os.chdir(cwd)


#: evaluator_type (dataset metadata) -> ``build(cfg, dataset_name, output_folder)``; one entry per
#: kind of ground truth SOLO's instances can be scored against.
def _coco_panoptic(cfg, dataset_name: str, output_folder: str) -> DatasetEvaluator:
    """As Detectron2's train_net.py for ``coco_panoptic_seg``: PQ (``COCOPanopticEvaluator``),
    mIoU (``SemSegEvaluator``) and instance AP of the things (:class:`SOLOCOCOEvaluator`)."""
    if importlib.util.find_spec("panopticapi") is None:
        raise ImportError(
            f"Evaluating panoptic dataset '{dataset_name}' needs panopticapi: "
            'pip install "numpy<2" panopticapi-lite   (or pip install -e ".[panoptic]" "numpy<2").'
        )
    from detectron2.evaluation import COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator

    return DatasetEvaluators(
        [
            COCOPanopticEvaluator(dataset_name, output_folder),
            SemSegEvaluator(dataset_name, output_dir=output_folder),
            _coco(cfg, dataset_name, output_folder),
        ]
    )


EVALUATORS = {
    "coco": _coco,
    "coco_panoptic_seg": _coco_panoptic,
    "lvis": _lvis,
    "cityscapes_instance": _cityscapes_instance,
}


def _require(module: str, extra: str, dataset_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"Evaluating dataset '{dataset_name}' needs the '{module}' package: "
            f'pip install "numpy<2" {module}   (or pip install -e ".[{extra}]" "numpy<2").'
        )


def _check_lvis_category_ids(dataset_name: str) -> None:
    """LVIS category ids must come back as they went in: Detectron2's ``load_lvis_json`` maps id
    ``k`` to class ``k - 1`` and ``LVISEvaluator`` adds 1 back, unless the metadata maps ids
    (``thing_dataset_id_to_contiguous_id``, which both then use). Ids that are not ``1..N`` have
    no such inverse: predictions would land on wrong categories and score near 0 AP."""
    metadata = MetadataCatalog.get(dataset_name)
    if metadata.get("thing_dataset_id_to_contiguous_id") is not None:
        return
    json_file = metadata.get("json_file")
    if json_file is None:
        raise ValueError(
            f"Dataset '{dataset_name}' (evaluator_type 'lvis') has no metadata 'json_file': "
            "LVISEvaluator reads the ground truth from it (register_lvis_instances sets it)."
        )
    with PathManager.open(json_file) as f:
        ids = sorted(c["id"] for c in json.load(f).get("categories", []))
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(
            f"LVIS ground truth '{json_file}' of dataset '{dataset_name}': category ids "
            f"{ids[:5]}{'...' if len(ids) > 5 else ''} are not 1..{len(ids)}, which "
            "load_lvis_json and LVISEvaluator assume (class = id - 1). Renumber the categories "
            "1..N in the file (images' neg_category_ids and not_exhaustive_category_ids too)."
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

    def process(self, inputs, outputs):
        """As ``COCOEvaluator.process``; ``pred_masks`` held as ``CroppedMasks``
        (``TEST.MASK_FORMAT cropped``) are encoded to RLE from their crops, without materialising
        the (N, H, W) masks."""
        for input, output in zip(inputs, outputs):
            instances = output.get("instances")
            if instances is None or not isinstance(instances.get("pred_masks"), CroppedMasks):
                super().process([input], [output])
                continue
            instances = instances.to(self._cpu_device)
            fields = {k: v for k, v in instances.get_fields().items() if k != "pred_masks"}
            results = instances_to_coco_json(
                Instances(instances.image_size, **fields), input["image_id"]
            )
            for result, rle in zip(results, instances.pred_masks.to_rle()):
                rle["counts"] = rle["counts"].decode("utf-8")
                result["segmentation"] = rle
            self._predictions.append({"image_id": input["image_id"], "instances": results})

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        has_objects = self._do_evaluation and len(self._coco_api.getAnnIds()) > 0
        return _zero_instead_of_nan(results, has_objects)


def _zero_instead_of_nan(results, has_objects: bool):
    """0 AP for a task without any detection on ground truth with objects (Detectron2's COCO and
    LVIS evaluators return all-NaN metrics exactly then)."""
    for task, metrics in (results or {}).items():
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
