"""The Predictor: Detectron2's ``DefaultPredictor`` (BGR in, ``INPUT.FORMAT`` conversion,
test-time resizing) with strict checkpoint loading, exported models as ``MODEL.WEIGHTS`` and
gray/BGRA/16-bit inputs; and the class names (metadata) its predictions are drawn with.
"""

import json
import logging
import numpy as np
from typing import List, Optional, Sequence
import torch

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.catalog import Metadata
from detectron2.engine import DefaultPredictor
from detectron2.utils.file_io import PathManager

from ..checkpoint import build_inference_model
from ..data import stretch_to_8bit
from ..export import ExportedModel, is_exported_model_file
from ..modeling import SOLOWithTTA
from .results import dataset_category_ids, instances_to_coco_results

logger = logging.getLogger(__name__)


class _NoResize(T.Augmentation):
    def get_transform(self, image):
        return T.NoOpTransform()


def as_bgr(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) BGR view of what a user may hand the predictor: (H, W) or (H, W, 1) gray
    (replicated), (H, W, 4) BGRA (alpha dropped), (H, W, 3) BGR (unchanged). Integer arrays of
    more than 8 bits (e.g. uint16 microscopy or depth) are scaled to 0..255 by their own range,
    as :func:`solo.data.read_image` reads such files; float arrays must already be in 0..255.

    Raises:
        ValueError: any other shape, or a float array outside 0..255, naming it and the fix.
    """
    if image.dtype != np.uint8 and np.issubdtype(image.dtype, np.integer):
        image = stretch_to_8bit(image, "the array given to Predictor", f"{image.dtype}")
    elif np.issubdtype(image.dtype, np.floating) and image.size:
        low, high = float(np.nanmin(image)), float(np.nanmax(image))
        if low < 0 or high > 255 or np.isnan(image).any():
            raise ValueError(
                f"Predictor got a {image.dtype} image with values {low:g}..{high:g}; expected "
                "0..255 (as uint8 images hold). Scale it, e.g. with "
                "solo.data.stretch_to_8bit(image, name, kind)."
            )
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 4:
        return image[:, :, :3]
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(
        f"Predictor expects an image array of shape (H, W, 3) BGR, (H, W) or (H, W, 1) gray, "
        f"or (H, W, 4) BGRA; got shape {image.shape}. Read files with solo.data.read_image."
    )


class Predictor(DefaultPredictor):
    """``DefaultPredictor`` for SOLO models: BGR in, ``INPUT.FORMAT`` conversion, test-time
    resizing, with these differences:

    * ``MODEL.WEIGHTS`` is loaded strictly (:class:`solo.checkpoint.SOLOCheckpointer`): an empty
      path, or a checkpoint that does not fit the config (another ``NUM_CLASSES``, a
      backbone-only file), raises ``CheckpointMismatchError`` naming the keys, where
      ``DefaultPredictor`` warns and predicts with partly random weights.
    * ``INPUT.MIN_SIZE_TEST == 0`` means "no resizing" (as in Detectron2's test data loader),
      where ``DefaultPredictor`` would resize to a 0-pixel short side.
    * Gray (H, W) / (H, W, 1) and BGRA (H, W, 4) arrays are accepted, and integer arrays of
      more than 8 bits are scaled by their own range (:func:`as_bgr`).
    * ``MODEL.WEIGHTS`` may name an exported model (``.onnx``, ``.ts``, ``.pt2`` from
      ``tools/export_model.py``): it runs through :class:`solo.export.ExportedModel`.

    Call it with a ``uint8`` image; it returns ``{"instances": Instances}`` at the input's size
    with ``pred_masks`` (bool), ``scores``, ``pred_classes`` and ``pred_boxes``, on
    ``MODEL.DEVICE``.
    """

    def __init__(self, cfg):  # DefaultPredictor.__init__, with the strict checkpointer
        self.cfg = cfg.clone()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        if is_exported_model_file(cfg.MODEL.WEIGHTS):
            if cfg.TEST.AUG.ENABLED:
                raise ValueError(
                    "TEST.AUG.ENABLED: test-time augmentation runs the eager model; an exported "
                    f"model ('{cfg.MODEL.WEIGHTS}') predicts one view. Give the checkpoint "
                    "(.pth) as MODEL.WEIGHTS, or set TEST.AUG.ENABLED False."
                )
            self.model = ExportedModel(cfg.MODEL.WEIGHTS, device=cfg.MODEL.DEVICE)
            self.model.check_config(cfg)
        else:
            self.model = build_inference_model(self.cfg)
            if cfg.TEST.AUG.ENABLED:  # TEST.AUG's sizes and flip, as train_net --eval-only
                self.model = SOLOWithTTA(cfg, self.model)
        if cfg.INPUT.MIN_SIZE_TEST == 0:
            self.aug = _NoResize()
        else:
            self.aug = T.ResizeShortestEdge(
                [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
            )
        self.input_format = cfg.INPUT.FORMAT
        assert self.input_format in ["RGB", "BGR"], self.input_format
        self._category_ids = None  # contiguous class -> dataset category id, on first use

    def __call__(self, original_image: np.ndarray):
        return super().__call__(as_bgr(original_image))

    def coco_results(self, instances, image_id: int, polygons: bool = False) -> List[dict]:
        """This predictor's ``instances`` (moved to the CPU) as COCO results
        (:func:`solo.engine.results.instances_to_coco_results`): RLE masks, XYWH boxes, scores,
        and category ids of ``DATASETS.TEST[0]``'s categories (its
        ``thing_dataset_id_to_contiguous_id`` or JSON file; 0-based indices without either).
        ``json.dump`` a list of them to get a file that ``COCO.loadRes`` reads."""
        if self._category_ids is None:
            metadata = getattr(self, "metadata", None) or Metadata(name="")
            self._category_ids = dataset_category_ids(metadata, self.cfg.MODEL.SOLO.NUM_CLASSES)
        return instances_to_coco_results(
            instances.to(torch.device("cpu")), image_id, self._category_ids, polygons
        )


def coco_json_class_names(json_file: str) -> list:
    """Category names of a COCO-format JSON in the order ``load_coco_json`` gives them
    contiguous ids (sorted by category id)."""
    with PathManager.open(json_file) as f:
        categories = json.load(f).get("categories")
    if not categories:
        raise ValueError(f"'{json_file}' has no 'categories': cannot take class names from it.")
    return [c["name"] for c in sorted(categories, key=lambda c: c["id"])]


def get_metadata(cfg, class_names: Optional[Sequence[str]] = None) -> Metadata:
    """The metadata to draw with: the first test dataset's, with class names taken from
    ``class_names`` (names, or one COCO JSON file), else its ``thing_classes``, else its
    ``json_file``'s categories. Without any, drawings show class indices ("0 97%"): said once.

    Raises:
        ValueError: the class-name count differs from ``MODEL.SOLO.NUM_CLASSES``.
    """
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    metadata = MetadataCatalog.get(name)
    names, source = metadata.get("thing_classes"), f"dataset '{name}'"
    if class_names:
        names, source = list(class_names), "--class-names"
        if len(names) == 1 and names[0].endswith(".json"):
            names, source = coco_json_class_names(names[0]), f"'{class_names[0]}'"
    elif names is None and metadata.get("json_file"):
        names, source = coco_json_class_names(metadata.json_file), f"'{metadata.json_file}'"
    if names is None:
        logger.warning(
            f"No class names for the model's classes (dataset '{name}' of DATASETS.TEST has no "
            "thing_classes): drawings show class indices. Pass --class-names with the names in "
            "training order, or the training COCO JSON file."
        )
        return metadata
    num_classes = cfg.MODEL.SOLO.NUM_CLASSES
    if len(names) != num_classes:
        raise ValueError(
            f"{source} gives {len(names)} class names but MODEL.SOLO.NUM_CLASSES={num_classes}."
        )
    return Metadata(**dict(metadata.as_dict(), name=name, thing_classes=list(names)))
