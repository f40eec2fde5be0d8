"""docs/onnxruntime_example.py, the plain ONNX Runtime script of the docs, gives the eager
model's instances (no torch, no detectron2 in the script; padding is in the graph): same classes
in the same order, scores to 1e-5, masks up to pixels within float rounding of the threshold."""

import numpy as np
import cv2
import pytest
import torch

from detectron2.structures import Instances

from helpers import build, force_candidates, load_script, solo_cfg
from solo.export import compare_predictions, export_model

pytest.importorskip("onnxruntime")

SMALL = [
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.SOLO.HEAD_CHANNELS", "64",
    "MODEL.SOLO.MASK_KERNEL_CHANNELS", "32",
    "MODEL.SOLO.MASK_FEATURE_CHANNELS", "32",
    "TEST.DETECTIONS_PER_IMAGE", "10",
]  # fmt: skip


def blob_image(seed, size):
    rng = np.random.default_rng(seed)
    image = np.full((*size, 3), rng.integers(0, 80), np.uint8)
    for _ in range(3):
        center = (int(rng.integers(10, size[1] - 10)), int(rng.integers(10, size[0] - 10)))
        cv2.circle(
            image, center, int(rng.integers(8, 20)), [int(c) for c in rng.integers(120, 256, 3)], -1
        )
    return image


@pytest.mark.parametrize("size", [(120, 160), (75, 61)])
def test_plain_onnxruntime_script_gives_the_eager_instances(tmp_path, size):
    cfg = solo_cfg("Shapes/SOLOv2_R18.yaml", SMALL)
    model = build(cfg, seed=0)
    force_candidates(model)
    # Distinct scores (not ties that float rounding may order either way): a bias per class and
    # category weights large enough to spread the cells.
    category = model.head.prediction_layers().category
    with torch.no_grad():
        category.bias.copy_(torch.tensor([2.0, 1.0, 0.0]))
        category.weight.mul_(3)
    model.eval()
    # K0 above every candidate (all cells are candidates here): the graph is exact.
    path = export_model(model, "onnx", str(tmp_path), max_candidates=4096, config=cfg)
    script = load_script("docs/onnxruntime_example.py", "onnxruntime_example")
    image = blob_image(size[0], size)  # BGR, as cv2.imread gives it
    scores, labels, masks = script.predict(path, image)

    assert cfg.INPUT.FORMAT == "RGB"  # the script converts, as the file's metadata says
    chw = torch.as_tensor(image[:, :, ::-1].transpose(2, 0, 1).copy())
    with torch.no_grad():
        expected = model([{"image": chw, "height": size[0], "width": size[1]}])[0]["instances"]
    assert len(expected) > 0 and len(scores) == len(expected)
    np.testing.assert_array_equal(labels, expected.pred_classes.numpy())
    np.testing.assert_allclose(scores, expected.scores.numpy(), rtol=0, atol=1e-5)
    # Masks: --verify's criterion (solo.export.compare_predictions): a few pixels whose
    # probability is within float rounding of MASK_THRESH may flip (OpenCV's resize vs ATen's).
    actual = Instances(size)
    actual.pred_masks = torch.from_numpy(masks)
    actual.scores, actual.pred_classes = torch.from_numpy(scores), torch.from_numpy(labels)
    assert compare_predictions(expected, actual, score_atol=1e-5) == []
    assert (masks != expected.pred_masks.numpy()).sum() <= 0.0001 * masks.size
