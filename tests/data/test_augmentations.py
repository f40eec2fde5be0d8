"""Every Detectron2 augmentation keeps SOLO's targets right: the boxes the targets use are the
transformed masks' own tight boxes (a rotation's enclosing box sent a disk to other FPN levels),
padding is never part of a mask, and box-driven crops see the boxes."""

import numpy as np
import random
import cv2
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances

from helpers import build, tiny_cfg
from solo.data import SOLODatasetMapper
from solo.modeling.targets import gather_ground_truth

SIZE = 128


def disk(cx, cy, radius, size=SIZE):
    yy, xx = np.mgrid[:size, :size]
    return ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= radius**2


def annotation(mask, polygon, category_id=0):
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    if polygon:
        contour = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        segmentation = [contour[-2][0].reshape(-1).astype(float).tolist()]
    else:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    return {
        "bbox": box,
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "segmentation": segmentation,
        "iscrowd": 0,
    }


@pytest.fixture
def record(tmp_path):
    """A 128 x 128 image with a disk and a rectangle; ``record(polygon=True)``."""
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), np.uint8))
    rectangle = np.zeros((SIZE, SIZE), bool)
    rectangle[20:50, 70:120] = True

    def make(polygon):
        annos = [annotation(disk(50, 70, 30), polygon), annotation(rectangle, polygon, 1)]
        return {"file_name": str(path), "height": SIZE, "width": SIZE, "annotations": annos}

    return make


def mapper(augmentations, polygon=True):
    cfg = tiny_cfg("SOLOv2Head")
    cfg.INPUT.MASK_FORMAT = "polygon" if polygon else "bitmask"
    return SOLODatasetMapper(cfg, is_train=True, augmentations=augmentations)


def tight_boxes(masks):
    """Tight XYXY boxes of bool masks, computed here independently (x2 exclusive)."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


AUGMENTATIONS = {
    "rotation_expand": lambda: [T.RandomRotation([30, 60], expand=True)],
    "rotation_same_size": lambda: [T.RandomRotation([-45, 45], expand=False)],
    "crop_relative_range": lambda: [T.RandomCrop("relative_range", (0.6, 0.6))],
    "crop_absolute": lambda: [T.RandomCrop("absolute", (90, 100))],
    "crop_category_area_unconstrained": lambda: [
        T.RandomCrop_CategoryAreaConstraint("relative", (0.7, 0.7), single_category_max_area=1.0)
    ],
    "extent": lambda: [T.RandomExtent(scale_range=(0.8, 1.3), shift_range=(0.3, 0.3))],
    "resize": lambda: [T.Resize((100, 150))],
    "resize_shortest_edge": lambda: [T.ResizeShortestEdge((80, 160), 200, "range")],
    "random_resize": lambda: [T.RandomResize([(96, 120), (150, 140)])],
    "flip_horizontal": lambda: [T.RandomFlip(prob=1.0)],
    "flip_vertical": lambda: [T.RandomFlip(prob=1.0, horizontal=False, vertical=True)],
    "resize_scale_fixed_size_crop": lambda: [
        T.ResizeScale(min_scale=0.3, max_scale=1.6, target_height=SIZE, target_width=SIZE),
        T.FixedSizeCrop((112, 112)),
    ],
    "min_iou_random_crop": lambda: [T.MinIoURandomCrop()],
    "photometric": lambda: [
        T.RandomApply(T.RandomBrightness(0.8, 1.2)),
        T.RandomContrast(0.8, 1.2),
        T.RandomSaturation(0.8, 1.2),
        T.RandomLighting(0.5),
    ],
}


@pytest.mark.parametrize("polygon", [True, False], ids=["polygon", "rle"])
@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_boxes_are_the_transformed_masks_tight_boxes(record, name, polygon):
    augment = mapper(AUGMENTATIONS[name](), polygon)
    for seed in range(4):
        np.random.seed(seed)
        random.seed(seed)
        instances = augment(record(polygon))["instances"]
        masks = instances.gt_masks
        if not isinstance(masks, BitMasks):
            masks = BitMasks.from_polygon_masks(masks, *instances.image_size)
        masks = masks.tensor.numpy()
        assert masks.any(axis=(1, 2)).all(), "an instance without mask pixels was kept"
        expected = tight_boxes(masks)
        # Polygon boxes are the polygons' real-valued extents; rasterised, within a pixel.
        atol = 1.0 if polygon else 0.0
        torch.testing.assert_close(instances.gt_boxes.tensor, expected, atol=atol, rtol=0)


def test_padding_of_fixed_size_crop_is_not_part_of_rle_masks(record):
    """FixedSizeCrop pads masks with seg_pad_value 255, which bool masks read as object."""
    np.random.seed(0)
    augment = mapper([T.ResizeScale(0.5, 0.5, SIZE, SIZE), T.FixedSizeCrop((112, 112))], False)
    instances = augment(record(False))["instances"]
    assert instances.image_size == (112, 112)
    masks = instances.gt_masks.tensor
    assert not masks[:, 64:, :].any() and not masks[:, :, 64:].any()  # the padded region
    torch.testing.assert_close(instances.gt_boxes.tensor, tight_boxes(masks.numpy()))


def test_min_iou_random_crop_crops_with_the_annotation_boxes(record):
    """Without boxes in the AugInput, Detectron2's MinIoURandomCrop silently does nothing."""
    augment = mapper([T.MinIoURandomCrop(min_ious=(0.1,), min_crop_size=0.3)])
    sizes = set()
    for seed in range(6):
        np.random.seed(seed)
        random.seed(seed)
        sizes.add(tuple(augment(record(True))["image"].shape[-2:]))
    assert sizes != {(SIZE, SIZE)}


def test_category_area_constrained_crop_without_semantic_labels_is_refused(record):
    constrained = T.RandomCrop_CategoryAreaConstraint("relative", (0.7, 0.7), 0.5)
    with pytest.raises(Exception, match="single_category_max_area=1.0"):
        mapper([constrained])(record(True))


def positive_levels(model, instances):
    gt = gather_ground_truth([instances], instances.image_size, torch.device("cpu"))
    return [int(t.positive_cells.sum()) for t in model.target_assigner(gt)]


def test_a_rotated_disk_is_assigned_to_the_levels_of_its_own_mask(tmp_path):
    """A disk's box does not change under rotation; the rotated box's enclosing box is 2x its
    area at 45 degrees, which moved the disk one FPN level up (detectron2#4292)."""
    model = build(tiny_cfg("SOLOv2Head"))  # scale ranges [1, 24] [12, 48] [24, 96] [48, 192] ...
    path = tmp_path / "black.png"
    cv2.imwrite(str(path), np.zeros((SIZE, SIZE, 3), np.uint8))
    annos = [annotation(disk(64, 64, 20), polygon=True)]
    record = {"file_name": str(path), "height": SIZE, "width": SIZE, "annotations": annos}
    rotated = mapper([T.RandomRotation([45, 45], expand=False)])(record)["instances"]
    box = rotated.gt_boxes.tensor[0]
    assert (box[2] - box[0]).item() == pytest.approx(40, abs=1.5)  # the disk's own box

    enclosing = Instances((SIZE, SIZE))
    enclosing.gt_masks = rotated.gt_masks
    enclosing.gt_classes = rotated.gt_classes
    rotation = T.RotationTransform(SIZE, SIZE, 45, expand=False)
    enclosing.gt_boxes = Boxes(rotation.apply_box(np.array([annos[0]["bbox"]])))
    assert (enclosing.gt_boxes.area() / rotated.gt_boxes.area()).item() == pytest.approx(2, 0.1)

    own, wrong = positive_levels(model, rotated), positive_levels(model, enclosing)
    assert [i for i, n in enumerate(own) if n] == [1, 2]  # sqrt(39 * 39) in [12, 48], [24, 96]
    assert [i for i, n in enumerate(wrong) if n] == [2, 3]
