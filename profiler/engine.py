"""The one profiling engine: a training step's ranges into a Timeline, steps run for a target,
the report and its views, and comparisons in interleaved rounds.

Whatever is profiled (a user's own model and loop, or a seed workload: profiler.targets) runs
through the same pieces:

- :class:`LayerProfiler` around one step at a time: the framework's instrument produces the
  layer ranges (by hooks while the step runs, or from the framework's own trace after it:
  ``instrument.base``), the step's phases come from its boundaries (``mark_output``, the
  backward call, the output's gradient, the optimizer step) or are marked by hand
  (``phase``); what no boundary covers is "other".
- :class:`Session`: a target stepping under its profiler, one step at a time (instrumented,
  plain, and the two partial ways a benchmark of the instruments needs).
- :func:`profile` and :func:`compare`: the runs the CLI, the API, the experiments and the
  benchmarks all use; :class:`Report` and :class:`Comparison` save them with one writer of
  views (:func:`write_views`).

This module knows no framework (the instruments do) and no command line (profiler.layerwise).
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Union

from profiler import instrument as instruments
from profiler.analysis.cross_check import cross_check
from profiler.analysis.flamegraph import folded_stacks, to_speedscope
from profiler.analysis.nesting import check_nesting
from profiler.analysis.phases import layer_breakdown, phase_breakdown, region_breakdown
from profiler.analysis.stats import (OVERHEAD_GOAL_PCT, interleaved_order, median,
                                     overhead_schedule, overhead_summary)
from profiler.analysis.trace_events import to_chrome_trace
from profiler.analysis.variants import compare_variants
from profiler.instrument.base import Subject
from profiler.recorder import NVTX, PHASE_COLOURS, Recorder
from profiler.report import (build_report, from_layer_breakdown, from_phase_breakdown,
                             render_table, validate_report, write_json_atomic)
from profiler.timeline import PHASES, Timeline

# phase(name) takes a phase of the report, or "data" for "data_wait".
PHASE_ALIASES = {"data": "data_wait"}
INSTRUMENTS = ("hooks", "trace")
MARKABLE_PHASES = tuple(p for p in PHASES if p != "other") + ("compiled_step",)

# The automatic phase that follows each boundary.
_AFTER = {"step_start": "forward", "mark_output": "loss_forward",
          "backward_start": "loss_backward", "output_grad": "backward",
          "communication_wait": "communication",
          "backward_end": "other", "optimizer_start": "optimizer", "optimizer_end": "other"}
BOUNDARIES = tuple(e for e in _AFTER if e not in ("step_start", "output_grad",
                                                   "communication_wait"))

LayerFilter = Union[None, Callable[[str, Any], bool], Sequence[str]]


# --------------------------------------------------------------------------- reports

class Report:
    """A finished report (the dict of profiler.report) and the timeline behind it."""

    def __init__(self, doc: Dict[str, Any], timeline: Timeline):
        self.doc = doc
        self.timeline = timeline

    def save(self, out: Union[str, Path]) -> Dict[str, Path]:
        """Writes report.json, trace.json, flame.folded and flame.speedscope.json into ``out``
        (created); returns the paths. A view that cannot be drawn is an error in the report,
        and report.json is still written."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = write_views(out, self.timeline, self.doc)
        write_json_atomic(out / "report.json", self.doc)
        written["report"] = out / "report.json"
        return written

    def print(self) -> None:
        """The CLI's tables of this report."""
        render_table(self.doc)

    def __getitem__(self, key: str) -> Any:
        return self.doc[key]


def write_views(out: Path, timeline: Timeline, doc: Dict[str, Any]) -> Dict[str, Path]:
    """trace.json and the flame graphs of ``timeline`` into ``out``; a failure is appended to
    doc["errors"] rather than raised, so the report is still written."""
    written: Dict[str, Path] = {}
    try:
        check_nesting(timeline)
    except ValueError as e:
        doc["errors"].append(f"ranges not properly nested (trace still written): {e}")
    try:
        meta = {k: doc[k] for k in ("framework", "model", "batch_size")}
        write_json_atomic(out / "trace.json", to_chrome_trace(timeline, metadata=meta))
        (out / "flame.folded").write_text("\n".join(folded_stacks(timeline)) + "\n")
        write_json_atomic(out / "flame.speedscope.json",
                          to_speedscope(timeline, name=f"{doc['framework']} {doc['model']}"))
        written.update(trace=out / "trace.json", folded=out / "flame.folded",
                       speedscope=out / "flame.speedscope.json")
    except ValueError as e:
        doc["errors"].append(f"trace/flame graph: {e}")
    return written


@dataclass
class RunDescription:
    """What a report says about the run besides its measurements: the model's name, samples
    per step (None: from the output given to mark_output), the impls, data-loader workers,
    seed, and sentences saying what the phases mean for this kind of target."""
    model: str
    batch_size: Optional[int] = None
    impls: Dict[str, str] = field(default_factory=lambda: {"conv": "the model's own",
                                                            "loss": "the caller's"})
    workers: int = 0
    seed: int = 0
    notes: List[str] = field(default_factory=list)
    # "eager" or "graph" (the framework's compiled mode: no layer hooks run inside it), and
    # whether a step is one compiled call (TensorFlow's graph step: no phase boundary inside).
    mode: str = "eager"
    one_call: bool = False
    # "hooks" (ranges while the step runs) or "trace" (the framework's own trace, read after
    # the step: instrument.base); cross_check: both on the same steps, compared in the report.
    instrument: str = "hooks"
    cross_check: bool = False


# --------------------------------------------------------------------------- phases

class _PhaseCursor:
    """The step's automatic phases: one phase open at a time, from one boundary to the next,
    paused while the user marks a phase by hand. Records host "phase" ranges (with NVTX)."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.current: Optional[str] = None
        self.since_ns = 0
        self._nvtx = None
        self.manual: set = set()           # phases the user marked by hand this run
        self.boundaries: List[str] = []    # this step's, in order

    def start(self, first: str = "forward") -> None:
        """Opens the step's first automatic phase ("other": none, for a one-call step)."""
        self.boundaries = []
        self._open(first, self.recorder.now_ns())

    def boundary(self, event: str, at_ns: Optional[int] = None) -> None:
        """An event of the step (a key of _AFTER): closes the open automatic phase and opens
        the next one, unless the user marks that phase by hand. ``at_ns``: when it happened,
        if earlier than now (never before the open phase began)."""
        now = self.recorder.now_ns() if at_ns is None else max(at_ns, self.since_ns)
        self.boundaries.append(event)
        if event in ("backward_end", "communication_wait") and self.current == "loss_backward":
            # No output gradient came (none marked, or none needed): the whole backward call
            # is the backward phase.
            self.current = "backward"
        self._close(now)
        self._open(_AFTER[event], now)

    def pause(self) -> None:
        self._close(self.recorder.now_ns())

    def resume(self) -> None:
        if self.current is not None:
            self._open(self.current, self.recorder.now_ns())

    def stop(self) -> None:
        self._close(self.recorder.now_ns())
        self.current = None

    def _automatic(self, phase: str) -> bool:
        # A step marked as one compiled call has no automatic phase inside it.
        return phase != "other" and phase not in self.manual and \
            "compiled_step" not in self.manual

    def _open(self, phase: str, now: int) -> None:
        self.current, self.since_ns = phase, now
        if self.recorder.enabled and self._automatic(phase):
            self._nvtx = NVTX.start(phase, PHASE_COLOURS.get(phase, "blue"))

    def _close(self, now: int) -> None:
        if self._nvtx is not None:
            NVTX.end(self._nvtx)
            self._nvtx = None
        phase = self.current
        if phase is None or not self._automatic(phase):
            return
        if now > self.since_ns:
            self.recorder.record(phase, "phase", self.since_ns, now,
                                 track=f"host:{threading.current_thread().name}")
        self.since_ns = now


# --------------------------------------------------------------------------- the profiler

class LayerProfiler:
    """Layer-by-layer profile of a training loop in one framework (module docstring).

    model: the framework's model (a torch.nn.Module for "torch", a chainer.Link, a
    keras.Model, a gluon.Block). warmup: steps run first and not counted. layers: which layers
    get ranges: None for every leaf layer with parameters of its own (the default), a list of
    the model's layer names (module paths), or a callable (name, layer) -> bool. name: the
    model's name in the report (default: its class name). batch_size: samples per step
    (default: the first dimension of the output given to mark_output). sync: wait for the
    device at every range boundary (simple, serialising; CPU: no effect). instrument: "hooks",
    "trace" (the framework's own trace, read after each step) or "auto" (the trace in graph
    mode where it times layers, else hooks); cross_check: eager mode, the trace read on the
    same steps as the hooks and compared in the report's "cross_check".
    """

    def __init__(self, model, framework: str = "torch", *, warmup: int = 2,
                 layers: LayerFilter = None, name: Optional[str] = None,
                 batch_size: Optional[int] = None, sync: bool = False, mode: str = "eager",
                 instrument: str = "auto", cross_check: bool = False):
        if mode not in ("eager", "graph"):
            raise ValueError(f"LayerProfiler: mode: expected 'eager' or 'graph', got {mode!r}")
        module = instruments.load(framework, "LayerProfiler")
        subject = module.UserModel(model, layer_filter(layers))
        self._start(subject, module.PhaseEvents, warmup=warmup, sync=sync,
                    description=RunDescription(
                        name or type(model).__name__, batch_size, mode=mode,
                        instrument=instruments.choose(framework, mode, instrument,
                                                      "LayerProfiler"),
                        cross_check=cross_check))

    @classmethod
    def for_subject(cls, subject: Subject, events, *, description: RunDescription,
                    warmup: int = 0, sync: bool = False) -> "LayerProfiler":
        """A profiler over ``subject`` (instrument.base.Subject: a framework's UserModel or
        a seed workload), with ``events`` the PhaseEventSource class reporting its step's
        boundaries (instrument.base.NoPhaseEvents for a step that reports them itself)."""
        prof = cls.__new__(cls)
        prof._start(subject, events, warmup=warmup, sync=sync, description=description)
        return prof

    def _start(self, subject: Subject, events, *, warmup: int, sync: bool,
               description: RunDescription) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"LayerProfiler: warmup: expected an int >= 0, got {warmup!r}")
        batch_size = description.batch_size
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"LayerProfiler: batch_size: expected None or an int >= 1, got "
                             f"{batch_size!r}")
        self.framework = subject.framework
        self.target = subject
        self.description = description
        self.name = description.model
        self.warmup = warmup
        self.batch_size = batch_size
        self.timeline = Timeline()
        self.recorder = Recorder(self.timeline, sync=sync)
        module = instruments.load(self.framework)
        if description.instrument not in INSTRUMENTS:
            raise ValueError(f"LayerProfiler: instrument: expected one of {INSTRUMENTS}, got "
                             f"{description.instrument!r}")
        if description.instrument == "trace":
            trace = instruments.load_trace(self.framework).TraceInstrument
            mode = description.mode
            # A trace that names no layer in this mode may still show the compiled program's
            # fused regions (torch.compile's kernels); one that shows neither is refused.
            if not (trace.layers_in[mode] or trace.regions_in[mode]):
                raise ValueError(f"LayerProfiler: instrument 'trace': {self.framework}'s trace "
                                 f"does not tell layers apart in {mode} mode "
                                 f"(profiler.instrument.{self.framework}_trace says why); "
                                 f"use 'hooks'" + (" or --cross-check to compare the two"
                                                   if mode == "eager" else ""))
            self.instrument = trace(subject, self.recorder, mode=description.mode)
        else:
            self.instrument = module.Instrument(subject, self.recorder)
        # The cross-check: the framework's trace read on the same steps into a timeline of
        # its own, compared with the hooks' layer times in the report.
        self.check = None
        if description.cross_check:
            if description.instrument != "hooks" or description.mode != "eager":
                raise ValueError(f"LayerProfiler: cross_check: compares the hook-based "
                                 f"instrument with the trace on eager steps; got instrument "
                                 f"{description.instrument!r}, mode {description.mode!r}")
            self.check_timeline = Timeline()
            self.check = instruments.load_trace(
                self.framework, "LayerProfiler: cross_check").TraceInstrument(
                subject, Recorder(self.check_timeline), mode="eager")
        self.recorder.device_clock = self.instrument.device_clock()
        self.cursor = _PhaseCursor(self.recorder)
        self.instrument.on_output_grad = self._output_grad
        self.events = events(self.boundary)
        # Distributed data parallel: when the last gradient bucket's all-reduce was launched,
        # every gradient was computed; the rest of the backward call is the wait for it.
        self._last_communication_ns: Optional[int] = None
        watch = getattr(subject, "watch_communication", None)
        self.communication_note = watch(self._communication_launch) if watch else None
        self.mode = description.mode
        # The target's count of compiled graphs (graph mode), read around every step.
        self.compile_count: Optional[Callable[[], Optional[int]]] = None
        self.step_log: List[Dict[str, Any]] = []  # every step: kind, ms, graphs compiled
        self._output_grad_seen = False
        self.steps_done = 0
        self.step_ms: List[float] = []            # measured, instrumented
        self.plain_step_ms: List[float] = []      # measured, uninstrumented
        self.last_step_ms: Optional[float] = None  # the last step run, of any kind
        self.errors: List[str] = []
        self._in_step = False
        self._marked = False
        self._layers_on = self._events_on = False

    # -- the loop's markers ------------------------------------------------------------------
    def step(self, *, instrumented: bool = True):
        """One training step (a context manager). Steps before ``warmup`` are run but not
        counted. ``instrumented=False`` times the step alone (no hooks, ranges or phases):
        the baseline for the instrumentation overhead."""
        return self._step("instrumented" if instrumented else "plain")

    @contextlib.contextmanager
    def _step(self, how: str):
        """A step run ``how``: "instrumented", "plain", "phases" (phase ranges, no layer
        instrument) or "hooks_idle" (the instrument installed, nothing recorded, timed as a
        plain step): the last two for experiments.bench_instruments."""
        if self._in_step:
            raise RuntimeError("LayerProfiler.step: a step is already open; steps do not "
                               "nest (close the outer `with prof.step():` first)")
        if how == "instrumented" and self.mode == "graph" and self.instrument.kind == "hooks":
            how = "phases"        # no layer hook runs inside a compiled graph
        if how == "instrumented" and self.mode == "graph" and \
                self.steps_done - self.warmup < -1:
            # The warm-up steps that compile run untraced (a trace of torch.compile's
            # compilation took 44 s to read); the last warm-up step is traced, warming the
            # tracer up before the measured steps.
            how = "phases"
        self._in_step, self._marked = True, False
        index = self.steps_done - self.warmup          # < 0: warm-up
        measured = index >= 0
        rec = self.recorder
        compiled_before = self.compile_count() if self.compile_count else None
        # Hooks go on and off outside the timed step: a loop that installs them once pays
        # that once, not per step.
        if how in ("plain", "hooks_idle"):
            self._hooks(layers=how == "hooks_idle", events=False)
            rec.enabled = False
            began = time.perf_counter_ns()
            try:
                yield self
                self.target.synchronize()
            finally:
                self._in_step = False
            self.steps_done += 1
            self.last_step_ms = (time.perf_counter_ns() - began) / 1e6
            if measured and how == "plain":
                self.plain_step_ms.append(self.last_step_ms)
            self._log(how if measured else "warmup", compiled_before)
            return
        self._hooks(layers=how == "instrumented", events=True)
        began = time.perf_counter_ns()
        rec.enabled = True
        step = len(self.step_ms) if measured else -1
        rec.start_step(step)
        token = rec.begin("step", "step")
        self.cursor.start("other" if self.description.one_call else "forward")
        failed = True
        try:
            yield self
            failed = False
        finally:
            self._in_step = False
            self.target.synchronize()
            self.cursor.stop()
            rec.end(token)
            ended = rec.now_ns()
            rec.finish_step()
            self.steps_done += 1
            self.last_step_ms = (time.perf_counter_ns() - began) / 1e6
            # A trace is read after the step's time was taken: its cost is not the step's.
            self._collect(step, (token.start_ns, ended), layers=how == "instrumented")
        if measured:
            self.step_ms.append(self.last_step_ms)
        self._log("instrumented" if measured else "warmup", compiled_before)
        if not failed and not self._marked and self.mode == "eager":
            raise RuntimeError(f"LayerProfiler.step: step {self.steps_done - 1} ended without "
                               f"mark_output(...): the loss phases start where the model's "
                               f"output is marked; wrap it: out = prof.mark_output(model(x))")

    @contextlib.contextmanager
    def phase(self, name: str):
        """Marks a phase by hand (e.g. ``with prof.phase("data"): ...``): one of the report's
        phases, or "data" for data_wait. Once a phase is marked by hand, the events no longer
        open it automatically."""
        phase = PHASE_ALIASES.get(name, name)
        if phase not in MARKABLE_PHASES:
            raise ValueError(f"LayerProfiler.phase: name: expected one of "
                             f"{list(MARKABLE_PHASES) + list(PHASE_ALIASES)}, got {name!r}")
        if not self._in_step:
            raise RuntimeError(f"LayerProfiler.phase: phase {name!r} outside a step; open "
                               f"`with prof.step():` first")
        self.cursor.manual.add(phase)
        self.cursor.pause()
        try:
            with self.recorder.range(phase, "phase"):
                yield
                if self.instrument.phase_sync:
                    self.target.synchronize()
        finally:
            self.cursor.resume()

    def mark_output(self, output):
        """The model's output: forward ends here, and its gradient, when backward reaches it,
        ends the loss backward. Returns ``output`` (or the framework's identity of it)."""
        if not self._in_step:
            raise RuntimeError("LayerProfiler.mark_output: called outside a step; open "
                               "`with prof.step():` first")
        if self.batch_size is None:
            self.batch_size = self.target.batch_size_of(output)
        self._marked = True
        if not self.recorder.enabled:
            return output
        if self.instrument.phase_sync:
            self.target.synchronize()
        self.cursor.boundary("mark_output")
        return self.instrument.mark_output(output)

    def boundary(self, event: str) -> None:
        """A phase boundary of the step, as the framework's PhaseEvents report them: one of
        "backward_start", "backward_end", "optimizer_start", "optimizer_end". For a loop whose
        framework calls the PhaseEvents cannot see (a seed workload's step reports its own).
        Outside an instrumented step it does nothing."""
        if event not in BOUNDARIES:
            raise ValueError(f"LayerProfiler.boundary: event: expected one of "
                             f"{list(BOUNDARIES)}, got {event!r}")
        if not self._in_step or not self.recorder.enabled:
            return
        if event == "backward_end":
            self.instrument.finish_backward()
            if self._last_communication_ns is not None:
                self.cursor.boundary("communication_wait", self._last_communication_ns)
                self._last_communication_ns = None
        if self.instrument.phase_sync:
            self.target.synchronize()
        self.cursor.boundary(event)

    # -- measurements --------------------------------------------------------------------------
    def restart(self) -> Timeline:
        """Starts a new measurement: a fresh timeline and no measured step (the next step is
        measured step 0); the hooks stay. Returns the new timeline."""
        self.timeline = self.recorder.timeline = Timeline()
        if self.check is not None:
            self.check_timeline = self.check.recorder.timeline = Timeline()
        self.step_ms, self.plain_step_ms = [], []
        self.step_log = [e for e in self.step_log if e["kind"] == "warmup"]
        self.steps_done = max(self.steps_done, self.warmup)
        return self.timeline

    def report(self) -> Report:
        """The report of the measured steps so far (profiler.report's schema, checked; a
        check that fails is an error in the report, which keeps what was measured)."""
        if not self.step_ms:
            raise RuntimeError(f"LayerProfiler.report: no measured step yet ({self.steps_done} "
                               f"step(s) run, the first {self.warmup} are warm-up)")
        d = self.description
        # A seed workload's notes say what its phases are; a user's model gets this sentence.
        whose = "Phases" if d.notes else f"User model {d.model}: phases"
        # The layer instrument's notes say what its ranges mean; in graph mode hooks never ran.
        ran = self.mode == "eager" or self.instrument.kind == "trace"
        instrument_notes = list(self.instrument.notes) if ran else []
        notes = instrument_notes + list(d.notes) + [
            f"{whose} from the step's boundaries (mark_output, the backward call, the "
            f"output's gradient, the optimizer step) and phases marked by hand "
            f"({', '.join(sorted(self.cursor.manual)) or 'none'}); 'other' is the rest."]
        notes += self.events.notes
        if self.communication_note:
            notes.append(self.communication_note)
        if self.recorder.sync:
            notes.append("sync: the device was synchronised at every range boundary; ranges "
                         "are complete but the GPU could not run ahead of the host.")
        errors = list(self.errors)
        breakdown = phase_breakdown(self.timeline)
        errors += [f"phase accounting: {w}" for w in breakdown["warnings"]]
        sections = from_phase_breakdown(breakdown)
        sections["layers"] = from_layer_breakdown(layer_breakdown(self.timeline))
        if self.instrument.kind == "trace":
            # A trace has no calls; a layer's ranges are pieces of its ops' time: count ops.
            ops = self.instrument.op_counts()
            for row in sections["layers"]:
                row["calls"] = ops.get((row["name"], "forward"), 0.0)
            # In the model's order: a graph may read a late layer's weights first.
            order = {name: i for i, (name, _) in enumerate(self.target.named_layers())}
            sections["layers"].sort(key=lambda row: order.get(row["name"], len(order)))
            accounting = self.instrument.accounting()
            if accounting is not None:
                sections["trace"] = accounting
                regions = region_breakdown(self.timeline)
                if regions:
                    accounting["regions_ms"] = regions
        if self.mode == "graph" and self.instrument.kind == "hooks":
            notes.append("Graph mode: the framework's compiled step, as its users train. No "
                         "layer hook runs inside a compiled graph, so this report has no "
                         "per-layer times (the trace-based instrument has them: --instrument "
                         "trace); the phases are the step's calls that remain.")
        elif self.mode == "graph":
            notes.append("Graph mode: the framework's compiled step, as its users train; the "
                         "layer times come from the framework's own trace of it.")
        if self.mode == "graph":
            absent = self._absent_phases()
            sections["phases_absent"] = absent
            for phase in absent:
                del sections["phases_ms"][phase]
        if self.check is not None:
            sections["cross_check"] = cross_check(
                self.timeline, self.check_timeline, op_counts=self.check.op_counts())
        compilation = self._compilation(notes)
        if compilation is not None:
            sections["compilation"] = compilation
        inst, plain = self.step_ms, self.plain_step_ms
        sections["instrumentation"] = {
            "instrumented_step_ms_median": median(inst),
            "uninstrumented_step_ms_median": median(plain) if plain else None,
            **overhead_summary(inst, plain,
                               goal_pct=OVERHEAD_GOAL_PCT[self.target.device_kind()]),
            "instrumented_step_ms": inst, "uninstrumented_step_ms": plain}
        doc = build_report(
            framework=self.framework, framework_version=self.target.version(),
            device={"name": self.target.device_name(), "kind": self.target.device_kind()},
            model=d.model, mode=self.mode, batch_size=self.batch_size or 1, impls=dict(d.impls),
            workers=d.workers, seed=d.seed, sync=self.recorder.sync, iters=len(inst),
            warmup=self.warmup, notes=notes, errors=errors,
            instrument_kind=self.instrument.kind, **_model_facts(self.target, notes),
            **sections)
        try:
            validate_report(doc)
        except ValueError as e:
            doc["errors"].append(f"report check: {e}")
        return Report(doc, self.timeline)

    def close(self) -> None:
        """Removes every hook; the profiler records nothing more."""
        self._hooks(layers=False, events=False)

    def _absent_phases(self) -> Dict[str, str]:
        """Graph mode: the phases no boundary of this mode marked in any measured step, each
        with why and where its time is (nothing opened them: they hold no time)."""
        seen = {r.name for r in self.timeline.ranges if r.kind == "phase" and r.step >= 0}
        one_call = "compiled_step" in seen
        absent = {}
        for phase in PHASES[:-1]:
            if phase in seen:
                continue
            if one_call and phase not in ("data_wait", "h2d"):
                absent[phase] = ("inside the compiled step: in graph mode the step is one "
                                 "call, timed as compiled_step")
            elif phase == "loss_backward":
                absent[phase] = ("not separated from backward in graph mode (no hook reaches "
                                 "the model output's gradient without the layer instrument); "
                                 "its time is in backward")
            else:
                absent[phase] = "no boundary marks it in this step; its time is in 'other'"
        return absent

    def _compilation(self, notes: List[str]) -> Optional[Dict[str, Any]]:
        """Graphs compiled in the warm-up and in the measured steps (a retrace), from the
        target's compile count; None where the target counts none (eager, or unknown)."""
        logged = [e for e in self.step_log if e["compiled"] is not None]
        if not logged or (self.mode == "eager" and not any(e["compiled"] for e in logged)):
            return None
        warmup = [e for e in logged if e["kind"] == "warmup"]
        measured = [e for e in logged if e["kind"] != "warmup"]
        steady = median(self.step_ms)
        compiling = [e for e in logged if e["compiled"]]
        doc = {"compiles_in_warmup": sum(e["compiled"] for e in warmup),
               "compiles_measured": sum(e["compiled"] for e in measured),
               "first_step_ms": logged[0]["ms"], "steady_step_ms_median": steady,
               # A compiling step's time beyond a steady step's: the compilation's cost.
               "compile_ms_estimate": sum(max(0.0, e["ms"] - steady) for e in compiling),
               "warmup_step_ms": [e["ms"] for e in warmup]}
        if doc["compiles_measured"]:
            notes.append(f"Warning: the framework compiled {doc['compiles_measured']} graph(s) "
                         f"during the measured steps (a retrace): those steps include "
                         f"compilation; raise --warmup, or keep the shapes and Python values "
                         f"the step depends on fixed.")
        elif warmup and not doc["compiles_in_warmup"] and self.mode == "graph":
            notes.append("Warning: no graph was compiled in the warm-up steps; the first "
                         "compilation may have happened before this run.")
        return doc

    # -- internals ---------------------------------------------------------------------------
    def _hooks(self, *, layers: bool, events: bool) -> None:
        if layers != self._layers_on:
            (self.instrument.install if layers else self.instrument.remove)()
            if self.check is not None:
                (self.check.install if layers else self.check.remove)()
            self._layers_on = layers
        if events != self._events_on:
            (self.events.install if events else self.events.remove)()
            self._events_on = events

    def _collect(self, step: int, window, *, layers: bool) -> None:
        """The trace instruments' ranges of the step just ended; a failure is an error in the
        report (the step's time and phases stand)."""
        if not layers:
            return
        for instrument in filter(None, [self.instrument, self.check]):
            try:
                instrument.collect_step(step, window)
            except Exception as e:
                self.errors.append(f"step {step}: the {instrument.kind} instrument could not "
                                   f"read the step: {type(e).__name__}: {e}")

    def _output_grad(self) -> None:
        if self._in_step:
            self._output_grad_seen = True
            self.cursor.boundary("output_grad")

    def _log(self, kind: str, compiled_before: Optional[int]) -> None:
        after = self.compile_count() if self.compile_count else None
        compiled = after - compiled_before if None not in (after, compiled_before) else None
        self.step_log.append({"kind": kind, "ms": self.last_step_ms, "compiled": compiled})

    def _communication_launch(self) -> None:
        if self._in_step and self.recorder.enabled:
            self._last_communication_ns = self.recorder.now_ns()


def _model_facts(subject: Subject, notes: List[str]) -> Dict[str, Any]:
    """The report's parameters and dtype, where the subject can tell: a seed workload counts
    its parameters (``parameter_count``) and exports its weights (``export_weights``); a
    user's model does neither, and the report then has no such key (a diff compares its
    layers' names instead)."""
    facts: Dict[str, Any] = {}
    count = getattr(subject, "parameter_count", None)
    export = getattr(subject, "export_weights", None)
    try:
        if callable(count):
            facts["parameters"] = int(count())
        if callable(export):
            dtypes = sorted({str(w.dtype) for w in export().values() if hasattr(w, "dtype")})
            if dtypes:
                facts["dtype"] = ",".join(dtypes)
    except Exception as e:   # facts about the model, not measurements: keep the report
        notes.append(f"parameter count / dtype not recorded: {type(e).__name__}: {e}")
    return facts


def layer_filter(layers: LayerFilter) -> Callable[[str, Any], bool]:
    """``layers`` (None, a list of layer names or a callable) as a callable (name, layer) ->
    bool; a list's names are kept in ``.names`` for the UserModel to check that each exists."""
    if layers is None:
        return lambda name, layer: True
    if callable(layers):
        return layers
    if isinstance(layers, (str, bytes)) or not all(isinstance(n, str) for n in layers):
        raise ValueError(f"LayerProfiler: layers: expected None, a list of layer names or a "
                         f"callable (name, layer) -> bool, got {layers!r}")
    wanted = set(layers)

    def keep(name, layer):
        return name in wanted
    keep.names = sorted(wanted)
    return keep


# --------------------------------------------------------------------------- targets, sessions

class Target(Protocol):
    """What the engine profiles (profiler.targets: a user's model and loop, a seed workload).

    framework: its framework's name. ``profiler(warmup=, sync=)``: a LayerProfiler over it.
    ``batches(steps_needed)``: an endless iterator of its batches (``steps_needed``: how many
    the run will take, None if unknown). ``activate()``: makes it the one that runs next (a
    comparison's variants may share one model). ``step(prof, batch)``: one training step,
    profiled by ``prof`` or, with None, not at all."""

    framework: str

    def profiler(self, *, warmup: int, sync: bool) -> LayerProfiler:
        ...

    def batches(self, steps_needed: Optional[int]) -> Iterator:
        ...

    def activate(self) -> None:
        ...

    def step(self, prof: Optional[LayerProfiler], batch) -> Any:
        ...

    def compile_count(self) -> Optional[int]:
        """Graphs compiled for it so far (graph mode), None where unknown."""
        ...


class Session:
    """One target stepping under its profiler, one step at a time: what :func:`profile`,
    :func:`compare`, the experiments' workers and the benchmarks are built from. Each step
    method returns the step's milliseconds (host wall clock, the device waited for)."""

    def __init__(self, target: Target, *, warmup: int = 0, sync: bool = False,
                 steps_needed: Optional[int] = None):
        self.target = target
        self.profiler = target.profiler(warmup=warmup, sync=sync)
        self.profiler.compile_count = target.compile_count
        self._batches = target.batches(steps_needed)

    def next_batch(self):
        """The target's next batch (as its loader gives it)."""
        return next(self._batches)

    def step(self) -> float:
        """An instrumented step (counted once the warm-up steps are done); its time includes
        the data wait, as its data_wait phase says."""
        return self._run("instrumented")

    def plain_step(self) -> float:
        """An uninstrumented step: no hooks, ranges or phases (the overhead's baseline)."""
        self.target.activate()
        with self.profiler._step("plain"):
            self.target.step(None, self.next_batch())
        return self.profiler.last_step_ms

    def phases_step(self) -> float:
        """A step with its phase ranges and no layer instrument (what the phases cost)."""
        return self._run("phases")

    def idle_hooks_step(self) -> float:
        """A plain step with the layer instrument installed and recording nothing (what its
        hooks cost idle)."""
        self.target.activate()
        with self.profiler._step("hooks_idle"):
            self.target.step(None, self.next_batch())
        return self.profiler.last_step_ms

    def hooks_off(self) -> None:
        """Removes the hooks until the next instrumented step (for work timed outside the
        profiler)."""
        self.profiler.close()

    def restart(self) -> Timeline:
        """A fresh measurement (LayerProfiler.restart)."""
        return self.profiler.restart()

    def report(self) -> Report:
        return self.profiler.report()

    def close(self) -> None:
        self.profiler.close()

    def _run(self, how: str) -> float:
        self.target.activate()
        prof = self.profiler
        with prof._step(how):
            with prof.phase("data_wait"):     # the loader's time is the step's data wait
                batch = self.next_batch()
            self.target.step(prof, batch)
        return prof.last_step_ms


def _check_count(function: str, arg: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{function}: {arg}: expected an int >= {least}, got {value!r}")


def profile(target: Target, *, steps: int = 8, warmup: int = 2,
            overhead_steps: Optional[int] = None, sync: bool = False,
            progress: Optional[Callable[[int, int], None]] = None,
            function: str = "profile") -> Report:
    """Runs ``warmup + steps`` profiled training steps of ``target`` and ``overhead_steps``
    (default ``steps``) uninstrumented ones, alternating step by step
    (stats.overhead_schedule: load and drift hit both alike); returns the report. A run that
    fails half-way returns the report of the steps measured so far, its error in ``errors``;
    one that measured nothing raises."""
    _check_count(function, "steps", steps, 1)
    _check_count(function, "warmup", warmup, 0)
    overhead_steps = steps if overhead_steps is None else overhead_steps
    _check_count(function, "overhead_steps", overhead_steps, 0)
    total, done = warmup + steps + overhead_steps, 0
    session = Session(target, warmup=warmup, sync=sync, steps_needed=total)
    prof = session.profiler
    try:
        for _ in range(warmup):
            session.step()
            done += 1
            if progress:
                progress(done, total)
        for instrumented in overhead_schedule(steps, overhead_steps):
            session.step() if instrumented else session.plain_step()
            done += 1
            if progress:
                progress(done, total)
    except Exception as e:           # keep what was measured
        if not prof.step_ms:
            session.close()
            raise
        prof.errors.append(f"{type(e).__name__}: {e}")
    finally:
        session.close()
    return session.report()


@dataclass
class Comparison:
    """What :func:`compare` measured. reports: each variant's report (a variant with no
    measured step has none); step_round: {variant: {measured step: its round}}; errors: what
    stopped the run early, naming the variant; notes: how the variants were run."""
    reports: Dict[str, Report]
    step_round: Dict[str, Dict[int, int]]
    variants: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def differences(self) -> Dict[str, object]:
        """Per phase, each variant's median and spread over rounds and its difference to the
        first with a paired bootstrap interval (analysis.variants.compare_variants)."""
        return compare_variants({v: r.timeline for v, r in self.reports.items()},
                                self.step_round, self.variants)

    def document(self, notes: Sequence[str] = (), **about: Any) -> Dict[str, Any]:
        """comparison.json's content: ``about`` (what the caller says of the run: framework,
        model, kind, rounds, ...), the device, the variants, the differences, the errors, and
        ``notes`` before the comparison's own."""
        first = next(iter(self.reports.values()), None)
        return {**about, "device": first.doc["device"]["kind"] if first else None,
                "variants": self.variants, **self.differences(), "errors": self.errors,
                "notes": list(notes) + self.notes}

    def save(self, out: Union[str, Path], doc: Dict[str, Any]) -> Dict[str, Path]:
        """Writes ``doc`` (the comparison: what differences() gives, and what the caller says
        of the run) as comparison.json into ``out``, and each variant's report and views into
        ``out/<variant>/``."""
        out = Path(out)
        written = {}
        for variant, report in self.reports.items():
            written[variant] = report.save(out / variant)["report"]
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "comparison.json", doc)
        written["comparison"] = out / "comparison.json"
        return written


def compare(targets: Dict[str, Target], *, rounds: int = 5, steps_per_round: int = 2,
            warmup: int = 2, sync: bool = False,
            progress: Optional[Callable[[int, int], None]] = None,
            function: str = "compare") -> Comparison:
    """Variants of one training setup (``targets``: {variant: Target}, the first the
    baseline), profiled in interleaved rounds.

    Each variant runs ``warmup`` steps first; then each of ``rounds`` rounds runs
    ``steps_per_round`` measured steps of every variant, the order rotating from round to round
    (stats.interleaved_order), so drift and the cost of going first hit every variant alike.
    Every step is instrumented (the variants carry the same instruments, so no uninstrumented
    steps are timed). A run that fails half-way keeps what was measured (its error in
    ``errors`` and in that variant's report); one that measured nothing raises."""
    if not isinstance(targets, dict) or len(targets) < 2:
        got = (f"{len(targets)} variant(s)" if isinstance(targets, dict)
               else type(targets).__name__)
        raise ValueError(f"{function}: expected at least two variants, got {got}")
    _check_count(function, "rounds", rounds, 1)
    _check_count(function, "steps_per_round", steps_per_round, 1)
    _check_count(function, "warmup", warmup, 0)
    variants = list(targets)
    steps_needed = warmup + rounds * steps_per_round
    sessions: Dict[str, Session] = {}
    try:
        for variant, target in targets.items():
            sessions[variant] = Session(target, warmup=warmup, sync=sync,
                                        steps_needed=steps_needed)
    except Exception:
        for session in sessions.values():
            session.close()
        raise
    step_round: Dict[str, Dict[int, int]] = {v: {} for v in variants}
    errors: List[str] = []
    total, done = steps_needed * len(variants), 0
    # (variant, steps, round): each variant's warm-up (no round), then the rounds.
    plan = [(v, warmup, None) for v in variants] + [
        (v, steps_per_round, r) for r, order in enumerate(interleaved_order(variants, rounds))
        for v in order]
    for variant, count, round_index in plan:
        session = sessions[variant]
        try:
            for _ in range(count):
                session.step()
                if round_index is not None:
                    step_round[variant][len(session.profiler.step_ms) - 1] = round_index
                done += 1
                if progress:
                    progress(done, total)
        except Exception as e:           # keep what was measured
            if not any(s.profiler.step_ms for s in sessions.values()):
                raise
            errors.append(f"{variant}: {type(e).__name__}: {e}")
            session.profiler.errors.append(f"{type(e).__name__}: {e}")
            break
        finally:
            # One variant's hooks at a time: a framework's events (e.g. the wrapped
            # torch.autograd.backward) are global, and two profilers' wrappers would stack.
            session.close()
    how = (f"Compared in interleaved rounds: variants {variants} (the first the baseline), "
           f"{warmup} warm-up step(s) each, then {rounds} round(s) of {steps_per_round} "
           f"step(s) per variant, the order rotating each round.")
    reports = {}
    # One id for the run: a diff pairs two reports by round only when they share it.
    run_id = uuid.uuid4().hex
    for variant, session in sessions.items():
        if not session.profiler.step_ms:
            errors.append(f"{variant}: no measured step")
            continue
        report = reports[variant] = session.report()
        report.doc["notes"].append(f"Variant {variant!r}. {how}")
        report.doc["interleaved"] = {
            "run_id": run_id, "variant": variant, "variants": variants, "rounds": rounds,
            "steps_per_round": steps_per_round,
            "step_rounds": [step_round[variant].get(i)
                            for i in range(len(session.profiler.step_ms))]}
    # What the instruments measure is the same for every variant: the first one's notes.
    first = sessions[variants[0]].profiler
    notes = list(first.instrument.notes) + list(first.events.notes) + [how]
    return Comparison(reports, step_round, variants, errors, notes)
