"""What every study under experiments/ shares: its command-line options (--mode: the execution
modes it runs each framework in), the result.json it writes (settings, versions, machine, every
raw sample, tables, verdicts), the verdict rule, plot saving and the published-vs-ours ratio
helpers.

A study measures through experiments.workers and computes with profiler.analysis.stats; this
module only records, judges and draws. It imports no framework (each framework runs in a
worker process of its own).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ops.frameworks import CUDA_FRAMEWORKS, FRAMEWORKS
from profiler.console import (non_negative_int, output_dir,  # noqa: F401  (argparse types)
                              positive_int)
from profiler.report import write_json_atomic
from experiments.workers import ModeUnavailable, pool_counts

# 2: verdicts of a declared kind with their quantity and exact interval (interval_pct,
# confidence, n), per-visit CPU contention, the wait for a quiet machine.
SCHEMA = "deepprof.experiment/2"
# The names the published comparison used for what our workloads run.
PUBLISHED_NAMES = {"torch": "PyTorch", "chainer": "Chainer", "tensorflow": "Keras(TF)",
                   "mxnet": "Keras(MXNet)"}
STAND_IN_NOTE = ("The published 'Keras(TF)' and 'Keras(MXNet)' columns are Keras 2 on the "
                 "TensorFlow and MXNet backends. Here TensorFlow runs the model as tf.keras "
                 "(Keras 3 layers, TensorFlow backend) and MXNet runs it as a Gluon block: the "
                 "same frameworks underneath, not the same front end (Keras on MXNet no longer "
                 "exists for MXNet 1.9).")

# Execution modes (profiler.workloads.base "Modes"): eager runs the step op by op; graph is the
# framework's compiled mode (TensorFlow: the whole step in one tf.function; MXNet: the network
# hybridized; PyTorch: the network through torch.compile; Chainer has none).
EXEC_MODES = ("eager", "graph")
MODE_CHOICES = ("eager", "graph", "both", "published")
# A verdict's mode where it compares a framework's graph mode with its eager mode.
BOTH_MODES = "graph vs eager"
# How the published comparison ran each framework: Keras 2 builds a graph of the model and runs
# each step as one call of it (on TensorFlow and on MXNet, whose Keras backend bound MXNet's
# symbolic executor: hybridized Gluon is the same engine here); Chainer and PyTorch are
# define-by-run, so eager.
PUBLISHED_MODES = {"tensorflow": "graph", "mxnet": "graph", "torch": "eager",
                   "chainer": "eager"}
MODE_HELP = ("the execution mode(s) each framework runs in: eager (op by op, as Python runs "
             "it); graph (the framework's compiled mode: TensorFlow's whole step in one "
             "tf.function, MXNet's hybridized network, PyTorch's torch.compile'd network; "
             "Chainer has none and is skipped, the reason noted); both (eager and graph side "
             "by side, in the same rounds); published (each framework in the mode the "
             "published comparison ran it in: TensorFlow and MXNet graph, PyTorch and Chainer "
             "eager)")

# Fewer paired rounds than this and no verdict ("too few rounds"): the exact interval of a
# median (profiler.analysis.stats.median_ci) is [x(2), x(9)] at n = 10, 97.9% coverage; at
# n = 5 only the range of the five values is left (93.8%), and a bootstrap bracket of so few
# is that range too. The same rule as experiments.bench_modes.
MIN_ROUNDS = 10
MIN_ROUNDS_FOR_INTERVAL = MIN_ROUNDS

CIFAR_TRAIN_IMAGES = 50_000
PUBLISHED_BATCH = 128
VERDICTS = ("supported", "refuted", "inconclusive")
# What a claim gets instead of a verdict, with its reason.
NO_VERDICTS = ("too few rounds", "not testable here")
CLAIM_KINDS = ("direction", "magnitude", "mechanism")
DEFAULT_THRESHOLD_PCT = 5.0
# How long a study waits for other processes to leave the CPU before it starts.
QUIET_WAIT_S = 120.0
# A magnitude claim agrees with its published ratio when our interval lies within this factor of
# it: the published runs were one machine's epochs (no interval), on a GPU, with other versions.
MAGNITUDE_BAND = 1.25


# --------------------------------------------------------------------------- arithmetic

def steps_per_epoch(train_images: int = CIFAR_TRAIN_IMAGES, batch_size: int = PUBLISHED_BATCH
                    ) -> int:
    """Training steps in one epoch: the last, partial batch counts as a step (50000 / 128 ->
    391)."""
    for name, value in (("train_images", train_images), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"steps_per_epoch: {name}: expected a positive int, got {value!r}")
    return math.ceil(train_images / batch_size)


def extrapolate_epoch_s(step_ms: float, steps: int = None) -> float:
    """Seconds per epoch extrapolated from a step time: step_ms x steps (default the
    published 391 steps of 128 CIFAR-10 images) / 1000."""
    if steps is None:
        steps = steps_per_epoch()
    if not isinstance(step_ms, (int, float)) or isinstance(step_ms, bool) or not (
            math.isfinite(step_ms) and step_ms >= 0):
        raise ValueError(f"extrapolate_epoch_s: step_ms: expected a finite number >= 0, got "
                         f"{step_ms!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"extrapolate_epoch_s: steps: expected a positive int, got {steps!r}")
    return step_ms * steps / 1000.0


def extrapolation_label(measured_steps: int, steps: int = None) -> str:
    """The label every extrapolated s/epoch carries."""
    steps = steps_per_epoch() if steps is None else steps
    return (f"extrapolated from {measured_steps} measured steps (median step x {steps} "
            f"steps per epoch)")


def ratios_to(values: Dict[str, float], baseline: str) -> Dict[str, float]:
    """Each value divided by ``values[baseline]``."""
    if baseline not in values:
        raise ValueError(f"ratios_to: baseline: expected one of {sorted(values)}, got "
                         f"{baseline!r}")
    base = values[baseline]
    if not base:
        raise ValueError(f"ratios_to: values[{baseline!r}] is {base}; expected non-zero")
    return {name: value / base for name, value in values.items()}


def published_comparison(ours: Dict[str, float], published: Dict[str, float],
                         baseline: str = "torch") -> Dict[str, Dict[str, float]]:
    """Ours beside published, as ratios to ``baseline`` on each side (absolute times from
    different hardware do not compare; ratios between frameworks on one machine do).

    Returns {name: {"ours_ratio", "published_ratio", "ours_over_published"}} for the names in
    both."""
    ours_r = ratios_to(ours, baseline)
    published_r = ratios_to(published, baseline)
    return {name: {"ours_ratio": ours_r[name], "published_ratio": published_r[name],
                   "ours_over_published": ours_r[name] / published_r[name]}
            for name in ours if name in published}


# --------------------------------------------------------------------------- modes

def modes_for(mode: str, frameworks: Sequence[str]) -> Dict[str, List[str]]:
    """The execution modes each of ``frameworks`` runs in under ``--mode mode``: eager or graph
    for all, both (eager first), or published (PUBLISHED_MODES)."""
    if mode not in MODE_CHOICES:
        raise ValueError(f"modes_for: mode: expected one of {list(MODE_CHOICES)}, got {mode!r}")
    unknown = [f for f in frameworks if f not in PUBLISHED_MODES]
    if unknown:
        raise ValueError(f"modes_for: frameworks: expected names from {list(PUBLISHED_MODES)}, "
                         f"got {unknown}")
    if mode == "both":
        return {f: list(EXEC_MODES) for f in frameworks}
    if mode == "published":
        return {f: [PUBLISHED_MODES[f]] for f in frameworks}
    return {f: [mode] for f in frameworks}


def comparison_sets(mode: str, frameworks: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """What a study's cross-framework tables compare under ``--mode mode``: {label: {framework:
    its mode}}: one set per mode measured for all ("eager", "graph"; both under "both"), or
    "published" (each framework in its published mode)."""
    if mode == "published":
        return {"published": {f: PUBLISHED_MODES[f] for f in modes_for(mode, frameworks)}}
    chosen = EXEC_MODES if mode == "both" else (mode,)
    modes_for(mode, frameworks)          # checks mode and frameworks
    return {m: {f: m for f in frameworks} for m in chosen}


def mode_label(framework: str, mode: str) -> str:
    """'Keras(TF) graph', 'PyTorch eager'."""
    return f"{PUBLISHED_NAMES[framework]} {mode}"


def describe_modes(modes: Dict[str, str]) -> str:
    """'all eager', 'all graph', or 'PyTorch eager, Keras(TF) graph, ...' for a table title."""
    kinds = set(modes.values())
    if len(kinds) == 1 and len(modes) > 1:
        return f"all {kinds.pop()}"
    return ", ".join(mode_label(f, m) for f, m in modes.items())


def keyed(key: str, label: str) -> str:
    """A verdict key for a comparison set: unchanged for "eager" (the keys the studies had
    before they had modes), ``key@label`` otherwise."""
    return key if label == "eager" else f"{key}@{label}"


class ModePlan:
    """The execution modes each framework runs in (``--mode``), narrowed as the workers refuse
    a mode the framework has none of: :meth:`build` notes the reason in the result and returns
    None instead of failing, and the mode leaves the plan. ``skipped`` keeps {framework: {mode:
    reason}}, also recorded in the result's settings."""

    def __init__(self, mode: str, frameworks: Sequence[str]):
        self.mode = mode
        self.modes = modes_for(mode, frameworks)
        self.skipped: Dict[str, Dict[str, str]] = {}

    def runs(self, framework: str, mode: str) -> bool:
        return mode in self.modes.get(framework, ())

    def build(self, worker, result: "Result", *, name: str, config: Dict[str, object],
              steps_needed: int) -> Optional[Dict[str, object]]:
        """``worker``'s build of ``config`` (its "mode" one of the plan's); None, with the
        reason noted, where the framework has no such mode."""
        framework, mode = worker.framework, config.get("mode", "eager")
        if not self.runs(framework, mode):
            return None
        try:
            return worker.call("build", name=name, config=config, steps_needed=steps_needed)
        except ModeUnavailable as e:
            self.modes[framework].remove(mode)
            self.skipped.setdefault(framework, {})[mode] = e.reason
            result.doc["settings"]["modes_skipped"] = self.skipped
            result.doc["settings"]["modes"] = self.modes
            result.note(f"{PUBLISHED_NAMES[framework]} not measured in {mode} mode: {e.reason}")
            return None

    def sets(self) -> Dict[str, Dict[str, str]]:
        """comparison_sets, less the frameworks whose mode in a set was refused."""
        return {label: {f: m for f, m in members.items() if self.runs(f, m)}
                for label, members in comparison_sets(self.mode, list(self.modes)).items()}


# --------------------------------------------------------------------------- verdicts

@dataclass(frozen=True)
class Claim:
    """A claim a study tests, of one declared ``kind``:

    - "direction": "the effect is ``direction`` ("higher" or "lower") by more than
      ``threshold`` percent"; the effect is a paired per-round ratio, in percent;
    - "magnitude": "our ratio agrees with the published one (``published``, a ratio) within a
      factor ``threshold``" (an equivalence band on the log scale, e.g. 1.25: from 0.8x to
      1.25x the published ratio); the effect is our ratio, in percent over 1;
    - "mechanism": "a part accounts for at least ``threshold`` percent of a gap"; the effect is
      the part's per-round share of the gap, in percent.

    ``published_text`` names the published figure and the regime it was measured in (device,
    batch, front end), for the line that quotes it."""
    key: str
    kind: str
    claim: str
    threshold: float
    direction: str = "higher"
    published: Optional[float] = None
    published_text: str = ""

    def __post_init__(self):
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"Claim {self.key}: kind: expected one of {list(CLAIM_KINDS)}, "
                             f"got {self.kind!r}")
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"Claim {self.key}: direction: expected 'lower' or 'higher', got "
                             f"{self.direction!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and self.threshold > 0):
            raise ValueError(f"Claim {self.key}: threshold: expected a finite number > 0, got "
                             f"{self.threshold!r}")
        if self.kind == "magnitude" and (self.threshold <= 1 or not (
                isinstance(self.published, (int, float)) and self.published > 0)):
            raise ValueError(f"Claim {self.key}: a magnitude claim needs published > 0 and a "
                             f"band threshold > 1, got published {self.published!r}, threshold "
                             f"{self.threshold!r}")

    def threshold_text(self) -> str:
        if self.kind == "direction":
            return f"{'+' if self.direction == 'higher' else '-'}{self.threshold:g}%"
        if self.kind == "magnitude":
            return (f"{self.published / self.threshold:.2f}x-{self.published * self.threshold:.2f}x"
                    f" (published {self.published:.2f}x, band {self.threshold:g}x)")
        return f">= {self.threshold:g}% of the gap"


def rule_direction(low: float, high: float, *, direction: str, threshold: float) -> str:
    """A direction claim's verdict from its interval [low, high] (percent): with the claimed
    side made positive, supported when the low end clears the threshold (low > threshold),
    refuted when the high end falls short of it (high < threshold: the effect is smaller than
    claimed, or has the other sign), inconclusive otherwise."""
    _check_interval("rule_direction", low, high)
    if direction not in ("lower", "higher"):
        raise ValueError(f"rule_direction: direction: expected 'lower' or 'higher', got "
                         f"{direction!r}")
    lo, hi = (low, high) if direction == "higher" else (-high, -low)
    if lo > threshold:
        return "supported"
    if hi < threshold:
        return "refuted"
    return "inconclusive"


def rule_magnitude(low_ratio: float, high_ratio: float, *, published: float,
                   band: float) -> str:
    """A magnitude claim's verdict (an equivalence test on the log scale): our ratio's interval
    [low_ratio, high_ratio] against [published / band, published * band]: supported (agrees)
    when the interval lies inside the band, refuted when it lies wholly outside it,
    inconclusive when it straddles an edge."""
    _check_interval("rule_magnitude", low_ratio, high_ratio)
    lower, upper = published / band, published * band
    if lower <= low_ratio and high_ratio <= upper:
        return "supported"
    if high_ratio < lower or low_ratio > upper:
        return "refuted"
    return "inconclusive"


def rule_mechanism(low: float, high: float, *, share: float) -> str:
    """A mechanism claim's verdict: the part's share of the gap (percent) has the interval
    [low, high]; supported when it is at least ``share`` (low >= share), refuted when it is
    surely less (high < share), inconclusive otherwise."""
    _check_interval("rule_mechanism", low, high)
    if low >= share:
        return "supported"
    if high < share:
        return "refuted"
    return "inconclusive"


def _check_interval(name: str, low: float, high: float) -> None:
    for label, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise ValueError(f"{name}: {label}: expected a finite number, got {value!r}")
    if low > high:
        raise ValueError(f"{name}: expected low <= high, got {low} > {high}")


def quantity(*, model: str, batch: int, timed: str, compared: str, device: str,
             threads: object, layers: Optional[int] = None) -> Dict[str, object]:
    """What a verdict's effect is of: the model (and its depth), the batch, the execution modes
    compared, what is timed (the whole step with the loader, forward + backward, a phase),
    device and threads. :func:`judge` adds n."""
    return {"model": model, "layers": layers, "batch": batch, "compared": compared,
            "timed": timed, "device": device, "threads": threads}


def describe_quantity(q: Dict[str, object]) -> str:
    """'ResNet-20 (20 layers), batch 128, Chainer eager vs PyTorch eager, uninstrumented
    training step (loader included), cpu, 2 threads, n = 10 rounds'."""
    depth = f" ({q['layers']} layers)" if q.get("layers") else ""
    n = f", n = {q['n']} rounds" if q.get("n") is not None else ""
    return (f"{q['model']}{depth}, batch {q['batch']}, {q['compared']}, {q['timed']}, "
            f"{q['device']}, {q['threads']} threads{n}")


def judge(claim: Claim, effect, q: Dict[str, object], conditions: Dict[str, object], *,
          ceiling: Optional[str] = None, contended_rounds: Sequence[int] = (),
          **details) -> Dict[str, object]:
    """A verdict record. ``effect`` is a profiler.analysis.stats.MedianInterval in percent
    (the median of per-round values with its exact interval), or the list of per-round values
    (percent) to compute it from; fewer than MIN_ROUNDS rounds give no verdict ("too few
    rounds"). ``ceiling``: why the claim cannot reach its threshold at this scale (measured by
    the caller, e.g. "data wait is 2.2% of the step"): then the verdict is "not testable
    here", the reason beside it, and the effect is still shown. ``contended_rounds``: the
    rounds during which other processes used the CPU beyond the contention level (the verdict
    is flagged)."""
    from profiler.analysis.stats import MedianInterval, median_ci
    if not isinstance(effect, MedianInterval):
        values = [float(v) for v in effect]
        effect = median_ci(values) if len(values) >= MIN_ROUNDS else None
        if effect is None:
            estimate = float(sorted(values)[len(values) // 2]) if values else None
    record = {"key": claim.key, "kind": claim.kind, "claim": claim.claim,
              "direction": claim.direction, "threshold": claim.threshold,
              "threshold_text": claim.threshold_text(), "published": claim.published,
              "published_text": claim.published_text, "conditions": conditions,
              "contended_rounds": list(contended_rounds), "reason": None, **details}
    if effect is None or effect.n < MIN_ROUNDS:
        n = effect.n if effect is not None else len(values)
        record.update(quantity={**q, "n": n}, n=n, confidence=None, interval_pct=None,
                      estimate_pct=effect.estimate if effect is not None else estimate,
                      verdict="too few rounds",
                      reason=f"{n} round(s); a verdict needs at least {MIN_ROUNDS}")
        return record
    record.update(quantity={**q, "n": effect.n}, n=effect.n, confidence=effect.confidence,
                  estimate_pct=effect.estimate, interval_pct=[effect.low, effect.high])
    if ceiling:
        record.update(verdict="not testable here", reason=ceiling)
    elif claim.kind == "direction":
        record["verdict"] = rule_direction(effect.low, effect.high, direction=claim.direction,
                                           threshold=claim.threshold)
    elif claim.kind == "magnitude":
        record["verdict"] = rule_magnitude(1 + effect.low / 100, 1 + effect.high / 100,
                                           published=claim.published, band=claim.threshold)
    else:
        record["verdict"] = rule_mechanism(effect.low, effect.high, share=claim.threshold)
    return record


def describe_effect(record: Dict[str, object]) -> str:
    """The effect as its kind reads: '+12.3% [+8.0, +16.1] (97.9%, n = 10)' (direction,
    mechanism: a share), '8.07x [7.45, 8.59] (97.9%, n = 10)' (magnitude: our ratio)."""
    est, ci, n = record["estimate_pct"], record.get("interval_pct"), record.get("n")
    if est is None:
        return f"- (n = {n})"
    if record["kind"] == "magnitude":
        text = f"{1 + est / 100:.2f}x"
        bracket = f" [{1 + ci[0] / 100:.2f}, {1 + ci[1] / 100:.2f}]" if ci else ""
    else:
        text = f"{est:+.1f}%"
        bracket = f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""
    level = f"{record['confidence']:.1%}, " if record.get("confidence") else ""
    return f"{text}{bracket} ({level}n = {n})"


def describe_verdict(record: Dict[str, object]) -> str:
    """One line: "supported (direction): <claim>: <quantity>: +12.3% [+8.0, +16.1] (97.9%,
    n = 10), threshold +5%"."""
    reason = f" ({record['reason']})" if record.get("reason") else ""
    flag = (f"; {len(record['contended_rounds'])} contended round(s)"
            if record.get("contended_rounds") else "")
    return (f"{record['verdict']}{reason} [{record['kind']}]: {record['claim']}: "
            f"{describe_quantity(record['quantity'])}: {describe_effect(record)}, threshold "
            f"{record['threshold_text']}{flag}")


# --------------------------------------------------------------------------- machine

def machine_info() -> Dict[str, object]:
    """CPU model, its AVX2/AVX-512 flags, physical cores and logical CPUs usable, memory and
    the load average now."""
    from ops.threads import physical_cores
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        pass
    return {"cpu_model": model, "avx2": "avx2" in flags, "fma": "fma" in flags,
            "avx512": sorted(f for f in flags if f.startswith("avx512")),
            "physical_cores": physical_cores(), "logical_cpus": len(os.sched_getaffinity(0)),
            "memory_gib": memory_gib, "load_average_start": list(os.getloadavg()),
            "platform": platform.platform(), "python": platform.python_version()}


def library_versions() -> Dict[str, str]:
    """Versions of what the orchestrating process itself uses (the frameworks' versions come
    from their workers)."""
    import numpy
    import scipy
    out = {"python": platform.python_version(), "numpy": numpy.__version__,
           "scipy": scipy.__version__}
    try:
        import matplotlib
        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        out["matplotlib"] = "not installed"
    return out


# --------------------------------------------------------------------------- command line

def add_common_arguments(parser: argparse.ArgumentParser, study: str, *,
                         default_mode: str = "eager") -> None:
    """--full, --out, --threads, --device, --frameworks, --mode (default ``default_mode``) for
    ``study``'s parser."""
    from experiments.timing import add_threads_argument
    parser.add_argument("--full", action="store_true",
                        help="the published settings (hours on a CPU) instead of the quick "
                             "scale that `make experiments` runs")
    parser.add_argument("--out", type=output_dir, default=f"runs/experiments/{study}",
                        help="output folder: result.json and the plots (default: %(default)s)")
    add_threads_argument(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: PyTorch and Chainer on the GPU (the only frameworks with a "
                             "GPU build here); fails with a clear message where there is no "
                             "GPU (default: %(default)s)")
    parser.add_argument("--frameworks", default=None, metavar="A,B",
                        help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: all "
                             f"that the study and device allow)")
    if default_mode not in MODE_CHOICES:
        raise ValueError(f"add_common_arguments: default_mode: expected one of "
                         f"{list(MODE_CHOICES)}, got {default_mode!r}")
    parser.add_argument("--mode", choices=MODE_CHOICES, default=default_mode,
                        help=f"{MODE_HELP} (default: %(default)s)")
    parser.add_argument("--quiet-wait", type=non_negative_int, default=int(QUIET_WAIT_S),
                        metavar="SECONDS",
                        help="before measuring, wait up to this long for other processes to "
                             "leave the CPU nearly idle (the wait and whether it succeeded are "
                             "recorded); 0: do not wait (default: %(default)s)")


def resolve_frameworks(parser: argparse.ArgumentParser, args, allowed: Sequence[str]
                       ) -> List[str]:
    """--frameworks checked against ``allowed`` and --device; with --device cuda only
    PyTorch and Chainer, and only where a GPU is present (else parser.error)."""
    allowed = [f for f in allowed if args.device == "cpu" or f in CUDA_FRAMEWORKS]
    if args.frameworks is None:
        chosen = list(allowed)
    else:
        chosen = [f.strip() for f in args.frameworks.split(",") if f.strip()]
        bad = [f for f in chosen if f not in allowed]
        if bad or not chosen:
            parser.error(f"--frameworks: expected a comma-separated subset of "
                         f"{','.join(allowed)} (device {args.device}), got {args.frameworks!r}")
    if args.device == "cuda":
        import ops
        if not ops.cuda_available():
            parser.error("--device cuda: no CUDA GPU is available on this machine "
                         "(ops.cuda_available() is False: no driver or no device); the GPU "
                         "rows run on the GPU machine, see ../shared/device/README.md")
    return chosen


def progress(message: str) -> None:
    """A progress line on stderr with the wall-clock time, flushed at once."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- result.json

class Result:
    """A study's result.json, rewritten atomically after every change, so a run that fails
    half-way keeps what it measured (``status`` then says "failed" with the error)."""

    def __init__(self, study: str, out: Path, *, settings: Dict[str, object], scale: str,
                 departures: Iterable[str] = (), notes: Iterable[str] = (),
                 quiet_wait_s: float = QUIET_WAIT_S):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "result.json"
        self.began = time.monotonic()
        self.doc: Dict[str, object] = {
            "schema": SCHEMA, "study": study, "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": None,
            "wall_s": None, "command": " ".join([Path(sys.executable).name, "-m",
                                                 f"experiments.{study}", *sys.argv[1:]]),
            "scale": scale, "departures": list(departures), "settings": settings,
            "machine": machine_info(), "versions": library_versions(), "workers": {},
            "samples": {}, "tables": [], "plots": [], "verdicts": [], "notes": list(notes),
            "errors": []}
        self.save()
        self.wait_for_quiet(quiet_wait_s)

    def wait_for_quiet(self, max_s: float) -> None:
        """Waits (up to ``max_s``; 0: not at all) until other processes leave the CPU nearly
        idle before anything is measured, and records the wait; a machine that never went
        quiet is a note, and the per-round contention flags the rounds it touched."""
        from experiments.contention import wait_for_quiet
        if not max_s:
            self.doc["machine"]["quiet_wait"] = None
            return
        progress(f"{self.doc['study']}: waiting for a quiet machine (at most {max_s:.0f} s)")
        waited = wait_for_quiet(max_s=max(float(max_s), 3.0))
        self.doc["machine"]["quiet_wait"] = waited
        if not waited["quiet"]:
            self.note(f"the machine did not go quiet within {waited['waited_s']:.0f} s (other "
                      f"processes used {waited['busy_cores_last']:.2f} cores, the quiet level "
                      f"is {waited['quiet_cores']:g}): measured anyway; rounds above the "
                      f"contention level are flagged in the verdicts")
        self.save()

    def contention(self, samples) -> List[int]:
        """Per-round contention of ``samples`` (interleaved_rounds' answers, each visit's CPU
        use measured), kept under ``contention``; returns the contended rounds (0-based)."""
        from experiments.contention import CONTENTION_LEVEL_CORES, round_contention
        rounds = round_contention(samples)
        self.doc.setdefault("contention", {"level_cores": CONTENTION_LEVEL_CORES,
                                           "blocks": []})["blocks"].append(rounds)
        self.save()
        return [r["round"] for r in rounds if r["contended"]]

    def record_worker(self, framework: str, hello: Dict[str, object]) -> None:
        """What a framework's worker reported at start-up (version, threads, pid)."""
        self.doc["workers"][framework] = hello
        self.doc["versions"][framework] = hello.get("version")
        self.save()

    def add_samples(self, key: str, values: object) -> None:
        """Raw samples under ``samples[key]`` (replaced if present)."""
        self.doc["samples"][key] = values
        self.save()

    def add_table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
                  note: str = "") -> None:
        """A table REPORT.md renders as-is: ``rows`` of cells in ``columns`` order."""
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"Result.add_table: rows: expected {len(columns)} cells per "
                                 f"row ({list(columns)}), got {len(row)}: {list(row)}")
        self.doc["tables"].append({"title": title, "columns": list(columns),
                                   "rows": [list(r) for r in rows], "note": note})
        self.save()

    def add_plot(self, fig, name: str, caption: str) -> Path:
        """Saves the matplotlib figure ``fig`` as ``name`` (a .png) beside result.json."""
        path = save_plot(fig, self.out / name)
        self.doc["plots"].append({"file": name, "caption": caption})
        self.save()
        return path

    def add_verdict(self, record: Dict[str, object]) -> None:
        """A record from :func:`judge`; printed as it comes."""
        self.doc["verdicts"].append(record)
        progress(describe_verdict(record))
        self.save()

    def note(self, text: str) -> None:
        """A note kept in result.json (and REPORT.md), printed as it comes."""
        self.doc["notes"].append(text)
        progress(f"note: {text}")
        self.save()

    def error(self, text: str) -> None:
        self.doc["errors"].append(text)
        progress(f"error: {text}")
        self.save()

    def finish(self, failed: Optional[BaseException] = None) -> None:
        """Status, end time, wall time and the load average at the end."""
        if failed is not None:
            self.doc["errors"].append(f"{type(failed).__name__}: {failed}")
        self.doc["status"] = "failed" if failed is not None or self.doc["errors"] else "complete"
        self.doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.doc["wall_s"] = time.monotonic() - self.began
        self.doc["machine"]["load_average_end"] = list(os.getloadavg())
        self.save()

    def save(self) -> None:
        # write_json_atomic refuses NaN and what is not JSON; a diverged loss (parity) is NaN,
        # so the doc goes through json first: "NaN"/"Infinity" and str() of other values.
        write_json_atomic(self.path, json.loads(json.dumps(self.doc, default=str),
                                                parse_constant=str))

    def run(self, measure, *args) -> int:
        """Calls ``measure(*args)`` and finishes the result whether it completes or fails
        half-way (the error recorded, then raised again); 0 for the study's exit status."""
        try:
            measure(*args)
        except BaseException as e:
            self.finish(e)
            raise
        self.finish()
        return 0


REQUIRED_KEYS = {"schema": str, "study": str, "status": str, "started": str, "scale": str,
                 "departures": list, "settings": dict, "machine": dict, "versions": dict,
                 "workers": dict, "samples": dict, "tables": list, "plots": list,
                 "verdicts": list, "notes": list, "errors": list}


def validate_result(doc: Dict[str, object]) -> None:
    """Raises ValueError naming the first key of a result.json that is missing or of the
    wrong kind."""
    if not isinstance(doc, dict):
        raise ValueError(f"result: expected a JSON object, got {type(doc).__name__}")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"result: {key}: expected {kind.__name__}, got "
                             f"{type(doc.get(key)).__name__}")
    if doc["schema"] != SCHEMA:
        raise ValueError(f"result: schema: expected {SCHEMA!r}, got {doc['schema']!r}")
    for key in ("cpu_model", "avx2", "avx512", "physical_cores", "load_average_start"):
        if key not in doc["machine"]:
            raise ValueError(f"result: machine: expected key {key!r}")
    for table in doc["tables"]:
        for row in table["rows"]:
            if len(row) != len(table["columns"]):
                raise ValueError(f"result: table {table['title']!r}: a row has {len(row)} cells "
                                 f"for {len(table['columns'])} columns")
    for record in doc["verdicts"]:
        for key in ("key", "kind", "claim", "quantity", "estimate_pct", "interval_pct", "n",
                    "threshold", "verdict", "conditions"):
            if key not in record:
                raise ValueError(f"result: verdicts: {record.get('key')!r} lacks {key!r}")
        if record["verdict"] not in VERDICTS + NO_VERDICTS:
            raise ValueError(f"result: verdicts: {record['key']!r}: verdict expected one of "
                             f"{VERDICTS + NO_VERDICTS}, got {record['verdict']!r}")


def conditions(args, workers: Dict[str, Dict[str, object]], scale: str,
               frameworks: Sequence[str], modes) -> Dict[str, object]:
    """The conditions a verdict holds under: device, threads, versions, scale, and the
    execution mode each framework was measured in (``modes``: {framework: mode}, or one mode
    for all; BOTH_MODES where the verdict compares a framework's two modes)."""
    if isinstance(modes, str):
        modes = {f: modes for f in frameworks}
    missing = [f for f in frameworks if modes.get(f) not in EXEC_MODES + (BOTH_MODES,)]
    if missing:
        raise ValueError(f"conditions: modes: expected eager, graph or {BOTH_MODES!r} for each "
                         f"of {list(frameworks)}, got {modes}")
    return {"device": args.device, "threads": args.threads, "scale": scale,
            "modes": {f: modes[f] for f in frameworks},
            "versions": {f: workers.get(f, {}).get("version") for f in frameworks},
            # What each pool reported after the setting (the preflight stops a study whose
            # pools ignored it), not only the count asked for.
            "threads_effective": {f: pool_counts(workers.get(f, {}).get("threads") or {})
                                  for f in frameworks}}


# --------------------------------------------------------------------------- plots

def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_plot(fig, path: Path) -> Path:
    """Writes ``fig`` as PNG at ``path`` (atomically) and closes it."""
    path = Path(path)
    if path.suffix != ".png":
        raise ValueError(f"save_plot: path: expected a .png file name, got {path.name!r}")
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    pyplot().close(fig)
    return path


def fmt(value: Optional[float], digits: int = 1) -> str:
    """A number for a table cell; '-' for None."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def fmt_ci(estimate: float, low: float, high: float) -> str:
    """'+12.3% [+8.0, +16.1]'."""
    return f"{estimate:+.1f}% [{low:+.1f}, {high:+.1f}]"


def paired_effect(a: Sequence[float], b: Sequence[float]):
    """b over a from paired rounds: the median of the per-round ratios in percent with its
    exact interval (profiler.analysis.stats.paired_ratio_interval); None where the rounds are
    too few for any 95% interval (<= 5)."""
    from profiler.analysis.stats import paired_ratio_interval
    if len(a) != len(b):
        raise ValueError(f"paired_effect: a and b: expected one value per round each, got "
                         f"{len(a)} and {len(b)}")
    if len(a) < 6:
        return None
    return paired_ratio_interval(a, b)


def per_round_effect(values: Sequence[float]):
    """The median of per-round values with its exact interval (median_ci); None where the
    rounds are too few for a 95% interval (<= 5)."""
    from profiler.analysis.stats import median_ci
    return median_ci(values) if len(values) >= 6 else None


def median_bar(values: Sequence[float]):
    """A bar for a plot: (the median of ``values``, how far its exact interval reaches below
    it, and above it); no whisker (0, 0) where the rounds are too few for an interval."""
    from profiler.analysis.stats import median
    centre, effect = median(values), per_round_effect(values)
    if effect is None:
        return centre, 0.0, 0.0
    return centre, centre - effect.low, effect.high - centre


def fmt_effect(effect, *, ratio: bool = False, digits: int = 1) -> str:
    """A table cell for a MedianInterval in percent: '+12.3% [+8.0, +16.1] (n 10)', or as a
    ratio ('1.12 [1.08, 1.16] (n 10)'); '-' for None (too few rounds for an interval)."""
    if effect is None:
        return "- (too few rounds)"
    if ratio:
        r = lambda x: f"{1 + x / 100:.2f}"   # noqa: E731
        return f"{r(effect.estimate)} [{r(effect.low)}, {r(effect.high)}] (n {effect.n})"
    return (f"{effect.estimate:+.{digits}f}% [{effect.low:+.{digits}f}, "
            f"{effect.high:+.{digits}f}] (n {effect.n})")


INTERVAL_NOTE = ("Intervals: the median of the per-round values (paired ratios, shares or "
                 "slopes, one per round) with its exact distribution-free interval, two order "
                 "statistics of the rounds (profiler.analysis.stats.median_ci): at n = 10 "
                 "rounds it is [x(2), x(9)] with 97.9% coverage, at n = 12 [x(3), x(10)] with "
                 "96.1%; the coverage of each verdict's interval is printed with it.")


def plot_verdicts(result: "Result", records: Sequence[Dict[str, object]], name: str,
                  title: str) -> None:
    """The verdicts' own figure: each claim's effect with the interval its verdict used, the
    threshold (direction, mechanism) or the published band (magnitude) it was judged against,
    n and the verdict; one panel per kind, labelled in its unit."""
    shown = [r for r in records if r.get("estimate_pct") is not None]
    if not shown:
        return
    plt = pyplot()
    kinds = [k for k in CLAIM_KINDS if any(r["kind"] == k for r in shown)]
    heights = [max(1.5, 0.42 * sum(r["kind"] == k for r in shown) + 0.9) for k in kinds]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(10, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    colours = {"supported": "#2a9d4b", "refuted": "#c0392b", "inconclusive": "#7f7f7f",
               "too few rounds": "#bbbbbb", "not testable here": "#bbbbbb"}
    for ax, kind in zip(axes[:, 0], kinds):
        rows = [r for r in shown if r["kind"] == kind]
        for y, r in enumerate(rows):
            scale = (lambda v: 1 + v / 100) if kind == "magnitude" else (lambda v: v)
            est = scale(r["estimate_pct"])
            colour = colours[r["verdict"]]
            if r.get("interval_pct"):
                lo, hi = (scale(v) for v in r["interval_pct"])
                ax.plot([lo, hi], [y, y], color=colour, lw=2.5)
            ax.plot([est], [y], "o", color=colour)
            if kind == "magnitude":
                p, band = r["published"], r["threshold"]
                ax.plot([p / band, p * band], [y, y], color="#f0b429", lw=9, alpha=0.35,
                        solid_capstyle="butt")
                ax.plot([p], [y], "|", color="#b07d00", ms=14)
            else:
                edge = r["threshold"] * (-1 if r["direction"] == "lower" and
                                         kind == "direction" else 1)
                ax.plot([edge, edge], [y - 0.4, y + 0.4], color="#b07d00", lw=1.5)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{_short(r)} (n {r['n']}): {r['verdict']}" for r in rows],
                           fontsize=7)
        ax.invert_yaxis()
        if kind == "magnitude":
            ax.set_xscale("log")
            ax.set_xlabel("our ratio (x); band: published ratio / 1.25 to x 1.25 (tick: "
                          "published)")
        elif kind == "direction":
            ax.axvline(0, color="black", lw=0.6)
            ax.set_xlabel("effect, % of the baseline's time (tick: threshold)")
        else:
            ax.set_xlabel("share of the gap, % (tick: claimed share)")
        ax.set_title(f"{kind} claims", fontsize=9)
    fig.suptitle(title, fontsize=10)
    result.add_plot(fig, name, f"{title}: each claim's median effect (dot) with the exact "
                               f"interval its verdict used (line), against its threshold or "
                               f"published band; n rounds and the verdict in the label.")


def _short(record: Dict[str, object]) -> str:
    """A verdict's label for a plot: its key without the study's name."""
    return record["key"].split(".", 1)[-1]
