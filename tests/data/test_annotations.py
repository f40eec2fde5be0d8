"""Annotations users bring: uncompressed RLE accepted wherever a mask is read, and every
annotation or image the loader does not train on counted per reason, once per dataset."""

import copy
import logging
import numpy as np
import cv2
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from helpers import tiny_cfg
from solo.data import DatasetError, SOLODatasetMapper, load_dataset_dicts

LOGGER = "solo.data.build"


def mapper_cfg():
    cfg = tiny_cfg("SOLOv2Head")
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.MASK_FORMAT = "bitmask"
    return cfg


def uncompressed_rle(mask):
    """COCO's uncompressed RLE (what COCO writes for crowd regions and many tools for all
    masks): column-major run lengths starting with a run of zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], change])).tolist()
    return {"size": list(mask.shape), "counts": counts}


def ellipse_mask(height=64, width=96, cx=40, cy=30, rx=18, ry=12):
    yy, xx = np.mgrid[:height, :width]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def rle_record(path, mask, category=1, iscrowd=0, image_id=0):
    ys, xs = np.nonzero(mask)
    return {
        "file_name": path,
        "height": mask.shape[0],
        "width": mask.shape[1],
        "image_id": image_id,
        "annotations": [
            {
                "bbox": [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category,
                "segmentation": uncompressed_rle(mask),
                "iscrowd": iscrowd,
            }
        ],
    }


@pytest.fixture
def image_file(tmp_path):
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    return path


@pytest.fixture
def register():
    names = []

    def _register(name, dicts, num_classes=5):
        DatasetCatalog.register(name, lambda: copy.deepcopy(dicts))
        MetadataCatalog.get(name).set(thing_classes=[f"c{i}" for i in range(num_classes)])
        names.append(name)
        return name

    yield _register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ----------------------------------------------------------------------------------------------
# Uncompressed RLE
# ----------------------------------------------------------------------------------------------


def test_uncompressed_rle_helper_encodes_what_pycocotools_decodes():
    mask = ellipse_mask()
    rle = mask_util.frPyObjects(uncompressed_rle(mask), *mask.shape)
    np.testing.assert_array_equal(mask_util.decode(rle), mask)


def test_uncompressed_rle_in_hand_registered_dicts_trains_where_detectron2_fails(
    image_file, register
):
    mask = ellipse_mask()
    name = register("annotations_uncompressed_rle", [rle_record(image_file, mask)])
    cfg = mapper_cfg()
    with pytest.raises(TypeError, match="Expected bytes"):
        DatasetMapper(cfg, is_train=True)(DatasetCatalog.get(name)[0])

    (loaded,) = load_dataset_dicts([name], num_classes=5, check_annotations=True)
    assert isinstance(loaded["annotations"][0]["segmentation"]["counts"], bytes)
    mapper = SOLODatasetMapper(cfg, is_train=True, dataset_name=name)
    # Through the loader, and directly from the raw dicts (a loader built by hand).
    for source in (loaded, DatasetCatalog.get(name)[0]):
        instances = mapper(source)["instances"]
        assert instances.gt_classes.tolist() == [1]
        np.testing.assert_array_equal(instances.gt_masks.tensor[0].numpy(), mask)

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model([mapper(loaded)])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0


def test_array_and_rle_masks_train_under_polygon_mask_format_where_detectron2_fails(
    image_file, register
):
    """HxW array masks (which Detectron2's transforms refuse under any INPUT.MASK_FORMAT) and RLE
    masks next to a polygon, with Detectron2's default INPUT.MASK_FORMAT "polygon"."""
    ellipse = ellipse_mask()
    square = np.zeros((64, 96), dtype=bool)
    square[40:60, 60:90] = True
    polygon_only = rle_record(image_file, ellipse, image_id=1)
    polygon_only["annotations"][0]["segmentation"] = [[60, 40, 90, 40, 90, 60, 60, 60]]
    mixed = rle_record(image_file, ellipse, category=2)
    mixed["annotations"].append(
        dict(
            mixed["annotations"][0],
            category_id=3,
            segmentation=square.astype(np.uint8),
            bbox=[60, 40, 90, 60],
        )
    )
    cfg = mapper_cfg()
    cfg.INPUT.MASK_FORMAT = "polygon"
    for kind in ("rle", "array"):
        record = copy.deepcopy(mixed)
        # Compressed RLE (uncompressed would fail on its list counts first).
        record["annotations"][0]["segmentation"] = mask_util.frPyObjects(
            record["annotations"][0]["segmentation"], 64, 96
        )
        if kind == "rle":
            del record["annotations"][1]
        with pytest.raises(ValueError, match="mask_format=='polygon'|Cannot transform segm"):
            DatasetMapper(cfg, is_train=True)(record)

    name = register("annotations_array_masks", [mixed, polygon_only])
    loaded = load_dataset_dicts([name], num_classes=5, check_annotations=True)
    mapper = SOLODatasetMapper(cfg, is_train=True, dataset_name=name)
    raw = DatasetCatalog.get(name)
    # Through the loader (masks compressed once), and directly from the raw dicts.
    for record in (loaded[0], raw[0]):
        instances = mapper(record)["instances"]
        assert instances.gt_classes.tolist() == [2, 3]
        np.testing.assert_array_equal(instances.gt_masks.tensor.numpy(), [ellipse, square])
    polygon_instances = mapper(loaded[1])["instances"]
    assert type(polygon_instances.gt_masks).__name__ == "PolygonMasks"  # unchanged format

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model([mapper(loaded[0]), mapper(loaded[1])])
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0


def test_array_mask_of_another_size_than_its_image_is_rejected_naming_both(image_file, register):
    record = rle_record(image_file, ellipse_mask())
    record["annotations"][0]["segmentation"] = ellipse_mask().T.astype(np.uint8)
    name = register("annotations_transposed_array", [record])
    with pytest.raises(
        DatasetError,
        match=r"array mask of shape \[96, 64\] but the image is " r"recorded as \[64, 96\]",
    ):
        load_dataset_dicts([name], num_classes=5, check_annotations=True)


def test_uncompressed_rle_whose_counts_do_not_fill_its_size_is_rejected_before_training(
    image_file, register
):
    broken = rle_record(image_file, ellipse_mask())
    broken["annotations"][0]["segmentation"]["counts"].append(7)
    name = register("annotations_bad_rle_counts", [broken])
    with pytest.raises(DatasetError, match="counts summing to 6151 pixels, but its size"):
        load_dataset_dicts([name], num_classes=5, check_annotations=True)


def test_rle_of_another_size_than_its_image_is_rejected_naming_both_sizes(image_file, register):
    transposed = rle_record(image_file, ellipse_mask())
    transposed["height"], transposed["width"] = 96, 64
    name = register("annotations_rle_transposed", [transposed])
    with pytest.raises(DatasetError, match=r"RLE mask of size \[64, 96\].*recorded as \[96, 64\]"):
        load_dataset_dicts([name], num_classes=5, check_annotations=True)


# ----------------------------------------------------------------------------------------------
# What is not trained on: counted per reason, once per dataset
# ----------------------------------------------------------------------------------------------


def polygon_annotation(points, category=0, iscrowd=0, bbox=None):
    xs, ys = points[0::2], points[1::2]
    return {
        "bbox": bbox or [min(xs), min(ys), max(xs), max(ys)],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category,
        "segmentation": [list(points)],
        "iscrowd": iscrowd,
    }


SQUARE = [10, 10, 40, 10, 40, 40, 10, 40]
LINE = [10, 10, 20, 20, 30, 30]  # three collinear points: a polygon of zero area


def mixed_dataset(image_file, num_images=50):
    """50 images with one usable object each; extra: 3 crowd regions, 1 zero-area polygon, 1
    zero-width box, and 2 images that have nothing else (one crowd-only, one empty)."""
    dicts = []
    for i in range(num_images):
        dicts.append(
            {
                "file_name": image_file,
                "height": 64,
                "width": 96,
                "image_id": i,
                "annotations": [polygon_annotation(SQUARE, category=i % 5)],
            }
        )
    for i in range(3):
        dicts[i]["annotations"].append(polygon_annotation(SQUARE, iscrowd=1))
    dicts[3]["annotations"].append(polygon_annotation(LINE))
    dicts[4]["annotations"].append(polygon_annotation(SQUARE, bbox=[10, 10, 10, 40]))
    dicts.append(
        {
            "file_name": image_file,
            "height": 64,
            "width": 96,
            "image_id": 100,
            "annotations": [polygon_annotation(SQUARE, iscrowd=1)],
        }
    )
    dicts.append(
        {"file_name": image_file, "height": 64, "width": 96, "image_id": 101, "annotations": []}
    )
    return dicts


def test_skipped_annotations_and_images_are_counted_per_reason_in_one_warning(
    image_file, register, caplog
):
    name = register("annotations_mixed", mixed_dataset(image_file))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = load_dataset_dicts([name], num_classes=5, check_annotations=True)
    assert len(loaded) == 50
    assert all(len(r["annotations"]) == 1 for r in loaded)
    assert all(r["annotations"][0]["segmentation"] == [SQUARE] for r in loaded)
    (report,) = [r for r in caplog.records if r.name == LOGGER]
    assert report.levelno == logging.WARNING
    message = report.getMessage()
    assert f"Dataset '{name}'" in message
    assert "4 of 56 annotations are crowd regions" in message
    assert "1 of 56 annotations are empty masks (zero area)" in message
    assert "1 of 56 annotations are empty boxes" in message
    assert "2 of 52 images have no usable annotation" in message
    assert "are removed" in message


def test_images_left_without_annotations_stay_as_background_without_filter_empty(
    image_file, register, caplog
):
    name = register("annotations_mixed_kept", mixed_dataset(image_file))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        loaded = load_dataset_dicts(
            [name], num_classes=5, check_annotations=True, filter_empty=False
        )
    assert len(loaded) == 52 and [len(r["annotations"]) for r in loaded[-2:]] == [0, 0]
    assert "kept as all-background images" in caplog.text


def test_a_rare_skip_is_reported_at_info_level(image_file, register, caplog):
    dicts = mixed_dataset(image_file, num_images=150)[:150]  # without the 2 empty images
    for i in (0, 1, 3, 4):  # leaves 1 crowd region of 151 annotations: 0.7%
        dicts[i]["annotations"].pop()
    name = register("annotations_rare_skip", dicts)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        load_dataset_dicts([name], num_classes=5, check_annotations=True)
    (report,) = [r for r in caplog.records if r.name == LOGGER]
    assert report.levelno == logging.INFO
    assert "1 of 151 annotations are crowd regions" in report.getMessage()


def test_dataset_with_nothing_to_train_on_says_why_with_the_counts(image_file, register):
    dicts = [
        {
            "file_name": image_file,
            "height": 64,
            "width": 96,
            "image_id": 0,
            "annotations": [polygon_annotation(SQUARE, iscrowd=1), polygon_annotation(LINE)],
        },
        {"file_name": image_file, "height": 64, "width": 96, "image_id": 1, "annotations": []},
    ]
    name = register("annotations_nothing_usable", dicts)
    with pytest.raises(DatasetError) as info:
        load_dataset_dicts([name], num_classes=5, check_annotations=True)
    message = str(info.value)
    assert f"Dataset '{name}' has no image with an annotation SOLO can train on" in message
    assert "1 of 2 annotations are crowd regions" in message
    assert "1 of 2 annotations are empty masks" in message
    assert "2 of 2 images have no usable annotation" in message
    assert "DATALOADER.FILTER_EMPTY_ANNOTATIONS" in message
    assert "most annotations are marked iscrowd=1" not in message  # 1 of 2: not a majority


def test_a_majority_of_crowd_regions_is_reported_with_the_iscrowd_export_hint(
    image_file, register, caplog
):
    """Single objects exported as RLE with iscrowd=1 would all be ignored: say why."""
    mask = ellipse_mask()
    dicts = [rle_record(image_file, mask, iscrowd=1, image_id=i) for i in range(3)]
    dicts[0]["annotations"].append(polygon_annotation(SQUARE))
    name = register("annotations_mostly_crowd", dicts)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(load_dataset_dicts([name], num_classes=5, check_annotations=True)) == 1
    assert "3 of 4 annotations are crowd regions" in caplog.text
    assert 'if they are single objects, set "iscrowd": 0 in the annotation file' in caplog.text
    register("annotations_all_crowd", dicts[1:])
    with pytest.raises(DatasetError, match="most annotations are marked iscrowd=1"):
        load_dataset_dicts(["annotations_all_crowd"], num_classes=5, check_annotations=True)


def test_dataset_wide_mask_areas_equal_detectron2_polygon_and_pycocotools_rle_areas():
    from detectron2.structures import PolygonMasks

    from solo.data import mask_areas

    rng = np.random.default_rng(0)
    segms = []
    for k in range(30):
        parts = [rng.uniform(0, 60, 2 * rng.integers(3, 9)).tolist() for _ in range(k % 3 + 1)]
        segms.append(parts)
    segms += [[LINE], [SQUARE, LINE], uncompressed_rle(ellipse_mask()), ellipse_mask()]
    expected = [float(PolygonMasks([s]).area()[0]) for s in segms[:30]]
    expected += [0.0, 900.0, float(ellipse_mask().sum()), float(ellipse_mask().sum())]
    # Detectron2's PolygonMasks.area sums the parts' shoelace areas, as mask_areas does.
    np.testing.assert_allclose(mask_areas(segms), expected, rtol=1e-9)
