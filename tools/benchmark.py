#!/usr/bin/env python
"""Benchmark SOLO / Decoupled SOLO / SOLOv2 (inference, training, data loading), optionally
against Detectron2's Mask R-CNN R50-FPN on the same machine, input and thread count.

Protocol and examples: README, "Benchmark". The JSON report is :class:`Report` (times in ms
unless named ``_s``, memory in MB).
"""

import argparse
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import numpy as np
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass, replace
from fnmatch import fnmatch
from typing import Callable, Dict, List, Optional, Sequence
import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from solo.utils.cli import add_opts_argument, parse_args

logger = logging.getLogger("benchmark")

SCHEMA_VERSION = 2
MASK_RCNN_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"
INFERENCE_PARTS = ("preprocess", "backbone", "head", "postprocess", "total")
POSTPROCESS_STAGES = (
    "candidates",
    "mask_probs",
    "nms",
    "paste",
)  # solo.postprocess.<stage> profiler ranges
DEFAULT_REPEATS = {"inference": 5, "train": 5, "data": 50}
EXPORT_FORMATS = {"onnxruntime": "onnx", "torchscript": "torchscript"}  # --runtime: file format
TRAIN_LR = 0.0  # the step costs the same at any lr; random weights diverge at a useful one


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="SOLO config (configs/...)")
    parser.add_argument("--task", choices=("inference", "train", "data"), default="inference")
    parser.add_argument("--compare", choices=("mask_rcnn",), default=None)
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    parser.add_argument("--input-size", nargs=2, type=int, default=(800, 1216), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2, help="train and data (inference: 1)")
    parser.add_argument("--repeats", type=int, help=f"timed calls (default {DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--instances-per-image", type=int, default=50, help="train: random GT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="no subprocess per model")
    parser.add_argument(
        "--runtime",
        choices=("pytorch", *EXPORT_FORMATS),
        default="pytorch",
        help="inference: also time ours exported to this runtime (solo.export), next to eager",
    )
    add_opts_argument(parser)  # KEY VALUE pairs for the SOLO config, after the flags
    return parser


def check_args(args: argparse.Namespace):
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS[args.task]
    if min(args.input_size) < 32 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--input-size must be >= 32, --batch-size and --threads >= 1.")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: CUDA is not available on this machine (torch sees no GPU)."
        )
    if args.runtime != "pytorch" and args.task != "inference":
        raise SystemExit(f"--runtime {args.runtime} times inference only; use --task inference.")


@dataclass(frozen=True)
class Job:
    """One model and one task, as sent to the measuring process."""

    model: str  # "ours" or "mask_rcnn"
    task: str
    config_file: str
    opts: Sequence[str]
    device: str
    threads: int
    input_size: Sequence[int]
    batch_size: int
    repeats: int
    warmup: int
    instances_per_image: int
    seed: int
    conv_gflops_per_s: Optional[float]
    runtime: str = "pytorch"  # or an exported model's runtime (solo.export)


def stats(seconds: Sequence[float], scale: float = 1000.0) -> dict:
    """Median, mean and min of per-call seconds, in ms (``scale=1``: in s, to the microsecond)."""
    values, digits = [s * scale for s in seconds], 3 if scale == 1000.0 else 6
    funcs = {"median": statistics.median, "mean": statistics.fmean, "min": min}
    return {k: round(f(values), digits) for k, f in funcs.items()}


@dataclass
class Report:
    """The JSON report; ``models[name]`` holds the model's description, ``memory_mb`` and the
    task's figures (see ``run_inference``, ``run_exported``, ``run_train``, ``run_data``)."""

    task: str
    config_file: str
    input_size: List[int]
    batch_size: int
    repeats: int
    warmup: int
    compare: Optional[str]
    opts: List[str]
    machine: dict
    conv_probe: Optional[dict]
    ratio: Optional[float]  # ours / Mask R-CNN: total latency, s/iter or s/image
    runtime: str  # "pytorch", or the runtime of models["ours_<runtime>"]
    runtime_ratio: Optional[float]  # exported / eager total latency
    ratios: Dict[str, Optional[float]]
    models: Dict[str, dict]
    schema_version: int = SCHEMA_VERSION
    flop_convention: str = "fvcore: one multiply-add counts as one flop"


def machine_info(threads: int, device: str) -> dict:
    import detectron2

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((x.split(":", 1)[1].strip() for x in f if x.startswith("model name")), cpu)
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if device == "cuda" else None,
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
    }


def measure(fn: Callable, job: Job) -> List[float]:
    """Seconds per call of ``fn``: ``job.warmup`` untimed calls (at least one, which sizes the
    measurement), then ``Timer.blocked_autorange`` for about ``job.repeats`` calls' worth."""
    start = time.perf_counter()
    for _ in range(max(job.warmup, 1)):
        fn()
    if job.device == "cuda":
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / max(job.warmup, 1)
    timer = Timer("fn()", globals={"fn": fn}, num_threads=job.threads)
    return list(timer.blocked_autorange(min_run_time=per_call * job.repeats).times)


class MemoryTracker:
    """Allocated CUDA memory or process RSS before the model exists, and the peak during the
    measured phase (``torch.cuda.max_memory_allocated``; RSS: Linux VmHWM, reset by clear_refs)."""

    def __init__(self, device: str):
        self.cuda, self.reset_ok = device == "cuda", False
        self.before_model = self._mb("VmRSS", torch.cuda.memory_allocated)

    def _mb(self, status_key: str, cuda_bytes: Callable) -> float:
        if self.cuda:
            return cuda_bytes() / 2**20
        with contextlib.suppress(OSError), open("/proc/self/status") as f:
            return next((int(x.split()[1]) / 1024 for x in f if x.startswith(status_key)), 0.0)
        return 0.0

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.reset_ok = True
            return
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
            self.reset_ok = True

    def report(self) -> dict:
        peak = self._mb("VmHWM", torch.cuda.max_memory_allocated)
        return {
            "kind": "cuda_max_allocated" if self.cuda else "rss",
            "peak": round(peak, 1),
            "before_model": round(self.before_model, 1),
            "peak_minus_before_model": round(peak - self.before_model, 1),
            "peak_reset": self.reset_ok,
        }


def conv_probe(input_size: Sequence[int], device: str, threads: int) -> dict:
    """Dense conv throughput in fvcore GFLOP/s: a 3x3 conv 256 -> 256 at stride 4 of the input,
    ``Timer.blocked_autorange`` over one second."""
    shape = (1, 256, max(input_size[0] // 4, 8), max(input_size[1] // 4, 8))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    weight = (torch.randn((256, 256, 3, 3), generator=gen) * 0.02).to(device)
    gflops = math.prod(shape) * 256 * 9 / 1e9
    timer = Timer(
        "F.conv2d(x, w, padding=1)", globals={"F": F, "x": x, "w": weight}, num_threads=threads
    )
    with torch.no_grad():
        m = timer.blocked_autorange(min_run_time=1.0)
    return {
        "shape": list(shape),
        "gflops": round(gflops, 3),
        "runs": len(m.times) * m.number_per_run,
        "median_ms": round(m.median * 1000, 3),
        "gflops_per_s": round(gflops / m.median, 2),
    }


def build_cfg(job: Job):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    if job.model == "mask_rcnn":
        from detectron2 import model_zoo

        cfg.merge_from_file(model_zoo.get_config_file(MASK_RCNN_CONFIG))
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: 100 detections out
        if job.task == "data":  # the same input pipeline: sizes, augmentation, masks, workers
            ours = build_cfg(replace(job, model="ours"))
            cfg.INPUT, cfg.DATALOADER = ours.INPUT.clone(), ours.DATALOADER.clone()
    else:
        import solo

        solo.add_solo_config(cfg)
        cfg.merge_from_file(job.config_file)
        cfg.merge_from_list(list(job.opts))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = job.device
    return cfg


def model_info(job: Job, cfg, model) -> dict:
    if job.model == "mask_rcnn":
        head = f"{cfg.MODEL.ROI_HEADS.NAME} (SCORE_THRESH_TEST 0)"
        config_file = f"detectron2 model zoo: {MASK_RCNN_CONFIG}"
    else:
        head, config_file = cfg.MODEL.SOLO.HEAD_NAME, job.config_file
    return {
        "name": job.model,
        "config_file": config_file,
        "head": head,
        "backbone": f"{cfg.MODEL.BACKBONE.NAME} R-{cfg.MODEL.RESNETS.DEPTH}",
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2) if model else None,
    }


def make_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A deterministic uint8 (3, H, W) image: smooth random blobs plus noise."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, max(height // 32, 2), max(width // 32, 2)), generator=gen)
    image = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = image * 200 + torch.rand((3, height, width), generator=gen) * 55
    return image.clamp(0, 255).to(torch.uint8)


def train_inputs(job: Job, num_classes: int) -> List[dict]:
    """The same batch for every model: random rectangles and ellipses (as the tests' helper)."""
    from detectron2.structures import BitMasks, Instances

    h, w = job.input_size
    rng = np.random.default_rng(job.seed)
    yy, xx = np.mgrid[:h, :w]
    batch = []
    for i in range(job.batch_size):
        n = job.instances_per_image
        size = rng.integers(8, [max(9, h // 2), max(9, w // 2)], size=(n, 2))  # (h, w) each
        y0, x0 = rng.integers(0, h - size[:, 0] + 1), rng.integers(0, w - size[:, 1] + 1)
        cy, cx = y0 + (size[:, 0] - 1) / 2, x0 + (size[:, 1] - 1) / 2
        rect = rng.random(n) < 0.5
        dy = np.abs(yy - cy[:, None, None]) / (size[:, 0, None, None] / 2)  # (n, h, w)
        dx = np.abs(xx - cx[:, None, None]) / (size[:, 1, None, None] / 2)
        inside = np.where(rect[:, None, None], np.maximum(dy, dx) <= 1, dy**2 + dx**2 <= 1)
        inst = Instances((h, w))
        inst.gt_masks = BitMasks(torch.from_numpy(inside))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.from_numpy(rng.integers(0, num_classes, n)).long()
        batch.append({"image": make_image(h, w, job.seed + i), "instances": inst})
    return batch


def count_gflops(model, fn: Callable, inputs: tuple) -> float:
    """fvcore GFLOPs of one part ``fn(*inputs)`` of ``model`` (the whole-model count is 0 with
    recent torch); Detectron2's TracingAdapter flattens the outputs (SOLO's: a dataclass)."""
    from fvcore.nn import FlopCountAnalysis

    from detectron2.export import TracingAdapter

    def call(_, *args):
        outputs = fn(*args)
        return vars(outputs) if is_dataclass(outputs) else outputs

    traced = TracingAdapter(model, inputs, call, allow_non_tensor=True)
    analysis = FlopCountAnalysis(traced, traced.flattened_inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return analysis.total() / 1e9


def inference_parts(job: Job, model, batched):
    """Each part as a call on the previous part's output, in ``model.forward``'s order, and a
    function returning the fvcore GFLOPs of the backbone and the head."""
    from detectron2.modeling.postprocessing import detector_postprocess

    images = model.preprocess_image(batched)
    features = model.backbone(images.tensor)
    sizes = [(x["height"], x["width"]) for x in batched]
    if job.model == "mask_rcnn":

        def head(features):
            proposals, _ = model.proposal_generator(images, features, None)
            return model.roi_heads(images, features, proposals, None)[0]

        results = head(features)

        def postprocess():
            return [detector_postprocess(r, *s) for r, s in zip(results, sizes)]

    else:

        def head(features):
            return model.head([features[f] for f in model.head_in_features])

        outputs, padded = head(features), tuple(images.tensor.shape[-2:])
        mask_probs = functools.partial(model.head.inference_mask_probs, outputs)

        def postprocess():
            cate_logits, image_sizes = outputs.cate_logits, images.image_sizes
            return model.postprocessor(cate_logits, mask_probs, padded, image_sizes, sizes)

    parts = {
        "preprocess": lambda: model.preprocess_image(batched),
        "backbone": lambda: model.backbone(images.tensor),
        "head": lambda: head(features),
        "postprocess": postprocess,
        "total": lambda: model(batched),
    }
    return parts, lambda: {
        "backbone": count_gflops(model, model.backbone, (images.tensor,)),
        "head": count_gflops(model, head, (features,)),
    }


def postprocess_stages(postprocess: Callable, calls: int) -> Dict[str, float]:
    """Host ms per call of each ``solo.postprocess.<stage>`` profiler range."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            postprocess()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    names = {s: f"solo.postprocess.{s}" for s in POSTPROCESS_STAGES}
    missing = [n for n in names.values() if n not in totals]
    if missing:
        raise RuntimeError(f"The post-processor recorded no profiler range {missing}.")
    return {s: round(totals[n] / 1000 / calls, 3) for s, n in names.items()}


def flops_report(gflops: Dict[str, float], latency: Dict[str, dict], rate: Optional[float]):
    """GFLOPs per part; with the conv probe's GFLOP/s ``rate``, the floor (those FLOPs at that
    rate) and efficiency = floor / measured."""
    flops = {f"{k}_gflops": round(v, 3) for k, v in gflops.items()}
    flops["backbone_head_gflops"] = round(sum(gflops.values()), 3)
    if rate:
        measured = latency["backbone"]["median"] + latency["head"]["median"]
        flops["floor_ms"] = round(sum(gflops.values()) / rate * 1000, 3)
        flops["efficiency"] = round(flops["floor_ms"] / measured, 4)
        flops["per_part_efficiency"] = {
            k: round(v / rate * 1000 / latency[k]["median"], 4) for k, v in gflops.items()
        }
    return flops


def run_inference(job: Job, cfg, model, memory: MemoryTracker) -> dict:
    from solo.utils.benchmark_calibration import calibrate_mask_rcnn, calibrate_solo

    h, w = job.input_size
    batched = [{"image": make_image(h, w, job.seed), "height": h, "width": w}]
    calibrate = calibrate_mask_rcnn if job.model == "mask_rcnn" else calibrate_solo
    calibration = calibrate(model, batched)
    if job.runtime != "pytorch":
        return run_exported(job, model, batched, calibration, memory)
    memory.start()
    with torch.no_grad():
        parts, part_gflops = inference_parts(job, model, batched)
        latency = {p: stats(measure(parts[p], job)) for p in INFERENCE_PARTS}
        stages = None
        if job.model != "mask_rcnn":
            stages = postprocess_stages(parts["postprocess"], job.repeats)
        memory_report = memory.report()
    latency["parts_sum"] = {
        k: round(sum(latency[p][k] for p in INFERENCE_PARTS[:-1]), 3) for k in latency["total"]
    }
    try:  # the timings stand without FLOPs: a tracer failure is reported, not fatal
        flops = flops_report(part_gflops(), latency, job.conv_gflops_per_s)
    except Exception as e:  # noqa: B902
        logger.warning(f"{job.model}: fvcore could not count FLOPs ({type(e).__name__}: {e})")
        flops = {"error": f"{type(e).__name__}: {e}"}
    return {
        "latency_ms": latency,
        "postprocess_stages_ms": stages,
        "calibration": calibration,
        "flops": flops,
        "memory_mb": memory_report,
    }


def run_exported(job: Job, model, batched, calibration: dict, memory: MemoryTracker) -> dict:
    """End-to-end latency of the calibrated model exported (``solo.export``) to ``job.runtime``,
    called like the model on the same input."""
    from solo.export import ExportedModel, export_model

    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, EXPORT_FORMATS[job.runtime], tmp, batched[0]["image"])
        exported = ExportedModel(path, device=job.device, num_threads=job.threads)
        file_mb = round(os.path.getsize(path) / 2**20, 1)
    memory.start()
    latency = {"total": stats(measure(lambda: exported(batched), job))}
    memory_report = memory.report()
    calibration = {
        **calibration,
        "instances_out": len(exported(batched)[0]["instances"]),
        "candidates": exported.last_num_candidates[0],
        "max_candidates": exported.max_candidates,  # K0 of the graph
    }
    return {
        "runtime": job.runtime,
        "export_file_mb": file_mb,
        "latency_ms": latency,
        "calibration": calibration,
        "memory_mb": memory_report,
    }


def run_train(job: Job, cfg, model, memory: MemoryTracker) -> dict:
    from detectron2.solver import build_optimizer as build_default_optimizer
    from detectron2.utils.events import EventStorage

    from solo.modeling.targets import gather_ground_truth
    from solo.solver import build_solo_optimizer
    from solo.utils.benchmark_calibration import zero_mask_rcnn_deltas

    ours = job.model != "mask_rcnn"
    batch = train_inputs(job, (cfg.MODEL.SOLO if ours else cfg.MODEL.ROI_HEADS).NUM_CLASSES)
    if not ours:
        zero_mask_rcnn_deltas(model)  # proposals = anchors: the full 512 sampled ROIs per image
    model.train()
    cfg.SOLVER.BASE_LR = TRAIN_LR  # the config's optimizer (ours: SOLVER.OPTIMIZER, as train_net)
    build_optimizer = build_solo_optimizer if "OPTIMIZER" in cfg.SOLVER else build_default_optimizer
    optimizer = build_optimizer(cfg, model)
    losses = {}

    def step():
        values = model(batch)
        optimizer.zero_grad(set_to_none=True)
        sum(values.values()).backward()
        optimizer.step()
        losses.update({k: v.detach() for k, v in values.items()})
        storage.step()

    def assign_targets():
        gt = [x["instances"] for x in batch]
        return model.target_assigner(gather_ground_truth(gt, padded, model.device))

    memory.start()
    with EventStorage(0) as storage:
        iteration = stats(measure(step, job), scale=1.0)
        memory_report = memory.report()
        targets = None
        if ours:
            with torch.no_grad():
                padded = tuple(model.preprocess_image(batch).tensor.shape[-2:])
                targets = stats(measure(assign_targets, job))
        scalars = {  # e.g. Mask R-CNN's sampled foreground ROIs, SOLO's positive cells per level
            k: round(v, 3)
            for k, (v, _) in storage.latest().items()
            if k.startswith(("roi_head/", "solo/", "rpn/"))
        }
    losses = {k: round(v.item(), 4) for k, v in losses.items()}
    if not all(math.isfinite(v) for v in losses.values()):
        logger.warning(f"{job.model}: non-finite losses {losses}; timings may be atypical.")
    return {
        "iter_s": iteration,
        "targets_ms": targets,
        "targets_share": round(targets["median"] / 1000 / iteration["median"], 4) if ours else None,
        "instances_per_image": job.instances_per_image,
        "lr": TRAIN_LR,
        "losses": losses,
        "event_scalars": scalars,
        "memory_mb": memory_report,
    }


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


def run_data(job: Job, cfg, memory: MemoryTracker) -> dict:
    """Detectron2's ``DataLoaderBenchmark``: raw records, the mapper alone, and the train loader
    with ``DATALOADER.NUM_WORKERS`` workers (SOLO: ``SOLODatasetMapper``, as train_net.py)."""
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts
    from detectron2.data.benchmark import DataLoaderBenchmark

    from solo.data import SOLODatasetMapper

    seconds = []  # per call, of each benchmark that DataLoaderBenchmark only logs

    class Recording(DataLoaderBenchmark):
        def _benchmark(self, *args, **kwargs):
            avg, times = super()._benchmark(*args, **kwargs)
            seconds.append(times)
            return avg, times

    datasets = dataset_for(cfg)
    mapper_cls = DatasetMapper if job.model == "mask_rcnn" else SOLODatasetMapper
    workers = cfg.DATALOADER.NUM_WORKERS
    bench = Recording(
        get_detection_dataset_dicts(datasets),
        mapper=mapper_cls(cfg, is_train=True),
        total_batch_size=job.batch_size,
        num_workers=workers,
    )
    memory.start()
    bench.benchmark_dataset(job.repeats, warmup=job.warmup)
    bench.benchmark_mapper(job.repeats, warmup=job.warmup)
    bench.benchmark_distributed(job.repeats, warmup=job.warmup)  # the loader, as in training
    dataset_s, mapper_s, loader_s = seconds
    return {
        "dataset": datasets,
        "mapper": mapper_cls.__name__,
        "mask_format": cfg.INPUT.MASK_FORMAT,
        "num_workers": workers,
        "dataset_s": stats(dataset_s, scale=1.0),
        "mapper_s": stats(mapper_s, scale=1.0),
        "loader_batch_s": stats(loader_s, scale=1.0),
        # a loader with n workers delivers n batches per worker round
        "images_per_s": round(len(loader_s) * job.batch_size / sum(loader_s), 3),
        "memory_mb": memory.report(),
    }


def setup_logging():
    warnings.simplefilter("ignore", UserWarning)  # e.g. pkg_resources, meshgrid notices
    warnings.simplefilter("ignore", FutureWarning)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s")
    for name in ("fvcore", "detectron2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("detectron2.data.benchmark").setLevel(logging.INFO)


def run_job(job: Job) -> dict:
    """Build one model and run one task on it: the measuring process's entry point."""
    from detectron2.modeling import build_model

    setup_logging()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    try:
        memory = MemoryTracker(job.device)
        cfg = build_cfg(job)
        if job.task == "data":
            return {**model_info(job, cfg, None), **run_data(job, cfg, memory)}
        torch.manual_seed(job.seed)
        model = build_model(cfg).eval()  # random weights: nothing is loaded
        run_task = run_inference if job.task == "inference" else run_train
        return {**model_info(job, cfg, model), **run_task(job, cfg, model, memory)}
    finally:
        torch.set_num_threads(previous_threads)


def flatten(tree: dict, prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested report as {"latency_ms.total.median": 12.3, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + key] = value
    return flat


def compute_ratios(ours: dict, other: Optional[dict]) -> Dict[str, float]:
    """ours / other for every figure both have (< 1: ours is faster or smaller)."""
    a, b = flatten(ours or {}), flatten(other or {})
    return {k: round(a[k] / b[k], 4) for k in a if b.get(k)}


# The figure behind the top-level "ratio" (data: the same batches, so s per image), and the rows
# of the printed table (fnmatch patterns).
HEADLINE = {
    "inference": "latency_ms.total.median",
    "train": "iter_s.median",
    "data": "loader_batch_s.median",
}
TABLE = {
    "inference": ["latency_ms.*.median", "postprocess_stages_ms.*", "calibration.*_*", "flops.*"],
    "train": ["iter_s.*", "targets_ms.median", "targets_share"],
    "data": ["images_per_s", "*_s.median"],
}


def format_table(report: Report) -> str:
    """The task's figures, one column per model, plus ours / Mask R-CNN."""
    from tabulate import tabulate

    flat = {name: flatten(m) for name, m in report.models.items()}
    patterns = TABLE[report.task] + ["memory_mb.peak*"]
    keys = [k for p in patterns for k in flat["ours"] if fnmatch(k, p)]
    rows = [[k, *(f.get(k) for f in flat.values()), report.ratios.get(k)] for k in keys]
    headers = ["", *report.models, "ours / " + (report.compare or "-")]
    return tabulate(rows, headers=headers, tablefmt="github", floatfmt=".4g")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(get_parser(), argv)
    check_args(args)
    setup_logging()
    probe = None
    if args.task == "inference":
        probe = conv_probe(args.input_size, args.device, args.threads)
        logger.info(f"Conv probe: {probe['gflops_per_s']} GFLOP/s")
    exported = f"ours_{args.runtime}" if args.runtime != "pytorch" else None
    models = {}
    for name in filter(None, ("ours", exported, args.compare)):
        logger.info(f"Measuring {name} ({args.task}) ...")
        job = Job(
            name, args.task, args.config_file, tuple(args.opts), args.device, args.threads,
            tuple(args.input_size), args.batch_size, args.repeats, args.warmup,
            args.instances_per_image, args.seed, probe["gflops_per_s"] if probe else None,
            args.runtime if name == exported else "pytorch",
        )  # fmt: skip
        # A fresh spawn process per model: its own peak memory and CUDA context (a failure there
        # is raised here). Not for data: loader workers forked from it abort at shutdown.
        try:
            if args.in_process or args.task == "data":
                models[name] = run_job(job)
            else:
                spawn = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                    models[name] = pool.submit(run_job, job).result()
        except Exception as e:  # noqa: B902 - an export failure keeps the other figures
            if name != exported:
                raise
            logger.error(f"{name} failed, reported in the JSON: {type(e).__name__}: {e}")
            models[name] = {"name": name, "runtime": args.runtime, "error": f"{e!r}"}
    ratios = compute_ratios(models["ours"], models.get("mask_rcnn"))
    runtime_ratios = compute_ratios(models.get(exported), models["ours"])
    report = Report(
        task=args.task,
        config_file=args.config_file,
        input_size=list(args.input_size),
        batch_size=1 if args.task == "inference" else args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        compare=args.compare,
        opts=list(args.opts),
        machine=machine_info(args.threads, args.device),
        conv_probe=probe,
        ratio=ratios.get(HEADLINE[args.task]),
        runtime=args.runtime,
        runtime_ratio=runtime_ratios.get(HEADLINE["inference"]),
        ratios=ratios,
        models=models,
    )
    print(format_table(report))
    if report.ratio is not None:
        print(f"ratio ours / {args.compare} ({args.task}): {report.ratio}")
    if report.runtime_ratio is not None:
        print(f"ratio {args.runtime} / pytorch (inference): {report.runtime_ratio}")
    result = asdict(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        logger.info(f"Wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
