"""Test-time augmentation (TEST.AUG.*): every augmentation's candidates, brought back to the
image's frame, go through the model's own post-processing with ONE Matrix NMS."""

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data.transforms import RotationTransform, TransformList
from detectron2.modeling import DatasetMapperTTA
from detectron2.utils.events import EventStorage

from helpers import (
    REPO_ROOT,
    SHAPES_CONFIG,
    SMALL_SHAPES_OPTS,
    build,
    capture_warnings,
    force_candidates,
    load_train_net,
    run_main,
    shapes_cache,
    tiny_cfg,
)
from solo.config import get_solo_cfg
from solo.data.shapes import register_shapes_datasets
from solo.engine.trainer import Trainer
from solo.modeling import SOLOWithTTA
from solo.modeling.test_time_augmentation import _Resampler

HEIGHT, WIDTH = 64, 96  # multiples of 32: no padding, so that the mirror is exact


def tta_cfg(min_sizes=(HEIGHT,), flip=True, keep_all=False):
    opts = ["TEST.AUG.ENABLED", "True", "TEST.AUG.FLIP", str(flip)]
    opts += ["TEST.AUG.MIN_SIZES", str(tuple(min_sizes)), "TEST.AUG.MAX_SIZE", "1000"]
    if keep_all:  # every candidate enters the NMS, every survivor is kept: no tie cuts
        opts += ["MODEL.SOLO.NMS_PRE", "100000", "TEST.DETECTIONS_PER_IMAGE", "100000"]
    return tiny_cfg("SOLOv2Head", opts + ["MODEL.SOLO.NUM_CLASSES", "2"])


def candidate_model(cfg, seed=0):
    model = build(cfg, seed).eval()
    force_candidates(model, logit=-1.0)
    return model


def image(seed=0):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (3, HEIGHT, WIDTH), dtype=np.uint8))


def canonical(instances, mirrored=False):
    """(class, mask bytes) -> sorted scores; masks mirrored back if asked."""
    masks = instances.pred_masks.flip(-1) if mirrored else instances.pred_masks
    out = {}
    for cls, mask, score in zip(instances.pred_classes.tolist(), masks, instances.scores):
        out.setdefault((cls, mask.numpy().tobytes()), []).append(float(score))
    return {key: sorted(scores) for key, scores in out.items()}


def test_tta_at_the_test_size_without_flip_gives_the_model_own_predictions():
    cfg = tta_cfg(flip=False, keep_all=True)
    model = candidate_model(cfg)
    inputs = [{"image": image(), "height": HEIGHT, "width": WIDTH}]
    with torch.no_grad():
        plain = model(inputs)[0]["instances"]
    tta = SOLOWithTTA(cfg, model)(inputs)[0]["instances"]
    assert len(plain) > 10
    assert torch.equal(tta.pred_masks, plain.pred_masks)
    assert torch.equal(tta.scores, plain.scores)
    assert torch.equal(tta.pred_classes, plain.pred_classes)
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)


def test_flip_tta_of_an_image_and_of_its_mirror_give_mirrored_results():
    cfg = tta_cfg(flip=True, keep_all=True)
    model = candidate_model(cfg)
    tta = SOLOWithTTA(cfg, model)
    original = tta([{"image": image(1)}])[0]["instances"]
    mirror = tta([{"image": image(1).flip(-1)}])[0]["instances"]
    assert len(original) > 10 and len(original) == len(mirror)
    expected, got = canonical(original), canonical(mirror, mirrored=True)
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_flip_tta_merges_both_views_in_one_nms():
    """More candidates compete than in either view alone, and the output is still one set."""
    cfg = tta_cfg(flip=True)
    model = candidate_model(cfg)
    inputs = [{"image": image(2), "height": HEIGHT, "width": WIDTH}]
    with EventStorage() as storage:
        model(inputs)
        single = storage.latest()["solo/num_candidates"][0]
        SOLOWithTTA(cfg, model)(inputs)
        merged = storage.latest()["solo/num_candidates"][0]
    assert merged == pytest.approx(2 * single, rel=0.2)


def test_tta_on_an_image_without_detections_gives_typed_empty_instances():
    cfg = tta_cfg(min_sizes=(48, 64), flip=True)
    model = build(cfg).eval()
    with torch.no_grad():
        model.head.cate_pred.bias.fill_(-30.0)  # no cell above the score threshold
    out = SOLOWithTTA(cfg, model)([{"image": image(), "height": 30, "width": 45}])
    instances = out[0]["instances"]
    assert len(instances) == 0 and instances.image_size == (30, 45)
    assert instances.pred_masks.shape == (0, 30, 45) and instances.pred_masks.dtype == torch.bool
    assert instances.pred_classes.dtype == torch.int64


def test_tta_with_several_sizes_outputs_at_the_requested_size():
    cfg = tta_cfg(min_sizes=(48, 64, 96), flip=True)
    model = candidate_model(cfg)
    out = SOLOWithTTA(cfg, model)([{"image": image(3), "height": 128, "width": 192}])
    instances = out[0]["instances"]
    assert len(instances) > 0 and instances.pred_masks.shape[1:] == (128, 192)
    assert (instances.scores[:-1] >= instances.scores[1:]).all()


@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("aug_size", [(64, 96), (128, 192), (40, 60)])
def test_soft_masks_come_back_to_the_reference_frame(aug_size, flipped):
    """A ramp along x (value = reference x coordinate) predicted in a resized, maybe mirrored
    frame is read back as the ramp at the reference stride-4 pixel centres (linear
    interpolation of a linear function is exact away from the clamped borders)."""
    reference, padded_reference = (HEIGHT, WIDTH), (HEIGHT, WIDTH)
    padded = (-(-aug_size[0] // 32) * 32, -(-aug_size[1] // 32) * 32)
    resample = _Resampler(aug_size, padded, flipped, reference, padded_reference)
    h4, w4 = resample.source_size
    x_aug = 4 * (torch.arange(w4, dtype=torch.float64) + 0.5)
    x_ref = (aug_size[1] - x_aug if flipped else x_aug) * WIDTH / aug_size[1]
    probs = x_ref.expand(1, h4, w4).float()
    back = resample(probs)[0]
    expected = 4 * (torch.arange(WIDTH // 4, dtype=torch.float32) + 0.5)
    inner = slice(2, -2)  # the borders are clamped
    torch.testing.assert_close(back[:, inner], expected[inner].expand(HEIGHT // 4, -1)[:, :])
    assert resample.area_ratio == pytest.approx(HEIGHT * WIDTH / (aug_size[0] * aug_size[1]))


def test_augmentations_other_than_resize_and_flip_are_refused():
    cfg = tta_cfg()
    model = candidate_model(cfg)

    def rotating_mapper(inputs):
        augmented = DatasetMapperTTA(cfg)(inputs)
        rotation = RotationTransform(HEIGHT, WIDTH, 10)
        for x in augmented:
            x["transforms"] = TransformList([*x["transforms"].transforms, rotation])
        return augmented

    with pytest.raises(ValueError, match="RotationTransform"):
        SOLOWithTTA(cfg, model, tta_mapper=rotating_mapper)([{"image": image()}])


def test_train_net_eval_only_with_test_aug_enabled_reports_tta_results(tmp_path, caplog):
    name = "shapes_tta_val"
    opts = SMALL_SHAPES_OPTS + ["DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path)]
    opts += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "80"]
    opts += ["TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(48, 64)"]
    opts += ["TEST.AUG.MAX_SIZE", "80", "TEST.AUG.FLIP", "True"]
    train_net = load_train_net()
    with shapes_cache(tmp_path / "shapes"):
        register_shapes_datasets(splits={name: dict(num_images=2, seed=3)})
        cfg = get_solo_cfg(str(REPO_ROOT / SHAPES_CONFIG), opts)
        DetectionCheckpointer(Trainer.build_model(cfg), str(tmp_path)).save("random")
        argv = ["--eval-only", "--config-file", str(REPO_ROOT / SHAPES_CONFIG), *opts]
        argv += ["MODEL.WEIGHTS", str(tmp_path / "random.pth")]
        with capture_warnings(caplog, "detectron2"), caplog.at_level("INFO", "detectron2"):
            results = run_main(train_net, argv)
    assert {"segm", "segm_TTA", "bbox_TTA"} <= set(results)
    assert "test-time augmentation: short sides (48, 64)" in caplog.text
    assert (tmp_path / "inference_TTA").is_dir()
