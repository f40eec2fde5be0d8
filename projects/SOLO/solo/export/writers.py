"""Writing exported files: ONNX, TorchScript and torch.export (.pt2), with their metadata."""

import contextlib
import copy
import json
import logging
import os
import warnings
from typing import Optional
import torch
from torch import nn

from ..checkpoint import build_inference_model
from ..modeling.meta_arch import MIN_BLOCKS as EAGER_MIN_BLOCKS
from .formats import (
    EXPORT_FORMATS,
    MAX_SIDE,
    METADATA_KEY,
    METADATA_VERSION,
    MIN_BLOCKS,
    ONNX_OPSET,
    OUTPUT_NAMES,
    SEMANTIC_OUTPUT,
    ExportError,
)
from .module import SOLOExportModule, square_canvas
from .runtime import pad_image
from .traceable import check_traceable_backbone, replace_mvit_attention_for_tracing

logger = logging.getLogger(__name__)

try:  # see formats.MIN_BLOCKS
    from torch.fx.experimental import _config as _fx_config

    SIZE_OBLIVIOUS_EXPORT = hasattr(_fx_config, "backed_size_oblivious")
except ImportError:
    SIZE_OBLIVIOUS_EXPORT = False
#: Smallest padded side, in blocks of the size divisibility, of a torch.export program's input.
EXPORT_MIN_BLOCKS = EAGER_MIN_BLOCKS if SIZE_OBLIVIOUS_EXPORT else MIN_BLOCKS


def _build_model(cfg_or_model):
    """A SOLO model in eval mode on CPU without gradients, and its config (None for a model)."""
    if isinstance(cfg_or_model, nn.Module):
        model = copy.deepcopy(cfg_or_model).cpu()
        cfg = None
    else:
        cfg = cfg_or_model.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"
        model = build_inference_model(cfg, allow_random_weights=True)
    for p in model.parameters():
        p.requires_grad_(False)
    # Plain NCHW: the exporters record memory formats as extra ops; runtimes choose their own.
    model.to(memory_format=torch.contiguous_format)
    return model.eval(), cfg


def _metadata(model, module: SOLOExportModule, cfg, fmt: str, torch_export: bool) -> dict:
    """The file's contract (version 2): what the graph takes, how it pads, what it returns."""
    d, post = module.size_divisibility, module.postprocessor
    input_format = getattr(model, "input_format", "BGR")
    # torch.export programs: the range of their dynamic shapes (_dynamic_shapes).
    min_side = (EXPORT_MIN_BLOCKS - 1) * d + 1 if torch_export else 1
    side = module.square_side
    padded_to = f"a multiple of {d} pixels, at least {module.min_blocks * d}"
    if side:
        padded_to = f"{side} x {side} (the backbone's square padding); larger images refused"
    return {
        "version": METADATA_VERSION,
        "format": fmt,
        "input_format": input_format,
        "pixel_mean": module.pixel_mean.flatten().tolist(),
        "size_divisibility": d,
        "min_blocks": module.min_blocks,
        "mask_thresh": post.mask_thresh,
        "max_candidates": module.max_candidates,
        "num_classes": int(model.head.num_classes),
        "input": {
            "name": "image",
            "shape": [1, 3, "height", "width"],
            "dtype": "float32",
            "pixels": f"{input_format}, 0-255, not normalised",
            "min_side": min_side,
            "max_side": side or (MAX_SIDE if torch_export else None),
        },
        "square_side": side,
        "padding": {
            "where": "in the graph",
            "sides": "bottom and right",
            "to": padded_to,
            "value": "0 after normalisation (the pixel mean before)",
        },
        "outputs": {
            "scores": "(D,) float32, descending; rows from num_detections on are padding (-1)",
            "labels": "(D,) int64 class indices",
            "masks": "(D, Hp/4, Wp/4) float32 mask probabilities at stride 4 of the padded "
            f"size Hp x Wp; binarise above mask_thresh ({post.mask_thresh}) after upsampling",
            "num_detections": "() int64",
            "num_candidates": f"() int64; exact whenever <= max_candidates "
            f"({module.max_candidates})",
        },
        "config": cfg.dump() if cfg is not None else "",
        **_panoptic_metadata(model, module),
    }


def _panoptic_metadata(model, module: SOLOExportModule) -> dict:
    """A panoptic model's sixth output and the merge settings the runtime applies outside."""
    if module.sem_seg_head is None:
        return {}
    stride = module.sem_seg_head.common_stride
    return {
        "panoptic": {
            "output": f"{SEMANTIC_OUTPUT}: (1, C, Hp/{stride}, Wp/{stride}) float32 logits",
            "semantic_stride": stride,
            "overlap_thresh": model.combine_overlap_thresh,
            "stuff_area_thresh": model.combine_stuff_area_thresh,
            "instances_score_thresh": model.combine_instances_score_thresh,
        }
    }


def _output_names(module: SOLOExportModule) -> list:
    return OUTPUT_NAMES + ([SEMANTIC_OUTPUT] if module.sem_seg_head is not None else [])


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
            a DCN model to ONNX (ONNX Runtime has no deformable convolution: use ``pt2``), or
            a backbone that cannot export exactly (:mod:`solo.export.traceable`: ViT without
            square padding, MViTv2 with absolute position embeddings).
        CheckpointMismatchError: MODEL.WEIGHTS does not fit the model built from the config.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; expected one of {list(EXPORT_FORMATS)}.")
    model, cfg = _build_model(cfg_or_model)
    cfg = cfg if config is None else config
    if max_candidates is None:
        max_candidates = model.postprocessor.nms_pre
    uses_torch_export = fmt == "pt2" or (fmt == "onnx" and dynamo)
    check_traceable_backbone(model.backbone, square_canvas(model.backbone))
    replace_mvit_attention_for_tracing(model.backbone)  # model is our copy
    # torch.export programs take sides of more than EXPORT_MIN_BLOCKS - 1 blocks
    # (_dynamic_shapes), so rounding up to the size divisibility already reaches the minimum;
    # their symbolic shapes could not prove a further max() with it away.
    min_blocks = 0 if uses_torch_export else EAGER_MIN_BLOCKS
    module = SOLOExportModule(model, max_candidates, min_blocks).eval()
    if fmt == "onnx" and _has_deformable_conv(model):
        raise ExportError(
            "This model has deformable convolutions (MODEL.RESNETS.DEFORM_ON_PER_STAGE or "
            "MODEL.SOLO.*_DCN), which ONNX Runtime cannot run: export it with --format pt2."
        )
    if sample_image is None:
        generator = torch.Generator().manual_seed(0)
        sample_image = torch.randint(0, 256, (3, 320, 320), generator=generator)
    x = sample_image.float()[None]
    if module.square_side:  # the graph takes images up to the square
        x = x[..., : module.square_side, : module.square_side]
    if uses_torch_export:  # the sample must lie in the program's input range
        x = _fit_sample(x, module)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model" + EXPORT_FORMATS[fmt])
    meta = json.dumps(_metadata(model, module, cfg, fmt, uses_torch_export))
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(module, x, path, meta, dynamo)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(module, (x,), check_trace=False)
            torch.jit.save(traced, path, _extra_files={METADATA_KEY: meta})
        else:
            with _size_oblivious():
                shapes = _dynamic_shapes(module)
                program = torch.export.export(module, (x,), dynamic_shapes=shapes)
            torch.export.save(program, path, extra_files={METADATA_KEY: meta})
    logger.info(f"Exported {type(model.head).__name__} model to {path} (K0={max_candidates}).")
    return path


def _size_oblivious():
    """torch.export without specialising sizes of 1 (see formats.MIN_BLOCKS), where torch can."""
    if SIZE_OBLIVIOUS_EXPORT:
        return _fx_config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _max_side(module: SOLOExportModule) -> int:
    """A torch.export program's largest input side: MAX_SIDE, or the backbone's square."""
    return module.square_side or MAX_SIDE


def _dynamic_shapes(module: SOLOExportModule):
    low = (EXPORT_MIN_BLOCKS - 1) * module.size_divisibility + 1
    h = torch.export.Dim("height", min=low, max=_max_side(module))
    w = torch.export.Dim("width", min=low, max=_max_side(module))
    return {"image": {2: h, 3: w}}


def _fit_sample(x: torch.Tensor, module: SOLOExportModule) -> torch.Tensor:
    """The sample cropped to the largest and padded with the pixel mean to the smallest side a
    torch.export program takes (the exported program does not depend on the sample's size)."""
    low = (EXPORT_MIN_BLOCKS - 1) * module.size_divisibility + 1
    x = x[..., : _max_side(module), : _max_side(module)]
    return pad_image(x[0], module.pixel_mean, 1, low)


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
        oblivious = _size_oblivious()
    else:
        # The TorchScript-based exporter: a trace, so as fast as TorchScript export and without
        # torch.export's size-1 specialisation; the graph holds no data-dependent shape.
        dims = {"image": {2: "height", 3: "width"}}
        kwargs = dict(dynamo=False, dynamic_axes=dims, opset_version=ONNX_OPSET)
        oblivious = contextlib.nullcontext()
    with warnings.catch_warnings(), oblivious:
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (x,), path, input_names=["image"], output_names=_output_names(module), **kwargs
        )
    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta
    onnx.save(proto, path)
