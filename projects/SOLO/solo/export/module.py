"""The exportable module: normalisation, backbone, head and the fixed-size post-processing
that runs inside an exported graph (see :mod:`solo.export`)."""

import logging
import numpy as np
from typing import Callable, Dict, Sequence, Tuple
import torch
from torch import nn

from ..modeling.heads import SOLOHeadBase
from ..modeling.heads.decoupled_head import DecoupledSOLOHead, DecoupledSOLOLightHead
from ..modeling.heads.solo_head import SOLOHead
from ..modeling.heads.solov2_head import SOLOv2Head
from ..modeling.layers import resize
from ..modeling.nms import MATRIX_NMS_KERNELS, matrix_nms_from_iou, points_nms
from .formats import ExportError

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Fixed-size post-processing (inside the graph)
# ----------------------------------------------------------------------------------------------


def fixed_size_postprocess(
    cate_logits: Sequence[torch.Tensor],
    mask_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    max_candidates: int,
    min_mask_areas: Sequence[float],
    score_thresh: float,
    mask_thresh: float,
    nms_pre: int,
    update_thresh: float,
    matrix_nms_kernel: str,
    matrix_nms_sigma: float,
    max_per_image: int,
) -> Tuple[torch.Tensor, ...]:
    """``SOLOPostProcessor`` (Matrix NMS) for one image with shapes fixed by the config only.

    Args:
        cate_logits: per level, (1, C, S, S) category logits.
        mask_probs: ``(levels, cells) -> (K, h, w)`` float mask probabilities at stride 4 of K
            candidates given by their level and flat cell index ``i * S + j`` (int64 tensors).
        max_candidates: K0, the number of (cell, class) pairs given a mask.
        Others: the ``SOLOPostProcessor`` arguments of the same name.

    Returns:
        scores (D,) float, labels (D,) int64, masks (D, h, w) soft masks, num_detections and
        num_candidates (0-dim int64), with
        D = min(TEST.DETECTIONS_PER_IMAGE, NMS_PRE, K0, sum S^2 * C).
        Rows ``num_detections`` and later are padding (score -1). The first ``num_detections``
        rows are the eager post-processor's instances in its order (descending score) whenever
        ``num_candidates <= K0``.
    """
    if matrix_nms_kernel not in MATRIX_NMS_KERNELS:
        raise ValueError(
            f"Unknown Matrix NMS kernel {matrix_nms_kernel!r}; expected {MATRIX_NMS_KERNELS}."
        )
    device = cate_logits[0].device
    per_level = [points_nms(x.sigmoid())[0].permute(1, 2, 0).flatten(0, 1) for x in cate_logits]
    scores = torch.cat(per_level)  # (sum S^2, C)
    num_classes = scores.shape[1]
    flat = scores.flatten()
    num_candidates = (flat > score_thresh).sum()

    # Static top K0 over every (cell, class) pair: the official candidates are those above the
    # threshold, marked valid; the rest of the K0 is padding that cannot survive.
    k0 = min(max_candidates, flat.numel())
    cand_scores, pairs = flat.topk(k0)
    valid = cand_scores > score_thresh
    flat_cells, labels = pairs // num_classes, pairs % num_classes
    cells_per_level = [x.shape[-2] * x.shape[-1] for x in cate_logits]
    level_ends = torch.tensor(np.cumsum(cells_per_level).tolist(), device=device)
    levels = (flat_cells[:, None] >= level_ends[None, :]).sum(dim=1)  # no searchsorted in ONNX
    level_starts = level_ends - torch.tensor(cells_per_level, device=device)
    cells = flat_cells - level_starts[levels]

    probs = mask_probs(levels, cells)  # (K0, h, w)
    masks = probs > mask_thresh
    areas = masks.flatten(1).sum(dim=1)
    inside = (probs * masks).flatten(1).sum(dim=1)
    min_areas = torch.tensor(list(min_mask_areas), device=device, dtype=torch.float32)
    keep = valid & (areas > min_areas[levels])
    # Padding rows sort below every candidate: a kept score is > SCORE_THRESH * MASK_THRESH.
    rescored = torch.where(keep, cand_scores * inside / areas.clamp(min=1), -1.0)

    k1 = min(nms_pre, k0)
    rescored, order = rescored.topk(k1)
    kept = rescored > -1
    masks_f = masks[order].flatten(1).to(probs.dtype)
    decayed = _matrix_nms(
        masks_f, labels[order], rescored, areas[order].to(probs.dtype), matrix_nms_kernel,
        matrix_nms_sigma,
    )  # fmt: skip
    # Padding rows come last, so they never decay a candidate.
    final = kept & (decayed >= update_thresh)
    k2 = min(max_per_image, k1)
    det_scores, det = torch.where(final, decayed, -1.0).topk(k2)
    num_detections = final.sum().clamp(max=k2)
    chosen = order[det]
    return det_scores, labels[chosen], probs[chosen], num_detections, num_candidates


def _matrix_nms(masks, labels, scores, areas, kernel: str, sigma: float) -> torch.Tensor:
    """``solo.nms.matrix_nms`` on (K, P) 0/1 float masks sorted by descending score.

    Same formula; the intersections are one float product (exact counts below 2^24 pixels)
    because ``nms.mask_iou_matrix`` uses int8 kernels that no exporter maps.
    """
    inter = masks @ masks.t()
    union = areas[:, None] + areas[None, :] - inter
    iou = inter / union.clamp(min=1e-6)
    return matrix_nms_from_iou(iou, labels, scores, kernel, sigma)


# ----------------------------------------------------------------------------------------------
# Fixed-size mask probabilities of K candidates, per head family
# ----------------------------------------------------------------------------------------------
# The heads' own ``inference_mask_probs`` group candidates by level with ``nonzero`` (their
# number is data-dependent); these compute the same probabilities with static shapes.


def _solov2_mask_probs(head: SOLOv2Head, outputs, size):
    # Already fixed-size: one gather of the dynamic kernels and one matrix product.
    return lambda levels, cells: head.inference_mask_probs(outputs, 0, levels, cells, size)


def _decoupled_mask_probs(head, outputs, size):
    # All S column maps X and S row maps Y of every level, at stride 4 (2 * sum S maps, fewer
    # than K0), then one gather and product per candidate: the official sigmoid -> upsample ->
    # multiply order.
    xs = torch.cat([resize(x.sigmoid(), size)[0] for x, _ in outputs.mask_outputs])
    ys = torch.cat([resize(y.sigmoid(), size)[0] for _, y in outputs.mask_outputs])
    grids = head.num_grids
    device = xs.device
    offsets = torch.tensor(np.cumsum([0] + grids[:-1]).tolist(), device=device)
    grid = torch.tensor(grids, device=device)

    def probs(levels, cells):
        rows, cols = cells // grid[levels], cells % grid[levels]
        return xs[offsets[levels] + cols] * ys[offsets[levels] + rows]

    return probs


def _solo_mask_probs(head: SOLOHead, outputs, size):
    # Channel k of level l's 1x1 conv is row k of its weight: gather the K candidates' rows from
    # all levels, apply them to every level's features and keep each candidate's own level
    # (the levels' features differ in size, so a per-level gather would be data-dependent).
    weight = torch.cat([conv.weight.flatten(1) for conv in head.mask_preds])
    bias = torch.cat([conv.bias for conv in head.mask_preds])
    sizes = [s * s for s in head.num_grids]
    offsets = torch.tensor(np.cumsum([0] + sizes[:-1]).tolist(), device=weight.device)

    def probs(levels, cells):
        rows = offsets[levels] + cells
        w, b = weight[rows], bias[rows]
        out = None
        for level, features in enumerate(outputs.mask_outputs):
            h, wd = features.shape[-2:]
            logits = (w @ features[0].flatten(1) + b[:, None]).view(-1, h, wd)
            p = resize(logits.sigmoid()[None], size)[0]
            out = p if out is None else torch.where((levels == level)[:, None, None], p, out)
        return out

    return probs


#: Head class -> ``(head, outputs, stride4_size) -> mask_probs(levels, cells)``. A new head
#: registers its fixed-size version here (subclasses inherit their parent's entry).
FIXED_SIZE_MASK_PROBS: Dict[type, Callable] = {
    SOLOv2Head: _solov2_mask_probs,
    DecoupledSOLOHead: _decoupled_mask_probs,
    DecoupledSOLOLightHead: _decoupled_mask_probs,
    SOLOHead: _solo_mask_probs,
}


def _fixed_size_mask_probs_fn(head: SOLOHeadBase) -> Callable:
    for cls in type(head).__mro__:
        if cls in FIXED_SIZE_MASK_PROBS:
            return FIXED_SIZE_MASK_PROBS[cls]
    raise ExportError(
        f"Head {type(head).__name__} has no fixed-size mask function for export: add one to "
        "solo.export.FIXED_SIZE_MASK_PROBS."
    )


# ----------------------------------------------------------------------------------------------
# The exported module
# ----------------------------------------------------------------------------------------------


def _postprocess_args(postprocessor, max_candidates: int) -> dict:
    if postprocessor.nms_type != "matrix":
        raise ExportError(
            f"MODEL.SOLO.NMS_TYPE={postprocessor.nms_type!r} (greedy mask NMS) cannot be exported: "
            "its number of suppression steps depends on the data. Export with "
            "MODEL.SOLO.NMS_TYPE matrix (Matrix NMS, the SOLOv2 default)."
        )
    if max_candidates < 1:
        raise ExportError(f"max_candidates (K0) must be >= 1, got {max_candidates}.")
    return dict(
        max_candidates=int(max_candidates),
        min_mask_areas=[float(a) for a in postprocessor.min_mask_areas],
        score_thresh=float(postprocessor.score_thresh),
        mask_thresh=float(postprocessor.mask_thresh),
        nms_pre=int(postprocessor.nms_pre),
        update_thresh=float(postprocessor.update_thresh),
        matrix_nms_kernel=postprocessor.matrix_nms_kernel,
        matrix_nms_sigma=float(postprocessor.matrix_nms_sigma),
        max_per_image=int(postprocessor.max_per_image),
    )


class SOLOExportModule(nn.Module):
    """Normalisation + backbone + head + :func:`fixed_size_postprocess` for one padded image.

    ``forward(image)``: (1, 3, H, W) float32 pixels in INPUT.FORMAT, H and W multiples of
    ``size_divisibility``, padding filled with the pixel mean (which normalises to exactly the 0
    that the eager model pads with). Returns the outputs of :func:`fixed_size_postprocess`.

    Raises :class:`ExportError` for greedy mask NMS or a head without a fixed-size mask function.
    """

    def __init__(self, model: nn.Module, max_candidates: int):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.in_features = list(model.head_in_features)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), False)
        self.postprocess_args = _postprocess_args(model.postprocessor, max_candidates)
        self.mask_probs_fn = _fixed_size_mask_probs_fn(model.head)
        self.size_divisibility = max(int(model.backbone.size_divisibility), 1)

    def forward(self, image: torch.Tensor):
        x = (image - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        outputs = self.head([features[f] for f in self.in_features])
        size = (x.shape[-2] // 4, x.shape[-1] // 4)
        mask_probs = self.mask_probs_fn(self.head, outputs, size)
        return fixed_size_postprocess(outputs.cate_logits, mask_probs, **self.postprocess_args)
