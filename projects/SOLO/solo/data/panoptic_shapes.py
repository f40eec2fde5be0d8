"""Panoptic shapes: the shapes dataset's objects ("things") over textured "stuff" bands.

Each image is split by one or two wavy horizontal boundaries into bands of sky (soft clouds),
water (horizontal ripples) and ground (speckle); some images leave one band unlabeled (a plain
gradient: void in the ground truth, as COCO's unlabeled pixels). The objects of
:mod:`solo.data.shapes` (same placement, occlusion rules and category ids) are drawn on top, in
colours far from every band. Written once per split in COCO panoptic format and registered as
Detectron2 registers ``coco_2017_<split>_panoptic_separated``
(``register_coco_panoptic_separated``): instance annotations from a COCO instances JSON, stuff
from semantic PNGs (0 = any thing, 1..3 = sky, water, ground, 255 = unlabeled), evaluated from
the panoptic PNGs + JSON by ``COCOPanopticEvaluator``.

Layout of the cache directory (:func:`solo.data.shapes.get_shapes_root`), for split ``<s>``
(``train_panoptic``, ``val_panoptic``)::

    <root>/<s>/000000.png, ...                      images
    <root>/panoptic_<s>/000000.png, ...             panoptic PNGs (segment id = R + 256 G + 256^2 B)
    <root>/panoptic_stuff_<s>/000000.png, ...       semantic PNGs (uint8)
    <root>/annotations/instances_<s>.json           things, COCO instances (exact RLE)
    <root>/annotations/panoptic_<s>.json            COCO panoptic: segments_info per image

As for the instance splits, generation is lazy (first ``DatasetCatalog.get``, or
:func:`ensure_panoptic_shapes_dataset` before building ``COCOPanopticEvaluator``, which reads
``panoptic_json`` and ``panoptic_root`` directly), deterministic, and serialised by a file lock.
"""

import functools
import json
import logging
import numpy as np
import os
import shutil
from typing import Dict, List, Optional, Tuple
import cv2
from iopath.common.file_io import file_lock
from pycocotools import mask as mask_util

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import GENERATOR_VERSION, ShapesSplit, get_shapes_root
from .shapes_drawing import NOISE_SIGMA, SHAPES_CATEGORIES, annotate, draw_shape, place_shapes

__all__ = [
    "PANOPTIC_SHAPES_CATEGORIES",
    "PANOPTIC_SHAPES_SPLITS",
    "generate_panoptic_shapes_split",
    "ensure_panoptic_shapes_split",
    "register_panoptic_shapes_datasets",
    "ensure_panoptic_shapes_dataset",
]

logger = logging.getLogger(__name__)

THING_COLORS = [(220, 20, 60), (255, 160, 0), (150, 60, 200)]
# Stuff ids follow the thing ids, as in COCO panoptic (things 1-90, stuff 92-200).
STUFF_CATEGORIES = [
    {"id": 4, "name": "sky", "isthing": 0, "color": [110, 170, 230]},
    {"id": 5, "name": "water", "isthing": 0, "color": [30, 100, 140]},
    {"id": 6, "name": "ground", "isthing": 0, "color": [120, 90, 50]},
]
PANOPTIC_SHAPES_CATEGORIES = [
    {**c, "isthing": 1, "color": list(color)} for c, color in zip(SHAPES_CATEGORIES, THING_COLORS)
] + STUFF_CATEGORIES

# Registered as "<name>_separated"; the split name is the name without its "shapes_" prefix.
PANOPTIC_SHAPES_SPLITS = {
    "shapes_train_panoptic": {"num_images": 1000, "seed": 10},
    "shapes_val_panoptic": {"num_images": 200, "seed": 11},
}

# Bump whenever the output changes (cache key, with the instance generator's version).
PANOPTIC_GENERATOR_VERSION = 1
IGNORE_LABEL = 255
# Band sequences, top to bottom (stuff names); one is drawn per image.
LAYOUTS = [
    ("sky", "ground"),
    ("sky", "water", "ground"),
    ("sky", "water"),
    ("water", "ground"),
    ("sky", "ground", "water"),
]
UNLABELED_BAND_PROB = 0.15  # an image leaves one band unlabeled (void)
MIN_STUFF_COLOR_DISTANCE = 100.0  # L2 in RGB between an object's fill and every band's colour


def _band_texture(rng: np.random.Generator, name: str, height: int, width: int) -> np.ndarray:
    """float32 RGB (H, W, 3) texture of one stuff class, around its category colour."""
    color = next(c["color"] for c in STUFF_CATEGORIES if c["name"] == name)
    base = np.array(color, np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if name == "sky":  # lighter towards the top, with soft low-frequency clouds
        coarse = rng.uniform(0, 1, size=(4, 5)).astype(np.float32)
        clouds = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        shade = 40 * np.clip(clouds, 0, 1) + 20 * (1 - ys / height)
        return base + shade[..., None]
    if name == "water":  # horizontal ripples
        phase = rng.uniform(0, 2 * np.pi)
        ripples = np.sin(2 * np.pi * ys / 5.0 + 0.6 * np.sin(xs / 9.0 + phase))
        return base + (22 * ripples)[..., None]
    speckle = rng.normal(0, 22, size=(height, width)).astype(np.float32)  # ground
    return base + speckle[..., None]


def _stuff_map(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, list]:
    """Bands of the image: int64 (H, W) band index map and per band its stuff name or None
    (unlabeled). Boundaries are sinusoids across the image."""
    layout = list(LAYOUTS[int(rng.integers(len(LAYOUTS)))])
    if rng.random() < UNLABELED_BAND_PROB:
        layout[int(rng.integers(len(layout)))] = None
    bases = np.sort(rng.uniform(0.25, 0.75, size=len(layout) - 1)) * height
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)[:, None]
    bands = np.zeros((height, width), dtype=np.int64)
    for base in bases:
        amplitude, period = rng.uniform(2, 10), rng.uniform(30, 90)
        boundary = base + amplitude * np.sin(2 * np.pi * xs / period + rng.uniform(0, 2 * np.pi))
        bands += ys >= boundary[None, :]
    return bands, layout


def _fill_color(rng: np.random.Generator, band_colors: List[np.ndarray]) -> Tuple[float, ...]:
    """A colour at least MIN_STUFF_COLOR_DISTANCE from every band's mean colour (else the
    farthest of the tries)."""
    best, best_distance = None, -1.0
    for _ in range(100):
        color = rng.integers(0, 256, size=3)
        distance = min(np.linalg.norm(color - c) for c in band_colors)
        if distance > best_distance:
            best, best_distance = color, distance
        if distance >= MIN_STUFF_COLOR_DISTANCE:
            break
    return tuple(float(c) for c in best)


def _draw_panoptic_image(rng: np.random.Generator, height: int, width: int):
    """One image: uint8 RGB (H, W, 3), instance label map (H, W) with the objects' category
    ids, and the (H, W) stuff category id of every pixel (0: unlabeled)."""
    shapes, labels = place_shapes(rng, height, width)
    bands, layout = _stuff_map(rng, height, width)
    canvas = np.zeros((height, width, 3), np.float32)
    stuff_ids = np.zeros((height, width), np.int64)
    plain = rng.integers(170, 240, size=3).astype(np.float32)  # unlabeled bands: flat colour
    band_colors = []
    for index, name in enumerate(layout):
        inside = bands == index
        if name is None:
            canvas[inside] = plain
            band_colors.append(plain)
            continue
        texture = _band_texture(rng, name, height, width)
        canvas[inside] = texture[inside]
        band_colors.append(texture.reshape(-1, 3).mean(axis=0))
        stuff_ids[inside] = next(c["id"] for c in STUFF_CATEGORIES if c["name"] == name)
    for shape in shapes:
        draw_shape(canvas, shape, _fill_color(rng, band_colors))
    canvas += rng.normal(0.0, NOISE_SIGMA, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, labels, [s["category_id"] for s in shapes], stuff_ids


def _panoptic_annotation(labels, category_ids, stuff_ids, image_id, file_name):
    """Panoptic id map (H, W) int64 (0 = void) and its COCO panoptic annotation. Things keep
    their label 1..N as segment id; stuff segments follow."""
    segments = labels.astype(np.int64)
    ids = list(zip(range(1, len(category_ids) + 1), category_ids))
    for category in STUFF_CATEGORIES:
        region = (labels == 0) & (stuff_ids == category["id"])
        if region.any():
            ids.append((len(ids) + 1, category["id"]))
            segments[region] = ids[-1][0]
    masks = segments[..., None] == np.array([i for i, _ in ids], np.int64)
    rles = mask_util.encode(np.asfortranarray(masks.astype(np.uint8)))
    areas, boxes = mask_util.area(rles), mask_util.toBbox(rles)
    info = [
        {
            "id": segment_id,
            "category_id": category_id,
            "iscrowd": 0,
            "area": int(areas[k]),
            "bbox": [float(v) for v in boxes[k]],
        }
        for k, (segment_id, category_id) in enumerate(ids)
    ]
    return segments, {"image_id": image_id, "file_name": file_name, "segments_info": info}


def _semantic_labels(labels: np.ndarray, stuff_ids: np.ndarray) -> np.ndarray:
    """uint8 (H, W): 0 where any object is, the contiguous stuff id (1..3) elsewhere, 255 where
    unlabeled, as Detectron2's prepare_panoptic_fpn.py writes COCO's panoptic_stuff PNGs."""
    semantic = np.full(labels.shape, IGNORE_LABEL, np.uint8)
    for contiguous, category in enumerate(STUFF_CATEGORIES, start=1):
        semantic[stuff_ids == category["id"]] = contiguous
    semantic[labels > 0] = 0
    return semantic


def _paths(root: str, split: str) -> Dict[str, str]:
    return {
        "image_root": os.path.join(root, split),
        "panoptic_root": os.path.join(root, f"panoptic_{split}"),
        "sem_seg_root": os.path.join(root, f"panoptic_stuff_{split}"),
        "json_file": os.path.join(root, "annotations", f"instances_{split}.json"),
        "panoptic_json": os.path.join(root, "annotations", f"panoptic_{split}.json"),
    }


def _info(spec: ShapesSplit) -> dict:
    return {
        **spec.info(),
        "generator": "solo.data.panoptic_shapes",
        "version": PANOPTIC_GENERATOR_VERSION,
        "shapes_version": GENERATOR_VERSION,
    }


def _write_png(path: str, array: np.ndarray) -> None:
    if not cv2.imwrite(path, array):
        raise OSError(f"Could not write {path}")


def generate_panoptic_shapes_split(root: str, spec: ShapesSplit) -> str:
    """Generate ``spec`` into ``root`` (replacing any previous copy); returns the panoptic JSON
    path. Deterministic in ``spec``; the panoptic JSON is renamed into place last (the commit
    marker). Not locked: prefer :func:`ensure_panoptic_shapes_split`."""
    paths = _paths(root, spec.split)
    if os.path.exists(paths["panoptic_json"]):
        os.remove(paths["panoptic_json"])
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        shutil.rmtree(paths[key], ignore_errors=True)
        os.makedirs(paths[key])
    os.makedirs(os.path.dirname(paths["json_file"]), exist_ok=True)
    height, width = spec.image_size
    rng = np.random.default_rng(spec.seed)
    images, annotations, panoptic = [], [], []
    for index in range(spec.num_images):
        image, labels, category_ids, stuff_ids = _draw_panoptic_image(rng, height, width)
        file_name, image_id = f"{index:06d}.png", index + 1
        _write_png(os.path.join(paths["image_root"], file_name), image[..., ::-1])
        segments, annotation = _panoptic_annotation(
            labels, category_ids, stuff_ids, image_id, file_name
        )
        rgb = np.stack([segments % 256, segments // 256 % 256, segments // 65536], axis=-1)
        _write_png(os.path.join(paths["panoptic_root"], file_name), rgb[..., ::-1].astype(np.uint8))
        semantic = _semantic_labels(labels, stuff_ids)
        _write_png(os.path.join(paths["sem_seg_root"], file_name), semantic)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += annotate(labels, category_ids, image_id, first_id=len(annotations) + 1)
        panoptic.append(annotation)
    things = [c for c in PANOPTIC_SHAPES_CATEGORIES if c["isthing"]]
    instances = {"info": _info(spec), "images": images, "annotations": annotations}
    with open(paths["json_file"], "w") as f:
        json.dump({**instances, "categories": things}, f, separators=(",", ":"))
    coco_panoptic = {
        "info": _info(spec),
        "images": images,
        "annotations": panoptic,
        "categories": PANOPTIC_SHAPES_CATEGORIES,
    }
    with open(paths["panoptic_json"] + ".tmp", "w") as f:
        json.dump(coco_panoptic, f, separators=(",", ":"))
    os.replace(paths["panoptic_json"] + ".tmp", paths["panoptic_json"])
    logger.info(f"Generated panoptic shapes split '{spec.split}' in {root}")
    return paths["panoptic_json"]


def _is_valid_cache(root: str, spec: ShapesSplit) -> bool:
    paths = _paths(root, spec.split)
    try:
        with open(paths["panoptic_json"]) as f:
            coco = json.load(f)
        with open(paths["json_file"]) as f:
            instances_info = json.load(f).get("info")
        present = [
            set(os.listdir(paths[k])) for k in ("image_root", "panoptic_root", "sem_seg_root")
        ]
    except (OSError, ValueError):
        return False
    if coco.get("info") != _info(spec) or instances_info != _info(spec):
        return False
    names = {image["file_name"] for image in coco.get("images", [])}
    return all(names <= files for files in present)


def ensure_panoptic_shapes_split(root: str, spec: ShapesSplit) -> str:
    """Generate ``spec`` into ``root`` unless a valid copy is there (checked again under a file
    lock, so concurrent processes generate it once); returns the panoptic JSON path."""
    if not _is_valid_cache(root, spec):
        with file_lock(os.path.join(root, spec.split)):
            if not _is_valid_cache(root, spec):
                generate_panoptic_shapes_split(root, spec)
    return _paths(root, spec.split)["panoptic_json"]


def _load_split(name: str, root: str, spec: ShapesSplit, semantic: bool = True) -> List[dict]:
    """Instance records (``load_coco_json``), with ``sem_seg_file_name`` if ``semantic``, as
    Detectron2's ``merge_to_panoptic`` gives them for COCO."""
    ensure_panoptic_shapes_split(root, spec)
    paths = _paths(root, spec.split)
    dicts = load_coco_json(paths["json_file"], paths["image_root"], name)
    for record in dicts if semantic else ():
        record["sem_seg_file_name"] = os.path.join(
            paths["sem_seg_root"], os.path.basename(record["file_name"])
        )
    return dicts


def register_panoptic_shapes_datasets(
    root: Optional[str] = None, splits: Optional[Dict[str, dict]] = None
) -> List[str]:
    """Register ``<name>_separated`` for every panoptic shapes split, and ``<name>_instances``,
    its things alone (an instance-only model on the same images); returns the names.

    Metadata as ``register_coco_panoptic_separated`` sets it (``evaluator_type``
    ``"coco_panoptic_seg"``, ``panoptic_root``/``panoptic_json`` for ``COCOPanopticEvaluator``,
    ``json_file`` for COCO instance AP, ``sem_seg_root``, ``ignore_label`` 255, ``stuff_classes``
    ``["things", "sky", "water", "ground"]``), plus thing and stuff colours; the instance view
    as ``register_coco_instances``. Nothing is generated here; names already registered are
    skipped.

    Args:
        root: cache directory; default :func:`solo.data.shapes.get_shapes_root`.
        splits: name -> ``ShapesSplit`` arguments (num_images, seed, image_size); default
            :data:`PANOPTIC_SHAPES_SPLITS`.
    """
    root = os.path.abspath(root) if root is not None else get_shapes_root()
    splits = PANOPTIC_SHAPES_SPLITS if splits is None else splits
    specs = {}
    for name, kwargs in splits.items():
        split = name[len("shapes_") :] if name.startswith("shapes_") else name
        try:
            specs[name] = ShapesSplit(split=split, **kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"splits[{name!r}] = {kwargs!r} is invalid: {e}") from e
    things = [c for c in PANOPTIC_SHAPES_CATEGORIES if c["isthing"]]
    registered = DatasetCatalog.list()
    names = []
    thing_metadata = {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [tuple(c["color"]) for c in things],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
    }
    for name, spec in specs.items():
        paths = _paths(root, spec.split)
        instances = f"{name}_instances"
        names.append(instances)
        if instances not in registered:
            load = functools.partial(_load_split, instances, root, spec, semantic=False)
            DatasetCatalog.register(instances, load)
            MetadataCatalog.get(instances).set(
                json_file=paths["json_file"],
                image_root=paths["image_root"],
                evaluator_type="coco",
                shapes_root=root,
                panoptic_shapes_split=spec,
                **thing_metadata,
            )
        dataset = f"{name}_separated"
        names.append(dataset)
        if dataset in registered:
            continue
        DatasetCatalog.register(dataset, functools.partial(_load_split, dataset, root, spec))
        stuff_ids = {c["id"]: i for i, c in enumerate(STUFF_CATEGORIES, start=1)}
        MetadataCatalog.get(dataset).set(
            **thing_metadata,
            stuff_classes=["things"] + [c["name"] for c in STUFF_CATEGORIES],
            stuff_colors=[(82, 18, 128)] + [tuple(c["color"]) for c in STUFF_CATEGORIES],
            stuff_dataset_id_to_contiguous_id={0: 0, **stuff_ids},
            evaluator_type="coco_panoptic_seg",
            ignore_label=IGNORE_LABEL,
            shapes_root=root,
            panoptic_shapes_split=spec,
            **paths,
        )
    return names


def ensure_panoptic_shapes_dataset(dataset_name: str) -> bool:
    """Generate a registered panoptic shapes dataset if needed (before building
    ``COCOPanopticEvaluator``); returns False for other datasets."""
    if dataset_name not in MetadataCatalog.list():
        return False
    spec = MetadataCatalog.get(dataset_name).get("panoptic_shapes_split")
    if spec is None:
        return False
    ensure_panoptic_shapes_split(MetadataCatalog.get(dataset_name).shapes_root, spec)
    return True
