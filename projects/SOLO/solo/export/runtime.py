"""Running exported files: :class:`ExportedModel`, called like the eager model."""

import json
import logging
import os
from typing import Dict, List, Optional, Tuple
import torch

from detectron2.structures import Instances

from ..modeling.meta_arch import MIN_BLOCKS as EAGER_MIN_BLOCKS
from ..modeling.meta_arch import padded_size
from ..modeling.panoptic import panoptic_outputs
from ..modeling.paste import paste_masks
from .formats import EXPORT_FORMATS, MAX_SIDE, METADATA_KEY, MIN_BLOCKS, ExportError
from .openvino import OPENVINO_PRECISIONS, openvino_session

logger = logging.getLogger(__name__)


#: Export format -> the runtimes that run it, the default first.
RUNTIMES = {
    "onnx": ("onnxruntime", "openvino"),
    "torchscript": ("torchscript",),
    "pt2": ("torch.export",),
}
#: ``ExportedModel(precision=...)`` values (OpenVINO's; the other runtimes accept "f32" only).
PRECISIONS = tuple(OPENVINO_PRECISIONS)


def pad_image(
    image: torch.Tensor, pixel_mean: torch.Tensor, size_divisibility: int, min_blocks: int = 2
):
    """(3, H, W) image -> (1, 3, Hp, Wp) float32, bottom/right padded with the pixel mean to
    :func:`solo.modeling.meta_arch.padded_size` (a multiple of ``size_divisibility``, at least
    ``min_blocks`` times it): the input that files of metadata version 1 expect. (Version 2
    graphs pad their input themselves; the graph normalises the mean to exactly the 0 that the
    eager model pads with.)"""
    h, w = image.shape[-2:]
    hp, wp = padded_size(h, w, size_divisibility, min_blocks * size_divisibility)
    padded = pixel_mean.to(torch.float32).reshape(1, 3, 1, 1).expand(1, 3, hp, wp).clone()
    padded[0, :, :h, :w] = image
    return padded


class CandidateCounts:
    """Per-image candidate counts seen by an :class:`ExportedModel`: ``images``, ``over_k0``
    (images with more candidates than the graph's K0) and ``max`` (the largest count)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.images, self.over_k0, self.max = 0, 0, 0

    def add(self, count: int, k0: int):
        self.images += 1
        self.over_k0 += int(count > k0)
        self.max = max(self.max, count)

    def summary(self, k0: int) -> str:
        """One line for a log: exact on every image, or how many were cut and the K0 to use."""
        head = f"{self.images} images, at most {self.max} candidates per image (K0 = {k0})"
        if not self.over_k0:
            return f"{head}: every image within K0, none cut short by it."
        return (
            f"{head}: {self.over_k0} images had more than K0, only their K0 best category scores "
            f"were kept; re-export with --max-candidates {self.max} or more."
        )


class ExportedModel:
    """An exported SOLO model called exactly like the eager one (see the module docstring).

    Args:
        path: a file written by :func:`export_model`: ``.onnx`` runs in ONNX Runtime (CPU, or
            CUDA when ``device`` is "cuda"), ``.ts`` in TorchScript, ``.pt2`` as a
            ``torch.export`` program.
        device: "cpu" or "cuda"; outputs are on this device.
        num_threads: intra-op threads of ONNX Runtime or OpenVINO (default:
            ``torch.get_num_threads()``).
        runtime: None (by suffix: ``.onnx`` -> "onnxruntime", ``.ts`` -> "torchscript",
            ``.pt2`` -> "torch.export"), or "openvino" for an ``.onnx`` file on CPU
            (:mod:`solo.export.openvino`).
        precision: OpenVINO's inference precision, "f32" (exact), "bf16" or "f16" (opt-in,
            where the CPU has it); other runtimes run the file's own precision ("f32" only).

    Raises:
        ExportError: unknown suffix, a file without SOLO export metadata, a runtime that cannot
            run the file, ONNX Runtime / OpenVINO not installed, or a ``device`` the runtime
            cannot run on (e.g. "cuda" with an onnxruntime without the CUDA provider: install
            onnxruntime-gpu). Calls raise it for an image outside the input range a
            ``torch.export`` program takes (see :meth:`graph_input`).

    Images are processed one at a time (the graph has batch 1). Attribute
    ``last_num_candidates`` holds the candidate counts of the last call; ``candidate_counts``
    (:class:`CandidateCounts`) tallies every image since construction or its ``reset()``: how
    many had more candidates than K0 (results that may differ from the eager model's).
    """

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        num_threads: Optional[int] = None,
        runtime: Optional[str] = None,
        precision: str = "f32",
    ):
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
        self.candidate_counts = CandidateCounts()
        self.runtime = runtime or RUNTIMES[self.format][0]
        if self.runtime not in RUNTIMES[self.format]:
            raise ExportError(
                f"{path}: runtime {self.runtime!r} cannot run a {self.format} file; expected one "
                f"of {list(RUNTIMES[self.format])}."
            )
        if self.runtime == "openvino" and self.device.type != "cpu":
            raise ExportError(f"runtime 'openvino' runs on the CPU, not device {device!r}.")
        if precision != "f32" and self.runtime != "openvino":
            raise ExportError(
                f"precision {precision!r} is OpenVINO's (runtime='openvino'); {self.runtime} "
                "runs the file's own precision: export with --precision fp16 or --quantize int8."
            )
        self.precision = precision
        loaders = {"onnx": self._load_onnx, "torchscript": self._load_ts, "pt2": self._load_pt2}
        if self.runtime == "openvino":
            self._openvino_run, meta = openvino_session(path, self.num_threads, precision)
        else:
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
        # The side every image is padded to (a backbone with square padding: ViTDet), else 0.
        self.square_side = self.metadata.get("square_side", 0)
        # Version 1 files take an input padded outside the graph and record no input range.
        self.pads_in_graph = self.metadata["version"] >= 2
        self.input_range = self.metadata.get("input") or _version1_input_range(self.metadata)
        # A panoptic model's merge settings (its graph has a sixth output), else None.
        self.panoptic = self.metadata.get("panoptic")

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
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ExportError(_no_cuda_provider(device=self.device, providers=None))
            cuda_options = {"device_id": self.device.index or 0}
            providers.insert(0, ("CUDAExecutionProvider", cuda_options))
        elif self.device.type != "cpu":
            raise ExportError(
                f"ONNX Runtime runs {self.path} on 'cpu' or 'cuda', not on device "
                f"{str(self.device)!r}."
            )
        self.session = ort.InferenceSession(self.path, options, providers=providers)
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in (
            self.session.get_providers()
        ):  # the provider is installed but failed to load (CUDA/cuDNN libraries)
            raise ExportError(_no_cuda_provider(self.device, self.session.get_providers()))
        meta = self.session.get_modelmeta().custom_metadata_map
        return meta.get(METADATA_KEY, "")

    def _check_torch_device(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ExportError(
                f"device {str(self.device)!r} was requested for {self.path}, but this PyTorch "
                "has no usable CUDA device (torch.cuda.is_available() is False): install a "
                "CUDA build of PyTorch or use device 'cpu'."
            )

    def _load_ts(self) -> str:
        self._check_torch_device()
        extra = {METADATA_KEY: ""}
        self.module = torch.jit.load(self.path, map_location=self.device, _extra_files=extra)
        return extra[METADATA_KEY]

    def _load_pt2(self) -> str:
        import torchvision  # noqa: F401  (registers torchvision::deform_conv2d for DCN models)

        self._check_torch_device()
        extra = {METADATA_KEY: ""}
        program = torch.export.load(self.path, extra_files=extra)
        self.module = program.module().to(self.device)
        return extra[METADATA_KEY]

    def graph_input(self, image: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """The graph's input for a (3, H, W) image in INPUT.FORMAT, and the padded size (Hp, Wp)
        its masks refer to (at stride 4).

        Version 2 files pad inside the graph: the input is the image as (1, 3, H, W) float32;
        a side under a torch.export program's minimum is first padded with the pixel mean
        (which normalises to the 0 the graph pads with) when that gives the eager model's
        padded canvas. Version 1 files take the input padded (:func:`pad_image`).

        Raises:
            ExportError: a side outside what the file can run exactly (a backbone with square
                padding: at most its square; ``torch.export`` programs: at most MAX_SIDE
                pixels; version 1 programs also at least MIN_BLOCKS - 1 blocks plus one pixel),
                named before the program's own guard.
        """
        h, w = image.shape[-2:]
        d, low = self.size_divisibility, self.input_range.get("min_side") or 1
        high = self.input_range.get("max_side")
        side = self.square_side
        if side and max(h, w) > side:
            raise ExportError(
                f"{self.path} pads every image to {side}x{side} (its backbone's square padding, "
                f"e.g. ViTDet's square_pad); got a {h}x{w} image, which the eager model refuses "
                f"too. Resize it to a long side of at most {side} pixels (the "
                "config's test resizing, max_size, does), or re-export with a larger square_pad."
            )
        if high and max(h, w) > high:
            raise ExportError(
                f"{self.path} ({self.format}) takes images with sides up to {high} pixels "
                f"(the bound of a torch.export program's dynamic shapes), got {h}x{w}. Resize "
                "the image (INPUT.MAX_SIZE_TEST), or export with --format onnx or "
                "torchscript, which take any size."
            )
        if not self.pads_in_graph:
            if min(h, w) < low:
                raise ExportError(_too_small(self.path, h, w, low, d))
            padded = pad_image(image.float(), self.pixel_mean, d, self.min_blocks)
            return padded, tuple(padded.shape[-2:])
        x = image.float()
        if min(h, w) < low:
            x = pad_image(x, self.pixel_mean, 1, low)[0]
            eager = self._padded(h, w) if side else padded_size(h, w, d, EAGER_MIN_BLOCKS * d)
            if self._padded(*x.shape[-2:]) != eager:
                raise ExportError(_too_small(self.path, h, w, low, d))
        return x[None], self._padded(*x.shape[-2:])

    def _padded(self, h: int, w: int) -> Tuple[int, int]:
        if self.square_side:
            return self.square_side, self.square_side
        return padded_size(h, w, self.size_divisibility, self.min_blocks * self.size_divisibility)

    def run_graph(self, graph_input: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The graph's raw outputs (see ``SOLOPostProcessor.fixed_size``) for a
        :meth:`graph_input`."""
        if self.runtime == "openvino":
            outputs = self._openvino_run(graph_input.cpu().numpy())
            return tuple(torch.from_numpy(o) for o in outputs)
        if self.format == "onnx":
            outputs = self.session.run(None, {"image": graph_input.cpu().numpy()})
            return tuple(torch.from_numpy(o).to(self.device) for o in outputs)
        with torch.no_grad():
            return tuple(self.module(graph_input.to(self.device)))

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
        graph_input, padded = self.graph_input(image)
        outputs = self.run_graph(graph_input)
        scores, labels, masks, num_det, num_cand = outputs[:5]
        num_det, num_cand = int(num_det), int(num_cand)
        self.last_num_candidates.append(num_cand)
        self.candidate_counts.add(num_cand, self.max_candidates)
        if num_cand > self.max_candidates:
            logger.warning(
                f"{num_cand} candidates above MODEL.SOLO.SCORE_THRESH, more than the "
                f"{self.max_candidates} (K0) the exported model considers: only the best "
                f"category scores were kept, results may differ from the eager model. Re-export "
                f"with --max-candidates {num_cand} or more."
            )
        result = Instances(output_size)
        result.pred_masks, result.pred_boxes = paste_masks(
            masks[:num_det], padded, (h, w), output_size, self.mask_thresh
        )
        result.scores = scores[:num_det].float()
        result.pred_classes = labels[:num_det].long()
        if self.panoptic is None:
            return {"instances": result}
        p = self.panoptic  # semantic logits from the graph, the merge here, as the eager model
        merged = panoptic_outputs(
            outputs[5][0],
            p["semantic_stride"],
            result,
            (h, w),
            output_size,
            p["overlap_thresh"],
            p["stuff_area_thresh"],
            p["instances_score_thresh"],
        )
        return {"instances": result, **merged}


def _no_cuda_provider(device, providers) -> str:
    import onnxruntime as ort

    got = f"the session got {providers}" if providers else "it has no CUDAExecutionProvider"
    return (
        f"device {str(device)!r} was requested, but this onnxruntime ({ort.__version__}, "
        f"providers {ort.get_available_providers()}) cannot run on CUDA: {got}. Install the GPU "
        "build (pip uninstall onnxruntime && pip install onnxruntime-gpu) with the CUDA and "
        "cuDNN versions it needs, or use device 'cpu'."
    )


def _version1_input_range(metadata: dict) -> dict:
    """Version 1 files: torch.export programs (padding to MIN_BLOCKS blocks) took padded sides
    up to MAX_SIDE // d blocks."""
    if metadata.get("min_blocks", 2) < MIN_BLOCKS:  # traced (TorchScript, ONNX): any size
        return {"min_side": 1, "max_side": None}
    d = metadata["size_divisibility"]
    return {"min_side": (MIN_BLOCKS - 1) * d + 1, "max_side": MAX_SIDE // d * d}


def _too_small(path: str, h: int, w: int, low: int, d: int) -> str:
    return (
        f"{path} is a torch.export program that takes sides of at least {low} pixels, got "
        f"{h}x{w}: it pads every side to at least {MIN_BLOCKS} blocks of {d} pixels where the "
        f"eager model pads smaller sides to {EAGER_MIN_BLOCKS} (torch.export specialises sizes "
        "of 1, and P6 is 1x1 there), so its results would differ. Resize the image, re-export "
        "with a torch that has torch.fx.experimental._config.backed_size_oblivious (then "
        "programs pad as the eager model does), or export with --format onnx or torchscript."
    )


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
    keys.pop("MODEL.SOLO.CHANNELS_LAST_ON_CPU", None)  # exports before it moved to the top
    keys["INPUT.FORMAT"] = cfg.INPUT.FORMAT
    keys["TEST.DETECTIONS_PER_IMAGE"] = cfg.TEST.DETECTIONS_PER_IMAGE
    return keys


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
