"""solo.structures.CroppedMasks: the compact mask output behaves as the (N, H, W) masks it
stands for (Instances indexing and concatenation, boxes, areas, COCO RLE, iteration)."""

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.structures import BitMasks, Instances

from solo.structures import CroppedMasks


def random_cropped_masks(seed, n=6, size=(37, 53)):
    """CroppedMasks with crops of random sizes and positions (one empty, one at the far corner,
    one whose crop has empty border rows), and the dense masks they stand for."""
    rng = np.random.default_rng(seed)
    h, w = size
    crops, origins = [], []
    for i in range(n):
        ch, cw = int(rng.integers(1, h // 2)), int(rng.integers(1, w // 2))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        if i == 1:
            ch, cw, y, x = 0, 0, 0, 0
        if i == 2:
            y, x = h - ch, w - cw
        crop = torch.from_numpy(rng.random((ch, cw)) < 0.6)
        if i == 3 and ch > 2:
            crop[0] = False
        crops.append(crop)
        origins.append((x, y))
    masks = CroppedMasks(crops, torch.tensor(origins), size)
    dense = torch.zeros((n, h, w), dtype=torch.bool)
    for i, (crop, (x, y)) in enumerate(zip(crops, origins)):
        dense[i, y : y + crop.shape[0], x : x + crop.shape[1]] = crop
    return masks, dense


def test_tensor_boxes_and_areas_equal_those_of_the_dense_masks():
    masks, dense = random_cropped_masks(0)
    assert torch.equal(masks.tensor, dense)
    assert torch.equal(masks.to_bitmasks().tensor, dense)
    expected = BitMasks(dense).get_bounding_boxes().tensor
    expected[~dense.flatten(1).any(1)] = 0
    assert torch.equal(masks.get_bounding_boxes().tensor, expected)
    assert torch.equal(masks.area(), dense.flatten(1).sum(1))


def test_rle_equals_pycocotools_encoding_of_the_full_masks():
    for seed in range(3):
        masks, dense = random_cropped_masks(seed)
        expected = [
            mask_util.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0] for m in dense
        ]
        assert masks.to_rle() == expected


def test_iteration_yields_the_full_masks_one_at_a_time():
    masks, dense = random_cropped_masks(4)
    assert all(torch.equal(a, b) for a, b in zip(masks, dense))


def test_instances_index_and_concatenate_cropped_masks():
    masks, dense = random_cropped_masks(5)
    inst = Instances(masks.image_size, pred_masks=masks, scores=torch.arange(len(masks)).float())
    keep = torch.tensor([True, False, True, True, False, True])
    assert torch.equal(inst[keep].pred_masks.tensor, dense[keep])
    assert torch.equal(inst[torch.tensor([5, 0])].pred_masks.tensor, dense[[5, 0]])
    assert torch.equal(inst[1:3].pred_masks.tensor, dense[1:3])
    assert torch.equal(inst[2].pred_masks.tensor, dense[2:3])
    both = Instances.cat([inst, inst[:2]])
    assert torch.equal(both.pred_masks.tensor, torch.cat([dense, dense[:2]]))


def test_crops_outside_the_image_or_not_bool_are_refused():
    with pytest.raises(ValueError, match="outside the 10x10 image"):
        CroppedMasks([torch.ones((4, 4), dtype=torch.bool)], torch.tensor([[8, 0]]), (10, 10))
    with pytest.raises(ValueError, match="2-d bool"):
        CroppedMasks([torch.ones((4, 4))], torch.tensor([[0, 0]]), (10, 10))
    with pytest.raises(ValueError, match="different image sizes"):
        CroppedMasks.cat([random_cropped_masks(0)[0], random_cropped_masks(0, size=(9, 9))[0]])
