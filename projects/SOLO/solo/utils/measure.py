"""Measuring helpers of ``tools/benchmark.py`` and ``tools/gpu_check.py``: per-call times, peak
memory, fvcore FLOPs per model part, a dense-convolution throughput probe, the post-processor's
profiler ranges, and flat ratios between two reports.

Times are in ms unless named ``_s``, memory in MB, FLOPs in fvcore's convention (one
multiply-add counts as one flop).
"""

import contextlib
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import is_dataclass
from typing import Callable, Dict, List, Optional, Sequence
import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

__all__ = [
    "MemoryTracker",
    "compute_ratios",
    "conv_probe",
    "count_gflops",
    "flatten",
    "flops_report",
    "machine_info",
    "measure",
    "paired_times",
    "postprocess_stages",
    "stats",
]

#: ``solo.postprocess.<stage>`` profiler ranges the post-processor records.
POSTPROCESS_STAGES = ("candidates", "mask_probs", "nms", "paste")


def stats(seconds: Sequence[float], scale: float = 1000.0) -> dict:
    """Median, mean and min of per-call seconds, in ms (``scale=1``: in s, to the microsecond)."""
    values, digits = [s * scale for s in seconds], 3 if scale == 1000.0 else 6
    funcs = {"median": statistics.median, "mean": statistics.fmean, "min": min}
    return {k: round(f(values), digits) for k, f in funcs.items()}


def measure(fn: Callable, warmup: int, repeats: int, threads: int, cuda: bool) -> List[float]:
    """Seconds per call of ``fn``: ``warmup`` untimed calls (at least one, which sizes the
    measurement), then ``Timer.blocked_autorange`` for about ``repeats`` calls' worth."""
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    if cuda:
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
    return list(timer.blocked_autorange(min_run_time=per_call * repeats).times)


def paired_times(calls: Dict[str, Callable], warmup: int, repeats: int, cuda: bool) -> dict:
    """Two or more calls timed in turn in one process (A B C, C B A, A B C, ...; ``warmup``
    untimed rounds, at least one), so that a drift of the machine's speed reaches all alike.
    The order is reversed every round: the first and last calls follow themselves every other
    round (A B | B A), the middle ones never.

    Returns:
        ``{"ms": {name: stats}, "ratio": {"median", "min", "max"}, "ratios": {name: {...}},
        "pairs": repeats}``: ``ratio``, the first call's time over the second's, round by round;
        ``ratios``, the same for every call other than the second (the first's is ``ratio``).

    Raises:
        ValueError: fewer than two calls, ``repeats`` < 1 or ``warmup`` < 0.
    """
    names = list(calls)
    if len(names) < 2:
        raise ValueError(f"paired_times needs two calls or more, got {names}")
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"paired_times needs repeats >= 1 and warmup >= 0, got repeats={repeats}, "
            f"warmup={warmup}"
        )

    def timed(call):
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(max(warmup, 1)):
        for call in calls.values():
            timed(call)
    seconds = {name: [] for name in names}
    for i in range(repeats):
        for name in names[:: 1 if i % 2 == 0 else -1]:
            seconds[name].append(timed(calls[name]))

    def ratio(name):
        values = [x / y for x, y in zip(seconds[name], seconds[names[1]])]
        return {k: round(f(values), 4) for k, f in
                {"median": statistics.median, "min": min, "max": max}.items()}  # fmt: skip

    ratios = {name: ratio(name) for name in names if name != names[1]}
    return {
        "ms": {name: stats(values) for name, values in seconds.items()},
        "ratio": ratios[names[0]],
        "ratios": ratios,
        "pairs": repeats,  # rounds (the schema's name, from when there were two calls)
    }


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


def postprocess_stages(postprocess: Callable, calls: int) -> Dict[str, float]:
    """Host ms per call of each ``solo.postprocess.<stage>`` profiler range; 0 for a stage that
    did not run (an image without candidates stops after the first).

    Raises:
        RuntimeError: not even the first stage's range was recorded (a post-processor without
            the ranges ``tools/benchmark.py`` reads).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            postprocess()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    names = {s: f"solo.postprocess.{s}" for s in POSTPROCESS_STAGES}
    first = names[POSTPROCESS_STAGES[0]]
    if first not in totals:
        raise RuntimeError(f"The post-processor recorded no profiler range {first!r}.")
    return {s: round(totals.get(n, 0.0) / 1000 / calls, 3) for s, n in names.items()}


def flatten(tree: dict, prefix: str = "") -> Dict[str, float]:
    """Numeric leaves of a nested report as {"latency_ms.total.median": 12.3, ...}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + key] = value
    return flat


def compute_ratios(ours: Optional[dict], other: Optional[dict]) -> Dict[str, float]:
    """ours / other for every figure both have (< 1: ours is faster or smaller)."""
    a, b = flatten(ours or {}), flatten(other or {})
    return {k: round(a[k] / b[k], 4) for k in a if b.get(k)}
