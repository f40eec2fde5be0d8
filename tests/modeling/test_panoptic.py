"""PanopticSOLOv2: semantic loss, merge, training step, outputs (solo/modeling/panoptic.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.data import Metadata, MetadataCatalog
from detectron2.modeling.meta_arch.panoptic_fpn import combine_semantic_and_instance_outputs
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import Visualizer

from helpers import (
    build,
    force_candidates,
    load_script,
    random_batch,
    solo_cfg,
    tiny_cfg,
    train_step,
)
from solo.data.panoptic_mapper import check_dataset_tasks
from solo.export import ExportedModel, compare_predictions, export_model
from solo.modeling.panoptic import panoptic_outputs, semantic_loss


def panoptic_cfg(opts=()):
    """tiny_cfg's SOLOv2 with a 4-class semantic head (things + 3 stuff classes)."""
    cfg = tiny_cfg("SOLOv2Head")
    cfg.MODEL.META_ARCHITECTURE = "PanopticSOLOv2"
    cfg.MODEL.SEM_SEG_HEAD.NAME = "SOLOv2SemSegHead"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 4
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT = 16
    cfg.merge_from_list(list(opts))
    return cfg


def with_semantics(batch, seed=0):
    """Random stuff labels (1..3) with ignored (255) pixels, 0 under every instance."""
    rng = np.random.default_rng(seed)
    for x in batch:
        h, w = x["image"].shape[-2:]
        labels = torch.from_numpy(rng.integers(1, 4, size=(h, w)))
        labels[torch.from_numpy(rng.random((h, w)) < 0.1)] = 255
        masks = x["instances"].gt_masks.tensor
        if len(masks):
            labels[masks.any(0)] = 0
        x["sem_seg"] = labels
    return batch


def test_semantic_loss_is_cross_entropy_on_upsampled_logits_ignoring_255(rng):
    logits = torch.from_numpy(rng.normal(size=(2, 4, 5, 6))).float()
    targets = torch.from_numpy(rng.integers(0, 4, size=(2, 20, 24)))
    targets[0, :7] = 255
    upsampled = F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, targets, ignore_index=255)
    torch.testing.assert_close(semantic_loss(logits, targets, 255), expected)


def test_semantic_loss_of_an_all_ignored_batch_is_zero_not_nan():
    logits = torch.randn(1, 4, 3, 3, requires_grad=True)
    loss = semantic_loss(logits, torch.full((1, 12, 12), 255), 255)
    assert loss.item() == 0.0
    loss.backward()  # connected: DDP sees a gradient for every parameter
    assert logits.grad is not None


def crafted_instances(size):
    """Three instances at ``size``: A (0.9) and B (0.8) overlap by 2/3 of B, C scores 0.3."""
    h, w = size
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 2:10, 2:10] = True
    masks[1, 6:12, 6:9] = True  # 18 pixels, 12 under A
    masks[2, 12:16, 12:16] = True
    instances = Instances(size)
    instances.pred_masks = masks
    instances.scores = torch.tensor([0.9, 0.6, 0.3])
    instances.pred_classes = torch.tensor([2, 0, 1])
    instances.pred_boxes = Boxes(torch.zeros(3, 4))
    return instances


def test_merge_equals_detectron2_panoptic_fpn_on_crafted_inputs():
    torch.manual_seed(0)
    # Stride-4 logits of a 20x24 canvas holding a 17x21 image, output at 34x42.
    logits = torch.randn(4, 5, 6) * 3
    image_size, output_size = (17, 21), (34, 42)
    instances = crafted_instances(output_size)
    thresholds = dict(overlap_thresh=0.5, stuff_area_thresh=30, instances_score_thresh=0.5)
    ours = panoptic_outputs(logits, 4, instances, image_size, output_size, *thresholds.values())

    # Detectron2's PanopticFPN: SemSegFPNHead upsamples by its common stride, then
    # sem_seg_postprocess crops and resizes, combine_* merges the argmax with the instances.
    upsampled = F.interpolate(logits[None], scale_factor=4, mode="bilinear", align_corners=False)
    sem_seg = sem_seg_postprocess(upsampled[0], image_size, *output_size)
    panoptic = combine_semantic_and_instance_outputs(
        instances, sem_seg.argmax(0), *thresholds.values()
    )
    torch.testing.assert_close(ours["sem_seg"], sem_seg)
    assert torch.equal(ours["panoptic_seg"][0], panoptic[0])
    assert ours["panoptic_seg"][1] == panoptic[1]
    # And what that merge means: A whole; B only outside A (1/3 new, overlap 2/3 > 0.5 -> B
    # dropped); C below the score threshold; stuff fills the rest if large enough.
    segments = ours["panoptic_seg"][1]
    things = [s for s in segments if s["isthing"]]
    assert [(s["instance_id"], s["category_id"]) for s in things] == [(0, 2)]
    stuff = [s for s in segments if not s["isthing"]]
    assert all(s["area"] >= 30 and s["category_id"] != 0 for s in stuff)
    ids = ours["panoptic_seg"][0]
    assert ids.dtype == torch.int32 and ids.shape == output_size
    assert (ids[2:10, 2:10] == things[0]["id"]).all()


def test_training_step_gives_finite_instance_and_semantic_losses_and_gradients():
    cfg = panoptic_cfg()
    model = build(cfg)
    batch = with_semantics(random_batch([((96, 128), 3), ((80, 112), 0)], num_classes=5))
    losses = train_step(model, batch)
    assert set(losses) == {"loss_cate", "loss_mask", "loss_sem_seg"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_sem_seg"] > 0
    grads = [p.grad for p in model.sem_seg_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_instance_loss_weight_scales_instance_losses_only():
    batch = with_semantics(random_batch([((96, 128), 2)], num_classes=5), seed=1)
    plain = train_step(build(panoptic_cfg()), batch)
    weighted = train_step(
        build(panoptic_cfg(["MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT", 0.25])), batch
    )
    for name in ("loss_cate", "loss_mask"):
        torch.testing.assert_close(weighted[name], plain[name] * 0.25)
    torch.testing.assert_close(weighted["loss_sem_seg"], plain["loss_sem_seg"])


def test_semantic_targets_are_padded_to_the_canvas_with_the_ignore_value():
    model = build(panoptic_cfg())
    batch = with_semantics(random_batch([((96, 128), 1), ((70, 100), 1)], num_classes=5))
    images = model.preprocess_image(batch)
    targets = model.semantic_targets(batch, images)
    assert targets.shape == (2, *images.tensor.shape[-2:])
    assert torch.equal(targets[1, :70, :100], batch[1]["sem_seg"])
    assert (targets[1, 70:] == 255).all() and (targets[1, :, 100:] == 255).all()


def test_training_input_without_sem_seg_is_refused_naming_the_mapper():
    model = build(panoptic_cfg())
    batch = random_batch([((96, 128), 1)], num_classes=5)
    with pytest.raises(ValueError, match=r"batched_inputs\[0\] has no 'sem_seg'.*PanopticDataset"):
        train_step(model, batch)


def test_inference_outputs_panoptic_fpn_format_at_the_requested_size():
    model = build(panoptic_cfg())
    model.eval()
    batch = random_batch([((96, 128), 0), ((70, 100), 0)], num_classes=5)
    batch[1]["height"], batch[1]["width"] = 140, 200
    with torch.no_grad():
        outputs = model(batch)
    for x, out, size in zip(batch, outputs, [(96, 128), (140, 200)]):
        assert set(out) == {"instances", "sem_seg", "panoptic_seg"}
        assert out["sem_seg"].shape == (4, *size) and out["sem_seg"].dtype == torch.float32
        ids, segments = out["panoptic_seg"]
        assert ids.shape == size and ids.dtype == torch.int32
        assert sorted(s["id"] for s in segments) == sorted(set(ids.unique().tolist()) - {0})
        # Visualizer (demo, make demo-panoptic) draws it as it draws PanopticFPN's output.
        metadata = Metadata(thing_classes=list("abcde"), stuff_classes=["things", "x", "y", "z"])
        image = np.zeros((*size, 3), np.uint8)
        drawn = Visualizer(image, metadata).draw_panoptic_seg(ids, segments).get_image()
        assert drawn.shape == (*size, 3)


def test_inference_of_an_image_equals_its_inference_in_a_batch():
    model = build(panoptic_cfg())
    model.eval()
    batch = random_batch([((96, 128), 0), ((64, 96), 0)], num_classes=5)
    with torch.no_grad():
        together = model(batch)
        alone = model(batch[1:])
    torch.testing.assert_close(together[1]["sem_seg"], alone[0]["sem_seg"])
    assert torch.equal(together[1]["panoptic_seg"][0], alone[0]["panoptic_seg"][0])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8, "COMMON_STRIDE=8"),
        ("MODEL.SEM_SEG_HEAD.NORM", "BN", "NORM='BN'"),
        ("MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p3", "p4", "p5"], "strides"),
        ("MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p2", "p9"], r"\['p9'\] are not produced"),
    ],
)
def test_semantic_head_config_errors_name_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        build(panoptic_cfg([key, value]))


@pytest.mark.parametrize("config", ["Panoptic/SOLOv2_R50_3x.yaml", "Panoptic/SOLOv2_R101_3x.yaml"])
def test_coco_panoptic_configs_fit_detectron2_coco_panoptic_separated(config):
    cfg = solo_cfg(config)
    assert cfg.MODEL.META_ARCHITECTURE == "PanopticSOLOv2"
    for key in ("TRAIN", "TEST"):  # 54 semantic classes, evaluator_type coco_panoptic_seg
        check_dataset_tasks(cfg, cfg.DATASETS[key], key)
    if "R50" in config:
        model = build(cfg)
        assert model.sem_seg_head.predictor.out_channels == 54
        assert model.sem_seg_head.loss_weight == 0.5


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_panoptic_model_equals_eager_with_the_merge_outside_the_graph(fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    opts = ["MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH", 0.0]
    model = build(panoptic_cfg(opts))
    force_candidates(model)  # instances to merge, not only stuff
    model.eval()
    exported = ExportedModel(export_model(model, fmt, str(tmp_path), max_candidates=1500))
    inputs = [{"image": b["image"]} for b in random_batch([((96, 128), 0), ((70, 100), 0)], 5)]
    inputs[1].update(height=140, width=200)
    with torch.no_grad():
        expected = model(inputs)
    for e, a in zip(expected, exported(inputs)):
        assert set(a) == {"instances", "sem_seg", "panoptic_seg"}
        assert len(e["instances"]) and compare_predictions(e["instances"], a["instances"]) == []
        torch.testing.assert_close(a["sem_seg"], e["sem_seg"], atol=1e-4, rtol=1e-4)
        assert torch.equal(a["panoptic_seg"][0], e["panoptic_seg"][0])
        drop_scores = [{k: v for k, v in s.items() if k != "score"} for s in e["panoptic_seg"][1]]
        assert [{k: v for k, v in s.items() if k != "score"} for s in a["panoptic_seg"][1]] == (
            drop_scores
        )
        assert any(s["isthing"] for s in e["panoptic_seg"][1])


def test_demo_draws_stuff_and_things_of_a_panoptic_model_enlarged_like_instances(tmp_path):
    cfg = panoptic_cfg(["DATASETS.TEST", ("panoptic_demo_test",)])
    MetadataCatalog.get("panoptic_demo_test").set(
        thing_classes=list("abcde"), stuff_classes=["things", "sky", "water", "ground"]
    )
    model = build(cfg)
    force_candidates(model)
    cfg.MODEL.WEIGHTS = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, cfg.MODEL.WEIGHTS)
    predictor = load_script("demo/predictor.py", "solo_demo_predictor_panoptic")
    demo = predictor.VisualizationDemo(cfg)
    image = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    _, drawn = demo.run_on_image(image)
    ids, segments = demo.panoptic_seg
    assert ids.shape == (96, 128) and segments
    # Small images are enlarged by a whole factor, as instance drawings, so labels are legible.
    scale = predictor.drawing_scale(96, 128)
    assert scale > 1 and drawn.shape == (96 * scale, 128 * scale, 3)
    assert not np.array_equal(drawn, predictor.enlarge(image, scale))
