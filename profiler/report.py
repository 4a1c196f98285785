"""The profiler's report: the ``report.json`` schema, its checks, atomic writing and rich tables.

A report is a plain JSON-able dict; building and checking it (data) is kept apart from
rendering it (``render_table``, ``render_comparison``). Nothing here measures or reaches back
into instrumentation; the analyses' outputs come in as arguments.

Layout of a report, schema version 3 (times in milliseconds, means per measured step;
version 2 added mode, phases_absent and compilation; version 3 added the per-step samples of
every phase and layer direction, parameters, dtype, machine, instrument_kind and interleaved,
CHANGELOG.md). Reports of version 2 are still read and checked (READABLE_SCHEMA_VERSIONS);
they lack what version 3 added.

====================  =========================  ================================================
key                   type                       meaning
====================  =========================  ================================================
schema_version        int                        ``SCHEMA_VERSION``; bumped on incompatible change
tool                  str                        always "deepprof"
created               str                        ISO 8601 time the report was built (UTC)
framework             str                        e.g. "chainer", "torch"
framework_version     str                        the framework's own version string
python                str                        Python version, e.g. "3.11.9"
device                {name: str, kind: str}     kind is "cpu" or "cuda"
model                 str                        the workload's name
mode                  str                        "eager" or "graph": the framework's compiled
                                                 mode (profiler.workloads.base, "Modes")
batch_size            int > 0                    samples per step
impls                 {conv: str, loss: str}     which implementation of each ran (e.g. "ours")
workers               int >= 0                   data-loader worker processes
seed                  int                        seed of weights and data
sync                  bool                       whether ranges synchronized the device
iters                 int > 0                    measured steps
warmup                int >= 0                   steps run before measuring, not counted
step_ms               {samples: [number], mean,  per-step wall time of the measured steps (more
                      median, iqr: number, ...}  keys, e.g. min, max, n, may follow)
phases_ms             {phase: {mean, median,     one entry for each of the eight
                      iqr: number, samples?:     ``timeline.PHASES`` not in phases_absent, and
                      [number]}}                 for an optional phase where measured
                                                 (OPTIONAL_PHASES: "communication",
                                                 "compiled_step"); the means add up to
                                                 step_ms.mean ("other" is the remainder);
                                                 samples (v3): per step, as step_ms.samples
trace                 {...}                      optional (a trace-based report): how much
                                                 of the step the trace's ops covered, op
                                                 events per step, what was not attributed
cross_check           {rows: [...], ...}         optional (--cross-check): the hooks' layer
                                                 times against the framework's trace of the
                                                 same steps (profiler.analysis.cross_check)
phases_absent         {phase: str}               optional: phases this mode has no boundary
                                                 for (e.g. forward inside a one-call compiled
                                                 step), each with why and where its time is
layers                [{name: str, type: str or  per layer in forward order: inclusive and self
                      null, forward_ms,          (minus sub-layers) times and forward calls per
                      backward_ms,               step; the host_/device_ keys appear together,
                      self_forward_ms,           only where a layer was timed on a device, and
                      self_backward_ms, calls:   then forward_ms etc. are the device numbers;
                                                 a trace-based report (instrument_kind
                                                 "trace") counts the layer's forward op
                                                 events per step in calls
                      number, host_forward_ms?,
                      host_backward_ms?,
                      device_forward_ms?,        forward_samples_ms, backward_samples_ms (v3,
                      device_backward_ms?,       both or neither): the inclusive times step by
                      forward_samples_ms?,       step, as step_ms.samples
                      backward_samples_ms?}]
instrumentation       {instrumented_step_ms_     step-time medians with and without the
                      median: number,            profiler's ranges, and the overhead in percent
                      uninstrumented_step_ms_    (the median of the neighbouring pairs' ratios,
                      median, overhead_pct:      stats.overhead_summary, with its interval and
                      number or null, ...}       verdict); null when not measured
compilation           {compiles_in_warmup: int,  optional (graph mode): graphs the framework
                      compiles_measured: int,    traced or compiled in the warm-up and in the
                      first_step_ms, ...}        measured steps (a retrace: a warning in notes)
parameters            int >= 0                   optional (v3): the model's parameter count,
                                                 where the profiled model can count it (the
                                                 seed workloads)
dtype                 str                        optional (v3): its weights' dtype(s), e.g.
                                                 "float32", where it can tell
machine               {cpu: str, logical_cores:  optional (v3): the machine the run was on
                      int, usable_cores: int,    (build_report fills it): the CPU model, its
                      host: str}                 logical cores, those this process may use
instrument_kind       "hooks" or "trace"         optional (v3): how the layer ranges were made
                                                 (instrument.base.INSTRUMENT_KINDS)
interleaved           {run_id: str, variant:     optional (v3): a variant of a comparison in
                      str, variants: [str],      interleaved rounds (--compare); step_rounds
                      rounds: int,               gives each measured step's round (null: none),
                      steps_per_round: int,      and variants of one run share run_id, so a
                      step_rounds: [int or       diff pairs them by round
                      null]}
threads               {requested: int, intra_op, optional: the CPU threads asked for (--threads)
                      inter_op: int or null,     and what the framework, its BLAS/OpenMP
                      blas, openmp, ours:        libraries (file -> threads) and our kernels
                      {str: int}, ignored:       (ops._C and op libraries -> threads) then
                      [str]}                     reported; ignored lists those that differ
notes                 [str]                      what the numbers mean (e.g. asynchronous
                                                 launches: host times are enqueue times)
errors                [str]                      what went wrong; empty for a clean run
====================  =========================  ================================================

A report with errors may lack the measured sections (step_ms, phases_ms, layers,
instrumentation): a failed run still leaves a report saying why. Only the top level is closed:
nested objects may carry more keys (e.g. per-phase samples).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from rich.console import Console
from rich.table import Table
from rich.text import Text

from profiler.analysis.diff import layers_across
from profiler.analysis.stats import describe_overhead, median, summarize
from profiler.timeline import OPTIONAL_PHASES, PHASES, phases_of

SCHEMA_VERSION = 3
#: The versions validate_report accepts: this one and version 2, which lacks _V3_KEYS and the
#: per-step samples of phases and layers.
READABLE_SCHEMA_VERSIONS = (2, 3)
INSTRUMENT_KINDS = ("hooks", "trace")
MODES = ("eager", "graph")
TOOL = "deepprof"

_REQUIRED = ("schema_version", "tool", "created", "framework", "framework_version", "python",
             "device", "model", "mode", "batch_size", "impls", "workers", "seed", "sync",
             "iters", "warmup", "notes", "errors")
_MEASURED = ("step_ms", "phases_ms", "layers", "instrumentation")
_V3_KEYS = ("parameters", "dtype", "machine", "instrument_kind", "interleaved")
_OPTIONAL = ("threads", "phases_absent", "compilation", "trace", "cross_check") + _V3_KEYS
_KEYS = frozenset(_REQUIRED + _MEASURED + _OPTIONAL)
_LAYER_NUMBERS = ("forward_ms", "backward_ms", "self_forward_ms", "self_backward_ms", "calls")
_LAYER_SPLIT = ("host_forward_ms", "host_backward_ms", "device_forward_ms",
                "device_backward_ms")
_LAYER_SAMPLES = ("forward_samples_ms", "backward_samples_ms")
# The phases are measured separately from the step; 2% leaves room for rounding in a report
# assembled by hand while still catching a phase counted twice or left out.
_PHASE_SUM_TOLERANCE = 0.02


# ----------------------------------------------------------------------------- building

def build_report(**fields: Any) -> Dict[str, Any]:
    """A report dict from the given top-level fields, filling schema_version, tool, created
    (now, UTC), python and machine (machine_facts), and notes/errors as empty lists if not
    given.

    Raises ValueError for a key the schema does not know. Does not check the rest: call
    validate_report before writing.
    """
    unknown = sorted(set(fields) - _KEYS)
    if unknown:
        raise ValueError(f"build_report: unknown report keys {unknown}; expected keys from "
                         f"{sorted(_KEYS)}")
    doc: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "tool": TOOL,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": machine_facts(), "notes": [],
        "errors": []}
    doc.update(fields)
    return doc


def machine_facts() -> Dict[str, Any]:
    """This machine as a report states it: the CPU model (/proc/cpuinfo's "model name", else
    the platform's name), its logical cores, those this process may use, and the host name."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return {"cpu": cpu, "logical_cores": os.cpu_count() or 1, "usable_cores": usable,
            "host": platform.node()}


def from_phase_breakdown(breakdown: Mapping[str, Any]) -> Dict[str, Any]:
    """{"step_ms", "phases_ms"} report sections from analysis.phases.phase_breakdown's result."""
    step = breakdown["step_ms"]
    step_ms = {"samples": list(step["samples"]), "mean": step["mean"], "median": step["median"],
               "iqr": step["iqr"]}
    summary = summarize(step["samples"])
    step_ms.update(min=summary["min_ms"], max=summary["max_ms"], n=summary["n"])
    phases_ms = {p: {k: breakdown["phases_ms"][p][k] for k in ("mean", "median", "iqr",
                                                               "samples")}
                 for p in phases_of(breakdown["phases_ms"])}
    return {"step_ms": step_ms, "phases_ms": phases_ms}


def from_layer_breakdown(rows: Iterable[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The report's layers list from analysis.phases.layer_breakdown's rows (layer_type -> type)."""
    out = []
    for row in rows:
        entry = {("type" if k == "layer_type" else k): v for k, v in row.items()}
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- checking

def _fail(path: str, message: str) -> None:
    raise ValueError(f"report.{path}: {message}")


def _join(path: str, key: str) -> str:
    # path is "" at the top level, so key paths read "report.seed", not "report..seed".
    return f"{path}.{key}" if path else key


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _number(doc: Mapping[str, Any], key: str, path: str, *, nullable: bool = False) -> None:
    if key not in doc:
        _fail(_join(path, key), "missing")
    x = doc[key]
    if x is None and nullable:
        return
    if not _is_number(x):
        _fail(_join(path, key), f"expected a finite number, got {_type_name(x)} {x!r}")


def _int(doc: Mapping[str, Any], key: str, path: str, minimum: Optional[int] = None) -> None:
    if key not in doc:
        _fail(_join(path, key), "missing")
    x = doc[key]
    if isinstance(x, bool) or not isinstance(x, int):
        _fail(_join(path, key), f"expected an int, got {_type_name(x)} {x!r}")
    if minimum is not None and x < minimum:
        _fail(_join(path, key), f"expected an int >= {minimum}, got {x}")


def _str(doc: Mapping[str, Any], key: str, path: str, *, nullable: bool = False) -> None:
    if key not in doc:
        _fail(_join(path, key), "missing")
    x = doc[key]
    if not (isinstance(x, str) or (nullable and x is None)):
        _fail(_join(path, key), f"expected a string, got {_type_name(x)} {x!r}")


def _obj(doc: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    if key not in doc:
        _fail(_join(path, key), "missing")
    if not isinstance(doc[key], Mapping):
        _fail(_join(path, key), f"expected an object, got {_type_name(doc[key])}")
    return doc[key]


def _str_list(doc: Mapping[str, Any], key: str) -> None:
    if key not in doc:
        _fail(key, "missing")
    if not isinstance(doc[key], list):
        _fail(key, f"expected a list of strings, got {_type_name(doc[key])}")
    for i, x in enumerate(doc[key]):
        if not isinstance(x, str):
            _fail(f"{key}[{i}]", f"expected a string, got {_type_name(x)} {x!r}")


def _samples(doc: Mapping[str, Any], key: str, path: str, n: int) -> None:
    """doc[key] is a list of n finite numbers (one per measured step)."""
    if key not in doc:
        _fail(_join(path, key), "missing")
    values = doc[key]
    if not isinstance(values, list) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, list) else _type_name(values)
        _fail(_join(path, key), f"expected {n} numbers (one per measured step), got {got}")
    for i, x in enumerate(values):
        if not _is_number(x):
            _fail(f"{_join(path, key)}[{i}]", f"expected a finite number, got {x!r}")


def _check_v3(doc: Mapping[str, Any]) -> None:
    """The optional keys version 3 added, where present."""
    if "parameters" in doc:
        _int(doc, "parameters", "", minimum=0)
    if "dtype" in doc:
        _str(doc, "dtype", "")
    if "machine" in doc:
        machine = _obj(doc, "machine", "")
        _str(machine, "cpu", "machine")
        _int(machine, "logical_cores", "machine", minimum=1)
        _int(machine, "usable_cores", "machine", minimum=1)
    if "instrument_kind" in doc and doc["instrument_kind"] not in INSTRUMENT_KINDS:
        _fail("instrument_kind", f"expected one of {list(INSTRUMENT_KINDS)}, got "
                                 f"{doc['instrument_kind']!r}")
    if "interleaved" in doc:
        inter = _obj(doc, "interleaved", "")
        _str(inter, "run_id", "interleaved")
        _str(inter, "variant", "interleaved")
        rounds = inter.get("step_rounds")
        if not isinstance(rounds, list) or not all(
                r is None or (isinstance(r, int) and not isinstance(r, bool) and r >= 0)
                for r in rounds):
            _fail("interleaved.step_rounds", f"expected a list of round numbers (int >= 0 or "
                                             f"null), got {rounds!r}")
        samples = (doc.get("step_ms") or {}).get("samples")
        if isinstance(samples, list) and len(rounds) != len(samples):
            _fail("interleaved.step_rounds", f"expected {len(samples)} rounds (one per "
                                             f"measured step), got {len(rounds)}")


def _check_measured(doc: Mapping[str, Any]) -> None:
    step = _obj(doc, "step_ms", "")
    if not isinstance(step.get("samples"), list):
        _fail("step_ms.samples", f"expected a list of numbers, got "
                                 f"{_type_name(step.get('samples'))}")
    for i, x in enumerate(step["samples"]):
        if not _is_number(x):
            _fail(f"step_ms.samples[{i}]", f"expected a finite number, got {x!r}")
    for key in ("mean", "median", "iqr"):
        _number(step, key, "step_ms")

    phases = _obj(doc, "phases_ms", "")
    unknown = sorted(set(phases) - set(PHASES) - set(OPTIONAL_PHASES))
    if unknown:
        _fail("phases_ms", f"unknown phases {unknown}; expected {list(PHASES)} and optionally "
                           f"{list(OPTIONAL_PHASES)}")
    absent = doc.get("phases_absent", {})
    missing = [p for p in PHASES if p not in phases and p not in absent]
    if missing:
        _fail(f"phases_ms.{missing[0]}", "missing (only a phase in phases_absent may be)")
    both = [p for p in absent if p in phases]
    if both:
        _fail(f"phases_ms.{both[0]}", "present although phases_absent lists it")
    n_steps = len(step["samples"])
    for p in phases_of(phases):
        entry = _obj(phases, p, "phases_ms")
        for key in ("mean", "median", "iqr"):
            _number(entry, key, f"phases_ms.{p}")
        if "samples" in entry:
            _samples(entry, "samples", f"phases_ms.{p}", n_steps)
    total = sum(phases[p]["mean"] for p in phases_of(phases))
    step_mean = step["mean"]
    if abs(total - step_mean) > _PHASE_SUM_TOLERANCE * abs(step_mean) + 1e-12:
        _fail("phases_ms", f"the phases' means add up to {total:.6g} ms but step_ms.mean is "
                           f"{step_mean:.6g} ms; expected them to agree within "
                           f"{_PHASE_SUM_TOLERANCE:.0%}")

    layers = doc["layers"]
    if not isinstance(layers, list):
        _fail("layers", f"expected a list, got {_type_name(layers)}")
    for i, layer in enumerate(layers):
        path = f"layers[{i}]"
        if not isinstance(layer, Mapping):
            _fail(path, f"expected an object, got {_type_name(layer)}")
        _str(layer, "name", path)
        _str(layer, "type", path, nullable=True)
        for key in _LAYER_NUMBERS:
            _number(layer, key, path)
        present = [k for k in _LAYER_SPLIT if k in layer]
        if present:
            for key in _LAYER_SPLIT:   # all four or none: half a split cannot be read
                _number(layer, key, path)
        if any(k in layer for k in _LAYER_SAMPLES):
            for key in _LAYER_SAMPLES:  # both or neither
                _samples(layer, key, path, n_steps)

    inst = _obj(doc, "instrumentation", "")
    _number(inst, "instrumented_step_ms_median", "instrumentation")
    _number(inst, "uninstrumented_step_ms_median", "instrumentation", nullable=True)
    _number(inst, "overhead_pct", "instrumentation", nullable=True)


def validate_report(doc: Any) -> None:
    """Raise ValueError naming the key path (e.g. "report.phases_ms.forward.mean") of the first
    thing in doc that is missing, unknown or of the wrong type, or if the phases' means do not
    add up to step_ms.mean within 2%.
    """
    if not isinstance(doc, Mapping):
        raise ValueError(f"report: expected an object, got {_type_name(doc)}")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise ValueError(f"report: unknown keys {unknown}")
    for key in _REQUIRED:
        if key not in doc:
            _fail(key, "missing")
    version = doc["schema_version"]
    if isinstance(version, bool) or version not in READABLE_SCHEMA_VERSIONS:
        _fail("schema_version", f"expected one of {list(READABLE_SCHEMA_VERSIONS)}, got "
                                f"{version!r}")
    newer = [k for k in _V3_KEYS if k in doc]
    if version < 3 and newer:
        raise ValueError(f"report: keys {newer} need schema_version 3, got {version}")
    if doc["tool"] != TOOL:
        _fail("tool", f"expected {TOOL!r}, got {doc['tool']!r}")
    for key in ("created", "framework", "framework_version", "python", "model"):
        _str(doc, key, "")
    try:
        datetime.datetime.fromisoformat(doc["created"])
    except ValueError:
        _fail("created", f"expected an ISO 8601 time, got {doc['created']!r}")
    device = _obj(doc, "device", "")
    _str(device, "name", "device")
    if device.get("kind") not in ("cpu", "cuda"):
        _fail("device.kind", f"expected 'cpu' or 'cuda', got {device.get('kind')!r}")
    impls = _obj(doc, "impls", "")
    _str(impls, "conv", "impls")
    _str(impls, "loss", "impls")
    _int(doc, "batch_size", "", minimum=1)
    _int(doc, "workers", "", minimum=0)
    _int(doc, "seed", "")
    _int(doc, "iters", "", minimum=1)
    _int(doc, "warmup", "", minimum=0)
    if doc["mode"] not in MODES:
        _fail("mode", f"expected one of {list(MODES)}, got {doc['mode']!r}")
    if "phases_absent" in doc:
        absent = _obj(doc, "phases_absent", "")
        for phase, why in absent.items():
            if phase not in PHASES[:-1]:
                _fail(f"phases_absent.{phase}", f"expected a phase of {list(PHASES[:-1])}")
            _str(absent, phase, "phases_absent")
    if "compilation" in doc:
        compilation = _obj(doc, "compilation", "")
        _int(compilation, "compiles_in_warmup", "compilation", minimum=0)
        _int(compilation, "compiles_measured", "compilation", minimum=0)
    if not isinstance(doc["sync"], bool):
        _fail("sync", f"expected a bool, got {_type_name(doc['sync'])} {doc['sync']!r}")
    _str_list(doc, "notes")
    _str_list(doc, "errors")
    if "threads" in doc:
        threads = _obj(doc, "threads", "")
        _int(threads, "requested", "threads", minimum=1)
        ignored = threads.get("ignored")
        if not isinstance(ignored, list) or not all(isinstance(x, str) for x in ignored):
            _fail("threads.ignored", f"expected a list of strings, got {ignored!r}")

    _check_v3(doc)
    missing = [key for key in _MEASURED if key not in doc]
    if missing and not doc["errors"]:
        _fail(missing[0], "missing (only a report with errors may lack the measured sections)")
    if not missing:
        _check_measured(doc)


# ----------------------------------------------------------------------------- writing

def _umask() -> int:
    # os.umask can only be read by setting it, which races with other threads creating files;
    # Linux publishes it in /proc instead.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def write_json_atomic(path: Union[str, os.PathLike], doc: Any) -> None:
    """Write doc as JSON to path so that readers see the old file or the new one, never half.

    Writes a temporary file in the same directory (so the rename cannot cross file systems),
    flushes it to disk, then os.replace()s it over path. On any error the temporary file is
    removed, the previous file is left as it was, and the error propagates. NaN and infinity
    are refused (they are not JSON).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ----------------------------------------------------------------------------- rendering

def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def _header(report: Mapping[str, Any]) -> Text:
    device = report.get("device", {})
    impls = report.get("impls", {})
    line = (f"{report.get('framework')} {report.get('framework_version')} on "
            f"{device.get('name')} ({device.get('kind')}), model {report.get('model')}, "
            f"{report.get('mode', 'eager')} mode, batch {report.get('batch_size')}, "
            f"conv={impls.get('conv')}, loss={impls.get('loss')}, sync={report.get('sync')}")
    return Text(line, style="bold")


def _labels(reports: Sequence[Mapping[str, Any]]) -> List[str]:
    """Column labels: the framework, with the device kind and then a number where they repeat."""
    labels = [str(r.get("framework")) for r in reports]
    if len(set(labels)) < len(labels):
        labels = [f"{r.get('framework')} ({r.get('device', {}).get('kind')})" for r in reports]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _phase_table(report: Mapping[str, Any]) -> Table:
    step = report["step_ms"]
    table = Table(title="Phases (ms per step)")
    table.add_column("phase")
    for name in ("mean", "median", "IQR", "% of step"):
        table.add_column(name, justify="right")
    for p in phases_of(report["phases_ms"]):
        e = report["phases_ms"][p]
        table.add_row(p, _ms(e["mean"]), _ms(e["median"]), _ms(e["iqr"]),
                      _pct(e["mean"], step["mean"]))
    table.add_section()
    table.add_row(Text("step", style="bold"), _ms(step["mean"]), _ms(step["median"]),
                  _ms(step["iqr"]), "100.0%")
    return table


def _merged_phase_table(reports: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Phases, mean ms per step (% of step)")
    table.add_column("phase")
    for label in _labels(reports):
        table.add_column(Text(label), justify="right")
    shown = PHASES[:-1] + tuple(p for p in OPTIONAL_PHASES
                                if any(p in r["phases_ms"] for r in reports)) + PHASES[-1:]
    for p in shown:
        table.add_row(p, *[f"{_ms(r['phases_ms'][p]['mean'])} "
                           f"({_pct(r['phases_ms'][p]['mean'], r['step_ms']['mean'])})"
                           if p in r["phases_ms"] else "-" for r in reports])
    table.add_section()
    table.add_row(Text("step", style="bold"), *[_ms(r["step_ms"]["mean"]) for r in reports])
    return table


def _layer_table(report: Mapping[str, Any], top_n: int, title: str) -> Table:
    layers = sorted(report["layers"], key=lambda e: -(e["forward_ms"] + e["backward_ms"]))
    shown = layers[:top_n]
    split = any("host_forward_ms" in e for e in shown)
    left_out = len(layers) - len(shown)
    caption = (f"{left_out} more layer(s) not shown (top {top_n} of {len(layers)} by "
               f"forward + backward)" if left_out > 0 else None)
    table = Table(title=title, caption=caption)
    # Layer names are what users look up: never cut them; cut the type instead.
    table.add_column("layer", no_wrap=True,
                     min_width=max((len(e["name"]) for e in shown), default=5))
    table.add_column("type", no_wrap=True, overflow="ellipsis", max_width=12)
    # Self times are shown only where some layer contains another (they differ then).
    nested = any(abs(e["self_forward_ms"] - e["forward_ms"]) > 1e-9
                 or abs(e["self_backward_ms"] - e["backward_ms"]) > 1e-9 for e in shown)
    # A trace has ops, not calls: its reports count the layer's forward ops per step there.
    count = "fwd ops" if report.get("instrument_kind") == "trace" else "calls"
    columns = [count, "fwd ms", "bwd ms"] + (["self fwd", "self bwd"] if nested else [])
    if split:
        columns += ["host fwd", "host bwd"]
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for e in shown:
        cells = [Text(e["name"]), Text(str(e.get("type") or "")), f"{e['calls']:g}",
                 _ms(e["forward_ms"]), _ms(e["backward_ms"])]
        if nested:
            cells += [_ms(e["self_forward_ms"]), _ms(e["self_backward_ms"])]
        if split:
            cells += [_ms(e.get("host_forward_ms")), _ms(e.get("host_backward_ms"))]
        table.add_row(*cells)
    return table


def layer_table_across(reports: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The layers of several reports (e.g. one per framework) side by side: one row per layer
    name, each report's forward and backward ms per step and the ratio of its forward +
    backward to the first report's (analysis.diff.layers_across), labelled as render_table
    labels the reports."""
    return layers_across(reports, _labels(reports))


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render_layers_across(reports: Sequence[Mapping[str, Any]], console: Optional[Console] = None,
                         *, top_n: int = 20) -> None:
    """Print layer_table_across(reports): the top_n layers by the first report's forward +
    backward time (then the others'), a column per report (forward / backward ms) with the
    ratio of its forward + backward to the first report's."""
    console = console or Console()
    table_doc = layer_table_across(reports)
    labels, rows = table_doc["labels"], table_doc["rows"]
    if not rows:
        console.print(Text("Layers across frameworks: none measured (graph mode has none)",
                           style="dim"))
        return

    def total(row, label):
        f, b = row["forward_ms"][label], row["backward_ms"][label]
        return None if f is None else f + b
    ranked = sorted(rows, key=lambda r: [-(total(r, lab) or 0.0) for lab in labels])
    shown = ranked[:top_n]
    left_out = len(rows) - len(shown)
    table = Table(title=Text(f"Layers across frameworks: forward / backward ms per step "
                             f"(forward + backward over {labels[0]}'s)", style="table.title"),
                  caption=(f"{left_out} more layer(s) not shown (top {top_n} of {len(rows)})"
                           if left_out > 0 else None))
    # Layer names are what users look up: never cut them.
    table.add_column("layer", no_wrap=True, min_width=max(len(r["name"]) for r in shown))
    for label in labels:
        table.add_column(Text(label), justify="right", no_wrap=True)
    for row in shown:
        cells = [Text(row["name"])]
        for i, label in enumerate(labels):
            f, b = row["forward_ms"][label], row["backward_ms"][label]
            cell = "-" if f is None else f"{f:.2f} / {b:.2f}"
            if i and f is not None:
                cell += f" ({_ratio(row['ratio'][label])})"
            cells.append(cell)
        table.add_row(*cells)
    console.print(table)


def _print_absent(console: Console, report: Mapping[str, Any], label: str = "") -> None:
    """The phases this mode has no boundary for, and where their time is."""
    for phase, why in report.get("phases_absent", {}).items():
        console.print(Text(f"{label + ': ' if label else ''}{phase}: not measured: {why}",
                           style="dim"))


def _print_layers(console: Console, report: Mapping[str, Any], top_n: int, title: str) -> None:
    if report["layers"]:
        console.print(_layer_table(report, top_n, title))
    else:
        console.print(Text(f"{title}: none measured in {report.get('mode', 'eager')} mode "
                           f"(report.json 'notes' say why)", style="dim"))


def _print_errors(console: Console, report: Mapping[str, Any]) -> None:
    for message in report.get("errors", []):
        console.print(Text(f"error: {message}", style="red"))


def _print_trace(console: Console, report: Mapping[str, Any]) -> None:
    """A trace-based report: how much of the step the framework's ops covered."""
    trace = report.get("trace")
    if not trace or not trace.get("coverage_of_step"):
        return
    coverage = [100 * c for c in trace["coverage_of_step"]]
    console.print(f"trace: {trace['source']}; its ops kept the step busy "
                  f"{median(coverage):.1f}% of the time (median of {len(coverage)} steps, "
                  f"range {min(coverage):.1f}-{max(coverage):.1f}%), the rest is 'other'; "
                  f"{median(trace['op_events_per_step']):.0f} op events per step",
                  highlight=False, soft_wrap=True)
    regions = trace.get("regions_ms") or []
    if regions:
        table = Table(title=f"The compiled program's kernels the trace could not give to "
                            f"one layer (ms per step; {len(regions)}; a fused kernel is never "
                            f"split between layers)", title_justify="left")
        table.add_column("region", overflow="fold")
        table.add_column("ms", justify="right")
        table.add_column("per step", justify="right")
        for row in regions[:15]:
            table.add_row(row["name"], _ms(row["ms"]), f"{row['per_step']:g}")
        console.print(table)


def render_table(report_or_reports: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
                 console: Optional[Console] = None, *, top_n: int = 20) -> None:
    """Print one report (or several, e.g. one per framework) as rich tables.

    One report: a header line, a table of phases (mean, median, IQR in ms and % of the mean
    step) and a table of the top_n layers by forward + backward time, saying how many were left
    out. Several: one merged phase table with a column per report, then one layer table
    across them (render_layers_across: a row per layer, each report's forward and backward
    and the ratio to the first). Errors are printed; a report without measurements prints
    only its header and errors.
    """
    console = console or Console()
    if isinstance(report_or_reports, Mapping):
        reports = [report_or_reports]
    else:
        reports = list(report_or_reports)
    if top_n < 1:
        raise ValueError(f"render_table: top_n must be >= 1, got {top_n}")
    measured = [r for r in reports if all(k in r for k in _MEASURED)]

    if len(reports) == 1:
        report = reports[0]
        console.print(_header(report))
        _print_errors(console, report)
        if measured:
            console.print(_phase_table(report))
            _print_absent(console, report)
            if "overhead_verdict" in report["instrumentation"]:
                console.print(describe_overhead(report["instrumentation"]))
            _print_layers(console, report, top_n, "Layers (ms per step)")
            _print_trace(console, report)
            if "cross_check" in report:
                from profiler.analysis.cross_check import render_cross_check
                render_cross_check(report["cross_check"], console)
        return

    for report in reports:
        console.print(_header(report))
        _print_errors(console, report)
    if measured:
        console.print(_merged_phase_table(measured))
        for label, report in zip(_labels(measured), measured):
            _print_absent(console, report, label)
        render_layers_across(measured, console, top_n=top_n)


def render_comparison(lines: Sequence[str], console: Optional[Console] = None, *,
                      title: str = "Differences (variant vs baseline, 95% CI)") -> None:
    """Print describe_diff lines as one table, colouring the verdicts."""
    console = console or Console()
    # Text, not a str: a title naming a factory ("file.py:factory") is no emoji code.
    # At least as wide as its title: rich wraps a title to the table's width, which follows the
    # lines' lengths (their digits), so a title could break on one run and not the next.
    table = Table(title=Text(title, style="table.title"), show_header=False,
                  min_width=len(title) + 4)
    table.add_column("comparison")
    for line in lines:
        # Text, not markup: the interval's brackets must not be read as rich style tags.
        style = ("green" if line.endswith(" faster") else
                 "red" if line.endswith(" slower") else "")
        table.add_row(Text(line, style=style))
    console.print(table)


def render_variant_phases(phases_ms: Mapping[str, Mapping[str, Mapping[str, float]]],
                          console: Optional[Console] = None, *,
                          title: str = "Per phase, median of round medians (IQR), ms") -> None:
    """Print a comparison's {phase: {variant: {median_ms, iqr_ms}}} as one table, a column
    per variant."""
    console = console or Console()
    variants = list(next(iter(phases_ms.values()), {}))
    table = Table(title=title)
    table.add_column("phase")
    for variant in variants:
        table.add_column(variant, justify="right", no_wrap=True)
    for phase, by_variant in phases_ms.items():
        table.add_row(phase, *[f"{_ms(by_variant[v]['median_ms'])} "
                               f"({_ms(by_variant[v]['iqr_ms'])})" if v in by_variant else "-"
                               for v in variants])
    console.print(table)
