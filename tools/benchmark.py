#!/usr/bin/env python
"""Benchmark SOLO / Decoupled SOLO / SOLOv2 (inference, training, data loading), optionally
against Detectron2's Mask R-CNN R50-FPN on the same machine, input and thread count.

Protocol, examples and figures: docs/benchmarks.md. The JSON report is :class:`Report` (times in ms
unless named ``_s``, memory in MB). This script parses and checks the options, runs each model's
job in its own process (``solo.utils.benchmark_jobs``) and writes the report.
"""

import argparse
import json
import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from typing import Callable, Dict, List, Optional, Sequence
import torch

from solo.utils.benchmark_calibration import CATE_SCORE_MAX, MASK_EXTENTS
from solo.utils.benchmark_jobs import Job, run_job, run_paired, setup_logging
from solo.utils.benchmark_parts import EXPORT_FORMATS, benchmark_cfg, trained_weights
from solo.utils.cli import add_opts_argument, parse_args
from solo.utils.measure import compute_ratios, conv_probe, flatten, machine_info

logger = logging.getLogger("benchmark")

SCHEMA_VERSION = 6
DEFAULT_REPEATS = {"inference": 5, "train": 5, "data": 50}
MASK_FORMATS = {"dense": "bitmask", "cropped": "cropped"}  # --masks: TEST.MASK_FORMAT


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="SOLO config (configs/...)")
    parser.add_argument("--task", choices=("inference", "train", "data"), default="inference")
    parser.add_argument(
        "--compare",
        choices=("mask_rcnn",),
        default=None,
        help="also measure Detectron2's Mask R-CNN R50-FPN; inference then also times both "
        "post-processings alternately in one process (report: postprocess_paired)",
    )
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
        nargs="+",
        choices=("pytorch", *EXPORT_FORMATS),
        default=["pytorch"],
        metavar="RUNTIME",
        help="inference: also time ours exported to these runtimes (solo.export), each in its "
        f"own process, next to eager in the same run; any of {', '.join(EXPORT_FORMATS)} "
        "(pytorch: eager only, always measured)",
    )
    parser.add_argument(
        "--masks",
        choices=("dense", "cropped", "both"),
        default="dense",
        help="inference: our masks as (N, H, W) bool or as CroppedMasks (TEST.MASK_FORMAT "
        "cropped); both: each in its own process, peak memory and times compared",
    )
    parser.add_argument(
        "--image",
        metavar="FILE",
        help="inference: time this image (read in the config's INPUT.FORMAT, resized to "
        "--input-size) instead of a synthetic one; with MODEL.WEIGHTS among the overrides, a "
        "trained model is timed as it is, without calibration",
    )
    parser.add_argument(
        "--mask-extent",
        choices=MASK_EXTENTS,
        default=None,
        help="inference, SOLOv2: calibrated masks as object-sized ellipses (default) or as the "
        "random kernels make them, fields over the whole image (the default with --runtime: "
        "an exported graph does not carry the calibration's hook)",
    )
    parser.add_argument(
        "--max-candidates",
        type=int,
        metavar="K0",
        help="inference with --runtime: the exported graphs' K0, the (cell, class) pairs given a "
        "mask (default MODEL.SOLO.NMS_PRE; exact for images with at most K0 candidates, see "
        "tools/export_model.py --max-candidates)",
    )
    add_opts_argument(parser)  # KEY VALUE pairs for the SOLO config, after the flags
    return parser


def check_image(path: str):
    """Refuse an --image that is not a readable image file, naming why."""
    from PIL import Image

    if not os.path.isfile(path):
        what = "a directory" if os.path.isdir(path) else "no such file"
        raise SystemExit(f"--image {path}: {what}; give an image file.")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # noqa: B902 - PIL raises several types for unreadable files
        raise SystemExit(f"--image {path}: not a readable image ({type(e).__name__}: {e}).")


def check_args(args: argparse.Namespace):
    if args.config_file.endswith(".py"):
        raise SystemExit(
            f"--config-file {args.config_file} is a LazyConfig (Python) file; the benchmark reads "
            "YAML configs (the transformer backbones, LazyConfig-only, are not benchmarked by it)."
        )
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
    # "pytorch" is eager, always measured; the others are exported models timed next to it.
    args.runtime = list(dict.fromkeys(r for r in args.runtime if r != "pytorch"))
    if args.runtime and args.task != "inference":
        raise SystemExit(
            f"--runtime {' '.join(args.runtime)} times inference only; use --task inference."
        )
    if args.image is not None and args.task != "inference":
        raise SystemExit(f"--image {args.image} concerns inference only; use --task inference.")
    if args.image is not None:
        check_image(args.image)
    if args.mask_extent is not None and args.task != "inference":
        raise SystemExit(
            f"--mask-extent {args.mask_extent} concerns inference only; use --task inference."
        )
    weights = trained_weights(args.opts)
    if weights and args.task != "inference":
        raise SystemExit(
            f"MODEL.WEIGHTS {weights}: trained weights are timed in inference only (training and "
            "data loading cost the same with random weights); use --task inference or drop "
            "MODEL.WEIGHTS."
        )
    if weights and not os.path.isfile(weights):
        raise SystemExit(f"MODEL.WEIGHTS {weights}: no such file (give a trained checkpoint).")
    if weights and args.mask_extent is not None:
        raise SystemExit(
            f"--mask-extent {args.mask_extent} with MODEL.WEIGHTS {weights}: a trained model is "
            "timed as it is, without calibration; drop --mask-extent."
        )
    if not weights and args.task == "inference":
        thresh = benchmark_cfg("ours", "inference", args.config_file, args.opts, "cpu").MODEL.SOLO
        thresh = thresh.SCORE_THRESH
        if not 0 < thresh < CATE_SCORE_MAX:
            raise SystemExit(
                f"MODEL.SOLO.SCORE_THRESH {thresh}: random weights are calibrated to category "
                f"scores between the score threshold and {CATE_SCORE_MAX} "
                "(solo.utils.benchmark_calibration), so it must lie in "
                f"(0, {CATE_SCORE_MAX}); lower it, or time trained weights (MODEL.WEIGHTS)."
            )
    if weights:
        args.mask_extent = None
    elif args.mask_extent is None:
        args.mask_extent = "image" if args.runtime else "objects"
    if args.mask_extent == "objects" and args.runtime:
        raise SystemExit(
            f"--mask-extent objects with --runtime {' '.join(args.runtime)}: the object-sized "
            "masks come from a forward hook that an exported graph does not carry, so eager and "
            "exported models would do different work. Use --mask-extent image (the default "
            "with --runtime)."
        )
    if args.max_candidates is not None and not args.runtime:
        raise SystemExit(
            f"--max-candidates {args.max_candidates} sets the exported graphs' K0; it needs an "
            "exported runtime (--runtime onnxruntime, openvino, ...): eager PyTorch (pytorch) "
            "has no K0, its candidates are MODEL.SOLO.NMS_PRE."
        )
    if args.max_candidates is not None and args.max_candidates < 1:
        raise SystemExit(f"--max-candidates must be >= 1, got {args.max_candidates}.")
    if args.masks != "dense" and args.task != "inference":
        raise SystemExit(f"--masks {args.masks} concerns inference only; use --task inference.")


@dataclass
class Report:
    """The JSON report; ``models[name]`` holds the model's description, ``memory_mb`` and the
    task's figures (see ``solo.utils.benchmark_jobs``: ``run_inference``, ``run_exported``,
    ``run_train``, ``run_data``)."""

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
    runtimes: List[str]  # exported runtimes, each measured as models["ours_<runtime>"]
    runtime_ratios: Dict[str, Optional[float]]  # per runtime: exported / eager total latency
    # per runtime: exported / float ONNX Runtime total latency (when onnxruntime was measured)
    onnxruntime_ratios: Optional[Dict[str, Optional[float]]]
    max_candidates: Optional[int]  # the exported graphs' K0 (--max-candidates, else NMS_PRE)
    ratios: Dict[str, Optional[float]]
    models: Dict[str, dict]
    masks: str = "dense"  # --masks; "both": models["ours_cropped"] next to models["ours"]
    mask_extent: Optional[str] = "objects"  # --mask-extent; None: trained weights (no calibration)
    image: Optional[str] = None  # --image
    masks_ratios: Optional[Dict[str, float]] = None  # ours_cropped / ours, every figure
    # inference with --compare: both post-processings timed alternately in one process, with
    # ours' candidate mask products as a third call (measure.paired_times; ratio = ours / the
    # compared model, round by round; ratios: the same for each call)
    postprocess_paired: Optional[dict] = None
    schema_version: int = SCHEMA_VERSION
    flop_convention: str = "fvcore: one multiply-add counts as one flop"


def run_in_own_process(function: Callable, argument, in_process: bool):
    """``function(argument)`` in a fresh spawned process (its own peak memory and CUDA context;
    a failure there is raised here), or here."""
    if in_process:
        return function(argument)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(function, argument).result()


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
    weights = trained_weights(args.opts)
    if weights and args.compare:
        logger.info(
            f"--compare {args.compare}: Mask R-CNN keeps random, calibrated weights (100 "
            f"detections); ours is the trained {weights}, doing its own work: the ratio compares "
            "different amounts of post-processing work."
        )
    probe = None
    if args.task == "inference":
        probe = conv_probe(args.input_size, args.device, args.threads)
        logger.info(f"Conv probe: {probe['gflops_per_s']} GFLOP/s")
    exported = {f"ours_{runtime}": runtime for runtime in args.runtime}
    cropped = "ours_cropped" if args.masks == "both" else None
    models, jobs = {}, {}
    for name in filter(None, ("ours", cropped, *exported, args.compare)):
        logger.info(f"Measuring {name} ({args.task}) ...")
        opts = tuple(args.opts)
        if name == cropped or (name == "ours" and args.masks == "cropped"):
            opts += ("TEST.MASK_FORMAT", MASK_FORMATS["cropped"])
        job = Job(
            "ours" if name == cropped else name, args.task, args.config_file, opts, args.device,
            args.threads,
            tuple(args.input_size), args.batch_size, args.repeats, args.warmup,
            args.instances_per_image, args.seed, probe["gflops_per_s"] if probe else None,
            exported.get(name, "pytorch"), args.mask_extent, args.image, args.max_candidates,
        )  # fmt: skip
        jobs[name] = job
        # A fresh spawn process per model: its own peak memory and CUDA context (a failure there
        # is raised here). Not for data: loader workers forked from it abort at shutdown.
        try:
            models[name] = run_in_own_process(run_job, job, args.in_process or args.task == "data")
        except Exception as e:  # noqa: B902 - an export failure keeps the other figures
            if name not in exported:
                raise
            logger.error(f"{name} failed, reported in the JSON: {type(e).__name__}: {e}")
            models[name] = {"name": name, "runtime": exported[name], "error": f"{e!r}"}
    paired = None
    if args.task == "inference" and args.compare:
        logger.info(f"Timing ours and {args.compare} post-processing alternately ...")
        pair = (jobs["ours"], jobs[args.compare])
        paired = run_in_own_process(run_paired, pair, args.in_process)
    ratios = compute_ratios(models["ours"], models.get("mask_rcnn"))
    runtime_ratios = {
        runtime: compute_ratios(models[name], models["ours"]).get(HEADLINE["inference"])
        for name, runtime in exported.items()
    }
    onnxruntime_ratios = None
    if "ours_onnxruntime" in models and "error" not in models["ours_onnxruntime"]:
        onnxruntime_ratios = {
            runtime: compute_ratios(models[name], models["ours_onnxruntime"]).get(
                HEADLINE["inference"]
            )
            for name, runtime in {"ours": "pytorch", **exported}.items()
            if runtime != "onnxruntime"
        }
    # The K0 the graphs were exported with (the flag, else each graph's default NMS_PRE), and
    # the runtimes whose graph cut the image's candidates to K0 (less work than eager).
    k0s = {models[n].get("calibration", {}).get("max_candidates") for n in exported} - {None}
    over_k0 = [r for n, r in exported.items() if models[n].get("calibration", {}).get(
        "candidates_over_k0")]  # fmt: skip
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
        runtimes=list(args.runtime),
        runtime_ratios=runtime_ratios,
        onnxruntime_ratios=onnxruntime_ratios,
        max_candidates=args.max_candidates or (k0s.pop() if len(k0s) == 1 else None),
        ratios=ratios,
        models=models,
        masks=args.masks,
        mask_extent=args.mask_extent,
        image=args.image,
        masks_ratios=compute_ratios(models[cropped], models["ours"]) if cropped else None,
        postprocess_paired=paired,
    )
    print(format_table(report))
    if report.ratio is not None:
        note = " (ours: trained weights; Mask R-CNN: random, calibrated)" if weights else ""
        print(f"ratio ours / {args.compare} ({args.task}): {report.ratio}{note}")
    if paired:
        ms = {name: f"{v['median']:.4g}" for name, v in paired["ms"].items()}
        print(
            f"post-processing timed alternately in one process ({paired['pairs']} round(s)): ours "
            f"{ms['ours']} ms, {args.compare} {ms[args.compare]} ms (medians); ratio "
            f"{paired['ratio']['median']:.3g} (median of rounds; {paired['ratio']['min']:.3g}-"
            f"{paired['ratio']['max']:.3g})"
        )
        if "ours_mask_products" in paired["ratios"]:
            products = paired["ratios"]["ours_mask_products"]
            print(
                f"  of which ours' candidate mask products alone (the mask probabilities of the "
                f"{paired['ours_mask_products_cells']} distinct candidate cells, as its "
                f"post-processing computes them): {ms['ours_mask_products']} ms, "
                f"{products['median']:.3g}x {args.compare}'s whole post-processing "
                f"({products['min']:.3g}-{products['max']:.3g})"
            )
    for runtime, ratio in report.runtime_ratios.items():
        print(f"ratio {runtime} / pytorch (inference): {ratio}")
    for runtime, ratio in (report.onnxruntime_ratios or {}).items():
        print(f"ratio {runtime} / onnxruntime (inference): {ratio}")
    if over_k0:
        # The graphs' own count: (cell, class) pairs above SCORE_THRESH, what K0 must hold.
        candidates = max(models[f"ours_{r}"]["calibration"]["candidates"] for r in over_k0)
        print(
            f"note: {', '.join(over_k0)}: the image has {candidates} candidates, more than the "
            f"exported graphs' K0 = {report.max_candidates}; they gave masks to K0 of them only "
            "(less work than eager, other results): their ratios do not compare the same work. "
            f"Use --max-candidates {candidates} or more."
        )
    if report.masks_ratios:
        for key in ("memory_mb.peak", "latency_ms.total.median", "latency_ms.postprocess.median"):
            print(f"ratio cropped / dense masks, {key}: {report.masks_ratios.get(key)}")
    result = asdict(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        logger.info(f"Wrote {args.json}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
