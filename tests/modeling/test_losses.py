"""SOLO losses (solo.modeling.losses): dice loss, focal category loss, mean dice mask loss."""

import math
import pytest
import torch

from solo.modeling.losses import category_loss, dice_loss, mask_loss
from solo.modeling.targets import LevelTargets


def level_targets(
    cate_labels, num_classes, pos_images=(), pos_cells=(), pos_instances=(), mask_targets=None
):
    cate_labels = torch.as_tensor(cate_labels, dtype=torch.long)
    return LevelTargets(
        cate_labels=cate_labels,
        pos_images=torch.as_tensor(pos_images, dtype=torch.long),
        pos_cells=torch.as_tensor(pos_cells, dtype=torch.long),
        pos_instances=torch.as_tensor(pos_instances, dtype=torch.long),
        mask_targets=(
            mask_targets if mask_targets is not None else torch.zeros((0, 4, 4), dtype=torch.bool)
        ),
        positive_cells=cate_labels != num_classes,
    )


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------


def test_dice_loss_hand_values():
    probs = torch.tensor(
        [
            [[0.5, 0.5], [0.0, 0.0]],  # half right: 1 - 2 * 0.5 / (0.5 + 0.001 + 1 + 0.001)
            [[1.0, 1.0], [0.0, 0.0]],  # perfect: 1 - 2 * 2 / (2 + 0.001 + 2 + 0.001)
            [[0.0, 0.0], [0.0, 0.0]],  # empty vs empty: 1 - 0 / 0.002 = 1
            [[0.0, 0.0], [1.0, 1.0]],  # disjoint: 1
        ]
    )
    targets = torch.tensor(
        [[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 0]], [[1, 1], [0, 0]]], dtype=torch.bool
    )
    loss = dice_loss(probs, targets)
    expected = [1 - 1.0 / 1.502, 1 - 4.0 / 4.002, 1.0, 1.0]
    assert loss.shape == (4,)
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)


def test_dice_loss_gradient_is_finite_for_all_zero_inputs():
    probs = torch.zeros((2, 3, 3), requires_grad=True)
    dice_loss(probs, torch.zeros((2, 3, 3))).sum().backward()
    assert torch.isfinite(probs.grad).all()


# --------------------------------------------------------------------------------------------
# Category (focal) loss
# --------------------------------------------------------------------------------------------


def manual_focal(logits, labels, num_classes, alpha=0.25, gamma=2.0):
    """Sum over cells (b, i, j) and classes c of the sigmoid focal loss, in float64 scalars."""
    total = 0.0
    n, c, s, _ = logits.shape
    for b in range(n):
        for cell in range(s * s):
            for k in range(c):
                x = float(logits[b, k, cell // s, cell % s])
                p = 1 / (1 + math.exp(-x))
                is_pos = int(labels[b, cell]) == k
                pt = p if is_pos else 1 - p
                a = alpha if is_pos else 1 - alpha
                total += -a * (1 - pt) ** gamma * math.log(pt)
    return total


def test_category_loss_is_focal_sum_over_all_cells_of_all_levels_over_positives_plus_one():
    torch.manual_seed(0)
    num_classes = 3
    logits = [torch.randn(2, num_classes, 4, 4) * 2, torch.randn(2, num_classes, 2, 2) * 2]
    labels0 = torch.full((2, 16), num_classes)
    labels0[0, [1, 6]] = torch.tensor([0, 2])
    labels0[1, 15] = 1
    labels1 = torch.full((2, 4), num_classes)
    labels1[1, 2] = 0
    targets = [level_targets(labels0, num_classes), level_targets(labels1, num_classes)]
    loss = category_loss(logits, targets, num_classes, alpha=0.25, gamma=2.0)
    expected = (
        manual_focal(logits[0], labels0, num_classes)
        + manual_focal(logits[1], labels1, num_classes)
    ) / (4 + 1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_category_loss_layout_maps_cell_row_major_to_logit_position():
    # Confident, correct logits at cell (row 1, col 0) = flat 2 of a 2x2 grid: small loss;
    # the same logits at the transposed position (row 0, col 1) would be a large loss.
    num_classes = 2
    logits = torch.full((1, num_classes, 2, 2), -10.0)
    logits[0, 1, 1, 0] = 10.0
    labels = torch.full((1, 4), num_classes)
    labels[0, 2] = 1
    good = category_loss([logits], [level_targets(labels, num_classes)], num_classes, 0.25, 2.0)
    labels_t = torch.full((1, 4), num_classes)
    labels_t[0, 1] = 1
    bad = category_loss([logits], [level_targets(labels_t, num_classes)], num_classes, 0.25, 2.0)
    assert good.item() < 1e-6 < 1.0 < bad.item()


def test_category_loss_normaliser_counts_positive_cells_not_mask_entries():
    # SOLOv2 keeps two (instance, cell) entries for a shared cell: the normaliser stays cells + 1.
    num_classes = 2
    logits = torch.zeros((1, num_classes, 2, 2))
    labels = torch.tensor([[0, num_classes, num_classes, num_classes]])
    t = level_targets(
        labels, num_classes, [0, 0], [0, 0], [0, 1], torch.zeros((2, 4, 4), dtype=torch.bool)
    )
    loss = category_loss([logits], [t], num_classes, 0.25, 2.0)
    assert loss.item() == pytest.approx(manual_focal(logits, labels, num_classes) / 2, rel=1e-6)


def test_category_loss_without_positives_is_divided_by_one():
    num_classes = 2
    logits = torch.randn(1, num_classes, 3, 3)
    labels = torch.full((1, 9), num_classes)
    loss = category_loss([logits], [level_targets(labels, num_classes)], num_classes, 0.25, 2.0)
    assert loss.item() == pytest.approx(manual_focal(logits, labels, num_classes), rel=1e-5)


# --------------------------------------------------------------------------------------------
# Mask loss
# --------------------------------------------------------------------------------------------


def test_mask_loss_is_the_mean_dice_over_all_entries_of_all_levels():
    torch.manual_seed(0)
    masks0 = torch.rand(2, 4, 4) > 0.5
    masks1 = torch.rand(1, 2, 2) > 0.5
    probs0, probs1 = torch.rand(3, 4, 4), torch.rand(1, 2, 2)
    t0 = level_targets(torch.zeros((1, 4)), 5, [0, 0, 0], [0, 1, 2], [0, 1, 1], masks0)
    t1 = level_targets(torch.zeros((1, 1)), 5, [0], [0], [0], masks1)
    loss = mask_loss([probs0, probs1], [t0, t1])
    # Mean over the 4 entries, not the mean of the two level means.
    entries = torch.cat([dice_loss(probs0, masks0[[0, 1, 1]]), dice_loss(probs1, masks1)])
    assert loss.item() == pytest.approx(entries.mean().item(), rel=1e-6)


def test_mask_loss_without_positives_is_zero_and_backpropagates_zero_gradients():
    logits = [
        torch.randn(2, 16, 8, 8, requires_grad=True),
        torch.randn(2, 4, 4, 4, requires_grad=True),
    ]
    empty = torch.zeros(0, dtype=torch.long)
    probs = [x[empty, empty].sigmoid() for x in logits]  # as SOLOHead.training_mask_probs
    targets = [
        level_targets(
            torch.full((2, 16), 5), 5, mask_targets=torch.zeros((0, 8, 8), dtype=torch.bool)
        ),
        level_targets(
            torch.full((2, 4), 5), 5, mask_targets=torch.zeros((0, 4, 4), dtype=torch.bool)
        ),
    ]
    loss = mask_loss(probs, targets)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for x in logits:
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_mask_loss_gives_every_level_a_gradient_even_without_its_positives():
    logits = [
        torch.randn(1, 4, 4, 4, requires_grad=True),
        torch.randn(1, 1, 2, 2, requires_grad=True),
    ]
    probs = [logits[0][torch.tensor([0]), torch.tensor([3])].sigmoid(), logits[1][[], []].sigmoid()]
    targets = [
        level_targets(
            torch.zeros((1, 4)), 5, [0], [3], [0], torch.ones((1, 4, 4), dtype=torch.bool)
        ),
        level_targets(
            torch.full((1, 1), 5), 5, mask_targets=torch.zeros((0, 2, 2), dtype=torch.bool)
        ),
    ]
    loss = mask_loss(probs, targets)
    expected = dice_loss(probs[0], torch.ones((1, 4, 4))).mean()
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert logits[0].grad[0, 3].abs().sum() > 0 and logits[0].grad[0, :3].abs().sum() == 0
    assert logits[1].grad is not None and not logits[1].grad.any()
