"""From grid predictions to final instances (the official ``get_seg_single``, batched).

Per image: point NMS on the category scores; candidates are the (cell, class) pairs scoring
strictly above ``score_thresh``; their masks (at stride 4) are binarised at ``mask_thresh``; masks
not larger than their level's ``min_mask_areas`` entry (the level stride in the official code) are
dropped; the score is multiplied by the maskness (mean probability inside the binary mask); the
top ``nms_pre`` go through Matrix NMS (or greedy mask NMS); scores >= ``update_thresh`` survive,
at most ``max_per_image``. The survivors' soft masks are upsampled to the padded input, cropped to
the image, resized to the requested output size and binarised.

Memory stays bounded: candidate masks are computed in chunks, keeping only the best ``nms_pre``
so far, and the final full-resolution masks are produced chunk by chunk as booleans.

Observability (stable names, read by ``tools/benchmark.py``): the stages run inside
``torch.profiler.record_function`` ranges

* ``solo.postprocess.candidates``: point NMS, score threshold, area filter and top-k pooling;
* ``solo.postprocess.mask_probs``: the candidates' stride-4 mask probabilities (the head's
  callable), for the candidates and again for the final instances;
* ``solo.postprocess.nms``: maskness rescoring and Matrix NMS / mask NMS;
* ``solo.postprocess.paste``: upsampling, cropping and binarising the final masks;

and, when an ``EventStorage`` is active, the scalar ``solo/num_candidates`` is the mean number
per image of candidates competing for the ``nms_pre`` slots (above the score threshold, masks
larger than the level's minimum area).
"""

from typing import Callable, List, Sequence, Tuple
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage, has_event_storage

from .nms import MATRIX_NMS_KERNELS, mask_nms, matrix_nms, points_nms
from .paste import paste_masks

NMS_TYPES = ("matrix", "mask")

#: ``mask_probs(image, levels, cells, size)``: see :meth:`SOLOPostProcessor.__call__`.
MaskProbs = Callable[[int, torch.Tensor, torch.Tensor, Tuple[int, int]], torch.Tensor]


class SOLOPostProcessor:
    """Per-image instances from category logits and a mask-probability callable."""

    @configurable
    def __init__(
        self,
        *,
        min_mask_areas: Sequence[float],
        score_thresh: float = 0.1,
        mask_thresh: float = 0.5,
        nms_pre: int = 500,
        update_thresh: float = 0.05,
        nms_type: str = "matrix",
        matrix_nms_kernel: str = "gaussian",
        matrix_nms_sigma: float = 2.0,
        mask_nms_iou_thresh: float = 0.5,
        max_per_image: int = 100,
        chunk_size: int = 128,
        paste_chunk_size: int = 4,
    ):
        for key, value, allowed in [
            ("NMS_TYPE", nms_type, NMS_TYPES),
            ("MATRIX_NMS_KERNEL", matrix_nms_kernel, MATRIX_NMS_KERNELS),
        ]:
            if value not in allowed:
                raise ValueError(f"MODEL.SOLO.{key}={value!r} is not one of {allowed}.")
        self.min_mask_areas = list(min_mask_areas)
        self.score_thresh = score_thresh
        self.mask_thresh = mask_thresh
        self.nms_pre = nms_pre
        self.update_thresh = update_thresh
        self.nms_type = nms_type
        self.matrix_nms_kernel = matrix_nms_kernel
        self.matrix_nms_sigma = matrix_nms_sigma
        self.mask_nms_iou_thresh = mask_nms_iou_thresh
        self.max_per_image = max_per_image
        self.chunk_size = chunk_size
        self.paste_chunk_size = paste_chunk_size

    @classmethod
    def from_config(cls, cfg, level_strides: Sequence[int]):
        c = cfg.MODEL.SOLO
        return {
            # Empty: the official rule, which reuses the level strides as minimum areas.
            "min_mask_areas": list(c.MIN_MASK_AREAS) or list(level_strides),
            "score_thresh": c.SCORE_THRESH,
            "mask_thresh": c.MASK_THRESH,
            "nms_pre": c.NMS_PRE,
            "update_thresh": c.UPDATE_THRESH,
            "nms_type": c.NMS_TYPE,
            "matrix_nms_kernel": c.MATRIX_NMS_KERNEL,
            "matrix_nms_sigma": c.MATRIX_NMS_SIGMA,
            "mask_nms_iou_thresh": c.MASK_NMS_IOU_THRESH,
            "max_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @torch.no_grad()
    def __call__(
        self,
        cate_logits: Sequence[torch.Tensor],
        mask_probs: MaskProbs,
        padded_size: Tuple[int, int],
        image_sizes: Sequence[Tuple[int, int]],
        output_sizes: Sequence[Tuple[int, int]],
    ) -> List[Instances]:
        """
        Args:
            cate_logits: per level, (N, C, S, S) category logits of the N images.
            mask_probs: ``mask_probs(image, levels, cells, size)`` -> (K, *size) float mask
                probabilities of K candidates (int64 level index and flat cell i * S + j) of
                image ``image`` at ``size`` (stride 4 of ``padded_size``), e.g. the head's
                ``inference_mask_probs`` bound to its outputs.
            padded_size: (H, W) of the padded input canvas, pixels.
            image_sizes: per image, (h, w) of the image inside the canvas.
            output_sizes: per image, (height, width) of the wanted output.
        Returns:
            per image, ``Instances(output_size)`` with bool ``pred_masks``, ``scores``, int64
            ``pred_classes`` and ``pred_boxes``, sorted by descending score.
        """
        with record_function("solo.postprocess.candidates"):
            per_level = [points_nms(x.sigmoid()).permute(0, 2, 3, 1) for x in cate_logits]
            scores = torch.cat([x.flatten(1, 2) for x in per_level], dim=1)  # (N, sum S^2, C)
        cells_per_level = [x.shape[-2] * x.shape[-1] for x in cate_logits]
        results, candidate_counts = [], []
        for i, (image_size, out_size) in enumerate(zip(image_sizes, output_sizes)):
            result, count = self._single_image(
                mask_probs, i, scores[i], cells_per_level, padded_size, image_size, out_size
            )
            results.append(result)
            candidate_counts.append(count)
        if has_event_storage() and candidate_counts:
            get_event_storage().put_scalar(
                "solo/num_candidates", sum(candidate_counts) / len(candidate_counts)
            )
        return results

    def _single_image(
        self, mask_probs, image, scores, cells_per_level, padded_size, image_size, output_size
    ) -> Tuple[Instances, int]:
        """The image's instances, and the number of candidates competing for nms_pre."""
        device = scores.device
        stride4_size = (padded_size[0] // 4, padded_size[1] // 4)
        with record_function("solo.postprocess.candidates"):
            flat_cells, labels = (scores > self.score_thresh).nonzero(as_tuple=True)
            cand_scores = scores[flat_cells, labels]
            level_sizes = torch.tensor(cells_per_level, device=device)
            level_ends = level_sizes.cumsum(0)
            levels = torch.searchsorted(level_ends, flat_cells, right=True)
            cells = flat_cells - (level_ends - level_sizes)[levels]
            min_areas = torch.tensor(self.min_mask_areas, device=device, dtype=torch.float)
            min_areas = min_areas[levels]

        # Mask, area filter and maskness rescoring, chunk by chunk (bounded memory).
        # Only the binary masks are pooled; the soft masks of the few final instances are
        # recomputed at the end, which is cheaper than carrying nms_pre float masks around.
        # The pool is cut to the best nms_pre only when it doubles: masks are copied O(1) times.
        candidates = torch.arange(len(cand_scores), device=device)
        pool, num_candidates = [], 0
        for start in range(0, len(cand_scores), self.chunk_size):
            part = slice(start, start + self.chunk_size)
            with record_function("solo.postprocess.mask_probs"):
                probs = mask_probs(image, levels[part], cells[part], stride4_size)
            with record_function("solo.postprocess.nms"):
                masks = probs > self.mask_thresh
                areas = masks.flatten(1).sum(dim=1)
                # Sum of the probabilities above the threshold (in place: the heads return
                # fresh tensors), accumulated in float32 (a half-precision sum overflows beyond
                # 65504).
                inside = F.threshold_(probs, self.mask_thresh, 0.0).flatten(1)
                inside = inside.sum(dim=1, dtype=torch.float32)
                keep = areas > min_areas[part]
                maskness = inside[keep] / areas[keep]
            with record_function("solo.postprocess.candidates"):
                pool.append(
                    (
                        masks[keep],
                        cand_scores[part][keep] * maskness,
                        labels[part][keep],
                        candidates[part][keep],
                        areas[keep].float(),
                    )
                )
                num_candidates += len(pool[-1][1])
                if sum(len(p[1]) for p in pool) > 2 * self.nms_pre:
                    pool = [_top_k(_concat(pool), score_index=1, k=self.nms_pre)]
        if not pool:
            return _empty_instances(output_size, device), num_candidates
        with record_function("solo.postprocess.candidates"):
            masks, cand_scores, labels, candidates, areas = _top_k(
                _concat(pool), score_index=1, k=self.nms_pre
            )
        if len(cand_scores) == 0:
            return _empty_instances(output_size, device), num_candidates

        with record_function("solo.postprocess.nms"):
            if self.nms_type == "matrix":
                cand_scores = matrix_nms(
                    masks, labels, cand_scores, self.matrix_nms_kernel, self.matrix_nms_sigma, areas
                )
                keep = cand_scores >= self.update_thresh
            else:
                keep = mask_nms(masks, labels, cand_scores, self.mask_nms_iou_thresh, areas)
                keep &= cand_scores >= self.update_thresh
            candidates, cand_scores, labels = _top_k(
                (candidates[keep], cand_scores[keep], labels[keep]),
                score_index=1,
                k=self.max_per_image,
            )
        if len(cand_scores) == 0:
            return _empty_instances(output_size, device), num_candidates
        with record_function("solo.postprocess.mask_probs"):
            probs = mask_probs(image, levels[candidates], cells[candidates], stride4_size)

        result = Instances(output_size)
        with record_function("solo.postprocess.paste"):
            result.pred_masks, result.pred_boxes = self._paste_masks(
                probs, padded_size, image_size, output_size
            )
        result.scores = cand_scores
        result.pred_classes = labels
        return result, num_candidates

    def _paste_masks(self, probs, padded_size, image_size, output_size):
        return paste_masks(
            probs, padded_size, image_size, output_size, self.mask_thresh, self.paste_chunk_size
        )


def _concat(parts):
    return tuple(torch.cat(p) for p in zip(*parts))


def _top_k(tensors, score_index: int, k: int):
    """Sort ``tensors`` (a tuple of aligned tensors) by descending score and keep the first k."""
    order = torch.argsort(tensors[score_index], descending=True)[:k]
    return tuple(t[order] for t in tensors)


def _empty_instances(output_size, device) -> Instances:
    result = Instances(output_size)
    result.pred_masks = torch.zeros((0, *output_size), dtype=torch.bool, device=device)
    result.scores = torch.zeros((0,), device=device)
    result.pred_classes = torch.zeros((0,), dtype=torch.long, device=device)
    result.pred_boxes = Boxes(torch.zeros((0, 4), device=device))
    return result
