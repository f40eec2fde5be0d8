"""Target assignment (solo.modeling.targets): which cells are positive, with which class and mask.

Hand-computed cases state their arithmetic in comments; a randomized test compares the vectorised
assigner with ``reference_solo.reference_targets_single``, a loop-by-loop re-implementation of the
official ``solo_target_single`` / ``solov2_target_single``.
"""

import numpy as np
import cv2
import pytest
import torch

from detectron2.structures import BitMasks, Boxes, Instances

from reference_solo import cv2_downsample, reference_targets_single
from solo.modeling.targets import (
    SOLOTargetAssigner,
    centers_of_mass,
    downsample_masks,
    gather_ground_truth,
    grid_cell,
)

NUM_CLASSES = 3
BG = NUM_CLASSES


def rect(size, rows, cols):
    """A (H, W) bool mask with the inclusive pixel ranges ``rows`` x ``cols`` set."""
    m = np.zeros(size, dtype=bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def tight_box(mask):
    """Detectron2 XYXY box of a mask (x2 = last column + 1)."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def instances(image_size, masks, classes, boxes=None):
    inst = Instances(image_size)
    masks = np.asarray(masks, dtype=bool).reshape(-1, *image_size)
    if boxes is None:
        boxes = [tight_box(m) for m in masks]
    inst.gt_boxes = Boxes(torch.tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)))
    inst.gt_classes = torch.tensor(classes, dtype=torch.long)
    inst.gt_masks = BitMasks(torch.from_numpy(masks))
    return inst


def assign(images, num_grids, scale_ranges, mask_strides, sigma=0.2, keep=False, padded=(64, 64)):
    gt = gather_ground_truth(images, padded, "cpu")
    assigner = SOLOTargetAssigner(NUM_CLASSES, num_grids, scale_ranges, mask_strides, sigma, keep)
    return assigner(gt)


def entries(t):
    """{(image, cell): [mask targets]} of a level, as sorted lists of bytes."""
    out = {}
    for img, cell, inst in zip(t.pos_images.tolist(), t.pos_cells.tolist(), t.pos_instances):
        out.setdefault((img, cell), []).append(t.mask_targets[inst].numpy().tobytes())
    return {k: sorted(v) for k, v in out.items()}


def positive(t, image=0):
    return set(t.positive_cells[image].nonzero().flatten().tolist())


# Instance A on a 64x64 padded image: rows 20..43, cols 8..39 (24 x 32 pixels).
# Detectron2 box (8, 20, 40, 44); inclusive box w = 31, h = 23; scale sqrt(31 * 23) = 26.7.
# Centre of mass (23.5, 31.5).
SIZE = (64, 64)
MASK_A = rect(SIZE, (20, 43), (8, 39))
# Instance B: rows 28..43, cols 20..35; inclusive w = h = 15, scale 15; centre (27.5, 35.5).
MASK_B = rect(SIZE, (28, 43), (20, 35))


# --------------------------------------------------------------------------------------------
# Grid cells and centres
# --------------------------------------------------------------------------------------------


def test_grid_cell_is_one_less_than_floor_at_float32_cell_boundaries():
    # 1/6 and 1/12 round *up* in float32, so (32/64) // (1/6) = 0.5 // 0.16666667 = 2, not 3.
    coords = torch.tensor([32.0, 16.0, 48.0, 31.9, 32.1])
    assert grid_cell(coords, 64, 6).tolist() == [2, 1, 4, 2, 3]
    assert grid_cell(torch.tensor([16.0, 32.0]), 64, 12).tolist() == [2, 5]
    # 1/4 and 1/8 are exact: no shift at their boundaries.
    assert grid_cell(torch.tensor([16.0, 32.0, 48.0]), 64, 4).tolist() == [1, 2, 3]
    assert grid_cell(torch.tensor([8.0, 63.9]), 64, 8).tolist() == [1, 7]


def test_grid_cell_of_negative_coordinate_floors_below_zero():
    # Centre minus half extent can be negative; it is clamped at 0 by the caller.
    assert grid_cell(torch.tensor([-0.5, -20.0]), 64, 4).tolist() == [-1, -2]


def test_centers_of_mass_of_masks_and_zero_for_empty_mask():
    masks = torch.from_numpy(np.stack([MASK_A, MASK_B, np.zeros(SIZE, bool)]))
    cx, cy = centers_of_mass(masks)
    assert cx.dtype == torch.float32
    assert cx.tolist() == [23.5, 27.5, 0.0] and cy.tolist() == [31.5, 35.5, 0.0]


# --------------------------------------------------------------------------------------------
# Hand-computed assignments
# --------------------------------------------------------------------------------------------


def test_single_instance_centre_region_labels_and_mask_target():
    # S = 8 (cells of 8 px), sigma 0.2: centre cell (row 31.5/8 = 3, col 23.5/8 = 2).
    # half_w = 0.5 * 31 * 0.2 = 3.1: x in [20.4, 26.6] -> cols 2..3;
    # half_h = 0.5 * 23 * 0.2 = 2.3: y in [29.2, 33.8] -> rows 3..4.
    (t,) = assign([instances(SIZE, [MASK_A], [1])], [8], [(1, 100)], [4])
    cells = {26, 27, 34, 35}  # rows 3..4 x cols 2..3, row * 8 + col
    expected = torch.full((1, 64), BG)
    expected[0, sorted(cells)] = 1
    assert torch.equal(t.cate_labels, expected)
    assert positive(t) == cells
    assert t.pos_images.tolist() == [0] * 4 and set(t.pos_cells.tolist()) == cells
    # Mask target at stride 4 (16 x 16): rows 20..43 -> 5..10, cols 8..39 -> 2..9, since the
    # rectangle edges fall on multiples of 4 (each target pixel averages source pixels 4d+1, 4d+2).
    assert t.mask_targets.shape == (1, 16, 16) and t.mask_targets.dtype == torch.bool
    assert torch.equal(t.mask_targets[0], torch.from_numpy(rect((16, 16), (5, 10), (2, 9))))
    assert t.pos_instances.tolist() == [0] * 4


def test_centre_region_is_clipped_to_the_3x3_cells_around_the_centre_cell():
    # sigma 1: half_w = 15.5 -> x in [8, 39] -> cols 1..4, clipped to 2 +- 1 = 1..3;
    # half_h = 11.5 -> y in [20, 43] -> rows 2..5, clipped to 3 +- 1 = 2..4.
    (t,) = assign([instances(SIZE, [MASK_A], [0])], [8], [(1, 100)], [4], sigma=1.0)
    assert positive(t) == {r * 8 + c for r in (2, 3, 4) for c in (1, 2, 3)}


def test_centre_region_is_clamped_to_the_grid_at_the_image_border():
    # Rows/cols 0..9: centre 4.5 (cell 0), sigma 1: half = 0.5 * 9 = 4.5 -> [0, 9] -> cells 0..1.
    mask = rect(SIZE, (0, 9), (0, 9))
    (t,) = assign([instances(SIZE, [mask], [2])], [8], [(1, 100)], [4], sigma=1.0)
    assert positive(t) == {0, 1, 8, 9}


def test_centre_exactly_on_a_cell_boundary_uses_the_official_float32_rule():
    # Rows/cols 8..56: centre (32, 32), the boundary between cells 2 and 3 of S = 6 on 64 px.
    # Official: 0.5 // float32(1/6) = 2. sigma 1: half = 0.5 * 48 = 24 -> [8, 56] -> cells 0..5,
    # clipped to 2 +- 1 = 1..3 (a naive floor(c * S / H) = 3 would give 2..4).
    mask = rect(SIZE, (8, 56), (8, 56))
    (t,) = assign([instances(SIZE, [mask], [0])], [6], [(1, 100)], [4], sigma=1.0)
    assert positive(t) == {r * 6 + c for r in (1, 2, 3) for c in (1, 2, 3)}


def test_solo_later_instance_overwrites_category_and_mask_of_shared_cells():
    # A covers cells {26, 27, 34, 35}; B (centre col 27.5/8 = 3, row 35.5/8 = 4, half 1.5 ->
    # x in [26, 29], y in [34, 37]) covers only cell 4 * 8 + 3 = 35.
    a, b = MASK_A, MASK_B
    (t,) = assign([instances(SIZE, [a, b], [1, 2])], [8], [(1, 100)], [4])
    assert t.cate_labels[0, [26, 27, 34, 35]].tolist() == [1, 1, 1, 2]
    target = {n: downsample_masks(torch.from_numpy(m)[None], 4)[0] for n, m in (("a", a), ("b", b))}
    got = entries(t)
    # One mask per positive cell: A's for its own cells, B's for the shared one.
    assert set(got) == {(0, 26), (0, 27), (0, 34), (0, 35)}
    for cell in (26, 27, 34):
        assert got[(0, cell)] == [target["a"].numpy().tobytes()]
    assert got[(0, 35)] == [target["b"].numpy().tobytes()]

    # Reversed annotation order: A comes last and owns cell 35 again.
    (t,) = assign([instances(SIZE, [b, a], [2, 1])], [8], [(1, 100)], [4])
    assert t.cate_labels[0, [26, 27, 34, 35]].tolist() == [1, 1, 1, 1]
    assert entries(t)[(0, 35)] == [target["a"].numpy().tobytes()]
    assert len(t.pos_cells) == 4


def test_solov2_overwrites_category_but_keeps_both_masks_of_a_shared_cell():
    (t,) = assign([instances(SIZE, [MASK_A, MASK_B], [1, 2])], [8], [(1, 100)], [4], keep=True)
    assert t.cate_labels[0, [26, 27, 34, 35]].tolist() == [1, 1, 1, 2]
    got = entries(t)
    assert len(got[(0, 35)]) == 2 and len(got[(0, 26)]) == 1
    assert len(t.pos_cells) == 5
    # Positive *cells* (the focal loss normaliser) are still 4.
    assert int(t.positive_cells.sum()) == 4


def test_scale_ranges_are_inclusive_and_use_the_inclusive_box():
    # Rows/cols 10..25 (16 px): detectron2 box width 16, inclusive width 15, scale 15, which
    # belongs to both [1, 15] and [15, 30]. Rows/cols 40..56 (17 px): scale 16, level 1 only.
    small = rect(SIZE, (10, 25), (10, 25))
    large = rect(SIZE, (40, 56), (40, 56))
    lvl0, lvl1 = assign(
        [instances(SIZE, [small, large], [0, 1])], [8, 4], [(1, 15), (15, 30)], [4, 8]
    )
    # Level 0 (S = 8): small centre 17.5 -> cell 2, half 1.5 -> [16, 19] -> cell 2: 2 * 8 + 2.
    assert positive(lvl0) == {18}
    assert lvl0.mask_targets.shape == (1, 16, 16)
    # Level 1 (S = 4): small centre 17.5/16 -> 1, [16, 19] -> 1: cell 1 * 4 + 1 = 5;
    # large centre 48/16 = 3, half 1.6 -> [46.4, 49.6] -> cells 2..3: rows/cols 2..3.
    assert positive(lvl1) == {5, 10, 11, 14, 15}
    assert lvl1.cate_labels[0, 5] == 0 and lvl1.cate_labels[0, 15] == 1
    assert lvl1.mask_targets.shape == (2, 8, 8)


def test_scale_outside_every_range_gives_no_target():
    (t,) = assign([instances(SIZE, [MASK_A], [1])], [8], [(27, 100)], [4])  # scale 26.7
    assert not t.positive_cells.any() and len(t.pos_cells) == 0
    assert t.mask_targets.shape == (0, 16, 16)


def test_empty_mask_is_skipped_even_with_a_box_in_range():
    empty = np.zeros(SIZE, dtype=bool)
    boxes = [[8, 8, 40, 40], tight_box(MASK_B)]
    for keep in (False, True):
        (t,) = assign(
            [instances(SIZE, [empty, MASK_B], [0, 2], boxes)], [8], [(1, 100)], [4], keep=keep
        )
        assert positive(t) == {35}
        assert t.cate_labels[0, 35] == 2
        # Mask indices point at B's target, the only one kept.
        (inst,) = t.pos_instances.tolist()
        assert torch.equal(
            t.mask_targets[inst], downsample_masks(torch.from_numpy(MASK_B)[None], 4)[0]
        )


def test_image_without_instances_is_all_background_next_to_an_annotated_image():
    batch = [instances(SIZE, np.zeros((0, *SIZE)), []), instances(SIZE, [MASK_A], [1])]
    for keep in (False, True):
        (t,) = assign(batch, [8], [(1, 100)], [4], keep=keep)
        assert t.cate_labels.shape == (2, 64)
        assert (t.cate_labels[0] == BG).all() and not t.positive_cells[0].any()
        assert positive(t, 1) == {26, 27, 34, 35}
        assert set(t.pos_images.tolist()) == {1}


@pytest.mark.parametrize("num_images", [0, 2])
@pytest.mark.parametrize("keep", [False, True])
def test_batch_without_any_instance_gives_empty_typed_targets(num_images, keep):
    batch = [instances(SIZE, np.zeros((0, *SIZE)), []) for _ in range(num_images)]
    levels = assign(batch, [8, 4], [(1, 30), (15, 100)], [4, 8], keep=keep)
    for t, s, m in zip(levels, (8, 4), (16, 8)):
        assert t.cate_labels.shape == (num_images, s * s) and (t.cate_labels == BG).all()
        assert t.cate_labels.dtype == torch.long
        assert t.positive_cells.shape == (num_images, s * s)
        assert len(t.pos_images) == len(t.pos_cells) == len(t.pos_instances) == 0
        assert t.pos_cells.dtype == torch.long and t.pos_instances.dtype == torch.long
        assert t.mask_targets.shape == (0, m, m)


def test_gather_ground_truth_pads_masks_top_left_and_concatenates_the_batch():
    a = instances((40, 48), [rect((40, 48), (0, 39), (0, 47))], [2])
    b = instances(
        (64, 32), [rect((64, 32), (5, 9), (5, 9)), rect((64, 32), (0, 1), (0, 1))], [0, 1]
    )
    gt = gather_ground_truth([a, b], (64, 64), "cpu")
    assert gt.masks.shape == (3, 64, 64) and gt.masks.dtype == torch.bool
    assert gt.masks[0, :40, :48].all() and not gt.masks[0, 40:].any()
    assert not gt.masks[0, :, 48:].any()
    assert gt.image_ids.tolist() == [0, 1, 1] and gt.classes.tolist() == [2, 0, 1]
    assert gt.boxes.tolist()[1] == [5, 5, 10, 10] and gt.num_images == 2


# --------------------------------------------------------------------------------------------
# Randomized comparison with the official loops
# --------------------------------------------------------------------------------------------

PADDED = (96, 128)
GRIDS = [12, 8, 6]
RANGES = [(1, 24), (12, 48), (24, 2048)]


def random_masks(rng, image_size, n):
    """Rectangles, ellipses and L shapes (centre of mass off the mask); a few empty masks and
    exact duplicates, and rectangles centred on cell boundaries (multiples of 8 and 32)."""
    h, w = image_size
    yy, xx = np.mgrid[:h, :w]
    masks, boxes = [], []
    for _ in range(n):
        kind = rng.integers(0, 6)
        m = np.zeros((h, w), dtype=bool)
        bw, bh = rng.integers(2, max(3, w * 2 // 3)), rng.integers(2, max(3, h * 2 // 3))
        x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
        if kind == 0 and masks:
            m = masks[rng.integers(0, len(masks))].copy()  # duplicate of an earlier instance
        elif kind == 1:
            cx, cy = rng.choice([32, 64, 96]), rng.choice([8, 16, 24, 32, 40, 48, 56, 64])
            ex, ey = rng.integers(0, 12), rng.integers(0, 12)
            m[max(0, cy - ey) : cy + ey + 1, max(0, cx - ex) : cx + ex + 1] = True
        elif kind == 2:
            c = (x0 + (bw - 1) / 2, y0 + (bh - 1) / 2)
            m = ((xx - c[0]) / (bw / 2)) ** 2 + ((yy - c[1]) / (bh / 2)) ** 2 <= 1
        elif kind == 3:
            m[y0 : y0 + bh, x0 : x0 + 2] = True
            m[y0 + bh - 2 : y0 + bh, x0 : x0 + bw] = True
        else:
            m[y0 : y0 + bh, x0 : x0 + bw] = True
        if m.any() and rng.random() > 0.1:
            boxes.append(tight_box(m))
        else:
            m[:] = False  # empty mask with an arbitrary box
            boxes.append([x0, y0, x0 + bw, y0 + bh])
        masks.append(m)
    return masks, boxes


@pytest.mark.parametrize("keep", [False, True], ids=["solo", "solov2"])
@pytest.mark.parametrize("seed", range(4))
def test_assigner_matches_official_loops_on_random_batches(seed, keep):
    rng = np.random.default_rng(seed)
    strides = [4, 4, 4] if keep else [4, 8, 16]
    sizes = [(96, 128), (80, 100), (64, 128), (96, 90)]
    counts = [int(rng.integers(0, 9)) for _ in sizes]
    counts[seed % len(sizes)] = 0  # one image without instances in every batch
    batch, refs = [], []
    for size, n in zip(sizes, counts):
        masks, boxes = random_masks(rng, size, n)
        classes = rng.integers(0, NUM_CLASSES, n).tolist()
        batch.append(instances(size, np.asarray(masks).reshape(n, *size), classes, boxes))
        padded = np.zeros((n, *PADDED), dtype=np.uint8)
        padded[:, : size[0], : size[1]] = np.asarray(masks).reshape(n, *size)
        refs.append(
            reference_targets_single(
                padded,
                np.asarray(boxes, np.float32).reshape(n, 4),
                classes,
                NUM_CLASSES,
                GRIDS,
                RANGES,
                strides,
                0.2,
                keep,
            )
        )
    levels = assign(batch, GRIDS, RANGES, strides, keep=keep, padded=PADDED)
    num_entries = 0
    for level, t in enumerate(levels):
        ref_labels = np.stack([r[level][0].reshape(-1) for r in refs])
        np.testing.assert_array_equal(t.cate_labels.numpy(), ref_labels)
        assert torch.equal(t.positive_cells, t.cate_labels != BG)
        ours = sorted(
            (int(i), int(c), t.mask_targets[k].numpy().tobytes())
            for i, c, k in zip(t.pos_images, t.pos_cells, t.pos_instances)
        )
        ref = sorted(
            (i, int(cell), np.asarray(mask, bool).tobytes())
            for i, r in enumerate(refs)
            for cell, mask in r[level][1]
        )
        assert ours == ref
        num_entries += len(ref)
    assert num_entries > 0


# --------------------------------------------------------------------------------------------
# Mask downsampling
# --------------------------------------------------------------------------------------------


def _random_mask_batch(rng, size, n=6):
    noise = rng.random((n, *size)) < rng.random((n, 1, 1))
    shapes, _ = random_masks(rng, size, n)
    return np.concatenate([noise, np.asarray(shapes).reshape(n, *size)])


@pytest.mark.parametrize("stride", [2, 4, 8, 16])
@pytest.mark.parametrize("size", [(96, 128), (64, 32)])
def test_downsample_masks_equals_cv2_bilinear_on_uint8_masks(stride, size):
    # The fast path (even stride dividing the size): a 2x2 vote, as cv2 INTER_LINEAR rounds.
    masks = _random_mask_batch(np.random.default_rng(stride), size)
    ours = downsample_masks(torch.from_numpy(masks), stride)
    assert ours.dtype == torch.bool
    ref = np.stack([cv2_downsample(m, stride) for m in masks]).astype(bool)
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("stride,size", [(3, (96, 120)), (5, (60, 85)), (1, (7, 9))])
def test_downsample_masks_fallback_equals_cv2_for_integer_ratios(stride, size):
    masks = _random_mask_batch(np.random.default_rng(stride), size)
    ours = downsample_masks(torch.from_numpy(masks), stride)
    ref = np.stack([cv2_downsample(m, stride) for m in masks]).astype(bool)
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("stride,size", [(4, (63, 90)), (8, (50, 70)), (2, (65, 97))])
def test_downsample_masks_fallback_is_bilinear_at_non_integer_ratios(stride, size):
    # Sizes not divisible by the stride (never the case with padding to 32): mmcv's output size
    # int(x / s + 0.5) and true bilinear sampling >= 0.5. (cv2's fixed-point INTER_LINEAR on
    # 0/1 uint8 images is too coarse at such ratios to be a reference; its float path is one.)
    masks = _random_mask_batch(np.random.default_rng(stride), size)
    ours = downsample_masks(torch.from_numpy(masks), stride).numpy()
    out_size = (int(size[1] / stride + 0.5), int(size[0] / stride + 0.5))
    soft = np.stack([cv2.resize(m.astype(np.float32), out_size) for m in masks])
    assert ours.shape == soft.shape
    clear = np.abs(soft - 0.5) > 1e-4
    np.testing.assert_array_equal(ours[clear], soft[clear] >= 0.5)


def test_downsample_masks_of_no_mask():
    for stride, size in ((4, (64, 64)), (3, (64, 64))):
        out = downsample_masks(torch.zeros((0, *size), dtype=torch.bool), stride)
        assert out.shape == (0, round(size[0] / stride), round(size[1] / stride))
