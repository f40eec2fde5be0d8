"""Duplicate removal (solo.modeling.nms): Matrix NMS, greedy mask NMS, point NMS and mask IoU,
against brute-force loops in ``reference_solo``."""

import math
import numpy as np
import pytest
import torch

from reference_solo import (
    reference_iou,
    reference_mask_nms,
    reference_matrix_nms,
    reference_points_nms,
)
from solo.modeling.nms import mask_iou_matrix, mask_nms, matrix_nms, points_nms


def random_overlapping_masks(rng, n, size=(24, 24)):
    """Rectangles drawn around a few anchors (so that many overlap), some exact duplicates."""
    h, w = size
    anchors = rng.integers(4, 20, (3, 2))
    masks = np.zeros((n, h, w), dtype=bool)
    for k in range(n):
        if k and rng.random() < 0.15:
            masks[k] = masks[rng.integers(0, k)]
            continue
        cy, cx = anchors[rng.integers(0, 3)] + rng.integers(-3, 4, 2)
        ry, rx = rng.integers(1, 7, 2)
        masks[k, max(0, cy - ry) : cy + ry, max(0, cx - rx) : cx + rx] = True
    return masks


def sorted_scores(rng, n):
    return np.sort(rng.random(n).astype(np.float32))[::-1].copy()


# --------------------------------------------------------------------------------------------
# Mask IoU
# --------------------------------------------------------------------------------------------


def test_mask_iou_matrix_matches_pairwise_iou_and_is_zero_for_empty_masks():
    rng = np.random.default_rng(0)
    masks = random_overlapping_masks(rng, 12)
    masks[3] = False
    t = torch.from_numpy(masks)
    iou = mask_iou_matrix(t, t.flatten(1).sum(1).float())
    ref = [[reference_iou(a, b) for b in masks] for a in masks]
    np.testing.assert_allclose(iou.numpy(), ref, atol=1e-6)
    assert torch.isfinite(iou).all()


@pytest.mark.parametrize("num_labels", [1, 3, 12])
def test_mask_iou_matrix_with_labels_is_the_same_label_iou_and_zero_across(num_labels):
    rng = np.random.default_rng(num_labels)
    t = torch.from_numpy(random_overlapping_masks(rng, 12))
    areas = t.flatten(1).sum(1).float()
    labels = torch.from_numpy(rng.integers(0, num_labels, 12))
    same = labels[:, None] == labels[None, :]
    expected = mask_iou_matrix(t, areas) * same
    assert torch.equal(mask_iou_matrix(t, areas, labels), expected)


@pytest.mark.parametrize("num_labels", [1, 4, 40])
def test_nms_through_rows_equals_nms_of_the_gathered_masks(num_labels):
    """Masks given as rows into a larger set (fewer, more, repeated rows than masks, as the
    post-processor's candidates index its chunk's masks) give the IoU matrix, Matrix NMS and
    mask NMS of the gathered masks exactly, without areas too."""
    rng = np.random.default_rng(num_labels)
    t = torch.from_numpy(random_overlapping_masks(rng, 30))
    for n in (12, 30, 45):
        rows = torch.from_numpy(rng.integers(0, 30, n))
        gathered = t[rows]
        labels = torch.from_numpy(rng.integers(0, num_labels, n))
        scores = torch.from_numpy(sorted_scores(rng, n))
        areas = gathered.flatten(1).sum(1).float()
        expected = mask_iou_matrix(gathered, areas, labels)
        assert torch.equal(mask_iou_matrix(t, areas, labels, rows), expected)
        assert torch.equal(mask_iou_matrix(t, areas, None, rows), mask_iou_matrix(gathered, areas))
        for kernel in ("gaussian", "linear"):
            expected = matrix_nms(gathered, labels, scores, kernel)
            assert torch.equal(matrix_nms(t, labels, scores, kernel, rows=rows), expected)
        expected = mask_nms(gathered, labels, scores, 0.3)
        assert torch.equal(mask_nms(t, labels, scores, 0.3, rows=rows), expected)


@pytest.mark.parametrize("group_sizes", [[60, 1, 30, 20, 9, 2], [7] * 25, [1] * 50, [49]])
def test_same_label_intersections_packed_in_blocks_are_the_exact_same_label_counts(group_sizes):
    """Labels packed into diagonal blocks (one spanning several labels, one label larger than a
    block, labels given in any order) give each same-label pair its exact count, 0 across."""
    from solo.modeling.nms import LABEL_BLOCK_ROWS, _same_label_intersections

    assert max(group_sizes) > LABEL_BLOCK_ROWS or len(group_sizes) > 1
    gen = torch.Generator().manual_seed(len(group_sizes))
    labels = torch.repeat_interleave(torch.arange(len(group_sizes)) * 3, torch.tensor(group_sizes))
    labels = labels[torch.randperm(len(labels), generator=gen)]
    flat = torch.rand(len(labels), 3000, generator=gen) > 0.7
    expected = (flat.double() @ flat.double().t()) * (labels[:, None] == labels[None, :])
    inter = _same_label_intersections(flat, labels)
    assert inter.dtype == torch.float32
    torch.testing.assert_close(inter.double(), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Matrix NMS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("seed", range(5))
def test_matrix_nms_matches_brute_force_formula(kernel, seed):
    rng = np.random.default_rng(seed)
    n = 30
    masks = random_overlapping_masks(rng, n)
    labels = rng.integers(0, 3, n)
    scores = sorted_scores(rng, n)
    ours = matrix_nms(
        torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(scores), kernel, 2.0
    )
    ref = reference_matrix_nms(masks, labels, scores, kernel, 2.0)
    assert torch.isfinite(ours).all()
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert (ours.numpy() <= scores + 1e-7).all()  # decay never raises a score


def test_matrix_nms_precomputed_areas_give_the_same_result():
    rng = np.random.default_rng(0)
    masks = torch.from_numpy(random_overlapping_masks(rng, 10))
    labels, scores = torch.zeros(10, dtype=torch.long), torch.from_numpy(sorted_scores(rng, 10))
    areas = masks.flatten(1).sum(1).float()
    assert torch.allclose(
        matrix_nms(masks, labels, scores), matrix_nms(masks, labels, scores, areas=areas)
    )


def test_matrix_nms_decays_a_duplicate_of_the_same_class_only():
    mask = torch.zeros((1, 8, 8), dtype=torch.bool)
    mask[:, 2:6, 2:6] = True
    masks = mask.expand(3, 8, 8)
    scores = torch.tensor([0.9, 0.8, 0.7])
    # Masks 0 and 1 share a class, mask 2 is another class: only mask 1 decays, by
    # exp(-2 * 1^2) (gaussian) or (1 - 1) (linear).
    labels = torch.tensor([0, 0, 1])
    gauss = matrix_nms(masks, labels, scores, "gaussian", 2.0)
    assert gauss.tolist() == pytest.approx([0.9, 0.8 * math.exp(-2.0), 0.7])
    linear = matrix_nms(masks, labels, scores, "linear")
    assert linear.tolist() == pytest.approx([0.9, 0.0, 0.7])


def test_matrix_nms_disjoint_masks_keep_their_scores():
    masks = torch.zeros((3, 6, 6), dtype=torch.bool)
    masks[0, :2], masks[1, 2:4], masks[2, 4:] = True, True, True
    scores = torch.tensor([0.5, 0.4, 0.3])
    for kernel in ("gaussian", "linear"):
        out = matrix_nms(masks, torch.zeros(3, dtype=torch.long), scores, kernel)
        assert torch.equal(out, scores)


def test_matrix_nms_linear_kernel_on_identical_masks_has_no_nan_or_inf():
    # Mask 1 duplicates mask 0 (comp = 1): the official 1 / (1 - comp) divides by zero.
    masks = torch.ones((4, 5, 5), dtype=torch.bool)
    masks[3, :2] = False  # IoU 15 / 25 with the others
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    out = matrix_nms(masks, torch.zeros(4, dtype=torch.long), scores, "linear")
    assert torch.isfinite(out).all()
    # Mask 3 is decayed by mask 0 only: (1 - 0.6) / (1 - 0); the suppressed duplicates, whose
    # compensation is 1, do not decay it further.
    assert out.tolist() == pytest.approx([0.9, 0.0, 0.0, 0.6 * 0.4])


def test_matrix_nms_compensates_by_the_suppressor_own_overlap():
    # B overlaps A and C (IoU 1/3 each), A and C are disjoint. B decays by f(1/3) = exp(-2/9);
    # C by f(1/3) / f(comp_B) = f(1/3) / f(1/3) = 1: B, itself a duplicate, does not suppress C.
    masks = torch.zeros((3, 1, 8), dtype=torch.bool)
    masks[0, 0, 0:4] = True
    masks[1, 0, 2:6] = True  # A & B = 2, A | B = 6: IoU 1/3
    masks[2, 0, 4:8] = True  # B & C = 2: IoU 1/3; A & C = 0
    scores = torch.tensor([0.9, 0.8, 0.7])
    out = matrix_nms(masks, torch.zeros(3, dtype=torch.long), scores, "gaussian", 2.0)
    assert out.tolist() == pytest.approx([0.9, 0.8 * math.exp(-2.0 / 9), 0.7])


def test_matrix_nms_of_no_mask_is_empty():
    out = matrix_nms(torch.zeros((0, 4, 4), dtype=torch.bool), torch.zeros(0), torch.zeros(0))
    assert out.shape == (0,)


def test_matrix_nms_rejects_an_unknown_kernel():
    with pytest.raises(ValueError, match="kernel"):
        matrix_nms(torch.ones((1, 2, 2), dtype=torch.bool), torch.zeros(1), torch.ones(1), "box")


# --------------------------------------------------------------------------------------------
# Greedy mask NMS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(5))
def test_mask_nms_matches_sequential_greedy_loop(seed, threshold):
    rng = np.random.default_rng(100 + seed)
    n = 40
    masks = random_overlapping_masks(rng, n)
    labels = rng.integers(0, 2, n)
    scores = sorted_scores(rng, n)
    keep = mask_nms(
        torch.from_numpy(masks), torch.from_numpy(labels), torch.from_numpy(scores), threshold
    )
    assert keep.dtype == torch.bool
    np.testing.assert_array_equal(keep.numpy(), reference_mask_nms(masks, labels, threshold))


def test_mask_nms_long_suppression_chain_alternates_keep_and_drop():
    # Each mask overlaps only its neighbours by IoU 0.6: greedy keeps 0, drops 1, keeps 2, ...
    # (a mask whose only suppressor was itself suppressed survives).
    n = 12
    masks = torch.zeros((n, 1, 5 * n + 20), dtype=torch.bool)
    for k in range(n):
        masks[k, 0, 5 * k : 5 * k + 20] = True  # consecutive IoU 15 / 25 = 0.6, next 10/30
    keep = mask_nms(masks, torch.zeros(n, dtype=torch.long), torch.linspace(1, 0.1, n), 0.5)
    assert keep.tolist() == [k % 2 == 0 for k in range(n)]


def test_mask_nms_never_suppresses_across_classes_and_iou_threshold_is_strict():
    masks = torch.zeros((3, 1, 4), dtype=torch.bool)
    masks[0, 0, :2] = True
    masks[1, 0, :2] = True  # duplicate of 0, other class
    masks[2, 0, 1:3] = True  # IoU 1/3 with 0
    labels, scores = torch.tensor([0, 1, 0]), torch.tensor([0.9, 0.8, 0.7])
    assert mask_nms(masks, labels, scores, 0.5).tolist() == [True, True, True]
    assert mask_nms(masks, labels, scores, 1 / 3).tolist() == [True, True, True]
    assert mask_nms(masks, labels, scores, 0.3).tolist() == [True, True, False]


def test_mask_nms_of_no_mask_is_an_empty_bool_tensor():
    keep = mask_nms(torch.zeros((0, 4, 4), dtype=torch.bool), torch.zeros(0), torch.zeros(0))
    assert keep.shape == (0,) and keep.dtype == torch.bool


# --------------------------------------------------------------------------------------------
# Point NMS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_points_nms_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    # Quantised scores create ties: a cell equal to its largest neighbour survives.
    scores = np.round(rng.random((2, 3, 7, 7)), 1).astype(np.float32)
    ours = points_nms(torch.from_numpy(scores)).numpy()
    ref = np.stack([reference_points_nms(s) for s in scores])
    np.testing.assert_array_equal(ours, ref)


def test_points_nms_only_looks_up_and_left():
    scores = torch.zeros((1, 1, 3, 3))
    scores[0, 0, 1, 1] = 0.5
    scores[0, 0, 2, 2] = 0.9  # below-right of (1, 1): does not suppress it
    scores[0, 0, 0, 2] = 0.7  # up-right of (1, 1): does not suppress it either
    out = points_nms(scores)
    assert out[0, 0, 1, 1] == 0.5 and out[0, 0, 2, 2] == 0.9 and out[0, 0, 0, 2] == 0.7
    scores[0, 0, 0, 0] = 0.6  # up-left of (1, 1): suppresses it
    assert points_nms(scores)[0, 0, 1, 1] == 0


def test_pairwise_intersections_are_exact_counts_on_large_masks():
    """The fast (int8) CPU path must give the exact float32 counts of the plain product."""
    from solo.modeling.nms import _pairwise_intersections

    gen = torch.Generator().manual_seed(0)
    flat = torch.rand(37, 50_000, generator=gen) > 0.3
    reference = flat.double() @ flat.double().t()
    torch.testing.assert_close(_pairwise_intersections(flat).double(), reference, rtol=0, atol=0)


@pytest.mark.parametrize("pixels", [1, 2, 3, 17])
def test_pairwise_intersections_of_masks_of_one_to_few_pixels_are_exact(pixels):
    """torch._int_mm reads a (1, N) transposed operand wrongly (garbage, no error): masks of a
    single pixel must take the float product."""
    from solo.modeling.nms import _pairwise_intersections, mask_iou_matrix

    gen = torch.Generator().manual_seed(pixels)
    flat = torch.rand(9, pixels, generator=gen) > 0.4
    flat[0] = True
    reference = flat.double() @ flat.double().t()
    torch.testing.assert_close(_pairwise_intersections(flat).double(), reference, rtol=0, atol=0)
    masks = flat.view(9, 1, pixels)
    iou = mask_iou_matrix(masks, flat.sum(1).float(), torch.zeros(9, dtype=torch.long))
    assert iou.max() <= 1 and iou[0, 0] == 1


@pytest.mark.parametrize("shape", [(37, 200, 304), (1, 1, 1), (5, 7, 3), (0, 8, 8)])
def test_mask_areas_are_the_exact_pixel_counts_of_any_mask_shape(shape):
    """The int8-product pixel count equals a plain int64 sum, for empty, full and odd masks and
    for a non-contiguous view."""
    from solo.modeling.nms import mask_areas

    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(shape, generator=gen) > 0.4
    if len(masks) > 2:
        masks[0], masks[1] = False, True
    for m in (masks, masks.transpose(1, 2)):
        areas = mask_areas(m)
        assert areas.dtype == torch.int64
        assert torch.equal(areas, m.flatten(1).long().sum(dim=1))
