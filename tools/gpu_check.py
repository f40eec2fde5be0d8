#!/usr/bin/env python
"""The GPU check (``make gpu-check``): the CUDA tests, then the GPU benchmarks, in one command.

1. ``pytest -m cuda tests/test_cuda.py`` (AMP training steps, CUDA = CPU results, DCN, NMS,
   targets, train_net.py and --eval-only on CUDA, exported runtimes on CUDA);
2. ``tools/benchmark.py --device cuda``: SOLOv2 R50 inference and training (batch 2) at
   800x1216 against Mask R-CNN R50-FPN, SOLO R50 inference against Mask R-CNN, SOLOv2-light R50
   at 448x672, SOLOv2 R50 at 3000x4000 with dense and cropped masks (peak memory);
3. one JSON (``--output``) with the test counts and every benchmark report, and a table of the
   figures next to the targets (issue "The GPU path": inference <= 0.8x Mask R-CNN, training
   <= 1.0x, peak memory <= 1.2x) and the official V100 times.

Installs nothing beyond ``make setup``; sized to finish within about 8 minutes on one recent
GPU. Exits with 2 when torch sees no CUDA device, 1 when a test or a benchmark failed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import List, Optional
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, config, task, input size, compare with Mask R-CNN, official V100 ms/image or None)
BENCHMARKS = [
    ("SOLOv2 R50 inference", "configs/SOLOv2/R50_3x.yaml", "inference", (800, 1216), True, 54),
    ("SOLOv2 R50 train (batch 2)", "configs/SOLOv2/R50_3x.yaml", "train", (800, 1216), True, None),
    ("SOLO R50 inference", "configs/SOLO/R50_3x.yaml", "inference", (800, 1216), True, 77),
    (
        "SOLOv2-light R50 448 inference",
        "configs/SOLOv2/Light_448_R50_3x.yaml",
        "inference",
        (448, 672),
        False,
        24,
    ),
    # The float16 ONNX file (--precision fp16) on ONNX Runtime's CUDA provider next to eager
    # float32: its latency, and its instance count next to eager's (calibration.instances_out).
    (
        "SOLOv2 R50 inference, ONNX fp16",
        "configs/SOLOv2/R50_3x.yaml",
        "inference",
        (800, 1216),
        False,
        None,
    ),
    (
        "SOLOv2 R50 3000x4000, dense vs cropped masks",
        "configs/SOLOv2/R50_3x.yaml",
        "inference",
        (3000, 4000),
        False,
        None,
    ),
]
# Dense (N, H, W) and cropped masks (TEST.MASK_FORMAT) timed alongside: peak memory.
MASKS = {"SOLOv2 R50 3000x4000, dense vs cropped masks": "both"}
# Exported model timed alongside.
RUNTIME = {
    "SOLOv2-light R50 448 inference": "torchscript",
    "SOLOv2 R50 inference, ONNX fp16": "onnxruntime_fp16",
}
TARGETS = {"inference": 0.8, "train": 1.0, "peak_memory": 1.2}  # ours / Mask R-CNN, at most
REPEATS = {"inference": 20, "train": 10}  # enough for stable medians at GPU speed


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="output/gpu_check.json", help="the JSON report")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--threads", type=int, default=8, help="torch CPU threads (benchmarks)")
    return parser


def require_cuda():
    if not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device is visible to torch (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}). Run `make gpu-check` "
            "on a machine with an NVIDIA GPU and its driver; nothing was run.",
            file=sys.stderr,
        )
        sys.exit(2)


def run_tests() -> dict:
    """The CUDA tests; counts from pytest's JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "junit.xml")
        command = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]
        start = time.perf_counter()
        returncode = subprocess.run(command + ["--junitxml", junit], cwd=REPO_ROOT).returncode
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        if os.path.exists(junit):
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in counts}
    return {"returncode": returncode, "seconds": round(time.perf_counter() - start, 1), **counts}


def run_benchmark(
    config, task, size, compare, threads, runtime="pytorch", masks="dense"
) -> Optional[dict]:
    """One ``tools/benchmark.py --device cuda`` run (its output streams through); its report,
    or None when it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "bench.json")
        command = [sys.executable, "tools/benchmark.py", "--config-file", config, "--task", task]
        command += ["--device", "cuda", "--input-size", *map(str, size), "--batch-size", "2"]
        command += ["--repeats", str(REPEATS[task]), "--warmup", "5", "--threads", str(threads)]
        command += ["--compare", "mask_rcnn"] if compare else []
        command += ["--runtime", runtime, "--masks", masks]
        if subprocess.run(command + ["--json", report], cwd=REPO_ROOT).returncode != 0:
            return None
        with open(report) as f:
            return json.load(f)


def onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def summary_rows(results: List[dict]) -> List[list]:
    rows = []
    for r in results:
        report, task = r["report"], r["task"]
        if report is None:
            rows.append([r["name"], "FAILED"] + [None] * 6)
            continue
        figure = (
            (lambda m: m["latency_ms"]["total"]["median"])
            if task == "inference"
            else (lambda m: m["iter_s"]["median"] * 1000)
        )
        ours, other = report["models"]["ours"], report["models"].get("mask_rcnn")
        memory = report["ratios"].get("memory_mb.peak")
        met = None
        if report["ratio"] is not None:
            met = report["ratio"] <= TARGETS[task] and memory <= TARGETS["peak_memory"]
        rows.append(
            [
                r["name"],
                round(figure(ours), 1),
                round(figure(other), 1) if other else None,
                report["ratio"],
                memory,
                TARGETS[task] if other else None,
                {True: "yes", False: "NO", None: None}[met],
                r["official_v100_ms"],
            ]
        )
        for runtime, ratio in report.get("runtime_ratios", {}).items():
            # the exported model; its ratio is to eager PyTorch
            exported = report["models"][f"ours_{runtime}"]
            ms = figure(exported) if "latency_ms" in exported else "FAILED"
            rows.append([f"- exported, {runtime} (ratio: to eager)", ms, None])
            rows[-1] += [ratio, None, 1.0, None, None]
        masks = report.get("masks_ratios")
        if masks:  # cropped masks (TEST.MASK_FORMAT); ratios to dense (N, H, W) masks
            ms = figure(report["models"]["ours_cropped"])
            rows.append(["- cropped masks (ratios: to dense)", ms, None])
            rows[-1] += [masks.get("latency_ms.total.median"), masks.get("memory_mb.peak")]
            rows[-1] += [None, None, None]
    return rows


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    require_cuda()
    start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tests": None}
    if not args.skip_tests:
        report["tests"] = run_tests()
    results = []
    for name, config, task, size, compare, official in BENCHMARKS:
        print(f"\n=== {name}: {config} {task} {size[0]}x{size[1]} ===", flush=True)
        if RUNTIME.get(name, "").startswith("onnxruntime") and not onnxruntime_has_cuda():
            print("skipped: ONNX Runtime has no CUDA provider (pip install onnxruntime-gpu)")
            continue
        began = time.perf_counter()
        bench = run_benchmark(
            config, task, size, compare, args.threads, RUNTIME.get(name, "pytorch"),
            MASKS.get(name, "dense"),
        )  # fmt: skip
        seconds = round(time.perf_counter() - began, 1)  # sizes the check's time budget
        results.append(
            {"name": name, "task": task, "official_v100_ms": official, "seconds": seconds}
        )
        results[-1]["report"] = bench
    report["benchmarks"] = results
    report["seconds"] = round(time.perf_counter() - start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)

    from tabulate import tabulate

    headers = ["run", "ours ms", "Mask R-CNN ms", "ratio", "peak mem ratio", "target ratio"]
    headers += ["targets met", "official V100 ms"]
    print(f"\nGPU check on {report['device']} ({report['seconds']} s), report: {args.output}")
    print(tabulate(summary_rows(results), headers=headers, tablefmt="github"))
    tests = report["tests"]
    if tests is not None:
        print(
            f"CUDA tests: {tests['tests']} run, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped ({tests['seconds']} s)"
        )
    failed = (tests is not None and tests["returncode"] != 0) or any(
        r["report"] is None for r in results
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
