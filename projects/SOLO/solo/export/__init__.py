"""Exact export of SOLO / Decoupled SOLO / SOLOv2 to ONNX, TorchScript and torch.export (.pt2).

Public API (``from solo.export import ...``)::

    export_model(cfg_or_model, fmt, output_dir, sample_image=None, max_candidates=None,
                 dynamo=False, config=None) -> str
        fmt: "onnx" | "torchscript" | "pt2"; writes ``output_dir/model.{onnx,ts,pt2}`` and
        returns its path. ``cfg_or_model``: a config (the model is built and MODEL.WEIGHTS loaded
        strictly) or a built SOLO model (copied, in eval mode). ``sample_image``: a (3, H, W)
        tensor in INPUT.FORMAT used for tracing (default: a seeded random 320x320 image; the
        exported graph pads its input itself and accepts any H and W, torch.export programs
        within a range, see below). ``max_candidates``: K0 below (default
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
    SOLOExportModule(model, max_candidates, min_blocks=2)
        The traced ``nn.Module``: one (1, 3, H, W) float32 image -> fixed-size outputs. Its
        post-processing is ``SOLOPostProcessor.fixed_size`` (the eager post-processor's
        static-shape entry point) with the head's ``fixed_size_mask_probs``.

What is in the graph (batch 1, dynamic H and W): normalisation, padding (bottom/right, to the
backbone's size divisibility and at least ``min_blocks`` times it, with the 0 that the eager
model pads normalised images with: the same function; a backbone with square padding, ViTDet's
``square_pad``, gets every image padded to that square, and ``ExportedModel`` refuses larger
images, as the eager model does), backbone, head, and the fixed-size path
of ``SOLOPostProcessor``: point NMS, the
top K0 (cell, class) scores with a validity mask (the official multi-label candidates), the masks
of those K0 only, area filter and maskness by masking, the top ``NMS_PRE``, Matrix NMS as matrix
products, the top ``TEST.DETECTIONS_PER_IMAGE``. Outputs: ``scores`` (D,), ``labels`` (D,) int64,
``masks`` (D, H/4, W/4) soft masks, ``num_detections`` and ``num_candidates`` (0-dim int64).

The K0 trade-off: results equal eager inference whenever an image has at most K0 candidates
(cell, class pairs scoring above ``SCORE_THRESH``). With more, only the K0 best category scores
are considered (the eager model would rank all of them by maskness-rescored score), and
``ExportedModel`` warns with the count. The cost of the graph grows with K0, not with the actual
number of candidates.

Outside the graph (cheap and size-dependent, as in eager inference): upsampling, cropping and
thresholding the masks, and their boxes. Greedy ``NMS_TYPE: mask`` has a data-dependent number
of steps and is refused.

The file's contract is in its metadata (``solo_export.json``, version 2): ``input`` (shape,
dtype, pixels, side range), ``padding`` and ``outputs``. ``torch.export`` programs (``pt2``,
``dynamo`` ONNX) have a range of input sizes: sides up to ``MAX_SIDE`` (8192; ``ExportedModel``
refuses larger images naming the limit) and from ``d + 1`` (33 pixels for d = 32), which
``ExportedModel`` reaches for smaller images by padding them with the pixel mean (the eager
model's canvas, exactly). With a torch that cannot export sizes obliviously (see
``formats.MIN_BLOCKS``) programs pad to 3 blocks where the eager model pads to 2, and images
with a side of at most 2 blocks are refused with the reason instead of giving other results.
Files of version 1 (the graph took an input padded outside it) still load and run.

Backbones whose Detectron2 code freezes the sample's sizes into a trace
(:mod:`solo.export.traceable`): MViTv2's attention is replaced, in the exported copy, by one
computing the same values from traced sizes; ViT exports only with square padding and MViTv2
only without absolute position embeddings (others are refused, naming the setting to use).

Tracing or exporting the eager ``SOLO`` model itself (``torch.jit.trace``, Detectron2's
``TracingAdapter``, ``torch.onnx.export``, ``torch.export``) raises an error that points here:
its post-processing has data-dependent shapes.
"""

from .formats import EXPORT_FORMATS, ExportError, is_exported_model_file
from .module import SOLOExportModule
from .runtime import ExportedModel, compare_predictions, pad_image
from .writers import export_model

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportedModel",
    "SOLOExportModule",
    "compare_predictions",
    "export_model",
    "is_exported_model_file",
    "pad_image",
]
