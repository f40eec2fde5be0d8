"""The measuring side of ``tools/benchmark.py``: one :class:`Job` (a model and a task) built
and measured in its own process (:func:`run_job`), and both models' post-processing timed
alternately in one process (:func:`run_paired`). Times are in ms unless named ``_s``, memory
in MB; the report's layout is ``tools/benchmark.py``'s ``Report``.
"""

import contextlib
import logging
import math
import tempfile
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple
import torch

from .benchmark_parts import (
    benchmark_cfg,
    benchmark_image,
    data_loader_seconds,
    describe_model,
    export_for_runtime,
    inference_parts,
    train_dataset_names,
)
from .measure import MemoryTracker, flops_report, measure, paired_times, postprocess_stages, stats
from .synthetic import make_image, train_inputs

__all__ = ["INFERENCE_PARTS", "Job", "run_job", "run_paired", "setup_logging"]

logger = logging.getLogger("benchmark")

INFERENCE_PARTS = ("preprocess", "backbone", "head", "postprocess", "total")
TRAIN_LR = 0.0  # the step costs the same at any lr; random weights diverge at a useful one


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
    # SOLOv2 calibrated masks (solo.utils.benchmark_calibration); None: trained weights
    mask_extent: Optional[str] = "objects"
    image: Optional[str] = None  # a real image instead of make_image's synthetic one
    max_candidates: Optional[int] = None  # exported graphs' K0; None: MODEL.SOLO.NMS_PRE


def timed(fn: Callable, job: Job) -> List[float]:
    return measure(fn, job.warmup, job.repeats, job.threads, job.device == "cuda")


def build_cfg(job: Job):
    return benchmark_cfg(job.model, job.task, job.config_file, job.opts, job.device)


def model_info(job: Job, cfg, model) -> dict:
    return {"name": job.model, **describe_model(job.model, job.config_file, cfg, model)}


def prepare_inference(job: Job, cfg, model) -> Tuple[List[dict], dict]:
    """The job's input batch and the model's calibration (or a trained model's own counts)."""
    from solo.utils.benchmark_calibration import (
        calibrate_mask_rcnn,
        calibrate_solo,
        count_candidates,
    )

    h, w = job.input_size
    if job.image:
        image = benchmark_image(job.image, cfg.INPUT.FORMAT, job.input_size)
    else:
        image = make_image(h, w, job.seed)
    batched = [{"image": image, "height": h, "width": w}]
    if job.model == "mask_rcnn":
        calibration = calibrate_mask_rcnn(model, batched)
    elif cfg.MODEL.WEIGHTS:  # a trained model does its own work
        candidates, instances = count_candidates(model, batched)
        calibration = {
            "calibrated": False,
            "weights": cfg.MODEL.WEIGHTS,
            "candidates": candidates,
            "candidates_before_nms": min(candidates, model.postprocessor.nms_pre),
            "instances_out": instances,
            "nms_pre": model.postprocessor.nms_pre,
        }
    else:
        calibration = calibrate_solo(model, batched, job.mask_extent)
    return batched, calibration


def run_inference(job: Job, cfg, model, memory: MemoryTracker) -> dict:
    batched, calibration = prepare_inference(job, cfg, model)
    if job.runtime != "pytorch":
        return run_exported(job, model, batched, calibration, memory)
    memory.start()
    with torch.no_grad():
        parts, part_gflops = inference_parts(model, batched, job.model == "mask_rcnn")
        latency = {p: stats(timed(parts[p], job)) for p in INFERENCE_PARTS}
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
    with tempfile.TemporaryDirectory() as tmp:
        exported, file_mb = export_for_runtime(
            model, job.runtime, tmp, batched[0]["image"], job.device, job.threads,
            job.max_candidates,
        )  # fmt: skip
    memory.start()
    latency = {"total": stats(timed(lambda: exported(batched), job))}
    memory_report = memory.report()
    from solo.utils.benchmark_calibration import mask_extent_report

    # The exported model's own counts and masks; the rest describes the calibration it shares.
    masks = mask_extent_report(exported, batched)
    candidates = exported.last_num_candidates[0]
    k0 = exported.max_candidates
    calibration = {
        **calibration,
        "instances_out": masks["instances"],
        "candidates": candidates,
        # The graph gives masks to at most K0 of them: with more, it does less work than eager.
        "candidates_before_nms": min(candidates, k0, calibration["nms_pre"]),
        "max_candidates": k0,
        "candidates_over_k0": candidates > k0,
        "output_masks": masks,
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
    num_classes = (cfg.MODEL.SOLO if ours else cfg.MODEL.ROI_HEADS).NUM_CLASSES
    batch = train_inputs(
        job.input_size, job.batch_size, job.instances_per_image, job.seed, num_classes
    )
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
        iteration = stats(timed(step, job), scale=1.0)
        memory_report = memory.report()
        targets = None
        if ours:
            with torch.no_grad():
                padded = tuple(model.preprocess_image(batch).tensor.shape[-2:])
                targets = stats(timed(assign_targets, job))
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


def run_data(job: Job, cfg, memory: MemoryTracker) -> dict:
    """Detectron2's ``DataLoaderBenchmark``: raw records, the mapper alone, and the train loader
    with ``DATALOADER.NUM_WORKERS`` workers (SOLO: ``SOLODatasetMapper``, as train_net.py)."""
    from detectron2.data import DatasetMapper, get_detection_dataset_dicts

    from solo.data import SOLODatasetMapper

    datasets = train_dataset_names(cfg)
    mapper_cls = DatasetMapper if job.model == "mask_rcnn" else SOLODatasetMapper
    workers = cfg.DATALOADER.NUM_WORKERS
    dataset_s, mapper_s, loader_s = data_loader_seconds(
        get_detection_dataset_dicts(datasets), mapper_cls(cfg, is_train=True), job.batch_size,
        workers, job.repeats, job.warmup, start=memory.start,
    )  # fmt: skip
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


def build_job_model(job: Job, cfg):
    from detectron2.modeling import build_model

    from solo.checkpoint.inference import build_inference_model

    torch.manual_seed(job.seed)
    if cfg.MODEL.WEIGHTS:  # a trained model (MODEL.WEIGHTS on the command line)
        return build_inference_model(cfg)
    return build_model(cfg).eval()  # random weights: nothing is loaded


@contextlib.contextmanager
def measuring_process(threads: int):
    """Logging set up and torch's intra-op threads set to ``threads`` for a measuring
    process's entry point; the previous thread count is restored on exit."""
    setup_logging()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def run_job(job: Job) -> dict:
    """Build one model and run one task on it: the measuring process's entry point."""
    with measuring_process(job.threads):
        memory = MemoryTracker(job.device)
        cfg = build_cfg(job)
        if job.task == "data":
            return {**model_info(job, cfg, None), **run_data(job, cfg, memory)}
        model = build_job_model(job, cfg)
        run_task = run_inference if job.task == "inference" else run_train
        return {**model_info(job, cfg, model), **run_task(job, cfg, model, memory)}


def run_paired(jobs: Sequence[Job]) -> dict:
    """Both models' post-processing built in one process and timed call by call, alternately
    (``measure.paired_times``): a ratio that machine-speed drift between the models' own runs
    does not move. Ours' candidate mask products (``benchmark_parts.candidate_mask_products``,
    a piece of its post-processing) are timed in the same rounds as ``ours_mask_products``;
    ``ours_mask_products_cells`` is how many candidate cells' masks that call computes."""
    with measuring_process(jobs[0].threads):
        calls, products = {}, None
        for job in jobs:
            cfg = build_cfg(job)
            model = build_job_model(job, cfg)
            batched, _ = prepare_inference(job, cfg, model)
            with torch.no_grad():
                parts, _ = inference_parts(model, batched, job.model == "mask_rcnn")
            calls[job.model] = parts["postprocess"]
            products = parts.get("mask_products", products)
        if products is not None:
            calls["ours_mask_products"] = products
            with torch.no_grad():
                cells = products()  # what the products call computes, in the report
        with torch.no_grad():
            paired = paired_times(calls, jobs[0].warmup, jobs[0].repeats, jobs[0].device == "cuda")
        if products is not None:
            paired["ours_mask_products_cells"] = cells
        return paired
