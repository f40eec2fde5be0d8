"""Drawing for ``demo/demo.py`` (Detectron2's demo layout): ``VisualizationDemo`` runs
:class:`solo.engine.Predictor` on images and video frames and draws what it finds.

Drawings are made to be read: images whose short side is under :data:`MIN_DRAWN_SHORT_SIDE`
are enlarged by a whole factor (pixels stay sharp) before drawing, so that labels are legible
on a 160x128 image; each class (in a video: each track) keeps one colour of :data:`PALETTE`
from run to run and runtime to runtime, replaced by the next palette colour only where it would
not stand out from the pixels it covers (a navy mask over a navy uniform); labels sit at the top
left above their mask, inside the image, moved up or down where they would cover another label.
A panoptic model's stuff and things are drawn by Detectron2's ``Visualizer``.
"""

import math
import numpy as np
from typing import Iterator, List, Optional, Sequence, Tuple
import cv2
import torch

from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from solo.engine.predictor import Predictor, get_metadata
from solo.engine.tracking import MaskIoUTracker

# Bright, mutually distinct colours (RGB; Trubetskoy's list without its dark and grey entries).
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (170, 255, 195),
    (255, 215, 180),
)
MIN_DRAWN_SHORT_SIDE = 480
MASK_ALPHA = 0.55
# Smallest RGB distance between a mask's colour and the mean colour of the pixels it covers.
MIN_CONTRAST = 100.0


def filter_by_score(instances: Instances, threshold: float) -> Instances:
    """Keep instances scoring at least ``threshold`` (the demo's only change to predictions)."""
    return instances[instances.scores >= threshold]


def drawing_scale(height: int, width: int) -> int:
    """The whole factor by which an image is enlarged before drawing (1 for large images)."""
    short = max(1, min(height, width))
    return 1 if short >= MIN_DRAWN_SHORT_SIDE else math.ceil(MIN_DRAWN_SHORT_SIDE / short)


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """Repeat each pixel ``scale`` x ``scale`` times (nearest neighbour)."""
    if scale == 1:
        return image.copy()
    return np.ascontiguousarray(image.repeat(scale, axis=0).repeat(scale, axis=1))


def pick_colors(image_rgb: np.ndarray, masks: np.ndarray, keys: Sequence[int]) -> List[tuple]:
    """One RGB colour per instance: ``PALETTE[key % len(PALETTE)]`` for its key (class or track
    id), unless the mean colour under that key's masks is closer than :data:`MIN_CONTRAST`;
    then the next palette colour that is far enough (the farthest if none is). The same key gets
    the same colour within an image; the result depends only on pixels and predictions."""
    chosen = {}
    for key in sorted(set(keys)):
        union = masks[[k == key for k in keys]].any(axis=0)
        under = image_rgb[union].reshape(-1, 3).astype(np.float64)
        mean = under.mean(axis=0) if len(under) else np.full(3, -1e3)
        order = [PALETTE[(key + j) % len(PALETTE)] for j in range(len(PALETTE))]
        distances = [float(np.linalg.norm(np.subtract(c, mean))) for c in order]
        far = [c for c, d in zip(order, distances) if d >= MIN_CONTRAST]
        chosen[key] = far[0] if far else order[int(np.argmax(distances))]
    return [chosen[k] for k in keys]


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_labels(
    anchors: Sequence[Tuple[int, int]], sizes: Sequence[Tuple[int, int]], width: int, height: int
) -> List[Tuple[int, int]]:
    """Top-left corners for labels of ``sizes`` (w, h), wanted at ``anchors`` (x, y), in order of
    priority: each is kept inside the image and, where it would cover a label placed before it,
    moved up by label heights to the first free place (down if there is none above)."""
    placed, corners = [], []
    for (x, y), (w, h) in zip(anchors, sizes):
        x = int(min(max(x, 0), max(width - w, 0)))
        rows = range(1, height // max(h, 1) + 1)
        steps = [0] + [-k for k in rows] + list(rows)  # up first: away from the object below
        candidates = [int(min(max(y + s * h, 0), max(height - h, 0))) for s in steps]
        free = [
            c for c in candidates if not any(_overlaps((x, c, x + w, c + h), p) for p in placed)
        ]
        top = free[0] if free else candidates[0]
        placed.append((x, top, x + w, top + h))
        corners.append((x, top))
    return corners


def label_texts(instances: Instances, class_names: Optional[Sequence[str]]) -> List[str]:
    """``"#7 circle 93%"`` (track id when tracked, class name or index, score)."""
    texts = []
    ids = instances.ID if instances.has("ID") else [None] * len(instances)
    for track_id, label, score in zip(ids, instances.pred_classes.tolist(), instances.scores):
        name = class_names[label] if class_names else str(label)
        prefix = f"#{track_id} " if track_id is not None else ""
        texts.append(f"{prefix}{name} {100 * float(score):.0f}%")
    return texts


def draw_instances(
    image_bgr: np.ndarray, instances: Instances, class_names: Optional[Sequence[str]] = None
) -> np.ndarray:
    """Draw CPU ``instances`` (``pred_masks``, ``pred_classes``, ``scores``; ``ID`` if tracked)
    on a BGR image; returns a new BGR image enlarged by :func:`drawing_scale`."""
    scale = drawing_scale(*image_bgr.shape[:2])
    canvas = enlarge(image_bgr, scale)
    if len(instances) == 0:
        return canvas
    masks = instances.pred_masks.numpy().astype(bool)
    keys = list(instances.ID) if instances.has("ID") else instances.pred_classes.tolist()
    colors = pick_colors(image_bgr[:, :, ::-1], masks, keys)
    height, width = canvas.shape[:2]
    line = max(1, round(min(height, width) / 300))
    # Large masks first, so that small ones stay visible on top of them.
    for index in np.argsort(-masks.reshape(len(masks), -1).sum(axis=1), kind="stable"):
        mask = enlarge(masks[index].astype(np.uint8), scale)
        color_bgr = np.array(colors[index][::-1], dtype=np.float32)
        region = mask.astype(bool)
        blended = canvas[region] * (1 - MASK_ALPHA) + color_bgr * MASK_ALPHA
        canvas[region] = blended.round().astype(np.uint8)
        contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, tuple(int(c) for c in color_bgr), line)
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, min(1.5, max(0.6, min(height, width) / 700))
    thickness = 1 if font_scale < 0.8 else 2
    texts = label_texts(instances, class_names)
    sizes, anchors = [], []
    for text, mask in zip(texts, masks):
        (w, h), baseline = cv2.getTextSize(text, font, font_scale, thickness)
        sizes.append((w + 4, h + baseline + 4))
        ys, xs = np.nonzero(mask)
        # Just above the mask, so that the label does not hide a small object.
        top = int(ys.min()) * scale - sizes[-1][1] if len(ys) else 0
        anchors.append((int(xs.min()) * scale if len(xs) else 0, top))
    order = np.argsort(-instances.scores.numpy(), kind="stable")  # best first: best places
    corners = place_labels([anchors[i] for i in order], [sizes[i] for i in order], width, height)
    for index, (x, y) in zip(order, corners):
        (w, h), color = sizes[index], colors[index]
        cv2.rectangle(canvas, (x, y), (x + w - 1, y + h - 1), color[::-1], -1)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        baseline_y = y + h - 2 - cv2.getTextSize(texts[index], font, font_scale, thickness)[1]
        cv2.putText(
            canvas, texts[index], (x + 2, baseline_y), font, font_scale, ink, thickness, cv2.LINE_AA
        )
    return canvas


class VisualizationDemo:
    """Runs a :class:`Predictor` and draws its instances (masks, class names, scores).

    Args:
        cfg: a SOLO config (``solo.add_solo_config`` applied, file and opts merged).
        confidence_threshold: instances scoring below it are dropped before drawing. The model's
            own thresholds (``MODEL.SOLO.SCORE_THRESH``/``UPDATE_THRESH``) are left untouched.
        instance_mode: Detectron2 ``ColorMode`` for panoptic drawings (``IMAGE``, ``IMAGE_BW``).
        class_names: names to draw (or one COCO JSON file), see :func:`get_metadata`.
    """

    def __init__(
        self,
        cfg,
        confidence_threshold: float = 0.0,
        instance_mode=ColorMode.IMAGE,
        class_names: Optional[Sequence[str]] = None,
    ):
        self.metadata = get_metadata(cfg, class_names)
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.predictor = Predictor(cfg)
        #: A panoptic model's (PanopticSOLOv2) ``panoptic_seg`` of the last predicted image,
        #: which :meth:`draw` draws instead of the instances; None for instance models.
        self.panoptic_seg = None

    def predict(self, image: np.ndarray) -> Instances:
        """Instances of a BGR image, on the CPU, filtered by the confidence threshold."""
        output = self.predictor(image)
        self.panoptic_seg = output.get("panoptic_seg")
        instances = output["instances"].to(torch.device("cpu"))
        return filter_by_score(instances, self.confidence_threshold)

    def draw(self, image: np.ndarray, instances: Instances) -> np.ndarray:
        """Draw (CPU) instances on a BGR image (:func:`draw_instances`: enlarged when small).
        After a panoptic model's prediction: its stuff and things (``panoptic_seg``, things
        merged by MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH), as Detectron2's demo
        draws them, enlarged by the same whole factor as instances (Visualizer's labels are
        unreadable and cut at the border on a 160x128 image)."""
        if self.panoptic_seg is not None:
            ids, segments = self.panoptic_seg
            scale = drawing_scale(*image.shape[:2])
            ids = ids.to(torch.device("cpu"))
            ids = ids.repeat_interleave(scale, dim=0).repeat_interleave(scale, dim=1)
            visualizer = Visualizer(
                enlarge(image, scale)[:, :, ::-1], self.metadata, instance_mode=self.instance_mode
            )
            drawn = visualizer.draw_panoptic_seg(ids, segments)
            return np.ascontiguousarray(drawn.get_image()[:, :, ::-1])
        return draw_instances(image, instances, self.metadata.get("thing_classes"))

    def run_on_image(self, image: np.ndarray) -> Tuple[Instances, np.ndarray]:
        """Predict on a BGR image and draw the result.

        Returns:
            the (CPU, filtered) instances and the drawn BGR image.
        """
        instances = self.predict(image)
        return instances, self.draw(image, instances)

    def run_on_video(
        self, video: cv2.VideoCapture, draw: bool = True
    ) -> Iterator[Tuple[Instances, Optional[np.ndarray]]]:
        """Yield ``(instances, drawn BGR frame)`` for each frame of an opened ``VideoCapture``.

        Instances carry ``ID``, a track id that persists from frame to frame
        (:class:`solo.engine.tracking.MaskIoUTracker`); each id is drawn in one colour. With
        ``draw=False`` the frame is ``None``.
        """
        tracker = MaskIoUTracker()
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            instances = tracker.update(self.predict(frame))
            yield instances, (self.draw(frame, instances) if draw else None)
