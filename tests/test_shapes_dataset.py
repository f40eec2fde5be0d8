"""Tests of the procedural "shapes" dataset (solo.data.shapes)."""

import json
import multiprocessing
import os
import sys

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from solo.data import shapes

# Small images keep every generation in these tests well below a second.
SMALL = (64, 80)
MEDIUM = (96, 128)


def _json_path(root, split):
    return os.path.join(str(root), "annotations", f"instances_{split}.json")


def _load_json(root, split):
    with open(_json_path(root, split)) as f:
        return json.load(f)


def _read_images(root, split):
    image_dir = os.path.join(str(root), split)
    return {
        name: cv2.imread(os.path.join(image_dir, name)) for name in sorted(os.listdir(image_dir))
    }


def _polygon_mask(segmentation, height, width):
    rles = mask_utils.frPyObjects(segmentation, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


@pytest.fixture(scope="module")
def medium_split(tmp_path_factory):
    """40 images: enough to contain empty and crowded images, generated once for this module."""
    root = tmp_path_factory.mktemp("shapes_medium")
    shapes.generate_shapes_split(str(root), "medium", 40, image_size=MEDIUM, seed=7)
    return root, _load_json(root, "medium"), _read_images(root, "medium")


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


def test_generation_is_deterministic(tmp_path):
    for name in ("a", "b", "c"):
        seed = 5 if name != "c" else 6
        shapes.generate_shapes_split(str(tmp_path / name), "s", 12, image_size=SMALL, seed=seed)
    with open(_json_path(tmp_path / "a", "s"), "rb") as f:
        json_a = f.read()
    with open(_json_path(tmp_path / "b", "s"), "rb") as f:
        json_b = f.read()
    with open(_json_path(tmp_path / "c", "s"), "rb") as f:
        json_c = f.read()
    assert json_a == json_b
    assert json_a != json_c

    images_a, images_b = _read_images(tmp_path / "a", "s"), _read_images(tmp_path / "b", "s")
    images_c = _read_images(tmp_path / "c", "s")
    assert list(images_a) == [f"{i:06d}.png" for i in range(12)]
    assert all(np.array_equal(images_a[k], images_b[k]) for k in images_a)
    assert not all(np.array_equal(images_a[k], images_c[k]) for k in images_a)


def test_coco_structure(medium_split):
    _, coco, images = medium_split
    height, width = MEDIUM
    assert [c["name"] for c in coco["categories"]] == ["circle", "triangle", "rectangle"]
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3]
    assert coco["info"]["num_images"] == 40 and coco["info"]["seed"] == 7
    assert len(coco["images"]) == 40 == len(images)
    assert len({im["id"] for im in coco["images"]}) == 40
    for im in coco["images"]:
        assert (im["height"], im["width"]) == (height, width)
        assert images[im["file_name"]].shape == (height, width, 3)
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) and min(ann_ids) >= 1


def test_annotations_describe_visible_regions(medium_split):
    _, coco, images = medium_split
    height, width = MEDIUM
    file_names = {im["id"]: im["file_name"] for im in coco["images"]}
    masks_by_image = {}
    for ann in coco["annotations"]:
        assert ann["category_id"] in (1, 2, 3)
        assert ann["iscrowd"] == 0
        assert ann["area"] >= 30
        assert ann["segmentation"] and all(
            len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"]
        )
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width and y + h <= height

        mask = _polygon_mask(ann["segmentation"], height, width)
        # `area` is the visible pixel count; the polygon must rasterise back to that region.
        assert min(mask.sum(), ann["area"]) / max(mask.sum(), ann["area"]) >= 0.95
        ys, xs = np.nonzero(mask)
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert np.abs(np.array(box) - np.array(ann["bbox"])).max() <= 1

        # The region must cover one shape's visible pixels only: a single fill colour plus mild
        # noise. Pixels of an occluding shape or of the background would break this.
        pixels = images[file_names[ann["image_id"]]][mask].astype(np.float32)
        distance = np.linalg.norm(pixels - np.median(pixels, axis=0), axis=1)
        assert (distance < 25).mean() >= 0.97, ann
        masks_by_image.setdefault(ann["image_id"], []).append(mask)

    # Visible regions of different instances do not overlap (occlusion is resolved).
    for masks in masks_by_image.values():
        coverage = np.sum(masks, axis=0)
        assert (coverage > 1).sum() <= 0.01 * coverage.astype(bool).sum()


def test_image_and_instance_statistics(medium_split):
    _, coco, _ = medium_split
    counts = {im["id"]: 0 for im in coco["images"]}
    for ann in coco["annotations"]:
        counts[ann["image_id"]] += 1
    assert any(c == 0 for c in counts.values())
    assert sum(c >= 3 for c in counts.values()) >= 5
    assert max(counts.values()) <= 6
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
    path = shapes.ensure_shapes_split(str(tmp_path), "s", 4, image_size=SMALL, seed=0)
    assert path == _json_path(tmp_path, "s")
    before = _mtimes(tmp_path, "s")
    shapes.ensure_shapes_split(str(tmp_path), "s", 4, image_size=SMALL, seed=0)
    assert _mtimes(tmp_path, "s") == before


@pytest.mark.parametrize(
    "changed",
    [dict(seed=1), dict(num_images=3), dict(image_size=(72, 80))],
    ids=["seed", "num_images", "image_size"],
)
def test_ensure_regenerates_on_parameter_change(tmp_path, changed):
    params = dict(num_images=5, image_size=SMALL, seed=0)
    shapes.ensure_shapes_split(str(tmp_path), "s", **params)
    params.update(changed)
    shapes.ensure_shapes_split(str(tmp_path), "s", **params)

    coco = _load_json(tmp_path, "s")
    assert coco["info"]["seed"] == params["seed"]
    assert coco["info"]["image_size"] == list(params["image_size"])
    images = _read_images(tmp_path, "s")
    assert sorted(images) == sorted(im["file_name"] for im in coco["images"])  # no stale files
    assert len(images) == params["num_images"]
    assert all(im.shape[:2] == tuple(params["image_size"]) for im in images.values())
    # Nothing but the split, its annotations and the lock file is left in the cache root.
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock")) == [
        "annotations",
        "s",
    ]


def test_ensure_regenerates_missing_images(tmp_path):
    shapes.ensure_shapes_split(str(tmp_path), "s", 3, image_size=SMALL, seed=0)
    image = tmp_path / "s" / "000001.png"
    image.unlink()
    shapes.ensure_shapes_split(str(tmp_path), "s", 3, image_size=SMALL, seed=0)
    assert image.exists()


def _ensure_and_report(root, log_path, queue):
    # Record generations in this process by wrapping the (module-global) generator.
    generate = shapes.generate_shapes_split

    def logged(*args, **kwargs):
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        return generate(*args, **kwargs)

    shapes.generate_shapes_split = logged
    queue.put(shapes.ensure_shapes_split(root, "s", 6, image_size=SMALL, seed=0))


@pytest.mark.skipif(sys.platform != "linux", reason="uses fork to start processes quickly")
def test_concurrent_ensure_generates_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue, log_path = ctx.Queue(), str(tmp_path / "generations.log")
    root = str(tmp_path / "cache")
    procs = [ctx.Process(target=_ensure_and_report, args=(root, log_path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [_json_path(root, "s")] * 3
    with open(log_path) as f:
        assert len(f.read().split()) == 1
    assert len(_load_json(root, "s")["images"]) == 6


# ----------------------------------------------------------------------------------------------
# Detectron2 registration
# ----------------------------------------------------------------------------------------------


def test_registered_dataset_loads_lazily(tmp_path, catalog_names):
    name = "shapes_test_tiny"
    splits = {name: dict(num_images=8, seed=3, image_size=MEDIUM)}
    assert shapes.register_shapes_datasets(str(tmp_path), splits=splits) == [name]
    assert not os.path.exists(_json_path(tmp_path, "test_tiny"))  # nothing generated yet

    metadata = MetadataCatalog.get(name)
    assert metadata.thing_classes == ["circle", "triangle", "rectangle"]
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}
    assert metadata.evaluator_type == "coco"
    assert metadata.json_file == _json_path(tmp_path, "test_tiny")
    assert metadata.image_root == os.path.join(str(tmp_path), "test_tiny")

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
            assert isinstance(ann["segmentation"], list)
            assert all(isinstance(p, list) and len(p) >= 6 for p in ann["segmentation"])

    # A second load reuses the cache.
    before = _mtimes(tmp_path, "test_tiny")
    assert len(DatasetCatalog.get(name)) == 8
    assert _mtimes(tmp_path, "test_tiny") == before


def test_register_twice_and_defaults(tmp_path, catalog_names):
    names = shapes.register_shapes_datasets(str(tmp_path))
    assert names == ["shapes_train", "shapes_val"]
    assert shapes.register_shapes_datasets(str(tmp_path)) == names
    assert all(n in DatasetCatalog.list() for n in names)
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
    "kwargs, argument",
    [
        (dict(num_images=0), "num_images"),
        (dict(num_images=2.5), "num_images"),
        (dict(image_size=(16, 128)), "image_size"),
        (dict(image_size=(96,)), "image_size"),
        (dict(seed=-1), "seed"),
        (dict(split="a/b"), "split"),
        (dict(split=""), "split"),
    ],
)
@pytest.mark.parametrize("function", ["generate_shapes_split", "ensure_shapes_split"])
def test_bad_arguments(tmp_path, function, kwargs, argument):
    call = dict(root=str(tmp_path), split="s", num_images=2, image_size=SMALL, seed=0)
    call.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        getattr(shapes, function)(**call)
    assert not os.path.exists(os.path.join(str(tmp_path), "annotations"))


@pytest.mark.parametrize(
    "spec, argument",
    [
        (dict(num_images=0, seed=0), "num_images"),
        (dict(num_images=2, seed=0, image_size=(8, 8)), "image_size"),
        (dict(num_images=2, seed=0, colour="red"), "colour"),
        (dict(num_images=2), "seed"),
    ],
)
def test_bad_split_specs(tmp_path, catalog_names, spec, argument):
    with pytest.raises(ValueError, match=argument):
        shapes.register_shapes_datasets(str(tmp_path), splits={"shapes_bad": spec})
    assert "shapes_bad" not in DatasetCatalog.list()
