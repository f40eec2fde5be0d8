"""From grid predictions to final instances (the official ``get_seg_single``, batched).

One :class:`SOLOPostProcessor`, two entry points built from the same step functions
(:func:`grid_scores`, :func:`split_cells`, :func:`mask_areas_and_sums`, :func:`rescore`,
``nms.matrix_nms_from_iou``):

* ``__call__``: the data-dependent eager path (any number of candidates, chunked, pasted);
* :meth:`SOLOPostProcessor.fixed_size`: the same result for one image with shapes fixed by the
  config, which an exported graph holds (:mod:`solo.export`).

Per image: point NMS on the category scores; candidates are the (cell, class) pairs scoring
strictly above ``score_thresh``; their masks (at stride 4) are binarised at ``mask_thresh``; masks
not larger than their level's ``min_mask_areas`` entry (the level stride in the official code) are
dropped; the score is multiplied by the maskness (mean probability inside the binary mask); the
top ``nms_pre`` go through Matrix NMS (or greedy mask NMS); scores >= ``update_thresh`` survive,
at most ``max_per_image``. The survivors' soft masks are upsampled to the padded input, cropped to
the image, resized to the requested output size and binarised.

Memory stays bounded: candidate masks are computed in chunks of at most ``chunk_size``
distinct candidate cells and ``candidate_pool.CHUNK_BYTES`` of float masks (on CPU written into
a buffer kept between calls, :class:`candidate_pool.ChunkBuffers`), keeping only the best
``nms_pre`` so far, and the final full-resolution masks are produced chunk by chunk as booleans.
The final instances' stride-4 soft masks are one (<= ``max_per_image``, h/4, w/4) float tensor
(24 MB at 800x1216, 300 MB at 3000x4000 for 100 instances; kept only within ``CHUNK_BYTES``).

Ties and chunking: exact ties of the rescored score rank in candidate order (cell, then class),
whatever the chunking, here and in :meth:`SOLOPostProcessor.fixed_size` (final order: decayed
score, then that rank). A chunk size can still change a score's sixth digit: products over
another number of rows may round a probability by one ulp (BLAS blocks rows by their count),
flipping a pixel at ``mask_thresh``.

Observability (stable names, read by ``tools/benchmark.py``): the stages run inside
``torch.profiler.record_function`` ranges

* ``solo.postprocess.candidates``: point NMS, score threshold, area filter and top-k pooling;
* ``solo.postprocess.mask_probs``: the candidates' stride-4 mask probabilities (the head's
  callable), and the final instances' (rows of the candidates' when one chunk held them all,
  else computed again);
* ``solo.postprocess.nms``: maskness rescoring and Matrix NMS / mask NMS;
* ``solo.postprocess.paste``: upsampling, cropping and binarising the final masks;

and, when an ``EventStorage`` is active, the scalar ``solo/num_candidates`` is the mean number
per image of candidates competing for the ``nms_pre`` slots (above the score threshold, masks
larger than the level's minimum area).
"""

from typing import Callable, List, Sequence, Tuple
import torch
from torch.profiler import record_function

from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage, has_event_storage

from ..structures import CroppedMasks
from . import candidate_pool
from .candidate_pool import (
    ChunkBuffers,
    accepts_out,
    cell_chunks,
    consecutive_unique,
    ignoring_out,
    masks_and_sums,
    pooled_top_k,
    ranked,
    selected_candidates,
    top_k,
    unique_with_first,
)
from .heads.base import CandidateMaskProbs
from .nms import (
    MATRIX_NMS_KERNELS,
    float_mask_iou,
    mask_areas,
    mask_nms,
    matrix_nms,
    matrix_nms_from_iou,
    points_nms,
)
from .paste import paste_masks

NMS_TYPES = ("matrix", "mask")
MASK_FORMATS = ("bitmask", "cropped")  # TEST.MASK_FORMAT

#: ``mask_probs(image, levels, cells, size, out=None)``: see :meth:`SOLOPostProcessor.__call__`.
MaskProbs = Callable[..., torch.Tensor]

#: :meth:`SOLOPostProcessor.fixed_size`'s outputs, in this order (also the exported graphs').
FIXED_SIZE_OUTPUTS = ("scores", "labels", "masks", "num_detections", "num_candidates")


def grid_scores(cate_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, sum S^2, C) category scores after point NMS, the levels' cells concatenated (flat
    cell ``i * S + j`` within a level), from per-level (N, C, S, S) logits."""
    per_level = [points_nms(x.sigmoid()).permute(0, 2, 3, 1) for x in cate_logits]
    return torch.cat([x.flatten(1, 2) for x in per_level], dim=1)


def split_cells(
    flat_cells: torch.Tensor, cells_per_level: Sequence[int]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(levels, cells): the level index and the flat cell within its level of indices into
    :func:`grid_scores`' concatenated cells (int64 (K,) each). Comparisons, not
    ``searchsorted``, which ONNX lacks."""
    sizes = torch.tensor(list(cells_per_level), device=flat_cells.device)
    ends = sizes.cumsum(0)
    levels = (flat_cells[:, None] >= ends[None, :]).sum(dim=1)
    return levels, flat_cells - (ends - sizes)[levels]


def mask_areas_and_sums(
    probs: torch.Tensor, mask_thresh: float, eager: bool = False, out: torch.Tensor = None
):
    """Binary masks (K, h, w) ``probs > mask_thresh``, their int64 areas (K,) and the float32
    sums (K,) of the probabilities inside them (accumulated in float32: a half-precision sum
    overflows beyond 65504). ``eager`` (the eager path, never traced) takes
    :func:`candidate_pool.masks_and_sums` (row blocks, no full-size copy; same values) and
    counts pixels with :func:`nms.mask_areas`, the masks written into ``out`` (bool,
    ``probs``' shape) if given; ``probs`` is left as it is either way."""
    if eager:  # CPU int8 kernels and row blocks, which no exporter maps
        masks, sums = masks_and_sums(probs, mask_thresh, out)
        return masks, mask_areas(masks), sums
    masks = probs > mask_thresh
    # Zeroing outside the masks gives the same values as multiplying by them (probabilities are
    # >= 0) without converting the bool masks to float first.
    inside = torch.where(masks, probs, 0)
    return masks, masks.flatten(1).sum(dim=1), inside.flatten(1).sum(dim=1, dtype=torch.float32)


def rescore(scores: torch.Tensor, areas: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """Category scores times maskness (mean probability inside the binary mask); an empty mask
    counts as area 1 (it never survives the area filter)."""
    return scores * (sums / areas.clamp(min=1))


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
        chunk_size: int = 512,
        paste_chunk_size: int = 4,
        mask_format: str = "bitmask",
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
        self._buffers = ChunkBuffers()
        self.paste_chunk_size = paste_chunk_size
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"TEST.MASK_FORMAT={mask_format!r} is not one of {MASK_FORMATS}.")
        self.mask_format = mask_format  # "cropped": pred_masks as solo.structures.CroppedMasks

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
            "mask_format": cfg.TEST.MASK_FORMAT,
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
            mask_probs: ``mask_probs(image, levels, cells, size, out=None)`` -> (K, *size)
                float mask probabilities of K candidates (int64 level index and flat cell
                i * S + j) of image ``image`` at ``size`` (stride 4 of ``padded_size``), e.g.
                the head's ``inference_mask_probs`` bound to its outputs. On CPU ``out`` is a
                (K, *size) view of a buffer kept between calls that the callable may write its
                result into and return (the next call overwrites it); the returned tensor is
                what is used.
            padded_size: (H, W) of the padded input canvas, pixels.
            image_sizes: per image, (h, w) of the image inside the canvas.
            output_sizes: per image, (height, width) of the wanted output.
        Returns:
            per image, ``Instances(output_size)`` with bool ``pred_masks``, ``scores``, int64
            ``pred_classes`` and ``pred_boxes``, sorted by descending score.
        """
        buffered = accepts_out(mask_probs)
        if not buffered:  # a head written before ``out=``: called as then, no kept buffer
            mask_probs = ignoring_out(mask_probs)
        with record_function("solo.postprocess.candidates"):
            scores = grid_scores(cate_logits)  # (N, sum S^2, C)
        cells_per_level = [x.shape[-2] * x.shape[-1] for x in cate_logits]
        results, candidate_counts = [], []
        for i, (image_size, out_size) in enumerate(zip(image_sizes, output_sizes)):
            result, count = self._single_image(
                mask_probs, i, scores[i], cells_per_level, padded_size, image_size, out_size,
                buffered,
            )  # fmt: skip
            if self.mask_format == "cropped" and not len(result):
                result.pred_masks = CroppedMasks.empty(out_size, result.scores.device)
            results.append(result)
            candidate_counts.append(count)
        if has_event_storage() and candidate_counts:
            get_event_storage().put_scalar(
                "solo/num_candidates", sum(candidate_counts) / len(candidate_counts)
            )
        return results

    def _single_image(
        self, mask_probs, image, scores, cells_per_level, padded_size, image_size, output_size,
        buffered,
    ) -> Tuple[Instances, int]:  # fmt: skip
        """The image's instances, and the number of candidates competing for nms_pre."""
        device = scores.device
        stride4_size = (padded_size[0] // 4, padded_size[1] // 4)
        chunk = self.rows_per_chunk(stride4_size)
        with record_function("solo.postprocess.candidates"):
            flat_cells, labels = (scores > self.score_thresh).nonzero(as_tuple=True)
            cand_scores = scores[flat_cells, labels]
            levels, cells = split_cells(flat_cells, cells_per_level)
            min_areas = self._min_areas(device)[levels]

        # Mask, area filter and maskness rescoring, chunk by chunk (bounded memory); only the
        # binary masks are pooled, as computed (rows index the kept candidates' masks), cut to
        # the best nms_pre when the pool holds more than 2 * nms_pre masks; NMS reads their rows.
        # The final soft masks are rows of the chunk's probabilities when there was one chunk
        # (its masks and those rows then go to kept buffers too), else computed again.
        # Chunks hold at most ``chunk`` distinct cells; a cell above the threshold for several
        # classes is one mask. Candidates are in cell order (nonzero()), so repeats are adjacent.
        candidates = torch.arange(len(cand_scores), device=device)
        pool, num_candidates = [], 0
        chunks = cell_chunks(flat_cells, chunk)
        one_chunk = len(chunks) <= 1

        def kept(rows, like, slot, dtype=None):
            return self._buffers.take(rows, stride4_size, like, slot, dtype) if one_chunk else None

        for start, end in chunks:
            part = slice(start, end)
            unique, first, inverse = consecutive_unique(flat_cells[part])
            with record_function("solo.postprocess.mask_probs"):
                out = self._buffers.take(len(unique), stride4_size, scores) if buffered else None
                probs = mask_probs(
                    image, levels[part][first], cells[part][first], stride4_size, out=out
                )
            with record_function("solo.postprocess.nms"):
                out = kept(len(unique), probs, "masks", torch.bool)
                masks, areas, inside = mask_areas_and_sums(probs, self.mask_thresh, True, out)
                # Each candidate's row in the chunk's masks (0..U-1 without repeated cells).
                rows = inverse if len(unique) < len(inverse) else candidates[: len(unique)]
                areas, inside = areas[rows], inside[rows]
                keep = areas > min_areas[part]
                rescored = rescore(cand_scores[part][keep], areas[keep], inside[keep])
            with record_function("solo.postprocess.candidates"):
                pool.append(
                    (
                        masks,
                        rows[keep],
                        rescored,
                        labels[part][keep],
                        candidates[part][keep],
                        areas[keep].float(),
                    )
                )
                num_candidates += len(rescored)
                if sum(len(p[0]) for p in pool) > 2 * self.nms_pre:
                    pool = [pooled_top_k(pool, self.nms_pre)]
        if not pool:
            return _empty_instances(output_size, device), num_candidates
        with record_function("solo.postprocess.candidates"):
            pooled = pooled_top_k(pool, self.nms_pre, gather=False)
            masks, ranked, cand_scores, labels, candidates, areas = pooled
        if len(cand_scores) == 0:
            return _empty_instances(output_size, device), num_candidates

        with record_function("solo.postprocess.nms"):
            if self.nms_type == "matrix":
                kernel, sigma = self.matrix_nms_kernel, self.matrix_nms_sigma
                cand_scores = matrix_nms(masks, labels, cand_scores, kernel, sigma, areas, ranked)
                keep = cand_scores >= self.update_thresh
            else:
                keep = mask_nms(masks, labels, cand_scores, self.mask_nms_iou_thresh, areas, ranked)
                keep &= cand_scores >= self.update_thresh
            candidates, cand_scores, labels = top_k(
                (candidates[keep], cand_scores[keep], labels[keep]),
                score_index=1,
                k=self.max_per_image,
            )
        if len(cand_scores) == 0:
            return _empty_instances(output_size, device), num_candidates
        with record_function("solo.postprocess.mask_probs"):
            if one_chunk:  # its probabilities are still there
                index, out = rows[candidates], kept(len(candidates), probs, "final")
                probs = (
                    probs[index] if out is None else torch.index_select(probs, 0, index, out=out)
                )
            else:
                chosen = (levels, cells, flat_cells, candidates)
                probs = self._recompute(mask_probs, image, chosen, stride4_size, scores, buffered)

        result = Instances(output_size)
        with record_function("solo.postprocess.paste"):
            result.pred_masks, result.pred_boxes = paste_masks(
                probs, padded_size, image_size, output_size, self.mask_thresh,
                self.paste_chunk_size, compact=self.mask_format == "cropped",
            )  # fmt: skip
        result.scores = cand_scores
        result.pred_classes = labels
        return result, num_candidates

    def rows_per_chunk(self, stride4_size: Tuple[int, int]) -> int:
        """How many distinct candidate cells' (h, w) float probabilities are computed at a time
        (:func:`candidate_pool.cell_chunks`): ``chunk_size``, fewer when they would exceed
        ``candidate_pool.CHUNK_BYTES``."""
        pixels = stride4_size[0] * stride4_size[1]
        return max(1, min(self.chunk_size, candidate_pool.CHUNK_BYTES // (4 * max(pixels, 1))))

    def _recompute(self, mask_probs, image, candidates, size, like, buffered):
        """The (K, *size) probabilities of K candidates given as ``(levels, cells, flat_cells,
        indices)`` (indices (K,) into the first three), each repeated cell computed once."""
        levels, cells, flat_cells, candidates = candidates
        unique, first, inverse = unique_with_first(flat_cells[candidates])
        chosen = candidates[first] if len(unique) < len(inverse) else candidates
        out = self._buffers.take(len(chosen), size, like) if buffered else None
        probs = mask_probs(image, levels[chosen], cells[chosen], size, out=out)
        return probs[inverse] if len(unique) < len(inverse) else probs  # unique: ascending cells

    def _min_areas(self, device) -> torch.Tensor:
        return torch.tensor(self.min_mask_areas, device=device, dtype=torch.float32)

    def check_fixed_size(self, max_candidates: int) -> None:
        """Raise ValueError when :meth:`fixed_size` cannot reproduce this post-processor."""
        if self.nms_type != "matrix":
            raise ValueError(
                f"MODEL.SOLO.NMS_TYPE={self.nms_type!r} (greedy mask NMS) has a number of "
                "suppression steps that depends on the data, so it has no fixed-size form. Use "
                "MODEL.SOLO.NMS_TYPE matrix (Matrix NMS, the SOLOv2 default)."
            )
        if max_candidates < 1:
            raise ValueError(f"max_candidates (K0) must be >= 1, got {max_candidates}.")

    def fixed_size(
        self,
        cate_logits: Sequence[torch.Tensor],
        mask_probs: CandidateMaskProbs,
        max_candidates: int,
    ) -> Tuple[torch.Tensor, ...]:
        """This post-processor (Matrix NMS) for image 0 with shapes fixed by the config only.

        Args:
            cate_logits: per level, (1, C, S, S) category logits.
            mask_probs: ``(levels, cells) -> (K, h, w)`` float mask probabilities at stride 4
                of K candidates given by their level and flat cell index ``i * S + j`` (int64),
                e.g. a head's ``fixed_size_mask_probs``.
            max_candidates: K0, the number of (cell, class) pairs given a mask.

        Returns:
            the :data:`FIXED_SIZE_OUTPUTS`: scores (D,) float, labels (D,) int64, masks
            (D, h, w) soft masks, num_detections and num_candidates (0-dim int64), with
            D = min(max_per_image, nms_pre, K0, sum S^2 * C). Rows ``num_detections`` and
            later are padding (score -1). The first ``num_detections`` rows are ``__call__``'s
            instances in its order (descending score) whenever ``num_candidates <= K0``.

        Raises:
            ValueError: greedy mask NMS, or K0 < 1 (:meth:`check_fixed_size`).
        """
        self.check_fixed_size(max_candidates)
        scores = grid_scores(cate_logits)[0]  # (sum S^2, C)
        num_classes = scores.shape[1]
        flat = scores.flatten()
        above = flat > self.score_thresh
        num_candidates = above.sum()

        # Static top K0 over every (cell, class) pair: the official candidates are those above
        # the threshold, marked valid; the rest of the K0 is padding that cannot survive, -inf
        # so that it ranks last (a NaN score, which topk ranks first, too).
        flat = torch.where(above, flat, float("-inf"))
        k0 = min(max_candidates, flat.numel())
        cand_scores, pairs = selected_candidates(flat, k0)
        valid = cand_scores > self.score_thresh
        cells_per_level = [x.shape[-2] * x.shape[-1] for x in cate_logits]
        levels, cells = split_cells(pairs // num_classes, cells_per_level)
        labels = pairs % num_classes

        probs = mask_probs(levels, cells)  # (K0, h, w)
        masks, areas, inside = mask_areas_and_sums(probs, self.mask_thresh)
        keep = valid & (areas > self._min_areas(probs.device)[levels])
        # Padding rows sort below every candidate: a kept score is > SCORE_THRESH * MASK_THRESH.
        rescored = torch.where(keep, rescore(cand_scores, areas, inside), -1.0)

        k1 = min(self.nms_pre, k0)
        rescored, order = ranked(rescored, k1)
        iou = float_mask_iou(masks[order], areas[order].to(probs.dtype))
        decayed = matrix_nms_from_iou(
            iou, labels[order], rescored, self.matrix_nms_kernel, self.matrix_nms_sigma
        )
        # Padding rows come last, so they never decay a candidate.
        final = (rescored > -1) & (decayed >= self.update_thresh)
        k2 = min(self.max_per_image, k1)
        det_scores, det = ranked(torch.where(final, decayed, -1.0), k2)
        num_detections = final.sum().clamp(max=k2)
        chosen = order[det]
        return det_scores, labels[chosen], probs[chosen], num_detections, num_candidates


def _empty_instances(output_size, device) -> Instances:
    result = Instances(output_size)
    result.pred_masks = torch.zeros((0, *output_size), dtype=torch.bool, device=device)
    result.scores = torch.zeros((0,), device=device)
    result.pred_classes = torch.zeros((0,), dtype=torch.long, device=device)
    result.pred_boxes = Boxes(torch.zeros((0, 4), device=device))
    return result
