"""A small, deterministic, procedurally generated instance-segmentation dataset ("shapes").

Every split is written once into a cache directory as real PNG files plus a COCO-format
``instances_<split>.json`` and then registered with Detectron2 like any COCO dataset, so that
training and evaluation on it exercise exactly the same loading (``load_coco_json``) and
evaluation (``COCOEvaluator``) code paths as COCO itself. It is meant for smoke tests, demos and
CPU-sized training runs, not as a benchmark.

Layout of the cache directory (see :func:`get_shapes_root`)::

    <root>/<split>/000000.png, 000001.png, ...
    <root>/annotations/instances_<split>.json

Typical use::

    from solo.data.shapes import register_shapes_datasets, ensure_shapes_dataset

    register_shapes_datasets()          # cheap: nothing is generated here
    DatasetCatalog.get("shapes_train")  # generates the split on first use, then loads it
    ensure_shapes_dataset("shapes_val") # call before building a COCOEvaluator (see below)

Generation is lazy because registration typically happens at import time in every process
(including data-loader workers and every DDP rank), where writing hundreds of images would be
both slow and racy. Note that ``COCOEvaluator`` opens ``MetadataCatalog.get(name).json_file``
directly, without going through ``DatasetCatalog``; code that evaluates on a shapes split must
therefore call :func:`ensure_shapes_dataset` (or :func:`ensure_shapes_split`) first.
"""

import contextlib
import json
import logging
import numbers
import os
import shutil
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tqdm import tqdm

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

try:  # POSIX only; elsewhere we fall back to the (still atomic) rename-into-place protocol.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_SPLITS",
    "DEFAULT_IMAGE_SIZE",
    "get_shapes_root",
    "generate_shapes_split",
    "ensure_shapes_split",
    "register_shapes_datasets",
    "ensure_shapes_dataset",
]

logger = logging.getLogger(__name__)

# COCO-style categories; ids start at 1 as in COCO, names in id order.
SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "triangle", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
]
_THING_CLASSES = [c["name"] for c in SHAPES_CATEGORIES]
_ID_TO_CONTIGUOUS = {c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)}

DEFAULT_IMAGE_SIZE = (128, 160)  # (height, width)

# Built-in splits: dataset name -> generation parameters (image_size defaults to the above).
SHAPES_SPLITS = {
    "shapes_train": {"num_images": 1000, "seed": 0},
    "shapes_val": {"num_images": 200, "seed": 1},
}

# Bump whenever the generator's output changes, so stale caches are regenerated automatically.
GENERATOR_VERSION = 1

MIN_IMAGE_SIDE = 32  # below this the size range [MIN_OBJECT_SIZE, 70% of short side] collapses
MIN_OBJECT_SIZE = 12.0  # px, diameter of a shape's circumscribed circle
MAX_OBJECT_FRACTION = 0.7  # of the image's short side
MAX_OBJECTS = 6
EMPTY_IMAGE_PROB = 0.1
MIN_VISIBLE_AREA = 30  # px; smaller visible fragments are not worth annotating
# An occluded shape must keep this fraction of its own area visible: a shape that is 90% hidden
# is an ambiguous blob that no model can classify, which only adds label noise to a toy dataset.
MIN_VISIBLE_FRACTION = 0.4
PLACEMENT_TRIES = 20
MIN_COLOR_DISTANCE = 120.0  # L2 distance in RGB between a fill colour and the background
NOISE_SIGMA = 3.0

_SPLIT_KEYS = {"num_images", "seed", "image_size"}


# ----------------------------------------------------------------------------------------------
# Argument validation
# ----------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    # bool is an Integral too, but "num_images=True" is certainly a bug.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_num_images(num_images) -> int:
    if not _is_int(num_images) or num_images < 1:
        raise ValueError(f"num_images must be an integer >= 1, got {num_images!r}")
    return int(num_images)


def _check_seed(seed) -> int:
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_image_size(image_size) -> Tuple[int, int]:
    ok = (
        isinstance(image_size, Sequence)
        and len(image_size) == 2
        and all(_is_int(s) and s >= MIN_IMAGE_SIDE for s in image_size)
    )
    if not ok:
        raise ValueError(
            f"image_size must be a pair of integers (height, width), each >= {MIN_IMAGE_SIDE}, "
            f"got {image_size!r}"
        )
    return int(image_size[0]), int(image_size[1])


def _check_split(split) -> str:
    # The split name becomes a directory and file name component.
    bad = not isinstance(split, str) or not split or split in (".", "..")
    if bad or os.sep in split or (os.altsep and os.altsep in split):
        raise ValueError(f"split must be a non-empty name without path separators, got {split!r}")
    return split


def _generation_params(split, num_images, image_size, seed) -> dict:
    """Validated parameters that fully determine a split's content (stored in the JSON info)."""
    height, width = _check_image_size(image_size)
    return {
        "generator": "solo.data.shapes",
        "version": GENERATOR_VERSION,
        "split": _check_split(split),
        "num_images": _check_num_images(num_images),
        "seed": _check_seed(seed),
        "image_size": [height, width],
    }


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------


def _sample_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A light base colour with a random linear gradient, as float32 RGB (H, W, 3)."""
    base = rng.integers(160, 256, size=3).astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(0.0, 30.0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Projection on the gradient direction, normalised to roughly [-0.5, 0.5].
    proj = (np.cos(angle) * xs / width + np.sin(angle) * ys / height) / 2.0
    return base[None, None, :] + (amplitude * proj)[..., None]


def _sample_fill_color(rng: np.random.Generator, background: np.ndarray) -> Tuple[int, int, int]:
    """A fill colour far from the background's mean colour, so every shape is clearly visible."""
    reference = background.reshape(-1, 3).mean(axis=0)
    color = rng.integers(0, 256, size=3)
    for _ in range(50):
        if np.linalg.norm(color - reference) >= MIN_COLOR_DISTANCE:
            break
        color = rng.integers(0, 256, size=3)
    else:  # practically unreachable for a light background; keep a deterministic fallback
        color = (255 - reference).astype(np.int64) // 3
    return int(color[0]), int(color[1]), int(color[2])


def _rotated(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _sample_shape(rng: np.random.Generator, height: int, width: int) -> dict:
    """Sample one shape (category, geometry) that lies fully inside the image.

    ``size`` is the diameter of the shape's circumscribed circle, drawn log-uniformly so that
    small and large objects are equally frequent on a relative scale.
    """
    category_id = int(rng.integers(1, len(SHAPES_CATEGORIES) + 1))
    max_size = MAX_OBJECT_FRACTION * min(height, width)
    size = float(np.exp(rng.uniform(np.log(MIN_OBJECT_SIZE), np.log(max_size))))
    radius = size / 2.0
    center = np.array(
        [rng.uniform(radius, width - 1 - radius), rng.uniform(radius, height - 1 - radius)]
    )

    if category_id == 1:  # circle: a filled disc
        return {
            "category_id": category_id,
            "center": (int(round(center[0])), int(round(center[1]))),
            "radius": int(round(radius)),
        }
    if category_id == 2:  # triangle: jittered vertex angles give varied, still obvious triangles
        angles = rng.uniform(0, 2 * np.pi) + np.arange(3) * (2 * np.pi / 3)
        angles = angles + rng.uniform(-0.35, 0.35, size=3)
        vertices = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    else:  # rectangle: half the time axis-aligned, otherwise rotated
        aspect = rng.uniform(0.45, 1.0)
        long_side = size / np.sqrt(1.0 + aspect**2)
        half = np.array([long_side, aspect * long_side]) / 2.0
        vertices = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        angle = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, np.pi)
        vertices = _rotated(vertices, angle)
    vertices = np.round(vertices + center).astype(np.int32)
    return {"category_id": category_id, "vertices": vertices}


def _draw_shape(canvas: np.ndarray, shape: dict, value) -> None:
    """Rasterise ``shape`` into ``canvas`` in place.

    The same routine (aliased, LINE_8) paints both the RGB image and the instance-label map,
    so the annotation masks match the painted pixels exactly.
    """
    if "radius" in shape:
        cv2.circle(
            canvas, shape["center"], shape["radius"], value, thickness=-1, lineType=cv2.LINE_8
        )
    else:
        cv2.fillPoly(canvas, [shape["vertices"]], value, lineType=cv2.LINE_8)


def _has_holes(mask: np.ndarray) -> bool:
    """Whether a binary uint8 mask has holes, i.e. is not the union of its outer contours' fill.

    COCO polygons (and RETR_EXTERNAL contours) cannot express holes, so an instance with a hole
    would be annotated with pixels that belong to another shape.
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 1, thickness=-1)
    return int(np.count_nonzero(filled)) > int(np.count_nonzero(mask))


def _placement_ok(labels: np.ndarray, full_areas: List[int]) -> bool:
    """Whether every instance in ``labels`` (values 1..n) is still well visible and hole-free."""
    for index, full_area in enumerate(full_areas, start=1):
        mask = (labels == index).astype(np.uint8)
        visible = int(np.count_nonzero(mask))
        if visible < max(MIN_VISIBLE_AREA, MIN_VISIBLE_FRACTION * full_area):
            return False
        if visible < full_area and _has_holes(mask):  # unoccluded shapes have no holes
            return False
    return True


def _place_shapes(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[List[dict], np.ndarray]:
    """Sample shapes in drawing order; returns them and the uint8 visible-instance label map.

    Later shapes occlude earlier ones. Candidates that would hide too much of an earlier shape,
    punch a hole into it, or are too small themselves are rejected and resampled, so that every
    annotation is a faithful description of what is visible in the image.
    """
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    labels = np.zeros((height, width), dtype=np.uint8)
    shapes, full_areas = [], []
    for _ in range(num_objects):
        for _ in range(PLACEMENT_TRIES):
            shape = _sample_shape(rng, height, width)
            own = np.zeros_like(labels)
            _draw_shape(own, shape, 1)
            own_area = int(np.count_nonzero(own))
            candidate = labels.copy()
            candidate[own > 0] = len(shapes) + 1
            if _placement_ok(candidate, full_areas + [own_area]):
                labels = candidate
                shapes.append(shape)
                full_areas.append(own_area)
                break
    return shapes, labels


def _render_image(
    rng: np.random.Generator, shapes: List[dict], height: int, width: int
) -> np.ndarray:
    """Paint background and shapes (in order) and add mild noise; returns uint8 RGB (H, W, 3)."""
    background = _sample_background(rng, height, width)
    colors = [_sample_fill_color(rng, background) for _ in shapes]
    canvas = background.copy()
    for shape, color in zip(shapes, colors):
        _draw_shape(canvas, shape, tuple(float(c) for c in color))
    # Noise keeps models from keying on perfectly flat colours.
    canvas += rng.normal(0.0, NOISE_SIGMA, size=canvas.shape).astype(np.float32)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------


def _offset_outline(points: np.ndarray, distance: float) -> np.ndarray:
    """Move every edge of the closed polygon ``points`` (N, 2) outwards by ``distance``.

    A vertex normally moves along the miter of its two edges' outward normals. At sharp turns
    (above 120 degrees, e.g. the 180-degree reversal at the tip of a one-pixel-wide spur) the
    miter would shoot far out or collapse, so the vertex becomes two: a square cap extending
    both edges by ``distance``.
    """
    edges = np.roll(points, -1, axis=0) - points
    directions = edges / np.maximum(np.linalg.norm(edges, axis=1, keepdims=True), 1e-12)
    normals = np.stack([directions[:, 1], -directions[:, 0]], axis=1)
    x, y = points[:, 0], points[:, 1]
    if np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) < 0:  # (dy, -dx) is outward only if CCW
        normals = -normals
    # Edge i runs from vertex i to i + 1, so vertex i joins edge i - 1 ("in") and edge i ("out").
    in_directions, in_normals = np.roll(directions, 1, axis=0), np.roll(normals, 1, axis=0)
    cos_turn = np.sum(in_normals * normals, axis=1)
    outline = []
    for i, vertex in enumerate(points):
        if cos_turn[i] < -0.5:
            outline.append(vertex + distance * (in_normals[i] + in_directions[i]))
            outline.append(vertex + distance * (normals[i] - directions[i]))
        else:
            outline.append(vertex + distance * (in_normals[i] + normals[i]) / (1.0 + cos_turn[i]))
    return np.array(outline)


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a binary uint8 mask as COCO polygons [[x1, y1, x2, y2, ...], ...].

    OpenCV contours run through the *centres* of the boundary pixels, in integer pixel indices.
    In COCO (and pycocotools / Detectron2) coordinates pixel (i, j) covers [i, i + 1) x
    [j, j + 1), so a contour used as-is loses about half of every boundary pixel, which costs
    small instances 20-40% IoU. Shifting by +0.5 (to the pixel centres) and moving the outline
    half a pixel outwards (to the pixel edges) makes the polygon rasterise back to the visible
    mask, so segmentation, ``area`` and ``bbox`` agree. Every polygon has at least 4 vertices,
    even for one- or two-pixel fragments of an occluded shape.
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        centres = contour.reshape(-1, 2).astype(np.float64) + 0.5
        if len(centres) == 1:  # an isolated pixel has no edges to offset: use its square
            outline = centres + np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
        else:  # two-point contours (2-pixel specks) become rectangles through the square caps
            outline = _offset_outline(centres, 0.5)
        # Rounding keeps the JSON compact and its bytes stable across platforms' float noise.
        polygons.append([round(float(v), 2) for v in outline.reshape(-1)])
    return polygons


def _mask_to_bbox(mask: np.ndarray) -> List[float]:
    """Tight COCO box [x, y, w, h] of a non-empty mask, counting whole pixels."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [float(x0), float(y0), float(xs.max() - x0 + 1), float(ys.max() - y0 + 1)]


def _annotate(
    shapes: List[dict], labels: np.ndarray, image_id: int, next_ann_id: int
) -> List[dict]:
    """COCO annotations of the *visible* region of every shape, ids from ``next_ann_id``."""
    annotations = []
    for index, shape in enumerate(shapes, start=1):
        mask = (labels == index).astype(np.uint8)
        area = int(np.count_nonzero(mask))
        polygons = _mask_to_polygons(mask) if area >= MIN_VISIBLE_AREA else []
        if not polygons:  # placement keeps shapes visible; this only guards against regressions
            continue
        annotations.append(
            {
                "id": next_ann_id + len(annotations),
                "image_id": image_id,
                "category_id": shape["category_id"],
                "segmentation": polygons,
                "area": area,
                "bbox": _mask_to_bbox(mask),
                "iscrowd": 0,
            }
        )
    return annotations


# ----------------------------------------------------------------------------------------------
# Generation, caching and locking
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


def _image_root(root: str, split: str) -> str:
    return os.path.join(root, split)


def _build_split(image_dir: str, params: dict) -> dict:
    """Write all images of a split into ``image_dir``; return the COCO dict."""
    height, width = params["image_size"]
    rng = np.random.default_rng(params["seed"])
    images, annotations = [], []
    show_progress = sys.stderr.isatty()
    for index in tqdm(
        range(params["num_images"]), desc=f"shapes/{params['split']}", disable=not show_progress
    ):
        shapes, labels = _place_shapes(rng, height, width)
        image = _render_image(rng, shapes, height, width)
        file_name = f"{index:06d}.png"
        path = os.path.join(image_dir, file_name)
        if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"Could not write {path}")
        image_id = index + 1  # COCO ids start at 1
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        annotations += _annotate(shapes, labels, image_id, next_ann_id=len(annotations) + 1)
    return {
        "info": params,
        "images": images,
        "annotations": annotations,
        "categories": SHAPES_CATEGORIES,
    }


def _install(tmp_dir: str, root: str, split: str) -> None:
    """Move a split generated in ``tmp_dir`` into place.

    The old JSON is removed first and the new one is moved in last: the JSON acts as the commit
    marker, so a reader never sees a JSON whose images are not (yet) in place.
    """
    json_path, image_root = _json_path(root, split), _image_root(root, split)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(json_path)
    if os.path.exists(image_root):
        # Directories cannot be atomically replaced when non-empty: move the old one aside.
        os.replace(image_root, os.path.join(tmp_dir, "old_images"))
    os.replace(os.path.join(tmp_dir, "images"), image_root)
    os.replace(os.path.join(tmp_dir, "instances.json"), json_path)


def generate_shapes_split(
    root: str,
    split: str,
    num_images: int,
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> str:
    """Generate one split into ``root`` (overwriting it); returns the annotation JSON path.

    Writes ``root/<split>/<index:06d>.png`` (colour PNGs) and
    ``root/annotations/instances_<split>.json``.
    The output is a pure function of (split, num_images, image_size, seed): the JSON is
    byte-identical and the pixels identical on every run. Everything is written to a temporary
    directory inside ``root`` first and renamed into place, so an interrupted run never leaves a
    half-written split behind. Prefer :func:`ensure_shapes_split`, which also serialises
    concurrent generation and reuses a valid cache.

    Args:
        root: cache directory (created if missing).
        split: split name, e.g. "train"; used as directory and file name component.
        num_images: number of images, >= 1.
        image_size: (height, width), each >= 32.
        seed: seed of ``numpy.random.default_rng``.
    """
    params = _generation_params(split, num_images, image_size, seed)
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    logger.info(
        f"Generating shapes split '{split}' ({params['num_images']} images of "
        f"{params['image_size'][0]}x{params['image_size'][1]}, seed {params['seed']}) in {root}"
    )
    # Same directory as the target: renames stay on one filesystem and are therefore atomic.
    tmp_dir = tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=root)
    try:
        os.makedirs(os.path.join(tmp_dir, "images"))
        coco = _build_split(os.path.join(tmp_dir, "images"), params)
        with open(os.path.join(tmp_dir, "instances.json"), "w") as f:
            json.dump(coco, f, separators=(",", ":"))
        _install(tmp_dir, root, split)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info(
        f"Generated shapes split '{split}': {len(coco['images'])} images, "
        f"{len(coco['annotations'])} instances in {time.perf_counter() - start:.1f}s"
    )
    return _json_path(root, split)


def _is_valid_cache(root: str, split: str, params: dict) -> bool:
    """Whether ``root`` holds this split generated with exactly ``params``, images included."""
    try:
        with open(_json_path(root, split)) as f:
            coco = json.load(f)
        present = set(os.listdir(_image_root(root, split)))
    except (OSError, ValueError):  # missing, unreadable or truncated
        return False
    if coco.get("info") != params:
        return False
    return all(image["file_name"] in present for image in coco.get("images", []))


@contextlib.contextmanager
def _exclusive_lock(path: str) -> Iterator[None]:
    """Inter-process exclusive lock on ``path`` (a no-op where fcntl is unavailable).

    Without it, all DDP ranks would generate the same split simultaneously; the atomic renames
    would keep the result correct, but at N times the cost.
    """
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_shapes_split(
    root: str,
    split: str,
    num_images: int,
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> str:
    """Make sure ``root`` holds the split with these parameters; returns the JSON path.

    Generates the split if its JSON is missing, was generated with different parameters (they
    are stored in the JSON's "info" field) or some of its images are missing. Safe to call from
    several processes at once: one generates, the others wait on a file lock and then reuse its
    result.
    """
    params = _generation_params(split, num_images, image_size, seed)
    if _is_valid_cache(root, split, params):  # fast path, no lock needed
        return _json_path(root, split)
    os.makedirs(root, exist_ok=True)
    with _exclusive_lock(os.path.join(root, f".{split}.lock")):
        # Another process may have generated the split while we were waiting for the lock.
        if not _is_valid_cache(root, split, params):
            generate_shapes_split(root, split, num_images, image_size, seed)
    return _json_path(root, split)


# ----------------------------------------------------------------------------------------------
# Detectron2 registration
# ----------------------------------------------------------------------------------------------


def _split_spec(name: str, spec: dict) -> dict:
    """Validated keyword arguments of :func:`ensure_shapes_split` for dataset ``name``."""
    if not isinstance(spec, dict):
        raise ValueError(f"splits[{name!r}] must be a dict, got {spec!r}")
    unknown = set(spec) - _SPLIT_KEYS
    if unknown:
        raise ValueError(
            f"splits[{name!r}] has unknown keys {sorted(unknown)}; use {sorted(_SPLIT_KEYS)}"
        )
    missing = {"num_images", "seed"} - set(spec)
    if missing:
        raise ValueError(f"splits[{name!r}] is missing {sorted(missing)}")
    split = name[len("shapes_") :] if name.startswith("shapes_") and name != "shapes_" else name
    # Validate now, so that a bad spec fails at registration time rather than at first use.
    params = _generation_params(
        split, spec["num_images"], spec.get("image_size", DEFAULT_IMAGE_SIZE), spec["seed"]
    )
    return {
        "split": split,
        "num_images": params["num_images"],
        "image_size": tuple(params["image_size"]),
        "seed": params["seed"],
    }


def register_shapes_datasets(
    root: Optional[str] = None, splits: Optional[Dict[str, dict]] = None
) -> List[str]:
    """Register shapes splits with Detectron2's catalogs; returns the dataset names.

    Nothing is generated here: each split is generated on its first ``DatasetCatalog.get(name)``
    (or :func:`ensure_shapes_dataset` call). Names already in ``DatasetCatalog`` are skipped, so
    calling this twice is harmless.

    Args:
        root: cache directory; defaults to :func:`get_shapes_root`.
        splits: dataset name -> dict(num_images=..., seed=..., image_size=(H, W) optional);
            defaults to :data:`SHAPES_SPLITS`. A "shapes_" prefix is stripped from the name to
            get the split's directory name ("shapes_train" -> "<root>/train").
    """
    root = os.path.abspath(root) if root is not None else get_shapes_root()
    splits = SHAPES_SPLITS if splits is None else splits
    specs = {name: _split_spec(name, spec) for name, spec in splits.items()}  # validate all first
    registered = DatasetCatalog.list()
    for name, kwargs in specs.items():
        if name in registered:
            logger.debug(f"Dataset '{name}' is already registered; skipping")
            continue
        # Metadata of a dataset that is no longer in DatasetCatalog (e.g. removed by a test) is
        # stale, and Metadata.set() would refuse to change its json_file.
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        json_file = _json_path(root, kwargs["split"])
        metadata = {
            "thing_classes": list(_THING_CLASSES),
            "thing_dataset_id_to_contiguous_id": dict(_ID_TO_CONTIGUOUS),
            "shapes_root": root,
            "shapes_params": dict(kwargs),
        }
        # register_coco_instances sets exactly the metadata COCO datasets get (json_file,
        # image_root, evaluator_type="coco"), but its loader reads the JSON eagerly on first use.
        # Swap the loader for one that generates the split first.
        register_coco_instances(name, metadata, json_file, _image_root(root, kwargs["split"]))
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, _make_loader(name, root, kwargs))
    return list(specs)


def _make_loader(name: str, root: str, kwargs: dict):
    def load() -> List[dict]:
        json_file = ensure_shapes_split(root, **kwargs)
        return load_coco_json(json_file, _image_root(root, kwargs["split"]), name)

    return load


def ensure_shapes_dataset(dataset_name: str) -> bool:
    """Generate a registered shapes dataset if needed; returns False for non-shapes datasets.

    Call this before building a ``COCOEvaluator`` (which opens ``metadata.json_file`` directly)
    for every test dataset; it is a cheap no-op when the split is already cached.
    """
    if dataset_name not in MetadataCatalog.list():
        return False
    metadata = MetadataCatalog.get(dataset_name)
    params = metadata.get("shapes_params")
    if params is None:
        return False
    ensure_shapes_split(metadata.shapes_root, **params)
    return True
