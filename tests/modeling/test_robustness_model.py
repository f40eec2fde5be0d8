"""Robustness of the model: unusual inputs, degenerate ground truth, bad configs, divergence, and
seeded fuzzing of target assignment and post-processing for their invariants."""

import functools
import itertools
import numpy as np
import pytest
import torch

from detectron2.engine import SimpleTrainer
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from helpers import (
    CONFIG_DIR,
    LEVEL_STRIDES,
    NUM_CLASSES,
    PADDED,
    force_candidates,
    mask_probs_of,
    random_batch,
    random_instances,
    random_outputs,
    tiny_cfg,
    train_step,
)
from solo.config import get_solo_cfg
from solo.modeling.losses import category_loss, mask_loss
from solo.modeling.postprocess import SOLOPostProcessor
from solo.modeling.targets import SOLOTargetAssigner, gather_ground_truth

# Candidates entering NMS: enough to exercise it, few enough to keep the tests fast on a CPU.
FAST = ["MODEL.SOLO.NMS_PRE", "50"]


def build(head_name="SOLOv2Head", opts=()):
    torch.manual_seed(0)
    return build_model(tiny_cfg(head_name, opts))


def infer(model, inputs):
    model.eval()
    with torch.no_grad():
        return [o["instances"] for o in model(inputs)]


def random_image(height, width, seed=0):
    return torch.from_numpy(
        np.random.default_rng(seed).integers(0, 256, (3, height, width), np.uint8)
    )


@pytest.fixture(scope="module")
def v2_model():
    """A tiny SOLOv2 whose every cell is a confident candidate (full post-processing runs)."""
    model = build("SOLOv2Head", FAST)
    force_candidates(model)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Image shapes and channel layouts
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_name", ["SOLOHead", "SOLOv2Head"])
def test_very_elongated_image_trains_and_infers(head_name):
    model = build(head_name, FAST)
    batch = random_batch([((64, 2000), 3)], num_classes=5, seed=2)
    losses = train_step(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    force_candidates(model)
    (inst,) = infer(model, [{"image": batch[0]["image"]}])
    assert inst.image_size == (64, 2000) and inst.pred_masks.shape[1:] == (64, 2000)
    assert len(inst) > 0 and torch.isfinite(inst.scores).all()


def test_tiny_image_next_to_a_larger_one_trains():
    """20x20 is smaller than the largest stride (32)."""
    model = build("SOLOv2Head", FAST)
    batch = random_batch([((20, 20), 1), ((64, 96), 2)], num_classes=5, seed=2)
    losses = train_step(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0


def test_tiny_image_alone_trains_and_gives_output_at_its_size(v2_model):
    """Alone, a 20x20 image pads to 32x32, where P5 is 1x1: the model pads it further so that
    GroupNorm never sees a single value per group."""
    model = build("SOLOv2Head", FAST)
    losses = train_step(model, random_batch([((20, 20), 1)], num_classes=5, seed=5))
    assert all(torch.isfinite(v) for v in losses.values())
    (inst,) = infer(v2_model, [{"image": random_image(20, 20), "height": 40, "width": 40}])
    assert inst.image_size == (40, 40) and inst.pred_masks.shape[1:] == (40, 40)


@pytest.mark.parametrize(
    "image, shown",
    [
        (torch.zeros(1, 32, 32, dtype=torch.uint8), r"shape \(1, 32, 32\)"),  # grayscale
        (torch.zeros(32, 32, dtype=torch.uint8), r"shape \(32, 32\)"),
        (torch.zeros(4, 32, 32, dtype=torch.uint8), r"shape \(4, 32, 32\)"),  # RGBA
        (torch.zeros(32, 48, 3, dtype=torch.uint8), r"shape \(32, 48, 3\).*Permute"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), r"shape \(1, 3, 32, 32\)"),
        (torch.zeros(3, 0, 32, dtype=torch.uint8), r"shape \(3, 0, 32\)"),
        (np.zeros((32, 32, 3), dtype=np.uint8), "type ndarray"),
    ],
    ids=["gray_1HW", "gray_HW", "rgba", "HWC", "batched", "empty", "numpy"],
)
def test_image_not_3_by_h_by_w_raises_value_error_naming_shape_and_the_reader(image, shown):
    """Readers (solo.data.read_image) convert grayscale and RGBA files; the model only checks."""
    model = build("SOLOHead")
    good = {"image": random_image(32, 32)}
    for training in (False, True):
        model.train(training)
        expected = r"batched_inputs\[1\]\['image'\] has " + shown
        with pytest.raises(ValueError, match=expected) as info:
            model([good, {"image": image}])
        assert "expected a (3, H, W) tensor in INPUT.FORMAT='RGB'" in str(info.value)
        assert "solo.data.read_image" in str(info.value)


def test_non_contiguous_images_give_the_same_batch_and_outputs(v2_model):
    contiguous = random_image(64, 96, seed=4)
    # An HWC buffer seen as CHW (the usual image from numpy), and a strided view.
    permuted = contiguous.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    strided = torch.stack([contiguous] * 2, dim=-1)[..., 0]
    assert not permuted.is_contiguous() and not strided.is_contiguous()
    reference = v2_model.preprocess_image([{"image": contiguous}]).tensor
    for image in (permuted, strided):
        assert torch.equal(v2_model.preprocess_image([{"image": image}]).tensor, reference)
    a, b = (infer(v2_model, [{"image": im}])[0] for im in (contiguous, permuted))
    assert (
        len(a) > 0 and torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.scores, b.scores)
    )


# ----------------------------------------------------------------------------------------------
# Degenerate ground truth fed to the model directly
# ----------------------------------------------------------------------------------------------


def instances_from_masks(masks, classes, boxes=None):
    masks = torch.as_tensor(np.asarray(masks), dtype=torch.bool)
    inst = Instances(tuple(masks.shape[1:]))
    if boxes is None:
        boxes = BitMasks(masks).get_bounding_boxes().tensor
    inst.gt_boxes = Boxes(torch.as_tensor(boxes, dtype=torch.float32))
    inst.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    inst.gt_masks = BitMasks(masks)
    return inst


def degenerate_masks(h=64, w=96):
    masks = np.zeros((4, h, w), dtype=bool)
    masks[1, 30, 40] = True  # a single pixel: box scale 0, below the smallest range [1, ...]
    masks[2, :, :20] = True  # touches three borders
    masks[3] = True  # the whole image
    boxes = BitMasks(torch.from_numpy(masks)).get_bounding_boxes().tensor
    boxes[0] = torch.tensor([10.0, 10.0, 30.0, 30.0])  # a box whose mask is empty
    return masks, boxes


def test_empty_one_pixel_border_and_out_of_range_instances_train_with_finite_losses():
    # Ranges that the whole-image object (scale sqrt(95 * 63) = 77) exceeds and the 1-pixel one
    # (scale 0, inclusive box) misses.
    ranges = "[[1, 8], [4, 16], [8, 24], [16, 32], [24, 40]]"
    model = build("SOLOHead", ["MODEL.SOLO.SCALE_RANGES", ranges])
    masks, boxes = degenerate_masks()
    image = random_image(64, 96)
    batch = [{"image": image, "instances": instances_from_masks(masks, [0, 1, 2, 3], boxes)}]
    losses = train_step(model, batch)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    # Only the border object (scale sqrt(19 * 63) = 34.6, in [24, 40]) is a positive.
    with torch.no_grad():
        gt = gather_ground_truth([batch[0]["instances"]], (64, 96), "cpu")
        targets = model.target_assigner(gt)
    labels = torch.cat([t.cate_labels[t.positive_cells] for t in targets])
    assert len(labels) > 0 and set(labels.tolist()) == {2}

    # Without the border object nothing is positive: no mask loss, still a finite focal loss.
    keep = [0, 1, 3]
    inst = instances_from_masks(masks[keep], [0, 1, 3], boxes[keep])
    losses = train_step(model, [{"image": image, "instances": inst}])
    assert losses["loss_mask"].item() == 0.0 and torch.isfinite(losses["loss_cate"])


# ----------------------------------------------------------------------------------------------
# Fuzzing: target assignment and losses
# ----------------------------------------------------------------------------------------------


def random_degenerate_instances(rng, h, w, n):
    """random_instances plus, at random, empty masks, 1-pixel masks and full-image masks. Boxes
    stay those of the original masks: boxes and masks disagree, as after a careless crop."""
    inst = random_instances(h, w, n, NUM_CLASSES, rng, min_size=1)
    masks = inst.gt_masks.tensor.clone()
    for i in range(n):
        kind = rng.integers(0, 6)
        if kind == 0:
            masks[i] = False
        elif kind == 1:
            masks[i] = False
            masks[i, rng.integers(0, h), rng.integers(0, w)] = True
        elif kind == 2:
            masks[i] = True
    inst.gt_masks = BitMasks(masks)
    return inst


@pytest.mark.parametrize("seed", range(30))
def test_fuzz_target_assignment_labels_come_from_the_image_and_losses_are_finite(seed):
    rng = np.random.default_rng(seed)
    keep_overlapping = bool(seed % 2)  # SOLOv2 / SOLO semantics
    num_images = int(rng.integers(1, 4))
    sizes = [(int(rng.integers(8, 97)), int(rng.integers(8, 129))) for _ in range(num_images)]
    padded = tuple(-(-max(s[d] for s in sizes) // 32) * 32 for d in (0, 1))
    gts = [random_degenerate_instances(rng, h, w, int(rng.integers(0, 7))) for h, w in sizes]
    grids = [12, 8, 6]
    assigner = SOLOTargetAssigner(
        num_classes=NUM_CLASSES,
        num_grids=grids,
        scale_ranges=[[1, 24], [12, 48], [24, 2048]],
        mask_strides=[4, 8, 16],
        sigma=0.2,
        keep_overlapping_masks=keep_overlapping,
    )
    targets = assigner(gather_ground_truth(gts, padded, "cpu"))

    for t, s, stride in zip(targets, grids, [4, 8, 16]):
        assert t.cate_labels.shape == (num_images, s * s)
        assert torch.equal(t.positive_cells, t.cate_labels < NUM_CLASSES)
        for b, gt in enumerate(gts):
            labels = set(t.cate_labels[b][t.positive_cells[b]].tolist())
            assert labels <= set(gt.gt_classes.tolist()), "label of another image or class"
            if not gt.gt_masks.tensor.any():
                assert not t.positive_cells[b].any(), "positive cell without a visible object"
        # Every mask-loss entry sits on a positive cell and points at a mask target of the level.
        assert t.positive_cells[t.pos_images, t.pos_cells].all()
        assert t.mask_targets.shape[1:] == (padded[0] // stride, padded[1] // stride)
        assert (t.pos_instances < len(t.mask_targets)).all()

    torch.manual_seed(seed)
    logits = [torch.randn(num_images, NUM_CLASSES, s, s) for s in grids]
    probs = [torch.rand(len(t.pos_cells), *t.mask_targets.shape[1:]) for t in targets]
    loss_cate = category_loss(logits, targets, NUM_CLASSES, 0.25, 2.0)
    loss_mask = mask_loss(probs, targets)
    assert torch.isfinite(loss_cate) and torch.isfinite(loss_mask)
    if sum(len(t.pos_cells) for t in targets) == 0:
        assert loss_mask.item() == 0.0


# ----------------------------------------------------------------------------------------------
# Fuzzing: post-processing
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def fuzz_case(seed):
    """Post-processing of random head outputs for one image: (results, options, one_class,
    output_sizes). Cached: the coverage test below reuses the results of the invariants test."""
    rng = np.random.default_rng(100 + seed)
    kind = ["solo", "decoupled", "solov2"][seed % 3]
    # From "no cell above the score threshold" to "every cell is a candidate".
    cate_mean = float(rng.choice([-12.0, -4.0, -2.0, 0.0, 3.0]))
    outputs = random_outputs(kind, seed, batch=1, cate_mean=cate_mean)
    one_class = None
    if rng.random() < 0.3:  # every candidate of a single class
        one_class = int(rng.integers(0, NUM_CLASSES))
        for logits in outputs.cate_logits:
            others = [c for c in range(NUM_CLASSES) if c != one_class]
            logits[:, others] = -30.0
    options = dict(
        max_per_image=int(rng.integers(1, 30)),
        nms_pre=int(rng.integers(5, 200)),
        nms_type="matrix" if rng.random() < 0.7 else "mask",
        matrix_nms_kernel=["gaussian", "linear"][int(rng.integers(0, 2))],
    )
    image_sizes = [(int(rng.integers(32, 65)), int(rng.integers(32, 97)))]
    output_sizes = [(int(rng.integers(10, 200)), int(rng.integers(10, 200)))]
    post = SOLOPostProcessor(min_mask_areas=LEVEL_STRIDES, **options)
    mask_probs = mask_probs_of(kind, outputs)
    results = post(outputs.cate_logits, mask_probs, PADDED, image_sizes, output_sizes)
    return results, options, one_class, output_sizes


@pytest.mark.parametrize("seed", range(30))
def test_fuzz_postprocessing_outputs_are_well_formed(seed):
    results, options, one_class, output_sizes = fuzz_case(seed)
    assert len(results) == 1
    for inst, (h, w) in zip(results, output_sizes):
        n = len(inst)
        assert inst.image_size == (h, w)
        assert inst.pred_masks.shape == (n, h, w) and inst.pred_masks.dtype == torch.bool
        assert n <= options["max_per_image"]
        assert (inst.scores[:-1] >= inst.scores[1:]).all(), "scores sorted descending"
        assert ((inst.scores >= 0.05) & (inst.scores <= 1)).all(), "UPDATE_THRESH <= score <= 1"
        assert ((inst.pred_classes >= 0) & (inst.pred_classes < NUM_CLASSES)).all()
        if one_class is not None:
            assert (inst.pred_classes == one_class).all()
        boxes = inst.pred_boxes.tensor
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()


def test_fuzz_cases_cover_empty_capped_and_single_class_outputs():
    """The fuzz seeds exercise the edge cases: no output, output capped at max_per_image (more
    candidates than it), and a single class."""
    seen = set()
    for seed in range(30):
        results, options, one_class, _ = fuzz_case(seed)
        for inst in results:
            seen.add("empty" if len(inst) == 0 else None)
            seen.add("capped" if len(inst) == options["max_per_image"] > 1 else None)
            seen.add("one class" if one_class is not None and len(inst) else None)
    assert {"empty", "capped", "one class"} <= seen


# ----------------------------------------------------------------------------------------------
# Bad configs: fail at model construction, naming the key
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, error, message",
    [
        (["MODEL.SOLO.NUM_GRIDS", "[12, 10, 8, 6]"], ValueError,
         r"MODEL.SOLO.NUM_GRIDS has 4 entries but MODEL.SOLO.IN_FEATURES names 5 levels"),
        (["MODEL.SOLO.SCALE_RANGES", "[[1, 24], [12, 48], [8, 96], [48, 192], [96, 2048]]"],
         ValueError, "MODEL.SOLO.SCALE_RANGES must increase from level to level"),
        (["MODEL.SOLO.SCALE_RANGES", "[[1, 24], [12, 48], [24, 96], [48, 192], [96]]"],
         ValueError, r"MODEL.SOLO.SCALE_RANGES must be \[low, high\] pairs"),
        (["MODEL.SOLO.LEVEL_STRIDES", "[8, 8, 16, 32, 32]"], KeyError,
         r"LEVEL_STRIDES was renamed to nothing \(derived from the backbone.*delete the key"),
        (["MODEL.SOLO.CHANNELS_LAST_ON_CPU", "False"], KeyError,
         r"CHANNELS_LAST_ON_CPU was renamed to CHANNELS_LAST_ON_CPU.*runtime knob"),
        (["MODEL.SOLO.MIN_MASK_AREAS", "[2, 2, 4, 8]"], ValueError,
         "MODEL.SOLO.MIN_MASK_AREAS has 4 entries"),
        (["MODEL.SOLO.MIN_MASK_AREAS", "[2, 2, 4, 8, -1]"], ValueError,
         "MODEL.SOLO.MIN_MASK_AREAS must be >= 0"),
        (["MODEL.SOLO.HEAD_NAME", "SOLOv3Head"], KeyError,
         r"HEAD_NAME='SOLOv3Head' is not a registered SOLO head; available: .*SOLOv2Head"),
        (["MODEL.SOLO.MATRIX_NMS_KERNEL", "box"], ValueError,
         r"MODEL.SOLO.MATRIX_NMS_KERNEL='box' is not one of \('gaussian', 'linear'\)"),
        (["MODEL.SOLO.NMS_TYPE", "soft"], ValueError, "MODEL.SOLO.NMS_TYPE='soft' is not one of"),
        (["MODEL.SOLO.TOWER_DCN", "DCNv3"], ValueError,
         r"'DCNv3' \(MODEL.SOLO.TOWER_DCN or MASK_FEATURE_DCN\) is not one of"),
        (["MODEL.SOLO.TOWER_DCN_LAYERS", "first"], ValueError,
         "MODEL.SOLO.TOWER_DCN_LAYERS must be 'all' or 'last'"),
        (["MODEL.SOLO.SCORE_THRESH", "1.5"], ValueError,
         r"MODEL.SOLO.SCORE_THRESH must be in \[0, 1\)"),
        (["TEST.DETECTIONS_PER_IMAGE", "0"], ValueError, "TEST.DETECTIONS_PER_IMAGE must be >= 1"),
        (["MODEL.SOLO.NUM_CLASSES", "0"], ValueError, "MODEL.SOLO.NUM_CLASSES must be >= 1"),
        (["MODEL.SOLO.IN_FEATURES", "['p2', 'p3', 'p4', 'p5', 'p7']"], ValueError,
         r"MODEL.SOLO.IN_FEATURES \['p7'\] are not produced by the backbone"),
    ],
    ids=lambda x: x[0].split(".")[-1] if isinstance(x, list) else None,
)  # fmt: skip
def test_bad_config_fails_at_construction_naming_the_key(opts, error, message):
    with pytest.raises(error, match=message):
        build_model(tiny_cfg("SOLOHead", opts))


def test_removed_max_per_image_key_names_its_replacement_in_files_and_opts(tmp_path):
    old_config = tmp_path / "old.yaml"
    old_config.write_text(
        '_BASE_: "{}"\nMODEL:\n  SOLO:\n    MAX_PER_IMAGE: 50\n'.format(
            CONFIG_DIR / "SOLO" / "R50_1x.yaml"
        )
    )
    renamed = "MODEL.SOLO.MAX_PER_IMAGE was renamed to TEST.DETECTIONS_PER_IMAGE"
    with pytest.raises(KeyError, match=renamed):
        get_solo_cfg(str(old_config))
    with pytest.raises(KeyError, match=renamed):
        get_solo_cfg(opts=["MODEL.SOLO.MAX_PER_IMAGE", "50"])
    cfg = get_solo_cfg(opts=["TEST.DETECTIONS_PER_IMAGE", "50"])
    assert "MAX_PER_IMAGE" not in cfg.MODEL.SOLO
    assert get_solo_cfg().TEST.DETECTIONS_PER_IMAGE == 100  # the official max_per_img
    assert SOLOPostProcessor(cfg, level_strides=[8] * 5).max_per_image == 50


# ----------------------------------------------------------------------------------------------
# Divergence: Detectron2's trainer stops with the iteration and the loss terms
# ----------------------------------------------------------------------------------------------


def nan_image(model, batch):
    batch[0]["image"] = batch[0]["image"].float()
    batch[0]["image"][:, :4, :4] = float("nan")


def nan_weights(model, batch):
    with torch.no_grad():
        model.head.cate_pred.weight.fill_(float("nan"))


@pytest.mark.parametrize("poison", [nan_image, nan_weights], ids=["nan_image", "nan_weights"])
def test_non_finite_loss_stops_training_naming_iteration_and_loss_terms(poison):
    model = build("SOLOHead")
    batch = random_batch([((64, 64), 2)], num_classes=5)
    poison(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    trainer = SimpleTrainer(model, itertools.repeat(batch), optimizer)
    with pytest.raises(FloatingPointError, match=r"(?s)iteration=0.*loss_cate.*loss_mask"):
        trainer.train(0, 3)
