"""The eager post-processor's candidates between their masks and Matrix NMS: the buffers kept
between calls that their masks are written into (and the ``out=`` of mask-probability
callables), repeated cells, maskness sums, and the pool of the best ``nms_pre``.

Candidates are (cell, class) pairs; a cell above the score threshold for several classes has one
mask. Masks are computed in chunks into :class:`ChunkBuffers`; the pool keeps each chunk's
binary masks as computed, with the rows of the kept candidates, and gathers the best ones once,
in score order (:func:`pooled_top_k`). Rankings are stable (exact ties in candidate order), in
the eager and the fixed-size post-processing alike (:func:`ranked`).
"""

import functools
import inspect
import threading
from typing import Callable, List, Optional, Sequence, Tuple
import torch

__all__ = [
    "CHUNK_BYTES",
    "ChunkBuffers",
    "accepts_out",
    "cell_chunks",
    "consecutive_unique",
    "ignoring_out",
    "masks_and_sums",
    "pooled_top_k",
    "ranked",
    "selected_candidates",
    "top_k",
    "unique_with_first",
]

#: Largest float buffer of candidate masks per chunk (kept between calls on CPU), in bytes: the
#: stride-4 masks of 512 candidates of an 800x1216 input fit in it, one product for them all.
CHUNK_BYTES = 128 * 2**20

#: Rows per block of :func:`masks_and_sums` (a block's zeroed copy stays in cache).
SUM_BLOCK_ROWS = 8


class ChunkBuffers:
    """Buffers kept between calls, one set per thread, that the eager post-processor writes
    into on CPU: the candidates' float mask probabilities (``"probs"``), and when one chunk
    holds all of an image's candidates their bool masks (``"masks"``) and the final instances'
    probabilities (``"final"``); a caller may name other slots.

    Fresh memory costs a page fault per 4 KiB, about as much as the mask products themselves at
    800x1216; CUDA's caching allocator already reuses memory. Per thread, so that threads
    serving one model do not share them; copies and pickles start empty. Each is at most
    :data:`CHUNK_BYTES` (up to about 190 MB together for 800x1216 inputs).
    """

    def __init__(self):
        self._local = threading.local()

    def take(
        self,
        rows: int,
        size: Sequence[int],
        like: torch.Tensor,
        slot: str = "probs",
        dtype: Optional[torch.dtype] = None,
    ) -> Optional[torch.Tensor]:
        """A (rows, *size) view of this thread's ``slot`` buffer in ``dtype`` (default
        ``like``'s), valid until the next call for that slot; None off CPU (``like``'s device)
        or beyond :data:`CHUNK_BYTES` (the caller allocates)."""
        dtype = dtype or like.dtype
        numel = rows * size[0] * size[1]
        if like.device.type != "cpu" or numel * dtype.itemsize > CHUNK_BYTES:
            return None
        buffers = self._local.__dict__.setdefault("buffers", {})
        buffer = buffers.get(slot)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = buffers[slot] = torch.empty(numel, dtype=dtype)
        return buffer[:numel].view(rows, *size)

    @property
    def kept(self) -> Optional[torch.Tensor]:
        """This thread's probabilities buffer (None before the first :meth:`take` on CPU)."""
        return getattr(self._local, "buffers", {}).get("probs")

    def __eq__(self, other):  # a cache, not a setting: post-processors compare by settings
        return isinstance(other, ChunkBuffers)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._local = threading.local()


def accepts_out(fn: Callable) -> bool:
    """Whether a ``mask_probs`` callable takes ``out=`` (a buffer it may write into)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as before
        return False
    return any(p.name == "out" or p.kind == p.VAR_KEYWORD for p in parameters)


def ignoring_out(fn: Callable) -> Callable:
    """``fn(image, levels, cells, size)`` callable as ``(..., out=None)``, ``out`` unused."""

    @functools.wraps(fn)
    def call(image, levels, cells, size, out=None):
        return fn(image, levels, cells, size)

    return call


def masks_and_sums(
    probs: torch.Tensor, thresh: float, out: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Binary masks ``probs > thresh`` (bool, ``probs``' shape; written into ``out`` if given)
    and the float32 (K,) row sums of ``probs`` inside them: the maskness numerators (official
    ``(seg_preds * seg_masks).sum((1, 2))``).

    The values of ``probs > thresh`` and ``torch.where(masks, probs, 0).flatten(1).sum(1,
    dtype=torch.float32)``, bit for bit; ``probs`` (K, ...) is left as it is (its rows are
    pasted later). On CPU, block by block of rows: ``torch.threshold`` zeroes a block outside
    its masks into one scratch that stays in cache, the block is summed there and converted to
    bool (nonzero is inside for a threshold >= 0): one vectorised pass each, where comparing
    to bool and ``where`` on bool masks are not. Every block has at least two rows: a single row
    is summed split across threads, which rounds differently. Rows holding NaN (whose sums are
    NaN there: NaN is not <= any threshold) are done again the plain way; so is everything where
    the blocks would round differently (:func:`_blocks_apply`).
    """
    p = probs.flatten(1)  # (0, h, w) too, which reshape(0, -1) refuses
    if not _blocks_apply(p, probs, thresh, out):
        masks = torch.gt(probs, thresh, out=out) if out is not None else probs > thresh
        return masks, torch.where(masks, probs, 0).flatten(1).sum(dim=1, dtype=torch.float32)
    # The comparison rounds the threshold to the probabilities' dtype; threshold's half and
    # bfloat16 kernels compare in float32: round it here (0.6 in float16 is 0.60009765625).
    thresh = torch.tensor(float(thresh), dtype=p.dtype).item()
    masks = out if out is not None else torch.empty(probs.shape, dtype=torch.bool)
    m = masks.view(p.shape)
    sums = p.new_empty(len(p), dtype=torch.float32)
    blocks = max(len(p) // SUM_BLOCK_ROWS, 1)
    scratch = p.new_empty((-(-len(p) // blocks), p.shape[1]))
    bounds = torch.linspace(0, len(p), blocks + 1).round().long().tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        inside = torch.threshold(p[start:end], thresh, 0.0, out=scratch[: end - start])
        torch.sum(inside, dim=1, dtype=torch.float32, out=sums[start:end])
        m[start:end].copy_(inside)
    nan_rows = sums.isnan().nonzero()[:, 0]
    if len(nan_rows):
        m[nan_rows] = p[nan_rows] > thresh
        # One row would be summed split across threads: summed twice over, as among the others.
        redo = nan_rows.repeat(2) if len(nan_rows) == 1 < len(p) else nan_rows
        zeroed = torch.where(m[redo], p[redo], 0)
        sums[nan_rows] = zeroed.sum(dim=1, dtype=torch.float32)[: len(nan_rows)]
    return masks, sums


def _blocks_apply(p, probs, thresh, out) -> bool:
    """Whether :func:`masks_and_sums`' row blocks give its plain formula's values: CPU, a
    threshold >= 0 (exact zeros are outside), rows contiguous (a strided row is summed in its
    own order), no autograd, and ``out`` (if any) a contiguous bool tensor of ``probs``' shape;
    otherwise the plain formula runs."""
    return (
        p.device.type == "cpu"
        and p.dtype.is_floating_point
        and thresh >= 0
        and (p.stride(1) == 1 or p.shape[1] <= 1)
        and not (probs.requires_grad and torch.is_grad_enabled())
        and (
            out is None
            or (out.dtype == torch.bool and out.shape == probs.shape and out.is_contiguous())
        )
    )


def cell_chunks(flat_cells: torch.Tensor, rows: int) -> List[Tuple[int, int]]:
    """``(start, end)`` ranges of the candidates ``flat_cells`` (K,) int64, sorted by cell, so
    that each range holds at most ``rows`` distinct cells and no cell is split between two
    ranges: a chunk's masks are computed once per distinct cell, so its memory and its product
    follow the cells, not the (cell, class) pairs (a cell above the threshold for many classes
    is one mask)."""
    if len(flat_cells) == 0:
        return []
    new_cell = torch.ones(len(flat_cells), dtype=torch.bool, device=flat_cells.device)
    new_cell[1:] = flat_cells[1:] != flat_cells[:-1]
    starts = new_cell.nonzero()[:, 0][:: max(1, rows)].tolist()
    return list(zip(starts, starts[1:] + [len(flat_cells)]))


def consecutive_unique(values: torch.Tensor):
    """(unique values, index of each one's first occurrence, inverse) of ``values`` (K,) whose
    repeats are consecutive: ``values == unique[inverse]`` and ``unique == values[first]``."""
    unique, inverse, counts = torch.unique_consecutive(
        values, return_inverse=True, return_counts=True
    )
    first = counts.cumsum(0) - counts
    return unique, first, inverse


def unique_with_first(values: torch.Tensor):
    """:func:`consecutive_unique` for repeats anywhere in ``values`` (K,); unique values in
    ascending order."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(len(values), device=values.device)
    first = torch.full_like(unique, len(values)).scatter_reduce_(0, inverse, positions, "amin")
    return unique, first, inverse


def pooled_top_k(
    pool: Sequence[Tuple[torch.Tensor, ...]],
    k: int,
    out: Optional[torch.Tensor] = None,
    gather: bool = True,
) -> Tuple[torch.Tensor, ...]:
    """The best ``k`` candidates of a pool by score, as one pool entry.

    Args:
        pool: entries ``(masks, rows, scores, labels, candidates, areas)``: (M, h, w) bool masks
            as computed, and per kept candidate (K,) its row in them, score, label, index and
            area.
        out: a (k', h, w) bool tensor, k' >= the number gathered, not one of the pool's masks,
            that the gathered masks are written into (its first rows are returned).
        gather: False: the masks are returned as computed (one entry's as they are, several
            entries' concatenated), the returned rows in descending score order pointing into
            them (not gathered into score order).
    Returns:
        one entry whose masks are gathered in descending score order (rows ``0..k-1``): the
        only copy of the masks, whatever the number of entries (``gather=False``: the masks as
        computed and the best ``k`` rows into them).
    """
    if len(pool) == 1:
        masks, rows = pool[0][:2]
    else:
        masks = torch.cat([p[0] for p in pool])
        offsets = torch.tensor([0] + [len(p[0]) for p in pool[:-1]]).cumsum(0).tolist()
        rows = torch.cat([p[1] + offset for p, offset in zip(pool, offsets)])
    scores, labels, candidates, areas = (torch.cat(parts) for parts in list(zip(*pool))[2:])
    # Stable: exact ties (the classes of one cell share its mask, hence its maskness) keep
    # candidate order, so the chunking cannot reorder them.
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    if not gather:
        return (masks, rows[order], scores[order], labels[order], candidates[order], areas[order])
    if out is not None:
        masks = torch.index_select(masks, 0, rows[order], out=out[: len(order)])
    else:
        masks = masks[rows[order]]
    return (
        masks,
        torch.arange(len(order), device=order.device),
        scores[order],
        labels[order],
        candidates[order],
        areas[order],
    )


def top_k(tensors: Tuple[torch.Tensor, ...], score_index: int, k: int):
    """Sort ``tensors`` (a tuple of aligned tensors) by descending score, exact ties in their
    given order (a stable sort), and keep the first k."""
    order = torch.argsort(tensors[score_index], descending=True, stable=True)[:k]
    return tuple(t[order] for t in tensors)


def ranked(values: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k largest of (N,) ``values`` and their indices, exact ties in index order (a stable
    sort, as the eager post-processor's pool ranks them; ``topk`` leaves that order open)."""
    if torch.onnx.is_in_onnx_export():
        # The exporter has no stable sort; ONNX's TopK breaks ties by lower index (its spec).
        return values.topk(k)
    values, indices = torch.sort(values, descending=True, stable=True)
    return values[:k], indices[:k]


def selected_candidates(scores: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k best of (N,) ``scores`` (every (cell, class) pair) and their indices, in index
    order (candidate order), so that later :func:`ranked` ties follow candidate order as in the
    eager pool. ``topk`` selects them (far cheaper than sorting every pair); which of the pairs
    tied with the k-th score are selected stays its choice: whenever the candidates (pairs above
    the score threshold) fit in K0, those pairs score at most the threshold and are padding."""
    values, indices = scores.topk(k)
    # Distinct, so no tie to break; topk rather than sort: ONNX gets a constant K.
    indices, order = indices.topk(k, largest=False)
    return values[order], indices
