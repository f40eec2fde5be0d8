"""``--precision fp16`` (``solo.export.quantize.convert_fp16``): a float16 network with float32
inputs, outputs and post-processing, checked with onnx.checker and run by ONNX Runtime on CPU."""

import pytest
import torch

from helpers import HEADS, random_image, spread_scores_model
from solo.export import ExportedModel, export_model
from solo.export.quantize import FP16_SCORE_ATOL, convert_fp16, in_network, precision_path

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e .[export])")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e .[export])")

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
LARGE_K0 = 1500
# Instances compared: fp32's best ones (random weights give hundreds of close candidates, whose
# order float16 may change further down).
TOP = 5


def mask_iou(a, b):
    return ((a & b).sum() / (a | b).sum().clamp(min=1)).item()


@pytest.mark.parametrize("head_name", HEADS)
def test_fp16_file_runs_on_cpu_with_the_fp32_best_instances(head_name, tmp_path):
    model = spread_scores_model(head_name)
    path = export_model(model, "onnx", str(tmp_path), max_candidates=LARGE_K0)
    half = ExportedModel(convert_fp16(path, precision_path(path, "fp16")))
    assert half.metadata["precision"] == "fp16"
    for seed, size in enumerate([(97, 133)]):
        inputs = [{"image": random_image(size, seed)}]
        with torch.no_grad():
            (expected,) = [r["instances"] for r in model(inputs)]
        (actual,) = [r["instances"] for r in half(inputs)]
        assert len(expected) >= TOP and len(actual) >= TOP
        assert actual.scores.dtype == torch.float32 and actual.pred_masks.dtype == torch.bool
        # Each of fp32's best instances is among fp16's best: same class, score within
        # FP16_SCORE_ATOL, mask IoU >= 0.9.
        for i in range(TOP):
            found = [
                j
                for j in range(2 * TOP)
                if actual.pred_classes[j] == expected.pred_classes[i]
                and abs(actual.scores[j] - expected.scores[i]) <= FP16_SCORE_ATOL
                and mask_iou(actual.pred_masks[j], expected.pred_masks[i]) >= 0.9
            ]
            assert found, f"fp32 instance {i} has no fp16 counterpart at {size}"


def test_fp16_graph_is_valid_with_float32_io_and_post_processing(tmp_path):
    path = export_model(spread_scores_model("SOLOv2Head"), "onnx", str(tmp_path))
    half_path = convert_fp16(path, precision_path(path, "fp16"))
    proto = onnx.load(half_path)
    onnx.checker.check_model(proto, full_check=True)  # also: nodes topologically sorted
    for value in list(proto.graph.input) + list(proto.graph.output):
        assert value.type.tensor_type.elem_type in (FLOAT, onnx.TensorProto.INT64), value.name
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    weights = [i for i in proto.graph.initializer if i.name in conv_weights]
    assert weights and all(i.data_type == FLOAT16 for i in weights)
    # Post-processing (outside the backbone and head) reads no float16 tensor but through a
    # Cast to float32.
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    for node in inferred.graph.node:
        if not in_network(node.name) and node.op_type not in ("Cast", "Identity"):
            half_inputs = [name for name in node.input if types.get(name) == FLOAT16]
            assert not half_inputs, f"{node.name} ({node.op_type}) reads float16 {half_inputs}"
