"""Writing exported files: ONNX, TorchScript and torch.export (.pt2), with their metadata."""

import copy
import json
import logging
import os
import warnings
from typing import Optional
import torch
from torch import nn

from ..checkpoint import SOLOCheckpointer
from .formats import (
    EXPORT_FORMATS,
    METADATA_KEY,
    METADATA_VERSION,
    MIN_BLOCKS,
    ONNX_OPSET,
    OUTPUT_NAMES,
    ExportError,
)
from .module import SOLOExportModule
from .runtime import pad_image

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def _build_model(cfg_or_model):
    """A SOLO model in eval mode on CPU without gradients, and its config (None for a model)."""
    if isinstance(cfg_or_model, nn.Module):
        model = copy.deepcopy(cfg_or_model).cpu()
        cfg = None
    else:
        from detectron2.modeling import build_model

        cfg = cfg_or_model.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        if cfg.MODEL.WEIGHTS:
            SOLOCheckpointer(model, strict=True).load(cfg.MODEL.WEIGHTS)
    for p in model.parameters():
        p.requires_grad_(False)
    # Plain NCHW: the exporters record memory formats as extra ops; runtimes choose their own.
    model.to(memory_format=torch.contiguous_format)
    return model.eval(), cfg


def _metadata(model, module: SOLOExportModule, cfg) -> dict:
    return {
        "version": METADATA_VERSION,
        "input_format": getattr(model, "input_format", "BGR"),
        "pixel_mean": module.pixel_mean.flatten().tolist(),
        "size_divisibility": module.size_divisibility,
        "mask_thresh": module.postprocess_args["mask_thresh"],
        "max_candidates": module.postprocess_args["max_candidates"],
        "num_classes": int(model.head.num_classes),
        "config": cfg.dump() if cfg is not None else "",
    }


def export_model(
    cfg_or_model,
    fmt: str,
    output_dir: str,
    sample_image: Optional[torch.Tensor] = None,
    max_candidates: Optional[int] = None,
    dynamo: bool = False,
    config=None,
) -> str:
    """Export a SOLO model; see the module docstring. Returns the written file's path.

    Raises:
        ExportError: unknown ``fmt``, greedy mask NMS, missing ``onnx``/``onnxscript`` for ONNX,
            or a DCN model to ONNX (ONNX Runtime has no deformable convolution: use ``pt2``).
        CheckpointMismatchError: MODEL.WEIGHTS does not fit the model built from the config.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; expected one of {list(EXPORT_FORMATS)}.")
    model, cfg = _build_model(cfg_or_model)
    cfg = cfg if config is None else config
    if max_candidates is None:
        max_candidates = model.postprocessor.nms_pre
    module = SOLOExportModule(model, max_candidates).eval()
    if fmt == "onnx" and _has_deformable_conv(model):
        raise ExportError(
            "This model has deformable convolutions (MODEL.RESNETS.DEFORM_ON_PER_STAGE or "
            "MODEL.SOLO.*_DCN), which ONNX Runtime cannot run: export it with --format pt2."
        )
    if sample_image is None:
        generator = torch.Generator().manual_seed(0)
        sample_image = torch.randint(0, 256, (3, 320, 320), generator=generator)
    uses_torch_export = fmt == "pt2" or (fmt == "onnx" and dynamo)
    min_blocks = MIN_BLOCKS if uses_torch_export else 2
    x = pad_image(sample_image.float(), module.pixel_mean, module.size_divisibility, min_blocks)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model" + EXPORT_FORMATS[fmt])
    meta = json.dumps({**_metadata(model, module, cfg), "min_blocks": min_blocks})
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(module, x, path, meta, dynamo)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(module, (x,), check_trace=False)
            torch.jit.save(traced, path, _extra_files={METADATA_KEY: meta})
        else:
            program = torch.export.export(module, (x,), dynamic_shapes=_dynamic_shapes(module))
            torch.export.save(program, path, extra_files={METADATA_KEY: meta})
    logger.info(f"Exported {type(model.head).__name__} model to {path} (K0={max_candidates}).")
    return path


def _dynamic_shapes(module: SOLOExportModule):
    d = module.size_divisibility
    # H = d * h' and W = d * w': the stride arithmetic of the backbone and head stays exact.
    h = torch.export.Dim("h_blocks", min=MIN_BLOCKS, max=8192 // d)
    w = torch.export.Dim("w_blocks", min=MIN_BLOCKS, max=8192 // d)
    return {"image": {2: d * h, 3: d * w}}


def _has_deformable_conv(model) -> bool:
    from torchvision.ops import deform_conv2d  # noqa: F401  (the op both DCN layers call)

    from ..modeling.layers import DeformConv, DeformConvPack

    return any(isinstance(m, (DeformConv, DeformConvPack)) for m in model.modules())


def _export_onnx(module, x, path, meta, dynamo: bool):
    try:
        import onnx

        if dynamo:
            import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError as e:
        raise ExportError(
            f"ONNX export needs the 'export' extra ({e}): pip install -e .[export] \"numpy<2\""
        ) from e
    if dynamo:
        kwargs = dict(dynamo=True, dynamic_shapes=_dynamic_shapes(module), optimize=True)
    else:
        # The TorchScript-based exporter: a trace, so as fast as TorchScript export and without
        # torch.export's size-1 specialisation; the graph holds no data-dependent shape.
        dims = {"image": {2: "height", 3: "width"}}
        kwargs = dict(dynamo=False, dynamic_axes=dims, opset_version=ONNX_OPSET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (x,), path, input_names=["image"], output_names=OUTPUT_NAMES, **kwargs
        )
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    onnx.save(proto, path)


# ----------------------------------------------------------------------------------------------
# Runtime
# ----------------------------------------------------------------------------------------------
