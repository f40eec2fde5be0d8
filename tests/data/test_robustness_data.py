"""Robustness of the data path: normal edge cases train, bad data fails early and clearly.

Everything goes through :class:`solo.data.SOLODatasetMapper` (what ``train_net.Trainer`` uses)
and :func:`solo.data.load_dataset_dicts`, on a few tiny PNG files written per test.
"""

import json
import numpy as np
import cv2
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_train_loader,
)
from detectron2.data.datasets import register_coco_instances
from detectron2.modeling import build_model
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage

from helpers import capture_warnings, tiny_cfg
from solo.data import (
    DatasetError,
    SOLODatasetMapper,
    check_dataset_dicts,
    check_num_classes,
    load_dataset_dicts,
)

DATASET = "robust_train"


def mapper_cfg():
    """tiny_cfg with small, deterministic inputs: short side 64 (at most 96), no flip."""
    cfg = tiny_cfg("SOLOv2Head")
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.MASK_FORMAT = "bitmask"
    return cfg


def make_mapper(cfg=None, is_train=True):
    return SOLODatasetMapper(cfg or mapper_cfg(), is_train=is_train, dataset_name=DATASET)


def write_image(path, height=64, width=96, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = (height, width) if channels == 1 else (height, width, channels)
    cv2.imwrite(str(path), rng.integers(0, 256, shape, dtype=np.uint8))
    return str(path)


def box_polygon(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def annotation(x0, y0, x1, y1, category=0, iscrowd=0, **overrides):
    anno = {
        "bbox": [x0, y0, x1 - x0, y1 - y0],
        "bbox_mode": BoxMode.XYWH_ABS,
        "category_id": category,
        "segmentation": [box_polygon(x0, y0, x1, y1)],
        "iscrowd": iscrowd,
    }
    anno.update(overrides)
    return anno


def record(file_name, height=64, width=96, annotations=None, image_id=0):
    out = {"file_name": file_name, "height": height, "width": width, "image_id": image_id}
    if annotations is not None:
        out["annotations"] = annotations
    return out


def train_step(cfg, batch, model=None):
    torch.manual_seed(0)
    model = model or build_model(cfg)
    model.train()
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    return losses


@pytest.fixture
def registered():
    """Register datasets for one test and remove them (and their metadata) afterwards."""
    names = []

    def register(name, *args):
        register_coco_instances(name, {}, *args)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ----------------------------------------------------------------------------------------------
# Normal data that must just work
# ----------------------------------------------------------------------------------------------


def test_images_without_or_with_only_crowd_annotations_train_next_to_a_normal_image(tmp_path):
    image = write_image(tmp_path / "a.png")
    records = [
        record(image),  # no "annotations" key at all
        record(image, annotations=[]),
        record(
            image, annotations=[rle_annotation(64, 96, 10, 10, 40, 30, iscrowd=1)]
        ),  # dropped by the mapper
        record(image, annotations=[annotation(20, 10, 60, 50, category=2)]),
    ]
    mapper = make_mapper()
    batch = [mapper(r) for r in records]
    for mapped in batch[:3]:
        inst = mapped["instances"]
        assert len(inst) == 0 and inst.image_size == tuple(mapped["image"].shape[-2:])
        assert inst.gt_masks.tensor.shape == (0, *inst.image_size)
        assert inst.gt_classes.dtype == torch.int64
    assert len(batch[3]["instances"]) == 1

    model = build_model(mapper_cfg())
    losses = train_step(mapper_cfg(), batch, model)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0

    # A batch of nothing but empty images is all background: no mask loss, finite focal loss.
    losses = train_step(mapper_cfg(), batch[:3], model)
    assert losses["loss_mask"].item() == 0.0 and torch.isfinite(losses["loss_cate"])


def test_tiny_border_and_out_of_scale_range_instances_train(tmp_path):
    """A 1-pixel object whose mask vanishes when the 128x192 image is halved, an object touching
    three borders, one larger than the largest scale range and one smaller than the smallest:
    none may break the mapper, target assignment or the losses."""
    cfg = mapper_cfg()
    cfg.MODEL.SOLO.SCALE_RANGES = [[2, 8], [4, 16], [8, 24], [16, 32], [24, 40]]
    image = write_image(tmp_path / "big.png", height=128, width=192)
    annotations = [
        annotation(100, 60, 101, 61, category=0),  # 1 pixel
        annotation(0, 0, 30, 128, category=1),  # touches the left, top and bottom borders
        annotation(0, 0, 192, 128, category=2),  # the whole image: above every scale range
        annotation(50, 50, 52, 52, category=3),  # 2x2, 1 pixel after resizing: below every range
        annotation(120, 40, 150, 70, category=4),  # an ordinary object
    ]
    mapped = make_mapper(cfg)(record(image, 128, 192, annotations))
    inst = mapped["instances"]
    # Detectron2's mapper drops instances whose mask became empty (the model would skip them
    # too: see test_robustness_model); the others keep their masks.
    assert inst.image_size == (64, 96) and inst.gt_classes.tolist() == [1, 2, 3, 4]
    assert inst.gt_masks.tensor[0][:, 0].all(), "the border object still touches the border"
    assert inst.gt_masks.tensor[2].sum() == 1

    losses = train_step(cfg, [mapped])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0  # the ordinary object (and the border one) are positives


def rle_annotation(height, width, x0, y0, x1, y1, category=0, iscrowd=0):
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return annotation(x0, y0, x1, y1, category, iscrowd, segmentation=rle)


def test_cropping_that_removes_or_cuts_objects_keeps_consistent_instances(tmp_path):
    # RLE masks: Detectron2 crops polygons with shapely, an optional dependency.
    cfg = mapper_cfg()
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [24, 24]
    image = write_image(tmp_path / "crop.png")
    corners = [rle_annotation(64, 96, 0, 0, 20, 20), rle_annotation(64, 96, 70, 40, 96, 64, 1)]
    mapper = make_mapper(cfg)
    np.random.seed(0)
    batch = [mapper(record(image, annotations=corners)) for _ in range(6)]
    for mapped in batch:
        inst = mapped["instances"]
        # Boxes are recomputed from the cropped masks; objects cropped away are dropped.
        assert len(inst) <= 2 and inst.gt_masks.tensor.shape[1:] == inst.image_size
        assert (inst.gt_boxes.area() > 0).all()
    assert any(len(m["instances"]) == 0 for m in batch) and any(len(m["instances"]) for m in batch)
    losses = train_step(cfg, batch)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("channels", [1, 4])
def test_grayscale_and_rgba_files_are_read_as_three_channel_input_format(tmp_path, channels):
    image = write_image(tmp_path / f"c{channels}.png", channels=channels)
    for is_train in (True, False):
        mapped = make_mapper(is_train=is_train)(record(image, annotations=[]))
        assert mapped["image"].shape == (3, 64, 96)


# ----------------------------------------------------------------------------------------------
# Bad data that must fail early, naming the culprit
# ----------------------------------------------------------------------------------------------


def test_missing_image_file_names_the_file_and_the_dataset(tmp_path):
    missing = str(tmp_path / "missing.png")
    for is_train in (True, False):
        with pytest.raises(DatasetError, match="missing.png") as info:
            make_mapper(is_train=is_train)(record(missing, annotations=[]))
        assert DATASET in str(info.value)
        assert isinstance(info.value.__cause__, FileNotFoundError)


def test_unreadable_image_file_names_the_file_and_the_dataset(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG this is not an image")
    with pytest.raises(DatasetError, match=f"dataset '{DATASET}', image '.*broken.png'"):
        make_mapper()(record(str(broken), annotations=[]))


def test_missing_image_in_a_data_loader_worker_reaches_the_main_process_named(tmp_path):
    """Detectron2's MapDataset retries only on None: the error must surface, and PyTorch
    re-raises it from the worker with its message."""
    missing = record(str(tmp_path / "gone.png"), annotations=[annotation(5, 5, 30, 30)])
    loader = build_detection_train_loader(
        dataset=[missing], mapper=make_mapper(), total_batch_size=1, num_workers=1
    )
    with pytest.raises(DatasetError, match=f"dataset '{DATASET}', image '.*gone.png'"):
        next(iter(loader))


def test_image_size_different_from_its_record_is_reported_with_the_file(tmp_path):
    image = write_image(tmp_path / "a.png", height=64, width=96)
    with pytest.raises(DatasetError, match="a.png.*SizeMismatchError"):
        make_mapper()(record(image, height=50, width=96, annotations=[]))


BAD_ANNOTATIONS = {
    "category outside NUM_CLASSES": (
        annotation(5, 5, 30, 30, category=7),
        r"category_id=7, not a class index in \[0, 5\) \(MODEL.SOLO.NUM_CLASSES=5\)",
    ),
    "negative category": (annotation(5, 5, 30, 30, category=-1), "category_id=-1"),
    "polygon with 2 points": (
        annotation(5, 5, 30, 30, segmentation=[[5, 5, 30, 30]]),
        "polygon 0 of annotation 0 has 4 coordinates; a polygon needs at least 3",
    ),
    "flat polygon": (
        annotation(5, 5, 30, 30, segmentation=box_polygon(5, 5, 30, 30)),
        "expected a list of polygons",
    ),
    # labelme / shapely points: 4 pairs looked like "4 coordinates", 8 crashed in numpy.
    "polygon of 4 (x, y) pairs": (
        annotation(5, 5, 30, 30, segmentation=[[(5, 5), (30, 5), (30, 30), (5, 30)]]),
        r"polygon 0 of annotation 0 is a list of \(x, y\) points \(shape \[4, 2\]\)",
    ),
    "polygon of 8 (x, y) pairs": (
        annotation(5, 5, 30, 30, segmentation=[np.reshape(box_polygon(5, 5, 30, 30) * 2, (8, 2))]),
        r"is a list of \(x, y\) points \(shape \[8, 2\]\).*np.asarray\(points\).ravel",
    ),
    "segmentation missing": (
        {k: v for k, v in annotation(5, 5, 30, 30).items() if k != "segmentation"},
        "has no 'segmentation'",
    ),
    "segmentation empty": (annotation(5, 5, 30, 30, segmentation=[]), "has no 'segmentation'"),
    "bbox missing": (
        {k: v for k, v in annotation(5, 5, 30, 30).items() if k != "bbox"},
        "has no 'bbox'",
    ),
    # Crashed in numpy when the dataset's boxes were stacked, or were dropped as "empty boxes".
    "bbox of 3 numbers": (
        annotation(5, 5, 30, 30, bbox=[5, 5, 25]),
        r"bbox=\[5, 5, 25\] with bbox_mode=<BoxMode.XYWH_ABS: 1>; expected .* 4 finite numbers",
    ),
    "bbox with None": (annotation(5, 5, 30, 30, bbox=[5, 5, None, 25]), "4 finite numbers"),
    "bbox as a string": (annotation(5, 5, 30, 30, bbox="5,5,25,25"), "bbox='5,5,25,25'"),
    "unknown bbox_mode": (
        annotation(5, 5, 30, 30, bbox_mode=9),
        "bbox_mode=9; expected a detectron2.structures.BoxMode",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ANNOTATIONS))
def test_invalid_annotation_is_rejected_before_training_naming_file_dataset_and_fix(case):
    """The dataset check that load_dataset_dicts runs once per dataset."""
    anno, message = BAD_ANNOTATIONS[case]
    with pytest.raises(DatasetError, match=message) as info:
        check_dataset_dicts([record("bad.png", annotations=[anno])], DATASET, num_classes=5)
    assert f"dataset '{DATASET}', image 'bad.png'" in str(info.value)


@pytest.mark.parametrize(
    "case",
    ["category outside NUM_CLASSES", "negative category", "bbox missing", "segmentation missing"],
)
def test_mapper_given_an_unchecked_record_that_would_crash_explains_it_with_the_check(
    tmp_path, case
):
    """Records that bypass load_dataset_dicts: the mapper does not validate each sample, but a
    record that fails (or yields out-of-range classes or no masks) gets the check's message."""
    anno, message = BAD_ANNOTATIONS[case]
    image = write_image(tmp_path / "bad.png")
    good = annotation(40, 20, 60, 50)
    with pytest.raises(DatasetError, match=message) as info:
        make_mapper()(record(image, annotations=[anno, good]))
    assert f"dataset '{DATASET}', image '{image}'" in str(info.value)


def test_invalid_annotations_of_crowd_objects_are_ignored_like_the_objects(tmp_path):
    image = write_image(tmp_path / "a.png")
    crowd = annotation(5, 5, 30, 30, category=99, iscrowd=1, segmentation=[[1, 2]])
    mapped = make_mapper()(record(image, annotations=[crowd]))
    assert len(mapped["instances"]) == 0


def test_dataset_check_lists_the_first_problems_and_counts_the_rest():
    good = record("good.png", annotations=[annotation(5, 5, 30, 30)])
    bad = [
        record(f"bad{i}.png", annotations=[annotation(5, 5, 30, 30, category=9)]) for i in range(7)
    ]
    check_dataset_dicts([good], DATASET, num_classes=5)  # no error
    with pytest.raises(DatasetError) as info:
        check_dataset_dicts([good] + bad, DATASET, num_classes=5)
    message = str(info.value)
    assert f"7 of 8 images of dataset '{DATASET}' have invalid annotations" in message
    assert "bad0.png" in message and "bad4.png" in message and "bad5.png" not in message
    assert "... and 2 more images" in message


def test_training_mapper_requires_mask_on():
    cfg = mapper_cfg()
    cfg.MODEL.MASK_ON = False
    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        SOLODatasetMapper(cfg, is_train=True)


# COCO JSON files: what Detectron2's load_coco_json does, and the error we add on top.


def write_coco_json(tmp_path, annotations, categories=(1, 2)):
    image = write_image(tmp_path / "img.png")
    coco = {
        "images": [{"id": 1, "file_name": "img.png", "height": 64, "width": 96}],
        "annotations": [dict(a, id=i + 1, image_id=1) for i, a in enumerate(annotations)],
        "categories": [{"id": c, "name": f"class{c}"} for c in categories],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    return str(path), str(tmp_path), image


def coco_annotation(category_id=1, **overrides):
    anno = {
        "bbox": [10, 10, 20, 20],
        "category_id": category_id,
        "segmentation": [box_polygon(10, 10, 30, 30)],
        "iscrowd": 0,
        "area": 400,
    }
    anno.update(overrides)
    return anno


def test_coco_json_with_an_unknown_category_id_names_dataset_and_file(tmp_path, registered):
    json_file, root, _ = write_coco_json(tmp_path, [coco_annotation(category_id=9)])
    name = registered("robust_json_unknown_category", json_file, root)
    with pytest.raises(DatasetError, match="category_id=9") as info:
        load_dataset_dicts([name], num_classes=2, check_annotations=True)
    assert f"Could not load dataset '{name}' (annotation file '{json_file}')" in str(info.value)


def test_coco_json_polygons_with_fewer_than_3_points_are_dropped_with_a_warning(
    tmp_path, registered, caplog
):
    """Detectron2's load_coco_json drops them (and an object left without polygons), logging a
    warning; what remains trains normally."""
    degenerate = coco_annotation(segmentation=[[10, 10, 30, 30]])
    json_file, root, _ = write_coco_json(tmp_path, [coco_annotation(), degenerate])
    name = registered("robust_json_degenerate_polygon", json_file, root)
    with capture_warnings(caplog, "detectron2"):
        (loaded,) = load_dataset_dicts([name], num_classes=2, check_annotations=True)
    assert len(loaded["annotations"]) == 1
    assert "Filtered out 1 instances without valid segmentation" in caplog.text


def test_coco_json_object_without_segmentation_is_rejected_before_training(tmp_path, registered):
    json_file, root, image = write_coco_json(tmp_path, [coco_annotation(segmentation=None)])
    name = registered("robust_json_no_segmentation", json_file, root)
    with pytest.raises(DatasetError, match="has no 'segmentation'") as info:
        load_dataset_dicts([name], num_classes=2, check_annotations=True)
    assert f"dataset '{name}', image '{image}'" in str(info.value)


def test_num_classes_different_from_the_dataset_names_both_numbers_dataset_and_key(
    tmp_path, registered
):
    json_file, root, _ = write_coco_json(tmp_path, [coco_annotation()], categories=(1, 2))
    name = registered("robust_json_two_classes", json_file, root)
    message = f"MODEL.SOLO.NUM_CLASSES=5 but dataset '{name}' has 2 classes"
    # thing_classes only exists once load_coco_json ran: the check after loading catches it.
    check_num_classes(5, [name], "MODEL.SOLO.NUM_CLASSES")
    with pytest.raises(ValueError, match=message):
        load_dataset_dicts([name], num_classes=5)
    with pytest.raises(ValueError, match=message + r".*Set MODEL.SOLO.NUM_CLASSES 2"):
        check_num_classes(5, [name], "MODEL.SOLO.NUM_CLASSES")


def test_unregistered_dataset_is_named_with_the_registered_ones():
    """Detectron2's DatasetCatalog says it (with the registered names); we add nothing but the
    DatasetError type."""
    with pytest.raises(DatasetError, match="Dataset 'no_such_dataset' is not registered") as info:
        load_dataset_dicts(["no_such_dataset"])
    assert "Available datasets are" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Images as the reader sees them (solo.data.read_image), through the mapper
# ----------------------------------------------------------------------------------------------


def test_16_bit_microscopy_image_trains_with_its_object_visible(tmp_path):
    """Detectron2's reader turns this 12-bit-in-16-bit image into a flat 255 plane."""
    pixels = np.full((64, 96), 900, dtype=np.uint16)
    pixels[10:40, 20:60] = 3100
    path = str(tmp_path / "cells.png")
    cv2.imwrite(path, pixels)
    rec = record(path, annotations=[annotation(20, 10, 60, 40)])
    mapped = {is_train: make_mapper(is_train=is_train)(rec) for is_train in (True, False)}
    for result in mapped.values():
        image = result["image"]
        assert image.shape == (3, 64, 96)
        assert (image[:, 10:40, 20:60] == 255).all() and (image[:, :10] == 0).all()
    losses = train_step(mapper_cfg(), [mapped[True]])
    assert all(torch.isfinite(v) for v in losses.values())


def test_exif_rotated_photo_annotated_on_its_raw_pixels_keeps_masks_on_the_object(tmp_path):
    """A phone photo stored 96x64 with EXIF orientation 6 (shown 64x96), annotated by a tool that
    ignores EXIF (record: 64 high, 96 wide). Detectron2 rotates it and fails with a size mismatch
    that blames the annotation; here the raw pixels are used, so the mask covers the object."""
    from PIL import ExifTags, Image

    raw = np.zeros((64, 96, 3), dtype=np.uint8)
    raw[10:30, 50:90] = 255  # the object, where the annotation outlines it
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = str(tmp_path / "phone.png")
    Image.fromarray(raw).save(path, exif=exif)

    rec = record(path, height=64, width=96, annotations=[annotation(50, 10, 90, 30)])
    with pytest.raises(Exception, match="check the width/height in your annotation"):
        DatasetMapper(mapper_cfg(), is_train=True)(rec)
    mapped = make_mapper()(rec)
    mask = mapped["instances"].gt_masks.tensor[0]
    assert mapped["image"].shape == (3, 64, 96)
    assert (mapped["image"][:, mask] == 255).all()


def test_truncated_image_error_names_dataset_file_and_cause_not_the_annotations(tmp_path):
    """Even when the record also has a bad annotation, the reader's failure is what is said."""
    path = tmp_path / "cut.png"
    write_image(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError) as info:
        make_mapper()(record(str(path), annotations=[annotation(5, 5, 30, 30, category=9)]))
    message = str(info.value)
    assert f"dataset '{DATASET}', image '{path}'" in message
    assert "truncated or corrupt" in message and "annotation" not in message.lower()
