"""Pasting SOLO's stride-4 soft masks into bool masks at the output resolution, and their boxes:
one implementation for the eager post-processor and the exported models' runtime."""

import torch

from detectron2.structures import Boxes

from .layers import resize

__all__ = ["masks_to_boxes", "paste_masks"]


def paste_masks(
    probs, padded_size, image_size, output_size, mask_thresh: float, chunk_size: int = 4
):
    """Stride-4 soft masks (K, h, w) -> bool masks (K, *output_size) and their tight boxes.

    As the official ``get_seg_single``: upsample to the padded input (``padded_size``), crop to
    the image (``image_size``), resize to ``output_size`` (when it differs), binarise with
    ``mask_thresh``. Boxes are computed per chunk of ``chunk_size`` masks, while it is in cache.

    Returns:
        ``(masks, boxes)``: (K, H, W) bool on ``probs``' device and :class:`Boxes` (K, 4) XYXY.
    """
    h, w = image_size
    out = torch.empty((len(probs), *output_size), dtype=torch.bool, device=probs.device)
    boxes = [torch.zeros((0, 4), device=probs.device)]
    # Small chunks: the full-resolution float masks exist for a few instances at a time, and
    # a chunk (~16 MB at 800x1216) stays below glibc's mmap threshold, so its memory is
    # reused from chunk to chunk instead of being page-faulted in afresh each time.
    for start in range(0, len(probs), chunk_size):
        part = resize(probs[start : start + chunk_size][None], padded_size)[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            part = resize(part, output_size)
        torch.gt(part[0], mask_thresh, out=out[start : start + chunk_size])
        boxes.append(masks_to_boxes(out[start : start + chunk_size]).tensor)
    return out, Boxes(torch.cat(boxes))


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
