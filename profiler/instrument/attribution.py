"""A framework's own trace of a step (its op events) turned into the engine's ranges: the part
every trace-based instrument (``profiler.instrument.<framework>_trace``) shares.

A trace instrument reads its framework's trace after the step, converts each op event to the
recorder's clock and says what it belongs to (an :class:`OpEvent`: phase, layer, direction, or
a fused region that spans several layers). :func:`attribute` then decides how much of the step
each of them took and :func:`record_step` lays that out as ranges on one track.

How time is shared: ops may run at the same time (TensorFlow's two inter-op threads run
independent ops side by side). The step's time is cut at every op start and end; an instant
where k attributions are busy gives each 1/k of it, and an instant where none is busy belongs
to nobody (the phase breakdown's "other": the executor between ops, Python around the call).
So the attributed times never add up to more than the step, and a layer's time is the time its
ops kept the step busy, not the sum of their durations on several threads.

The ranges keep the order the work ran in: each elementary interval becomes consecutive pieces
(one per busy attribution, 1/k of it each), and neighbouring pieces of the same attribution
merge. A layer whose ops interleave with another's therefore has several ranges in a step;
they add up to its time.

:class:`TraceInstrumentBase` holds what the trace instruments share besides: the mode, the
layers' types, and what each measured step's attribution gave (for the report's "trace"
section and its per-layer op counts).

This module knows no framework.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from profiler.timeline import PHASES

from .base import InstrumentBase

#: Phases a trace can attribute an op to (the rest of a step is "other").
TRACE_PHASES = tuple(p for p in PHASES if p not in ("data_wait", "h2d", "other"))
DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class OpEvent:
    """One op (or kernel, or fused region) the framework's trace saw run, on the recorder's
    clock (``time.perf_counter_ns``), with what it belongs to:

    - ``phase``: one of TRACE_PHASES, or None (the trace cannot tell: "other");
    - ``layer`` and ``direction``: the layer's name as ``subject.named_layers()`` has it and
      "forward" or "backward", or None for an op of no named layer (a padding, the gradient
      sum of a residual, the loss, the optimizer);
    - ``region``: instead of a layer, a fused region of the compiled program that covers
      several layers (named by the framework; never split between them).
    """
    start_ns: int
    end_ns: int
    name: str
    phase: Optional[str]
    layer: Optional[str] = None
    direction: Optional[str] = None
    region: Optional[str] = None

    def __post_init__(self):
        if self.end_ns < self.start_ns:
            raise ValueError(f"OpEvent {self.name!r}: ends ({self.end_ns}) before it starts "
                             f"({self.start_ns})")
        if self.phase is not None and self.phase not in TRACE_PHASES:
            raise ValueError(f"OpEvent {self.name!r}: phase: expected one of {TRACE_PHASES} or "
                             f"None, got {self.phase!r}")
        if (self.layer is None) != (self.direction is None):
            raise ValueError(f"OpEvent {self.name!r}: layer and direction come together, got "
                             f"layer={self.layer!r}, direction={self.direction!r}")
        if self.direction is not None and self.direction not in DIRECTIONS:
            raise ValueError(f"OpEvent {self.name!r}: direction: expected one of {DIRECTIONS}, "
                             f"got {self.direction!r}")
        if self.layer is not None and self.region is not None:
            raise ValueError(f"OpEvent {self.name!r}: an op belongs to a layer or to a fused "
                             f"region, not both")

    @property
    def key(self) -> Tuple[Optional[str], Optional[str], Optional[str], Optional[str]]:
        return (self.phase, self.layer, self.direction, self.region)


@dataclass
class Piece:
    """A stretch of the step given to one attribution (OpEvent.key)."""
    start_ns: int
    end_ns: int
    key: tuple


@dataclass
class Attribution:
    """What :func:`attribute` made of one step's events."""
    pieces: List[Piece] = field(default_factory=list)
    busy_ns: int = 0                # time at least one op ran
    window_ns: int = 0              # the step window's length
    # op events per (layer, direction) and per region: what the cross-check table shows
    op_counts: Dict[tuple, int] = field(default_factory=lambda: defaultdict(int))
    events: int = 0                 # events inside the window
    outside: int = 0                # events entirely outside it (ignored)

    @property
    def coverage(self) -> float:
        """The share of the window some op was running."""
        return self.busy_ns / self.window_ns if self.window_ns else 0.0


def attribute(events: Sequence[OpEvent], window: Tuple[int, int]) -> Attribution:
    """The step ``window`` (start_ns, end_ns) shared among ``events`` (module docstring).
    Events are clipped to the window; those wholly outside it are counted and ignored."""
    start, end = window
    if end < start:
        raise ValueError(f"attribute: window: ends ({end}) before it starts ({start})")
    result = Attribution(window_ns=end - start)
    inside = []
    for e in events:
        s, t = max(e.start_ns, start), min(e.end_ns, end)
        if t <= s:
            result.outside += e.end_ns <= start or e.start_ns >= end
            continue
        inside.append((s, t, e))
        result.events += 1
        if e.layer is not None:
            result.op_counts[(e.layer, e.direction)] += 1
        elif e.region is not None:
            result.op_counts[("region", e.region)] += 1
    if not inside:
        return result
    # Sweep: +1/-1 per key at every start/end; between two cut points the active keys share.
    cuts: Dict[int, List[Tuple[int, tuple]]] = defaultdict(list)
    first_start: Dict[tuple, int] = {}
    for s, t, e in inside:
        cuts[s].append((+1, e.key))
        cuts[t].append((-1, e.key))
        first_start[e.key] = min(first_start.get(e.key, s), s)
    active: Dict[tuple, int] = defaultdict(int)
    times = sorted(cuts)
    pieces: List[Piece] = []
    for here, there in zip(times, times[1:] + [None]):
        for delta, key in cuts[here]:
            active[key] += delta
            if not active[key]:
                del active[key]
        if there is None or not active:
            continue
        result.busy_ns += there - here
        # The earliest-begun attribution first, so pieces keep the order work started in.
        keys = sorted(active, key=lambda k: (first_start[k], _sortable(k)))
        edges = [here + (there - here) * i // len(keys) for i in range(len(keys) + 1)]
        for key, a, b in zip(keys, edges, edges[1:]):
            if b <= a:
                continue
            if pieces and pieces[-1].key == key and pieces[-1].end_ns == a:
                pieces[-1].end_ns = b
            else:
                pieces.append(Piece(a, b, key))
    result.pieces = pieces
    return result


def _sortable(key: tuple) -> tuple:
    return tuple("" if k is None else k for k in key)


def record_step(recorder, step: int, attribution: Attribution, *, track: str,
                layer_types: Dict[str, Optional[str]], phases: bool) -> None:
    """Records ``attribution``'s pieces as ranges of step ``step`` on ``track``: a "layer"
    range per run of pieces of one (layer, direction), a "mark" range per run of one fused
    region, and, with ``phases``, a "phase" range per run of one phase around them (pieces of
    no phase are "other": no range)."""
    pieces = attribution.pieces
    if phases:
        for run in _runs(pieces, lambda p: p.key[0]):
            if run[0].key[0] is not None:
                recorder.record(run[0].key[0], "phase", run[0].start_ns, run[-1].end_ns,
                                track=track, step=step)
    for run in _runs(pieces, lambda p: p.key[1:]):
        _, layer, direction, region = run[0].key
        if layer is not None:
            recorder.record(layer, "layer", run[0].start_ns, run[-1].end_ns, track=track,
                            direction=direction, layer_type=layer_types.get(layer), step=step)
        elif region is not None:
            recorder.record(region, "mark", run[0].start_ns, run[-1].end_ns, track=track,
                            step=step)


def _runs(pieces: List[Piece], key) -> List[List[Piece]]:
    """Maximal runs of consecutive, touching pieces with the same ``key(piece)``."""
    runs: List[List[Piece]] = []
    for p in pieces:
        if runs and key(runs[-1][-1]) == key(p) and runs[-1][-1].end_ns == p.start_ns:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def layer_match(scope: Sequence[str], names: Dict[str, str]) -> Optional[str]:
    """The deepest component of an op's name scope that names a layer: ``names`` maps a scope
    component (as the framework writes it) to the layer's name. A framework that makes scope
    names unique by appending "_<n>" (Keras in a traced function: "conv0_1") is matched with
    and without that suffix."""
    for part in reversed(scope):
        if part in names:
            return names[part]
        base, sep, number = part.rpartition("_")
        if sep and number.isdigit() and base in names:
            return names[base]
    return None


class TraceInstrumentBase(InstrumentBase):
    """The base of every framework's ``TraceInstrument`` (instrument.base, kind "trace"):
    checks the mode, keeps the layers' types, and records each step's attribution with
    :meth:`record` (ranges on the recorder, counters for the report). A subclass says what
    its trace can attribute (``layers_in``, ``regions_in``) and where it comes from
    (``source``), and adds its own facts to :meth:`accounting`."""

    kind = "trace"
    #: Whether the trace times layers in each mode.
    layers_in = {"eager": False, "graph": False}
    #: Whether it shows a compiled program's kernels that no layer could take, by name.
    regions_in = {"eager": False, "graph": False}
    #: The trace's origin, for the report.
    source = ""

    def __init__(self, subject, recorder, *, mode: str = "eager"):
        if mode not in ("eager", "graph"):
            raise ValueError(f"{type(self).__name__}: mode: expected 'eager' or 'graph', got "
                             f"{mode!r}")
        super().__init__(subject, recorder)
        self.mode = mode
        self.layer_types = {name: type(layer).__name__ for name, layer in self.layers}
        self.last_attribution: Optional[Attribution] = None
        self.coverage: List[float] = []          # per measured step: busy / step
        self.events_per_step: List[int] = []
        self._op_counts: Dict[tuple, int] = defaultdict(int)

    def record(self, step: int, found: Attribution, *, track: str, phases: bool) -> None:
        """Step ``step``'s attribution: its ranges on ``track`` (record_step) and, for a
        measured step, its coverage, events and op counts."""
        self.last_attribution = found
        if step >= 0:
            self.coverage.append(found.coverage)
            self.events_per_step.append(found.events)
            for key, n in found.op_counts.items():
                self._op_counts[key] += n
        record_step(self.recorder, step, found, track=track, layer_types=self.layer_types,
                    phases=phases)

    def op_counts(self) -> Dict[tuple, float]:
        """Op events per measured step, per (layer, direction) and per ("region", name)."""
        n = max(len(self.coverage), 1)
        return {key: count / n for key, count in self._op_counts.items()}

    def accounting(self) -> Dict[str, object]:
        """The report's "trace" section: the trace's source, how much of each measured step
        its ops covered (the rest is "other") and its op events per step; subclasses add
        what they attributed and how."""
        return {"source": self.source, "coverage_of_step": list(self.coverage),
                "op_events_per_step": list(self.events_per_step)}
