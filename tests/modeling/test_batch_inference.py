"""Inference does not depend on the batch: each image of a batch of mixed sizes gets the
predictions it gets alone (issue: the category grids and GroupNorms saw the batch's padding)."""

import numpy as np
import pytest
import torch

from helpers import HEADS, build, force_candidates, solo_cfg, tiny_cfg


def random_images(seed, count):
    """``count`` uint8 images of random sizes, at least two padded sizes (multiples of 32)."""
    rng = np.random.default_rng(seed)
    while True:
        sizes = [(int(rng.integers(40, 150)), int(rng.integers(40, 150))) for _ in range(count)]
        if len({(-(-h // 32), -(-w // 32)) for h, w in sizes}) > 1:
            break
    return [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]


def assert_same_predictions(batched, alone):
    """Same instances in the same order, scores and masks equal up to float rounding."""
    assert len(batched) == len(alone) > 0
    assert batched.image_size == alone.image_size
    assert torch.equal(batched.pred_classes, alone.pred_classes)
    torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=1e-5)
    assert torch.equal(batched.pred_masks, alone.pred_masks)


def run(model, images, output_sizes=None):
    inputs = [{"image": im} for im in images]
    for x, size in zip(inputs, output_sizes or []):
        x["height"], x["width"] = size
    with torch.no_grad():
        return [o["instances"] for o in model(inputs)]


@pytest.mark.parametrize("head_name, count", zip(HEADS, [2, 3, 4, 3]))
def test_each_image_of_a_mixed_size_batch_gets_its_single_image_predictions(head_name, count):
    model = build(tiny_cfg(head_name, ["MODEL.SOLO.NMS_PRE", "100"]))
    force_candidates(model)
    model.eval()
    images = random_images(count, count)
    together = run(model, images)
    for image, batched in zip(images, together):
        assert_same_predictions(batched, run(model, [image])[0])


def test_groupnorm_backbone_batch_equals_single_images_and_keeps_output_sizes():
    """The shapes config normalises the backbone with GroupNorm over the whole canvas."""
    cfg = solo_cfg("Shapes/Base-Shapes.yaml", ["MODEL.SOLO.NMS_PRE", "100"])
    model = build(cfg)
    force_candidates(model)
    model.eval()
    images = random_images(3, count=4)
    # Two images of one padded size (one batch for them), and requested output sizes.
    images.append(images[0][:, :-5, :-3])
    output_sizes = [(2 * im.shape[1], 2 * im.shape[2]) for im in images]
    together = run(model, images, output_sizes)
    assert [r.image_size for r in together] == [tuple(s) for s in output_sizes]
    for image, size, batched in zip(images, output_sizes, together):
        assert_same_predictions(batched, run(model, [image], [size])[0])


def test_single_image_is_padded_to_its_own_multiple_of_32_only():
    model = build(tiny_cfg("SOLOv2Head"))
    model.eval()
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    images = [torch.zeros(3, 70, 90, dtype=torch.uint8), torch.zeros(3, 130, 60, dtype=torch.uint8)]
    images.append(torch.zeros(3, 65, 96, dtype=torch.uint8))  # pads to 96x96 like the first
    run(model, images)
    assert sorted(seen) == [(1, 3, 160, 64), (2, 3, 96, 96)]
