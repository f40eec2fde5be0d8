"""Exported ONNX files run by OpenVINO (``ExportedModel(runtime="openvino")``) against eager
inference, CPU."""

import json
import numpy as np
import pytest
import torch

from helpers import (
    HEADS,
    REPO_ROOT,
    build,
    load_script,
    random_image,
    spread_scores_model,
    tied_scores_model,
    tiny_cfg,
)
from solo.export import ExportedModel, ExportError, compare_predictions, export_model
from solo.export.openvino import _stable_top_k

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[export])")
openvino = pytest.importorskip(
    "openvino", reason="openvino is not installed (pip install -e .[export])"
)

# Export size, then two other input sizes with their requested output sizes.
SIZES = [((97, 133), (97, 133)), ((160, 96), (160, 96)), ((64, 200), (128, 400))]
# K0 above the ~600 candidates a forced tiny model has, so that the export is exact.
LARGE_K0 = 1500


def cpu_has(capability):
    return capability in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.mark.parametrize("head_name", HEADS)
def test_openvino_f32_equals_eager_at_three_sizes(head_name, tmp_path):
    model = spread_scores_model(head_name)
    path = export_model(
        model,
        "onnx",
        str(tmp_path),
        sample_image=random_image(SIZES[0][0], 0),
        max_candidates=LARGE_K0,
    )
    exported = ExportedModel(path, runtime="openvino")
    assert exported.runtime == "openvino" and exported.precision == "f32"
    for seed, (size, (out_h, out_w)) in enumerate(SIZES):
        inputs = [{"image": random_image(size, seed + 20), "height": out_h, "width": out_w}]
        with torch.no_grad():
            (expected,) = [r["instances"] for r in model(inputs)]
        (actual,) = [r["instances"] for r in exported(inputs)]
        assert len(expected) > 0, "nothing to compare: the test model predicts no instance"
        assert actual.image_size == (out_h, out_w)
        assert actual.pred_masks.dtype == torch.bool and actual.pred_classes.dtype == torch.int64
        # Same instances and classes in order, scores within 1e-3, masks up to boundary pixels.
        assert compare_predictions(expected, actual, score_atol=1e-3) == []
        assert exported.last_num_candidates[0] <= LARGE_K0


def test_openvino_ranks_exact_ties_as_eager(tmp_path):
    """Tied scores in the eager order: OpenVINO's TopK from ONNX breaks ties by index too."""
    model = tied_scores_model("SOLOv2Head")
    sample = random_image(SIZES[0][0], 0)
    path = export_model(model, "onnx", str(tmp_path), sample_image=sample, max_candidates=5000)
    exported = ExportedModel(path, runtime="openvino")
    inputs = [{"image": sample}]
    with torch.no_grad():
        (expected,) = [r["instances"] for r in model(inputs)]
    (actual,) = [r["instances"] for r in exported(inputs)]
    assert len(torch.unique(expected.scores)) < len(expected)  # ties
    assert torch.equal(actual.pred_classes, expected.pred_classes)


def test_openvino_topk_of_an_older_operation_set_is_replaced_by_a_stable_one():
    """A TopK without the ``stable`` attribute (operation set 3, as older readers and IR files
    hold) is swapped for a stable set-11 TopK with the same attributes."""
    from openvino import opset3

    x = opset3.parameter([1800], np.float32, name="x")
    top = opset3.topk(x, np.int64(1800), axis=0, mode="max", sort="value")
    model = openvino.Model([opset3.result(top.output(1))], [x], "older_topk")
    ties = np.ones(1800, np.float32)
    core = openvino.Core()
    _stable_top_k(model)
    (replaced,) = [op for op in model.get_ordered_ops() if op.get_type_name() == "TopK"]
    assert replaced.get_type_info().version_id == "opset11"
    assert replaced.get_attributes()["stable"] and replaced.get_attributes()["sort"] == "value"
    np.testing.assert_array_equal(core.compile_model(model, "CPU")(ties)[0], np.arange(1800))


def test_openvino_topk_without_sorting_is_left_as_it_is():
    """A TopK with ``sort="none"`` asks for no order (OpenVINO refuses ``stable`` there): it is
    neither replaced nor set stable, and the model still compiles."""
    from openvino import opset3, opset11

    x = opset3.parameter([8], np.float32, name="x")
    older = opset3.topk(x, np.int64(3), axis=0, mode="max", sort="none")
    newer = opset11.topk(x, np.int64(3), axis=0, mode="max", sort="none")
    outputs = [opset3.result(older.output(0)), opset3.result(newer.output(0))]
    model = openvino.Model(outputs, [x], "unsorted_topk")
    _stable_top_k(model)
    top_ks = [op for op in model.get_ordered_ops() if op.get_type_name() == "TopK"]
    assert sorted(op.get_type_info().version_id for op in top_ks) == ["opset11", "opset3"]
    assert not any(op.get_attributes().get("stable") for op in top_ks)
    openvino.Core().compile_model(model, "CPU")


@pytest.mark.parametrize("precision", ["bf16", "f16"])
def test_openvino_reduced_precision_runs_where_the_cpu_has_it(precision, tmp_path):
    """bf16/f16 are opt-in: on a CPU with the capability they run (same number of outputs,
    scores close to f32's); without it they are refused naming the capability."""
    model = spread_scores_model("SOLOv2Head")
    path = export_model(model, "onnx", str(tmp_path), max_candidates=LARGE_K0)
    capability = {"bf16": "BF16", "f16": "FP16"}[precision]
    if not cpu_has(capability):
        with pytest.raises(ExportError, match=f"needs a CPU with {capability} support"):
            ExportedModel(path, runtime="openvino", precision=precision)
        return
    inputs = [{"image": random_image((97, 133), 3)}]
    reduced = ExportedModel(path, runtime="openvino", precision=precision)(inputs)[0]["instances"]
    full = ExportedModel(path, runtime="openvino")(inputs)[0]["instances"]
    assert len(full) > 0 and len(reduced) > 0
    # bf16 keeps 8 mantissa bits: scores move by about 1e-2, not more than a few times that.
    top = min(len(full), len(reduced), 5)
    assert (reduced.scores[:top] - full.scores[:top]).abs().max() < 0.1


def test_openvino_runtime_and_precision_errors_name_the_fix(tmp_path):
    model = build(tiny_cfg("SOLOv2Head")).eval()
    onnx_path = export_model(model, "onnx", str(tmp_path / "onnx"))
    ts_path = export_model(model, "torchscript", str(tmp_path / "ts"))
    with pytest.raises(ExportError, match="runtime 'openvino' cannot run a torchscript file"):
        ExportedModel(ts_path, runtime="openvino")
    with pytest.raises(ExportError, match="Unknown OpenVINO precision 'int4'"):
        ExportedModel(onnx_path, runtime="openvino", precision="int4")
    with pytest.raises(ExportError, match="precision 'bf16' is OpenVINO's"):
        ExportedModel(onnx_path, precision="bf16")
    with pytest.raises(ExportError, match="runs on the CPU"):
        ExportedModel(onnx_path, runtime="openvino", device="cuda")


def test_missing_openvino_names_the_extra_to_install(tmp_path, monkeypatch):
    import sys

    path = export_model(build(tiny_cfg("SOLOv2Head")).eval(), "onnx", str(tmp_path))
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(ExportError, match=r"openvino package of the 'export' extra.*pip install"):
        ExportedModel(path, runtime="openvino")


@pytest.mark.parametrize("runtime", ["openvino", "openvino_int8"])
def test_benchmark_times_openvino_and_int8_next_to_eager(runtime, tmp_path):
    """tools/benchmark.py --runtime openvino / openvino_int8: timed next to eager; f32 gives the
    eager model's instance count, INT8 (calibrated on the timed image) runs end to end."""
    benchmark = load_script("tools/benchmark.py", "benchmark_openvino")
    out = tmp_path / "bench.json"
    argv = ["--config-file", str(REPO_ROOT / "configs/Shapes/SOLOv2_R18.yaml")]
    argv += ["--input-size", "96", "128", "--repeats", "1", "--warmup", "0", "--threads", "1"]
    argv += ["--in-process", "--task", "inference", "--runtime", runtime, "--json", str(out)]
    benchmark.main(argv)
    report = json.loads(out.read_text())
    eager, exported = report["models"]["ours"], report["models"][f"ours_{runtime}"]
    assert exported["runtime"] == runtime and exported["latency_ms"]["total"]["median"] > 0
    if runtime == "openvino":
        assert exported["calibration"]["instances_out"] == eager["calibration"]["instances_out"]
    assert report["runtime_ratios"][runtime] > 0
