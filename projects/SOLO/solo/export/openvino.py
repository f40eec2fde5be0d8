"""Running exported ONNX files with OpenVINO's CPU runtime (``ExportedModel(runtime="openvino")``).

OpenVINO reads the ONNX file written by :func:`solo.export.export_model` (also an INT8 file
written by :mod:`solo.export.quantize`); its TopK nodes are then made stable, so that exact ties
rank by lower index as ONNX specifies. ``precision`` is OpenVINO's
``INFERENCE_PRECISION_HINT``: ``f32`` computes in float32 like ONNX Runtime (the default, and
set explicitly because OpenVINO otherwise picks bf16 on CPUs that have it); ``bf16`` and ``f16``
are opt-in and refused on a CPU without them (``OPTIMIZATION_CAPABILITIES``).
"""

import numpy as np
from typing import Callable, Tuple

from .formats import METADATA_KEY, ExportError

__all__ = ["OPENVINO_PRECISIONS", "openvino_session", "read_onnx_metadata"]

#: ``precision`` -> the CPU capability it needs (None: every CPU).
OPENVINO_PRECISIONS = {"f32": None, "bf16": "BF16", "f16": "FP16"}
INSTALL_HINT = 'pip install -e .[export] "numpy<2"'


def read_onnx_metadata(path: str) -> str:
    """The SOLO export metadata (JSON text) of an ONNX file, "" if it has none.

    OpenVINO does not carry ONNX ``metadata_props`` into its model, so the file is read with
    ``onnx`` (part of the same extra).
    """
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), "")


def _stable_top_k(model) -> None:
    """Make every TopK of an OpenVINO ``model`` break exact ties by lower index, as ONNX's TopK
    specifies and as the eager post-processor ranks them: OpenVINO's ONNX reader leaves its
    default, unstable order (tied classes of a cell came out permuted). A TopK of an operation
    set before 11, which has no ``stable`` attribute, is replaced by a stable set-11 TopK with
    the same inputs and attributes."""
    from openvino import opset11

    for op in model.get_ordered_ops():
        if op.get_type_name() != "TopK":
            continue
        attributes = op.get_attributes()
        if attributes.get("sort") == "none":  # no order asked for (OpenVINO refuses stable)
            continue
        if "stable" in attributes:
            op.set_attribute("stable", True)
            continue
        stable = opset11.topk(
            op.input_value(0), op.input_value(1), attributes["axis"], attributes["mode"],
            attributes["sort"], attributes.get("index_element_type", "i32"), stable=True,
        )  # fmt: skip
        for old, new in zip(op.outputs(), stable.outputs()):
            for target in old.get_target_inputs():
                target.replace_source_output(new)


def openvino_session(
    path: str, num_threads: int, precision: str = "f32"
) -> Tuple[Callable[[np.ndarray], Tuple[np.ndarray, ...]], str]:
    """Compile an exported ONNX file for OpenVINO's CPU plugin.

    Args:
        path: ``.onnx`` file written by ``export_model`` (float or INT8).
        num_threads: ``INFERENCE_NUM_THREADS``.
        precision: one of :data:`OPENVINO_PRECISIONS`.

    Returns:
        ``(run, metadata)``: ``run`` maps a (1, 3, H, W) float32 array to the graph's outputs as
        numpy arrays, in the order of ``solo.export.formats.OUTPUT_NAMES``; ``metadata`` is the
        file's export metadata (JSON text, "" if none).

    Raises:
        ExportError: openvino not installed (names the extra), an unknown precision, or one
            the CPU does not support.
    """
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError(
            f"Running {path} with OpenVINO needs the openvino package of the 'export' extra: "
            f"{INSTALL_HINT}"
        ) from e
    if precision not in OPENVINO_PRECISIONS:
        raise ExportError(
            f"Unknown OpenVINO precision {precision!r}; expected one of "
            f"{list(OPENVINO_PRECISIONS)}."
        )
    core = ov.Core()
    needed = OPENVINO_PRECISIONS[precision]
    capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if needed is not None and needed not in capabilities:
        raise ExportError(
            f"precision {precision!r} needs a CPU with {needed} support, this one offers "
            f"{capabilities}: use precision 'f32'."
        )
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": int(num_threads)}
    model = core.read_model(path)
    _stable_top_k(model)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(image: np.ndarray) -> Tuple[np.ndarray, ...]:
        # The request's output buffers are reused by the next call: copy them out.
        return tuple(np.array(v, copy=True) for v in request.infer({"image": image}).to_tuple())

    return run, read_onnx_metadata(path)
