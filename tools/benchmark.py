#!/usr/bin/env python
"""Benchmark SOLO / Decoupled SOLO / SOLOv2 (inference, training, data loading), optionally
against Detectron2's Mask R-CNN R50-FPN on the same machine, input and thread count.

Examples (run from the repository root)::

    # per-part inference latency at 800x1216 on 2 CPU threads, vs Mask R-CNN, JSON report
    python tools/benchmark.py --config-file configs/SOLOv2/R50_3x.yaml --task inference \\
        --compare mask_rcnn --json bench.json

    # training s/iter (2 images of 512x768, 50 random instances each), target-assignment share
    python tools/benchmark.py --config-file configs/SOLO/R50_1x.yaml --task train \\
        --input-size 512 768 --repeats 3 --compare mask_rcnn

    # data-loader images/s on the built-in shapes dataset
    python tools/benchmark.py --config-file configs/SOLOv2/R50_3x.yaml --task data --repeats 20

Models have random weights (no download), which would leave post-processing idle, so both are
calibrated on the benchmark input before timing (what was done is in the JSON "calibration"):

* SOLO: per class, ``cate_pred``'s weight and bias are rescaled so that, after point NMS, about
  ``MODEL.SOLO.NMS_PRE`` (cell, class) candidates in all, spread over the classes, score between
  ``SCORE_THRESH`` and 0.9 (random weights otherwise favour a handful of classes, and Matrix NMS
  then leaves ~1 instance per class); SOLO v1 / Decoupled mask predictions are rescaled so that
  every mask covers ~30% of the image with sharp logits (SOLOv2 masks need nothing). Result:
  ~NMS_PRE candidates reach Matrix NMS and ~MAX_PER_IMAGE instances come out.
* Mask R-CNN: ``ROI_HEADS.SCORE_THRESH_TEST 0``, and the RPN and box-regression deltas zeroed
  (random deltas collapse the proposals to ~10 degenerate boxes): the ROI heads get the full
  1000 proposals and 100 detections come out. In training, the same layers are zeroed and
  frozen, so that the ROI heads sample their full 512 ROIs per image (see "event_scalars").

Each model is measured in a fresh ``spawn`` subprocess (``--in-process`` to disable; the data
task always runs in-process), so that its peak RSS is its own. Inference (1 image) parts are
timed by running, on the same input and in the same order as ``SOLO.forward``:
``preprocess_image``, ``backbone``, ``head`` and the ``SOLOPostProcessor`` call (Mask R-CNN:
preprocess, backbone, "head" = RPN + ROI heads incl. box NMS and mask head, "postprocess" =
``detector_postprocess`` mask pasting); ``total`` is a separate end-to-end ``model([...])``
call. Figures are the median of ``--repeats`` runs after ``--warmup`` runs (mean, min too).
FLOPs (fvcore, backbone and head) are turned into a floor with the measured throughput of a
3x3 conv 256 -> 256 at stride 4 of the input (1x256x200x304 at 800x1216): floor_ms = GFLOPs /
(GFLOP/s), efficiency = floor / measured. Training: forward + backward + the config's optimizer
step (lr 0: the full step, with a zero update, so that every iteration sees the same weights)
on ``--batch-size`` images with ``--instances-per-image`` random rectangles/ellipses; SOLO's
target assignment is also timed alone. Data: ``build_detection_train_loader`` (SOLO: with
``SOLODatasetMapper``) on the config's train datasets, or the built-in ``shapes_train`` when
they are not available.

JSON report (``--json FILE``), times in ms unless named ``_s``, memory in MB, FLOPs in GFLOPs
(fvcore's convention: one multiply-add = one flop)::

    {"schema_version": 1, "task", "config_file", "input_size": [H, W], "batch_size",
     "repeats", "warmup", "compare": "mask_rcnn" | null, "opts",
     "machine": {"cpu_model", "logical_cpus", "threads", "device", "torch", "detectron2",
                 "python", "cuda_device"},
     "conv_probe": {"shape", "kernel", "gflops", "runs", "median_ms", "min_ms",
                    "gflops_per_s"} | null (inference only),
     "ratio": ours / Mask R-CNN (inference: total latency; train: s/iter; data: s/image) | null,
     "ratios": {part or figure: ours / Mask R-CNN},  # latency parts, memory, GFLOPs, iter_s
     "calibrated", "candidates_before_nms", "instances_out",   # ours, inference task only
     "models": {"ours": MODEL, "mask_rcnn": MODEL}}
    every MODEL = {"name", "config_file", "head", "backbone", "params_m", "memory_mb":
        {"kind": "rss" | "cuda_max_allocated", "peak", "before_model",
         "peak_minus_before_model", "peak_reset"}, ...}
    MODEL (inference) += {"latency_ms": {"preprocess"|"backbone"|"head"|"postprocess"|"total"|
            "parts_sum"|"postprocess_mask_products" (ours: the candidates' mask predictions,
            part of "postprocess"): {"median", "mean", "min"}},
        "calibrated", "candidates_before_nms", "instances_out", "calibration": {...},
        "flops": {"backbone_gflops", "head_gflops", "backbone_head_gflops", "floor_ms",
            "measured_ms", "efficiency", "per_part": {"backbone"|"head": {"floor_ms",
            "measured_ms", "efficiency"}}}}
    MODEL (train) += {"iter_s": {"median", "mean", "min"}, "targets_ms": {...} | null,
        "targets_share": share of the iteration | null, "instances_per_image", "lr", "losses",
        "event_scalars": e.g. Mask R-CNN's roi_head/num_fg_samples, SOLO's solo/num_pos_p*}
    MODEL (data) += {"dataset", "num_workers", "images_per_s", "batch_s": {...}, "mapper",
        "mask_format"}
"""

import argparse
import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

logger = logging.getLogger("benchmark")

SCHEMA_VERSION = 1
MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
FLOP_CONVENTION = "fvcore: one multiply-add counts as one flop"
INFERENCE_PARTS = ("preprocess", "backbone", "head", "postprocess", "total")
# Calibration: every candidate mask covers about this fraction of the image, with this spread
# of its logits (so that maskness is realistic, ~0.9, instead of ~0.5 for random weights).
MASK_COVERAGE = 0.3
MASK_LOGIT_STD = 3.0
CALIBRATION_ATTEMPTS = 5
DEFAULT_REPEATS = {"inference": 5, "train": 5, "data": 50}  # data: beyond the prefetched batches
CATE_SCORE_MAX = 0.9  # calibrated candidates score from SCORE_THRESH up to this
# The step's cost does not depend on lr; with lr 0 every iteration sees the same weights (random
# weights diverge within a few steps at any useful lr, Mask R-CNN's within one).
TRAIN_LR = 0.0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) + "\n",
    )
    parser.add_argument("--config-file", required=True, help="SOLO config (configs/...)")
    parser.add_argument("--task", choices=("inference", "train", "data"), default="inference")
    parser.add_argument("--compare", choices=("mask_rcnn",), default=None)
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--input-size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument(
        "--batch-size", type=int, default=2, help="images per batch (train, data; inference: 1)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs; data: timed batches (default {DEFAULT_REPEATS})",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--instances-per-image", type=int, default=50, help="random targets per image (train)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="measure all models in this process (faster start; peak RSS is then shared "
        "unless /proc/self/clear_refs can reset it)",
    )
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE pairs applied to the SOLO config (not to Mask R-CNN)",
    )
    return parser


def check_args(args: argparse.Namespace):
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS[args.task]
    if min(args.input_size) < 32 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--input-size must be >= 32, --batch-size and --threads >= 1.")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine.")
    if len(args.opts) % 2:
        raise SystemExit(f"--opts needs KEY VALUE pairs, got {args.opts}.")


# ----------------------------------------------------------------------------------------------
# Machine, timing and memory
# ----------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int, device: str) -> dict:
    import detectron2

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": device,
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, *args, **kwargs):
    """(seconds, result) of ``fn(*args, **kwargs)``, synchronised on GPU."""
    synchronize(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize(device)
    return time.perf_counter() - start, result


def summarize(seconds: Sequence[float], scale: float = 1000.0) -> dict:
    """Median, mean and min of timings, in ms by default (``scale=1`` for seconds)."""
    values = [s * scale for s in seconds]
    return {
        "median": round(statistics.median(values), 3),
        "mean": round(statistics.fmean(values), 3),
        "min": round(min(values), 3),
    }


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def current_rss_mb() -> Optional[float]:
    return _proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM, resettable), else getrusage's lifetime peak."""
    peak = _proc_status_mb("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    return peak


def reset_peak_memory(device: str) -> bool:
    """Reset the peak-memory counter; False when it cannot be reset (RSS without clear_refs)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class MemoryTracker:
    """Memory before the model is built and peak during the measured phase."""

    def __init__(self, device: str):
        self.device = device
        self.before_model = self._current()
        self.reset_ok = False

    def _current(self) -> float:
        if self.device == "cuda":
            return torch.cuda.memory_allocated() / 2**20
        return current_rss_mb() or peak_rss_mb()

    def start(self):
        self.reset_ok = reset_peak_memory(self.device)

    def report(self) -> dict:
        if self.device == "cuda":
            kind, peak = "cuda_max_allocated", torch.cuda.max_memory_allocated() / 2**20
        else:
            kind, peak = "rss", peak_rss_mb()
        return {
            "kind": kind,
            "peak": round(peak, 1),
            "before_model": round(self.before_model, 1),
            "peak_minus_before_model": round(peak - self.before_model, 1),
            "peak_reset": self.reset_ok,
        }


def conv_probe(input_size: Sequence[int], device: str, min_seconds: float = 1.0) -> dict:
    """Dense conv throughput: a 3x3 conv 256 -> 256 at stride 4 of the input (1x256x200x304 at
    800x1216), in fvcore flops per second, median over at least 3 runs / ``min_seconds``."""
    shape = (1, 256, max(input_size[0] // 4, 8), max(input_size[1] // 4, 8))
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    weight = (torch.randn((c, c, 3, 3), generator=gen) * 0.02).to(device)
    gflops = n * c * h * w * c * 9 / 1e9
    with torch.no_grad():
        timed(F.conv2d, device, x, weight, padding=1)  # warm-up
        times, start = [], time.perf_counter()
        while len(times) < 3 or (time.perf_counter() - start < min_seconds and len(times) < 50):
            times.append(timed(F.conv2d, device, x, weight, padding=1)[0])
    stats = summarize(times)
    return {
        "shape": list(shape),
        "kernel": [c, c, 3, 3],
        "gflops": round(gflops, 3),
        "runs": len(times),
        "median_ms": stats["median"],
        "min_ms": stats["min"],
        "gflops_per_s": round(gflops / (stats["median"] / 1000.0), 2),
        "flop_convention": FLOP_CONVENTION,
    }


# ----------------------------------------------------------------------------------------------
# Configs, models and inputs
# ----------------------------------------------------------------------------------------------


def build_cfg(job: dict):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    if job["model"] == "mask_rcnn":
        from detectron2 import model_zoo

        cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN_CONFIG))
        # With random weights few detections pass the default 0.05: 0 gives the full 100.
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    else:
        import solo

        solo.add_solo_config(cfg)
        cfg.merge_from_file(job["config_file"])
        cfg.merge_from_list(list(job["opts"]))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = job["device"]
    return cfg


def build_benchmark_model(cfg) -> nn.Module:
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)  # random weights: nothing is loaded
    model.eval()
    return model


def model_info(job: dict, cfg, model: Optional[nn.Module]) -> dict:
    if job["model"] == "mask_rcnn":
        thresh = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST
        head = f"{cfg.MODEL.ROI_HEADS.NAME} (SCORE_THRESH_TEST {thresh})"
        config_file = f"detectron2 model zoo: {MASK_RCNN_CONFIG}"
    else:
        head, config_file = cfg.MODEL.SOLO.HEAD_NAME, job["config_file"]
    info = {"name": job["model"], "config_file": config_file, "head": head}
    info["backbone"] = f"{cfg.MODEL.BACKBONE.NAME} R-{cfg.MODEL.RESNETS.DEPTH}"
    if model is not None:
        info["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    return info


def make_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A deterministic uint8 (3, H, W) image: smooth random blobs plus noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, max(height // 32, 2), max(width // 32, 2)), generator=gen)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = image * 200 + torch.rand((3, height, width), generator=gen) * 55
    return image.clamp(0, 255).to(torch.uint8)


def random_instances(height: int, width: int, count: int, rng: np.random.Generator):
    """Random rectangles and ellipses: BitMasks, gt_boxes (x2 = x + w), gt_classes in [0, 80)."""
    from detectron2.structures import BitMasks, Instances

    ys = torch.arange(height, dtype=torch.float32)[:, None]
    xs = torch.arange(width, dtype=torch.float32)[None, :]
    masks = torch.zeros((count, height, width), dtype=torch.bool)
    for i in range(count):
        w = int(rng.integers(8, max(9, width // 2)))
        h = int(rng.integers(8, max(9, height // 2)))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if rng.random() < 0.5:
            masks[i, y0 : y0 + h, x0 : x0 + w] = True
        else:
            cx, cy = x0 + (w - 1) / 2, y0 + (h - 1) / 2
            masks[i] = ((xs - cx) / (w / 2)) ** 2 + ((ys - cy) / (h / 2)) ** 2 <= 1
    inst = Instances((height, width))
    inst.gt_masks = BitMasks(masks)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.from_numpy(rng.integers(0, 80, count)).long()
    return inst


def inference_inputs(job: dict) -> List[dict]:
    h, w = job["input_size"]
    return [{"image": make_image(h, w, job["seed"]), "height": h, "width": w}]


def train_inputs(job: dict, num_classes: int) -> List[dict]:
    """The same random batch for every model; classes folded into ``num_classes``."""
    h, w = job["input_size"]
    rng = np.random.default_rng(job["seed"])
    batch = []
    for i in range(job["batch_size"]):
        inst = random_instances(h, w, job["instances_per_image"], rng)
        inst.gt_classes = inst.gt_classes % num_classes
        batch.append({"image": make_image(h, w, job["seed"] + i), "instances": inst})
    return batch


# ----------------------------------------------------------------------------------------------
# Calibration of a random-weight SOLO model
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def recording_nms_inputs(record: List[int]):
    """Record how many candidates reach NMS inside ``SOLOPostProcessor`` (patched, restored);
    yields False when the post-processor has no NMS function of a known name to patch."""
    from solo import postprocess

    names = [n for n in ("matrix_nms", "mask_nms") if callable(getattr(postprocess, n, None))]
    originals = {name: getattr(postprocess, name) for name in names}

    def counting(fn):
        def wrapper(masks, labels, scores, *args, **kwargs):
            record.append(len(scores))
            return fn(masks, labels, scores, *args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(postprocess, name, counting(fn))
    try:
        yield bool(originals)
    finally:
        for name, fn in originals.items():
            setattr(postprocess, name, fn)


def _rescale_mask_conv(conv: nn.Conv2d, logits: torch.Tensor, coverage: float):
    """Rescale a mask prediction conv so that each output channel has logits of spread
    MASK_LOGIT_STD over the image and is positive on ``coverage`` of it."""
    with torch.no_grad():
        z = (logits[:1] - conv.bias.view(1, -1, 1, 1)).transpose(0, 1).flatten(1)
        scale = MASK_LOGIT_STD / z.std(dim=1).clamp(min=1e-12)
        z = z * scale[:, None]
        k = min(max(int(round((1 - coverage) * z.shape[1])), 1), z.shape[1])
        threshold = z.kthvalue(k, dim=1).values
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias.copy_(-threshold)


def _full_mask_logits(convs: Sequence[nn.Conv2d], outputs: Sequence[torch.Tensor]):
    """Every channel's logits of the per-level mask convs, whether the head returns their
    output or their input features (heads that later apply only the channels they need)."""
    if all(o.shape[1] == c.out_channels for c, o in zip(convs, outputs)):
        return list(outputs)
    with torch.no_grad():
        return [conv(o[:1]) for conv, o in zip(convs, outputs)]


def calibrate_masks(head, outputs) -> Optional[dict]:
    """SOLO v1 / Decoupled: masks cover ~MASK_COVERAGE of the image (SOLOv2: untouched)."""
    if hasattr(head, "mask_preds"):  # SOLOHead: one S^2-channel map per level
        convs = list(head.mask_preds)
        for conv, logits in zip(convs, _full_mask_logits(convs, outputs.mask_outputs)):
            _rescale_mask_conv(conv, logits, MASK_COVERAGE)
    elif hasattr(head, "mask_preds_x"):  # Decoupled: mask = X_j * Y_i, both must be high
        for axis, convs in enumerate((list(head.mask_preds_x), list(head.mask_preds_y))):
            level_outputs = [o[axis] for o in outputs.mask_outputs]
            for conv, logits in zip(convs, _full_mask_logits(convs, level_outputs)):
                _rescale_mask_conv(conv, logits, math.sqrt(MASK_COVERAGE))
    else:
        return None
    return {"mask_coverage": MASK_COVERAGE, "mask_logit_std": MASK_LOGIT_STD}


def count_above_threshold(cate_logits: Sequence[torch.Tensor], thresh: float) -> int:
    """(cell, class) candidates scoring above ``thresh`` after point NMS, as the post-processor."""
    from solo.nms import points_nms

    return sum(int((points_nms(x.sigmoid()) > thresh).sum()) for x in cate_logits)


def point_nms_survivors(cate_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """(C, M) logits of image 0's cells that survive point NMS, per class, sorted descending
    (-inf padding). Point NMS commutes with any increasing per-class map of the logits."""
    columns = []
    for x in cate_logits:
        x = x[0].double()  # (C, S, S)
        local_max = F.max_pool2d(x[None], kernel_size=2, stride=1, padding=1)[0, :, :-1, :-1]
        columns.append(torch.where(local_max == x, x, torch.full_like(x, -math.inf)).flatten(1))
    return torch.cat(columns, dim=1).sort(dim=1, descending=True).values


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def class_calibration(survivors: torch.Tensor, bias: torch.Tensor, thresh: float, target: int):
    """Per class c, (scale, new bias) of ``cate_pred`` mapping its k_c best point-NMS survivors
    to scores in (thresh, CATE_SCORE_MAX] and the rest below ``thresh``; sum(k_c) = target,
    spread evenly over the classes (as many classes as a real image's candidates, not the few
    classes a random-weight model happens to favour)."""
    num_classes = survivors.shape[0]
    z = survivors - bias.double()[:, None]  # the conv output without its bias
    counts = [target // num_classes + (c < target % num_classes) for c in range(num_classes)]
    scales, biases = [], []
    for c, k in enumerate(counts):
        valid = z[c][torch.isfinite(z[c])]
        if k == 0 or len(valid) == 0:
            top = float(valid[0]) if len(valid) else 0.0
            scales.append(1.0)
            biases.append(_logit(thresh) - top - 1.0)  # no candidate from this class
            continue
        k = min(k, len(valid))
        below = float(valid[k]) if k < len(valid) else float(valid[k - 1]) - 1.0
        cut, top = (float(valid[k - 1]) + below) / 2, float(valid[0])
        scale = (_logit(CATE_SCORE_MAX) - _logit(thresh)) / (top - cut) if top - cut > 1e-9 else 1.0
        scales.append(scale)
        biases.append(_logit(thresh) - scale * cut)
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(biases, dtype=torch.float64)


def apply_class_calibration(conv: nn.Conv2d, base_weight, base_bias, scales, biases):
    with torch.no_grad():
        conv.weight.copy_(base_weight * scales.view(-1, 1, 1, 1).to(base_weight))
        conv.bias.copy_(biases.to(base_bias))


def calibrate_solo(model, batched: List[dict]) -> dict:
    """Calibrate a random-weight SOLO model on ``batched`` so that post-processing does a real
    model's work: about NMS_PRE candidates pass the score threshold over all classes and reach
    NMS (v1/Decoupled masks sharpened first), and about MAX_PER_IMAGE instances come out."""
    post = model.postprocessor
    with torch.no_grad():
        images = model.preprocess_image(batched)
        features = model.backbone(images.tensor)
        head_inputs = [features[f] for f in model.head_in_features]
        outputs = model.head(head_inputs)
        mask_info = calibrate_masks(model.head, outputs)
        if mask_info is not None:
            outputs = model.head(head_inputs)
        target, reached, instances = _calibrate_categories(model, batched, outputs.cate_logits)
        above = count_above_threshold(model.head(head_inputs).cate_logits, post.score_thresh)
    result = {
        "calibrated": True,
        "candidates_above_score_thresh": above,
        "candidates_before_nms": reached,
        "instances_out": instances,
        "nms_pre": post.nms_pre,
        "max_per_image": post.max_per_image,
        "category": f"per class, cate_pred weight and bias rescaled so that its best cells after "
        f"point NMS score in ({post.score_thresh}, {CATE_SCORE_MAX}], {target} in all, spread "
        f"over the {model.head.cate_pred.out_channels} classes",
        "masks": mask_info or "unchanged (SOLOv2: dynamic kernels)",
    }
    logger.info(
        f"Calibrated: {above} candidates above score {post.score_thresh}, {reached} reach NMS "
        f"(nms_pre {post.nms_pre}), {instances} instances out."
    )
    return result


def _calibrate_categories(model, batched, cate_logits) -> Tuple[int, Optional[int], int]:
    """Calibrate ``cate_pred`` for NMS_PRE candidates, then raise the candidate count until
    about NMS_PRE pass the mask-area filter too; (candidates, reaching NMS, instances out)."""
    post, conv = model.postprocessor, model.head.cate_pred
    base_weight, base_bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    survivors = point_nms_survivors(cate_logits)
    target = post.nms_pre
    for _ in range(CALIBRATION_ATTEMPTS):
        scales, biases = class_calibration(survivors, base_bias, post.score_thresh, target)
        apply_class_calibration(conv, base_weight, base_bias, scales, biases)
        reached, instances = _count_nms_candidates(model, batched)
        if reached is None:
            logger.warning("Could not count the candidates reaching NMS (no NMS to patch).")
            break
        if reached >= post.nms_pre * 0.98 or target >= survivors.isfinite().sum():
            break
        target = int(target * post.nms_pre / max(reached, 1) * 1.05) + 1
    return target, reached, instances


def zero_mask_rcnn_deltas(model):
    """Zero (and freeze) Mask R-CNN's RPN and box-regression delta layers: with random weights
    their huge deltas collapse the proposals to a few boxes clipped to the image."""
    for layer in (
        model.proposal_generator.rpn_head.anchor_deltas,
        model.roi_heads.box_predictor.bbox_pred,
    ):
        for param in layer.parameters():
            param.requires_grad_(False)
            param.zero_()


def calibrate_mask_rcnn(model, batched: List[dict]) -> dict:
    """Random weights collapse Mask R-CNN's proposals (huge box deltas clipped to the image:
    ~10 proposals, degenerate boxes dropped at the end). Zeroing the RPN and box-regression
    deltas makes proposals the anchors and detections their boxes, so the ROI heads see the full
    POST_NMS_TOPK_TEST proposals and, with SCORE_THRESH_TEST 0, 100 detections come out."""
    zero_mask_rcnn_deltas(model)
    with torch.no_grad():
        images = model.preprocess_image(batched)
        proposals, _ = model.proposal_generator(images, model.backbone(images.tensor), None)
        outputs = model(batched)
    result = {
        "calibrated": True,
        "score_thresh_test": model.roi_heads.box_predictor.test_score_thresh,
        "proposals": len(proposals[0]),
        "instances_out": sum(len(o["instances"]) for o in outputs),
        "note": "ROI_HEADS.SCORE_THRESH_TEST 0.0 and RPN / box-regression deltas zeroed so that "
        "the ROI heads get the full proposals and TEST.DETECTIONS_PER_IMAGE detections come out",
    }
    logger.info(
        f"Mask R-CNN: {result['proposals']} proposals, {result['instances_out']} instances out."
    )
    return result


def _count_nms_candidates(model, batched) -> Tuple[Optional[int], int]:
    """(candidates reaching NMS or None if unknown, instances out) of one inference."""
    record: List[int] = []
    with recording_nms_inputs(record) as patched:
        results = model(batched)
    return (sum(record) if patched else None), sum(len(r["instances"]) for r in results)


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------


def _flatten_tensors(value) -> List[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    elif hasattr(value, "__dataclass_fields__"):
        value = [getattr(value, name) for name in value.__dataclass_fields__]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten_tensors(v)]
    return []


class _Traced(nn.Module):
    """``fn(model, *inputs)`` as a module with flat tensor outputs, for fvcore's tracer."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *inputs):
        return tuple(_flatten_tensors(self.fn(self.model, *inputs)))


def count_gflops(model: nn.Module, fn: Callable, inputs: tuple) -> float:
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(_Traced(model, fn), inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return analysis.total() / 1e9


def _mask_rcnn_heads(model, images):
    def run(m, *features):
        feats = dict(zip(m.backbone.output_shape().keys(), features))
        proposals, _ = m.proposal_generator(images, feats, None)
        results, _ = m.roi_heads(images, feats, proposals, None)
        return [(r.pred_boxes.tensor, r.scores, r.pred_masks) for r in results]

    return run


def flops_report(job: dict, model, batched, latency: dict) -> dict:
    """Backbone and head GFLOPs, the conv-throughput floor and efficiency = floor / measured."""
    with torch.no_grad():
        images = model.preprocess_image(batched)
        features = model.backbone(images.tensor)
    backbone = count_gflops(model, lambda m, x: m.backbone(x), (images.tensor,))
    if job["model"] == "mask_rcnn":
        names = list(model.backbone.output_shape().keys())
        head = count_gflops(
            model, _mask_rcnn_heads(model, images), tuple(features[n] for n in names)
        )
    else:
        head_inputs = tuple(features[f] for f in model.head_in_features)
        head = count_gflops(model, lambda m, *x: m.head(list(x)), head_inputs)
    report = {
        "backbone_gflops": round(backbone, 3),
        "head_gflops": round(head, 3),
        "backbone_head_gflops": round(backbone + head, 3),
        "flop_convention": FLOP_CONVENTION,
    }
    rate = job.get("conv_gflops_per_s")
    if rate:
        parts = {"backbone": backbone, "head": head}
        report["per_part"] = {k: _floor(v, rate, latency[k]["median"]) for k, v in parts.items()}
        measured = latency["backbone"]["median"] + latency["head"]["median"]
        report.update(_floor(backbone + head, rate, measured))
    return report


def _floor(gflops: float, gflops_per_s: float, measured_ms: float) -> dict:
    floor = gflops / gflops_per_s * 1000.0
    return {
        "floor_ms": round(floor, 3),
        "measured_ms": round(measured_ms, 3),
        "efficiency": round(floor / measured_ms, 4) if measured_ms > 0 else None,
    }


# ----------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------


def solo_inference_parts(model, batched, device: str) -> Dict[str, float]:
    """Seconds of each part, run as ``SOLO.forward`` / ``inference_from_outputs`` do."""
    times = {}
    times["preprocess"], images = timed(model.preprocess_image, device, batched)
    times["backbone"], features = timed(model.backbone, device, images.tensor)
    head_inputs = [features[f] for f in model.head_in_features]
    times["head"], outputs = timed(model.head, device, head_inputs)
    output_sizes = [
        (x.get("height", size[0]), x.get("width", size[1]))
        for x, size in zip(batched, images.image_sizes)
    ]
    padded_size = tuple(images.tensor.shape[-2:])
    with timing_mask_products(model.head, device) as mask_products:
        times["postprocess"], _ = timed(
            model.postprocessor,
            device,
            model.head,
            outputs,
            padded_size,
            images.image_sizes,
            output_sizes,
        )
    times["mask_products"] = sum(mask_products)
    return times


@contextlib.contextmanager
def timing_mask_products(head, device: str):
    """Seconds spent in ``head.inference_mask_probs`` (the candidates' mask predictions, e.g.
    SOLOv2's dynamic 1x1 convolutions), which the post-processor calls lazily."""
    seconds, original = [], head.inference_mask_probs

    def timed_call(*args, **kwargs):
        elapsed, result = timed(original, device, *args, **kwargs)
        seconds.append(elapsed)
        return result

    head.inference_mask_probs = timed_call
    try:
        yield seconds
    finally:
        del head.inference_mask_probs  # the instance attribute; the method is back


def mask_rcnn_inference_parts(model, batched, device: str) -> Dict[str, float]:
    """Seconds of each part, run as ``GeneralizedRCNN.inference`` does ("head" = RPN + ROI
    heads incl. box NMS and the mask head; "postprocess" = resizing and mask pasting)."""
    times = {}
    times["preprocess"], images = timed(model.preprocess_image, device, batched)
    times["backbone"], features = timed(model.backbone, device, images.tensor)

    def heads():
        proposals, _ = model.proposal_generator(images, features, None)
        return model.roi_heads(images, features, proposals, None)[0]

    times["head"], results = timed(heads, device)
    times["postprocess"], _ = timed(
        model._postprocess, device, results, batched, images.image_sizes
    )
    return times


def inference_step(job: dict, model, batched) -> Dict[str, float]:
    parts_fn = mask_rcnn_inference_parts if job["model"] == "mask_rcnn" else solo_inference_parts
    with torch.no_grad():
        times = parts_fn(model, batched, job["device"])
        times["total"], _ = timed(model, job["device"], batched)
    return times


def run_inference(job: dict, cfg, model, memory: MemoryTracker) -> dict:
    batched = inference_inputs(job)
    calibrate = calibrate_mask_rcnn if job["model"] == "mask_rcnn" else calibrate_solo
    calibration = calibrate(model, batched)
    memory.start()
    samples = _repeat(job, lambda: inference_step(job, model, batched), "inference")
    latency = {part: summarize([s[part] for s in samples]) for part in INFERENCE_PARTS}
    if "mask_products" in samples[0]:
        latency["postprocess_mask_products"] = summarize([s["mask_products"] for s in samples])
    parts_sum = [sum(s[p] for p in INFERENCE_PARTS[:-1]) for s in samples]
    latency["parts_sum"] = summarize(parts_sum)
    result = {"latency_ms": latency, "memory_mb": memory.report()}
    for key in ("calibrated", "candidates_before_nms", "instances_out"):
        result[key] = calibration.get(key)
    result["calibration"] = calibration
    result["flops"] = flops_report(job, model, batched, latency)
    return result


def _repeat(job: dict, step: Callable, what: str) -> list:
    """``warmup`` untimed then ``repeats`` timed calls of ``step`` (tqdm progress)."""
    total = job["warmup"] + job["repeats"]
    samples = []
    desc = f"{job['model']} {what}"
    for i in tqdm(range(total), desc=desc, leave=False, disable=not job.get("progress", True)):
        sample = step()
        if i >= job["warmup"]:
            samples.append(sample)
    return samples


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def build_train_optimizer(cfg, model):
    from detectron2.solver import build_optimizer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.BASE_LR = TRAIN_LR
    if "OPTIMIZER" in cfg.SOLVER:  # ours: SOLVER.OPTIMIZER (SGD or AdamW), as train_net.py
        from solo.solver import build_solo_optimizer

        return build_solo_optimizer(cfg, model)
    return build_optimizer(cfg, model)  # SGD with the config's momentum, decay, clipping


def train_step(model, optimizer, batch) -> Dict[str, float]:
    losses = model(batch)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {k: v.detach().item() for k, v in losses.items()}


def time_target_assignment(job: dict, model, batch) -> Optional[dict]:
    """Median ms of ``target_assigner(gather_ground_truth(...))`` alone (SOLO only)."""
    if job["model"] == "mask_rcnn":
        return None
    from solo.targets import gather_ground_truth

    with torch.no_grad():
        padded = tuple(model.preprocess_image(batch).tensor.shape[-2:])
        gt_instances = [x["instances"] for x in batch]

        def assign():
            return timed(
                lambda: model.target_assigner(
                    gather_ground_truth(gt_instances, padded, model.device)
                ),
                job["device"],
            )[0]

        samples = _repeat(job, assign, "targets")
    return summarize(samples)


def run_train(job: dict, cfg, model, memory: MemoryTracker) -> dict:
    from detectron2.utils.events import EventStorage

    num_classes = (
        cfg.MODEL.ROI_HEADS.NUM_CLASSES
        if job["model"] == "mask_rcnn"
        else cfg.MODEL.SOLO.NUM_CLASSES
    )
    batch = train_inputs(job, num_classes)
    if job["model"] == "mask_rcnn":
        zero_mask_rcnn_deltas(model)  # proposals = anchors: the full 512 sampled ROIs per image
    model.train()
    optimizer = build_train_optimizer(cfg, model)
    memory.start()
    losses = {}
    with EventStorage(0) as storage:

        def step():
            seconds, values = timed(train_step, job["device"], model, optimizer, batch)
            losses.update(values)
            storage.step()
            return seconds

        iter_s = _repeat(job, step, "train")
        targets = time_target_assignment(job, model, batch)
        # e.g. Mask R-CNN's sampled foreground ROIs, SOLO's positive cells per level
        scalars = {
            k: round(v, 3)
            for k, (v, _) in storage.latest().items()
            if k.startswith(("roi_head/", "solo/", "rpn/"))
        }
    if not all(math.isfinite(v) for v in losses.values()):
        logger.warning(f"{job['model']}: non-finite losses {losses}; timings may be atypical.")
    iteration = summarize(iter_s, scale=1.0)
    share = targets["median"] / 1000.0 / iteration["median"] if targets else None
    return {
        "iter_s": iteration,
        "targets_ms": targets,
        "targets_share": round(share, 4) if share is not None else None,
        "instances_per_image": job["instances_per_image"],
        "lr": TRAIN_LR,
        "losses": {k: round(v, 4) for k, v in losses.items()},
        "event_scalars": scalars,
        "memory_mb": memory.report(),
    }


# ----------------------------------------------------------------------------------------------
# Data loading
# ----------------------------------------------------------------------------------------------


def build_train_loader(job: dict, cfg, datasets: Sequence[str]):
    """Detectron2's train loader on ``datasets`` (SOLO: with the project's mapper, as
    train_net.py), ``--batch-size`` images per batch."""
    from detectron2.data import build_detection_train_loader

    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATASETS.TRAIN = tuple(datasets)
    cfg.SOLVER.IMS_PER_BATCH = job["batch_size"]
    if job["model"] == "mask_rcnn":
        return build_detection_train_loader(cfg)
    try:
        from solo.data import SOLODatasetMapper
    except ImportError:  # older checkouts: Detectron2's mapper
        return build_detection_train_loader(cfg)
    return build_detection_train_loader(cfg, mapper=SOLODatasetMapper(cfg, is_train=True))


def dataset_for(cfg) -> List[str]:
    """The config's train datasets if they load here, else the built-in ``shapes_train``."""
    from detectron2.data import DatasetCatalog

    from solo.data import register_builtin_datasets

    register_builtin_datasets()
    names = list(cfg.DATASETS.TRAIN)
    try:
        for name in names:
            DatasetCatalog.get(name)
        return names
    except Exception as e:  # noqa: B902 - any loading failure means "not available here"
        logger.info(f"DATASETS.TRAIN {names} not available ({type(e).__name__}): shapes_train")
        return ["shapes_train"]


def run_data(job: dict, cfg, memory: MemoryTracker) -> dict:
    """Seconds per batch of the train loader, after ``warmup`` batches (workers started)."""
    datasets = dataset_for(cfg)
    iterator = iter(build_train_loader(job, cfg, datasets))
    memory.start()
    batch_s = _repeat(job, lambda: timed(next, "cpu", iterator)[0], "data")
    return {
        "dataset": datasets,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "images_per_s": round(len(batch_s) * job["batch_size"] / sum(batch_s), 3),
        "batch_s": summarize(batch_s, scale=1.0),
        "mapper": (
            "detectron2 DatasetMapper" if job["model"] == "mask_rcnn" else "SOLODatasetMapper"
        ),
        "mask_format": cfg.INPUT.MASK_FORMAT,
        "memory_mb": memory.report(),
    }


# ----------------------------------------------------------------------------------------------
# One model, in a (sub)process
# ----------------------------------------------------------------------------------------------


def setup_logging():
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S"
        )
    for name in ("fvcore", "detectron2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # is_fx_tracing note


def run_job(job: dict) -> dict:
    """Build one model and run one task on it; entry point of the measuring subprocess."""
    setup_logging()
    with warnings.catch_warnings(), intra_op_threads(job["threads"]):
        warnings.simplefilter("ignore", UserWarning)  # e.g. detectron2's pkg_resources notice
        warnings.simplefilter("ignore", FutureWarning)
        memory = MemoryTracker(job["device"])
        cfg = build_cfg(job)
        if job["task"] == "data":
            return {"model_info": model_info(job, cfg, None), **run_data(job, cfg, memory)}
        model = build_benchmark_model(cfg)
        run_task = run_inference if job["task"] == "inference" else run_train
        return {"model_info": model_info(job, cfg, model), **run_task(job, cfg, model, memory)}


@contextlib.contextmanager
def intra_op_threads(threads: int):
    """``torch.set_num_threads(threads)``, restored afterwards (matters with --in-process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_isolated(job: dict, in_process: bool) -> dict:
    """``run_job(job)`` in a fresh ``spawn`` process (its own peak RSS), or in this one."""
    if in_process:
        return run_job(job)
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(job, sender), daemon=False)
    process.start()
    sender.close()
    try:
        ok, payload = receiver.recv()
    except EOFError:
        ok, payload = False, "the measuring process died without a result"
    process.join()
    if not ok:
        raise RuntimeError(
            f"Benchmark of {job['model']} failed (exit code {process.exitcode}):\n{payload}"
        )
    return payload


def _child_main(job: dict, sender):
    try:
        result = (True, run_job(job))
    except BaseException:  # noqa: B902 - reported to the parent, which raises
        result = (False, traceback.format_exc())
    sender.send(result)
    sender.close()


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _ratio(a, b) -> Optional[float]:
    return round(a / b, 4) if a is not None and b else None


def compute_ratios(task: str, ours: dict, other: Optional[dict]) -> Tuple[Optional[float], dict]:
    """Top-level ratio (ours / Mask R-CNN; < 1 means ours is faster) and per-figure ratios."""
    if other is None:
        return None, {}
    if task == "data":  # the loading process's memory says little (workers are separate)
        ratio = _ratio(other["images_per_s"], ours["images_per_s"])
        return ratio, {"s_per_image": ratio}
    ratios = {
        "peak_memory": _ratio(ours["memory_mb"]["peak"], other["memory_mb"]["peak"]),
        "peak_memory_minus_before_model": _ratio(
            ours["memory_mb"]["peak_minus_before_model"],
            other["memory_mb"]["peak_minus_before_model"],
        ),
    }
    if task == "inference":
        for part in (*INFERENCE_PARTS, "parts_sum"):
            ratios[part] = _ratio(
                ours["latency_ms"][part]["median"], other["latency_ms"][part]["median"]
            )
        ratios["backbone_head_gflops"] = _ratio(
            ours["flops"]["backbone_head_gflops"], other["flops"]["backbone_head_gflops"]
        )
        return ratios["total"], ratios
    ratios["iter_s"] = _ratio(ours["iter_s"]["median"], other["iter_s"]["median"])
    return ratios["iter_s"], ratios


def _median(key: str) -> Callable:
    return lambda m: m[key]["median"]


def _inference_rows() -> List[Tuple[str, Callable]]:
    rows = [(f"{p} ms (median)", _median_latency(p)) for p in (*INFERENCE_PARTS, "parts_sum")]
    rows.insert(
        INFERENCE_PARTS.index("postprocess") + 1,
        ("- of which mask products ms", _median_latency("postprocess_mask_products")),
    )
    rows += [
        ("total ms (min)", lambda m: m["latency_ms"]["total"]["min"]),
        ("candidates before NMS", lambda m: m.get("candidates_before_nms")),
        ("instances out", lambda m: m.get("instances_out")),
    ]
    rows += [(f"flops: {k}", lambda m, k=k: m["flops"].get(k)) for k in FLOPS_ROWS]
    return rows


def _median_latency(part: str) -> Callable:
    return lambda m: m["latency_ms"][part]["median"]


FLOPS_ROWS = ("backbone_gflops", "head_gflops", "floor_ms", "efficiency")
MEMORY_ROWS = [
    ("peak memory MB", lambda m: m["memory_mb"]["peak"]),
    ("memory MB above pre-model", lambda m: m["memory_mb"]["peak_minus_before_model"]),
]
TABLE_ROWS = {
    "inference": lambda: _inference_rows() + MEMORY_ROWS,
    "train": lambda: [
        ("s/iter (median)", _median("iter_s")),
        ("s/iter (min)", lambda m: m["iter_s"]["min"]),
        ("targets ms (median)", lambda m: (m["targets_ms"] or {}).get("median")),
        ("targets share of iter", lambda m: m["targets_share"]),
        *MEMORY_ROWS,
    ],
    "data": lambda: [
        ("images/s", lambda m: m["images_per_s"]),
        ("s/batch (median)", _median("batch_s")),
    ],
}


def format_table(report: dict) -> str:
    """The report as a table: one column per model, plus ours / Mask R-CNN."""
    from tabulate import tabulate

    models = report["models"]
    rows = [_row(label, models, getter) for label, getter in TABLE_ROWS[report["task"]]()]
    headers = ["", *models] + (["ours / mask_rcnn"] if len(models) == 2 else [])
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=".4g")


def _row(label: str, models: dict, getter: Callable) -> list:
    values = []
    for m in models.values():
        try:
            values.append(getter(m))
        except (KeyError, TypeError):
            values.append(None)
    if len(values) == 2:
        numbers = all(isinstance(v, (int, float)) for v in values)
        values.append(_ratio(*values) if numbers else None)
    return [label, *values]


def build_report(args, jobs_results: Dict[str, dict], probe: Optional[dict]) -> dict:
    models = {}
    for name, result in jobs_results.items():
        info = result.pop("model_info")
        models[name] = {**info, **result}
    ours, other = models["ours"], models.get("mask_rcnn")
    ratio, ratios = compute_ratios(args.task, ours, other)
    report = {
        "schema_version": SCHEMA_VERSION,
        "task": args.task,
        "config_file": args.config_file,
        "input_size": list(args.input_size),
        "batch_size": 1 if args.task == "inference" else args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compare": args.compare,
        "opts": list(args.opts),
        "machine": machine_info(args.threads, args.device),
        "conv_probe": probe,
        "ratio": ratio,
        "ratios": ratios,
    }
    if args.task == "inference":
        for key in ("calibrated", "candidates_before_nms", "instances_out"):
            report[key] = ours.get(key)
    report["models"] = models
    return report


def make_job(args, model: str, probe: Optional[dict]) -> dict:
    return {
        "model": model,
        "task": args.task,
        "config_file": args.config_file,
        "opts": list(args.opts),
        "device": args.device,
        "threads": args.threads,
        "input_size": list(args.input_size),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "instances_per_image": args.instances_per_image,
        "seed": args.seed,
        "conv_gflops_per_s": probe["gflops_per_s"] if probe else None,
    }


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_parser().parse_args(argv)
    check_args(args)
    setup_logging()
    with intra_op_threads(args.threads):
        probe = None
        if args.task == "inference":
            probe = conv_probe(args.input_size, args.device)
            logger.info(f"Conv probe: {probe['gflops_per_s']} GFLOP/s ({FLOP_CONVENTION})")
        results = {}
        for name in ["ours"] + ([args.compare] if args.compare else []):
            logger.info(f"Measuring {name} ({args.task}) ...")
            # Data loaders fork their workers; from a spawned process those abort at shutdown.
            in_process = args.in_process or args.task == "data"
            results[name] = run_isolated(make_job(args, name, probe), in_process)
    report = build_report(args, results, probe)
    print(format_table(report))
    if report["ratio"] is not None:
        print(f"ratio ours / {args.compare} ({args.task}): {report['ratio']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        logger.info(f"Wrote {args.json}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
