"""Exact export of SOLO / Decoupled SOLO / SOLOv2 to ONNX, TorchScript and torch.export (.pt2).

Public API (``from solo.export import ...``)::

    export_model(cfg_or_model, fmt, output_dir, sample_image=None, max_candidates=None,
                 dynamo=False, config=None) -> str
        fmt: "onnx" | "torchscript" | "pt2"; writes ``output_dir/model.{onnx,ts,pt2}`` and
        returns its path. ``cfg_or_model``: a config (the model is built and MODEL.WEIGHTS loaded
        strictly) or a built SOLO model (copied, in eval mode). ``sample_image``: a (3, H, W)
        tensor in INPUT.FORMAT used for tracing (default: a seeded random 320x320 image; the
        exported graph accepts any H and W). ``max_candidates``: K0 below (default
        MODEL.SOLO.NMS_PRE). ONNX goes through a trace (TorchScript-based exporter) unless
        ``dynamo``; ``pt2`` and ``dynamo`` use ``torch.export`` (slower to export, see
        ``MIN_BLOCKS``). ``config``: the model's config, stored in the file (given a config,
        that one).
    ExportedModel(path, device="cpu", num_threads=None)
        Loads an exported file (runtime picked from its suffix) and is called exactly like the
        model: ``[{"image": (3, H, W) uint8/float tensor in INPUT.FORMAT, "height", "width"}]``
        -> ``[{"instances": Instances}]`` with bool ``pred_masks`` (height x width), ``scores``,
        int64 ``pred_classes`` and ``pred_boxes`` (tight boxes of the masks).
    is_exported_model_file(path) -> bool
        Whether the suffix is one of ``.onnx``, ``.ts``, ``.pt2``.
    SOLOExportModule(model, max_candidates)
        The traced ``nn.Module``: one padded (1, 3, H, W) float32 image -> fixed-size outputs.
    fixed_size_postprocess(cate_logits, mask_probs, ...)
        The in-graph post-processing as a plain PyTorch function.

What is in the graph (batch 1, dynamic H and W, multiples of the backbone's size divisibility):
normalisation, backbone, head, and a fixed-size version of ``SOLOPostProcessor``: point NMS, the
top K0 (cell, class) scores with a validity mask (the official multi-label candidates), the masks
of those K0 only, area filter and maskness by masking, the top ``NMS_PRE``, Matrix NMS as matrix
products, the top ``TEST.DETECTIONS_PER_IMAGE``. Outputs: ``scores`` (D,), ``labels`` (D,) int64,
``masks`` (D, H/4, W/4) soft masks, ``num_detections`` and ``num_candidates`` (0-dim int64).

The K0 trade-off: results equal eager inference whenever an image has at most K0 candidates
(cell, class pairs scoring above ``SCORE_THRESH``). With more, only the K0 best category scores
are considered (the eager model would rank all of them by maskness-rescored score), and
``ExportedModel`` warns with the count. The cost of the graph grows with K0, not with the actual
number of candidates.

Outside the graph (cheap and size-dependent, as in eager inference): padding the input and
upsampling, cropping and thresholding the masks, and their boxes. Greedy ``NMS_TYPE: mask`` has a
data-dependent number of steps and is refused.
"""

import copy
import json
import logging
import numpy as np
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple
import torch
from torch import nn

from detectron2.structures import Boxes, Instances

from .heads import SOLOHeadBase
from .heads.decoupled_head import DecoupledSOLOHead, DecoupledSOLOLightHead
from .heads.solo_head import SOLOHead
from .heads.solov2_head import SOLOv2Head
from .layers import resize
from .nms import MATRIX_NMS_KERNELS, matrix_nms_from_iou, points_nms
from .postprocess import masks_to_boxes

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportedModel",
    "SOLOExportModule",
    "compare_predictions",
    "export_model",
    "fixed_size_postprocess",
    "is_exported_model_file",
]

logger = logging.getLogger(__name__)

#: Export format -> file suffix.
EXPORT_FORMATS = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
OUTPUT_NAMES = ["scores", "labels", "masks", "num_detections", "num_candidates"]
# Key of the export metadata inside each file (ONNX metadata_props, TorchScript/pt2 extra file).
METADATA_KEY = "solo_export.json"
METADATA_VERSION = 1
# torch.export (the pt2 and ONNX routes) specialises dimensions of size 1, so a 64-pixel side,
# whose P6 is 1x1, would break its guards: those formats pad every side to at least 3 blocks of
# the size divisibility (96 pixels) instead of the eager model's 2.
MIN_BLOCKS = 3
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """A model, config or file that cannot be exported or loaded as an exported SOLO model."""


def is_exported_model_file(path: str) -> bool:
    """Whether ``path`` names a file :class:`ExportedModel` runs (by its suffix), e.g. for a
    ``MODEL.WEIGHTS`` that may be a checkpoint or an exported model."""
    return os.path.splitext(str(path))[1] in EXPORT_FORMATS.values()


# ----------------------------------------------------------------------------------------------
# Fixed-size post-processing (inside the graph)
# ----------------------------------------------------------------------------------------------


def fixed_size_postprocess(
    cate_logits: Sequence[torch.Tensor],
    mask_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    max_candidates: int,
    min_mask_areas: Sequence[float],
    score_thresh: float,
    mask_thresh: float,
    nms_pre: int,
    update_thresh: float,
    matrix_nms_kernel: str,
    matrix_nms_sigma: float,
    max_per_image: int,
) -> Tuple[torch.Tensor, ...]:
    """``SOLOPostProcessor`` (Matrix NMS) for one image with shapes fixed by the config only.

    Args:
        cate_logits: per level, (1, C, S, S) category logits.
        mask_probs: ``(levels, cells) -> (K, h, w)`` float mask probabilities at stride 4 of K
            candidates given by their level and flat cell index ``i * S + j`` (int64 tensors).
        max_candidates: K0, the number of (cell, class) pairs given a mask.
        Others: the ``SOLOPostProcessor`` arguments of the same name.

    Returns:
        scores (D,) float, labels (D,) int64, masks (D, h, w) soft masks, num_detections and
        num_candidates (0-dim int64), with
        D = min(TEST.DETECTIONS_PER_IMAGE, NMS_PRE, K0, sum S^2 * C).
        Rows ``num_detections`` and later are padding (score -1). The first ``num_detections``
        rows are the eager post-processor's instances in its order (descending score) whenever
        ``num_candidates <= K0``.
    """
    if matrix_nms_kernel not in MATRIX_NMS_KERNELS:
        raise ValueError(
            f"Unknown Matrix NMS kernel {matrix_nms_kernel!r}; expected {MATRIX_NMS_KERNELS}."
        )
    device = cate_logits[0].device
    per_level = [points_nms(x.sigmoid())[0].permute(1, 2, 0).flatten(0, 1) for x in cate_logits]
    scores = torch.cat(per_level)  # (sum S^2, C)
    num_classes = scores.shape[1]
    flat = scores.flatten()
    num_candidates = (flat > score_thresh).sum()

    # Static top K0 over every (cell, class) pair: the official candidates are those above the
    # threshold, marked valid; the rest of the K0 is padding that cannot survive.
    k0 = min(max_candidates, flat.numel())
    cand_scores, pairs = flat.topk(k0)
    valid = cand_scores > score_thresh
    flat_cells, labels = pairs // num_classes, pairs % num_classes
    cells_per_level = [x.shape[-2] * x.shape[-1] for x in cate_logits]
    level_ends = torch.tensor(np.cumsum(cells_per_level).tolist(), device=device)
    levels = (flat_cells[:, None] >= level_ends[None, :]).sum(dim=1)  # no searchsorted in ONNX
    level_starts = level_ends - torch.tensor(cells_per_level, device=device)
    cells = flat_cells - level_starts[levels]

    probs = mask_probs(levels, cells)  # (K0, h, w)
    masks = probs > mask_thresh
    areas = masks.flatten(1).sum(dim=1)
    inside = (probs * masks).flatten(1).sum(dim=1)
    min_areas = torch.tensor(list(min_mask_areas), device=device, dtype=torch.float32)
    keep = valid & (areas > min_areas[levels])
    # Padding rows sort below every candidate: a kept score is > SCORE_THRESH * MASK_THRESH.
    rescored = torch.where(keep, cand_scores * inside / areas.clamp(min=1), -1.0)

    k1 = min(nms_pre, k0)
    rescored, order = rescored.topk(k1)
    kept = rescored > -1
    masks_f = masks[order].flatten(1).to(probs.dtype)
    decayed = _matrix_nms(
        masks_f, labels[order], rescored, areas[order].to(probs.dtype), matrix_nms_kernel,
        matrix_nms_sigma,
    )  # fmt: skip
    # Padding rows come last, so they never decay a candidate.
    final = kept & (decayed >= update_thresh)
    k2 = min(max_per_image, k1)
    det_scores, det = torch.where(final, decayed, -1.0).topk(k2)
    num_detections = final.sum().clamp(max=k2)
    chosen = order[det]
    return det_scores, labels[chosen], probs[chosen], num_detections, num_candidates


def _matrix_nms(masks, labels, scores, areas, kernel: str, sigma: float) -> torch.Tensor:
    """``solo.nms.matrix_nms`` on (K, P) 0/1 float masks sorted by descending score.

    Same formula; the intersections are one float product (exact counts below 2^24 pixels)
    because ``nms.mask_iou_matrix`` uses int8 kernels that no exporter maps.
    """
    inter = masks @ masks.t()
    union = areas[:, None] + areas[None, :] - inter
    iou = inter / union.clamp(min=1e-6)
    return matrix_nms_from_iou(iou, labels, scores, kernel, sigma)


# ----------------------------------------------------------------------------------------------
# Fixed-size mask probabilities of K candidates, per head family
# ----------------------------------------------------------------------------------------------
# The heads' own ``inference_mask_probs`` group candidates by level with ``nonzero`` (their
# number is data-dependent); these compute the same probabilities with static shapes.


def _solov2_mask_probs(head: SOLOv2Head, outputs, size):
    # Already fixed-size: one gather of the dynamic kernels and one matrix product.
    return lambda levels, cells: head.inference_mask_probs(outputs, 0, levels, cells, size)


def _decoupled_mask_probs(head, outputs, size):
    # All S column maps X and S row maps Y of every level, at stride 4 (2 * sum S maps, fewer
    # than K0), then one gather and product per candidate: the official sigmoid -> upsample ->
    # multiply order.
    xs = torch.cat([resize(x.sigmoid(), size)[0] for x, _ in outputs.mask_outputs])
    ys = torch.cat([resize(y.sigmoid(), size)[0] for _, y in outputs.mask_outputs])
    grids = head.num_grids
    device = xs.device
    offsets = torch.tensor(np.cumsum([0] + grids[:-1]).tolist(), device=device)
    grid = torch.tensor(grids, device=device)

    def probs(levels, cells):
        rows, cols = cells // grid[levels], cells % grid[levels]
        return xs[offsets[levels] + cols] * ys[offsets[levels] + rows]

    return probs


def _solo_mask_probs(head: SOLOHead, outputs, size):
    # Channel k of level l's 1x1 conv is row k of its weight: gather the K candidates' rows from
    # all levels, apply them to every level's features and keep each candidate's own level
    # (the levels' features differ in size, so a per-level gather would be data-dependent).
    weight = torch.cat([conv.weight.flatten(1) for conv in head.mask_preds])
    bias = torch.cat([conv.bias for conv in head.mask_preds])
    sizes = [s * s for s in head.num_grids]
    offsets = torch.tensor(np.cumsum([0] + sizes[:-1]).tolist(), device=weight.device)

    def probs(levels, cells):
        rows = offsets[levels] + cells
        w, b = weight[rows], bias[rows]
        out = None
        for level, features in enumerate(outputs.mask_outputs):
            h, wd = features.shape[-2:]
            logits = (w @ features[0].flatten(1) + b[:, None]).view(-1, h, wd)
            p = resize(logits.sigmoid()[None], size)[0]
            out = p if out is None else torch.where((levels == level)[:, None, None], p, out)
        return out

    return probs


#: Head class -> ``(head, outputs, stride4_size) -> mask_probs(levels, cells)``. A new head
#: registers its fixed-size version here (subclasses inherit their parent's entry).
FIXED_SIZE_MASK_PROBS: Dict[type, Callable] = {
    SOLOv2Head: _solov2_mask_probs,
    DecoupledSOLOHead: _decoupled_mask_probs,
    DecoupledSOLOLightHead: _decoupled_mask_probs,
    SOLOHead: _solo_mask_probs,
}


def _fixed_size_mask_probs_fn(head: SOLOHeadBase) -> Callable:
    for cls in type(head).__mro__:
        if cls in FIXED_SIZE_MASK_PROBS:
            return FIXED_SIZE_MASK_PROBS[cls]
    raise ExportError(
        f"Head {type(head).__name__} has no fixed-size mask function for export: add one to "
        "solo.export.FIXED_SIZE_MASK_PROBS."
    )


# ----------------------------------------------------------------------------------------------
# The exported module
# ----------------------------------------------------------------------------------------------


def _postprocess_args(postprocessor, max_candidates: int) -> dict:
    if postprocessor.nms_type != "matrix":
        raise ExportError(
            f"MODEL.SOLO.NMS_TYPE={postprocessor.nms_type!r} (greedy mask NMS) cannot be exported: "
            "its number of suppression steps depends on the data. Export with "
            "MODEL.SOLO.NMS_TYPE matrix (Matrix NMS, the SOLOv2 default)."
        )
    if max_candidates < 1:
        raise ExportError(f"max_candidates (K0) must be >= 1, got {max_candidates}.")
    return dict(
        max_candidates=int(max_candidates),
        min_mask_areas=[float(a) for a in postprocessor.min_mask_areas],
        score_thresh=float(postprocessor.score_thresh),
        mask_thresh=float(postprocessor.mask_thresh),
        nms_pre=int(postprocessor.nms_pre),
        update_thresh=float(postprocessor.update_thresh),
        matrix_nms_kernel=postprocessor.matrix_nms_kernel,
        matrix_nms_sigma=float(postprocessor.matrix_nms_sigma),
        max_per_image=int(postprocessor.max_per_image),
    )


class SOLOExportModule(nn.Module):
    """Normalisation + backbone + head + :func:`fixed_size_postprocess` for one padded image.

    ``forward(image)``: (1, 3, H, W) float32 pixels in INPUT.FORMAT, H and W multiples of
    ``size_divisibility``, padding filled with the pixel mean (which normalises to exactly the 0
    that the eager model pads with). Returns the outputs of :func:`fixed_size_postprocess`.

    Raises :class:`ExportError` for greedy mask NMS or a head without a fixed-size mask function.
    """

    def __init__(self, model: nn.Module, max_candidates: int):
        super().__init__()
        self.backbone = model.backbone
        self.head = model.head
        self.in_features = list(model.head_in_features)
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone(), False)
        self.register_buffer("pixel_std", model.pixel_std.detach().clone(), False)
        self.postprocess_args = _postprocess_args(model.postprocessor, max_candidates)
        self.mask_probs_fn = _fixed_size_mask_probs_fn(model.head)
        self.size_divisibility = max(int(model.backbone.size_divisibility), 1)

    def forward(self, image: torch.Tensor):
        x = (image - self.pixel_mean) / self.pixel_std
        features = self.backbone(x)
        outputs = self.head([features[f] for f in self.in_features])
        size = (x.shape[-2] // 4, x.shape[-1] // 4)
        mask_probs = self.mask_probs_fn(self.head, outputs, size)
        return fixed_size_postprocess(outputs.cate_logits, mask_probs, **self.postprocess_args)


def pad_image(
    image: torch.Tensor, pixel_mean: torch.Tensor, size_divisibility: int, min_blocks: int = 2
):
    """(3, H, W) image -> (1, 3, Hp, Wp) float32, bottom/right padded with the pixel mean to a
    multiple of ``size_divisibility`` and at least ``min_blocks`` times it (2 in
    ``SOLO.preprocess_image``)."""
    h, w = image.shape[-2:]
    d = size_divisibility
    hp, wp = max(-(-h // d) * d, min_blocks * d), max(-(-w // d) * d, min_blocks * d)
    padded = pixel_mean.to(torch.float32).reshape(1, 3, 1, 1).expand(1, 3, hp, wp).clone()
    padded[0, :, :h, :w] = image
    return padded


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

        from .checkpoint import SOLOCheckpointer

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

    from .layers import DeformConv, DeformConvPack

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


class ExportedModel:
    """An exported SOLO model called exactly like the eager one (see the module docstring).

    Args:
        path: a file written by :func:`export_model`: ``.onnx`` runs in ONNX Runtime (CPU, or
            CUDA when ``device`` is "cuda"), ``.ts`` in TorchScript, ``.pt2`` as a
            ``torch.export`` program.
        device: "cpu" or "cuda"; outputs are on this device.
        num_threads: intra-op threads of ONNX Runtime (default: ``torch.get_num_threads()``).

    Raises:
        ExportError: unknown suffix, a file without SOLO export metadata, or ONNX Runtime not
            installed.

    Images are processed one at a time (the graph has batch 1). Attribute
    ``last_num_candidates`` holds the candidate counts of the last call.
    """

    def __init__(self, path: str, device: str = "cpu", num_threads: Optional[int] = None):
        suffix = os.path.splitext(path)[1]
        runtimes = {v: k for k, v in EXPORT_FORMATS.items()}
        if suffix not in runtimes:
            raise ExportError(
                f"{path}: unknown exported model type {suffix!r}; expected one of "
                f"{sorted(runtimes)} (written by tools/export_model.py)."
            )
        if not os.path.isfile(path):
            raise ExportError(f"{path}: no such file.")
        self.path = path
        self.format = runtimes[suffix]
        self.device = torch.device(device)
        self.num_threads = num_threads or torch.get_num_threads()
        self.last_num_candidates: List[int] = []
        loaders = {"onnx": self._load_onnx, "torchscript": self._load_ts, "pt2": self._load_pt2}
        meta = loaders[self.format]()
        if not meta:
            raise ExportError(
                f"{path} has no SOLO export metadata ({METADATA_KEY}): export it with "
                "tools/export_model.py."
            )
        self.metadata = json.loads(meta)
        self.input_format = self.metadata["input_format"]
        self.pixel_mean = torch.tensor(self.metadata["pixel_mean"])
        self.size_divisibility = self.metadata["size_divisibility"]
        self.mask_thresh = self.metadata["mask_thresh"]
        self.max_candidates = self.metadata["max_candidates"]
        self.min_blocks = self.metadata["min_blocks"]

    def check_config(self, cfg) -> None:
        """Refuse a config that describes another model than the exported one.

        The graph fixes what ``MODEL.*`` (network, thresholds, NMS), ``INPUT.FORMAT`` and
        ``TEST.DETECTIONS_PER_IMAGE`` said at export time: a config given next to the file (e.g.
        to ``demo.predictor.Predictor``) that sets them otherwise would be silently ignored.
        ``MODEL.WEIGHTS`` and ``MODEL.DEVICE`` may differ; test-time resizing (``INPUT.*_TEST``)
        runs outside the graph and follows ``cfg``.

        Raises:
            ExportError: listing each differing key with its exported and configured value.
        """
        from detectron2.config import CfgNode

        exported = self.metadata.get("config")
        if not exported:  # exported from a model object: only the metadata's fields are known
            known = {
                "INPUT.FORMAT": self.input_format,
                "MODEL.SOLO.NUM_CLASSES": self.metadata["num_classes"],
            }
        else:
            known = _flat_inference_keys(CfgNode.load_cfg(exported))
        configured = _flat_inference_keys(cfg)
        diffs = [
            f"{key}: exported {known[key]!r}, config {configured.get(key)!r}"
            for key in sorted(known)
            if configured.get(key) != known[key]
        ]
        if diffs:
            raise ExportError(
                f"{self.path} was exported with other settings than the config gives; the "
                "exported graph fixes them, so the config's values would be ignored:\n  "
                + "\n  ".join(diffs)
                + "\nUse the export's settings in the config, or re-export with "
                "tools/export_model.py and the new ones."
            )

    def _load_onnx(self) -> str:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ExportError(
                f'Running {self.path} needs onnxruntime: pip install -e .[export] "numpy<2"'
            ) from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(self.path, options, providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        return meta.get(METADATA_KEY, "")

    def _load_ts(self) -> str:
        extra = {METADATA_KEY: ""}
        self.module = torch.jit.load(self.path, map_location=self.device, _extra_files=extra)
        return extra[METADATA_KEY]

    def _load_pt2(self) -> str:
        import torchvision  # noqa: F401  (registers torchvision::deform_conv2d for DCN models)

        extra = {METADATA_KEY: ""}
        program = torch.export.load(self.path, extra_files=extra)
        self.module = program.module().to(self.device)
        return extra[METADATA_KEY]

    def run_graph(self, padded: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The graph's raw outputs (see :func:`fixed_size_postprocess`) for a padded image."""
        if self.format == "onnx":
            outputs = self.session.run(None, {"image": padded.cpu().numpy()})
            return tuple(torch.from_numpy(o).to(self.device) for o in outputs)
        with torch.no_grad():
            return tuple(self.module(padded.to(self.device)))

    def __call__(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        self.last_num_candidates = []
        return [self._single_image(x, i) for i, x in enumerate(batched_inputs)]

    def _single_image(self, inputs, index):
        image = inputs.get("image") if isinstance(inputs, dict) else None
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(
                f"batched_inputs[{index}]['image'] must be a (3, H, W) tensor in "
                f"INPUT.FORMAT={self.input_format!r}, got {shape}."
            )
        h, w = image.shape[-2:]
        output_size = (int(inputs.get("height", h)), int(inputs.get("width", w)))
        padded = pad_image(image.float(), self.pixel_mean, self.size_divisibility, self.min_blocks)
        scores, labels, masks, num_det, num_cand = self.run_graph(padded)
        num_det, num_cand = int(num_det), int(num_cand)
        self.last_num_candidates.append(num_cand)
        if num_cand > self.max_candidates:
            logger.warning(
                f"{num_cand} candidates above MODEL.SOLO.SCORE_THRESH, more than the "
                f"{self.max_candidates} (K0) the exported model considers: only the best "
                "category scores were kept, results may differ from the eager model. Re-export "
                "with a larger --max-candidates."
            )
        result = Instances(output_size)
        result.pred_masks, result.pred_boxes = paste_masks(
            masks[:num_det], tuple(padded.shape[-2:]), (h, w), output_size, self.mask_thresh
        )
        result.scores = scores[:num_det].float()
        result.pred_classes = labels[:num_det].long()
        return {"instances": result}


def _flat_inference_keys(cfg) -> Dict[str, object]:
    """``MODEL.*`` (but ``WEIGHTS``, ``DEVICE``), ``INPUT.FORMAT`` and
    ``TEST.DETECTIONS_PER_IMAGE`` of a config, flattened to ``{"MODEL.SOLO.NMS_PRE": 500, ...}``
    with lists as tuples (a loaded YAML has lists where a merged config has tuples)."""

    def plain(value):
        return tuple(map(plain, value)) if isinstance(value, (list, tuple)) else value

    def flat(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", plain(value)

    keys = dict(flat(cfg.MODEL, "MODEL."))
    keys.pop("MODEL.WEIGHTS", None)
    keys.pop("MODEL.DEVICE", None)
    keys["INPUT.FORMAT"] = cfg.INPUT.FORMAT
    keys["TEST.DETECTIONS_PER_IMAGE"] = cfg.TEST.DETECTIONS_PER_IMAGE
    return keys


def paste_masks(
    probs: torch.Tensor,
    padded_size: Tuple[int, int],
    image_size: Tuple[int, int],
    output_size: Tuple[int, int],
    mask_thresh: float,
    chunk_size: int = 4,
):
    """Stride-4 soft masks (K, h, w) -> bool masks (K, *output_size) and their boxes, as the eager
    post-processor: upsample to the padded input, crop to the image, resize, binarise."""
    h, w = image_size
    out = torch.zeros((len(probs), *output_size), dtype=torch.bool, device=probs.device)
    boxes = [torch.zeros((0, 4), device=probs.device)]
    for start in range(0, len(probs), chunk_size):
        part = resize(probs[start : start + chunk_size][None], padded_size)[:, :, :h, :w]
        if (h, w) != tuple(output_size):
            part = resize(part, output_size)
        torch.gt(part[0], mask_thresh, out=out[start : start + chunk_size])
        boxes.append(masks_to_boxes(out[start : start + chunk_size]).tensor)
    return out, Boxes(torch.cat(boxes))


def compare_predictions(
    expected: Instances, actual: Instances, score_atol: float = 1e-3, mask_tol: float = 1e-3
) -> List[str]:
    """Differences between eager and exported predictions of one image (empty list: same).

    Same number of instances and classes in the same order, scores within ``score_atol``, and
    each mask differing in at most ``mask_tol`` of the image's pixels (at least 4): float
    rounding moves a few pixels whose upsampled probability is within ~1e-6 of MASK_THRESH.
    """
    if len(expected) != len(actual):
        return [f"{len(actual)} instances instead of {len(expected)}"]
    problems = []
    if len(expected) == 0:
        return problems
    if not torch.equal(expected.pred_classes.cpu(), actual.pred_classes.cpu()):
        problems.append("different classes")
    score_diff = (expected.scores.cpu() - actual.scores.cpu()).abs().max().item()
    if score_diff > score_atol:
        problems.append(f"scores differ by up to {score_diff:.2g} (tolerance {score_atol})")
    masks_e, masks_a = expected.pred_masks.cpu(), actual.pred_masks.cpu()
    if masks_e.shape != masks_a.shape:
        return problems + [f"mask shape {tuple(masks_a.shape)} instead of {tuple(masks_e.shape)}"]
    pixel_diff = (masks_e != masks_a).flatten(1).sum(dim=1).max().item()
    allowed = max(4, int(mask_tol * masks_e[0].numel()))
    if pixel_diff > allowed:
        problems.append(f"a mask differs in {pixel_diff} pixels (tolerance {allowed})")
    return problems
