"""Backbone layers whose eager code turns the sample image's sizes into constants of a trace, and
what export does about each: replace the layer by the same arithmetic on traced sizes, or refuse.

Detectron2's MViTv2 attention (``detectron2.modeling.backbone.mvit.MultiScaleAttention``) takes
its token counts and its relative-position table from Python numbers (``np.prod`` of the token
grid, ``int(2 * max(q, k) - 1)``, ``torch.arange(q)``, ``if`` on sizes): ``torch.jit.trace`` and
``torch.onnx.export`` record the sample's token grid, and the graph fails (a Reshape) or is wrong
at any other image size; ``torch.export`` specialises the program to the sample's size.
:func:`replace_mvit_attention_for_tracing` swaps each such layer for a
:class:`TraceableMViTAttention` holding the same parameters and computing the same values with
every size read from a tensor shape (a traced size, or ``torch.export``'s symbolic one).

Detectron2's ViT (ViTDet) has the same traced constants (position embeddings resized to the
sample's grid, relative positions, window padding). With the square padding of its
``SimpleFeaturePyramid`` (``square_pad``) every image reaches the backbone at one size, which
the export module pads to (:func:`solo.export.module.square_canvas`): the constants are right.
Without it, ViT is refused.
"""

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.modeling.backbone.mvit import MultiScaleAttention, MViT, attention_pool
from detectron2.modeling.backbone.vit import ViT

from .formats import ExportError

__all__ = [
    "TraceableMViTAttention",
    "check_traceable_backbone",
    "replace_mvit_attention_for_tracing",
]


def check_traceable_backbone(backbone: nn.Module, square_side: int) -> None:
    """Refuse a backbone whose export would give other results than the eager model.

    Args:
        backbone: the model's backbone.
        square_side: the side every image is padded to (0: none), see ``square_canvas``.

    Raises:
        ExportError: naming the backbone and the setting that exports it exactly.
    """
    modules = list(backbone.modules())
    if square_side == 0 and any(isinstance(m, ViT) for m in modules):
        raise ExportError(
            "Cannot export a ViT backbone without square padding exactly: its position "
            "embeddings, relative positions and window padding are traced at the sample's size. "
            "Build its SimpleFeaturePyramid with square_pad (ViTDet's 1024, as "
            "configs/SOLOv2/ViTDet_B_3x.py does): every image is then padded to that square, "
            "inside the exported graph as in the eager model."
        )
    if any(isinstance(m, MViT) and m.pos_embed is not None for m in modules):
        raise ExportError(
            "Cannot export an MViTv2 backbone with absolute position embeddings (use_abs_pos="
            "True) exactly: they are resized to the sample's token grid, a constant of the "
            "trace. Use use_abs_pos=False (Detectron2's MViTv2 configs; relative positions)."
        )


def replace_mvit_attention_for_tracing(backbone: nn.Module) -> int:
    """Replace, in place, each MViTv2 ``MultiScaleAttention`` of ``backbone`` by a
    :class:`TraceableMViTAttention` around it. Returns the number replaced."""
    owners = [
        (parent, name)
        for parent in backbone.modules()
        for name, child in parent.named_children()
        if type(child) is MultiScaleAttention
    ]
    for parent, name in owners:
        setattr(parent, name, TraceableMViTAttention(getattr(parent, name)))
    return len(owners)


class TraceableMViTAttention(nn.Module):
    """``MultiScaleAttention.forward`` of the wrapped layer, with every token-grid size (window
    padding, reshapes, the relative-position table and its indices) computed from traced shapes,
    so a trace follows the image size. Eagerly it returns the wrapped layer's values."""

    def __init__(self, attention: MultiScaleAttention):
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Reshapes name every size (no flatten/unflatten: those record the sample's sizes).
        a = self.attention
        batch, h, w = x.shape[0], x.shape[1], x.shape[2]
        # (B, H, W, 3 * heads * c) -> q, k, v of (B * heads, H, W, c)
        qkv = a.qkv(x).reshape(batch, h, w, 3, a.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.reshape(3, batch * a.num_heads, h, w, -1).unbind(0)
        q = attention_pool(q, a.pool_q, a.norm_q)
        k = attention_pool(k, a.pool_k, a.norm_k)
        v = attention_pool(v, a.pool_v, a.norm_v)
        pooled_q = q
        if a.window_size:
            q, padded_hw = _to_windows(q, a.q_win_size)
            k, _ = _to_windows(k, a.kv_win_size)
            v, _ = _to_windows(v, a.kv_win_size)
        q_hw, kv_hw = (q.shape[1], q.shape[2]), (k.shape[1], k.shape[2])
        q, k, v = (t.reshape(t.shape[0], t.shape[1] * t.shape[2], t.shape[3]) for t in (q, k, v))
        attn = (q * a.scale) @ k.transpose(-2, -1)
        if a.use_rel_pos:
            attn = _add_relative_positions(attn, q, a.rel_pos_h, a.rel_pos_w, q_hw, kv_hw)
        x = (attn.softmax(dim=-1) @ v).reshape(q.shape[0], q_hw[0], q_hw[1], -1)
        if a.window_size:
            x = _from_windows(x, a.q_win_size, padded_hw, pooled_q.shape[1], pooled_q.shape[2])
        if a.residual_pooling:
            x = x + pooled_q
        # (B * heads, H', W', c) -> (B, H', W', heads * c)
        h, w = x.shape[1], x.shape[2]
        x = x.reshape(batch, a.num_heads, h, w, -1).permute(0, 2, 3, 1, 4)
        return a.proj(x.reshape(batch, h, w, -1))


def _to_windows(x: torch.Tensor, size: int):
    """(B, H, W, C) -> (B * windows, size, size, C), zero-padded bottom/right to whole windows
    (always, with 0 rows when H and W divide: a trace keeps the pad), and the padded (H, W)."""
    h, w, channels = x.shape[1], x.shape[2], x.shape[3]
    pad_h, pad_w = (size - h % size) % size, (size - w % size) % size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(x.shape[0], hp // size, size, wp // size, size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, channels), (hp, wp)


def _from_windows(windows: torch.Tensor, size: int, padded_hw, h, w) -> torch.Tensor:
    """Inverse of :func:`_to_windows`, cropped to the unpadded (h, w)."""
    hp, wp = padded_hw
    x = windows.view(-1, hp // size, wp // size, size, size, windows.shape[-1])
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, hp, wp, windows.shape[-1])
    return x[:, :h, :w]


def _add_relative_positions(attn, q, rel_pos_h, rel_pos_w, q_hw, kv_hw):
    """``attn`` (B, Hq * Wq, Hk * Wk) plus the decomposed relative-position terms of MViTv2:
    for query (i, j) and key (m, n), ``q . R_h[i, m] + q . R_w[j, n]``."""
    table_h = _relative_position_table(rel_pos_h, q_hw[0], kv_hw[0])  # (Hq, Hk, c)
    table_w = _relative_position_table(rel_pos_w, q_hw[1], kv_hw[1])  # (Wq, Wk, c)
    grid_q = q.reshape(q.shape[0], q_hw[0], q_hw[1], q.shape[-1])
    along_h = torch.einsum("bijc,imc->bijm", grid_q, table_h)
    along_w = torch.einsum("bijc,jnc->bijn", grid_q, table_w)
    attn = attn.reshape(q.shape[0], q_hw[0], q_hw[1], kv_hw[0], kv_hw[1])
    attn = attn + along_h[..., :, None] + along_w[..., None, :]
    return attn.reshape(q.shape[0], q_hw[0] * q_hw[1], kv_hw[0] * kv_hw[1])


def _relative_position_table(rel_pos: torch.Tensor, q_size, k_size) -> torch.Tensor:
    """(q_size, k_size, C): for each query and key position, the row of ``rel_pos`` (L, C) for
    their offset, ``rel_pos`` linearly resized to the 2 * max(q_size, k_size) - 1 offsets and
    the shorter side's coordinates scaled to the longer's, in Detectron2's ``get_rel_pos``
    float32 arithmetic (ratios in float64 first, as Python computes them)."""
    if isinstance(q_size, torch.Tensor):  # a trace's sizes
        offsets = 2 * torch.maximum(q_size, k_size) - 1
    else:  # ints, or torch.export's symbolic ints
        offsets = 2 * torch.sym_max(q_size, k_size) - 1
    # Resizing to the trained length is the identity (linear, align_corners=False).
    table = F.interpolate(rel_pos.t()[None], size=offsets, mode="linear")[0].t()
    q64 = torch.scalar_tensor(q_size, dtype=torch.float64)
    k64 = torch.scalar_tensor(k_size, dtype=torch.float64)
    q_scale = (k64 / q64).clamp(min=1.0).to(torch.float32)
    k_scale64 = (q64 / k64).clamp(min=1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale64.to(torch.float32)
    shift = ((k64 - 1) * k_scale64).to(torch.float32)
    return table[((q_coords - k_coords) + shift).long()]
