"""Tests of the procedural "shapes" dataset (solo.data.shapes)."""

import dataclasses
import json
import multiprocessing
import numpy as np
import os
import sys
import time
import cv2
import pytest
import torch
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BitMasks, BoxMode, Instances

from solo.data import shapes, shapes_drawing
from solo.data.shapes import ShapesSplit

# Small images keep every generation in these tests well below a second.
SMALL = (64, 80)
MEDIUM = (96, 128)


def _json_path(root, split):
    return os.path.join(str(root), "annotations", f"instances_{split}.json")


def _load_json(root, split):
    with open(_json_path(root, split)) as f:
        return json.load(f)


def _read_images(root, split):
    """file name -> RGB uint8 image."""
    image_dir = os.path.join(str(root), split)
    return {
        name: cv2.imread(os.path.join(image_dir, name))[..., ::-1]
        for name in sorted(os.listdir(image_dir))
    }


def _file_bytes(root, split):
    image_dir = os.path.join(str(root), split)
    paths = [_json_path(root, split)] + sorted(
        os.path.join(image_dir, n) for n in os.listdir(image_dir)
    )
    contents = {}
    for path in paths:
        with open(path, "rb") as f:
            contents[os.path.relpath(path, str(root))] = f.read()
    return contents


@pytest.fixture(scope="module")
def medium_split(tmp_path_factory):
    """40 images: enough to contain empty and crowded images, generated once for this module."""
    root = tmp_path_factory.mktemp("shapes_medium")
    spec = ShapesSplit("medium", 40, seed=7, image_size=MEDIUM)
    shapes.generate_shapes_split(str(root), spec)
    return spec, _load_json(root, "medium"), _read_images(root, "medium")


@pytest.fixture
def catalog_names():
    """Names registered by a test; removed afterwards so tests stay independent."""
    before = set(DatasetCatalog.list())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def test_same_seed_writes_byte_identical_json_and_images(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        shapes.generate_shapes_split(str(tmp_path / name), ShapesSplit("s", 12, seed, SMALL))
    files_a, files_b = _file_bytes(tmp_path / "a", "s"), _file_bytes(tmp_path / "b", "s")
    files_c = _file_bytes(tmp_path / "c", "s")
    json_file = os.path.join("annotations", "instances_s.json")
    assert sorted(files_a) == [json_file] + [os.path.join("s", f"{i:06d}.png") for i in range(12)]
    assert files_a == files_b
    assert files_a[json_file] != files_c[json_file]
    assert sum(files_a[k] != files_c[k] for k in files_a) >= 10


def test_coco_structure(medium_split):
    spec, coco, images = medium_split
    height, width = MEDIUM
    assert coco["categories"] == shapes.SHAPES_CATEGORIES
    assert [c["name"] for c in coco["categories"]] == ["circle", "triangle", "rectangle"]
    assert coco["info"] == {
        "generator": "solo.data.shapes",
        "version": shapes.GENERATOR_VERSION,
        "split": "medium",
        "num_images": 40,
        "seed": 7,
        "image_size": [96, 128],
    }
    assert len(coco["images"]) == 40 == len(images)
    assert [im["id"] for im in coco["images"]] == list(range(1, 41))
    for im in coco["images"]:
        assert (im["height"], im["width"]) == (height, width)
        assert images[im["file_name"]].shape == (height, width, 3)
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))
    for ann in coco["annotations"]:
        assert ann["category_id"] in (1, 2, 3) and ann["iscrowd"] == 0
        assert ann["segmentation"]["size"] == [height, width]
        assert isinstance(ann["segmentation"]["counts"], str)  # compressed RLE, JSON-safe


def test_rle_masks_area_and_box_are_exactly_the_rasterised_visible_regions(medium_split):
    """Replays the generator's drawing with the split's seed: every annotation decodes to the
    pixels where its shape is visible in the label map, and area/bbox are those pixels'."""
    spec, coco, _ = medium_split
    rng = np.random.default_rng(spec.seed)
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id in range(1, spec.num_images + 1):
        _, labels, category_ids = shapes_drawing.draw_image(rng, *spec.image_size)
        anns = by_image.get(image_id, [])
        assert [a["category_id"] for a in anns] == category_ids
        for k, ann in enumerate(anns, start=1):
            mask = mask_util.decode(ann["segmentation"]).astype(bool)
            np.testing.assert_array_equal(mask, labels == k)
            ys, xs = np.nonzero(mask)
            assert ann["area"] == mask.sum() >= shapes_drawing.MIN_VISIBLE_AREA
            assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]


def test_masks_are_the_painted_pixels_of_one_shape_each(medium_split):
    """Checked against the PNG files: inside a mask every pixel has the shape's fill colour (up
    to the noise); the background pixels bordering it do not; masks do not overlap."""
    _, coco, images = medium_split
    file_names = {im["id"]: im["file_name"] for im in coco["images"]}
    masks_by_image = {}
    for ann in coco["annotations"]:
        masks_by_image.setdefault(ann["image_id"], []).append(
            mask_util.decode(ann["segmentation"]).astype(bool)
        )
    bordered = 0
    for image_id, masks in masks_by_image.items():
        image = images[file_names[image_id]].astype(np.float32)
        assert np.sum(masks, axis=0).max() == 1  # occlusion resolved: disjoint visible regions
        background = ~np.any(masks, axis=0)
        for mask in masks:
            fill = np.median(image[mask], axis=0)
            distance = np.linalg.norm(image - fill, axis=2)
            assert distance[mask].max() < 25  # noise sigma 3: 25 is > 8 sigma
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            ring &= background  # empty for a shape enclosed by a larger one
            assert np.all(distance[ring] > 60)  # fill colours are >= 120 from the background mean
            bordered += bool(ring.any())
    assert bordered >= 0.9 * len(coco["annotations"]) > 0


def test_rle_keeps_holes_left_by_occluding_shapes():
    labels = np.zeros((40, 50), dtype=np.uint8)
    labels[5:35, 5:45] = 1
    labels[15:25, 20:30] = 2  # a later shape occluding the middle of the first
    anns = shapes_drawing.annotate(labels, [3, 1], image_id=9, first_id=4)
    assert [(a["id"], a["image_id"], a["category_id"]) for a in anns] == [(4, 9, 3), (5, 9, 1)]
    first = mask_util.decode(anns[0]["segmentation"]).astype(bool)
    np.testing.assert_array_equal(first, labels == 1)
    assert not first[20, 25] and anns[0]["area"] == 30 * 40 - 100
    assert anns[0]["bbox"] == [5.0, 5.0, 40.0, 30.0] and anns[1]["bbox"] == [20.0, 15.0, 10.0, 10.0]
    assert shapes_drawing.annotate(labels * 0, [], image_id=1, first_id=1) == []


def test_image_and_instance_statistics(medium_split):
    _, coco, _ = medium_split
    counts = {im["id"]: 0 for im in coco["images"]}
    for ann in coco["annotations"]:
        counts[ann["image_id"]] += 1
    assert any(c == 0 for c in counts.values())
    assert sum(c >= 3 for c in counts.values()) >= 5
    assert max(counts.values()) <= shapes_drawing.MAX_OBJECTS
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3}
    areas = [a["area"] for a in coco["annotations"]]
    height, width = MEDIUM
    assert min(areas) < 200 and max(areas) > 0.15 * height * width  # several scales


def test_background_is_not_flat(medium_split):
    _, coco, images = medium_split
    empty_ids = {im["id"] for im in coco["images"]} - {a["image_id"] for a in coco["annotations"]}
    empty = next(im for im in coco["images"] if im["id"] in empty_ids)
    image = images[empty["file_name"]]
    assert image.std() > 0.5 and image.mean() > 100  # noisy, light background


# ----------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------


def _mtimes(root, split):
    image_dir = os.path.join(str(root), split)
    paths = [_json_path(root, split)] + [os.path.join(image_dir, n) for n in os.listdir(image_dir)]
    return {p: os.stat(p).st_mtime_ns for p in paths}


def test_ensure_reuses_valid_cache(tmp_path):
    spec = ShapesSplit("s", 4, seed=0, image_size=SMALL)
    assert shapes.ensure_shapes_split(str(tmp_path), spec) == _json_path(tmp_path, "s")
    before = _mtimes(tmp_path, "s")
    shapes.ensure_shapes_split(str(tmp_path), ShapesSplit("s", 4, seed=0, image_size=[64, 80]))
    assert _mtimes(tmp_path, "s") == before


@pytest.mark.parametrize(
    "changed",
    [dict(seed=1), dict(num_images=3), dict(image_size=(72, 80))],
    ids=["seed", "num_images", "image_size"],
)
def test_ensure_regenerates_on_parameter_change(tmp_path, changed):
    params = dict(split="s", num_images=5, image_size=SMALL, seed=0)
    shapes.ensure_shapes_split(str(tmp_path), ShapesSplit(**params))
    params.update(changed)
    shapes.ensure_shapes_split(str(tmp_path), ShapesSplit(**params))

    coco = _load_json(tmp_path, "s")
    assert coco["info"]["seed"] == params["seed"]
    assert coco["info"]["image_size"] == list(params["image_size"])
    images = _read_images(tmp_path, "s")
    assert sorted(images) == sorted(im["file_name"] for im in coco["images"])  # no stale files
    assert len(images) == params["num_images"]
    assert all(im.shape[:2] == tuple(params["image_size"]) for im in images.values())
    # Nothing but the split, its annotations and the lock file is left in the cache root.
    assert sorted(os.listdir(tmp_path)) == ["annotations", "s", "s.lock"]
    assert os.listdir(tmp_path / "annotations") == ["instances_s.json"]


def test_cache_written_by_an_older_generator_version_is_regenerated(tmp_path, monkeypatch):
    spec = ShapesSplit("s", 3, seed=0, image_size=SMALL)
    monkeypatch.setattr(shapes, "GENERATOR_VERSION", shapes.GENERATOR_VERSION - 1)
    shapes.ensure_shapes_split(str(tmp_path), spec)
    monkeypatch.undo()
    old = _load_json(tmp_path, "s")
    shapes.ensure_shapes_split(str(tmp_path), spec)
    new = _load_json(tmp_path, "s")
    assert old["info"]["version"] == shapes.GENERATOR_VERSION - 1
    assert new["info"]["version"] == shapes.GENERATOR_VERSION


def test_ensure_regenerates_missing_images_and_interrupted_splits(tmp_path):
    spec = ShapesSplit("s", 3, seed=0, image_size=SMALL)
    shapes.ensure_shapes_split(str(tmp_path), spec)
    expected = _file_bytes(tmp_path, "s")
    image = tmp_path / "s" / "000001.png"
    image.unlink()
    shapes.ensure_shapes_split(str(tmp_path), spec)
    assert _file_bytes(tmp_path, "s") == expected
    # An interrupted generation leaves images but no JSON (the commit marker).
    os.remove(_json_path(tmp_path, "s"))
    shapes.ensure_shapes_split(str(tmp_path), spec)
    assert _file_bytes(tmp_path, "s") == expected


def _ensure_and_report(root, log_path, queue):
    # Record generations in this process by wrapping the (module-global) generator; the pause
    # makes the processes overlap, so that without the lock each of them would generate.
    generate = shapes.generate_shapes_split

    def logged(*args, **kwargs):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return generate(*args, **kwargs)

    shapes.generate_shapes_split = logged
    queue.put(shapes.ensure_shapes_split(root, ShapesSplit("s", 6, seed=0, image_size=SMALL)))


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork to start processes quickly")
def test_concurrent_ensure_generates_once_under_the_file_lock(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue, log_path = ctx.Queue(), str(tmp_path / "generations.log")
    root = str(tmp_path / "cache")
    procs = [ctx.Process(target=_ensure_and_report, args=(root, log_path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [_json_path(root, "s")] * 3
    with open(log_path) as f:
        assert len(f.read().split()) == 1
    assert len(_load_json(root, "s")["images"]) == 6
    assert os.path.isfile(os.path.join(root, "s.lock"))


# ----------------------------------------------------------------------------------------------
# Detectron2 registration and evaluation
# ----------------------------------------------------------------------------------------------


def test_registered_dataset_loads_lazily(tmp_path, catalog_names):
    name = "shapes_test_tiny"
    splits = {name: dict(num_images=8, seed=3, image_size=MEDIUM)}
    assert shapes.register_shapes_datasets(str(tmp_path), splits=splits) == [name]
    assert os.listdir(tmp_path) == []  # nothing generated yet

    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == ["circle", "triangle", "rectangle"]
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert metadata.evaluator_type == "coco"
    assert metadata.json_file == _json_path(tmp_path, "test_tiny")
    assert metadata.image_root == os.path.join(str(tmp_path), "test_tiny")
    assert metadata.shapes_split == ShapesSplit("test_tiny", 8, seed=3, image_size=MEDIUM)

    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 8
    assert sum(len(d["annotations"]) for d in dicts) > 0
    for d in dicts:
        assert (d["height"], d["width"]) == MEDIUM
        image = cv2.imread(d["file_name"])
        assert image is not None and image.shape == (*MEDIUM, 3)
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert ann["category_id"] in (0, 1, 2)  # mapped to contiguous ids
            assert mask_util.decode(ann["segmentation"]).shape == MEDIUM

    # A second load reuses the cache.
    before = _mtimes(tmp_path, "test_tiny")
    assert len(DatasetCatalog.get(name)) == 8
    assert _mtimes(tmp_path, "test_tiny") == before


def test_coco_evaluator_scores_the_ground_truth_masks_as_perfect(tmp_path, catalog_names):
    """The RLE annotations go through COCOEvaluator (which reads the JSON itself) unchanged."""
    name = "shapes_test_gt_eval"
    shapes.register_shapes_datasets(
        str(tmp_path), splits={name: dict(num_images=6, seed=2, image_size=SMALL)}
    )
    assert shapes.ensure_shapes_dataset(name) is True
    evaluator = COCOEvaluator(name, output_dir=None)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        instances = Instances((d["height"], d["width"]))
        masks = [mask_util.decode(a["segmentation"]) for a in d["annotations"]]
        masks = torch.as_tensor(np.array(masks, dtype=bool).reshape(-1, *SMALL))
        instances.pred_masks = masks
        instances.pred_boxes = BitMasks(masks).get_bounding_boxes()
        instances.scores = torch.ones(len(masks))
        instances.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)


def test_register_twice_and_defaults(tmp_path, catalog_names):
    names = shapes.register_shapes_datasets(str(tmp_path))
    assert names == ["shapes_train", "shapes_val"]
    assert shapes.register_shapes_datasets(str(tmp_path)) == names
    assert all(n in DatasetCatalog.list() for n in names)
    assert MetadataCatalog.get("shapes_val").shapes_split == ShapesSplit("val", 200, seed=1)
    assert os.listdir(tmp_path) == []  # registration alone generates nothing


def test_ensure_shapes_dataset(tmp_path, catalog_names):
    name = "shapes_test_eval"
    shapes.register_shapes_datasets(
        str(tmp_path), splits={name: dict(num_images=2, seed=0, image_size=SMALL)}
    )
    assert shapes.ensure_shapes_dataset(name) is True
    # What COCOEvaluator reads directly must now exist.
    assert os.path.isfile(MetadataCatalog.get(name).json_file)
    assert shapes.ensure_shapes_dataset("not_a_shapes_dataset") is False


def test_get_shapes_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SOLO_SHAPES_ROOT", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert shapes.get_shapes_root() == os.path.join(str(tmp_path), "datasets", "shapes")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert shapes.get_shapes_root() == os.path.join(str(tmp_path), "d2", "shapes")
    monkeypatch.setenv("SOLO_SHAPES_ROOT", str(tmp_path / "own"))
    assert shapes.get_shapes_root() == str(tmp_path / "own")


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_images=0), "num_images must be an integer >= 1, got 0"),
        (dict(num_images=2.5), "num_images must be an integer >= 1, got 2.5"),
        (dict(num_images=True), "num_images must be an integer >= 1, got True"),
        (dict(image_size=(16, 128)), r"image_size must be a pair .* >= 32, got \(16, 128\)"),
        (dict(image_size=(96,)), r"image_size must be a pair .*, got \(96,\)"),
        (dict(image_size="ab"), "image_size must be a pair .*, got 'ab'"),
        (dict(seed=-1), "seed must be an integer >= 0, got -1"),
        (dict(split="a/b"), "split must be a non-empty name without path separators.*'a/b'"),
        (dict(split=""), "split must be a non-empty name"),
        (dict(split=".."), "split must be a non-empty name"),
    ],
)
def test_bad_split_parameters_are_rejected_by_name(kwargs, message):
    params = dict(split="s", num_images=2, image_size=SMALL, seed=0)
    params.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ShapesSplit(**params)


def test_split_parameters_are_frozen_and_normalised():
    spec = ShapesSplit("s", np.int64(2), seed=np.int32(4), image_size=[64, np.int64(80)])
    assert spec == ShapesSplit("s", 2, 4, SMALL)
    assert hash(spec) == hash(ShapesSplit("s", 2, 4, SMALL))
    assert type(spec.num_images) is int and spec.image_size == SMALL
    json.dumps(spec.info())  # numpy integers would not serialise
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 5


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(num_images=0, seed=0), "num_images must be an integer >= 1"),
        (dict(num_images=2, seed=0, image_size=(8, 8)), "image_size"),
        (dict(num_images=2, seed=0, colour="red"), "unexpected keyword argument 'colour'"),
        (dict(num_images=2), "missing 1 required positional argument: 'seed'"),
        ([2, 0], "must be a mapping"),
    ],
)
def test_bad_split_specs_name_the_dataset_and_register_nothing(
    tmp_path, catalog_names, spec, message
):
    splits = {"shapes_good": dict(num_images=2, seed=0), "shapes_bad": spec}
    with pytest.raises(ValueError, match=message) as info:
        shapes.register_shapes_datasets(str(tmp_path), splits=splits)
    assert "splits['shapes_bad']" in str(info.value) and "Give num_images, seed" in str(info.value)
    assert "shapes_bad" not in DatasetCatalog.list() and "shapes_good" not in DatasetCatalog.list()
