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

from .formats import EXPORT_FORMATS, ExportError, is_exported_model_file
from .module import SOLOExportModule, fixed_size_postprocess
from ..modeling.paste import paste_masks
from .runtime import ExportedModel, compare_predictions, pad_image
from .writers import export_model

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
