"""Reduced-precision ONNX files derived from an exported float32 one: INT8 (post-training static
quantization) and FP16 (for the CUDA / TensorRT execution providers).

INT8 is ONNX Runtime's static QDQ quantization: per-channel symmetric int8 weights and per-tensor
uint8 activations whose ranges (MinMax) are calibrated on real images. Only the convolutions of
the backbone and head are quantized, and not those whose output the post-processing reads (the
category logits, mask kernels and mask features): scores, Matrix NMS, mask thresholds and the
graph's outputs stay float32, so quantization changes the network's features but never the
post-processing's arithmetic. The result is an ordinary ``.onnx`` file that ONNX Runtime and
OpenVINO both run with INT8 kernels (``ExportedModel(path)`` or ``runtime="openvino"``).

FP16 converts the backbone and head to float16 with float32 inputs and outputs; the
post-processing (everything outside the ``/backbone`` and ``/head`` scopes of the traced graph:
sigmoid scores, sums of mask probabilities, Matrix NMS) stays float32, as the eager
post-processor accumulates its sums in float32 under autocast.
"""

import json
import logging
import numpy as np
import os
from typing import Callable, Dict, Iterable, List, Set
import torch

from .formats import METADATA_KEY, ExportError

__all__ = [
    "calibration_inputs",
    "check_registered",
    "convert_fp16",
    "in_network",
    "precision_report",
    "precision_path",
    "prediction_convs",
    "quantize_int8",
]

logger = logging.getLogger(__name__)

#: ``tools/export_model.py --verify`` tolerances of an FP16 file against the float32 eager
#: model: scores, and the share of a mask's pixels that may differ (float16 features move mask
#: probabilities near MASK_THRESH by more than float32 rounding does). Scores: float16's 11-bit
#: mantissa moves a category logit by ~1e-3 relative, and maskness and Matrix NMS decay compound
#: it; up to 1.7e-2 was seen on the tests' random-weight models, whose masks all overlap.
FP16_SCORE_ATOL = 2e-2
FP16_MASK_TOL = 1e-2

#: Name prefixes of the traced modules' nodes (``SOLOExportModule.backbone`` / ``.head``); nodes
#: outside them are normalisation and post-processing.
NETWORK_SCOPES = ("/backbone/", "/head/")


def in_network(name: str) -> bool:
    """Whether an ONNX node (by its traced name) belongs to the backbone or head."""
    return name.startswith(NETWORK_SCOPES)


def prediction_convs(graph) -> Set[str]:
    """Names of the convolutions whose output reaches the post-processing without passing
    through another convolution (prediction layers and the features the post-processing
    multiplies): they stay float32 in the INT8 model.

    Shape computations are not followed (their integers carry no activation values).
    """
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    def reaches_postprocessing(conv) -> bool:
        stack, seen = list(conv.output), set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            if tensor in graph_outputs:
                return True
            for node in consumers.get(tensor, []):
                if node.op_type in ("Conv", "Shape"):
                    continue
                if not in_network(node.name):
                    return True
                stack.extend(node.output)
        return False

    return {n.name for n in graph.node if n.op_type == "Conv" and reaches_postprocessing(n)}


def check_registered(dataset_name: str) -> None:
    """Raise :class:`ExportError` naming the registered datasets if ``dataset_name`` is not
    one of them."""
    from detectron2.data import DatasetCatalog

    registered = DatasetCatalog.list()
    if dataset_name not in registered:
        raise ExportError(
            f"--calibration-dataset {dataset_name!r} is not a registered dataset. Registered: "
            f"{sorted(registered)}. Register it first (detectron2.data.datasets."
            "register_coco_instances, see docs/data.md) or calibrate on one of these."
        )


def calibration_inputs(
    batches: Iterable[List[dict]],
    num_images: int,
    pad: Callable[[torch.Tensor], torch.Tensor],
    allow_fewer: bool = False,
) -> List[np.ndarray]:
    """The first ``num_images`` images of a test loader as padded graph inputs.

    Args:
        batches: a Detectron2 test loader (batches of ``{"image": (3, H, W) tensor}`` dicts,
            after the test mapper's resizing).
        num_images: how many to take.
        pad: (3, H, W) image -> (1, 3, Hp, Wp) float32 graph input (``pad_image`` with the
            export's metadata).
        allow_fewer: a smaller dataset is used whole (the default count of the export tool)
            instead of refused (a count the user asked for).

    Raises:
        ExportError: the loader has fewer than ``num_images`` images (unless ``allow_fewer``),
            or ``num_images < 1``.
    """
    if num_images < 1:
        raise ExportError(f"--calibration-images must be >= 1, got {num_images}.")
    inputs = []
    for batch in batches:
        inputs += [pad(d["image"].float()).numpy() for d in batch]
        if len(inputs) >= num_images:
            return inputs[:num_images]
    if allow_fewer and inputs:
        logger.info("Calibrating on all %d images of the dataset.", len(inputs))
        return inputs
    raise ExportError(
        f"--calibration-images {num_images}: the calibration dataset has only {len(inputs)} "
        "images; ask for at most that many."
    )


class _Inputs:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over a list of graph inputs."""

    def __init__(self, images: List[np.ndarray]):
        self._images = iter(images)

    def get_next(self):
        image = next(self._images, None)
        return None if image is None else {"image": image}


def quantize_int8(float_path: str, output_path: str, calibration: List[np.ndarray]) -> str:
    """Write the INT8 version of an exported float32 ONNX file (see the module docstring).

    Args:
        float_path: ``.onnx`` file written by ``export_model``.
        output_path: where to write the quantized ``.onnx`` file (its metadata is the float
            file's with ``"precision": "int8"``).
        calibration: graph inputs, (1, 3, H, W) float32 arrays (:func:`calibration_inputs`);
            sizes may differ.

    Returns:
        ``output_path``.

    Raises:
        ExportError: onnxruntime's quantization tools missing, no calibration image, or a file
            without convolutions to quantize.
    """
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:
        raise ExportError(
            f"INT8 quantization needs the 'export' extra ({e}): pip install -e .[export] "
            '"numpy<2"'
        ) from e
    if not calibration:
        raise ExportError("INT8 quantization needs at least one calibration image.")
    proto = onnx.load(float_path)
    _inline_initializer_aliases(proto.graph)
    keep_float = prediction_convs(proto.graph)
    convs = [n.name for n in proto.graph.node if n.op_type == "Conv" and in_network(n.name)]
    to_quantize = [name for name in convs if name not in keep_float]
    if not to_quantize:
        raise ExportError(f"{float_path} has no backbone or head convolution to quantize.")
    logger.info(
        f"Quantizing {len(to_quantize)} convolutions to INT8 ({len(keep_float)} prediction "
        f"layers stay float32), calibrated on {len(calibration)} images."
    )
    quantize_static(
        proto,
        output_path,
        _Inputs(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        nodes_to_quantize=to_quantize,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    _copy_metadata(proto, output_path, precision="int8")
    return output_path


def convert_fp16(float_path: str, output_path: str) -> str:
    """Write a float16 version of an exported float32 ONNX file: backbone and head in float16,
    inputs, outputs and post-processing in float32 (see the module docstring).

    Returns:
        ``output_path``.

    Raises:
        ExportError: onnxruntime (whose ``transformers.float16`` converter is used) missing.
    """
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as e:
        raise ExportError(
            f"--precision fp16 needs the 'export' extra ({e}): pip install -e .[export] "
            '"numpy<2"'
        ) from e
    proto = onnx.load(float_path)
    # Identity nodes at the root alias weights shared between levels (a head's convolutions
    # run once per level): they take the precision of the convolutions they feed.
    postprocessing = [
        n.name for n in proto.graph.node if not in_network(n.name) and n.op_type != "Identity"
    ]
    half = convert_float_to_float16(proto, keep_io_types=True, node_block_list=postprocessing)
    _sort_topologically(half.graph)  # the converter appends its Cast nodes at the end
    onnx.save(half, output_path)
    _copy_metadata(proto, output_path, precision="fp16")
    return output_path


def precision_report(results: Dict[str, dict]) -> str:
    """A table of COCO AP per precision, e.g. ``{"fp32": r1, "int8": r2}`` with each ``r`` as
    ``DefaultTrainer.test`` returns it (``{task: {metric: value}}``, or that per dataset), and
    the change of each later column from the first."""

    def flat(result):
        if result and all(isinstance(v, dict) and "AP" not in v for v in result.values()):
            return {f"{d} {t}": m for d, r in result.items() for t, m in flat(r).items()}
        return {task: m for task, m in result.items() if isinstance(m, dict) and "AP" in m}

    names = list(results)
    tables = {name: flat(r) for name, r in results.items()}
    first = tables[names[0]]
    header = f"{'':<24}" + "".join(f"{n:>10}" for n in names)
    header += "".join(f"{'change ' + n:>14}" for n in names[1:])
    lines = [header]
    for task in first:
        for metric in ("AP", "AP50", "AP75"):
            values = [tables[n].get(task, {}).get(metric, float("nan")) for n in names]
            row = f"{task + ' ' + metric:<24}" + "".join(f"{v:>10.2f}" for v in values)
            row += "".join(f"{v - values[0]:>+14.2f}" for v in values[1:])
            lines.append(row)
    return "\n".join(lines)


def _inline_initializer_aliases(graph) -> None:
    """Remove the Identity nodes that alias a weight (the tracer's way of sharing a head's
    convolution between levels), reading the weight directly: the quantizer expects a
    convolution's weight and bias to be initializers."""
    initializers = {i.name for i in graph.initializer}
    aliases = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Identity" and n.input[0] in initializers
    }
    graph_outputs = {o.name for o in graph.output}
    aliases = {k: v for k, v in aliases.items() if k not in graph_outputs}
    kept = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in aliases)]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in aliases:
                node.input[i] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)


def _sort_topologically(graph) -> None:
    """Reorder ``graph.node`` so that each node follows the producers of its inputs (ONNX's
    rule, which ``onnx.checker`` and TensorRT's parser enforce)."""
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    order, state = [], {}  # state: 1 visiting, 2 done

    def visit(i):
        stack = [(i, False)]
        while stack:
            j, expanded = stack.pop()
            if expanded:
                state[j] = 2
                order.append(j)
                continue
            if state.get(j):
                continue
            state[j] = 1
            stack.append((j, True))
            for name in graph.node[j].input:
                k = produced_by.get(name)
                if k is not None and not state.get(k):
                    stack.append((k, False))

    for i in range(len(graph.node)):
        visit(i)
    nodes = [graph.node[i] for i in order]
    del graph.node[:]
    graph.node.extend(nodes)


def _copy_metadata(source, path: str, precision: str) -> None:
    import onnx

    meta = next((p.value for p in source.metadata_props if p.key == METADATA_KEY), "")
    if not meta:
        raise ExportError(f"{path}: the float model has no SOLO export metadata to carry over.")
    proto = onnx.load(path)
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps({**json.loads(meta), "precision": precision})
    onnx.save(proto, path)


def precision_path(float_path: str, precision: str) -> str:
    """``model.onnx`` -> ``model_int8.onnx`` / ``model_fp16.onnx``."""
    root, ext = os.path.splitext(float_path)
    return f"{root}_{precision}{ext}"
