"""Pasting SOLO's stride-4 soft masks into bool masks at the output resolution, and their boxes:
one implementation for the eager post-processor and the exported models' runtime.

The official ``get_seg_single`` upsamples every mask over the whole padded input, crops it to the
image, resizes it to the output size and thresholds it. Bilinear resizing is a convex combination
of the two nearest samples per axis, so an output pixel can pass the threshold only where one of
its source samples could: outside the low-resolution box of (probability > threshold), widened
by the reach of each resize stage, the mask is False. :func:`paste_masks` resizes only what that
region needs, batched across instances, with ATen's own kernel, so every kept pixel gets the
same source coordinate, weights, neighbours and arithmetic as in the full computation:

* output size = image size (one stage, stride 4 -> padded input, an exact x4): each mask's
  low-resolution box, with a margin sample per side, is resized alone; offsets are multiples of
  the x4, so the source coordinates shift by whole samples;
* output size != image size (two stages): ATen's source coordinate ``scale * (dst + 0.5) - 0.5``
  cannot be shifted, so both stages are anchored at the image's top-left corner and stop at the
  region's far corner (the second one with the full call's scale passed explicitly).

Crops stay large enough (H + W > 128) for ATen's generic kernel, the one the full-size call
takes. :func:`region_paste_support` compares the shortcut with the full computation once per
process and device type on a seeded probe; where they differ, the full computation runs.
Masks no longer depend on how instances were chunked: the full computation's result did, in the
last float bit, for a chunk of exactly 3 masks resized by a single thread (ATen's channels-last
kernel).
"""

import logging
import math
import numpy as np
from typing import Dict, Iterator, List, Optional
import torch

from detectron2.structures import Boxes

from ..structures import CroppedMasks
from .layers import resize

__all__ = ["masks_to_boxes", "paste_masks", "region_paste_support"]

logger = logging.getLogger(__name__)

# Low-resolution probabilities this far (relative) below the threshold are left out of a mask's
# region: a bilinear combination of values <= t * (1 - margin) stays below t after float rounding
# (its weights sum to 1 within a few ulp per stage).
THRESH_MARGIN = 1e-4
# The shortcut runs when its resizes cover at most this fraction of the whole masks' pixels
# (masks spread over the image gain nothing from it, and it has more steps).
REGION_WORK = 0.5
# ATen resizes outputs with H + W <= 128 with its channels-last kernel, which rounds differently
# from the generic one: crops (and images, for the shortcut) must be larger.
MIN_GENERIC_SIDES = 129


def paste_masks(
    probs: torch.Tensor,
    padded_size,
    image_size,
    output_size,
    mask_thresh: float,
    chunk_size: int = 4,
    compact: bool = False,
):
    """Stride-4 soft masks (K, h, w) -> bool masks at ``output_size`` and their tight boxes.

    As the official ``get_seg_single``: upsample to the padded input (``padded_size``), crop to
    the image (``image_size``), resize to ``output_size`` (when it differs), binarise with
    ``mask_thresh`` (strict). Only the region where a mask can be True is computed (module
    docstring); the result is bit-identical to resizing the whole masks.

    Args:
        probs: (K, h, w) float mask probabilities at stride 4 of ``padded_size``.
        padded_size, image_size, output_size: (H, W) in pixels.
        mask_thresh: probability threshold.
        chunk_size: memory budget: at most ``chunk_size`` full padded-size float masks' worth of
            pixels is resized at a time.
        compact: return a :class:`~solo.structures.CroppedMasks` (each mask as its tight box's
            crop) instead of the (K, H, W) tensor; memory then follows the objects' areas.
    Returns:
        ``(masks, boxes)``: (K, *output_size) bool tensor (or ``CroppedMasks``) on ``probs``'
        device and :class:`Boxes` (K, 4) XYXY, x2/y2 exclusive, zeros for an empty mask.
    """
    output_size = (int(output_size[0]), int(output_size[1]))
    image_size = (int(image_size[0]), int(image_size[1]))
    plan = _worthwhile_plan(probs, padded_size, image_size, output_size, mask_thresh)
    if plan is None and not compact:  # whole masks thresholded straight into the output
        out = torch.empty((len(probs), *output_size), dtype=torch.bool, device=probs.device)
        boxes = [torch.zeros((0, 4), device=probs.device)]
        for start, values in _full_values(probs, padded_size, image_size, output_size, chunk_size):
            part = out[start : start + len(values)]
            if values.shape == part.shape:
                torch.gt(values, mask_thresh, out=part)
            else:  # an image larger than the canvas: ATen's shape error, not a resized view
                part[:] = values > mask_thresh
            boxes.append(masks_to_boxes(part).tensor)
        return out, Boxes(torch.cat(boxes))
    if plan is None:
        parts = _full_parts(probs, padded_size, image_size, output_size, mask_thresh, chunk_size)
    else:
        budget = chunk_size * max(math.prod(padded_size), math.prod(output_size))
        parts = _region_parts(probs, plan, image_size, output_size, mask_thresh, budget)
    k = len(probs)
    boxes = torch.zeros((k, 4), device=probs.device)
    if compact:
        crops: List[Optional[torch.Tensor]] = [None] * k
        out = None
    else:
        out = _zeros_bool((k, *output_size), probs.device)
    for index, origin, part in parts:
        local = masks_to_boxes(part).tensor  # (G, 4)
        nonempty = local[:, 2:3] > 0
        boxes[index] = torch.where(nonempty, local + origin.repeat(1, 2).to(local), local)
        rows = zip(index.tolist(), origin.tolist(), local.int().tolist())
        for g, (i, (x0, y0), (bx1, by1, bx2, by2)) in enumerate(rows):
            crop = part[g, by1:by2, bx1:bx2]
            if compact:
                crops[i] = crop.clone()  # not a view: the part's buffer is freed
            elif bx2 > 0:
                out[i, y0 + by1 : y0 + by2, x0 + bx1 : x0 + bx2] = crop
    if not compact:
        return out, Boxes(boxes)
    empty = torch.zeros((0, 0), dtype=torch.bool, device=probs.device)
    crops = [c if c is not None else empty for c in crops]
    return CroppedMasks(crops, boxes[:, :2].long(), output_size), Boxes(boxes)


def _zeros_bool(shape, device) -> torch.Tensor:
    """An all-False bool tensor. On CPU from calloc'ed memory (numpy's zeros): the pages the
    crops never write are not touched here, where torch.zeros writes every byte of the
    (K, H, W) masks (mostly False, one page fault per 4 KiB) before the crops are copied in."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.zeros(shape, dtype=np.bool_))
    return torch.zeros(shape, dtype=torch.bool, device=device)


def masks_to_boxes(masks: torch.Tensor) -> Boxes:
    """Tight XYXY boxes of (N, H, W) bool masks (x2, y2 exclusive, as ``BitMasks``), vectorised;
    empty masks get an all-zero box."""
    n, h, w = masks.shape
    # amax over a uint8 view is several times faster than any() on bool on CPU.
    as_bytes = masks.view(torch.uint8)
    cols, rows = as_bytes.amax(dim=1) > 0, as_bytes.amax(dim=2) > 0  # (N, W), (N, H)
    x1 = cols.float().argmax(dim=1)
    x2 = w - cols.flip(1).float().argmax(dim=1)
    y1 = rows.float().argmax(dim=1)
    y2 = h - rows.flip(1).float().argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()
    return Boxes(boxes * cols.any(dim=1, keepdim=True))


def _worthwhile_plan(probs, padded_size, image_size, output_size, thresh):
    """The regions (:func:`_plan_regions`) when the shortcut applies and saves work (they cost
    at most :data:`REGION_WORK` of the whole masks' resizes), else None."""
    two_stages = image_size != output_size
    usable = (
        len(probs) > 0
        and probs.dtype == torch.float32
        and tuple(padded_size) == (4 * probs.shape[1], 4 * probs.shape[2])
        and sum(padded_size) >= MIN_GENERIC_SIDES
        and (not two_stages or sum(output_size) >= MIN_GENERIC_SIDES)
        and (not two_stages or _explicit_scales(image_size, output_size) is not None)
        and region_paste_support(probs.device)
    )
    if not usable:
        return None
    plan = _plan_regions(probs, image_size, output_size, thresh)
    rows, cols, index = plan
    work = 16 * (rows["crop"][1] - rows["crop"][0]) * (cols["crop"][1] - cols["crop"][0])
    full = math.prod(padded_size)
    if two_stages:  # stage 2 anchored at (0, 0)
        work = work + rows["out"][1] * cols["out"][1]
        full += math.prod(output_size)
    return plan if int(work[index].sum()) <= REGION_WORK * len(probs) * full else None


def _region_parts(probs, plan, image_size, output_size, thresh, budget):
    """:func:`_full_parts`' contract from the regions: each part is False outside its
    instances' output ranges."""
    for index, origin, values, keep in _region_values(probs, plan, image_size, output_size, budget):
        yield index, origin, (values > thresh) & _inside(values.shape, origin, keep)


def _full_values(probs, padded_size, image_size, output_size, chunk_size):
    """Yields ``(start, values)``: the float output values (G, *output_size) of instances
    start.. start + G, the whole masks as the official code computes them, ``chunk_size`` at a
    time (small chunks: the full-resolution floats exist for a few instances at a time and the
    chunk's memory is reused, not page-faulted afresh)."""
    h, w = image_size
    for start in range(0, len(probs), chunk_size):
        part = resize(probs[start : start + chunk_size][None], tuple(padded_size))[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            part = resize(part, tuple(output_size))
        yield start, part[0]


def _full_parts(probs, padded_size, image_size, output_size, thresh, chunk_size):
    """Yields ``(index, origin, part)``: (G,) int64 instance indices, (G, 2) int64 (x0, y0) and
    (G, h, w) bool masks, instance ``index[g]``'s output mask on rows y0.., columns x0.. (False
    elsewhere); here the whole masks (:func:`_full_values`)."""
    for start, values in _full_values(probs, padded_size, image_size, output_size, chunk_size):
        index = torch.arange(start, start + len(values), device=probs.device)
        origin = torch.zeros((len(index), 2), dtype=torch.long, device=probs.device)
        yield index, origin, values > thresh


def _inside(shape, origin, keep) -> torch.Tensor:
    """(G, h, w) bool: True inside each instance's absolute rows keep[0] and columns keep[1]
    ((G,) ranges), for parts whose pixel (0, 0) is at ``origin`` (G, 2) (x0, y0)."""
    (r0, r1), (c0, c1) = keep
    rows = torch.arange(shape[1], device=origin.device) + origin[:, 1:]
    cols = torch.arange(shape[2], device=origin.device) + origin[:, :1]
    in_rows = (rows >= r0[:, None]) & (rows < r1[:, None])
    in_cols = (cols >= c0[:, None]) & (cols < c1[:, None])
    return in_rows[:, :, None] & in_cols[:, None, :]


def _plan_regions(probs, image_size, output_size, thresh):
    """Per instance and axis (:func:`_axis_plan`), from the low-resolution samples that may pass
    ``thresh``; returns (rows, cols, indices of the instances with a non-empty region)."""
    low_thresh = thresh - THRESH_MARGIN * abs(thresh)
    # A row/column has a sample above the threshold iff its maximum is: two float reductions
    # instead of a (K, h, w) comparison to bool (a scalar loop on CPU). NaN maxima (a NaN
    # sample, which is never above) take the comparison.
    row_max, col_max = probs.amax(dim=2), probs.amax(dim=1)
    if row_max.isnan().any():
        low = (probs > low_thresh).view(torch.uint8)
        # amax over bytes: any() on bool is several times slower on CPU (as in masks_to_boxes).
        row_max, col_max = low.amax(dim=2), low.amax(dim=1)
        low_thresh = 0
    rows = _axis_plan(row_max > low_thresh, image_size[0], output_size[0])
    cols = _axis_plan(col_max > low_thresh, image_size[1], output_size[1])
    return rows, cols, (rows["nonempty"] & cols["nonempty"]).nonzero()[:, 0]


def _region_values(probs, plan, image_size, output_size, budget) -> Iterator:
    """Float output values of the instances whose region is not empty, in groups of similar
    size. Yields ``(index, origin, values, ((y0, y1), (x0, x1)))``: (G,) indices, (G, 2) int64
    (x, y) output position of each instance's values[g, 0, 0], (G, h, w) values and the (G,)
    absolute output ranges where they are exact (outside them the mask is False)."""
    h4, w4 = probs.shape[1:]
    two_stages = tuple(image_size) != tuple(output_size)
    rows, cols, index = plan
    if len(index) == 0:
        return
    n_of = (rows["crop"][1] - rows["crop"][0]).tolist()
    m_of = (cols["crop"][1] - cols["crop"][0]).tolist()
    for group, n, m in _groups(index, n_of, m_of, budget // 16):
        g = torch.tensor(group, device=probs.device)
        # Wide enough for ATen's generic kernel, as the full-size call (image sides >= 129).
        n = min(max(n, (MIN_GENERIC_SIDES + 3) // 4 - m), h4)
        m = min(max(m, (MIN_GENERIC_SIDES + 3) // 4 - n), w4)
        row0 = rows["crop"][0][g].clamp(max=h4 - n)
        col0 = cols["crop"][0][g].clamp(max=w4 - m)
        row_idx = row0[:, None] + torch.arange(n, device=g.device)
        col_idx = col0[:, None] + torch.arange(m, device=g.device)
        crops = probs[g[:, None, None], row_idx[:, :, None], col_idx[:, None, :]]
        stage1 = resize(crops[:, None], (4 * n, 4 * m))[:, 0]  # at padded (4 row0, 4 col0)
        origin = torch.stack([4 * col0, 4 * row0], dim=1)
        if not two_stages:
            yield g, origin, stage1, (_at(rows["out"], g), _at(cols["out"], g))
            continue
        # Stage 2 per instance: anchored extents depend on positions, not on crop sizes.
        for i in range(len(g)):
            one = g[i : i + 1]
            needed = _at(rows["needed"], one), _at(cols["needed"], one)
            out = _at(rows["out"], one), _at(cols["out"], one)
            values = _second_stage(stage1[i], origin[i], needed, out, image_size, output_size)
            yield one, torch.zeros_like(origin[i : i + 1]), values, out


def _second_stage(stage1, origin, needed, out, image_size, output_size):
    """Stage 2 of one instance, anchored at the image's (0, 0): its exact stage-1 values (at
    ``origin`` (x, y); ``needed`` row and column ranges, zeros elsewhere) resized to output rows
    and columns [0, ``out`` end) with the full call's scales. Returns (1, q, p) values."""
    (h, w), (out_h, out_w) = image_size, output_size
    (n0, n1), (m0, m1) = ([int(v) for v in span] for span in needed)
    q, p = int(out[0][1]), int(out[1][1])
    q = min(max(q, MIN_GENERIC_SIDES - p), out_h)
    p = min(max(p, MIN_GENERIC_SIDES - q), out_w)
    n, m = n1, m1
    # ATen copies when input and output lengths are equal: keep the full call's resize (an
    # extra zero row is out of every kept pixel's reach).
    if n == q and h != out_h:
        q, n = (q + 1, n) if q < out_h else (q, n + 1)
    if m == p and w != out_w:
        p, m = (p + 1, m) if p < out_w else (p, m + 1)
    x, y = origin.tolist()
    anchored = stage1.new_zeros((1, 1, n, m))
    anchored[0, 0, n0:n1, m0:m1] = stage1[n0 - y : n1 - y, m0 - x : m1 - x]
    scale_h, scale_w = _explicit_scales(image_size, output_size)
    return torch.ops.aten.upsample_bilinear2d.default(anchored, [q, p], False, scale_h, scale_w)[0]


def _groups(index, n_of, m_of, budget):
    """Groups of the instances ``index`` of similar n * m (ascending; a group's padded size at
    most twice its smallest member's), each with at most ``budget`` (members x n_max x m_max);
    yields (members, n_max, m_max)."""
    order = sorted(index.tolist(), key=lambda i: n_of[i] * m_of[i])
    group, n, m, first = [], 0, 0, 0
    for i in order:
        n2, m2 = max(n, n_of[i]), max(m, m_of[i])
        if group and ((len(group) + 1) * n2 * m2 > budget or n2 * m2 > 2 * first):
            yield group, n, m
            group, n2, m2 = [], n_of[i], m_of[i]
        if not group:
            first = max(n2 * m2, 1)
        group, n, m = group + [i], n2, m2
    yield group, n, m


def _at(pair, index):
    return pair[0][index], pair[1][index]


def _explicit_scales(image_size, output_size):
    """Scale factors that make ATen use exactly the full call's float32 ratios in / out for a
    partial output (it inverts a given factor in double, then rounds to float32); None if no
    double reproduces them."""
    scales = []
    for in_len, out_len in zip(image_size, output_size):
        ratio = np.float32(in_len) / np.float32(out_len)
        scale = 1.0 / float(ratio)
        if np.float32(1.0 / scale) != ratio:
            return None
        scales.append(scale)
    return tuple(scales)


def _axis_plan(hit, image_len, out_len) -> Dict[str, object]:
    """One axis of the regions, per instance, from ``hit`` (K, L): low-resolution samples that may
    pass the threshold. Returns (start, end) ranges: ``out``: output pixels that may be True;
    ``needed``: image pixels whose stage-1 values these depend on; ``crop``: low-resolution
    samples whose stage-1 resize gives those exactly; and ``nonempty``. Ranges are widened by
    one pixel against rounding of the source index."""
    k, low_len = hit.shape
    device = hit.device
    ar = torch.arange(low_len, device=device)
    r0 = torch.where(hit, ar, low_len).amin(dim=1)
    r1 = torch.where(hit, ar, -1).amax(dim=1)  # inclusive
    i0, i1 = (t.to(device) for t in _linear_taps(low_len, 4 * low_len))
    p0 = (torch.searchsorted(i1, r0.clamp(min=0)) - 1).clamp(min=0)
    p1 = (torch.searchsorted(i0, r1.clamp(min=0), right=True) + 1).clamp(max=image_len)
    nonempty = (r1 >= 0) & (p1 > p0)
    if image_len != out_len:
        j0, j1 = (t.to(device) for t in _linear_taps(image_len, out_len))
        q0 = (torch.searchsorted(j1, p0.clamp(max=image_len - 1)) - 1).clamp(min=0)
        q1 = (torch.searchsorted(j0, (p1 - 1).clamp(min=0), right=True) + 1).clamp(max=out_len)
        nonempty &= q1 > q0
        n0 = (j0[q0.clamp(max=out_len - 1)] - 1).clamp(min=0)
        n1 = (j1[(q1 - 1).clamp(min=0)] + 2).clamp(max=image_len)
    else:
        q0, q1, n0, n1 = p0, p1, p0, p1
    # Stage-1 rows y in [4 start + 2, 4 end - 3] see the full call's source coordinate, weights
    # and neighbours (the crop's own borders clamp differently), all of them at the image's.
    start = (n0 - 2).div(4, rounding_mode="floor").clamp(min=0)
    end = (n1 + 5).div(4, rounding_mode="floor").clamp(max=low_len)
    return {"out": (q0, q1), "needed": (n0, n1), "crop": (start, end), "nonempty": nonempty}


def _linear_taps(in_len: int, out_len: int):
    """Source samples (i0, i1) (int64, per output index) of a linear resize without corner
    alignment, as ATen computes them in float32 (up to rounding: callers widen ranges)."""
    if in_len == out_len:  # ATen copies
        ar = torch.arange(out_len)
        return ar, ar
    scale = np.float32(in_len) / np.float32(out_len)
    src = (torch.arange(out_len, dtype=torch.float32) + 0.5) * float(scale) - 0.5
    i0 = src.clamp(min=0).floor().long().clamp(max=in_len - 1)
    return i0, torch.where(i0 < in_len - 1, i0 + 1, i0)


_SUPPORT: Dict[str, bool] = {}


def region_paste_support(device) -> bool:
    """Whether region pasting reproduces the full computation on ``device``'s type, checked once
    per process and device type on a seeded synthetic probe (odd sizes, masks at the borders and
    one covering the image, output sizes below, above and equal to the image's)."""
    device = torch.device(device)
    if device.type not in _SUPPORT:
        try:
            _SUPPORT[device.type] = _probe(device)
        except RuntimeError as e:  # an op missing on this device: the full computation
            logger.info(f"Region paste unavailable on {device.type}: {e}")
            _SUPPORT[device.type] = False
        if not _SUPPORT[device.type]:
            logger.info(f"Region paste differs on {device.type}: masks pasted in full there.")
    return _SUPPORT[device.type]


def _probe(device) -> bool:
    gen = torch.Generator().manual_seed(0)
    field = torch.rand((5, 6, 10), generator=gen)
    probs = resize(field[None], (24, 40))[0] ** 3  # blobs above 0.5, some touching borders
    probs[3] = 0.9  # a mask covering everything
    probs[4, 5:9, 30:33] = 0.8  # a small one
    probs = probs.to(device)
    padded, image, thresh = (96, 160), (90, 151), 0.5
    for output_size in [image, (67, 203), (141, 97), (90, 211)]:
        ref = torch.cat([_reference(p[None], padded, image, output_size) for p in probs])
        seen = torch.zeros_like(ref, dtype=torch.bool)
        plan = _plan_regions(probs, image, output_size, thresh)
        for index, origin, values, ((y0, y1), (x0, x1)) in _region_values(
            probs, plan, image, output_size, 1 << 30
        ):
            for g, i in enumerate(index.tolist()):
                a, b, c, d = int(y0[g]), int(y1[g]), int(x0[g]), int(x1[g])
                left, top = origin[g].tolist()
                if not torch.equal(values[g, a - top : b - top, c - left : d - left],
                                   ref[i, a:b, c:d]):  # fmt: skip
                    return False
                seen[i, a:b, c:d] = True
        if (ref[~seen] > thresh).any():
            return False
    return True


def _reference(probs, padded_size, image_size, output_size) -> torch.Tensor:
    """The full computation's float values for (1, h, w) probabilities."""
    h, w = image_size
    part = resize(probs[None], tuple(padded_size))[:, :, :h, :w]
    if (h, w) != tuple(output_size):
        part = resize(part, tuple(output_size))
    return part[0]
