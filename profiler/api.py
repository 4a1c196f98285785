"""Profile a user's own model and training loop: ``LayerProfiler`` around the loop the user
already has, ``profile_training`` for the common loop run for them, ``compare_training`` for
variants of it (e.g. two conv implementations) in interleaved rounds.

    prof = LayerProfiler(model, framework="torch", warmup=2)
    for x, t in loader:
        with prof.step():
            with prof.phase("h2d"):
                x, t = x.to(dev), t.to(dev)
            out = prof.mark_output(model(x))       # the loss phases start here
            loss = loss_fn(out, t)
            loss.backward()
            opt.step(); opt.zero_grad()
    prof.report().save("runs/mine")

Layer ranges come from the framework's instrument (profiler.instrument.<framework>), the same
hooks the seed workloads are profiled with. The step's phases come from boundaries, in order:
the step's start, ``mark_output`` (forward ends), the backward call's start (loss_forward
ends), the model output's gradient (loss_backward ends), the backward call's end (backward
ends), the optimizer step's start and end; the framework's own events supply the boundaries
where it has them (profiler.instrument.<framework>.PhaseEvents), and ``phase(name)`` marks
any phase by hand (a hand-marked phase wins over the events for that phase). What no
boundary covers is "other". The report has the CLI's schema (profiler.report), checked the
same way (its phases add up to the step).

This module is framework-free: everything a framework knows lives in its instrument module.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from profiler.analysis.flamegraph import folded_stacks, to_speedscope
from profiler.analysis.nesting import check_nesting
from profiler.analysis.phases import layer_breakdown, phase_breakdown
from profiler.analysis.stats import (OVERHEAD_GOAL_PCT, interleaved_order, median,
                                     overhead_schedule, overhead_summary)
from profiler.analysis.trace_events import to_chrome_trace
from profiler.recorder import NVTX, PHASE_COLOURS, Recorder
from profiler.report import (build_report, from_layer_breakdown, from_phase_breakdown,
                             render_table, validate_report, write_json_atomic)
from profiler.timeline import PHASES, Timeline

FRAMEWORKS = ("torch", "chainer", "tensorflow", "mxnet")
# phase(name) takes a phase of the report, or "data" for "data_wait".
PHASE_ALIASES = {"data": "data_wait"}
MARKABLE_PHASES = tuple(p for p in PHASES if p != "other")

# The automatic phase that follows each boundary.
_AFTER = {"step_start": "forward", "mark_output": "loss_forward",
          "backward_start": "loss_backward", "output_grad": "backward",
          "communication_wait": "communication",
          "backward_end": "other", "optimizer_start": "optimizer", "optimizer_end": "other"}

LayerFilter = Union[None, Callable[[str, Any], bool], Sequence[str]]


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

    def start(self) -> None:
        self.boundaries = []
        self._open("forward", self.recorder.now_ns())

    def boundary(self, event: str, at_ns: Optional[int] = None) -> None:
        """An event of the step (a key of _AFTER): closes the open automatic phase and opens
        the next one, unless the user marks that phase by hand. ``at_ns``: when it happened,
        if earlier than now (never before the open phase began)."""
        now = self.recorder.now_ns() if at_ns is None else max(at_ns, self.since_ns)
        self.boundaries.append(event)
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

    def _open(self, phase: str, now: int) -> None:
        self.current, self.since_ns = phase, now
        if self.recorder.enabled and phase != "other" and phase not in self.manual:
            self._nvtx = NVTX.start(phase, PHASE_COLOURS.get(phase, "blue"))

    def _close(self, now: int) -> None:
        if self._nvtx is not None:
            NVTX.end(self._nvtx)
            self._nvtx = None
        phase = self.current
        if phase is None or phase == "other" or phase in self.manual:
            return
        if now > self.since_ns:
            self.recorder.record(phase, "phase", self.since_ns, now,
                                 track=f"host:{threading.current_thread().name}")
        self.since_ns = now


class LayerProfiler:
    """Layer-by-layer profile of a user's training loop in one framework (module docstring).

    model: a torch.nn.Module (framework "torch"). warmup: steps run first and not counted.
    layers: which layers get ranges: None for every leaf layer with parameters of its own (the
    default), a list of the model's layer names (module paths), or a callable (name, layer) ->
    bool. name: the model's name in the report (default: its class name). batch_size: samples
    per step (default: the first dimension of the output given to mark_output). sync: wait for
    the device at every range boundary (simple, serialising; CPU: no effect).
    """

    def __init__(self, model, framework: str = "torch", *, warmup: int = 2,
                 layers: LayerFilter = None, name: Optional[str] = None,
                 batch_size: Optional[int] = None, sync: bool = False):
        if framework not in FRAMEWORKS:
            raise ValueError(f"LayerProfiler: framework: expected one of {list(FRAMEWORKS)}, "
                             f"got {framework!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"LayerProfiler: warmup: expected an int >= 0, got {warmup!r}")
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"LayerProfiler: batch_size: expected None or an int >= 1, got "
                             f"{batch_size!r}")
        self.framework = framework
        # The framework's half of a user model: UserModel (what its Instrument needs of a
        # workload), PhaseEvents (its own events at phase boundaries), training_step.
        self._fw = importlib.import_module(f"profiler.instrument.{framework}")
        if not hasattr(self._fw, "UserModel"):
            raise ValueError(f"LayerProfiler: framework: profiling a user's own model is not "
                             f"available for {framework} yet; it profiles the seed workloads "
                             f"(python -m profiler.layerwise --framework {framework})")
        self.target = self._fw.UserModel(model, _layer_filter(layers))
        self.name = name or type(model).__name__
        self.warmup = warmup
        self.batch_size = batch_size
        self.timeline = Timeline()
        self.recorder = Recorder(self.timeline, sync=sync)
        self.instrument = self._fw.Instrument(self.target, self.recorder)
        self.recorder.device_clock = self.instrument.device_clock()
        self.cursor = _PhaseCursor(self.recorder)
        self.instrument.on_output_grad = self._output_grad
        self.events = self._fw.PhaseEvents(self._event)
        # Distributed data parallel: when the last gradient bucket's all-reduce was launched,
        # every gradient was computed; the rest of the backward call is the wait for it.
        self._last_communication_ns: Optional[int] = None
        watch = getattr(self.target, "watch_communication", None)
        self.communication_note = watch(self._communication_launch) if watch else None
        self.steps_done = 0
        self.step_ms: List[float] = []            # measured, instrumented
        self.plain_step_ms: List[float] = []      # measured, uninstrumented
        self.errors: List[str] = []
        self._in_step = False
        self._marked = False
        self._installed = False

    # -- the loop's markers ------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, *, instrumented: bool = True):
        """One training step. Steps before ``warmup`` are run but not counted.
        ``instrumented=False`` times the step alone (no hooks, ranges or phases): the
        baseline for the instrumentation overhead."""
        if self._in_step:
            raise RuntimeError("LayerProfiler.step: a step is already open; steps do not "
                               "nest (close the outer `with prof.step():` first)")
        self._in_step, self._marked = True, False
        index = self.steps_done - self.warmup          # < 0: warm-up
        measured = index >= 0
        rec = self.recorder
        # Hooks go on and off outside the timed step: a loop that installs them once pays
        # that once, not per step.
        if not instrumented:
            self._uninstall()
            began = time.perf_counter_ns()
            try:
                yield self
                self.target.synchronize()
            finally:
                self._in_step = False
            self.steps_done += 1
            if measured:
                self.plain_step_ms.append((time.perf_counter_ns() - began) / 1e6)
            return
        self._install()
        began = time.perf_counter_ns()
        rec.enabled = True
        rec.start_step(len(self.step_ms) if measured else -1)
        token = rec.begin("step", "step")
        self.cursor.start()
        failed = True
        try:
            yield self
            failed = False
        finally:
            self._in_step = False
            self.target.synchronize()
            self.cursor.stop()
            rec.end(token)
            rec.finish_step()
            self.steps_done += 1
        if measured:
            self.step_ms.append((time.perf_counter_ns() - began) / 1e6)
        if not failed and not self._marked:
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

    # -- report ------------------------------------------------------------------------------
    def report(self) -> Report:
        """The report of the measured steps so far (profiler.report's schema, checked)."""
        if not self.step_ms:
            raise RuntimeError(f"LayerProfiler.report: no measured step yet ({self.steps_done} "
                               f"step(s) run, the first {self.warmup} are warm-up)")
        notes = list(self.instrument.notes) + [
            f"User model {self.name}: phases from the step's boundaries (mark_output, the "
            f"backward call, the output's gradient, the optimizer step) and phases marked by "
            f"hand ({', '.join(sorted(self.cursor.manual)) or 'none'}); 'other' is the rest."]
        notes += self.events.notes
        if self.communication_note:
            notes.append(self.communication_note)
        errors = list(self.errors)
        breakdown = phase_breakdown(self.timeline)
        errors += [f"phase accounting: {w}" for w in breakdown["warnings"]]
        sections = from_phase_breakdown(breakdown)
        sections["layers"] = from_layer_breakdown(layer_breakdown(self.timeline))
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
            model=self.name, batch_size=self.batch_size or 1,
            impls={"conv": "the model's own", "loss": "the caller's"}, workers=0, seed=0,
            sync=self.recorder.sync, iters=len(inst), warmup=self.warmup, notes=notes,
            errors=errors, **sections)
        validate_report(doc)
        return Report(doc, self.timeline)

    def close(self) -> None:
        """Removes every hook; the profiler records nothing more."""
        self._uninstall()

    # -- internals ---------------------------------------------------------------------------
    def _install(self) -> None:
        if not self._installed:
            self.instrument.install()
            self.events.install()
            self._installed = True

    def _uninstall(self) -> None:
        if self._installed:
            self.instrument.remove()
            self.events.remove()
            self._installed = False

    def _event(self, event: str) -> None:
        """A framework event (PhaseEvents): a phase boundary, inside an instrumented step."""
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

    def _communication_launch(self) -> None:
        if self._in_step and self.recorder.enabled:
            self._last_communication_ns = self.recorder.now_ns()

    def _output_grad(self) -> None:
        if self._in_step:
            self.cursor.boundary("output_grad")


def _layer_filter(layers: LayerFilter) -> Callable[[str, Any], bool]:
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
    keep.names = sorted(wanted)    # the framework's UserModel checks that each exists
    return keep


def profile_training(model, loader: Iterable, loss_fn: Callable, optimizer, *,
                     framework: str = "torch", steps: int = 8, warmup: int = 2,
                     overhead_steps: Optional[int] = None, device: Optional[str] = None,
                     layers: LayerFilter = None, name: Optional[str] = None,
                     sync: bool = False,
                     progress: Optional[Callable[[int, int], None]] = None) -> Report:
    """Runs ``warmup + steps`` training steps of ``model`` on batches ``(inputs, targets)``
    from ``loader`` (cycled if it runs out), profiled, and ``overhead_steps`` (default
    ``steps``) uninstrumented steps for the overhead, alternating step by step
    (stats.overhead_schedule); returns the report. A run that fails half-way returns the
    report of the steps measured so far, its error in ``errors``; one that measured nothing
    raises."""
    for arg, value, least in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"profile_training: {arg}: expected an int >= {least}, got "
                             f"{value!r}")
    overhead_steps = steps if overhead_steps is None else overhead_steps
    prof = LayerProfiler(model, framework, warmup=warmup, layers=layers, name=name, sync=sync)
    step_fn = prof._fw.training_step(model, loss_fn, optimizer, device)
    batches = _cycle(loader)
    total, done = warmup + steps + overhead_steps, 0
    try:
        for _ in range(warmup):
            _profiled_step(prof, step_fn, batches)
            done += 1
            if progress:
                progress(done, total)
        for instrumented in overhead_schedule(steps, overhead_steps):
            if instrumented:
                _profiled_step(prof, step_fn, batches)
            else:
                with prof.step(instrumented=False):
                    step_fn(None, next(batches))
            done += 1
            if progress:
                progress(done, total)
    except Exception as e:           # keep what was measured
        if not prof.step_ms:
            prof.close()
            raise
        prof.errors.append(f"{type(e).__name__}: {e}")
    finally:
        prof.close()
    return prof.report()


@dataclass
class Comparison:
    """What compare_training measured. reports: each variant's report (a variant with no
    measured step has none); step_round: {variant: {measured step: its round}}; errors: what
    stopped the run early, naming the variant; notes: how the variants were run."""
    reports: Dict[str, Report]
    step_round: Dict[str, Dict[int, int]]
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def compare_training(builds: Dict[str, Dict[str, Any]], *, framework: str = "torch",
                     rounds: int = 5, steps_per_round: int = 2, warmup: int = 2,
                     device: Optional[str] = None, layers: LayerFilter = None,
                     sync: bool = False,
                     progress: Optional[Callable[[int, int], None]] = None) -> Comparison:
    """Variants of one training setup, profiled in interleaved rounds. ``builds`` maps each
    variant's name to what profile_training takes for it: dict(model=, loader=, loss_fn=,
    optimizer=[, name=]); the first variant is the baseline.

    Each variant gets its own LayerProfiler and runs ``warmup`` steps first; then each of
    ``rounds`` rounds runs ``steps_per_round`` measured steps of every variant, the order
    rotating from round to round (profiler.analysis.stats.interleaved_order), so drift and the
    cost of going first hit every variant alike. Every step is instrumented (the variants
    carry the same instruments, so no uninstrumented steps are timed). Returns a Comparison;
    profiler.analysis.variants.compare_variants turns its timelines and rounds into the
    per-phase differences. A run that fails half-way keeps what was measured (its error in
    ``errors`` and in that variant's report); one that measured nothing raises.
    """
    if not isinstance(builds, dict) or len(builds) < 2:
        got = f"{len(builds)} variant(s)" if isinstance(builds, dict) else type(builds).__name__
        raise ValueError(f"compare_training: builds: expected a dict of at least two "
                         f"variants (name -> dict(model=, loader=, loss_fn=, optimizer=)), "
                         f"got {got}")
    for arg, value, least in (("rounds", rounds, 1), ("steps_per_round", steps_per_round, 1),
                              ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"compare_training: {arg}: expected an int >= {least}, got "
                             f"{value!r}")
    variants = list(builds)
    for variant, build in builds.items():
        _check_build(f"compare_training: builds[{variant!r}]", build)
    profs: Dict[str, LayerProfiler] = {}
    steps, batches = {}, {}
    try:
        for variant, build in builds.items():
            prof = profs[variant] = LayerProfiler(build["model"], framework, warmup=warmup,
                                                  layers=layers, name=build.get("name"),
                                                  sync=sync)
            steps[variant] = prof._fw.training_step(build["model"], build["loss_fn"],
                                                    build["optimizer"], device)
            batches[variant] = _cycle(build["loader"], f"compare_training: {variant}")
    except Exception:
        for prof in profs.values():
            prof.close()
        raise
    step_round: Dict[str, Dict[int, int]] = {v: {} for v in variants}
    errors: List[str] = []
    total, done = (warmup + rounds * steps_per_round) * len(variants), 0
    # (variant, steps, round): each variant's warm-up (no round), then the rounds.
    plan = [(v, warmup, None) for v in variants] + [
        (v, steps_per_round, r) for r, order in enumerate(interleaved_order(variants, rounds))
        for v in order]
    for variant, count, round_index in plan:
        prof = profs[variant]
        try:
            for _ in range(count):
                _profiled_step(prof, steps[variant], batches[variant])
                if round_index is not None:
                    step_round[variant][len(prof.step_ms) - 1] = round_index
                done += 1
                if progress:
                    progress(done, total)
        except Exception as e:           # keep what was measured
            if not any(p.step_ms for p in profs.values()):
                raise
            errors.append(f"{variant}: {type(e).__name__}: {e}")
            prof.errors.append(f"{type(e).__name__}: {e}")
            break
        finally:
            # One variant's hooks at a time: the framework's events (e.g. the wrapped
            # torch.autograd.backward) are global, and two profilers' wrappers would stack.
            prof.close()
    how = (f"Compared in interleaved rounds: variants {variants} (the first the baseline), "
           f"{warmup} warm-up step(s) each, then {rounds} round(s) of {steps_per_round} "
           f"step(s) per variant, the order rotating each round.")
    reports = {}
    for variant, prof in profs.items():
        if not prof.step_ms:
            errors.append(f"{variant}: no measured step")
            continue
        report = reports[variant] = prof.report()
        report.doc["notes"].append(f"Variant {variant!r}. {how}")
    # What the instruments measure is the same for every variant: the first one's notes.
    first = profs[variants[0]]
    notes = list(first.instrument.notes) + list(first.events.notes) + [how]
    return Comparison(reports, step_round, errors, notes)


def _check_build(where: str, build: Any) -> None:
    """A variant's build holds what profile_training takes, and nothing else."""
    if not isinstance(build, dict) or any(k not in build for k in FACTORY_KEYS):
        got = sorted(build) if isinstance(build, dict) else type(build).__name__
        raise ValueError(f"{where}: expected a dict with keys {list(FACTORY_KEYS)} "
                         f"(optionally name), got {got}")
    unknown = sorted(set(build) - set(FACTORY_KEYS) - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected {list(FACTORY_KEYS)} and "
                         f"optionally name")


def _profiled_step(prof: LayerProfiler, step_fn, batches) -> None:
    with prof.step():
        with prof.phase("data_wait"):     # the loader's time is the step's data wait
            batch = next(batches)
        step_fn(prof, batch)


def _cycle(loader: Iterable, caller: str = "profile_training"):
    """Batches of ``loader``, starting over when it ends; a loader that yields nothing, or
    that cannot start over (a generator, an iterator without repeat), is an error, not a
    hang."""
    served = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            served += 1
            yield batch
        if empty and served == 0:
            raise ValueError(f"{caller}: loader: expected an iterable that yields "
                             "batches, got one that yielded nothing")
        if empty:
            raise ValueError(f"{caller}: loader: ran out after {served} batches and "
                             f"yields nothing when iterated again (a generator or a one-pass "
                             f"iterator); pass a re-iterable loader (a list, a DataLoader, "
                             f"an iterator with repeat=True) or fewer steps")

# --------------------------------------------------------------------------- factories

FACTORY_KEYS = ("model", "loader", "loss_fn", "optimizer")


def load_factory(spec: str) -> Callable[[], Dict[str, Any]]:
    """The factory named by ``spec``: "package.module:function" (imported) or
    "path/to/file.py:function" (loaded from the file). The factory takes no arguments and
    returns a dict with model, loader, loss_fn, optimizer (what profile_training takes), and
    optionally framework and name."""
    import importlib.util
    import sys
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"--model: expected a seed workload or FACTORY as "
                         f"'package.module:function' or 'path/to/file.py:function', got "
                         f"{spec!r}")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--model {spec}: {path}: no such file")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)    # pickling of its classes (loader workers)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"--model {spec}: cannot import {where!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {where} has no function {attr!r}"
                         + ("" if factory is None else f" ({attr} is a "
                                                       f"{type(factory).__name__})"))
    return factory


def build_from_factory(spec: str) -> Dict[str, Any]:
    """Calls the factory of ``spec`` and checks what it returned."""
    return _checked_factory_result(f"--model {spec}", load_factory(spec)())


def build_variants(spec: str, key: str, variants: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """The factory of ``spec`` called once per variant with the keyword argument
    ``key=variant`` (``--compare KEY=A,B,...``), each result checked as build_from_factory
    checks it; {variant: its build}, in the given order. A factory that takes no keyword
    ``key`` (neither a parameter of that name nor **kwargs) is refused before any call; one
    that raises for a variant is a ValueError naming the variant."""
    factory = load_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):      # a builtin or C callable: the call will tell
        signature = None
    if signature is not None:
        params = signature.parameters.values()
        named = signature.parameters.get(key)
        if not (any(p.kind is p.VAR_KEYWORD for p in params)
                or (named is not None and named.kind in (named.POSITIONAL_OR_KEYWORD,
                                                         named.KEYWORD_ONLY))):
            listed = ", ".join(("*" if p.kind is p.VAR_POSITIONAL else "") + p.name
                               for p in params)
            raise ValueError(f"--compare {key}=...: the factory {spec} takes no keyword "
                             f"{key!r} (its parameters: {listed or 'none'})")
    builds = {}
    for variant in variants:
        try:
            built = factory(**{key: variant})
        except Exception as e:
            raise ValueError(f"--compare {key}={variant}: the factory {spec} raised "
                             f"{type(e).__name__}: {e}") from e
        builds[variant] = _checked_factory_result(f"--model {spec} ({key}={variant})", built)
    return builds


def _checked_factory_result(where: str, built: Any) -> Dict[str, Any]:
    if not isinstance(built, dict) or any(k not in built for k in FACTORY_KEYS):
        got = sorted(built) if isinstance(built, dict) else type(built).__name__
        raise ValueError(f"{where}: the factory must return a dict with keys "
                         f"{list(FACTORY_KEYS)} (optionally framework, name), got {got}")
    unknown = sorted(set(built) - set(FACTORY_KEYS) - {"framework", "name"})
    if unknown:
        raise ValueError(f"{where}: the factory returned unknown keys {unknown}; "
                         f"expected {list(FACTORY_KEYS)} and optionally framework, name")
    return built
