"""A small, deterministic, procedurally generated instance-segmentation dataset ("shapes").

Every split is written once into a cache directory as PNG files plus a COCO-format
``instances_<split>.json`` whose masks are exact COCO RLEs (``pycocotools.mask``), and registered
with Detectron2 like any COCO dataset, so that training and evaluation on it go through the same
loading (``load_coco_json``) and evaluation (``COCOEvaluator``) code as COCO. It is meant for smoke
tests, demos and CPU-sized training runs, not as a benchmark.

Layout of the cache directory (see :func:`get_shapes_root`)::

    <root>/<split>/000000.png, 000001.png, ...
    <root>/annotations/instances_<split>.json

Typical use::

    from solo.data.shapes import register_shapes_datasets, ensure_shapes_dataset

    register_shapes_datasets()          # cheap: nothing is generated here
    DatasetCatalog.get("shapes_train")  # generates the split on first use, then loads it
    ensure_shapes_dataset("shapes_val") # call before building a COCOEvaluator (see below)

Generation is lazy because registration happens at import time in every process (data-loader
workers, every DDP rank), where writing hundreds of images would be slow and racy. Note that
``COCOEvaluator`` opens ``MetadataCatalog.get(name).json_file`` directly, without going through
``DatasetCatalog``: code that evaluates on a shapes split must call :func:`ensure_shapes_dataset`
(or :func:`ensure_shapes_split`) first.
"""

import dataclasses
import functools
import json
import logging
import numbers
import numpy as np
import os
import shutil
from typing import Dict, List, Optional, Tuple
import cv2
from iopath.common.file_io import file_lock

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes_drawing import SHAPES_CATEGORIES, annotate, draw_image

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_SPLITS",
    "DEFAULT_IMAGE_SIZE",
    "ShapesSplit",
    "get_shapes_root",
    "generate_shapes_split",
    "ensure_shapes_split",
    "register_shapes_datasets",
    "ensure_shapes_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = (128, 160)  # (height, width)

# Built-in splits: dataset name -> ShapesSplit arguments (the split name is the dataset name
# without its "shapes_" prefix).
SHAPES_SPLITS = {
    "shapes_train": {"num_images": 1000, "seed": 0},
    "shapes_val": {"num_images": 200, "seed": 1},
}

# Stored in every JSON's "info": bump whenever the generator's output changes, so that caches
# written by an older generator no longer match and are regenerated on first use.
# 1: polygon masks, occlusions that would punch a hole into a shape rejected. 2: RLE masks.
GENERATOR_VERSION = 2

MIN_IMAGE_SIDE = 32  # below this the size range [MIN_OBJECT_SIZE, 70% of short side] collapses


def _is_int(value) -> bool:
    # bool is an Integral too, but "num_images=True" is certainly a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class ShapesSplit:
    """The parameters that fully determine one generated split; validated on construction.

    Attributes:
        split: name of the split's image directory and JSON (``<root>/<split>``,
            ``instances_<split>.json``); a non-empty name without path separators.
        num_images: number of images, >= 1.
        seed: seed of ``numpy.random.default_rng``, >= 0.
        image_size: (height, width) in pixels, each >= 32.

    Raises:
        ValueError: naming the invalid field, its value and what is accepted.
    """

    split: str
    num_images: int
    seed: int
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE

    def __post_init__(self):
        split = self.split
        if not isinstance(split, str) or split in ("", ".", "..") or {"/", os.sep} & set(split):
            raise ValueError(
                f"split must be a non-empty name without path separators (it names a directory "
                f"and a file), got {split!r}"
            )
        for name, minimum in (("num_images", 1), ("seed", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
            object.__setattr__(self, name, int(value))  # numpy integers are not JSON-serialisable
        size = self.image_size
        if not (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(_is_int(s) and s >= MIN_IMAGE_SIDE for s in size)
        ):
            raise ValueError(
                f"image_size must be a pair of integers (height, width), each >= "
                f"{MIN_IMAGE_SIDE}, got {size!r}"
            )
        object.__setattr__(self, "image_size", (int(size[0]), int(size[1])))

    def info(self) -> dict:
        """The JSON "info" field: these parameters plus the generator version (the cache key)."""
        fields = dataclasses.asdict(self)
        fields["image_size"] = list(self.image_size)  # as json.load returns it
        return {"generator": "solo.data.shapes", "version": GENERATOR_VERSION, **fields}


# ----------------------------------------------------------------------------------------------
# Generation and caching
# ----------------------------------------------------------------------------------------------


def get_shapes_root() -> str:
    """The cache directory for generated splits (absolute path).

    ``$SOLO_SHAPES_ROOT`` if set, else ``$DETECTRON2_DATASETS/shapes`` (Detectron2's convention
    for builtin datasets), else ``./datasets/shapes`` relative to the current working directory.
    """
    root = os.environ.get("SOLO_SHAPES_ROOT")
    if not root:
        base = os.environ.get("DETECTRON2_DATASETS")
        root = os.path.join(base, "shapes") if base else os.path.join("datasets", "shapes")
    return os.path.abspath(os.path.expanduser(root))


def _json_path(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"instances_{split}.json")


def generate_shapes_split(root: str, spec: ShapesSplit) -> str:
    """Generate ``spec`` into ``root``, replacing any previous copy; returns the JSON path.

    Writes ``root/<split>/<index:06d>.png`` (colour PNGs) and
    ``root/annotations/instances_<split>.json``; the output is a pure function of ``spec`` (the
    JSON and the PNG files are byte-identical on every run). The JSON is the commit marker: it is
    removed first and renamed into place last, so an interrupted run leaves no split that
    :func:`ensure_shapes_split` would accept. Not locked: prefer :func:`ensure_shapes_split`,
    which serialises concurrent generation and reuses a valid cache.
    """
    json_path, image_dir = _json_path(root, spec.split), os.path.join(root, spec.split)
    height, width = spec.image_size
    logger.info(f"Generating shapes split {spec} in {root}")
    if os.path.exists(json_path):
        os.remove(json_path)
    shutil.rmtree(image_dir, ignore_errors=True)
    os.makedirs(image_dir)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    images, annotations = [], []
    for index in range(spec.num_images):
        image, labels, category_ids = draw_image(rng, height, width)
        file_name = f"{index:06d}.png"
        path = os.path.join(image_dir, file_name)
        if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"Could not write {path}")
        image_id = index + 1  # COCO ids start at 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += annotate(labels, category_ids, image_id, first_id=len(annotations) + 1)
    coco = {
        "info": spec.info(),
        "images": images,
        "annotations": annotations,
        "categories": SHAPES_CATEGORIES,
    }
    with open(json_path + ".tmp", "w") as f:
        json.dump(coco, f, separators=(",", ":"))
    os.replace(json_path + ".tmp", json_path)
    logger.info(f"Generated shapes split '{spec.split}': {len(annotations)} instances")
    return json_path


def _is_valid_cache(root: str, spec: ShapesSplit) -> bool:
    """Whether ``root`` holds ``spec`` written by this generator version, images included."""
    try:
        with open(_json_path(root, spec.split)) as f:
            coco = json.load(f)
        present = set(os.listdir(os.path.join(root, spec.split)))
    except (OSError, ValueError):  # missing, unreadable or truncated
        return False
    if coco.get("info") != spec.info():
        return False
    return all(image["file_name"] in present for image in coco.get("images", []))


def ensure_shapes_split(root: str, spec: ShapesSplit) -> str:
    """Make sure ``root`` holds the split ``spec``; returns its JSON path.

    Generates the split if its JSON is missing, was written with other parameters or by another
    generator version (both are in the JSON's "info" field), or some of its images are missing.
    Safe to call from several processes at once (DDP ranks, data-loader workers): one generates
    under ``iopath``'s ``file_lock`` on ``<root>/<split>.lock``, the others wait and reuse it.
    """
    if not _is_valid_cache(root, spec):  # the fast path needs no lock
        with file_lock(os.path.join(root, spec.split)):
            # Another process may have generated the split while we were waiting for the lock.
            if not _is_valid_cache(root, spec):
                generate_shapes_split(root, spec)
    return _json_path(root, spec.split)


# ----------------------------------------------------------------------------------------------
# Detectron2 registration
# ----------------------------------------------------------------------------------------------


def _split_spec(name: str, spec: dict) -> ShapesSplit:
    split = name[len("shapes_") :] if name.startswith("shapes_") and name != "shapes_" else name
    try:
        return ShapesSplit(split=split, **spec)
    except (TypeError, ValueError) as e:  # TypeError: unknown or missing keys, or not a dict
        raise ValueError(
            f"splits[{name!r}] = {spec!r} is invalid: {e}. Give num_images, seed and optionally "
            "image_size=(height, width)."
        ) from e


def _load_split(name: str, root: str, spec: ShapesSplit) -> List[dict]:
    json_file = ensure_shapes_split(root, spec)
    return load_coco_json(json_file, os.path.join(root, spec.split), name)


def register_shapes_datasets(
    root: Optional[str] = None, splits: Optional[Dict[str, dict]] = None
) -> List[str]:
    """Register shapes splits with Detectron2's catalogs; returns the dataset names.

    Nothing is generated here: each split is generated on its first ``DatasetCatalog.get(name)``
    (or :func:`ensure_shapes_dataset` call). Names already in ``DatasetCatalog`` are skipped, so
    calling this again (every process, every ``setup()``) is harmless.

    Args:
        root: cache directory; defaults to :func:`get_shapes_root`.
        splits: dataset name -> dict(num_images=..., seed=..., image_size=(H, W) optional), the
            arguments of :class:`ShapesSplit`; defaults to :data:`SHAPES_SPLITS`. A "shapes_"
            prefix is stripped from the name to get the split ("shapes_train" -> "<root>/train").

    Raises:
        ValueError: naming the dataset whose spec is invalid; nothing is registered then.
    """
    root = os.path.abspath(root) if root is not None else get_shapes_root()
    splits = SHAPES_SPLITS if splits is None else splits
    specs = {name: _split_spec(name, spec) for name, spec in splits.items()}  # validate all first
    registered = DatasetCatalog.list()
    for name, spec in specs.items():
        if name in registered:
            continue
        DatasetCatalog.register(name, functools.partial(_load_split, name, root, spec))
        # What register_coco_instances sets, plus the contiguous-id map and the generator's spec.
        MetadataCatalog.get(name).set(
            thing_classes=[c["name"] for c in SHAPES_CATEGORIES],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)},
            json_file=_json_path(root, spec.split),
            image_root=os.path.join(root, spec.split),
            evaluator_type="coco",
            shapes_root=root,
            shapes_split=spec,
        )
    return list(specs)


def ensure_shapes_dataset(dataset_name: str) -> bool:
    """Generate a registered shapes dataset if needed; returns False for non-shapes datasets.

    Call this before building a ``COCOEvaluator`` (which opens ``metadata.json_file`` directly)
    for every test dataset; it is a cheap no-op when the split is already cached.
    """
    if dataset_name not in MetadataCatalog.list():
        return False
    metadata = MetadataCatalog.get(dataset_name)
    if metadata.get("shapes_split") is None:
        return False
    ensure_shapes_split(metadata.shapes_root, metadata.shapes_split)
    return True
