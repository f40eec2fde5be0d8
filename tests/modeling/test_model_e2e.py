"""End-to-end behaviour of the SOLO meta-architecture on CPU: training steps and inference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.structures import BitMasks
from detectron2.utils.events import EventStorage

from helpers import (
    CONFIG_DIR,
    HEADS,
    build,
    force_candidates,
    random_batch,
    solo_cfg,
    tiny_cfg,
    train_step,
)
from solo.modeling.heads.base import split_features
from solo.modeling.targets import gather_ground_truth

ZOO_CONFIGS = sorted(
    str(p.relative_to(CONFIG_DIR))
    for family in ("SOLO", "DecoupledSOLO", "SOLOv2")
    for p in (CONFIG_DIR / family).glob("*.yaml")
    if not p.name.startswith("Base-")
)


@pytest.mark.parametrize("config_file", ZOO_CONFIGS)
def test_every_zoo_config_trains_a_step_and_runs_inference(config_file):
    cfg = solo_cfg(config_file)
    model = build(cfg)
    batch = random_batch([((96, 128), 3), ((80, 112), 1)], num_classes=80)
    losses = train_step(model, batch)
    assert set(losses) == {"loss_cate", "loss_mask"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": batch[0]["image"]}])
    assert out["instances"].image_size == (96, 128)


@pytest.mark.parametrize("head_name", HEADS)
def test_training_step_reaches_every_parameter(head_name):
    model = build(tiny_cfg(head_name))
    batch = random_batch([((128, 160), 4), ((96, 128), 2)], num_classes=5, seed=1)
    losses = train_step(model, batch)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    head_grads = [p.grad.abs().sum() for n, p in trainable if n.startswith("head.")]
    assert all(torch.isfinite(g) for g in head_grads)
    # The mask branch is trained by the dice loss: its final layer gets a non-zero gradient.
    mask_layers = {
        "SOLOHead": "head.mask_preds.0.weight",
        "DecoupledSOLOHead": "head.mask_preds_x.0.weight",
        "DecoupledSOLOLightHead": "head.mask_preds_y.0.weight",
        "SOLOv2Head": "head.kernel_pred.weight",
    }
    assert dict(trainable)[mask_layers[head_name]].grad.abs().sum() > 0


@pytest.mark.parametrize("head_name", HEADS)
def test_batch_without_any_instance_trains(head_name):
    model = build(tiny_cfg(head_name))
    batch = random_batch([((96, 128), 0), ((64, 96), 0)], num_classes=5)
    losses = train_step(model, batch)
    assert losses["loss_mask"].item() == 0.0
    assert torch.isfinite(losses["loss_cate"]) and losses["loss_cate"] > 0
    # Every parameter still takes part in the graph (DDP must not wait for a gradient).
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_half_empty_batch_matches_loss_of_its_non_empty_image_on_masks():
    """The dice loss is a mean over positives, so an extra empty image leaves it unchanged."""
    cfg = tiny_cfg("SOLOHead")
    model = build(cfg)
    full = random_batch([((96, 128), 3)], num_classes=5, seed=3)
    empty = random_batch([((96, 128), 0)], num_classes=5, seed=4)
    model.train()
    with EventStorage(), torch.no_grad():
        alone = model(full)
        # BatchNorm is frozen and GroupNorm is per image: outputs of image 0 do not depend on
        # the other image of the batch (same padded size here).
        paired = model(full + empty)
    torch.testing.assert_close(alone["loss_mask"], paired["loss_mask"])


@pytest.mark.parametrize("head_name", HEADS)
def test_inference_output_format_and_sizes(head_name):
    cfg = tiny_cfg(head_name)
    model = build(cfg)
    force_candidates(model)
    model.eval()
    images = random_batch([((97, 133), 0), ((64, 80), 0)], num_classes=5)
    inputs = [
        {"image": images[0]["image"], "height": 194, "width": 266},  # output at 2x
        {"image": images[1]["image"]},  # output at the input size
    ]
    with torch.no_grad():
        outputs = model(inputs)
    assert [o["instances"].image_size for o in outputs] == [(194, 266), (64, 80)]
    for out in outputs:
        inst = out["instances"]
        assert 0 < len(inst) <= cfg.TEST.DETECTIONS_PER_IMAGE
        assert inst.pred_masks.dtype == torch.bool
        assert inst.pred_masks.shape[1:] == inst.image_size
        assert inst.pred_classes.dtype == torch.int64
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < 5)).all()
        assert (inst.scores[:-1] >= inst.scores[1:]).all(), "scores sorted descending"
        assert ((inst.scores >= cfg.MODEL.SOLO.UPDATE_THRESH) & (inst.scores <= 1)).all()
        expected_boxes = BitMasks(inst.pred_masks).get_bounding_boxes().tensor
        torch.testing.assert_close(inst.pred_boxes.tensor, expected_boxes)


@pytest.mark.parametrize("head_name", HEADS)
def test_inference_without_candidates_returns_typed_empty_instances(head_name):
    model = build(tiny_cfg(head_name))
    force_candidates(model, logit=-20.0)
    model.eval()
    image = random_batch([((70, 90), 0)], num_classes=5)[0]["image"]
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 140, "width": 180}])
    inst = out["instances"]
    assert len(inst) == 0 and inst.image_size == (140, 180)
    assert inst.pred_masks.shape == (0, 140, 180) and inst.pred_masks.dtype == torch.bool
    assert inst.scores.shape == (0,) and inst.pred_classes.dtype == torch.int64
    assert inst.pred_boxes.tensor.shape == (0, 4)


def test_detections_per_image_caps_the_output():
    cfg = tiny_cfg("SOLOv2Head", opts=["TEST.DETECTIONS_PER_IMAGE", 7])
    model = build(cfg)
    force_candidates(model)
    model.eval()
    image = random_batch([((96, 128), 0)], num_classes=5)[0]["image"]
    with torch.no_grad():
        (out,) = model([{"image": image}])
    assert len(out["instances"]) == 7


def test_batched_inference_equals_one_image_at_a_time():
    model = build(tiny_cfg("DecoupledSOLOHead"))
    force_candidates(model)
    model.eval()
    images = [x["image"] for x in random_batch([((96, 128), 0), ((96, 128), 0)], 5, seed=7)]
    with torch.no_grad():
        together = model([{"image": im} for im in images])
        alone = [model([{"image": im}])[0] for im in images]
    for a, b in zip(together, alone):
        assert torch.equal(a["instances"].pred_masks, b["instances"].pred_masks)
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores)


@pytest.mark.parametrize("head_name", ["SOLOHead", "SOLOv2Head"])
def test_channels_last_on_cpu_gives_the_same_losses_gradients_and_predictions(head_name):
    fast = build(tiny_cfg(head_name, ["CHANNELS_LAST_ON_CPU", "True"]))
    plain = build(tiny_cfg(head_name, ["CHANNELS_LAST_ON_CPU", "False"]))
    conv = fast.backbone.bottom_up.stem.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and conv.dim() == 4
    assert plain.backbone.bottom_up.stem.conv1.weight.is_contiguous()
    plain.load_state_dict(fast.state_dict())
    batch = random_batch([((96, 128), 3), ((64, 96), 2)], 5, seed=11)
    losses = [train_step(m, batch) for m in (fast, plain)]
    for name in losses[0]:
        torch.testing.assert_close(losses[0][name], losses[1][name], rtol=1e-4, atol=1e-5)
    grads = [m.head.cate_pred.weight.grad for m in (fast, plain)]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)

    results = []
    for model in (fast, plain):
        force_candidates(model)
        model.eval()
        with torch.no_grad():
            results.append(model([{"image": x["image"]} for x in batch]))
    for a, b in zip(*results):
        a, b = a["instances"], b["instances"]
        assert len(a) == len(b) > 0
        # Forced candidates score nearly alike: rounding may swap neighbours in the ranking, and
        # a pixel within rounding of the mask threshold changes a small mask's maskness by about
        # 1 / area. Compare scores, classes and mask coverage independently of the order.
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=3e-3)
        counts = [m.pred_classes.bincount(minlength=5) for m in (a, b)]
        assert torch.equal(counts[0], counts[1])
        coverage = [m.pred_masks.sum(dim=0) for m in (a, b)]
        assert (coverage[0] != coverage[1]).float().mean() < 1e-3


def test_pixel_normalisation_buffers_follow_the_model_when_moved():
    model = build(tiny_cfg())
    assert model.device.type == "cpu"
    assert "pixel_mean" not in model.state_dict(), "normalisation is not checkpointed"
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([123.675, 116.28, 103.53]))
    model.to(torch.float64)
    assert model.pixel_mean.dtype == model.pixel_std.dtype == torch.float64
    model.to("meta")
    assert model.device.type == "meta" and model.pixel_std.device.type == "meta"


def test_autocast_inference_on_cpu():
    model = build(tiny_cfg("SOLOv2Head"))
    force_candidates(model)
    model.eval()
    image = random_batch([((64, 96), 0)], num_classes=5)[0]["image"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (out,) = model([{"image": image}])
    inst = out["instances"]
    assert len(inst) > 0 and inst.pred_masks.dtype == torch.bool
    assert torch.isfinite(inst.scores.float()).all()


@pytest.mark.parametrize("head_name", ["SOLOHead", "SOLOv2Head"])
def test_bfloat16_autocast_training_step_matches_float32(head_name):
    """SOLVER.AMP.ENABLED on CPU (solo.engine): convolutions in bfloat16, the same targets and
    close losses and gradients; parameters and gradients stay float32."""
    model = build(tiny_cfg(head_name))
    batch = random_batch([((96, 128), 4), ((64, 96), 2)], 5, seed=13)

    def step(bfloat16):
        dtypes = []
        hook = model.head.cate_pred.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        model.train()
        model.zero_grad()
        with EventStorage() as storage, torch.autocast("cpu", torch.bfloat16, enabled=bfloat16):
            losses = model(batch)
        sum(losses.values()).backward()
        hook.remove()
        logged = {name: value for name, (value, _) in storage.latest().items()}
        return losses, logged, model.head.cate_pred.weight.grad.clone(), dtypes

    full, full_logged, full_grad, full_dtypes = step(False)
    half, half_logged, half_grad, half_dtypes = step(True)
    assert set(full_dtypes) == {torch.float32} and set(half_dtypes) == {torch.bfloat16}
    assert half_logged == full_logged  # solo/num_pos_p*: identical targets
    for name in full:
        assert half[name].dtype == torch.float32
        torch.testing.assert_close(half[name], full[name], rtol=0.02, atol=1e-3)
    assert half_grad.dtype == torch.float32
    assert F.cosine_similarity(half_grad.flatten(), full_grad.flatten(), dim=0) > 0.99


def test_training_is_deterministic_with_a_fixed_seed():
    batch = random_batch([((96, 128), 3)], num_classes=5, seed=5)
    losses = [train_step(build(tiny_cfg("SOLOv2Head"), seed=11), batch) for _ in range(2)]
    for key in losses[0]:
        assert losses[0][key].item() == losses[1][key].item()


def test_positive_cells_per_image_are_logged_per_feature_level():
    model = build(tiny_cfg())
    model.train()
    batch = random_batch([((96, 128), 3), ((64, 96), 0)], num_classes=5)
    with EventStorage() as storage:
        model(batch)
        logged = {k: v for k, (v, _) in storage.latest().items() if k.startswith("solo/num_pos")}
    gt = gather_ground_truth([x["instances"] for x in batch], (96, 128), "cpu")
    expected = [t.positive_cells.sum().item() / 2 for t in model.target_assigner(gt)]
    names = [f"solo/num_pos_{f}" for f in ("p2", "p3", "p4", "p5", "p6")]
    assert logged == dict(zip(names, expected)) and sum(expected) > 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_gives_non_finite_loss_not_a_crash(value):
    """Detectron2's trainer turns non-finite losses into a FloatingPointError; the model itself
    must get there without crashing in target assignment."""
    model = build(tiny_cfg())
    batch = random_batch([((64, 96), 2)], num_classes=5)
    batch[0]["image"] = batch[0]["image"].float()
    batch[0]["image"][0, 0, 0] = value
    model.train()
    with EventStorage():
        losses = model(batch)
    assert not all(np.isfinite(v.item()) for v in losses.values())


@pytest.mark.parametrize(
    "in_features, level_strides",
    [
        (["p2", "p3", "p4", "p5", "p6"], [8, 8, 16, 32, 32]),
        (["p3", "p4", "p5", "p6"], [16, 16, 32, 32]),
    ],
)
def test_level_strides_are_derived_from_the_backbone_strides(in_features, level_strides):
    """First level halved, last level brought to the size of the one before it (split_features):
    the strides set the default minimum mask areas and SOLO's mask-target strides."""
    n = len(in_features)
    opts = ["MODEL.SOLO.IN_FEATURES", str(in_features), "MODEL.SOLO.NUM_GRIDS", str([8] * n)]
    ranges = [[1, 24], [12, 48], [24, 96], [48, 192], [96, 2048]][-n:]
    model = build(tiny_cfg("SOLOHead", opts + ["MODEL.SOLO.SCALE_RANGES", str(ranges)]))
    assert model.postprocessor.min_mask_areas == level_strides
    assert model.target_assigner.mask_strides == [s // 2 for s in level_strides]
    features = model.backbone(torch.zeros(1, 3, 128, 192))
    split = split_features([features[f] for f in in_features])
    assert [128 // f.shape[-2] for f in split] == level_strides
