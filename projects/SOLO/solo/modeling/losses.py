"""SOLO losses: sigmoid focal loss on the category grid, dice loss on the masks."""

from typing import List, Sequence
import torch
import torch.nn.functional as F
from fvcore.nn import sigmoid_focal_loss

from .targets import LevelTargets


def dice_loss(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-mask dice loss of (K, h, w) probabilities against (K, h, w) 0/1 targets, shape (K,).

    The official formula: 1 - 2 sum(p t) / (sum(p^2) + 0.001 + sum(t^2) + 0.001).
    """
    p = probs.flatten(1).float()
    t = targets.flatten(1).float()
    intersection = (p * t).sum(dim=1)
    denominator = (p * p).sum(dim=1) + 0.001 + (t * t).sum(dim=1) + 0.001
    return 1.0 - 2.0 * intersection / denominator


def category_loss(
    cate_logits: Sequence[torch.Tensor],
    targets: Sequence[LevelTargets],
    num_classes: int,
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """Focal loss summed over every cell of every level, normalised by (num positives + 1)."""
    logits = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, num_classes) for x in cate_logits])
    labels = torch.cat([t.cate_labels.reshape(-1) for t in targets])
    # One extra column for "background", dropped: background cells get an all-zero target.
    onehot = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    num_pos = sum(int(t.positive_cells.sum()) for t in targets)
    loss = sigmoid_focal_loss(logits.float(), onehot.float(), alpha, gamma, reduction="sum")
    return loss / (num_pos + 1)


def mask_loss(mask_probs: List[torch.Tensor], targets: Sequence[LevelTargets]) -> torch.Tensor:
    """Mean dice loss over every positive (cell, instance) entry of every level.

    Levels without positives (possibly all of them) still contribute a zero that depends on their
    (empty) predictions, so that every parameter gets a gradient and DDP never waits for one.
    """
    connected_zero = sum(p.sum() for p in mask_probs) * 0.0
    losses = [
        dice_loss(probs, t.mask_targets[t.pos_instances])
        for probs, t in zip(mask_probs, targets)
        if len(probs)
    ]
    if not losses:
        return connected_zero
    return torch.cat(losses).mean() + connected_zero
