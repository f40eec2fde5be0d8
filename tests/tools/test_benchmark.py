"""tools/benchmark.py and its helpers (solo.utils.benchmark_calibration, measure, benchmark_parts,
synthetic), on tiny CPU inputs.

The reports are checked for what they claim (calibrated post-processing, stage times read from
the post-processor's profiler ranges, ratios); the spawned-process path runs the tool as a
script; tools/gpu_check.py must refuse to run without CUDA.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import solo.modeling.postprocess
import solo.utils.benchmark_calibration
import solo.utils.benchmark_jobs
import solo.utils.benchmark_parts
from helpers import REPO_ROOT, force_candidates, load_script, tiny_cfg
from solo.modeling.nms import points_nms
from solo.utils.measure import POSTPROCESS_STAGES

TINY_CONFIG = "configs/Shapes/SOLOv2_R18.yaml"  # R-18 GN, small head: fast on CPU
HEADS = ["SOLOHead", "DecoupledSOLOHead", "DecoupledSOLOLightHead", "SOLOv2Head"]


@pytest.fixture(scope="module")
def calibration():
    return solo.utils.benchmark_calibration


@pytest.fixture(scope="module")
def benchmark():
    return load_script("tools/benchmark.py", "benchmark")


@pytest.fixture(scope="module")
def jobs():
    """The measuring side (solo.utils.benchmark_jobs): what runs in each measuring process."""
    return solo.utils.benchmark_jobs


@pytest.fixture
def small_mask_rcnn(jobs, monkeypatch):
    """Mask R-CNN's ROI heads cost the same at any input size (1000 proposals, 100 masks);
    fewer of both keep the test fast without changing what is reported."""
    build_cfg = jobs.build_cfg

    def build_small_cfg(job):
        cfg = build_cfg(job)
        if job.model == "mask_rcnn":
            cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
            cfg.TEST.DETECTIONS_PER_IMAGE = 5
        return cfg

    monkeypatch.setattr(jobs, "build_cfg", build_small_cfg)


def run(benchmark, tmp_path, *args):
    out = tmp_path / "bench.json"
    common = ["--config-file", str(REPO_ROOT / TINY_CONFIG), "--input-size", "96", "128"]
    common += ["--repeats", "1", "--warmup", "0", "--threads", "1", "--in-process"]
    returned = benchmark.main([*common, "--json", str(out), *args])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["schema_version"] == benchmark.SCHEMA_VERSION and report["input_size"] == [
        96,
        128,
    ]
    machine = report["machine"]
    assert machine["threads"] == 1 and machine["device"] == "cpu" and machine["cpu_model"]
    for model in report["models"].values():
        if "error" in model:
            continue
        memory = model["memory_mb"]
        assert memory["kind"] == "rss" and memory["peak"] > 0
        assert memory["peak_minus_before_model"] == pytest.approx(
            memory["peak"] - memory["before_model"], abs=0.2
        )
    return report


def test_inference_report_times_calibrated_models_and_reads_postprocess_stages(
    benchmark, small_mask_rcnn, tmp_path, capsys
):
    report = run(benchmark, tmp_path, "--task", "inference", "--compare", "mask_rcnn")
    printed = capsys.readouterr().out
    assert "ours / mask_rcnn" in printed and "timed alternately in one process" in printed
    assert "candidate mask products alone" in printed
    paired = report["postprocess_paired"]  # both post-processings alternated in one process
    assert paired["pairs"] == 1
    assert set(paired["ms"]) == {"ours", "mask_rcnn", "ours_mask_products"}
    one_pair = paired["ms"]["ours"]["median"] / paired["ms"]["mask_rcnn"]["median"]
    assert paired["ratio"]["median"] == pytest.approx(one_pair, rel=2e-3)
    assert paired["ratios"]["ours"] == paired["ratio"]
    products = paired["ms"]["ours_mask_products"]["median"] / paired["ms"]["mask_rcnn"]["median"]
    assert paired["ratios"]["ours_mask_products"]["median"] == pytest.approx(products, rel=2e-3)
    cells = paired["ours_mask_products_cells"]
    assert cells > 0 and f"mask probabilities of the {cells} distinct candidate cells" in printed
    assert set(report["models"]) == {"ours", "mask_rcnn"}
    assert report["conv_probe"]["gflops_per_s"] > 0
    for model in report["models"].values():
        latency = model["latency_ms"]
        assert set(latency) == {*solo.utils.benchmark_jobs.INFERENCE_PARTS, "parts_sum"}
        assert all(0 < latency[p]["min"] <= latency[p]["median"] for p in latency)
        assert model["calibration"]["calibrated"] and model["calibration"]["instances_out"] > 0
        flops = model["flops"]
        assert flops["backbone_gflops"] > 0 and flops["head_gflops"] > 0
        assert flops["floor_ms"] > 0 and flops["efficiency"] > 0
    ours, other = report["models"]["ours"], report["models"]["mask_rcnn"]
    # Stage times come from the post-processor's profiler ranges: all four, inside the part.
    stages = ours["postprocess_stages_ms"]
    assert set(stages) == set(POSTPROCESS_STAGES) and all(v > 0 for v in stages.values())
    assert sum(stages.values()) < 3 * ours["latency_ms"]["postprocess"]["median"]
    nms_pre = ours["calibration"]["nms_pre"]
    assert nms_pre * 0.9 <= ours["calibration"]["candidates_before_nms"] <= nms_pre
    assert other["calibration"]["score_thresh_test"] == 0.0
    assert other["postprocess_stages_ms"] is None
    expected = ours["latency_ms"]["total"]["median"] / other["latency_ms"]["total"]["median"]
    assert report["ratio"] == pytest.approx(expected, rel=1e-3)
    assert report["ratios"]["latency_ms.total.median"] == report["ratio"]
    assert report["ratios"]["memory_mb.peak"] == pytest.approx(
        ours["memory_mb"]["peak"] / other["memory_mb"]["peak"], rel=1e-3
    )


def test_paired_times_alternate_the_calls_and_take_the_ratio_pair_by_pair(monkeypatch):
    """A B (warm-up), then A B, B A, A B: each pair's ratio from its own two calls."""
    import solo.utils.measure as measure

    clock, order = [0.0], []
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def call(name, seconds):
        def run():
            order.append(name)
            clock[0] += seconds.pop(0) if seconds else 1.0

        return run

    a = call("a", [9.0, 2.0, 4.0, 3.0])  # warm-up, then three timed calls
    b = call("b", [9.0, 1.0, 1.0, 2.0])
    result = measure.paired_times({"a": a, "b": b}, warmup=1, repeats=3, cuda=False)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert result["pairs"] == 3 and result["ms"]["a"]["median"] == 3000.0
    assert result["ratio"] == {"median": 2.0, "min": 1.5, "max": 4.0}
    assert result["ratios"] == {"a": result["ratio"]}


def test_paired_times_with_three_calls_reverse_the_order_each_round_and_divide_by_the_second(
    monkeypatch,
):
    import solo.utils.measure as measure

    clock, order = [0.0], []
    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])

    def call(name, seconds):
        def run():
            order.append(name)
            clock[0] += seconds.pop(0)

        return run

    calls = {
        "a": call("a", [9.0, 2.0, 6.0]),
        "b": call("b", [9.0, 1.0, 2.0]),
        "c": call("c", [9.0, 0.5, 3.0]),
    }
    result = measure.paired_times(calls, warmup=1, repeats=2, cuda=False)
    assert order == ["a", "b", "c", "a", "b", "c", "c", "b", "a"]
    assert result["ratio"] == result["ratios"]["a"] == {"median": 2.5, "min": 2.0, "max": 3.0}
    assert result["ratios"]["c"] == {"median": 1.0, "min": 0.5, "max": 1.5}
    assert "b" not in result["ratios"]
    with pytest.raises(ValueError, match="two calls or more"):
        measure.paired_times({"a": calls["a"]}, warmup=1, repeats=1, cuda=False)
    for repeats, warmup in ((0, 1), (1, -1)):
        with pytest.raises(ValueError, match="repeats >= 1 and warmup >= 0"):
            measure.paired_times(calls, warmup=warmup, repeats=repeats, cuda=False)


@pytest.mark.parametrize("head_name", ["SOLOv2Head", "SOLOHead"])
@pytest.mark.parametrize("chunk_size", [10_000, 7])
def test_candidate_mask_products_make_the_post_processors_calls_of_its_candidate_cells(
    head_name, chunk_size
):
    """The benchmark's products call makes the post-processor's own mask_probs calls for its
    candidates, chunk by chunk (all but the final instances' recomputation after several)."""
    cfg = tiny_cfg(head_name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    post = model.postprocessor
    post.chunk_size = chunk_size
    batched = [{"image": solo.utils.benchmark_jobs.make_image(96, 128, seed=0)}]
    with torch.no_grad():
        images = model.preprocess_image(batched)
        features = model.backbone(images.tensor)
        outputs = model.head([features[f] for f in model.head_in_features])
    padded = tuple(images.tensor.shape[-2:])
    calls = []

    def mask_probs(image, levels, cells, size, out=None):
        assert out is not None and len(out) == len(cells)
        calls.append((image, tuple(size), levels.tolist(), cells.tolist()))
        return model.head.inference_mask_probs(outputs, image, levels, cells, size, out=out)

    scores = solo.modeling.postprocess.grid_scores(outputs.cate_logits)[0]
    # About half the cells pass, several classes for many of them.
    post.score_thresh = float(scores.max(dim=1).values.median())
    products = solo.utils.benchmark_parts.candidate_mask_products(post, outputs, mask_probs, padded)
    with torch.no_grad():
        count = products()
        ours = list(calls)
        calls.clear()
        (result,) = post(outputs.cate_logits, mask_probs, padded, images.image_sizes, [(96, 128)])
    # After several chunks, a last call recomputes the final instances' rows (if any).
    recomputed = len(ours) > 1 and len(result) > 0
    assert ours == (calls[:-1] if recomputed else calls)
    distinct = set((scores > post.score_thresh).nonzero()[:, 0].tolist())
    assert count == len(distinct) == sum(len(c[3]) for c in ours) > 7
    assert (len(ours) > 1) == (chunk_size == 7)


def test_several_runtimes_are_timed_in_one_run_next_to_eager_with_the_same_instances(
    benchmark, tmp_path
):
    pytest.importorskip("onnxruntime")
    runtimes = ["torchscript", "onnxruntime"]
    # "pytorch" (eager) is always measured; naming it or a runtime twice changes nothing.
    # The exported graphs hold K0 = 450 candidates (more than the 400 that reach NMS: exact).
    report = run(benchmark, tmp_path, "--task", "inference", "--runtime", "pytorch", *runtimes,
                 "torchscript", "--max-candidates", "450",
                 "MODEL.SOLO.NMS_PRE", "400")  # fmt: skip
    assert report["runtimes"] == runtimes and report["opts"] == ["MODEL.SOLO.NMS_PRE", "400"]
    assert report["max_candidates"] == 450
    assert set(report["models"]) == {"ours", *(f"ours_{r}" for r in runtimes)}
    eager = report["models"]["ours"]
    assert eager["calibration"]["nms_pre"] == 400
    for runtime in runtimes:
        exported = report["models"][f"ours_{runtime}"]
        assert exported["runtime"] == runtime and exported["export_file_mb"] > 0
        # The exported graph sees the same calibrated weights: the same number of instances out.
        assert exported["calibration"]["instances_out"] == eager["calibration"]["instances_out"] > 0
        assert exported["calibration"]["candidates"] <= exported["calibration"]["max_candidates"]
        total = exported["latency_ms"]["total"]["median"]
        expected = total / eager["latency_ms"]["total"]["median"]
        assert report["runtime_ratios"][runtime] == pytest.approx(expected, rel=1e-3)
        assert exported["calibration"]["max_candidates"] == 450
    assert report["ratio"] is None
    # Every other runtime next to float ONNX Runtime (the INT8 goal's yardstick).
    models = report["models"]
    expected = (
        models["ours_torchscript"]["latency_ms"]["total"]["median"]
        / models["ours_onnxruntime"]["latency_ms"]["total"]["median"]
    )
    eager = models["ours"]["latency_ms"]["total"]["median"]
    assert report["onnxruntime_ratios"] == {
        "pytorch": pytest.approx(
            eager / models["ours_onnxruntime"]["latency_ms"]["total"]["median"], rel=1e-3
        ),
        "torchscript": pytest.approx(expected, rel=1e-3),
    }
    assert not any(models[f"ours_{r}"]["calibration"]["candidates_over_k0"] for r in runtimes)


def test_an_exported_graph_with_fewer_candidates_than_the_image_is_flagged(
    benchmark, tmp_path, capsys
):
    """K0 below the image's candidate count: the graph does less work than eager; the report
    says so (JSON and a printed note naming the K0 to use) instead of a bare ratio."""
    report = run(benchmark, tmp_path, "--task", "inference", "--runtime", "torchscript",
                 "--max-candidates", "40", "MODEL.SOLO.NMS_PRE", "300")  # fmt: skip
    eager = report["models"]["ours"]["calibration"]
    exported = report["models"]["ours_torchscript"]["calibration"]
    assert eager["candidates"] > 40 and exported["candidates"] == eager["candidates"]
    assert exported["candidates_over_k0"] is True and exported["candidates_before_nms"] == 40
    note = capsys.readouterr().out
    assert "more than the exported graphs' K0 = 40" in note
    assert f"Use --max-candidates {exported['candidates']} or more" in note


def test_report_names_the_default_k0_of_the_exported_graphs(benchmark, tmp_path):
    report = run(benchmark, tmp_path, "--task", "inference", "--runtime", "torchscript",
                 "MODEL.SOLO.NMS_PRE", "300")  # fmt: skip
    assert report["max_candidates"] == 300
    assert report["onnxruntime_ratios"] is None  # no float ONNX Runtime measured
    assert report["postprocess_paired"] is None  # nothing compared


def test_a_flop_count_failure_keeps_the_timings_and_says_why(benchmark, tmp_path, monkeypatch):
    def failing_tracer(*args):
        raise RuntimeError("tracer failed")

    monkeypatch.setattr(solo.utils.benchmark_parts, "count_gflops", failing_tracer)
    report = run(benchmark, tmp_path, "--task", "inference")
    ours = report["models"]["ours"]
    assert ours["flops"] == {"error": "RuntimeError: tracer failed"}
    assert ours["latency_ms"]["total"]["median"] > 0


def test_a_failed_export_is_reported_and_keeps_the_eager_figures(benchmark, tmp_path, monkeypatch):
    def failing_export(*args):
        raise ValueError("cannot export this model")

    monkeypatch.setattr(solo.utils.benchmark_jobs, "run_exported", failing_export)
    report = run(benchmark, tmp_path, "--task", "inference", "--runtime", "torchscript")
    assert "cannot export this model" in report["models"]["ours_torchscript"]["error"]
    assert report["runtime_ratios"] == {"torchscript": None}
    assert report["models"]["ours"]["latency_ms"]["total"]["median"] > 0


def test_masks_both_measures_dense_and_cropped_masks_in_their_own_runs(benchmark, tmp_path):
    report = run(benchmark, tmp_path, "--task", "inference", "--masks", "both")
    dense, cropped = report["models"]["ours"], report["models"]["ours_cropped"]
    assert "TEST.MASK_FORMAT cropped" in cropped["head"] and "bitmask" in dense["head"]
    assert cropped["calibration"]["instances_out"] == dense["calibration"]["instances_out"] > 0
    ratios = report["masks_ratios"]
    assert ratios["memory_mb.peak"] == pytest.approx(
        cropped["memory_mb"]["peak"] / dense["memory_mb"]["peak"], rel=1e-3
    )
    assert ratios["latency_ms.total.median"] > 0 and report["masks"] == "both"
    with pytest.raises(SystemExit, match="concerns inference only"):
        benchmark.main(["--config-file", TINY_CONFIG, "--task", "train", "--masks", "cropped"])


def test_runtime_other_than_pytorch_is_refused_outside_inference(benchmark):
    with pytest.raises(SystemExit, match="times inference only"):
        benchmark.main(
            ["--config-file", TINY_CONFIG, "--task", "train", "--runtime", "onnxruntime"]
        )


def test_train_report_times_the_step_and_the_target_assignment(benchmark, tmp_path):
    report = run(
        benchmark, tmp_path, "--task", "train", "--batch-size", "1", "--instances-per-image", "5"
    )
    assert report["ratio"] is None and set(report["models"]) == {"ours"}
    ours = report["models"]["ours"]
    assert ours["iter_s"]["median"] > 0 and ours["targets_ms"]["median"] > 0
    assert 0 < ours["targets_share"] < 1
    assert set(ours["losses"]) == {"loss_cate", "loss_mask"}
    assert all(math.isfinite(v) for v in ours["losses"].values())
    assert any(k.startswith("solo/num_pos") for k in ours["event_scalars"])


def test_train_inputs_are_random_shapes_with_tight_boxes(benchmark):
    batch = solo.utils.benchmark_jobs.train_inputs((64, 96), 2, 7, 0, num_classes=3)
    assert [tuple(x["image"].shape) for x in batch] == [(3, 64, 96)] * 2
    for x in batch:
        inst = x["instances"]
        masks = inst.gt_masks.tensor
        assert len(inst) == 7 and masks.flatten(1).sum(1).min() > 0
        assert inst.gt_classes.min() >= 0 and inst.gt_classes.max() < 3
        ys, xs = torch.nonzero(masks[0], as_tuple=True)
        box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert inst.gt_boxes.tensor[0].tolist() == [float(v) for v in box]
    assert not torch.equal(
        batch[0]["instances"].gt_masks.tensor, batch[1]["instances"].gt_masks.tensor
    )


def test_data_report_uses_detectron2_data_loader_benchmark(benchmark, tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog

    from solo.data import register_shapes_datasets

    name = "shapes_benchmark_smoke"
    register_shapes_datasets(
        root=str(tmp_path / "shapes"), splits={name: {"num_images": 4, "seed": 0}}
    )
    monkeypatch.setattr(solo.utils.benchmark_jobs, "train_dataset_names", lambda cfg: [name])
    try:
        report = run(benchmark, tmp_path, "--task", "data", "--batch-size", "2", "--repeats", "2")
    finally:
        DatasetCatalog.remove(name)
    ours = report["models"]["ours"]
    assert ours["dataset"] == [name] and ours["mapper"] == "SOLODatasetMapper"
    assert ours["images_per_s"] > 0
    for key in ("dataset_s", "mapper_s", "loader_batch_s"):
        assert 0 < ours[key]["min"] <= ours[key]["median"]
    # Mapping (read, augment, masks) costs more than handing out a record.
    assert ours["mapper_s"]["median"] > ours["dataset_s"]["median"]


def test_mask_rcnn_data_loading_uses_our_input_pipeline(benchmark):
    """Same resizing, augmentation, mask format and workers: the loaders differ only by mapper."""
    config = str(REPO_ROOT / TINY_CONFIG)
    job = solo.utils.benchmark_jobs.Job(
        "mask_rcnn", "data", config, (), "cpu", 1, (64, 96), 2, 1, 0, 5, 0, None
    )
    ours = solo.utils.benchmark_jobs.build_cfg(dataclasses.replace(job, model="ours"))
    cfg = solo.utils.benchmark_jobs.build_cfg(job)
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert cfg.INPUT == ours.INPUT and cfg.DATALOADER == ours.DATALOADER
    assert cfg.INPUT.MIN_SIZE_TRAIN == (128,) and cfg.INPUT.MASK_FORMAT == "bitmask"


def test_command_line_measures_in_a_spawned_process(tmp_path):
    """The default path: the tool as a script, each model measured in a fresh process."""
    out = tmp_path / "bench.json"
    args = ["--config-file", TINY_CONFIG, "--task", "train", "--input-size", "64", "96"]
    args += ["--batch-size", "1", "--instances-per-image", "3", "--repeats", "1", "--warmup", "0"]
    subprocess.run(
        [sys.executable, "tools/benchmark.py", *args, "--json", str(out)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 2 and report["models"]["ours"]["iter_s"]["min"] > 0


def test_device_cuda_without_cuda_is_refused_with_the_reason(benchmark, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="CUDA is not available"):
        benchmark.main(["--config-file", TINY_CONFIG, "--device", "cuda"])


def test_gpu_check_without_cuda_says_so_and_fails(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--output", str(tmp_path / "gpu.json")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr
    assert not (tmp_path / "gpu.json").exists()


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------


def test_point_nms_survivors_are_the_cells_point_nms_keeps(calibration):
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn((1, 4, s, s), generator=gen) * 3 for s in (8, 5)]
    survivors = calibration.point_nms_survivors(logits)
    kept = sum((points_nms(x.sigmoid()) > 0).flatten(2).sum(2)[0] for x in logits)
    assert survivors.isfinite().sum(1).tolist() == kept.tolist()
    values = survivors.masked_fill(~survivors.isfinite(), -1e9)
    assert torch.equal(values, values.sort(dim=1, descending=True).values)


@pytest.mark.parametrize("target", [7, 40, 1000])
def test_class_calibration_spreads_the_target_over_the_classes_within_the_score_range(
    calibration, target
):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn((6, 50), generator=gen, dtype=torch.float64).sort(1, descending=True).values
    z[2, 30:] = -math.inf  # fewer survivors in one class
    bias = torch.randn(6, generator=gen)
    survivors = z + bias.double()[:, None]
    scales, biases = calibration.class_calibration(survivors, bias, 0.1, target)
    scores = torch.sigmoid(z * scales[:, None] + biases[:, None])
    above = (scores > 0.1).sum(1)
    available = z.isfinite().sum(1)
    fair = torch.tensor([target // 6 + (c < target % 6) for c in range(6)])
    assert torch.equal(above, torch.minimum(fair, available))
    assert scores.max() <= calibration.CATE_SCORE_MAX + 1e-9


def mask_coverage(model, image):
    """Fraction of the image above 0.5 for every mask of level 0, at stride 4."""
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        outputs = model.head([features[f] for f in model.head_in_features])
        cells = torch.arange(model.head.num_grids[0] ** 2)
        levels = torch.zeros_like(cells)
        size = tuple(s // 4 for s in images.tensor.shape[-2:])
        probs = model.head.inference_mask_probs(outputs, 0, levels, cells, size)
    return (probs > 0.5).flatten(1).float().mean(1)


@pytest.mark.parametrize("head_name", ["SOLOHead", "DecoupledSOLOHead"])
def test_calibrated_v1_and_decoupled_masks_cover_the_configured_fraction(
    calibration, benchmark, head_name
):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(head_name)).eval()
    image = solo.utils.benchmark_jobs.make_image(96, 128, seed=0)
    before = mask_coverage(model, image)
    with torch.no_grad():
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        outputs = model.head([features[f] for f in model.head_in_features])
        assert calibration.calibrate_masks(model.head, outputs)
    after = mask_coverage(model, image)
    # Random weights: masks near 0.5 everywhere, either (almost) empty or (almost) full.
    assert ((before - calibration.MASK_COVERAGE).abs() > 0.1).float().mean() > 0.5
    assert after.median() == pytest.approx(calibration.MASK_COVERAGE, abs=0.1)


@pytest.mark.parametrize("head_name", HEADS)
def test_calibrated_model_sends_nms_pre_candidates_to_nms(calibration, benchmark, head_name):
    cfg = tiny_cfg(head_name, opts=["MODEL.SOLO.NMS_PRE", 60])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batched = [{"image": solo.utils.benchmark_jobs.make_image(128, 160, seed=0)}]
    with torch.no_grad():
        before, _ = calibration.count_candidates(model, batched)
    result = calibration.calibrate_solo(model, batched)
    assert before < 0.5 * 60  # random weights: few confident cells
    assert result["candidates_before_nms"] == min(result["candidates"], 60) >= 0.95 * 60
    assert result["instances_out"] > 10
    with torch.no_grad():
        (out,) = model(batched)
    scores = out["instances"].scores
    assert len(scores) == result["instances_out"] and scores.max() <= calibration.CATE_SCORE_MAX
    assert len(out["instances"].pred_classes.unique()) > 1  # spread over the classes


def test_object_masks_make_solov2_masks_object_sized_instead_of_image_wide_fields(
    calibration, benchmark
):
    cfg = tiny_cfg("SOLOv2Head", opts=["MODEL.SOLO.NMS_PRE", 60])
    batched = [{"image": solo.utils.benchmark_jobs.make_image(128, 160, seed=0)}]
    reports, models = {}, {}
    for extent in calibration.MASK_EXTENTS:
        torch.manual_seed(0)
        models[extent] = build_model(cfg).eval()
        reports[extent] = calibration.calibrate_solo(models[extent], batched, extent)
    objects, fields = reports["objects"]["output_masks"], reports["image"]["output_masks"]
    assert reports["objects"]["candidates_before_nms"] >= 0.95 * 60
    assert objects["instances"] > 10 and fields["instances"] > 10
    # An ellipse with axes at most OBJECT_SIDES[1] of the sides covers <= pi/4 * 0.4^2 ~ 0.126.
    assert 0 < objects["min_area_fraction"] and objects["max_area_fraction"] < 0.13
    assert fields["mean_area_fraction"] > 2 * objects["mean_area_fraction"]
    # The hook stays on the head: a later inference gives the same object-sized masks.
    assert calibration.mask_extent_report(models["objects"], batched) == objects


def test_object_masks_leave_solo_v1_and_decoupled_masks_to_their_coverage_calibration(
    calibration,
):
    model = build_model(tiny_cfg("DecoupledSOLOHead")).eval()
    assert calibration.add_object_masks(model, (96, 128)) is None


@pytest.mark.parametrize("thresh", ["0.9", "0.99", "0.0"])
def test_a_score_threshold_the_calibration_cannot_reach_is_refused(benchmark, calibration, thresh):
    """Random weights are calibrated to scores in (SCORE_THRESH, CATE_SCORE_MAX]: at or above
    0.9 no candidate (or, reversed, every pair) would pass; 0 is not a threshold."""
    opts = ["MODEL.SOLO.SCORE_THRESH", thresh]
    with pytest.raises(SystemExit, match=f"SCORE_THRESH {float(thresh)}.*must lie in"):
        benchmark.main(["--config-file", TINY_CONFIG, *opts])
    model = build_model(tiny_cfg("SOLOv2Head", opts=opts)).eval()
    batched = [{"image": solo.utils.benchmark_jobs.make_image(64, 64, seed=0)}]
    with pytest.raises(ValueError, match="cannot be calibrated"):
        calibration.calibrate_solo(model, batched)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mask-extent", "objects", "--runtime", "onnxruntime"], "hook that an exported graph"),
        (["--task", "train", "--mask-extent", "image"], "concerns inference only"),
    ],
    ids=["objects_with_runtime", "train"],
)
def test_mask_extent_is_refused_where_it_cannot_apply(benchmark, args, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.main(["--config-file", TINY_CONFIG, *args])


def test_trained_weights_are_timed_as_they_are_on_a_real_image(benchmark, tmp_path):
    """MODEL.WEIGHTS among the overrides: the checkpoint is loaded (strictly) and timed without
    calibration, on the --image given; the report's counts are that model's own."""
    import cv2

    cfg = solo.utils.benchmark_parts.benchmark_cfg(
        "ours", "inference", str(REPO_ROOT / TINY_CONFIG), [], "cpu"
    )
    torch.manual_seed(3)
    model = build_model(cfg).eval()
    force_candidates(model)  # instances to count (random weights give none)
    weights = tmp_path / "model.pth"
    torch.save({"model": model.state_dict()}, weights)
    image = solo.utils.benchmark_jobs.make_image(96, 128, seed=5)
    path = tmp_path / "image.png"
    cv2.imwrite(str(path), image.permute(1, 2, 0).numpy()[:, :, ::-1])  # RGB config: BGR file
    report = run(benchmark, tmp_path, "--task", "inference", "--image", str(path),
                 "MODEL.WEIGHTS", str(weights))  # fmt: skip
    ours = report["models"]["ours"]
    with EventStorage() as storage:
        with torch.no_grad():
            (out,) = model([{"image": image, "height": 96, "width": 128}])
        candidates = storage.histories()["solo/num_candidates"].latest()
    assert ours["calibration"]["calibrated"] is False
    assert ours["calibration"]["weights"] == str(weights)
    assert ours["calibration"]["instances_out"] == len(out["instances"]) > 0
    assert ours["calibration"]["candidates"] == round(candidates)
    assert report["image"] == str(path) and report["mask_extent"] is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "--image missing.png: no such file"),
        (["--image", "configs"], "--image configs: a directory"),
        (["--image", TINY_CONFIG], "not a readable image"),
        (["--task", "train", "--image", TINY_CONFIG], "concerns inference only"),
        (["--mask-extent", "image", "MODEL.WEIGHTS", TINY_CONFIG], "timed as it is"),
        (["MODEL.WEIGHTS", "missing.pth"], "MODEL.WEIGHTS missing.pth: no such file"),
        (["--task", "data", "MODEL.WEIGHTS", "m.pth"], "timed in inference only"),
        (["--max-candidates", "100"], "it needs an exported runtime"),
        (["--runtime", "pytorch", "--max-candidates", "100"], "eager PyTorch .pytorch. has no K0"),
        (["--runtime", "onnxruntime", "--max-candidates", "0"], "must be >= 1, got 0"),
    ],
    ids=[
        "missing_image", "directory", "not_an_image", "image_for_training",
        "mask_extent_with_weights", "missing_weights", "weights_for_data",
        "max_candidates_without_runtime", "max_candidates_with_pytorch", "max_candidates_zero",
    ],
)  # fmt: skip
def test_image_weights_and_k0_options_are_refused_where_they_cannot_apply(benchmark, args, message):
    with pytest.raises(SystemExit, match=message):
        benchmark.main(["--config-file", TINY_CONFIG, *args])


def test_lazyconfig_files_are_refused_by_the_benchmark_and_the_export_tool():
    config = "configs/Shapes/SOLOv2_R18.py"
    benchmark = load_script("tools/benchmark.py", "benchmark_lazy")
    with pytest.raises(SystemExit, match="is a LazyConfig .Python. file; the benchmark reads YAML"):
        benchmark.main(["--config-file", config])
    export = load_script("tools/export_model.py", "export_lazy")
    with pytest.raises(SystemExit, match="is a LazyConfig .Python. file.*solo.export.export_model"):
        export.main(["--config-file", config, "--format", "onnx", "--output", "unused"])


def test_trained_weights_for_training_are_refused_naming_the_task():
    config = str(REPO_ROOT / TINY_CONFIG)
    with pytest.raises(ValueError, match="trained weights are timed in inference only"):
        solo.utils.benchmark_parts.benchmark_cfg(
            "ours", "train", config, ["MODEL.WEIGHTS", "model.pth"], "cpu"
        )
    # A config file's own MODEL.WEIGHTS (an ImageNet initialisation) is not loaded.
    cfg = solo.utils.benchmark_parts.benchmark_cfg(
        "ours", "train", str(REPO_ROOT / "configs/SOLOv2/R50_3x.yaml"), [], "cpu"
    )
    assert cfg.MODEL.WEIGHTS == ""


def test_benchmark_refuses_test_time_augmentation_instead_of_timing_one_view():
    config = str(REPO_ROOT / "configs/Shapes/SOLOv2_R18.yaml")
    with pytest.raises(ValueError, match="TEST.AUG.ENABLED True: the benchmark times single-view"):
        solo.utils.benchmark_parts.benchmark_cfg(
            "ours", "inference", config, ["TEST.AUG.ENABLED", "True"], "cpu"
        )
    cfg = solo.utils.benchmark_parts.benchmark_cfg("ours", "inference", config, [], "cpu")
    assert not cfg.TEST.AUG.ENABLED and cfg.MODEL.WEIGHTS == ""


@pytest.mark.parametrize("where", ["benchmark", "tta"])
def test_16bit_gray_images_are_read_through_the_project_reader_not_clipped_white(
    where, tmp_path, monkeypatch
):
    """--image and test-time augmentation of inputs given by file name read the file like
    training and the demo do (solo.data.image_io: a 16-bit range stretched to 8 bits), not with
    Detectron2's reader, which clips every such pixel to 255."""
    import numpy as np
    import cv2

    import solo.modeling.test_time_augmentation as tta
    from solo.data.image_io import read_image

    gen = np.random.default_rng(0)
    pixels = gen.integers(0, 4096, size=(40, 56), dtype=np.uint16)  # a 12-bit sensor's range
    path = str(tmp_path / "gray16.png")
    cv2.imwrite(path, pixels)
    expected = read_image(path, "BGR")
    assert len(np.unique(expected)) > 100  # stretched, not one flat plane
    if where == "benchmark":
        image = solo.utils.benchmark_parts.benchmark_image(path, "BGR", (40, 56))
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected)
    else:
        with_tta = tta.SOLOWithTTA.__new__(tta.SOLOWithTTA)  # only _with_image runs here
        with_tta.__dict__["model"] = dataclasses.make_dataclass("M", ["input_format"])("BGR")
        inputs = with_tta._with_image({"file_name": path})
        assert np.array_equal(inputs["image"].permute(1, 2, 0).numpy(), expected)
        assert (inputs["height"], inputs["width"]) == (40, 56)
