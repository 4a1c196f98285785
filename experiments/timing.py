"""Timing for the benchmarks (bench_kernels, bench_impls): the clock, and variants timed in
interleaved rounds with their per-round ratios.

Variants are timed in rounds whose order rotates (A B C, then B C A, then C A B:
``profiler.analysis.stats.interleaved_order``), so drift and cache warmth hit every variant
alike, and a ratio is taken within a round before its median is reported. Timer: host wall
clock on the CPU; CUDA events on the GPU.

This module measures; it computes no statistic of its own (medians and IQRs come from
``profiler.analysis.stats``, so every IQR in the project has one definition) and writes no
files (the benchmarks write with ``profiler.report.write_json_atomic``). The benchmarks'
--threads option (``add_threads_argument``, ``apply_threads``) sets threads as the profiler
does (profiler.environment).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Optional

from profiler.analysis import stats


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
    """ms per call of every variant, one sample per round, after ``warmup`` untimed rounds;
    round r runs them in ``stats.interleaved_order(variants, rounds)[r]``: it starts at
    variant r % k and goes round in the given order."""
    names = list(variants)
    order = stats.interleaved_order(names, rounds)  # validates names and rounds before any work
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_order in order:
        for name in round_order:
            samples[name].append(timer(variants[name], repeat))
    return samples


def summarize(samples: Dict[str, List[float]], baseline: str) -> Dict[str, dict]:
    """Per variant: median and IQR in ms (``stats.median``, ``stats.iqr``), and the median
    (IQR) of its per-round ratio to ``baseline``: ``samples[name][r] / samples[baseline][r]``,
    both measured in round r, so drift between rounds cancels in each ratio.

    Returns {name: {"median_ms", "iqr_ms", "ratio", "ratio_iqr", "samples_ms"}}. Every
    variant needs as many samples as the baseline (one per round)."""
    if baseline not in samples:
        raise ValueError(f"summarize: baseline: expected one of {sorted(samples)}, got "
                         f"{baseline!r}")
    rounds = len(samples[baseline])
    out = {}
    for name, values in samples.items():
        if len(values) != rounds:
            raise ValueError(f"summarize: samples[{name!r}]: expected {rounds} samples (one "
                             f"per round, as the baseline {baseline!r}), got {len(values)}")
        ratios = [v / b for v, b in zip(values, samples[baseline])]
        out[name] = {"median_ms": stats.median(values), "iqr_ms": stats.iqr(values),
                     "ratio": stats.median(ratios), "ratio_iqr": stats.iqr(ratios),
                     "samples_ms": values}
    return out


def add_threads_argument(parser) -> None:
    """--threads N, as the profiler has it (ops.threads), for a benchmark's parser."""
    from ops.threads import physical_cores
    from profiler.console import positive_int
    parser.add_argument("--threads", type=positive_int, default=physical_cores(), metavar="N",
                        help="CPU threads for each framework's intra-op pool, its BLAS and "
                             "OpenMP libraries and our kernels, set before any timing "
                             "(default: the physical cores this process may use, here "
                             "%(default)s)")


def apply_threads(threads: int, frameworks: List[str]) -> Dict[str, dict]:
    """Sets ``threads`` everywhere before the frameworks start, as the profiler does
    (profiler.environment), and returns per framework what it then reports; a pool that did
    not take the count is a warning on stderr, so a ratio is never silently measured at
    another thread count."""
    import sys
    from profiler import environment
    notes: List[str] = []
    environment.use_threads(threads, frameworks, notes)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return {framework: environment.threads_section(threads, framework, [])
            for framework in frameworks}
