"""Smoke test of tools/benchmark.py: its JSON report on a tiny input, 1 repeat, in-process."""

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_script

TINY_CONFIG = "configs/Shapes/SOLOv2_R18.yaml"  # R-18 GN, small head: fast on CPU


@pytest.fixture(scope="module")
def benchmark():
    return load_script("tools/benchmark.py", "benchmark")


@pytest.fixture
def small_mask_rcnn(benchmark, monkeypatch):
    """Mask R-CNN's ROI heads cost the same at any input size (1000 proposals, 100 masks);
    fewer of both keep the smoke test fast without changing what is reported."""
    build_cfg = benchmark.build_cfg

    def build_small_cfg(job):
        cfg = build_cfg(job)
        if job["model"] == "mask_rcnn":
            cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 50
            cfg.TEST.DETECTIONS_PER_IMAGE = 5
        return cfg

    monkeypatch.setattr(benchmark, "build_cfg", build_small_cfg)


def run(benchmark, tmp_path, *args):
    out = tmp_path / "bench.json"
    common = ["--config-file", str(REPO_ROOT / TINY_CONFIG), "--input-size", "96", "128"]
    common += ["--repeats", "1", "--warmup", "0", "--threads", "1", "--in-process"]
    returned = benchmark.main([*common, "--json", str(out), *args])
    report = json.loads(out.read_text())
    assert report == json.loads(json.dumps(returned))
    assert report["schema_version"] == 1
    assert report["input_size"] == [96, 128]
    machine = report["machine"]
    assert machine["threads"] == 1 and machine["device"] == "cpu" and machine["cpu_model"]
    assert machine["torch"] and machine["detectron2"]
    for model in report["models"].values():
        memory = model["memory_mb"]
        assert memory["kind"] == "rss" and memory["peak"] > 0
        assert memory["peak_minus_before_model"] == pytest.approx(
            memory["peak"] - memory["before_model"], abs=0.2
        )
    return report


def test_inference_report_with_mask_rcnn(benchmark, small_mask_rcnn, tmp_path, capsys):
    report = run(benchmark, tmp_path, "--task", "inference", "--compare", "mask_rcnn")
    assert "ours / mask_rcnn" in capsys.readouterr().out
    assert set(report["models"]) == {"ours", "mask_rcnn"}
    assert report["conv_probe"]["gflops_per_s"] > 0
    for name, model in report["models"].items():
        latency = model["latency_ms"]
        extra = {"postprocess_mask_products"} if name == "ours" else set()
        assert set(latency) == {*benchmark.INFERENCE_PARTS, "parts_sum", *extra}
        assert all(latency[p]["min"] <= latency[p]["median"] for p in latency)
        assert model["calibrated"] is True and model["instances_out"] > 0
        flops = model["flops"]
        assert flops["backbone_gflops"] > 0 and flops["head_gflops"] > 0
        assert flops["floor_ms"] > 0 and flops["efficiency"] > 0
        assert set(flops["per_part"]) == {"backbone", "head"}
    ours, other = report["models"]["ours"], report["models"]["mask_rcnn"]
    # The candidates' mask predictions are timed inside post-processing: a real, smaller part.
    products = ours["latency_ms"]["postprocess_mask_products"]["median"]
    assert 0 < products < ours["latency_ms"]["postprocess"]["median"]
    assert 0 < ours["candidates_before_nms"] <= 500
    assert report["candidates_before_nms"] == ours["candidates_before_nms"]
    assert report["calibrated"] is True and report["instances_out"] == ours["instances_out"]
    assert other["calibration"]["score_thresh_test"] == 0.0
    expected = ours["latency_ms"]["total"]["median"] / other["latency_ms"]["total"]["median"]
    assert report["ratio"] == pytest.approx(expected, rel=1e-3)
    assert report["ratios"]["total"] == report["ratio"]


def test_train_report(benchmark, tmp_path):
    report = run(
        benchmark, tmp_path, "--task", "train", "--batch-size", "1", "--instances-per-image", "5"
    )
    assert report["ratio"] is None and set(report["models"]) == {"ours"}
    ours = report["models"]["ours"]
    assert ours["iter_s"]["median"] > 0 and ours["targets_ms"]["median"] > 0
    assert 0 < ours["targets_share"] < 1
    assert set(ours["losses"]) == {"loss_cate", "loss_mask"}


def test_data_report(benchmark, tmp_path, monkeypatch):
    from detectron2.data import DatasetCatalog

    from solo.data import register_shapes_datasets

    name = "shapes_benchmark_smoke"
    register_shapes_datasets(
        root=str(tmp_path / "shapes"), splits={name: {"num_images": 4, "seed": 0}}
    )
    monkeypatch.setattr(benchmark, "dataset_for", lambda cfg: [name])
    try:
        report = run(benchmark, tmp_path, "--task", "data", "--batch-size", "2")
    finally:
        DatasetCatalog.remove(name)
    ours = report["models"]["ours"]
    assert ours["dataset"] == [name] and ours["images_per_s"] > 0
    assert ours["batch_s"]["median"] > 0


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
        timeout=120,
    )
    report = json.loads(out.read_text())
    assert report["machine"]["threads"] == 2 and report["models"]["ours"]["iter_s"]["min"] > 0
