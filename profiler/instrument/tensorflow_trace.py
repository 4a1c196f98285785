"""TensorFlow's own trace of a step (its profiler's XSpace) as layer and phase ranges: the
trace-based instrument (instrument.base, kind "trace") for TensorFlow/Keras.

The profiler session runs from ``install`` on; after each step ``collect_step`` stops it,
reads the step's XSpace (written to a temporary folder, deleted once read), starts it again and
reads the ``/host:CPU`` plane. Its cost is outside the step's timing (the engine
reads the trace after taking the step's time); what tracing costs inside the step is the
report's overhead.

Graph mode (the whole step in one ``tf.function``): every op the executor runs is one event,
named ``<name scope>/<op>:<kernel>``, e.g.
``resnet20_1/stage1.block0_1/stage1.block0.conv1_1/convolution:_MklNativeConv2D`` or
``gradient_tape/resnet20_1/.../Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter``.

- layer: the deepest scope component that is a layer's name (Keras appends "_1" to a scope
  name used twice: matched with and without it; attribution.layer_match); ops under a scope of
  no named layer (a padding layer, a residual's add at block level) belong to no layer;
- direction and phase: ``gradient_tape/...`` ops are the backward, the others the forward;
  ops in the step's loss scope (workloads.spec.STEP_SCOPES) are loss_forward or loss_backward,
  in its optimizer scope the optimizer; the gradients' sums that TensorFlow adds at the top
  level (``AddN_<n>``, where a tensor feeds two ops: a residual block's input) are backward,
  of no layer;
- the step's time is shared among the ops running at each instant (attribution.attribute):
  two inter-op threads run independent ops side by side, so a layer's time is the time its ops
  kept the step busy. Time no op covers (the executor between ops, the call into the
  function, the loss's copy back to Python) is "other".

The phases come from the trace too (graph mode's step is one call with no boundary inside):
the compiled_step range the step marked is replaced by them.

Eager mode: TensorFlow names an eagerly executed op by its type only (``EagerLocalExecute:
Conv2D``, measured with TensorFlow 2.17: no name scope reaches the trace), so the trace cannot
tell layers apart. Here it serves the cross-check: each op becomes a "mark" range
(``op:<type>``) that profiler.analysis.cross_check sums inside the hook-based instrument's
layer ranges, comparing TensorFlow's own op timing with the hooks' ranges and checking which
kernels each range holds.

GPU (unverified: written without one): the device plane's kernel events would be joined to
their ops by the ``tf_op`` stat; not done here, so on a GPU the times are the host's op
events (launches), and the notes say so.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import tensorflow as tf

from profiler.workloads.spec import STEP_SCOPES

from . import attribution
from .attribution import OpEvent, TraceInstrumentBase

from tensorflow.tsl.profiler.protobuf import xplane_pb2

TRACK = "trace:tensorflow"
# An op event: "<scope>/<op>:<kernel>" without spaces ("EagerLocalExecute: Conv2D" has one).
_OP_EVENT = re.compile(r"^[^\s:]+:[^\s:]+$")
_EAGER_OP = "EagerLocalExecute: "
_GRADIENT_SUM = re.compile(r"^AddN(_\d+)?$")


class XSpaceSession:
    """One TensorFlow profiler session at a time, handing back the XSpace of what it saw. The
    public API saves it to a log directory (a temporary one, emptied after each read): the
    session's in-memory result (its private stop()) does not parse with the protobuf module
    TensorFlow ships (measured with 2.17.1)."""

    def __init__(self):
        self._logdir: Optional[tempfile.TemporaryDirectory] = None
        self.running = False

    def start(self) -> None:
        if self.running:
            return
        self._logdir = self._logdir or tempfile.TemporaryDirectory(prefix="deepprof-xspace-")
        try:
            tf.profiler.experimental.start(self._logdir.name, tf.profiler.experimental.
                                           ProfilerOptions(host_tracer_level=2,
                                                           python_tracer_level=0,
                                                           device_tracer_level=1))
        except Exception as e:
            raise RuntimeError(f"TensorFlow's profiler would not start ({type(e).__name__}: "
                               f"{e}); is another profiler (TensorBoard's, "
                               f"tf.profiler.experimental.start) running?") from e
        self.running = True

    def stop(self) -> xplane_pb2.XSpace:
        """Stops the session; the XSpace of everything since start (empty if none ran)."""
        space = xplane_pb2.XSpace()
        if not self.running:
            return space
        self.running = False
        tf.profiler.experimental.stop()
        root = Path(self._logdir.name)
        for path in sorted(root.glob("plugins/profile/*/*.xplane.pb")):
            space.ParseFromString(path.read_bytes())
        shutil.rmtree(root / "plugins", ignore_errors=True)
        return space

    def close(self) -> None:
        self.stop()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None


def host_op_events(space: xplane_pb2.XSpace, *, eager: bool,
                   to_perf_ns) -> List[Tuple[int, int, str]]:
    """(start_ns, end_ns, name) of the ops the host plane saw run, on the perf_counter clock
    (``to_perf_ns`` converts TensorFlow's wall-clock ns). Graph mode: the executor's op events
    on the compute threads; eager: the ``EagerLocalExecute`` events of the Python thread.
    The input pipeline's threads (tf.data) are left out: they load the next batch."""
    start_ns = _profile_start_ns(space)
    events = []
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            if line.name.startswith("tf_data"):
                continue
            if eager != (line.name == "python"):
                continue
            base_ns = start_ns + line.timestamp_ns
            for e in line.events:
                name = names.get(e.metadata_id, "")
                if eager:
                    if not name.startswith(_EAGER_OP):
                        continue
                    name = "op:" + name[len(_EAGER_OP):]
                elif not _OP_EVENT.match(name):
                    continue
                begin = base_ns + e.offset_ps // 1000
                events.append((to_perf_ns(begin), to_perf_ns(begin + e.duration_ps // 1000),
                               name))
    return events


def _profile_start_ns(space: xplane_pb2.XSpace) -> int:
    """The session's start on the wall clock: the host plane's times are relative to it."""
    for plane in space.planes:
        if plane.name == "Task Environment":
            for stat in plane.stats:
                if plane.stat_metadata[stat.metadata_id].name == "profile_start_time":
                    return stat.uint64_value or stat.int64_value
    raise ValueError("the XSpace has no profile_start_time (TensorFlow's Task Environment "
                     "plane): its host times cannot be placed")


def classify(name: str, layer_names: Dict[str, str],
             model_name: Optional[str] = None) -> OpEvent:
    """What a graph-mode op event (``<scope>/<op>:<kernel>``) belongs to (module docstring);
    times are filled in by the caller. ``model_name``: the Keras model's name, whose scope
    holds the forward (and, under gradient_tape/, the backward); an op outside it, a layer
    and the step's scopes (a user's own step: its loss, its optimizer) belongs to no phase.
    None: every such op counts to the forward or the backward."""
    op_name = name.rpartition(":")[0]
    scope = op_name.split("/")
    backward = scope[0] == "gradient_tape"
    if STEP_SCOPES["optimizer"] in scope:
        return OpEvent(0, 0, name, "optimizer")
    if STEP_SCOPES["loss"] in scope:
        return OpEvent(0, 0, name, "loss_backward" if backward else "loss_forward")
    if not backward and len(scope) == 1 and _GRADIENT_SUM.match(scope[0]):
        return OpEvent(0, 0, name, "backward")
    layer = _layer_of(scope[:-1], layer_names)
    direction = "backward" if backward else "forward"
    top = scope[1] if backward and len(scope) > 1 else scope[0]
    in_model = model_name is None or attribution.layer_match([top], {model_name: model_name})
    return OpEvent(0, 0, name, direction if (layer or in_model) else None, layer,
                   direction if layer else None)


def _layer_of(scope: List[str], layer_names: Dict[str, str]) -> Optional[str]:
    """The deepest layer whose name matches scope components: a seed layer's name is one
    component ("stage1.block0.conv1"), a user's nested layer a path of them ("head/dense":
    the components "head_1", "dense_1" in a row, Keras' "_<n>" suffixes allowed)."""
    paths = {tuple(name.split("/")): name for name in layer_names}
    longest = max((len(path) for path in paths), default=1)
    for end in range(len(scope), 0, -1):
        for length in range(min(longest, end), 0, -1):
            parts = scope[end - length:end]
            for path, name in paths.items():
                if len(path) == length and all(
                        attribution.layer_match([part], {want: want}) for part, want in
                        zip(parts, path)):
                    return name
    return None


def _model_name(subject) -> Optional[str]:
    """The Keras model's name (a seed workload's ``net``, a UserModel's ``model``)."""
    import keras
    for attribute in ("net", "model"):
        model = getattr(subject, attribute, None)
        if isinstance(model, keras.Model):
            return model.name
    return None


class TraceInstrument(TraceInstrumentBase):
    """Layer ranges of a TensorFlow/Keras step from TensorFlow's own trace (module
    docstring); the contract is instrument.base's."""

    #: Whether the trace times layers in each mode (eager: op types only, see above).
    layers_in = {"eager": False, "graph": True}
    source = "TensorFlow profiler, /host:CPU plane (XSpace)"

    def __init__(self, subject, recorder, *, mode: str = "eager"):
        super().__init__(subject, recorder, mode=mode)
        self.session = XSpaceSession()
        self.layer_names = {name: name for name, _ in self.layers}
        self.model_name = _model_name(subject)
        self._classified: Dict[str, OpEvent] = {}
        self._clock_offset_ns = 0
        on_gpu = getattr(subject, "device", "cpu") == "cuda"
        if mode == "graph":
            self.notes = [
                "TensorFlow's own trace (its profiler's host plane, read after each step): "
                "layer forward = the time the layer's ops (the ops in its name scope) kept the "
                "compiled step busy; backward = the same for their gradient ops "
                "(gradient_tape/<scope>); where two ops ran at once each got half of that "
                "time. Ops of no named layer (paddings, a residual's add and gradient sum) "
                "count to their phase only; time no op covers is 'other'.",
                "The phases inside the compiled step come from the trace too: loss_forward "
                f"and loss_backward are the ops in the {STEP_SCOPES['loss']!r} scope, the "
                f"optimizer the ops in {STEP_SCOPES['optimizer']!r}."]
        else:
            self.notes = [
                "TensorFlow's own trace of eager steps: TensorFlow names an eager op by its "
                "type only (no layer scope reaches the trace), so this trace gives op times "
                "(EagerLocalExecute events), not layers; it serves the cross-check."]
        if on_gpu:
            self.notes.append("GPU (unverified): the device plane's kernels are not joined to "
                              "their ops; times are the host's op events (launches).")

    def install(self) -> None:
        """Starts TensorFlow's profiler (once)."""
        if not self.session.running:
            self._calibrate()
            self.session.start()

    def remove(self) -> None:
        """Stops the profiler, drops what it saw since the last step."""
        self.session.close()

    def mark_output(self, output):
        """The output unchanged: the trace needs no marker (eager phases come from the
        engine's boundaries; graph mode has none inside the step)."""
        return output

    def collect_step(self, step: int, window: Tuple[int, int]) -> None:
        """Stops the profiler, turns the step's op events into ranges, starts it again."""
        space = self.session.stop()
        self._calibrate()
        self.session.start()
        events = host_op_events(space, eager=self.mode == "eager", to_perf_ns=self._to_perf)
        if self.mode == "eager":
            for start, end, name in events:
                if window[0] <= start and end <= window[1]:
                    self.recorder.record(name, "mark", start, end, track=TRACK, step=step)
            return
        ops = [OpEvent(start, end, name, *self._classify(name).key)
               for start, end, name in events]
        found = attribution.attribute(ops, window)
        # The trace's phases stand in for the one compiled call where the step marked it; a
        # loop that marks its own phases (LayerProfiler) keeps them and gets layers only.
        phases = self._replace_compiled_step(step, window)
        self.record(step, found, track=TRACK, phases=phases)

    def accounting(self) -> Dict[str, object]:
        return {**super().accounting(),
                "attributed": "layers by name scope, phases by the step's scopes"
                              if self.mode == "graph" else "op types only (eager)"}

    # -- internals ---------------------------------------------------------------------------
    def _calibrate(self) -> None:
        """The wall clock's offset from perf_counter, read now (TensorFlow stamps its events
        on the wall clock). Read as the midpoint of a bracket, so the error is below the
        bracket's half-width (well under a microsecond)."""
        before = time.perf_counter_ns()
        wall = time.time_ns()
        after = time.perf_counter_ns()
        self._clock_offset_ns = wall - (before + after) // 2

    def _to_perf(self, wall_ns: int) -> int:
        return wall_ns - self._clock_offset_ns

    def _classify(self, name: str) -> OpEvent:
        """classify(), once per op name (a step repeats the same ops every time)."""
        found = self._classified.get(name)
        if found is None:
            found = self._classified[name] = classify(name, self.layer_names, self.model_name)
        return found

    def _replace_compiled_step(self, step: int, window: Tuple[int, int]) -> bool:
        """The step's compiled_step range (the one call) gives way to the trace's phases;
        False where the step has none."""
        timeline = self.recorder.timeline
        kept = [r for r in timeline.ranges
                if not (r.kind == "phase" and r.name == "compiled_step" and r.step == step
                        and window[0] <= r.start_ns and r.end_ns <= window[1])]
        replaced = len(kept) < len(timeline.ranges)
        timeline.ranges = kept
        return replaced

