"""Duplicate removal for masks: Matrix NMS (SOLOv2), greedy mask NMS, and point NMS on grids."""

from typing import Optional
import torch
import torch.nn.functional as F

MATRIX_NMS_KERNELS = ("gaussian", "linear")


def points_nms(scores: torch.Tensor) -> torch.Tensor:
    """Zero every grid score that is below one of its up, left and up-left neighbours.

    The official 2x2 max-pool (stride 1, padding 1, last row/column dropped): not centred, a cell
    only competes with the cells above and to the left of it. ``scores``: (N, C, S, S).
    """
    local_max = F.max_pool2d(scores, kernel_size=2, stride=1, padding=1)[:, :, :-1, :-1]
    return scores * (local_max == scores)


def mask_iou_matrix(
    masks: torch.Tensor,
    areas: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(N, N) float32 IoU of (N, H, W) binary masks with pixel counts ``areas``, from exact
    integer intersection counts (matrix products).

    With ``labels`` (N,), masks of different labels get IoU 0: Matrix NMS and mask NMS compare a
    mask with its own class only, and on CPU only same-label pairs are then intersected (one
    product per label present instead of one over all pairs; same values). With ``rows`` (N,)
    int64, the N masks are ``masks[rows]`` (any number of rows in ``masks``): on CPU they are
    read where they are, not gathered into a copy first.
    """
    flat = masks.flatten(1)
    if labels is not None and flat.device.type == "cpu":
        inter = _same_label_intersections(flat, labels, rows)
    else:
        inter = _pairwise_intersections(flat if rows is None else flat[rows])
        if labels is not None:
            inter = inter * (labels[:, None] == labels[None, :])
    union = areas[:, None] + areas[None, :] - inter
    return inter / union.clamp(min=1e-6)


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """int64 (K,) pixel counts of (K, ...) boolean masks.

    On CPU one int8 x int8 -> int32 product with a column of ones: summing a bool tensor
    converts it to int64 first (8 bytes written and read per pixel). Same counts.
    """
    flat = masks.flatten(1)
    if flat.device.type == "cpu" and hasattr(torch, "_int_mm") and flat.dtype == torch.bool:
        # _int_mm takes at least 8 columns on the right; all ones, the first is kept.
        ones = torch.ones((flat.shape[1], 8), dtype=torch.int8)
        try:
            return torch._int_mm(flat.contiguous().view(torch.int8), ones)[:, 0].long()
        except RuntimeError:  # unsupported shape or build: the sum below is exact too
            pass
    return flat.sum(dim=1)


#: Rows per product of :func:`_same_label_intersections` (whole labels are packed up to it):
#: the int8 product's cost per pair is near its minimum from about this size on.
LABEL_BLOCK_ROWS = 48


def _same_label_intersections(
    flat: torch.Tensor, labels: torch.Tensor, rows: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`_pairwise_intersections` of the pairs with equal labels, 0 elsewhere, of the masks
    ``flat`` (or ``flat[rows]``).

    Masks are sorted by label once and whole labels packed into diagonal blocks of about
    :data:`LABEL_BLOCK_ROWS` masks, one product per block (a product per label is mostly
    overhead: 500 candidates have about 6 masks per label present).
    """
    values, counts = torch.unique(labels, return_counts=True)
    if len(values) <= 1:
        return _pairwise_intersections(flat if rows is None else flat[rows])
    order = torch.argsort(labels, stable=True)
    source = order if rows is None else rows[order]  # rows of ``flat`` in label order
    inter = flat.new_zeros((len(labels), len(labels)), dtype=torch.float32)
    blocks, start, end = [], 0, 0
    for count in counts.tolist() + [None]:
        if count is None or (end > start and end + count - start > LABEL_BLOCK_ROWS):
            blocks.append((start, end))
            start = end
        end += count or 0
    # Each block's rows gathered into one scratch (not a gathered copy of all the masks).
    scratch = flat.new_empty((max(e - s for s, e in blocks), flat.shape[1]))
    for start, end in blocks:
        block = torch.index_select(flat, 0, source[start:end], out=scratch[: end - start])
        inter[start:end, start:end] = _pairwise_intersections(block)
    sorted_labels = labels[order]
    inter *= sorted_labels[:, None] == sorted_labels[None, :]  # blocks hold several labels
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    return inter[rank[:, None], rank[None, :]]


def _pairwise_intersections(flat: torch.Tensor) -> torch.Tensor:
    """(N, N) pixel counts of pairwise intersections of (N, P) 0/1 masks, as float32.

    On CPU an int8 x int8 -> int32 product gives the same exact counts about twice as fast as
    a float32 one (it is the dominant cost of Matrix NMS at 500 candidates).
    """
    # One pixel per mask: x.t() has equal strides, which _int_mm reads wrongly (no error).
    if flat.device.type == "cpu" and hasattr(torch, "_int_mm") and len(flat) and flat.shape[1] > 1:
        # A bool tensor is reinterpreted in place (same byte size), not converted.
        # _int_mm needs a contiguous left operand (an expand()ed one gives wrong counts).
        flat = flat.contiguous()
        x = flat.view(torch.int8) if flat.dtype == torch.bool else flat.to(torch.int8)
        try:
            return torch._int_mm(x, x.t()).float()
        except RuntimeError:  # unsupported shape or build: the float product below is exact too
            pass
    f = flat.float()
    return f @ f.t()


def matrix_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    areas: torch.Tensor = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Matrix NMS: decayed scores of masks sorted by descending score (``masks[rows]`` with
    ``rows``: see :func:`mask_iou_matrix`).

    Each mask's score is multiplied by min_i f(iou_i,j) / f(comp_i) over the higher-scored masks i
    of its class, where comp_i is the largest IoU of mask i with a mask scored above it.
    Gaussian: f(x) = exp(-sigma * x^2) (sigma not divided, as the official code); linear:
    f(x) = 1 - x.
    """
    if kernel not in MATRIX_NMS_KERNELS:
        raise ValueError(f"Unknown Matrix NMS kernel {kernel!r}; expected {MATRIX_NMS_KERNELS}.")
    n = len(scores)
    if n == 0:
        return scores
    if areas is None:
        areas = mask_areas(masks if rows is None else masks[rows]).float()
    iou = mask_iou_matrix(masks, areas, labels, rows)
    return matrix_nms_from_iou(iou, labels, scores, kernel, sigma)


def float_mask_iou(masks: torch.Tensor, areas: torch.Tensor) -> torch.Tensor:
    """(K, K) IoU of (K, h, w) binary masks from one float product (exact counts below 2^24
    pixels). The fixed-size path's: :func:`mask_iou_matrix` takes int8 kernels on CPU, which no
    exporter maps."""
    flat = masks.flatten(1).to(areas.dtype)
    inter = flat @ flat.t()
    return inter / (areas[:, None] + areas[None, :] - inter).clamp(min=1e-6)


def matrix_nms_from_iou(
    iou: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    kernel: str = "gaussian",
    sigma: float = 2.0,
) -> torch.Tensor:
    """The decay step of :func:`matrix_nms`, given the (N, N) float IoU matrix of N masks sorted
    by descending score; returns the (N,) decayed scores. Exporters call it with IoUs from a float
    product (the int8 kernels of :func:`mask_iou_matrix` have no ONNX/TorchScript mapping)."""
    same_class = labels[:, None] == labels[None, :]
    # iou[i, j] for i ranked above j, same class; zero elsewhere.
    decay_iou = (iou * same_class).triu(diagonal=1)
    compensate_iou = decay_iou.max(dim=0).values[:, None]  # per row i: its own worst overlap
    if kernel == "gaussian":
        decay = torch.exp(-sigma * (decay_iou**2 - compensate_iou**2))
    else:
        # comp_i = 1 means mask i duplicates a higher one and is itself suppressed: the clamp
        # makes its row ineffective (or 0 for a third identical mask, already 0 through k).
        decay = (1 - decay_iou) / (1 - compensate_iou).clamp(min=1e-6)
    return scores * decay.min(dim=0).values


def mask_nms(
    masks: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float = 0.5,
    areas: torch.Tensor = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Greedy mask NMS on masks sorted by descending score (``masks[rows]`` with ``rows``: see
    :func:`mask_iou_matrix`); returns the boolean keep mask.

    Greedy NMS keeps mask j iff no kept mask ranked above j overlaps it (same class) by more than
    ``iou_threshold``. That recursion is solved as a fixed point with whole-matrix steps: after t
    steps the first t decisions are final, and in practice it converges in a few steps.
    """
    n = len(scores)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=scores.device)
    if areas is None:
        areas = mask_areas(masks if rows is None else masks[rows]).float()
    suppresses = (mask_iou_matrix(masks, areas, labels, rows) > iou_threshold) & (
        labels[:, None] == labels[None, :]
    )
    suppresses = suppresses.triu(diagonal=1).float()
    keep = torch.ones(n, dtype=torch.bool, device=scores.device)
    for _ in range(n):
        new_keep = (keep.float() @ suppresses) == 0
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep
