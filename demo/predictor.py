"""Predictor and visualisation helpers for ``demo/demo.py`` (Detectron2's demo layout).

``Predictor`` is Detectron2's ``DefaultPredictor`` (BGR in, ``INPUT.FORMAT`` conversion, test-time
resizing, checkpoint loading) with two SOLO-demo conveniences; ``VisualizationDemo`` runs it on
images and video frames and draws the instances with Detectron2's visualizers.
"""

import logging
from typing import Iterator, Optional, Tuple

import cv2
import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

import solo  # noqa: F401  (registers the SOLO meta-architecture, heads and backbone)

logger = logging.getLogger(__name__)


class _NoResize(T.Augmentation):
    def get_transform(self, image):
        return T.NoOpTransform()


class Predictor(DefaultPredictor):
    """``DefaultPredictor`` for SOLO models.

    Differences from the parent, both for running demos with hand-made configs:

    * ``INPUT.MIN_SIZE_TEST == 0`` means "no resizing" (as in Detectron2's test data loader),
      where ``DefaultPredictor`` would resize to a 0-pixel short side.
    * An empty ``MODEL.WEIGHTS`` is reported as a warning: the predictions are then those of a
      randomly initialised model.

    Call it with a BGR ``uint8`` image of shape (H, W, 3); it returns ``{"instances": Instances}``
    at the input's size with ``pred_masks`` (bool), ``scores``, ``pred_classes`` and
    ``pred_boxes``, on ``MODEL.DEVICE``.
    """

    def __init__(self, cfg):
        if not cfg.MODEL.WEIGHTS:
            logger.warning("MODEL.WEIGHTS is empty: predicting with randomly initialised weights.")
        super().__init__(cfg)
        if cfg.INPUT.MIN_SIZE_TEST == 0:
            self.aug = _NoResize()

    def __call__(self, original_image: np.ndarray):
        if original_image.ndim != 3 or original_image.shape[2] != 3:
            raise ValueError(
                f"Predictor expects a BGR image of shape (H, W, 3), got {original_image.shape}"
            )
        return super().__call__(original_image)


def get_metadata(cfg):
    """Metadata (class names) of the first test dataset, or an empty one when there is none."""
    return MetadataCatalog.get(cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused")


def filter_by_score(instances: Instances, threshold: float) -> Instances:
    """Keep instances scoring at least ``threshold`` (the demo's only change to predictions)."""
    return instances[instances.scores >= threshold]


def nothing_to_draw(instances: Instances) -> bool:
    """Whether the original image can be kept as the drawing.

    Rendering through matplotlib (``VisImage.get_image``) shifts a few edge pixels by one even
    when nothing is drawn, so images without instances are passed through untouched instead.
    """
    return len(instances) == 0


class VisualizationDemo:
    """Runs a :class:`Predictor` and draws its instances (masks, class names, scores).

    Args:
        cfg: a SOLO config (``solo.add_solo_config`` applied, file and opts merged).
        confidence_threshold: instances scoring below it are dropped before drawing. The model's
            own thresholds (``MODEL.SOLO.SCORE_THRESH``/``UPDATE_THRESH``) are left untouched.
        instance_mode: Detectron2 ``ColorMode`` (``IMAGE`` or ``IMAGE_BW``).
    """

    def __init__(self, cfg, confidence_threshold: float = 0.0, instance_mode=ColorMode.IMAGE):
        self.metadata = get_metadata(cfg)
        self.confidence_threshold = confidence_threshold
        self.instance_mode = instance_mode
        self.predictor = Predictor(cfg)

    def predict(self, image: np.ndarray) -> Instances:
        """Instances of a BGR image, on the CPU, filtered by the confidence threshold."""
        instances = self.predictor(image)["instances"].to(torch.device("cpu"))
        return filter_by_score(instances, self.confidence_threshold)

    def draw(self, image: np.ndarray, instances: Instances) -> np.ndarray:
        """Draw (CPU) instances on a BGR image; returns a new BGR image of the same size."""
        if nothing_to_draw(instances):
            return image.copy()
        # Visualizer works in RGB.
        visualizer = Visualizer(image[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        drawn = visualizer.draw_instance_predictions(predictions=instances)
        return np.ascontiguousarray(drawn.get_image()[:, :, ::-1])

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

        ``VideoVisualizer`` keeps an instance's colour from frame to frame (matched by box IoU),
        so objects do not flicker between colours as ``Visualizer`` would make them. With
        ``draw=False`` the frame is ``None``: drawing (matplotlib) can cost more than the model.
        """
        visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            instances = self.predict(frame)
            if not draw:
                yield instances, None
            elif nothing_to_draw(instances):
                yield instances, frame
            else:
                drawn = visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
                yield instances, cv2.cvtColor(drawn.get_image(), cv2.COLOR_RGB2BGR)
