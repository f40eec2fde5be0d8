"""Detectron2 keys a SOLO run would silently ignore are refused, naming the key and what SOLO
reads instead; TEST.AUG is honoured wherever the model predicts (train_net, Predictor)."""

import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer

from helpers import CONFIG_DIR, build, solo_cfg, tiny_cfg
from solo.config import check_solo_config
from solo.engine.predictor import Predictor
from solo.modeling import SOLOWithTTA

SHIPPED = sorted(p.relative_to(CONFIG_DIR).as_posix() for p in CONFIG_DIR.glob("*/*.yaml"))


@pytest.mark.parametrize("config_file", SHIPPED)
def test_every_shipped_config_sets_no_key_that_solo_ignores(config_file):
    check_solo_config(solo_cfg(config_file))


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "3",
            "MODEL.ROI_HEADS.NUM_CLASSES=3 (SOLO reads MODEL.SOLO",
        ),
        ("MODEL.RETINANET.NUM_CLASSES", "3", "SOLO reads MODEL.SOLO.NUM_CLASSES"),
        ("MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.5", "SOLO reads MODEL.SOLO.SCORE_THRESH"),
        ("MODEL.RETINANET.SCORE_THRESH_TEST", "0.5", "SOLO reads MODEL.SOLO.SCORE_THRESH"),
        ("MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.3", "MATRIX_NMS_SIGMA or MASK_NMS_IOU_THRESH"),
        ("MODEL.RETINANET.TOPK_CANDIDATES_TEST", "50", "SOLO reads MODEL.SOLO.NMS_PRE"),
        ("MODEL.RPN.IN_FEATURES", "['p3']", "SOLO reads MODEL.SOLO.IN_FEATURES"),
        ("MODEL.ROI_MASK_HEAD.NAME", "PointRendMaskHead", "no SOLO counterpart"),
        ("MODEL.ANCHOR_GENERATOR.SIZES", "[[16]]", "MODEL.ANCHOR_GENERATOR.SIZES"),
        ("MODEL.KEYPOINT_ON", "True", "SOLO predicts no keypoints"),
        ("MODEL.MASK_ON", "False", "SOLO always segments masks"),
        ("MODEL.LOAD_PROPOSALS", "True", "SOLO uses no proposals"),
    ],
)
def test_detectron2_keys_that_solo_would_ignore_are_refused_when_the_model_is_built(
    key, value, message
):
    cfg = tiny_cfg("SOLOv2Head", [key, value])
    with pytest.raises(ValueError, match="that SOLO would ignore") as error:
        build(cfg)
    assert message in str(error.value)


def test_all_ignored_keys_are_named_at_once():
    cfg = tiny_cfg("SOLOHead", ["MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.KEYPOINT_ON", "True"])
    with pytest.raises(ValueError, match="2 Detectron2 key") as error:
        check_solo_config(cfg)
    assert "ROI_HEADS.NUM_CLASSES" in str(error.value) and "KEYPOINT_ON" in str(error.value)


def test_predictor_with_test_aug_enabled_predicts_with_tta(tmp_path):
    cfg = tiny_cfg("SOLOv2Head", ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(32, 48)"])
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 48, 64
    DetectionCheckpointer(build(cfg), str(tmp_path)).save("model")
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    predictor = Predictor(cfg)
    assert isinstance(predictor.model, SOLOWithTTA)
    instances = predictor(torch.zeros((40, 60, 3), dtype=torch.uint8).numpy())["instances"]
    assert instances.image_size == (40, 60)


def test_predictor_with_test_aug_enabled_refuses_an_exported_model():
    cfg = tiny_cfg("SOLOv2Head", ["TEST.AUG.ENABLED", "True", "MODEL.WEIGHTS", "model.onnx"])
    with pytest.raises(ValueError, match="TEST.AUG.ENABLED: test-time augmentation runs the eager"):
        Predictor(cfg)


def test_tta_with_empty_min_sizes_is_refused():
    cfg = tiny_cfg("SOLOv2Head", ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "()"])
    model = build(cfg).eval()
    with pytest.raises(ValueError, match="TEST.AUG.MIN_SIZES is empty"):
        SOLOWithTTA(cfg, model)([{"image": torch.zeros((3, 32, 32), dtype=torch.uint8)}])
