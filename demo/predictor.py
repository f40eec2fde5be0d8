"""Drawing for ``demo/demo.py`` (Detectron2's demo layout): ``VisualizationDemo`` runs
:class:`solo.engine.Predictor` on images and video frames and draws the instances with
Detectron2's visualizers."""

import numpy as np
from typing import Iterator, Optional, Sequence, Tuple
import cv2
import torch

from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer

from solo.engine.predictor import Predictor, get_metadata


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
        """Draw (CPU) instances on a BGR image; returns a new BGR image of the same size. After
        a panoptic model's prediction: its stuff and things (``panoptic_seg``, things merged by
        MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH), as Detectron2's demo draws them."""
        if self.panoptic_seg is not None:
            ids, segments = self.panoptic_seg
            visualizer = Visualizer(
                image[:, :, ::-1], self.metadata, instance_mode=self.instance_mode
            )
            drawn = visualizer.draw_panoptic_seg(ids.to(torch.device("cpu")), segments)
            return np.ascontiguousarray(drawn.get_image()[:, :, ::-1])
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
