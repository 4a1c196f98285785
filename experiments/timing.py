"""Timing for the benchmarks: interleaved rounds, medians and spreads, atomic JSON output.

Variants are timed in rounds (A B C, then C A B, ...: each round rotates who goes first), so
drift and cache warmth hit every variant alike, and ratios are taken within a round before
their median is reported. Timing: host wall clock on the CPU; CUDA events on the GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional


def iqr(values: List[float]) -> float:
    """Interquartile range: the spread we report beside every median."""
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


class Timer:
    """Milliseconds per call of fn over ``repeat`` calls, on the host clock or, for "cuda",
    with CUDA events (imports torch only then)."""

    def __init__(self, device: str = "cpu", synchronize: Optional[Callable[[], None]] = None):
        self.device = device
        self.synchronize = synchronize

    def __call__(self, fn: Callable[[], None], repeat: int) -> float:
        if self.device == "cuda":
            import torch
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / repeat
        began = time.perf_counter()
        for _ in range(repeat):
            fn()
        if self.synchronize is not None:
            self.synchronize()
        return (time.perf_counter() - began) * 1e3 / repeat


def interleaved(variants: Dict[str, Callable[[], None]], timer: Timer, rounds: int, warmup: int,
                repeat: int) -> Dict[str, List[float]]:
    """ms per call of every variant, one sample per round, rounds rotating the order."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].append(timer(variants[name], repeat))
    return samples


def summarize(samples: Dict[str, List[float]], baseline: str) -> Dict[str, dict]:
    """Per variant: median and IQR in ms, and the median (IQR) of its per-round ratio to
    ``baseline`` measured in the same round."""
    out = {}
    for name, values in samples.items():
        ratios = [v / b for v, b in zip(values, samples[baseline])]
        out[name] = {"median_ms": statistics.median(values), "iqr_ms": iqr(values),
                     "ratio": statistics.median(ratios), "ratio_iqr": iqr(ratios),
                     "samples_ms": values}
    return out


def write_json(path: Path, payload: dict) -> None:
    """Writes atomically: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


def add_threads_argument(parser) -> None:
    """--threads N, as the profiler has it (ops.threads), for a benchmark's parser."""
    from ops.threads import physical_cores
    parser.add_argument("--threads", type=int, default=physical_cores(), metavar="N",
                        help="CPU threads for each framework's intra-op pool, its BLAS and "
                             "OpenMP libraries and our kernels, set before any timing "
                             "(default: the physical cores this process may use, here "
                             "%(default)s)")


def apply_threads(threads: int, frameworks: List[str]) -> Dict[str, dict]:
    """Sets ``threads`` everywhere (ops.threads.set_cpu_threads) before the frameworks start,
    and returns per framework what it then reports; prints a warning for any pool that did not
    take the count, so a ratio is never silently measured at another thread count."""
    import sys
    from ops.threads import set_cpu_threads, thread_report
    set_cpu_threads(threads, frameworks)
    reports = {framework: thread_report(framework, threads) for framework in frameworks}
    for framework, report in reports.items():
        if report["ignored"]:
            print(f"warning: {framework}: asked for {threads} threads, but these did not take "
                  f"it: {', '.join(report['ignored'])}", file=sys.stderr)
    return reports
