"""Instance ids that persist across video frames, matched by mask IoU.

Detectron2's trackers (``detectron2.tracking``) match boxes: ``BBoxIOUTracker`` greedily in
pair order (not by IoU), and the Hungarian ones keep an assignment even when its cost is the
"no match" value, so a new object far away can inherit a vanished one's id. SOLO predicts masks,
whose IoU separates objects that share a box (a ring and its centre, crossing bars).
:class:`MaskIoUTracker` follows Detectron2's ``BaseTracker`` contract (``update(instances)``
returns them with an ``ID`` list) with an optimal assignment (``scipy``'s
``linear_sum_assignment``) on mask IoU, restricted to the same class and to IoU at least the
threshold; a track that goes unmatched is kept for ``max_lost_frames`` frames, so that an object
missed in one frame gets its id back.
"""

import numpy as np
from typing import Dict, List
import torch

from detectron2.config import configurable
from detectron2.structures import Instances
from detectron2.tracking.base_tracker import BaseTracker

from scipy.optimize import linear_sum_assignment

__all__ = ["MaskIoUTracker", "mask_iou"]


def mask_iou(masks: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """IoU of every pair of bool masks: (N, H, W) x (M, H, W) -> (N, M) float32."""
    a = masks.flatten(1).float()
    b = others.flatten(1).float()
    intersection = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - intersection
    return intersection / union.clamp(min=1.0)


class MaskIoUTracker(BaseTracker):
    """Assigns ``instances.ID`` (a list of ints, Detectron2's tracker field) frame by frame.

    Args:
        iou_threshold: lowest mask IoU between an instance and a track's last mask for the two
            to be the same object.
        max_lost_frames: frames a track survives without a match.
        same_class: only match instances of the track's class.
    """

    @configurable
    def __init__(self, *, iou_threshold: float = 0.3, max_lost_frames: int = 5, same_class=True):
        super().__init__()
        self.iou_threshold = iou_threshold
        self.max_lost_frames = max_lost_frames
        self.same_class = same_class
        self._next_id = 0
        # id -> (last mask (H, W) bool, class, frames since it was last matched)
        self._tracks: Dict[int, tuple] = {}

    @classmethod
    def from_config(cls, cfg):
        heads = cfg.get("TRACKER_HEADS", {})
        return {
            "iou_threshold": heads.get("TRACK_IOU_THRESHOLD", 0.3),
            "max_lost_frames": heads.get("MAX_LOST_FRAME_COUNT", 5),
        }

    def update(self, instances: Instances) -> Instances:
        """Give each of a frame's CPU ``instances`` (``pred_masks``, ``pred_classes``) an id."""
        ids: List[int] = [-1] * len(instances)
        track_ids = list(self._tracks)
        if len(instances) and track_ids:
            last = torch.stack([self._tracks[i][0] for i in track_ids])
            iou = mask_iou(instances.pred_masks, last).numpy()
            if self.same_class:
                track_classes = np.array([self._tracks[i][1] for i in track_ids])
                iou[instances.pred_classes.numpy()[:, None] != track_classes[None, :]] = 0.0
            rows, cols = linear_sum_assignment(iou, maximize=True)
            for row, col in zip(rows, cols):
                if iou[row, col] >= self.iou_threshold:  # an assignment is not yet a match
                    ids[row] = track_ids[col]
        matched = set(ids)
        for track_id in track_ids:  # age the tracks left unmatched; forget the old ones
            if track_id not in matched:
                mask, label, lost = self._tracks[track_id]
                if lost + 1 > self.max_lost_frames:
                    del self._tracks[track_id]
                else:
                    self._tracks[track_id] = (mask, label, lost + 1)
        for index in range(len(instances)):
            if ids[index] < 0:
                ids[index] = self._next_id
                self._next_id += 1
            mask = instances.pred_masks[index]
            self._tracks[ids[index]] = (mask, int(instances.pred_classes[index]), 0)
        instances.ID = ids
        return instances
