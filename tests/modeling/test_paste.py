"""Region-limited pasting (solo.modeling.paste): the same bits as resizing whole masks.

``full_paste`` below is the implementation paste_masks replaced (every mask resized over the
whole padded input, cropped, resized to the output size, thresholded, chunk by chunk), kept here
as the reference.
"""

import pytest
import torch

from detectron2.structures import Boxes

import solo.modeling.paste as paste
from solo.modeling.layers import resize
from solo.modeling.paste import masks_to_boxes, paste_masks, region_paste_support
from solo.structures import CroppedMasks


@pytest.fixture(autouse=True)
def region_whenever_possible(monkeypatch):
    """The region shortcut wherever it applies, also where it would save no work (the blobs
    below cover much of their images): these tests compare it with the whole-mask resize."""
    monkeypatch.setattr(paste, "REGION_WORK", float("inf"))


def full_paste(probs, padded_size, image_size, output_size, mask_thresh, chunk_size=4):
    h, w = image_size
    out = torch.empty((len(probs), *output_size), dtype=torch.bool, device=probs.device)
    boxes = [torch.zeros((0, 4), device=probs.device)]
    for start in range(0, len(probs), chunk_size):
        part = resize(probs[start : start + chunk_size][None], padded_size)[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            part = resize(part, output_size)
        torch.gt(part[0], mask_thresh, out=out[start : start + chunk_size])
        boxes.append(masks_to_boxes(out[start : start + chunk_size]).tensor)
    return out, Boxes(torch.cat(boxes))


def blob_probs(seed, k, low_size, special=True):
    """(k, h, w) smooth random probabilities (blobs of many sizes, some at the borders); with
    ``special``, mask 0 covers everything, mask 1 is empty and mask 2 is a 1-sample spike."""
    gen = torch.Generator().manual_seed(seed)
    h, w = low_size
    probs = torch.empty((k, h, w))
    for i in range(k):
        coarse = (int(torch.randint(1, max(h // 2, 2), (1,), generator=gen)),
                  int(torch.randint(1, max(w // 2, 2), (1,), generator=gen)))  # fmt: skip
        field = torch.rand((1, 1, *coarse), generator=gen)
        probs[i] = resize(field, (h, w))[0, 0] ** (1 + 3 * torch.rand(1, generator=gen))
    if special and k >= 3:
        probs[0], probs[1] = 0.95, 0.02
        probs[2] = 0.0
        probs[2, h // 2, w - 1] = 0.99
    return probs


def assert_same_as_full(probs, padded, image, output, thresh, chunk_size=4):
    expected_masks, expected_boxes = full_paste(probs, padded, image, output, thresh, chunk_size)
    masks, boxes = paste_masks(probs, padded, image, output, thresh, chunk_size)
    assert masks.dtype == torch.bool and masks.shape == (len(probs), *output)
    assert torch.equal(masks, expected_masks), (masks != expected_masks).sum().item()
    assert torch.equal(boxes.tensor, expected_boxes.tensor)
    compact, compact_boxes = paste_masks(probs, padded, image, output, thresh, compact=True)
    assert isinstance(compact, CroppedMasks) and len(compact) == len(probs)
    assert torch.equal(compact.tensor, expected_masks)
    assert torch.equal(compact_boxes.tensor, expected_boxes.tensor)


def test_shortcut_is_taken_for_small_masks_and_not_for_masks_spread_over_the_image(monkeypatch):
    monkeypatch.setattr(paste, "REGION_WORK", 0.5)
    gen = torch.Generator().manual_seed(0)
    spread = resize(torch.rand((1, 4, 12, 20), generator=gen), (48, 80))[0]
    small = torch.zeros((4, 48, 80))
    small[:, 10:14, 30:35] = 0.9
    for probs, region in ((spread, False), (small, True)):
        plan = paste._worthwhile_plan(probs, (192, 320), (190, 317), (190, 317), 0.5)
        assert (plan is not None) == region
        assert_same_as_full(probs, (192, 320), (190, 317), (190, 317), 0.5)


def test_region_paste_is_exact_on_this_build():
    # The shortcut is taken only where a probe reproduces the full computation; on CPU it must.
    assert region_paste_support("cpu")


@pytest.mark.parametrize(
    "padded, image, output",
    [
        ((96, 160), (96, 160), (96, 160)),  # no crop, no resize
        ((96, 160), (93, 157), (93, 157)),  # odd image inside the canvas
        ((128, 96), (121, 90), (61, 45)),  # output smaller (the COCO case)
        ((96, 128), (90, 127), (301, 455)),  # output larger (large photos)
        ((64, 224), (57, 223), (57, 501)),  # one axis unchanged, the other resized
        ((160, 96), (159, 95), (200, 70)),  # up on one axis, down on the other
    ],
)
@pytest.mark.parametrize("thresh", [0.5, 0.3, 0.8])
def test_region_paste_equals_resizing_whole_masks(padded, image, output, thresh):
    # K = 10: chunks of 4, 4, 2 in the reference (module note: a chunk of exactly 3 masks on a
    # single thread takes ATen's channels-last kernel there).
    probs = blob_probs(sum(padded) + int(thresh * 10), 10, (padded[0] // 4, padded[1] // 4))
    assert_same_as_full(probs, padded, image, output, thresh)


def test_region_paste_of_many_small_masks_equals_resizing_whole_masks():
    # 40 small objects spread over a COCO-sized canvas: many groups, crops of every size.
    gen = torch.Generator().manual_seed(3)
    h4, w4 = 50, 76
    yy, xx = torch.meshgrid(torch.arange(float(h4)), torch.arange(float(w4)), indexing="ij")
    centre = torch.rand((40, 2), generator=gen) * torch.tensor([h4, w4])
    sigma = 0.5 + 6 * torch.rand((40, 1, 1), generator=gen)
    dist2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    probs = torch.exp(-dist2 / (2 * sigma**2))
    for output in [(197, 301), (120, 180), (411, 640)]:
        assert_same_as_full(probs, (200, 304), (197, 301), output, 0.5)


def test_region_paste_thresholds_zero_and_all_above():
    probs = blob_probs(7, 6, (24, 40))
    for thresh in (0.0, 0.999):
        assert_same_as_full(probs, (96, 160), (95, 150), (95, 150), thresh)
        assert_same_as_full(probs, (96, 160), (95, 150), (70, 180), thresh)


def test_region_paste_with_nan_probabilities_equals_resizing_whole_masks():
    probs = blob_probs(11, 4, (24, 40))
    probs[0, 3:5, 7] = float("nan")
    probs[3, 12, 20:22] = float("nan")
    probs[2] = 0.1  # one row above the threshold, with a NaN far from it: its region is that row
    probs[2, 10, 5:9] = 0.9
    probs[2, 10, 30] = float("nan")
    assert_same_as_full(probs, (96, 160), (94, 158), (94, 158), 0.5)
    assert_same_as_full(probs, (96, 160), (94, 158), (120, 99), 0.5)


@pytest.mark.parametrize(
    "padded, image, output",
    [
        ((32, 64), (30, 61), (30, 61)),  # H + W <= 128: the full computation (other kernel)
        ((96, 160), (90, 151), (40, 60)),  # output H + W <= 128
        ((98, 160), (98, 160), (98, 160)),  # canvas not a multiple of 4
    ],
)
def test_shapes_outside_the_shortcut_are_pasted_in_full(padded, image, output):
    probs = blob_probs(5, 5, (padded[0] // 4, padded[1] // 4))
    assert_same_as_full(probs, padded, image, output, 0.5)


def test_half_precision_probabilities_are_pasted_in_full():
    probs = blob_probs(2, 5, (24, 40)).to(torch.bfloat16)
    assert_same_as_full(probs, (96, 160), (96, 160), (96, 160), 0.5)


def test_region_paste_does_not_depend_on_the_chunk_size():
    probs = blob_probs(9, 11, (30, 44))
    first, _ = paste_masks(probs, (120, 176), (117, 170), (117, 170), 0.5, chunk_size=1)
    for chunk_size in (2, 3, 64):
        masks, _ = paste_masks(probs, (120, 176), (117, 170), (117, 170), 0.5, chunk_size)
        assert torch.equal(masks, first)


def test_no_masks_give_typed_empty_outputs():
    for compact in (False, True):
        masks, boxes = paste_masks(torch.zeros((0, 24, 40)), (96, 160), (90, 150), (45, 75), 0.5,
                                   compact=compact)  # fmt: skip
        assert len(masks) == 0 and boxes.tensor.shape == (0, 4)
        dense = masks.tensor if compact else masks
        assert dense.shape == (0, 45, 75) and dense.dtype == torch.bool


def test_postprocessor_with_cropped_format_returns_the_dense_masks_as_crops():
    from solo.modeling import SOLOPostProcessor

    grid, padded = 12, (96, 160)
    logits = torch.full((1, 2, grid, grid), -8.0)
    logits[0, 0, 2, 3] = logits[0, 1, 7, 9] = logits[0, 0, 10, 1] = 2.0
    probs = blob_probs(4, grid * grid, (24, 40), special=False)

    def mask_probs(image, levels, cells, size, out=None):
        return probs[cells].clone() if out is None else out.copy_(probs[cells])

    outputs = {}
    for mask_format in ("bitmask", "cropped"):
        post = SOLOPostProcessor(min_mask_areas=[0], mask_format=mask_format)
        sizes = [(90, 151), (200, 300)]
        outputs[mask_format] = [
            post([logits], mask_probs, padded, [(90, 151)], [size])[0] for size in sizes
        ]
    for dense, compact in zip(outputs["bitmask"], outputs["cropped"]):
        assert len(dense) == 3 and isinstance(compact.pred_masks, CroppedMasks)
        assert torch.equal(compact.pred_masks.tensor, dense.pred_masks)
        assert torch.equal(compact.pred_boxes.tensor, dense.pred_boxes.tensor)
        assert torch.equal(compact.scores, dense.scores)
    empty = SOLOPostProcessor(min_mask_areas=[0], mask_format="cropped")
    none = empty([logits - 20], mask_probs, padded, [(90, 151)], [(90, 151)])[0]
    assert isinstance(none.pred_masks, CroppedMasks) and len(none.pred_masks) == 0
    with pytest.raises(ValueError, match="TEST.MASK_FORMAT='polygon' is not one of"):
        SOLOPostProcessor(min_mask_areas=[0], mask_format="polygon")
