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
from profiler.console import output_dir, positive_int  # noqa: F401  (argparse types)
from profiler.report import write_json_atomic
from experiments.workers import ModeUnavailable

SCHEMA = "deepprof.experiment/1"
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

# Fewer paired rounds than this and a bootstrap percentile bracket of their median is about
# the range of the rounds' values, not a 95% interval (with 5 rounds it is exactly the range);
# the same rule as experiments.bench_modes.
MIN_ROUNDS_FOR_INTERVAL = 10

CIFAR_TRAIN_IMAGES = 50_000
PUBLISHED_BATCH = 128
VERDICTS = ("supported", "refuted", "inconclusive")
DEFAULT_THRESHOLD_PCT = 5.0


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
class Hypothesis:
    """A published claim with a direction: ``effect`` is a relative difference in percent
    (variant vs baseline, from paired rounds), and the claim says it is ``direction``
    ("lower" or "higher") by at least ``threshold_pct``."""
    key: str
    claim: str
    effect: str
    direction: str
    threshold_pct: float = DEFAULT_THRESHOLD_PCT

    def __post_init__(self):
        if self.direction not in ("lower", "higher"):
            raise ValueError(f"Hypothesis {self.key}: direction: expected 'lower' or 'higher', "
                             f"got {self.direction!r}")
        if not (isinstance(self.threshold_pct, (int, float)) and self.threshold_pct > 0):
            raise ValueError(f"Hypothesis {self.key}: threshold_pct: expected a number > 0, "
                             f"got {self.threshold_pct!r}")


def verdict(estimate: float, low: float, high: float, *, direction: str,
            threshold: float) -> str:
    """The verdict rule. ``estimate`` [``low``, ``high``] is the effect with its 95% interval;
    the claim is that the effect is ``direction`` ("lower": negative, "higher": positive).

    supported: the interval excludes 0 on the claimed side and |estimate| >= threshold;
    refuted: the interval lies inside [-threshold, threshold], or excludes 0 on the other side;
    inconclusive: anything else (e.g. an interval too wide to say)."""
    if direction not in ("lower", "higher"):
        raise ValueError(f"verdict: direction: expected 'lower' or 'higher', got {direction!r}")
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"verdict: threshold: expected a number > 0, got {threshold!r}")
    for name, value in (("estimate", estimate), ("low", low), ("high", high)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"verdict: {name}: expected a finite number, got {value!r}")
    if not low <= estimate <= high:
        raise ValueError(f"verdict: expected low <= estimate <= high, got {low}, {estimate}, "
                         f"{high}")
    sign = -1.0 if direction == "lower" else 1.0
    # Flip so that the claimed side is positive.
    est = sign * estimate
    lo, hi = sorted((sign * low, sign * high))
    if lo > 0 and est >= threshold:
        return "supported"
    if hi < 0 or (-threshold <= lo and hi <= threshold):
        return "refuted"
    return "inconclusive"


def judge(hypothesis: Hypothesis, estimate: float, low: float, high: float,
          conditions: Dict[str, object], **details) -> Dict[str, object]:
    """A verdict record: the claim, the effect with its interval, the threshold, the verdict
    and the conditions it was measured under (device, threads, versions, scale)."""
    return {"key": hypothesis.key, "claim": hypothesis.claim, "effect": hypothesis.effect,
            "direction": hypothesis.direction, "threshold_pct": hypothesis.threshold_pct,
            "estimate_pct": estimate, "ci95_pct": [low, high],
            "verdict": verdict(estimate, low, high, direction=hypothesis.direction,
                               threshold=hypothesis.threshold_pct),
            "conditions": conditions, **details}


def describe_verdict(record: Dict[str, object]) -> str:
    """One line: "supported: <claim> (<effect> -12.3% [-15.0, -9.1], threshold 5%)"."""
    low, high = record["ci95_pct"]
    return (f"{record['verdict']}: {record['claim']} ({record['effect']} "
            f"{record['estimate_pct']:+.1f}% [{low:+.1f}, {high:+.1f}], threshold "
            f"{record['threshold_pct']:g}%)")


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
                 departures: Iterable[str] = (), notes: Iterable[str] = ()):
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
        load_1min, cores = self.doc["machine"]["load_average_start"][0], self.doc["machine"][
            "physical_cores"]
        if load_1min > 0.5 * cores:
            # Other work on the cores slows OpenMP barriers far more than its share.
            self.note(f"the machine was busy when this study started (1-minute load "
                      f"{load_1min:.2f} on {cores} cores): timings include that contention; "
                      f"ratios from interleaved rounds suffer least")
        self.save()

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
        for key in ("key", "claim", "estimate_pct", "ci95_pct", "threshold_pct", "verdict",
                    "conditions"):
            if key not in record:
                raise ValueError(f"result: verdicts: {record.get('key')!r} lacks {key!r}")
        if record["verdict"] not in VERDICTS:
            raise ValueError(f"result: verdicts: {record['key']!r}: verdict expected one of "
                             f"{VERDICTS}, got {record['verdict']!r}")


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
            "versions": {f: workers.get(f, {}).get("version") for f in frameworks}}


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
