"""The SOLO dataset mapper: Detectron2's ``DatasetMapper`` reading images with
:func:`~solo.data.image_io.read_image` and naming the culprit of every error.

Records are validated once per dataset when they are loaded (:mod:`solo.data.checks`), not here
at every sample of every epoch; the mapper only explains a failure (running the record check
when Detectron2's transforms fail) and always gives training records an ``instances`` field.

Whatever the augmentations (every ``detectron2.data.transforms`` augmentation is tested), the
targets stay right: ``gt_boxes`` are the transformed masks' tight boxes (SOLO's box only
describes its mask; a rotated box's enclosing box is up to 2x larger and moved objects to other
FPN levels), padding never becomes mask (``FixedSizeCrop`` pads masks with 255), box-driven
crops (``MinIoURandomCrop``) see the objects' boxes, and a crop that needs semantic labels
(``RandomCrop_CategoryAreaConstraint``) is refused instead of failing on ``None``.
"""

import copy
import importlib.util
import logging
import numpy as np
from typing import Optional
import torch

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks
from detectron2.structures.masks import polygons_to_bitmask

from .image_io import read_image
from .masks import compress_rle
from .validation import DatasetError, check_record, describe

__all__ = ["SOLODatasetMapper"]

logger = logging.getLogger(__name__)


class SOLODatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` with :func:`read_image`, clear errors and typed empty
    ``instances`` for training images without (non-crowd) objects.

    Args (besides ``DatasetMapper``'s):
        dataset_name: used in error messages (several train datasets: their names, joined).
        num_classes: valid category ids are ``[0, num_classes)``; ``None`` skips that check.

    Raises (from ``__call__``):
        DatasetError: naming the dataset and image, with the reader's or the check's message.
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
        where = describe(self.dataset_name, dataset_dict.get("file_name"))
        try:
            return self._map(copy.deepcopy(dataset_dict))
        except Exception as e:
            # Exceptions propagate through Detectron2's MapDataset (only a None result is
            # retried with another image), so this message is what the user sees.
            # Reading errors (OSError, SizeMismatchError) are the reader's own; other failures
            # of a training record are explained by its invalid annotation, if it has one.
            if self.is_train and not isinstance(e, (OSError, utils.SizeMismatchError)):
                try:
                    check_record(
                        dataset_dict, self.dataset_name, self.num_classes, self.use_instance_mask
                    )
                except DatasetError as problem:
                    raise problem from e
            raise DatasetError(f"{where}: {type(e).__name__}: {e}") from e

    def _map(self, dataset_dict: dict) -> dict:
        recorded = (dataset_dict.get("height"), dataset_dict.get("width"))
        image = read_image(
            dataset_dict["file_name"],
            format=self.image_format,
            expected_size=None if None in recorded else recorded,
        )
        utils.check_image_size(dataset_dict, image)  # records height/width when missing

        aug_input = T.AugInput(
            image,
            boxes=self._annotation_boxes(dataset_dict),
            sem_seg=self._read_sem_seg(dataset_dict),
        )
        if aug_input.sem_seg is None:
            self._check_no_semantic_augmentation()
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        if aug_input.sem_seg is not None:  # resized and flipped with the image and the masks
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("long"))
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image.shape[:2], transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        for anno in dataset_dict.get("annotations", ()):
            if isinstance(anno.get("segmentation"), (dict, np.ndarray)):
                anno["segmentation"] = compress_rle(anno["segmentation"])
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        dataset_dict["instances"] = self._complete_instances(dataset_dict)
        self._check_classes(dataset_dict)
        return dataset_dict

    def _annotation_boxes(self, dataset_dict: dict) -> Optional[np.ndarray]:
        """(N, 4) XYXY boxes of a training record's objects, for augmentations that choose their
        transform by the boxes (``T.MinIoURandomCrop`` is a no-op without them); None at test."""
        if not self.is_train or "annotations" not in dataset_dict:
            return None
        boxes = [
            BoxMode.convert(anno["bbox"], anno["bbox_mode"], BoxMode.XYXY_ABS)
            for anno in dataset_dict["annotations"]
            if not anno.get("iscrowd", 0) and "bbox" in anno
        ]
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)

    def _check_no_semantic_augmentation(self) -> None:
        needs_labels = [
            aug
            for aug in _leaves(self.augmentations)
            if isinstance(aug, T.RandomCrop_CategoryAreaConstraint)
            and aug.single_category_max_area < 1.0
        ]
        if needs_labels:
            raise ValueError(
                f"{needs_labels[0]} chooses its crop from semantic labels, which this mapper "
                "does not read (instance annotations only): use T.RandomCrop, or "
                "single_category_max_area=1.0 (the same crop without the area constraint)."
            )

    def _read_sem_seg(self, dataset_dict: dict) -> Optional[np.ndarray]:
        """(H, W) semantic labels to transform with the image, or None. Instance-only SOLO reads
        none; :class:`solo.data.panoptic_mapper.PanopticDatasetMapper` reads them."""
        return None

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        """``DatasetMapper._transform_annotations`` (Detectron2's hook for it), except that an
        image with RLE or array masks uses bitmasks under ``INPUT.MASK_FORMAT "polygon"``
        (Detectron2's default), where Detectron2 fails with "Failed to use
        mask_format=='polygon'"; the SOLO targets take either kind, per image."""
        annos = [anno for anno in dataset_dict.pop("annotations") if not anno.get("iscrowd", 0)]
        for anno in annos:
            if not self.use_instance_mask:
                anno.pop("segmentation", None)
            if not self.use_keypoint:
                anno.pop("keypoints", None)
        annos = [
            utils.transform_instance_annotations(
                anno, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            for anno in annos
        ]
        for anno in annos:
            if isinstance(anno.get("segmentation"), np.ndarray):
                # A decoded mask is 0/1, but padding transforms fill with their seg_pad_value
                # (FixedSizeCrop: 255), which BitMasks would read as object: only 1 is inside.
                anno["segmentation"] = anno["segmentation"] == 1
        mask_format = self.instance_mask_format
        if mask_format == "polygon" and any(
            not isinstance(anno.get("segmentation", []), list) for anno in annos
        ):
            mask_format = "bitmask"
        instances = utils.annotations_to_instances(annos, image_shape, mask_format=mask_format)
        if instances.has("gt_masks"):
            # SOLO's box only describes its mask (scale range and centre region of the targets).
            # A transformed box is not the transformed mask's box: a rotation gives the rotated
            # box's enclosing box (2x the mask's area at 45 degrees), a crop or an extent cuts
            # the box but not the object; always the mask's own tight box, then.
            instances.gt_boxes = mask_boxes(instances.gt_masks, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)

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
        elif self.use_instance_mask and not instances.has("gt_masks"):
            raise ValueError("annotations without 'segmentation'")  # explained by check_record
        return instances

    def _check_classes(self, result: dict) -> None:
        # The one per-sample check (vectorised): an out-of-range class would index past the
        # category grid deep in the loss. __call__ explains it with the record's check.
        classes = result["instances"].gt_classes
        if self.num_classes is not None and len(classes):
            if classes.min() < 0 or classes.max() >= self.num_classes:
                raise ValueError(f"category ids {classes.tolist()} outside [0, {self.num_classes})")


def _leaves(augmentation):
    """The augmentations inside ``augmentation`` (``AugmentationList``, ``RandomApply``)."""
    if isinstance(augmentation, T.AugmentationList):
        return [leaf for aug in augmentation.augs for leaf in _leaves(aug)]
    if isinstance(augmentation, T.RandomApply):
        return _leaves(augmentation.aug)
    return [augmentation]


def mask_boxes(masks, image_shape) -> Boxes:
    """Tight XYXY boxes of the masks' pixels inside the image (x2, y2 exclusive).

    ``BitMasks`` hold only such pixels. A polygon may reach outside the image (rotations and
    extents move it, only crops cut it): its box is then that of its rasterised mask.
    """
    boxes = masks.get_bounding_boxes()
    if isinstance(masks, PolygonMasks):
        height, width = image_shape
        t = boxes.tensor
        outside = (t[:, 0] < 0) | (t[:, 1] < 0) | (t[:, 2] > width) | (t[:, 3] > height)
        for i in outside.nonzero()[:, 0].tolist():
            raster = polygons_to_bitmask(masks.polygons[i], height, width)
            t[i] = BitMasks(torch.from_numpy(raster)[None]).get_bounding_boxes().tensor[0]
    return boxes
