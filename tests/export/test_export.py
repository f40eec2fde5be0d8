"""Exported models (ONNX Runtime, TorchScript, torch.export .pt2) against eager inference, CPU."""

import copy
import logging
import cv2
import pytest
import torch

from detectron2.utils.visualizer import Visualizer

from helpers import (
    HEADS,
    REPO_ROOT,
    build,
    force_candidates,
    instances_as_annotations,
    load_script,
    random_image,
    shapes_cache,
    tied_scores_model,
    tiny_cfg,
)
from solo.export import (
    ExportedModel,
    ExportError,
    SOLOExportModule,
    compare_predictions,
    export_model,
    pad_image,
)
from solo.export.openvino import openvino_session
from solo.modeling.nms import points_nms
from solo.modeling.postprocess import SOLOPostProcessor

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[export])")

# Sample (export) size, then two other input sizes with their requested output sizes.
SAMPLE_SIZE = (97, 133)
OTHER_SIZES = [((160, 96), (160, 96)), ((64, 200), (128, 400))]
# K0 above the ~600 candidates a forced tiny model has, so that the export is exact.
LARGE_K0 = 1500


def forced_model(head_name, opts=()):
    model = build(tiny_cfg(head_name, opts))
    force_candidates(model)
    return model.eval()


def eager(model, inputs):
    with torch.no_grad():
        return [r["instances"] for r in model(inputs)]


def assert_same_predictions(expected, actual):
    assert len(expected) > 0, "nothing to compare: the test model predicts no instance"
    assert compare_predictions(expected, actual) == []


def fixed_size_and_eager(model, k0):
    """Eager instances of a seeded image, and the export module's raw outputs for it."""
    module = SOLOExportModule(model, k0).eval()
    img = random_image(SAMPLE_SIZE, seed=1)
    (expected,) = eager(model, [{"image": img}])
    padded = pad_image(img.float(), module.pixel_mean, module.size_divisibility)
    with torch.no_grad():
        return expected, module(padded)


@pytest.mark.parametrize("head_name", HEADS)
def test_fixed_size_postprocess_equals_eager_postprocessor(head_name):
    """The in-graph post-processing as plain PyTorch: same instances as SOLOPostProcessor."""
    expected, (scores, labels, masks, num_det, num_cand) = fixed_size_and_eager(
        forced_model(head_name), LARGE_K0
    )
    n = int(num_det)
    assert n == len(expected) > 0 and int(num_cand) <= LARGE_K0
    assert torch.equal(labels[:n], expected.pred_classes)
    torch.testing.assert_close(scores[:n], expected.scores, atol=1e-5, rtol=0)
    # Rows past num_detections are padding.
    assert (scores[n:] == -1).all()


@pytest.mark.parametrize("head_name", HEADS)
def test_fixed_size_postprocess_ranks_exact_ties_as_the_eager_postprocessor(head_name):
    """Tied scores come out in the eager order (candidate order) in the graph too: its top-k
    selections are stable sorts (``topk`` ordered the tied classes otherwise)."""
    expected, (scores, labels, masks, num_det, num_cand) = fixed_size_and_eager(
        tied_scores_model(head_name), 5000
    )
    n = int(num_det)
    assert n == len(expected) > 0 and len(torch.unique(expected.scores)) < n  # ties
    assert torch.equal(labels[:n], expected.pred_classes)


class CrossScoreTie(torch.nn.Module):
    """One level of 4x4 cells, 2 classes: candidate A (cell 0, class 0) scores 0.75 with a mask
    of probability 1.0, candidate B (cell 1, class ``b_class``) scores 1.0 with a mask of 0.75
    overlapping A's: both rescore to exactly 0.75, from different category scores. ``forward``
    is the fixed-size post-processing (scores, labels, soft masks)."""

    def __init__(self, b_class):
        super().__init__()
        logits = torch.full((1, 2, 4, 4), -20.0)
        logits[0, 0, 0, 0] = 1.0986121892929077  # one float32 below log(3): sigmoid 0.75
        assert logits[0, 0, 0, 0].sigmoid() == 0.75
        logits[0, b_class, 0, 1] = 20.0  # sigmoid: 1.0
        table = torch.zeros((16, 16, 16))
        table[0, :8, :8], table[1, :8, 4:12] = 1.0, 0.75
        self.register_buffer("table", table)
        self.logits = logits
        self.post = SOLOPostProcessor(min_mask_areas=[0], nms_pre=500, max_per_image=100)

    def eager(self):
        probs = lambda image, levels, cells, size, out=None: self.table[cells]  # noqa: E731
        (result,) = self.post([self.logits], probs, (64, 64), [(64, 64)], [(64, 64)])
        return result.scores, result.pred_classes, result.pred_masks[:, 0, 0]

    def forward(self, logits):
        return self.post.fixed_size([logits], lambda levels, cells: self.table[cells], 100)[:3]


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime", "openvino"])
@pytest.mark.parametrize("b_class", [0, 1])
def test_ties_from_different_category_scores_rank_in_candidate_order_in_the_graph(
    b_class, runtime, tmp_path
):
    """A tie after maskness rescoring between candidates of different category scores ranks
    in candidate order in the graph as in eager inference (the K0 selection used to stay in
    category-score order, so B came first, and with one class Matrix NMS decayed the other)."""
    module = CrossScoreTie(b_class).eval()
    scores, labels, top_left = module.eager()
    assert scores.tolist()[0] == 0.75 and top_left.tolist()[0]  # A first
    with torch.no_grad():
        outputs = module(module.logits)
    if runtime != "torch":
        path = str(tmp_path / "tie.onnx")
        with torch.no_grad():
            torch.onnx.export(module, (module.logits,), path, input_names=["image"], dynamo=False)
        if runtime == "onnxruntime":
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            outputs = session.run(None, {"image": module.logits.numpy()})
        else:
            pytest.importorskip("openvino", reason="openvino is not installed")
            outputs = openvino_session(path, 1)[0](module.logits.numpy())
        outputs = [torch.as_tensor(o) for o in outputs]
    got_scores, got_labels, got_masks = outputs
    n = len(scores)
    assert torch.equal(got_labels[:n], labels)
    torch.testing.assert_close(got_scores[:n], scores, atol=1e-6, rtol=0)
    assert torch.equal(got_masks[:n, 0, 0] > 0.5, top_left)


def test_a_nan_category_logit_takes_no_k0_slot_from_a_candidate():
    """NaN is no candidate (NaN > SCORE_THRESH is False) but ``topk`` ranks it first: with K0 =
    the number of candidates it used to push the one candidate out of the graph's K0."""
    module = CrossScoreTie(1)
    module.logits[0, 0, 1, 1] = float("nan")
    module.logits[0, 1, 3, 3] = float("nan")
    scores, labels, _ = module.eager()
    assert len(scores) == 2
    with torch.no_grad():
        got_scores, got_labels, _, num_det, num_cand = module.post.fixed_size(
            [module.logits], lambda levels, cells: module.table[cells], 2
        )
    assert int(num_cand) == 2 and int(num_det) == 2
    assert torch.equal(got_labels[:2], labels) and torch.equal(got_scores[:2], scores)


def test_every_onnx_topk_has_a_constant_k(tmp_path):
    """TensorRT's ONNX parser wants TopK's K as an initializer: the K0 selection's index sort
    is a TopK of constant K too (a sort exported one with K read from a shape)."""
    onnx = pytest.importorskip("onnx")
    path = export_model(forced_model("SOLOv2Head"), "onnx", str(tmp_path), max_candidates=300)
    graph = onnx.load(path).graph
    constants = {i.name for i in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    top_ks = [n for n in graph.node if n.op_type == "TopK"]
    assert len(top_ks) == 4
    assert all(n.input[1] in constants for n in top_ks), [n.input[1] for n in top_ks]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_exported_files_rank_exact_ties_as_eager(fmt, tmp_path):
    model = tied_scores_model("SOLOv2Head")
    sample = random_image(SAMPLE_SIZE, 0)
    exported = ExportedModel(
        export_model(model, fmt, str(tmp_path), sample_image=sample, max_candidates=5000)
    )
    inputs = [{"image": sample}]
    (expected,) = eager(model, inputs)
    (actual,) = [r["instances"] for r in exported(inputs)]
    assert len(torch.unique(expected.scores)) < len(expected)  # ties
    assert torch.equal(actual.pred_classes, expected.pred_classes)
    assert_same_predictions(expected, actual)


def test_more_candidates_than_k0_keeps_the_best_category_scores():
    """With K0 < candidates, the result is eager inference restricted to the K0 best (cell,
    class) category scores, i.e. with SCORE_THRESH raised to the (K0 + 1)-th score."""
    k0 = 40
    model = forced_model("SOLOv2Head")
    module = SOLOExportModule(model, k0).eval()
    img = random_image(SAMPLE_SIZE, seed=2)
    padded = pad_image(img.float(), module.pixel_mean, module.size_divisibility)
    with torch.no_grad():
        scores, labels, masks, num_det, num_cand = module(padded)
        features = model.backbone((padded - module.pixel_mean) / module.pixel_std)
        outputs = model.head([features[f] for f in model.head_in_features])
    pair_scores = torch.cat([points_nms(x.sigmoid()).flatten() for x in outputs.cate_logits])
    ranked = pair_scores.sort(descending=True).values
    assert int(num_cand) == (pair_scores > model.postprocessor.score_thresh).sum() > k0
    restricted = copy.deepcopy(model)
    restricted.postprocessor.score_thresh = ranked[k0].item()
    (expected,) = eager(restricted, [{"image": img}])
    n = int(num_det)
    assert n == len(expected) > 0
    assert torch.equal(labels[:n], expected.pred_classes)
    torch.testing.assert_close(scores[:n], expected.scores, atol=1e-5, rtol=0)
    # And it is not the unrestricted result (the test would otherwise prove nothing).
    (unrestricted,) = eager(model, [{"image": img}])
    assert compare_predictions(unrestricted, expected) != []


def test_greedy_mask_nms_is_refused_with_the_key_to_change(tmp_path):
    model = build(tiny_cfg("SOLOv2Head", ["MODEL.SOLO.NMS_TYPE", "mask"])).eval()
    with pytest.raises(ExportError, match="NMS_TYPE matrix"):
        export_model(model, "torchscript", str(tmp_path))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("head_name", HEADS)
def test_exported_model_matches_eager_at_other_input_sizes(head_name, fmt, tmp_path):
    model = forced_model(head_name)
    path = export_model(
        model,
        fmt,
        str(tmp_path),
        sample_image=random_image(SAMPLE_SIZE, 0),
        max_candidates=LARGE_K0,
    )
    exported = ExportedModel(path)
    for seed, (size, (out_h, out_w)) in enumerate(OTHER_SIZES):
        inputs = [{"image": random_image(size, seed + 10), "height": out_h, "width": out_w}]
        (expected,) = eager(model, inputs)
        (actual,) = [r["instances"] for r in exported(inputs)]
        assert actual.image_size == (out_h, out_w)
        assert actual.pred_masks.dtype == torch.bool and actual.pred_classes.dtype == torch.int64
        assert_same_predictions(expected, actual)
        torch.testing.assert_close(
            actual.pred_boxes.tensor, expected.pred_boxes.tensor, atol=2, rtol=0
        )


def test_image_without_candidates_gives_typed_empty_instances(tmp_path):
    # Untrained weights: category scores near the 0.01 prior, none above SCORE_THRESH.
    model = build(tiny_cfg("SOLOv2Head")).eval()
    exported = ExportedModel(export_model(model, "onnx", str(tmp_path)))
    img = random_image((70, 90), seed=3)
    (expected,) = eager(model, [{"image": img}])
    (actual,) = [r["instances"] for r in exported([{"image": img}])]
    assert len(expected) == len(actual) == 0 and exported.last_num_candidates == [0]
    assert actual.pred_masks.shape == (0, 70, 90) and actual.pred_masks.dtype == torch.bool
    assert actual.scores.dtype == torch.float32 and actual.pred_classes.dtype == torch.int64
    assert actual.pred_boxes.tensor.shape == (0, 4)


def test_runtime_warns_when_candidates_exceed_k0(tmp_path, caplog):
    model = forced_model("DecoupledSOLOLightHead")
    exported = ExportedModel(export_model(model, "onnx", str(tmp_path), max_candidates=30))
    logger = logging.getLogger("solo.export")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="solo.export"):
            exported([{"image": random_image(SAMPLE_SIZE, 4)}])
    finally:
        logger.removeHandler(caplog.handler)
    assert exported.last_num_candidates[0] > 30
    assert f"{exported.last_num_candidates[0]} candidates" in caplog.text
    assert "--max-candidates" in caplog.text


def test_candidate_counts_tally_the_images_over_k0_and_name_the_k0_to_use(tmp_path):
    """--run-eval's summary: how many images had more candidates than K0, and the largest
    count (the K0 that makes every image exact)."""
    model = forced_model("DecoupledSOLOLightHead")
    exported = ExportedModel(export_model(model, "onnx", str(tmp_path), max_candidates=30))
    images = [{"image": random_image(SAMPLE_SIZE, seed)} for seed in (4, 5)]
    exported(images)
    seen = exported.last_num_candidates
    counts = exported.candidate_counts
    assert counts.images == 2 and counts.max == max(seen) > 30
    assert counts.over_k0 == sum(n > 30 for n in seen)
    summary = counts.summary(30)
    assert f"{counts.over_k0} images had more than K0" in summary
    assert f"--max-candidates {max(seen)}" in summary
    counts.reset()
    counts.add(12, 30)
    assert counts.summary(30).endswith("every image within K0, none cut short by it.")


def test_deformable_model_exports_to_pt2_and_is_refused_by_onnx(tmp_path):
    opts = ["MODEL.SOLO.TOWER_DCN", "DCNv2", "MODEL.SOLO.TOWER_DCN_LAYERS", "last"]
    model = forced_model("SOLOv2Head", opts)
    with torch.no_grad():  # non-zero offsets, so the deformable path matters
        for name, p in model.head.named_parameters():
            if "conv_offset" in name:
                p.normal_(std=0.05)
    with pytest.raises(ExportError, match="--format pt2"):
        export_model(model, "onnx", str(tmp_path))
    path = export_model(
        model,
        "pt2",
        str(tmp_path),
        sample_image=random_image(SAMPLE_SIZE, 0),
        max_candidates=LARGE_K0,
    )
    exported = ExportedModel(path)
    size, (out_h, out_w) = OTHER_SIZES[0]
    inputs = [{"image": random_image(size, 5), "height": out_h, "width": out_w}]
    (expected,) = eager(model, inputs)
    assert_same_predictions(expected, exported(inputs)[0]["instances"])


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    with pytest.raises(ExportError, match="unknown exported model type '.pth'"):
        ExportedModel(str(path))


def test_config_that_differs_from_the_export_is_refused_naming_each_key(tmp_path):
    """The graph fixes the model's settings: a Predictor config with another detection cap or
    class count was silently ignored (100 detections with TEST.DETECTIONS_PER_IMAGE 7)."""
    cfg = tiny_cfg("SOLOv2Head")
    exported = ExportedModel(export_model(cfg, "onnx", str(tmp_path)))
    same = tiny_cfg("SOLOv2Head", ["MODEL.WEIGHTS", "other.pth"])
    exported.check_config(same)  # weights, device and test-time resizing may differ
    changed = tiny_cfg(
        "SOLOv2Head", ["TEST.DETECTIONS_PER_IMAGE", "7", "MODEL.SOLO.SCORE_THRESH", "0.2"]
    )
    with pytest.raises(ExportError) as error:
        exported.check_config(changed)
    message = str(error.value)
    assert "TEST.DETECTIONS_PER_IMAGE: exported 100, config 7" in message
    assert "MODEL.SOLO.SCORE_THRESH: exported 0.1, config 0.2" in message
    assert "re-export" in message and "NUM_CLASSES" not in message
    # Exported from a model object: the metadata's input format and class count are checked.
    from_model = ExportedModel(export_model(build(cfg).eval(), "onnx", str(tmp_path / "m")))
    from_model.check_config(cfg)
    with pytest.raises(ExportError, match="MODEL.SOLO.NUM_CLASSES: exported"):
        from_model.check_config(tiny_cfg("SOLOv2Head", ["MODEL.SOLO.NUM_CLASSES", "7"]))


def test_exported_file_given_as_checkpoint_is_refused_with_the_way_to_run_it(tmp_path):
    """torch.load failed on it with "Unsupported operand" (train_net.py --eval-only)."""
    from solo.checkpoint import CheckpointMismatchError, SOLOCheckpointer

    model = build(tiny_cfg("SOLOv2Head")).eval()
    path = export_model(model, "onnx", str(tmp_path))
    for strict in (True, False):
        with pytest.raises(CheckpointMismatchError, match="is an exported model.*--run-eval"):
            SOLOCheckpointer(model, strict=strict).load(path)


@pytest.fixture(scope="module")
def export_tool():
    return load_script("tools/export_model.py", "export_model_tool")


def test_export_tool_refuses_test_time_augmentation_it_cannot_export(export_tool, tmp_path):
    config = str(REPO_ROOT / "configs/Shapes/SOLOv2_R18.yaml")
    argv = ["--config-file", config, "--output", str(tmp_path), "--allow-random-weights"]
    with pytest.raises(SystemExit, match="TEST.AUG.ENABLED True: .* not part of an exported"):
        export_tool.main(argv + ["TEST.AUG.ENABLED", "True"])
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_export_tool_refuses_empty_and_missing_weights(export_tool, tmp_path):
    config = str(REPO_ROOT / "configs/SOLOv2/Light_448_R18_3x.yaml")
    common = ["--config-file", config, "--output", str(tmp_path)]
    with pytest.raises(SystemExit, match="MODEL.WEIGHTS is empty"):
        export_tool.main(common + ["MODEL.WEIGHTS", ""])
    with pytest.raises(SystemExit, match="no such file"):
        export_tool.main(common + ["MODEL.WEIGHTS", str(tmp_path / "missing.pth")])
    # The sample image's error blamed "the record's file_name or the dataset's image root".
    missing = str(tmp_path / "missing.png")
    with pytest.raises(SystemExit, match=r"--sample-image '.*missing.png': no such file"):
        export_tool.main(
            common + ["--sample-image", missing, "--allow-random-weights", "MODEL.WEIGHTS", ""]
        )


def test_export_tool_verifies_a_checkpoint_and_refuses_one_that_does_not_fit(export_tool, tmp_path):
    cfg = tiny_cfg("SOLOv2Head")
    model = forced_model("SOLOv2Head")
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    config = tmp_path / "tiny.yaml"
    config.write_text(cfg.dump())
    sample = tmp_path / "sample.png"
    cv2.imwrite(str(sample), random_image(SAMPLE_SIZE, 7).permute(1, 2, 0).numpy())
    common = [
        "--config-file",
        str(config),
        "--format",
        "torchscript",
        "--sample-image",
        str(sample),
    ]
    argv = common + ["--output", str(tmp_path / "out"), "--verify", "--max-candidates", "1500"]
    # INPUT.MIN_SIZE_TEST 0: the sample is not resized (--verify then runs at 97x133 and two
    # other sizes, small enough for a unit test).
    argv += ["INPUT.MIN_SIZE_TEST", "0"]
    assert export_tool.main(argv + ["MODEL.WEIGHTS", str(weights)]) == 0
    assert (tmp_path / "out" / "model.ts").is_file()
    # The same checkpoint for a model with more classes: strict loading names the mismatch.
    with pytest.raises(RuntimeError, match="does not fit"):
        export_tool.main(argv + ["MODEL.WEIGHTS", str(weights), "MODEL.SOLO.NUM_CLASSES", "7"])


def pseudo_ground_truth(dicts, model, per_image):
    """The shapes images annotated with the eager model's own best ``per_image`` predictions:
    its AP is then high, and any difference of the exported predictions lowers it."""

    from detectron2.data.detection_utils import read_image

    annotated = []
    for d in dicts:
        img = torch.as_tensor(read_image(d["file_name"], "RGB").transpose(2, 0, 1).copy())
        (pred,) = eager(model, [{"image": img}])
        pred = pred[:per_image]
        annotations = instances_as_annotations(pred)
        annotated.append(
            {
                **{k: d[k] for k in ("file_name", "height", "width", "image_id")},
                "annotations": annotations,
            }
        )
    return annotated


def test_exported_shapes_model_coco_ap_equals_eager(tmp_path):
    """inference_on_dataset, COCOEvaluator and Visualizer run on an ExportedModel unchanged and
    give the eager model's COCO AP."""
    from detectron2.data import (
        DatasetCatalog,
        DatasetMapper,
        MetadataCatalog,
        build_detection_test_loader,
    )
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from solo import get_solo_cfg
    from solo.data.shapes import register_shapes_datasets

    split, name = "shapes_val_export", "shapes_val_export_pseudo_gt"
    cfg = get_solo_cfg(str(REPO_ROOT / "configs/Shapes/SOLOv2_R18.yaml"), ["MODEL.DEVICE", "cpu"])
    cfg.merge_from_list(["MODEL.FPN.OUT_CHANNELS", "64", "MODEL.SOLO.HEAD_CHANNELS", "64"])
    model = build(cfg)
    force_candidates(model)
    model.eval()
    with shapes_cache(tmp_path / "shapes") as root:
        register_shapes_datasets(str(root), splits={split: dict(num_images=3, seed=11)})
        dicts = pseudo_ground_truth(DatasetCatalog.get(split), model, per_image=15)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=["a", "b", "c"])
    try:
        loader = build_detection_test_loader(dicts, mapper=DatasetMapper(cfg, is_train=False))
        exported = ExportedModel(export_model(model, "onnx", str(tmp_path), max_candidates=4000))
        results = {}
        for key, predictor in (("eager", model), ("exported", exported)):
            evaluator = COCOEvaluator(name, tasks=("segm",), output_dir=str(tmp_path / key))
            results[key] = inference_on_dataset(predictor, loader, evaluator)["segm"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert results["eager"]["AP"] > 20
    assert results["exported"] == pytest.approx(results["eager"], abs=1e-6)
    instances = exported([{"image": random_image((128, 160), 6)}])[0]["instances"]
    canvas = Visualizer(random_image((128, 160), 6).permute(1, 2, 0).numpy())
    assert canvas.draw_instance_predictions(instances).get_image().shape == (128, 160, 3)


# --------------------------------------------------------------------------------------------
# Export paths never fail silently (issue 20, section 4)
# --------------------------------------------------------------------------------------------


def test_tracing_or_exporting_the_eager_model_is_refused_naming_the_export_tool(tmp_path):
    """Detectron2's TracingAdapter + torch.jit.trace gave a model returning 0 instances on every
    image after a sample without detections; ONNX and torch.export fail deep in the tracer."""
    from detectron2.export import TracingAdapter

    model = build(tiny_cfg("SOLOv2Head")).eval()
    inputs = [{"image": random_image((64, 96), seed=8).float()}]
    adapter = TracingAdapter(model, inputs)
    with pytest.raises(RuntimeError, match="tools/export_model.py.*solo.export"):
        torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    with pytest.raises(Exception, match="tools/export_model.py"):
        torch.onnx.export(adapter, adapter.flattened_inputs, str(tmp_path / "m.onnx"), dynamo=False)
    with pytest.raises(Exception, match="tools/export_model.py"):
        torch.export.export(adapter, adapter.flattened_inputs)
    assert len(model.eval()(inputs)) == 1  # the eager model itself still runs


def onnx_metadata(path):
    import json
    import onnx

    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    return json.loads(props["solo_export.json"])


def test_plain_onnxruntime_runs_the_file_at_any_size_because_the_graph_pads(tmp_path):
    """The file declares (1, 3, height, width); plain ONNX Runtime failed at 120x160 with a
    broadcast error because the padding ran outside the graph. Now the graph pads as the eager
    model does, so its outputs are the eager model's at any size, and the metadata says so.
    (ONNX Runtime's float rounding may swap two instances of near-equal score: the detections are
    compared as sets, their order by the exact tests above.)"""
    import onnxruntime as ort

    model = forced_model("SOLOv2Head")
    path = export_model(model, "onnx", str(tmp_path), max_candidates=LARGE_K0)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for seed, size in enumerate([(120, 160), (97, 133), (33, 250), (20, 20), (200, 65)]):
        img = random_image(size, seed + 20)
        outputs = session.run(None, {"image": img[None].float().numpy()})
        scores, labels, masks, num_det, _ = map(torch.from_numpy, outputs)
        (expected,) = eager(model, [{"image": img}])
        n = int(num_det)
        assert n == len(expected) > 0, size
        assert sorted(labels[:n].tolist()) == sorted(expected.pred_classes.tolist())
        torch.testing.assert_close(
            scores[:n].sort().values, expected.scores.sort().values, atol=1e-3, rtol=0
        )
        hp, wp = max(-(-size[0] // 32) * 32, 64), max(-(-size[1] // 32) * 32, 64)
        assert masks.shape[1:] == (hp // 4, wp // 4)
    meta = onnx_metadata(path)
    assert meta["version"] == 2 and meta["format"] == "onnx"
    assert meta["input"]["shape"] == [1, 3, "height", "width"]
    assert meta["padding"]["where"] == "in the graph" and "64" in meta["padding"]["to"]
    assert list(meta["outputs"]) == [
        "scores",
        "labels",
        "masks",
        "num_detections",
        "num_candidates",
    ]
    assert [o.name for o in session.get_outputs()] == list(meta["outputs"])


def test_files_of_metadata_version_1_still_run_with_their_outside_padding(tmp_path):
    """Version 1 graphs took an input padded outside them with the pixel mean."""
    import json
    import onnx

    model = forced_model("DecoupledSOLOLightHead")
    path = export_model(model, "onnx", str(tmp_path), max_candidates=LARGE_K0)
    proto = onnx.load(path)
    meta = onnx_metadata(path)
    v1 = {k: meta[k] for k in ("input_format", "pixel_mean", "size_divisibility", "mask_thresh")}
    v1.update(version=1, max_candidates=meta["max_candidates"], num_classes=5, config="")
    v1["min_blocks"] = 2
    for p in proto.metadata_props:
        p.value = json.dumps(v1)
    onnx.save(proto, path)
    exported = ExportedModel(path)
    assert not exported.pads_in_graph
    inputs = [{"image": random_image((120, 160), 21)}]
    assert_same_predictions(eager(model, inputs)[0], exported(inputs)[0]["instances"])
    # Version 1 torch.export programs padded to 3 blocks (96 px) where eager pads to 64: such a
    # file now refuses a thumbnail with the reason (it returned other instances silently).
    for p in proto.metadata_props:
        p.value = json.dumps({**v1, "min_blocks": 3})
    onnx.save(proto, path)
    with pytest.raises(ExportError, match="at least 65 pixels, got 40x90.*eager model pads"):
        ExportedModel(path)([{"image": random_image((40, 90), 22)}])


def test_a_device_the_runtime_did_not_get_is_an_error_naming_the_package(tmp_path):
    """ExportedModel(path, device="cuda") with a CPU-only onnxruntime ran on the CPU (only
    onnxruntime's own warning) and failed later in torch."""
    import onnxruntime as ort

    path = export_model(build(tiny_cfg("SOLOv2Head")).eval(), "onnx", str(tmp_path))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match="onnxruntime-gpu"):
            ExportedModel(path, device="cuda")
    with pytest.raises(ExportError, match="not on device 'meta'"):
        ExportedModel(path, device="meta")


def test_torchscript_on_cuda_without_cuda_is_an_error_naming_the_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = export_model(build(tiny_cfg("SOLOv2Head")).eval(), "torchscript", str(tmp_path))
    with pytest.raises(ExportError, match="device 'cuda'.*no usable CUDA device"):
        ExportedModel(path, device="cuda")


def test_pt2_is_exact_on_small_images_and_names_its_size_limit_before_running(tmp_path):
    """.pt2 programs padded images to 96 px where eager uses 64 (other instances on thumbnails,
    without a warning), and a side over 8192 failed with a bare 'AssertionError: Guard failed'."""
    model = forced_model("SOLOv2Head")
    exported = ExportedModel(
        export_model(
            model,
            "pt2",
            str(tmp_path),
            sample_image=random_image(SAMPLE_SIZE, 0),
            max_candidates=LARGE_K0,
        )
    )
    for seed, size in enumerate([(40, 50), (64, 64), (20, 90), (130, 70)]):
        inputs = [{"image": random_image(size, seed + 30)}]
        assert_same_predictions(eager(model, inputs)[0], exported(inputs)[0]["instances"])
    panorama = torch.zeros((3, 40, 8200), dtype=torch.uint8)
    with pytest.raises(ExportError, match="sides up to 8192 pixels.*got 40x8200"):
        exported([{"image": panorama}])


def test_export_tool_verify_that_compared_nothing_fails(export_tool, tmp_path):
    """--verify on a model that finds nothing reported '0 instances, same as the eager model'
    and exited 0: a check that compared nothing is not a pass."""
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg("SOLOv2Head").dump())
    sample = tmp_path / "sample.png"
    cv2.imwrite(str(sample), random_image((64, 96), 9).permute(1, 2, 0).numpy())
    argv = ["--config-file", str(config), "--format", "torchscript", "--output", str(tmp_path)]
    argv += ["--sample-image", str(sample), "--verify", "--allow-random-weights"]
    with pytest.raises(SystemExit, match="--verify compared nothing"):
        export_tool.main(argv + ["INPUT.MIN_SIZE_TEST", "0", "MODEL.WEIGHTS", ""])


def test_export_tool_verify_without_sample_uses_the_first_test_image(export_tool, tmp_path):
    from detectron2.data import DatasetCatalog

    model = forced_model("SOLOv2Head")
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_cfg("SOLOv2Head").dump())
    sample = tmp_path / "first.png"
    cv2.imwrite(str(sample), random_image((64, 96), 10).permute(1, 2, 0).numpy())
    name = "export_verify_first_image"
    DatasetCatalog.register(name, lambda: [{"file_name": str(sample), "image_id": 0}])
    argv = ["--config-file", str(config), "--format", "torchscript", "--output", str(tmp_path)]
    argv += ["--verify", "--max-candidates", "1500", "INPUT.MIN_SIZE_TEST", "0"]
    try:
        assert (
            export_tool.main(
                argv + ["DATASETS.TEST", f"('{name}',)", "MODEL.WEIGHTS", str(weights)]
            )
            == 0
        )
        with pytest.raises(SystemExit, match="DATASETS.TEST, which is empty"):
            export_tool.main(argv + ["DATASETS.TEST", "()", "MODEL.WEIGHTS", str(weights)])
    finally:
        DatasetCatalog.remove(name)
