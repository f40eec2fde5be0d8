"""Inference post-processing (solo.modeling.postprocess.SOLOPostProcessor) on crafted head outputs.

Real heads answer ``inference_mask_probs``; the reference is ``reference_seg_single``, the
official ``get_seg_single`` for one image fed with *all* cells' soft masks (checked against the
official computation: every channel sigmoided and upsampled to stride 4).
"""

import functools
import math
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.utils.events import EventStorage

from helpers import (
    EMBED,
    GRIDS,
    HEAD_ARGS,
    IMAGE_SIZES,
    LEVEL_STRIDES,
    NUM_CLASSES,
    OUTPUT_SIZES,
    PADDED,
    STRIDE4,
    identity_conv,
    make_head,
    mask_probs_of,
    random_outputs,
)
from reference_solo import reference_seg_single
from solo.modeling.heads import HeadOutputs, SOLOHead
from solo.modeling.nms import points_nms
from solo.modeling.postprocess import SOLOPostProcessor


def official_seg_preds(kind, outputs, image):
    """(sum S^2, h4, w4) soft masks of every cell of one image, the official way."""

    def up(x):
        return F.interpolate(x[None], size=STRIDE4, mode="bilinear", align_corners=False)[0]

    if kind == "solo":
        return torch.cat([up(m[image].sigmoid()) for m in outputs.mask_outputs])
    if kind == "decoupled":
        per_level = []
        for s, (x, y) in zip(GRIDS, outputs.mask_outputs):
            px, py = up(x[image].sigmoid()), up(y[image].sigmoid())
            cells = torch.arange(s * s)
            per_level.append(px[cells % s] * py[cells // s])
        return torch.cat(per_level)
    kernels, features = outputs.mask_outputs
    flat = torch.cat([k[image].permute(1, 2, 0).reshape(-1, EMBED) for k in kernels])
    return F.conv2d(features[image : image + 1], flat[:, :, None, None])[0].sigmoid()


def run_ours(kind, outputs, image_sizes=IMAGE_SIZES, output_sizes=OUTPUT_SIZES, **kwargs):
    post = SOLOPostProcessor(**{"min_mask_areas": LEVEL_STRIDES, **kwargs})
    mask_probs = mask_probs_of(kind, outputs)
    return post(outputs.cate_logits, mask_probs, PADDED, image_sizes, output_sizes)


REF_KEYS = {
    "score_thresh": "score_thr",
    "mask_thresh": "mask_thr",
    "nms_pre": "nms_pre",
    "update_thresh": "update_thr",
    "matrix_nms_kernel": "kernel",
    "matrix_nms_sigma": "sigma",
    "max_per_image": "max_per_img",
    "nms_type": "nms_type",
    "mask_nms_iou_thresh": "mask_nms_thr",
}


def all_cell_probs(kind, outputs, image):
    """The head's stride-4 soft masks of every cell of one image, checked against the official
    computation. They feed the reference: CPU bilinear kernels may differ by an ulp between
    channel subsets, enough to flip a pixel sitting on the mask threshold."""
    levels = torch.cat([torch.full((s * s,), i) for i, s in enumerate(GRIDS)])
    cells = torch.cat([torch.arange(s * s) for s in GRIDS])
    probs = make_head(kind).inference_mask_probs(outputs, image, levels, cells, STRIDE4)
    torch.testing.assert_close(probs, official_seg_preds(kind, outputs, image), atol=1e-6, rtol=0)
    return probs


def run_reference(kind, outputs, image, output_size, **kwargs):
    cfg = {REF_KEYS[k]: v for k, v in kwargs.items() if k in REF_KEYS}
    return reference_seg_single(
        [x[image].sigmoid() for x in outputs.cate_logits],
        all_cell_probs(kind, outputs, image),
        kwargs.get("min_mask_areas", LEVEL_STRIDES),  # the official code uses the strides
        IMAGE_SIZES[image],
        output_size,
        **cfg,
    )


def assert_same(result, ref):
    masks, labels, scores = ref
    assert result.pred_masks.dtype == torch.bool
    assert result.pred_classes.dtype == torch.int64
    np.testing.assert_array_equal(result.pred_classes.numpy(), labels)
    np.testing.assert_allclose(result.scores.numpy(), scores, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(result.pred_masks.numpy(), masks)


def tight_boxes(masks):
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] if len(xs) else [0, 0, 0, 0])
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


# --------------------------------------------------------------------------------------------
# Against the official get_seg_single
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
@pytest.mark.parametrize("seed", range(3))
def test_matches_official_get_seg_single(kind, seed):
    outputs = random_outputs(kind, seed)
    results = run_ours(kind, outputs)
    num = 0
    for image, (result, out_size) in enumerate(zip(results, OUTPUT_SIZES)):
        assert result.image_size == out_size
        assert_same(result, run_reference(kind, outputs, image, out_size))
        num += len(result)
    assert num > 3  # the crafted outputs do produce instances


@pytest.mark.parametrize(
    "options",
    [
        dict(nms_pre=6),
        dict(max_per_image=3),
        dict(score_thresh=0.3, mask_thresh=0.6),
        dict(matrix_nms_kernel="linear", update_thresh=0.2),
        dict(nms_type="mask", mask_nms_iou_thresh=0.4),
        dict(min_mask_areas=[0, 20, 3]),
    ],
    ids=["nms_pre", "max_per_image", "thresholds", "linear_kernel", "greedy_mask_nms", "areas"],
)
def test_options_match_official_get_seg_single(options):
    outputs = random_outputs("solo", 7, cate_mean=-2.0)
    results = run_ours("solo", outputs, **options)
    for image, (result, out_size) in enumerate(zip(results, OUTPUT_SIZES)):
        assert_same(result, run_reference("solo", outputs, image, out_size, **options))
    if "max_per_image" in options:
        assert all(len(r) == 3 for r in results)


def test_nms_pre_caps_the_candidates_entering_nms():
    outputs = random_outputs("solo", 3, cate_mean=-2.0)
    # With nms_pre = 1 and nothing left to decay it, the single best candidate is the output.
    result, _ = run_ours("solo", outputs, nms_pre=1)
    assert len(result) == 1
    full, _ = run_ours("solo", outputs, matrix_nms_sigma=0.0)  # sigma 0: no decay at all
    assert result.scores[0] == full.scores[0] and len(full) > 1


@pytest.mark.parametrize("kind", ["solo", "solov2"])
def test_chunk_size_does_not_change_the_result(kind):
    outputs = random_outputs(kind, 11, cate_mean=-2.0)
    reference = run_ours(kind, outputs, nms_pre=20, chunk_size=1000)
    for chunk_size in (1, 7, 64):
        results = run_ours(kind, outputs, nms_pre=20, chunk_size=chunk_size)
        for a, b in zip(results, reference):
            assert torch.equal(a.pred_masks, b.pred_masks)
            assert torch.equal(a.pred_classes, b.pred_classes)
            # Row sums of differently sized chunks may round differently in the last bit.
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
def test_heads_write_mask_probs_into_the_given_buffer_with_the_same_values(kind):
    """``out=``: the post-processor's kept CPU buffer receives exactly the probabilities a new
    tensor would hold; a buffer of another dtype, or (SOLOv2) a size that needs a resize or an
    active autocast, leaves the head computing as without it (same values, same dtype)."""
    outputs = random_outputs(kind, 5)
    head = make_head(kind)
    levels, cells = torch.tensor([0, 1, 1, 2]), torch.tensor([3, 0, 5, 2])
    cases = [
        (STRIDE4, torch.float32, False, True),
        ((17, 23), torch.float32, False, kind != "solov2"),
        (STRIDE4, torch.float64, False, False),
        (STRIDE4, torch.float32, True, kind != "solov2"),
    ]
    for size, dtype, autocast, used in cases:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = head.inference_mask_probs(outputs, 1, levels, cells, size)
            buffer = torch.full((len(cells), *size), float("nan"), dtype=dtype)
            result = head.inference_mask_probs(outputs, 1, levels, cells, size, out=buffer)
        assert (result.data_ptr() == buffer.data_ptr()) == used, (size, dtype, autocast)
        assert result.dtype == expected.dtype and torch.equal(result, expected)


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
def test_heads_run_under_cpu_bfloat16_autocast_with_bfloat16_mask_outputs(kind):
    """Under autocast the head's mask outputs are bfloat16 and a resize returns float32: the
    probabilities come out in the dtype computed (SOLO's per-level rows used to fail to fit a
    bfloat16 tensor), with or without the post-processor's float32 buffer."""
    outputs = random_outputs(kind, 6, cate_mean=-2.0)

    def as_bf16(x):
        if torch.is_tensor(x):
            return x.bfloat16()
        parts = [as_bf16(v) for v in x]
        return type(x)(*parts) if hasattr(x, "_fields") else type(x)(parts)  # NamedTuple or not

    outputs = HeadOutputs(outputs.cate_logits, as_bf16(outputs.mask_outputs))
    head = make_head(kind)
    levels, cells = torch.tensor([0, 1, 1, 2]), torch.tensor([3, 0, 5, 2])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        alone = head.inference_mask_probs(outputs, 1, levels, cells, STRIDE4)
        buffer = torch.empty((4, *STRIDE4))
        written = head.inference_mask_probs(outputs, 1, levels, cells, STRIDE4, out=buffer)
        results = run_ours(kind, outputs, nms_pre=20)
    assert torch.equal(written, alone) and written.dtype == alone.dtype
    assert sum(len(r) for r in results) > 0


@pytest.mark.parametrize("kind", ["solo", "solov2"])
def test_kept_buffer_and_byte_budget_do_not_change_the_result(kind, monkeypatch):
    """The CPU buffer kept between calls (reused by the next image, reallocated when it is too
    small) and a chunk budget of a few masks give what a fresh post-processor gives."""
    import solo.modeling.candidate_pool as candidate_pool

    first, second = random_outputs(kind, 11, cate_mean=-2.0), random_outputs(kind, 12)
    fresh = [run_ours(kind, outputs, nms_pre=20) for outputs in (first, second, first)]
    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, nms_pre=20)
    for budget in (candidate_pool.CHUNK_BYTES, 3 * 4 * math.prod(STRIDE4)):
        monkeypatch.setattr(candidate_pool, "CHUNK_BYTES", budget)
        for outputs, expected in zip((first, second, first), fresh):
            mask_probs = mask_probs_of(kind, outputs)
            results = post(outputs.cate_logits, mask_probs, PADDED, IMAGE_SIZES, OUTPUT_SIZES)
            for a, b in zip(results, expected):
                assert len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks)
                assert torch.equal(a.pred_classes, b.pred_classes)
                torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)
    assert post._buffers.kept.numel() >= 3 * math.prod(STRIDE4)


@pytest.mark.parametrize("rows", [0, 1, 2, 9, 17, 33, 47, 100])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_masks_and_sums_equal_the_comparison_and_plain_sums_bit_for_bit(rows, threads):
    """The maskness masks and numerators computed in row blocks equal ``probs > t`` and the
    one-call sums of the zeroed copy (any row count, thread count, dtype, threshold, with or
    without ``out``), and the probabilities are not modified."""
    from solo.modeling.candidate_pool import masks_and_sums

    gen = torch.Generator().manual_seed(rows)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype, thresh in [(torch.float32, 0.5), (torch.float16, 0.5), (torch.float32, 0.0)]:
            probs = torch.rand((rows, 200, 304), generator=gen).to(dtype)  # rows split over threads
            probs[:, :5] = 0.0  # exact zeros: outside at a threshold of 0
            before = probs.clone()
            expected_masks = probs > thresh
            expected = torch.where(expected_masks, probs, 0).flatten(1).sum(1, dtype=torch.float32)
            for out in (None, torch.ones(probs.shape, dtype=torch.bool)):
                masks, sums = masks_and_sums(probs, thresh, out)
                assert out is None or masks.data_ptr() == out.data_ptr()
                assert torch.equal(masks, expected_masks), (dtype, thresh)
                assert sums.dtype == torch.float32 and torch.equal(sums, expected), (dtype, thresh)
            assert torch.equal(probs, before)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_masks_and_sums_round_the_threshold_to_the_probabilities_dtype(dtype):
    """``probs > 0.6`` compares with 0.6 rounded to float16/bfloat16 (above 0.6): pixels equal
    to that rounded value are outside, as in the comparison (threshold's half kernels compare
    in float32)."""
    from solo.modeling.candidate_pool import masks_and_sums

    gen = torch.Generator().manual_seed(3)
    for thresh in (0.3, 0.6, 0.999):
        rounded = torch.tensor(thresh, dtype=dtype)
        probs = torch.rand((20, 16, 24), generator=gen).to(dtype)
        probs[:, :4] = rounded  # exactly the rounded threshold: outside
        masks, sums = masks_and_sums(probs, thresh)
        expected_masks = probs > thresh
        assert torch.equal(masks, expected_masks), (dtype, thresh)
        assert torch.equal(
            sums, torch.where(expected_masks, probs, 0).flatten(1).sum(1, dtype=torch.float32)
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_masks_and_sums_of_one_nan_row_or_strided_rows_are_the_plain_sums(threads):
    """One NaN row among many is redone as a row of a larger sum (a lone row is summed split
    across threads), and rows that are not contiguous (probabilities laid out (h, w, K)) are
    summed in their own layout, as the plain formula does: bit for bit in both cases."""
    from solo.modeling.candidate_pool import masks_and_sums

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(8)
        probs = torch.rand((6, 200, 304), generator=gen)
        probs[2, 0, 0] = float("nan")
        permuted = torch.rand((200, 304, 4), generator=gen).permute(2, 0, 1)
        for p in (probs, permuted):
            masks, sums = masks_and_sums(p, 0.5)
            expected = torch.where(p > 0.5, p, 0).flatten(1).sum(dim=1, dtype=torch.float32)
            assert torch.equal(masks, p > 0.5) and torch.equal(sums, expected)
    finally:
        torch.set_num_threads(previous)


def test_masks_and_sums_write_other_outs_as_the_comparison_does():
    """An ``out`` that is not a contiguous bool tensor of the probabilities' shape (uint8, a
    different shape that the comparison resizes) gets the comparison's values."""
    from solo.modeling.candidate_pool import masks_and_sums

    probs = torch.rand((10, 8, 12), generator=torch.Generator().manual_seed(1))
    for out in (torch.empty((10, 8, 12), dtype=torch.uint8), torch.empty(0, dtype=torch.bool)):
        masks, _ = masks_and_sums(probs, 0.5, out)
        assert torch.equal(masks, torch.gt(probs, 0.5, out=out.clone())) and masks is out


def test_masks_and_sums_leave_nan_pixels_out_and_handle_negative_thresholds():
    """NaN pixels are outside the masks and out of the sums, as with the comparison (the row
    blocks' zeroing keeps NaN: those rows are redone); a negative threshold keeps exact zeros
    inside (the zeroed copy cannot tell them apart)."""
    from solo.modeling.candidate_pool import masks_and_sums

    gen = torch.Generator().manual_seed(5)
    probs = torch.rand((40, 30, 50), generator=gen)
    probs[3, 0, :7] = float("nan")
    probs[30, 10:12, 20] = float("nan")
    probs[7, 1] = 0.0
    for thresh in (0.5, -0.25):
        expected_masks = probs > thresh
        expected = torch.where(expected_masks, probs, 0).flatten(1).sum(dim=1)
        masks, sums = masks_and_sums(probs, thresh)
        assert torch.equal(masks, expected_masks) and torch.equal(sums, expected), thresh
        assert not sums.isnan().any()


@pytest.mark.parametrize("kind", ["solo", "solov2"])
def test_results_kept_across_calls_do_not_share_the_kept_buffers(kind):
    """The instances of one call stay as they were while later calls (other images, other
    sizes) write into the kept buffers: no output is a view of them."""
    first, second = random_outputs(kind, 21, cate_mean=-2.0), random_outputs(kind, 22)
    expected = run_ours(kind, first, nms_pre=30)
    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, nms_pre=30)
    held = post(first.cate_logits, mask_probs_of(kind, first), PADDED, IMAGE_SIZES, OUTPUT_SIZES)
    for _ in range(2):
        post(second.cate_logits, mask_probs_of(kind, second), PADDED, IMAGE_SIZES, OUTPUT_SIZES)
    for a, b in zip(held, expected):
        assert len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_threads_sharing_a_post_processor_get_their_own_buffers():
    """Serving threads may share one model: each thread writes into its own kept buffer."""
    from concurrent.futures import ThreadPoolExecutor

    all_outputs = [random_outputs("solov2", seed, cate_mean=-2.0) for seed in range(4)]
    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, nms_pre=30)

    def run(outputs):
        mask_probs = mask_probs_of("solov2", outputs)
        results = []
        for _ in range(3):
            results = post(outputs.cate_logits, mask_probs, PADDED, IMAGE_SIZES, OUTPUT_SIZES)
        return results

    expected = [run_ours("solov2", outputs, nms_pre=30) for outputs in all_outputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        served = list(pool.map(run, all_outputs))
    for results, reference in zip(served, expected):
        for a, b in zip(results, reference):
            assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.scores, b.scores)


def test_post_processor_copies_and_pickles_without_its_buffers():
    import copy
    import pickle

    outputs = random_outputs("solov2", 3, cate_mean=-2.0)
    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, nms_pre=20)
    post(outputs.cate_logits, mask_probs_of("solov2", outputs), PADDED, IMAGE_SIZES, OUTPUT_SIZES)
    for clone in (copy.deepcopy(post), pickle.loads(pickle.dumps(post))):
        assert clone.nms_pre == 20 and clone._buffers.kept is None
        results = clone(
            outputs.cate_logits, mask_probs_of("solov2", outputs), PADDED, IMAGE_SIZES,
            OUTPUT_SIZES,
        )  # fmt: skip
        for a, b in zip(results, run_ours("solov2", outputs, nms_pre=20)):
            assert torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
def test_a_cell_candidate_for_several_classes_gets_its_mask_computed_once(kind):
    """Class 1 scores just below class 0 everywhere: every class-0 candidate cell is a class-1
    candidate too. The post-processor asks the head for each cell's mask once per call and still
    matches the official get_seg_single, which computes one mask per (cell, class)."""
    outputs = random_outputs(kind, 13, cate_mean=-2.0)
    for x in outputs.cate_logits:
        x[:, 1] = x[:, 0] - 0.05
    head_probs = mask_probs_of(kind, outputs)
    requested = []

    def mask_probs(image, levels, cells, size, out=None):
        pairs = list(zip(levels.tolist(), cells.tolist()))
        requested.append(pairs)
        return head_probs(image, levels, cells, size, out=out)

    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES)
    results = post(outputs.cate_logits, mask_probs, PADDED, IMAGE_SIZES, OUTPUT_SIZES)
    shared = 0
    for image, (result, out_size) in enumerate(zip(results, OUTPUT_SIZES)):
        assert_same(result, run_reference(kind, outputs, image, out_size))
        labels = result.pred_classes.tolist()
        shared += min(labels.count(0), labels.count(1))
    assert shared > 0  # both classes of a cell reach the output
    assert all(len(set(pairs)) == len(pairs) for pairs in requested)


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
def test_pred_boxes_are_the_tight_boxes_of_the_final_masks(kind):
    results = run_ours(kind, random_outputs(kind, 5))
    for result in results:
        assert len(result)
        np.testing.assert_array_equal(
            result.pred_boxes.tensor.numpy(), tight_boxes(result.pred_masks.numpy())
        )


def test_output_size_different_from_the_image_resizes_the_cropped_masks():
    outputs = random_outputs("solo", 2)
    sizes = [(120, 180), (50, 47)]  # upscaled, and a different aspect ratio
    results = run_ours("solo", outputs, output_sizes=sizes)
    for image, (result, size) in enumerate(zip(results, sizes)):
        assert result.image_size == size and result.pred_masks.shape[1:] == size
        assert_same(result, run_reference("solo", outputs, image, size))


# --------------------------------------------------------------------------------------------
# Crafted single-candidate cases (level 0 masks are at stride 4: no resampling before scoring)
# --------------------------------------------------------------------------------------------


def single_cell_outputs(cells_and_masks, batch=1):
    """SOLO outputs where only the given (class, level-0 cell, cate logit, mask logits) fire."""
    cate = [torch.full((batch, NUM_CLASSES, s, s), -30.0) for s in GRIDS]
    masks = [
        torch.full((batch, s * s, PADDED[0] // st, PADDED[1] // st), -30.0)
        for s, st in zip(GRIDS, (4, 8, 16))
    ]
    for cls, cell, logit, mask in cells_and_masks:
        cate[0][0, cls, cell // GRIDS[0], cell % GRIDS[0]] = logit
        masks[0][0, cell] = mask
    return HeadOutputs(cate, masks)


def block(value, rows, cols, background=-30.0):
    m = torch.full(STRIDE4, background)
    m[rows[0] : rows[1], cols[0] : cols[1]] = value
    return m


def test_score_threshold_is_strict():
    outputs = single_cell_outputs([(1, 30, 2.0, block(30.0, (4, 10), (4, 10)))])
    score = float(torch.sigmoid(torch.tensor(2.0)))
    (at,) = run_ours("solo", outputs, [IMAGE_SIZES[0]], [IMAGE_SIZES[0]], score_thresh=score)
    assert len(at) == 0
    below = float(np.nextafter(np.float32(score), np.float32(0)))  # the float32 just below
    (just_below,) = run_ours(
        "solo", outputs, [IMAGE_SIZES[0]], [IMAGE_SIZES[0]], score_thresh=below
    )
    assert len(just_below) == 1 and just_below.pred_classes.tolist() == [1]
    assert just_below.scores.item() == pytest.approx(score)


def test_area_filter_keeps_masks_strictly_larger_than_the_level_stride():
    # Level 0 has stride 8: 8 mask pixels at stride 4 are dropped, 9 are kept.
    outputs = single_cell_outputs(
        [(0, 30, 3.0, block(30.0, (2, 4), (2, 6))), (2, 70, 3.0, block(30.0, (8, 11), (8, 11)))]
    )
    (result,) = run_ours("solo", outputs, [IMAGE_SIZES[0]], [IMAGE_SIZES[0]])
    assert result.pred_classes.tolist() == [2]
    # MIN_MASK_AREAS replaces the strides: 7 keeps the 8-pixel mask, 9 drops the 9-pixel one.
    for areas, expected in (([7, 16, 32], [0, 2]), ([9, 16, 32], [])):
        (result,) = run_ours(
            "solo", outputs, [IMAGE_SIZES[0]], [IMAGE_SIZES[0]], min_mask_areas=areas
        )
        assert sorted(result.pred_classes.tolist()) == expected


def test_min_mask_areas_default_to_the_level_strides():
    from solo import get_solo_cfg

    cfg = get_solo_cfg()
    assert SOLOPostProcessor(cfg, level_strides=[4, 8, 16, 32, 64]).min_mask_areas == [
        4, 8, 16, 32, 64
    ]  # fmt: skip
    cfg.MODEL.SOLO.MIN_MASK_AREAS = [0, 1, 2, 3, 4]
    assert SOLOPostProcessor(cfg, level_strides=[8] * 5).min_mask_areas == [0, 1, 2, 3, 4]


def test_mask_threshold_is_strict_and_maskness_rescales_the_score():
    # 8 pixels at p = 0.75 plus 4 at exactly p = 0.5 (logit 0): the binary mask has 8 pixels
    # (not > stride 8) and the candidate is dropped; with 9 pixels at 0.75 it is kept, with
    # score sigmoid(3) * 0.75 (maskness: mean probability inside the binary mask).
    logit = math.log(3.0)
    eight = block(logit, (2, 4), (2, 6))
    eight[4, 2:6] = 0.0
    nine = block(logit, (2, 5), (2, 5))
    nine[5, 2:6] = 0.0
    (dropped,) = run_ours(
        "solo", single_cell_outputs([(0, 30, 3.0, eight)]), [(64, 96)], [(64, 96)]
    )
    assert len(dropped) == 0
    (kept,) = run_ours("solo", single_cell_outputs([(0, 30, 3.0, nine)]), [(64, 96)], [(64, 96)])
    assert kept.scores.item() == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item() * 0.75)


def test_points_nms_removes_a_cell_below_its_upper_left_neighbour():
    mask = block(30.0, (4, 10), (4, 10))
    shifted = block(30.0, (10, 15), (14, 20))  # disjoint: Matrix NMS alone would keep both
    outputs = single_cell_outputs([(0, 13, 2.0, shifted), (0, 0, 3.0, mask)])
    (result,) = run_ours("solo", outputs, [(64, 96)], [(64, 96)])
    assert len(result) == 1  # cell 13 = (1, 1) is below (0, 0) of the same class
    outputs = single_cell_outputs([(0, 13, 2.0, shifted), (1, 0, 3.0, mask)])
    (result,) = run_ours("solo", outputs, [(64, 96)], [(64, 96)])
    assert sorted(result.pred_classes.tolist()) == [0, 1]  # other class: no competition


def test_masks_are_cropped_to_the_image_before_resizing():
    # A candidate whose mask lies in the padding (columns >= 72 of 96) ends up empty.
    outputs = single_cell_outputs([(0, 30, 3.0, block(30.0, (2, 10), (19, 24)))])
    (result,) = run_ours("solo", outputs, [(64, 72)], [(64, 72)])
    assert len(result) == 1 and not result.pred_masks.any()
    assert result.pred_boxes.tensor.tolist() == [[0, 0, 0, 0]]


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
def test_no_candidate_gives_empty_typed_instances_of_the_output_size(kind):
    outputs = random_outputs(kind, 0, cate_mean=-30.0)
    results = run_ours(kind, outputs, output_sizes=[(30, 45), (64, 72)])
    for result, size in zip(results, [(30, 45), (64, 72)]):
        assert len(result) == 0 and result.image_size == size
        assert result.pred_masks.shape == (0, *size) and result.pred_masks.dtype == torch.bool
        assert result.scores.shape == (0,) and result.scores.dtype == torch.float32
        assert result.pred_classes.shape == (0,) and result.pred_classes.dtype == torch.int64
        assert result.pred_boxes.tensor.shape == (0, 4)
        device = outputs.cate_logits[0].device
        for value in (
            result.pred_masks,
            result.scores,
            result.pred_classes,
            result.pred_boxes.tensor,
        ):
            assert value.device == device


def test_candidates_all_below_the_update_threshold_give_empty_instances():
    outputs = random_outputs("solo", 1)
    results = run_ours("solo", outputs, update_thresh=1.0)
    assert all(len(r) == 0 and r.pred_masks.shape[1:] == s for r, s in zip(results, OUTPUT_SIZES))


def test_all_masks_filtered_by_area_give_empty_instances():
    outputs = single_cell_outputs([(0, 30, 3.0, block(30.0, (2, 3), (2, 3)))])
    (result,) = run_ours("solo", outputs, [(64, 96)], [(20, 30)])
    assert len(result) == 0 and result.pred_masks.shape == (0, 20, 30)


def test_half_precision_maskness_of_a_mask_over_65504_pixels_is_finite():
    # 260 x 260 = 67600 stride-4 pixels at p = sigmoid(8): a float16 sum would overflow to inf.
    head = SOLOHead(**{**HEAD_ARGS, "num_classes": 1, "num_grids": [2, 2]})
    head.mask_preds = torch.nn.ModuleList(identity_conv(4) for _ in range(2)).half()
    cate = [torch.full((1, 1, 2, 2), -30.0, dtype=torch.half) for _ in range(2)]
    cate[0][0, 0, 0, 0] = 3.0
    masks = [
        torch.full((1, 4, 260, 260), 8.0, dtype=torch.half),
        torch.full((1, 4, 130, 130), -30.0, dtype=torch.half),
    ]
    post = SOLOPostProcessor(min_mask_areas=[8, 16])
    mask_probs = functools.partial(head.inference_mask_probs, HeadOutputs(cate, masks))
    (result,) = post(cate, mask_probs, (1040, 1040), [(1040, 1040)], [(52, 52)])
    expected = torch.sigmoid(torch.tensor(3.0)) * torch.sigmoid(torch.tensor(8.0))
    assert len(result) == 1 and result.scores.item() == pytest.approx(expected.item(), rel=1e-3)
    assert result.pred_masks.all()


def test_masks_to_boxes_matches_detectron2_bitmasks_including_empty_masks():
    from detectron2.structures import BitMasks

    from solo.modeling.paste import masks_to_boxes

    rng = np.random.default_rng(3)
    masks = torch.from_numpy(rng.random((12, 17, 23)) > 0.97)
    masks[0] = False  # empty
    masks[1] = False
    masks[1, 16, 22] = True  # single corner pixel
    torch.testing.assert_close(
        masks_to_boxes(masks).tensor, BitMasks(masks).get_bounding_boxes().tensor
    )


# --------------------------------------------------------------------------------------------
# Boundary: a mask-probability callable in, profiler ranges and a candidate count out
# --------------------------------------------------------------------------------------------


def test_postprocessor_needs_only_a_mask_probability_callable():
    """Precomputed probabilities of every cell, served by a plain function, give the result of
    the head's own method: the post-processor does not reach into the head."""
    outputs = random_outputs("solov2", seed=4)
    every_cell = [all_cell_probs("solov2", outputs, image) for image in range(2)]
    offsets = torch.tensor([0] + GRIDS[:-1]).pow(2).cumsum(0)
    calls = []

    def mask_probs(image, levels, cells, size, out=None):
        calls.append(len(cells))
        probs = every_cell[image][offsets[levels] + cells]
        return probs.clone() if out is None else out.copy_(probs)

    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES)
    served = post(outputs.cate_logits, mask_probs, PADDED, IMAGE_SIZES, OUTPUT_SIZES)
    for a, b in zip(served, run_ours("solov2", outputs)):
        assert len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks)
        torch.testing.assert_close(a.scores, b.scores)
    assert len(calls) == 2  # one chunk per image, whose probabilities the final masks reuse


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
def test_final_masks_reuse_one_chunks_probabilities_and_recompute_after_several(kind):
    """One chunk: the final instances' soft masks are read from its probabilities (one call per
    image). Several chunks: the earlier ones are overwritten, so they are recomputed (one more
    call per image), with the same masks and scores."""
    outputs = random_outputs(kind, 11, cate_mean=-2.0)
    head_probs = mask_probs_of(kind, outputs)
    results = {}
    for chunk_size in (1000, 7):
        calls = []

        def mask_probs(image, levels, cells, size, out=None):
            calls.append((image, len(cells)))
            return head_probs(image, levels, cells, size, out=out)

        post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, chunk_size=chunk_size)
        results[chunk_size] = post(
            outputs.cate_logits, mask_probs, PADDED, IMAGE_SIZES, OUTPUT_SIZES
        )
        for image in range(len(IMAGE_SIZES)):
            sizes = [n for i, n in calls if i == image]
            if chunk_size == 1000:
                assert len(sizes) == 1
            else:  # the chunks, then the final instances' cells (at most one per instance)
                assert len(sizes) > 2 and max(sizes[:-1]) <= 7
                assert sizes[-1] <= len(results[chunk_size][image])
    for a, b in zip(results[7], results[1000]):
        assert len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)


def test_stages_are_labelled_for_the_profiler():
    outputs = random_outputs("decoupled", seed=1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        results = run_ours("decoupled", outputs)
    assert all(len(r) for r in results)
    ranges = {e.key: e.count for e in prof.key_averages() if e.key.startswith("solo.")}
    stages = ["candidates", "mask_probs", "nms", "paste"]
    assert set(ranges) == {f"solo.postprocess.{s}" for s in stages}
    # Two images: at least one mask-probability call for the candidates and one for the output.
    assert ranges["solo.postprocess.mask_probs"] >= 4 and ranges["solo.postprocess.paste"] == 2


@pytest.mark.parametrize("kind", ["solo", "solov2"])
def test_candidate_count_is_logged_as_the_mean_per_image_before_nms_pre(kind):
    outputs = random_outputs(kind, seed=2)
    expected = []
    for image in range(2):
        # Brute force: every (cell, class) above the score threshold after point NMS whose mask
        # is larger than its level's minimum area competes for the nms_pre slots.
        scores = torch.cat(
            [points_nms(x[image : image + 1].sigmoid())[0].flatten(1) for x in outputs.cate_logits],
            dim=1,
        )  # (C, sum S^2)
        areas = (all_cell_probs(kind, outputs, image) > 0.5).flatten(1).sum(1)
        min_areas = torch.cat([torch.full((s * s,), a) for s, a in zip(GRIDS, LEVEL_STRIDES)])
        expected.append(((scores > 0.1) & (areas > min_areas)).sum().item())
    with EventStorage() as storage:
        run_ours(kind, outputs, nms_pre=5)
    assert min(expected) > 5, "more candidates than nms_pre: the count is taken before the cut"
    assert storage.latest()["solo/num_candidates"][0] == pytest.approx(sum(expected) / 2)
    run_ours(kind, outputs)  # without an EventStorage nothing is logged, nothing fails


def test_mask_probs_callables_without_out_still_work_unbuffered():
    """A custom head's inference_mask_probs written before ``out=`` existed is called as
    before (no kept buffer), with the same results."""
    outputs = random_outputs("solov2", 11, cate_mean=-2.0)
    head_probs = mask_probs_of("solov2", outputs)

    def old_style(image, levels, cells, size):
        return head_probs(image, levels, cells, size)

    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, nms_pre=20)
    results = post(outputs.cate_logits, old_style, PADDED, IMAGE_SIZES, OUTPUT_SIZES)
    for a, b in zip(results, run_ours("solov2", outputs, nms_pre=20)):
        assert len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.scores, b.scores)
    assert post._buffers.kept is None


@pytest.mark.parametrize("rows", [1, 3, 7, 1000])
def test_cell_chunks_hold_at_most_rows_cells_and_never_split_a_cell(rows):
    from solo.modeling.candidate_pool import cell_chunks

    rng = np.random.default_rng(rows)
    cells = np.sort(rng.integers(0, 40, 120))  # (cell, class) pairs in cell order, repeats
    flat = torch.from_numpy(cells)
    chunks = cell_chunks(flat, rows)
    assert chunks[0][0] == 0 and chunks[-1][1] == len(flat)
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, no gap
    distinct = [len(set(cells[s:e].tolist())) for s, e in chunks]
    assert max(distinct) <= rows and all(d > 0 for d in distinct)
    assert len(chunks) == math.ceil(len(set(cells.tolist())) / rows)
    assert all(cells[s - 1] != cells[s] for s, _ in chunks[1:])  # no cell split
    assert cell_chunks(flat[:0], rows) == []


@pytest.mark.parametrize("kind", ["solo", "solov2"])
def test_chunks_count_distinct_cells_so_a_cell_of_many_classes_is_computed_once(kind):
    """Most cells above the threshold for many classes: the chunks hold ``chunk_size`` distinct
    cells (not (cell, class) pairs), each cell's mask is computed once, and the result is the
    one-chunk result."""
    outputs = random_outputs(kind, 13, cate_mean=0.5)  # ~60% of (cell, class) pairs pass
    head_probs = mask_probs_of(kind, outputs)
    results, calls = {}, {}
    for chunk_size in (10_000, 7):
        calls[chunk_size] = []

        def mask_probs(image, levels, cells, size, out=None, seen=calls[chunk_size]):
            seen.append((image, list(zip(levels.tolist(), cells.tolist()))))
            return head_probs(image, levels, cells, size, out=out)

        post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, chunk_size=chunk_size)
        results[chunk_size] = post(
            outputs.cate_logits, mask_probs, PADDED, IMAGE_SIZES, OUTPUT_SIZES
        )
    for image in range(len(IMAGE_SIZES)):
        (whole,) = [c for i, c in calls[10_000] if i == image]
        chunked = [c for i, c in calls[7] if i == image][:-1]  # the last: final instances
        assert all(len(c) == 7 for c in chunked[:-1]) and 0 < len(chunked[-1]) <= 7
        assert [cell for c in chunked for cell in c] == whole  # each cell once, in order
        assert len(whole) > 50
    for a, b in zip(results[7], results[10_000]):
        assert len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks)
        assert torch.equal(a.pred_classes, b.pred_classes)
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["solo", "decoupled", "solov2"])
@pytest.mark.parametrize("nms_type", ["matrix", "mask"])
def test_chunk_size_keeps_the_order_of_exactly_tied_scores(kind, nms_type):
    """Every class of a cell scoring 1.0 (logit 20 in float32) shares the cell's mask, hence its
    maskness: exact ties. They are ranked by candidate order (cell, then class) whatever the
    chunking: the pool's sorts are stable (an unstable sort permuted the tied classes differently
    for different chunk sizes)."""
    outputs = random_outputs(kind, 3)
    tied = [torch.full_like(c, 20.0) for c in outputs.cate_logits]
    outputs = HeadOutputs(tied, outputs.mask_outputs)
    args = dict(nms_pre=30, max_per_image=25, nms_type=nms_type)
    reference = run_ours(kind, outputs, chunk_size=1000, **args)
    for r in reference:  # several instances, some of them tied
        assert len(r) >= 5 and len(torch.unique(r.scores)) < len(r.scores)
    for chunk_size in (1, 3, 7):
        results = run_ours(kind, outputs, chunk_size=chunk_size, **args)
        for a, b in zip(results, reference):
            assert torch.equal(a.pred_classes, b.pred_classes), chunk_size
            assert torch.equal(a.pred_masks, b.pred_masks), chunk_size
            torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=0)
