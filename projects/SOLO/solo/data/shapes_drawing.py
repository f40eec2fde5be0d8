"""Drawing one scene of the procedural "shapes" dataset (:mod:`solo.data.shapes`): the
categories, random placement with occlusion rules, rasterisation and exact COCO RLE annotations.
Every function draws from the ``numpy`` generator it is given only, so a split is a pure
function of its seed. :mod:`solo.data.panoptic_shapes` draws its things with the same
functions."""

import numpy as np
from typing import List, Tuple
import cv2
from pycocotools import mask as mask_util

__all__ = [
    "SHAPES_CATEGORIES",
    "annotate",
    "draw_image",
    "draw_shape",
    "place_shapes",
]

# COCO-style categories; ids start at 1 as in COCO, names in id order.
SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "triangle", "supercategory": "shape"},
    {"id": 3, "name": "rectangle", "supercategory": "shape"},
]

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


def sample_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A light base colour with a random linear gradient, as float32 RGB (H, W, 3)."""
    base = rng.integers(160, 256, size=3).astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(0.0, 30.0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    # Projection on the gradient direction, normalised to roughly [-0.5, 0.5].
    proj = (np.cos(angle) * xs / width + np.sin(angle) * ys / height) / 2.0
    return base[None, None, :] + (amplitude * proj)[..., None]


def sample_fill_color(rng: np.random.Generator, background: np.ndarray) -> Tuple[float, ...]:
    """A fill colour far from the background's mean colour, so every shape is clearly visible."""
    reference = background.reshape(-1, 3).mean(axis=0)
    color = rng.integers(0, 256, size=3)
    for _ in range(50):
        if np.linalg.norm(color - reference) >= MIN_COLOR_DISTANCE:
            break
        color = rng.integers(0, 256, size=3)
    else:  # practically unreachable for a light background; keep a deterministic fallback
        color = (255 - reference).astype(np.int64) // 3
    return tuple(float(c) for c in color)


def sample_shape(rng: np.random.Generator, height: int, width: int) -> dict:
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
        center = (int(round(center[0])), int(round(center[1])))
        return {"category_id": category_id, "center": center, "radius": int(round(radius))}
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
        c, s = np.cos(angle), np.sin(angle)
        vertices = vertices @ np.array([[c, s], [-s, c]])
    vertices = np.round(vertices + center).astype(np.int32)
    return {"category_id": category_id, "vertices": vertices}


def draw_shape(canvas: np.ndarray, shape: dict, value) -> None:
    """Rasterise ``shape`` into ``canvas`` in place.

    The same routine (aliased, LINE_8) paints both the RGB image and the instance-label map,
    so the annotation masks are exactly the painted pixels.
    """
    if "radius" in shape:
        cv2.circle(canvas, shape["center"], shape["radius"], value, -1, lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(canvas, [shape["vertices"]], value, lineType=cv2.LINE_8)


def place_shapes(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[List[dict], np.ndarray]:
    """Sample shapes in drawing order; returns them and the uint8 visible-instance label map
    (H, W): 0 for the background, ``i + 1`` where shape ``i`` is visible.

    Later shapes occlude earlier ones, which may leave an earlier shape with holes (RLE masks
    represent them exactly). A candidate that would leave any shape, itself included, with fewer
    visible pixels than ``MIN_VISIBLE_AREA`` or ``MIN_VISIBLE_FRACTION`` of its own area is
    rejected and resampled.
    """
    num_objects = 0 if rng.random() < EMPTY_IMAGE_PROB else int(rng.integers(1, MAX_OBJECTS + 1))
    labels = np.zeros((height, width), dtype=np.uint8)
    shapes, full_areas = [], []
    for _ in range(num_objects):
        for _ in range(PLACEMENT_TRIES):
            shape = sample_shape(rng, height, width)
            own = np.zeros_like(labels)
            draw_shape(own, shape, 1)
            candidate = np.where(own > 0, np.uint8(len(shapes) + 1), labels)
            full = np.array(full_areas + [np.count_nonzero(own)])
            visible = np.bincount(candidate.ravel(), minlength=len(full) + 1)[1:]
            if np.all(visible >= np.maximum(MIN_VISIBLE_AREA, MIN_VISIBLE_FRACTION * full)):
                labels = candidate
                shapes.append(shape)
                full_areas.append(int(full[-1]))
                break
    return shapes, labels


def draw_image(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """One image: uint8 RGB (H, W, 3), its uint8 label map (H, W) and the category id of each
    label ``1..N``. Draws from ``rng`` only, so a split is a pure function of its seed."""
    shapes, labels = place_shapes(rng, height, width)
    canvas = sample_background(rng, height, width)
    colors = [sample_fill_color(rng, canvas) for _ in shapes]
    for shape, color in zip(shapes, colors):
        draw_shape(canvas, shape, color)
    # Noise keeps models from keying on perfectly flat colours.
    canvas += rng.normal(0.0, NOISE_SIGMA, size=canvas.shape).astype(np.float32)
    image = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
    return image, labels, [s["category_id"] for s in shapes]


def annotate(
    labels: np.ndarray, category_ids: List[int], image_id: int, first_id: int
) -> List[dict]:
    """COCO annotations (ids from ``first_id``) of the visible region of every label 1..N, with
    exact masks as compressed RLE and ``area``/``bbox`` computed by pycocotools from them."""
    if not category_ids:
        return []
    masks = labels[..., None] == np.arange(1, len(category_ids) + 1, dtype=np.uint8)
    rles = mask_util.encode(np.asfortranarray(masks.astype(np.uint8)))
    areas, boxes = mask_util.area(rles), mask_util.toBbox(rles)
    return [
        {
            "id": first_id + i,
            "image_id": image_id,
            "category_id": category_id,
            "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            "area": int(areas[i]),
            "bbox": [float(v) for v in boxes[i]],
            "iscrowd": 0,
        }
        for i, (category_id, rle) in enumerate(zip(category_ids, rles))
    ]
