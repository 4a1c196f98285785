"""MXNet/Gluon layer times read after each step from MXNet's own profiler (``mx.profiler``):
the trace-based instrument (``TraceInstrument``, kind "trace"), for a hybridized network, where
Gluon calls no per-block hook.

What MXNet 1.9.1's profiler records (measured on ResNet-20, batch 8, this CPU): one event per
engine operation, named by the operator's *type* only (``Convolution``,
``_backward_Convolution``), with no node or block name and no arguments. With backward bulking
off (``MXNET_EXEC_BULK_EXEC_TRAIN=0``, what importing profiler.instrument.mxnet sets) a
``hybridize(static_alloc=True, static_shape=True)`` network gives one event per graph node:
a training step holds 20 ``Convolution``, 19 ``BatchNorm``, 19 ``relu``, 9 ``elemwise_add`` and
the same backward types, and 4 ``ImperativeBulk`` events. The ImperativeBulks are the nodes the
CachedOp cannot run from its static plan (here the first convolution, which reads the input,
and the dense layer, which writes the output, and their backward nodes): it runs them through
MXNet's imperative path, whose engine bulks them. Bulking on, a step is a handful of events
named by the op types they hold (``BatchNorm,relu,Convolution,...``, cut at 128 characters).
``hybridize()`` without static_alloc runs every node through the imperative path: bulks of up
to 15 nodes (``ImperativeBulk``) whatever MXNET_EXEC_BULK_EXEC_TRAIN says.

Which event is which node: MXNet's CachedOp pushes a graph's nodes to the engine in its indexed
order (forward nodes, then the gradient graph's), and the engine's one CPU worker runs them
in that order (ready operations queue first in, first out). That order and the node names
(``resnet20_stage1_block0_conv1_fwd``, ``..._fwd_backward``: the Gluon block prefixes) come
from a probe (:func:`probe_graph`): the network's own symbol run once through two CachedOps of
ours, on copies of its parameters, with MXNet's op hook (``_register_op_hook``), which names
every node run through the imperative path: a dynamic one (every node, in order) and one with
the network's flags (which nodes that path takes, hence which are ImperativeBulk). From that
plan the step's expected sequence of layer-op events is known; a step's events are mapped to
nodes by position only when the sequence of event names of those types (and ImperativeBulk)
equals the expected one exactly. Otherwise the step gets phases only, and ``step_problems``
says why (MXNet records every operator of the process: other MXNet work inside the step's
window is such a case). The durations agree with the mapping: a 1x1 shortcut convolution (a ninth of the
work of the 3x3 beside it) lands where the plan puts it, forward and backward.

An op maps to the layer whose Gluon prefix starts its node's name (the longest one), a backward
node to its forward node's layer; an ImperativeBulk holding one layer's nodes only is that
layer's, one holding several layers' is a region (a "mark" range, never split). Ops of no
layer (activations, additions, gradient sums, the loss, the optimizer's update) get a phase
and no range. Eager (imperative) networks: the events carry no name and there is no graph;
their order is Python's call order, which the registration order of the layers does not give
(a shortcut is registered after, and called before, its block's convolutions): phases only.

Clock: MXNet stamps events in whole microseconds of its own clock (the system clock here). At
each step, three instant markers bracketed by ``time.perf_counter_ns`` give the offset; the
tightest bracket bounds the error (``clock_error_ns``: 2.9 to 4.7 us in the runs here, the
events' own 1 us truncation included); an operator run between two perf_counter_ns readings
converts into them (tests/test_trace_mxnet.py). Each step's events are read by
``mx.profiler.dump`` into a temporary file (MXNet writes its trace nowhere else), which
``remove()`` deletes (and, for an instrument never removed, the process's exit).

Cost (this 2-core CPU, shared and loaded, 2026-12-05): recording costs MXNet about 1.5 us per
operator event (paired median, IQR -0.5 to 2.8 us, 20 alternating rounds of 2000 operators);
a graph-mode ResNet-20 step of batch 8 (about 190 events, 66 ms) took +0.6 ms (+0.9%) traced
against the same step untraced (both waiting for the engine at the phase boundaries; paired
median of 40 rotating rounds, IQR -3.2 to +9.4 ms: the load's noise exceeds the cost), +2.4 ms
(+3.7%) against a plain step, which waits only at its end. ``collect_step`` (dump, parse,
attribute), outside the step: about 5 ms; the first step's probe of the graph about 0.7 s.

GPU (not run here): MXNet writes a GPU's operator events under its own device; they are read
alike, unverified.

This module must not change what the network computes: the probes run on copies, in inference
mode (no dropout draw), with MXNet's profiler paused; the output marker is the hook
instrument's identity (profiler.instrument.mxnet_engine).
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd
from mxnet.ndarray import NDArray

# The hook instrument's module first: importing it turns MXNet's backward bulking off before
# MXNet runs its first operator (see its docstring); this instrument needs it off too.
from . import mxnet as _mxnet_hooks  # noqa: F401
from .attribution import OpEvent, TraceInstrumentBase, attribute
from .mxnet_engine import mark, marker_callbacks, new_slot

TRACK = "trace:mxnet"
IMPERATIVE_BULK = "ImperativeBulk"
# The engine's own operations: freeing arrays, waits, setting values (zeros for gradients).
HOUSEKEEPING = frozenset({"DeleteVariable", "WaitForVar", "SetValueOp"})
DEFAULT_BULK_SIZE = 15   # MXNet's MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN default
ALIGN_MARKERS = 3
BULK_WARNING = ("WARNING: MXNet ran consecutive operators as one engine operation "
                "(MXNET_EXEC_BULK_EXEC_TRAIN=1): its trace shows bulks (regions, 'mark' ranges), "
                "not layers. Set MXNET_EXEC_BULK_EXEC_TRAIN=0 before MXNet runs its first "
                "operator (importing profiler.instrument.mxnet does, unless it is set).")


# --------------------------------------------------------------------------- the graph's plan

@dataclass(frozen=True)
class PlannedOp:
    """One event the plan expects: ``name`` as MXNet's profiler writes it (the op type, or
    ImperativeBulk), the nodes it runs, their direction and what they belong to."""
    name: str
    nodes: Tuple[str, ...]
    direction: str
    layer: Optional[str] = None
    region: Optional[str] = None


@dataclass
class GraphPlan:
    """What a hybridized network's training step runs, in the engine's order
    (:func:`probe_graph`): every node (name, op type) forward then backward, which of them run
    through the imperative path, and the events that makes (``ops``)."""
    forward: List[Tuple[str, str]]
    backward: List[Tuple[str, str]]
    imperative: frozenset
    ops: List[PlannedOp] = field(default_factory=list)
    # Op types whose events are mapped by position: every type a layer's node has, and
    # ImperativeBulk.
    mapped_types: frozenset = frozenset()

    def expected(self) -> List[str]:
        """The event names a step must show, in order, for the mapping to hold."""
        return [op.name for op in self.ops if op.name in self.mapped_types]


Nodes = List[Tuple[str, str]]    # (node name, op type), in push order
_OUTPUT_SUFFIX = re.compile(r"_(output\d*|mean|var|\d+)$")


def _node_outputs(pushed: Sequence[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """(node, op) in push order from the op hook's (output name, op) calls, one per output:
    MXNet names a forward node's outputs ``<node>_output[<k>]``, ``<node>_<k>``,
    ``<node>_mean`` and ``<node>_var`` (batch norm's statistics), a backward node's
    ``<node>_<k>``."""
    nodes: Nodes = []
    for output, op in pushed:
        node = _OUTPUT_SUFFIX.sub("", output)
        # A node's outputs come one after the other: one node. A gradient sum has one output,
        # and every one is named "sum_grad": each call is a node of its own.
        if not (nodes and nodes[-1] == (node, op) and op != "add_n"):
            nodes.append((node, op))
    return nodes


def _hooked_run(symbol, flags, inputs: List[NDArray], needs_grad: List[bool]):
    """Runs ``symbol`` as a CachedOp with ``flags`` on ``inputs`` (copies), forward and
    backward, in inference mode; returns the op hook's (output, op) calls, forward and
    backward apart."""
    op = mx.nd.CachedOp(symbol, flags)
    pushed: List[Tuple[str, str]] = []

    def hook(name, op_name, _handle):
        pushed.append((name.decode() if isinstance(name, bytes) else str(name),
                       op_name.decode() if isinstance(op_name, bytes) else str(op_name)))

    op._register_op_hook(hook)
    args = [a.copy() for a in inputs]
    for a, grad in zip(args, needs_grad):
        if grad:
            a.attach_grad()
    with autograd.record(train_mode=False):   # no dropout draw: the user's stream untouched
        out = op(*args)
    outs = out if isinstance(out, (list, tuple)) else [out]
    forward = list(pushed)
    # MXNet's own backward: profiler.instrument.mxnet's PhaseEvents may have wrapped it (the
    # probe is no phase of a step); functools.wraps keeps the original.
    backward_call = getattr(autograd.backward, "__wrapped__", autograd.backward)
    backward_call(outs, [mx.nd.ones_like(o) for o in outs], train_mode=False)
    mx.nd.waitall()
    return forward, pushed[len(forward):]


def probe_graph(net, signature: Sequence[Tuple[tuple, str]]) -> Tuple[Nodes, Nodes, frozenset]:
    """The hybridized ``net``'s graph as its CachedOp runs it for inputs of ``signature``
    ((shape, dtype) per NDArray input): (forward nodes, backward nodes, names of the nodes run
    through the imperative path), each node (name, op type), in push order.

    Two CachedOps of the network's symbol, on copies of its parameters and zero inputs: a
    dynamic one, whose op hook sees every node (the order), and one with the network's own
    flags, whose op hook sees only the nodes it runs imperatively (a static plan runs the rest
    without a hook). Gluon 1.x keeps the graph in ``_cached_graph`` and the CachedOp's inputs in
    ``_cached_op_args`` (its _build_cache); MXNet's profiler must be paused around this."""
    if getattr(net, "_cached_op", None) is None or not getattr(net, "_cached_graph", ()):
        raise ValueError("probe_graph: net: expected a hybridized block that has run once "
                         "(its cached graph is built at its first call)")
    _, symbol = net._cached_graph
    params = [what for is_arg, what in net._cached_op_args if not is_arg]
    ctx = params[0].data().context if params else mx.cpu()
    data_indices, param_indices, inputs, needs_grad = [], [], [], []
    for i, (is_arg, what) in enumerate(net._cached_op_args):
        if is_arg:            # what: the input's index among the call's NDArrays
            shape, dtype = signature[what]
            data_indices.append(i)
            inputs.append(mx.nd.zeros(shape, ctx=ctx, dtype=dtype))
            needs_grad.append(False)
        else:
            param_indices.append(i)
            inputs.append(what.data())
            needs_grad.append(what.grad_req != "null")
    indices = [("data_indices", data_indices), ("param_indices", param_indices)]
    forward, backward = _hooked_run(symbol, indices, inputs, needs_grad)
    flagged_f, flagged_b = _hooked_run(symbol, indices + list(net._flags), inputs, needs_grad)
    imperative = frozenset(n for n, _ in _node_outputs(flagged_f) + _node_outputs(flagged_b))
    return _node_outputs(forward), _node_outputs(backward), imperative


def _bulk_sizes(flags) -> Tuple[int, int]:
    """Nodes per ImperativeBulk, forward and backward: the CachedOp's flags, else MXNet's
    environment defaults (read as MXNet reads them)."""
    flags = dict(flags)
    both = int(os.environ.get("MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN", DEFAULT_BULK_SIZE))
    forward = int(flags.get("forward_bulk_size",
                            os.environ.get("MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_FWD", both)))
    backward = int(flags.get("backward_bulk_size",
                             os.environ.get("MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_BWD", both)))
    return max(1, forward), max(1, backward)


def layer_of_node(node: str, prefixes: Dict[str, str]) -> Optional[str]:
    """The layer whose Gluon prefix starts ``node``'s name (the longest), a backward node's
    (``<forward node>_backward``) that of its forward node; None for a node of no layer."""
    if node.endswith("_backward"):
        node = node[:-len("_backward")]
    best = None
    for prefix, layer in prefixes.items():
        if node.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def build_plan(forward, backward, imperative, prefixes: Dict[str, str],
               bulk_sizes: Tuple[int, int]) -> GraphPlan:
    """The events a step of the probed graph makes: a node of the static plan is one event of
    its op type; consecutive nodes of the imperative path are one ImperativeBulk (at most the
    bulk size of nodes; a forward or backward call ends one)."""
    plan = GraphPlan(forward, backward, frozenset(imperative))
    for direction, nodes, size in (("forward", forward, bulk_sizes[0]),
                                   ("backward", backward, bulk_sizes[1])):
        bulk: List[str] = []
        bulks = itertools.count()

        def close():
            if bulk:
                plan.ops.append(_bulk_op(tuple(bulk), direction, next(bulks), prefixes))
                bulk.clear()

        for node, op in nodes:
            if node in imperative:
                bulk.append(node)
                if len(bulk) >= size:
                    close()
                continue
            close()
            plan.ops.append(PlannedOp(op, (node,), direction, layer_of_node(node, prefixes)))
        close()
    layer_types = {op.name for op in plan.ops if op.layer is not None}
    plan.mapped_types = frozenset(layer_types | {IMPERATIVE_BULK})
    return plan


def _bulk_op(nodes: Tuple[str, ...], direction: str, index: int,
             prefixes: Dict[str, str]) -> PlannedOp:
    layers = [layer_of_node(n, prefixes) for n in nodes]
    named = list(dict.fromkeys(layer for layer in layers if layer is not None))
    if len(named) == 1 and None not in layers:
        return PlannedOp(IMPERATIVE_BULK, nodes, direction, layer=named[0])
    span = f": {named[0]} .. {named[-1]}" if named else ""
    return PlannedOp(IMPERATIVE_BULK, nodes, direction,
                     region=f"{direction} bulk {index}{span}")


# --------------------------------------------------------------------------- MXNet's trace

@dataclass(frozen=True)
class TraceOp:
    """One operator event of MXNet's trace, in MXNet's microseconds."""
    name: str
    start_us: int
    end_us: int
    thread: int


def parse_dump(text: str) -> Tuple[List[TraceOp], Dict[str, int]]:
    """The operator events (begin/end pairs; MXNet also writes each again as an async event,
    skipped) and the instant markers (name -> us) of one ``mx.profiler.dump``."""
    # Only MXNet's first dump names its devices; a later one starts its list with a comma.
    text = re.sub(r'("traceEvents"\s*:\s*\[)\s*,', r"\1", text.strip(), count=1)
    try:
        events = json.loads(text)["traceEvents"]
    except json.JSONDecodeError:
        # A dump written with continuous_dump (MXNet's default) has no closing brackets.
        events = json.loads(text.rstrip(",") + "]}")["traceEvents"]
    open_: Dict[tuple, List[int]] = {}
    ops: List[TraceOp] = []
    markers: Dict[str, int] = {}
    for e in events:
        ph = e.get("ph")
        if ph == "B":
            open_.setdefault((e["pid"], e["tid"], e["name"]), []).append(e["ts"])
        elif ph == "E":
            starts = open_.get((e["pid"], e["tid"], e["name"]))
            if starts:
                ops.append(TraceOp(e["name"], starts.pop(), e["ts"], e["tid"]))
        elif ph in ("n", "i", "I") and "instant_marker" in e.get("cat", ""):
            markers[e["name"]] = e["ts"]
    ops.sort(key=lambda o: (o.start_us, o.end_us))
    return ops, markers


_DOMAIN = None
_ACTIVE: Optional["TraceSession"] = None


@atexit.register
def _stop_at_exit() -> None:
    """An instrument never removed still leaves no trace file (MXNet's own exit-time dump
    would otherwise write one)."""
    if _ACTIVE is not None:
        try:
            _ACTIVE.stop()
        except Exception:   # MXNet may already be shutting down: the file goes regardless
            if _ACTIVE is not None and _ACTIVE.directory:
                shutil.rmtree(_ACTIVE.directory, ignore_errors=True)


class TraceSession:
    """MXNet's profiler, recording operator events into a temporary file for one
    TraceInstrument at a time (MXNet has one profiler per process)."""

    def __init__(self):
        global _DOMAIN
        if _DOMAIN is None:
            _DOMAIN = mx.profiler.Domain("deepprof")   # MXNet never frees a domain: one
        self._markers = [mx.profiler.Marker(_DOMAIN, f"deepprof-align-{k}")
                         for k in range(ALIGN_MARKERS)]
        self.directory: Optional[str] = None
        self.path: Optional[str] = None

    def start(self) -> None:
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE is not self:
            raise RuntimeError("profiler.instrument.mxnet_trace: another TraceInstrument is "
                               "installed; MXNet has one profiler per process: remove() it "
                               "first")
        self.directory = tempfile.mkdtemp(prefix="deepprof-mxtrace-")
        self.path = os.path.join(self.directory, "trace.json")
        # Operators only: no C API calls or memory events; no timer thread (continuous_dump,
        # MXNet's default, dumps every second from a thread of its own).
        mx.profiler.set_config(profile_symbolic=True, profile_imperative=True,
                               profile_memory=False, profile_api=False, aggregate_stats=False,
                               continuous_dump=False, filename=self.path)
        mx.profiler.set_state("run")
        _ACTIVE = self

    def take(self) -> Tuple[List[TraceOp], int, int]:
        """The operator events recorded since the last take, and the offset (ns) from MXNet's
        clock to perf_counter_ns with its error bound (ns). Waits for MXNet's engine."""
        mx.nd.waitall()
        brackets = []
        for marker in self._markers:
            before = time.perf_counter_ns()
            marker.mark("process")
            brackets.append((before, time.perf_counter_ns()))
        # A dump without continuous_dump rewrites the file with what was recorded since the
        # last one and turns MXNet's output off; running again turns it back on.
        mx.profiler.dump(finished=False)
        mx.profiler.set_state("run")
        with open(self.path) as f:
            ops, markers = parse_dump(f.read())
        offsets = []
        for k, (before, after) in enumerate(brackets):
            ts = markers.get(f"deepprof-align-{k}")
            if ts is not None:
                offsets.append((after - before, ts * 1000 - (before + after) // 2))
        if not offsets:
            raise RuntimeError("profiler.instrument.mxnet_trace: MXNet's trace holds none of "
                               "the clock markers: was the profiler reconfigured meanwhile?")
        width, offset = min(offsets)
        return ops, offset, width // 2 + 1000     # + MXNet's whole-microsecond stamps

    def pause(self) -> None:
        mx.profiler.pause()

    def resume(self) -> None:
        mx.profiler.resume()

    def stop(self) -> None:
        """Stops recording, drops what is left (the final dump turns MXNet's output off, so
        its exit-time dump writes nothing) and deletes the file."""
        global _ACTIVE
        mx.profiler.set_state("stop")
        try:
            mx.profiler.dump(finished=True)
        finally:
            if self.directory:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = self.path = None
            if _ACTIVE is self:
                _ACTIVE = None


# --------------------------------------------------------------------------- the instrument

def _is_optimizer(name: str) -> bool:
    return name.endswith("_update") or name.startswith(("multi_", "preloaded_multi_"))


def _is_backward(name: str) -> bool:
    return name.startswith("_backward_") or name == "add_n"


def _input_signature(args) -> Tuple[Tuple[tuple, str], ...]:
    flat: List[NDArray] = []
    stack = list(args)
    while stack:
        a = stack.pop(0)
        if isinstance(a, NDArray):
            flat.append(a)
        elif isinstance(a, (list, tuple)):
            stack[:0] = list(a)
    return tuple((tuple(a.shape), np.dtype(a.dtype).name) for a in flat)


class TraceInstrument(TraceInstrumentBase):
    """Layer times of a hybridized Gluon network from MXNet's own profiler, read after each
    step (module docstring); phases only for an imperative network or a step whose events do
    not match the graph's plan."""

    # The engine waits for MXNet's engine at each phase boundary, as with the hook instrument:
    # phases are then execution times, and the trace's ops fall inside their phases.
    phase_sync = True
    #: Whether the trace times layers in each mode (eager: no node names, see above).
    layers_in = {"eager": False, "graph": True}
    source = "mx.profiler (operator events)"

    def __init__(self, subject, recorder, *, mode: str = "eager"):
        super().__init__(subject, recorder, mode=mode)
        self.net = subject.net
        # Gluon prefix -> layer; a prefix two layers share (or none) names neither.
        owners: Dict[str, List[str]] = {}
        for name, block in self.layers:
            owners.setdefault(getattr(block, "prefix", "") or "", []).append(name)
        self.prefixes = {prefix: names[0] for prefix, names in owners.items()
                         if prefix and len(names) == 1}
        self.ambiguous_prefixes = [name for prefix, names in owners.items()
                                   if not prefix or len(names) > 1 for name in names]
        self._session = TraceSession()
        self._installed = False
        self._hook = None
        self._signature: Optional[tuple] = None
        self._plan: Optional[GraphPlan] = None
        self._plan_key: Optional[tuple] = None    # (the CachedOp probed, input signature)
        self._output_marker = marker_callbacks(new_slot(self, "_on_output_grad"))
        self.last_ops: List[TraceOp] = []
        # MXNet's clock (ns) minus perf_counter_ns at the last step, and its error bound.
        self.clock_offset_ns: Optional[int] = None
        self.clock_error_ns: Optional[int] = None
        self.step_problems: Dict[int, str] = {}   # step -> why it got phases only
        self.steps_attributed: List[int] = []     # steps whose layer ops were mapped
        self.notes = self._describe()

    @property
    def plan(self) -> Optional[GraphPlan]:
        """The graph plan the last step was mapped with (None: none yet, or eager)."""
        return self._plan

    # -- the engine's interface -------------------------------------------------------------
    def install(self) -> None:
        if self._installed:
            return
        self._session.start()
        # The network's inputs (shape, dtype), for the graph probe: a hook on the network
        # itself, not on its layers (it reads no data and queues nothing).
        self._hook = self.net.register_forward_pre_hook(self._remember_inputs)
        self._installed = True

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        if self._hook is not None:
            self._hook.detach()
            self._hook = None
        self._session.stop()

    def mark_output(self, output):
        if not (self._installed and isinstance(output, NDArray) and output.ndim
                and autograd.is_recording()):
            return output
        marked = mark(output, self._output_marker)
        # A recorded slice: its backward hands the marker a plain-layout gradient
        # (profiler.instrument.mxnet's mark_output).
        return marked[0:marked.shape[0]]

    def collect_step(self, step: int, window: Tuple[int, int]) -> None:
        if not self._installed:
            return
        ops, offset, self.clock_error_ns = self._session.take()
        self.clock_offset_ns = offset
        self.last_ops = ops
        # Bulking as the trace shows it (mxnet_engine.backward_is_bulked, a timed probe, was
        # seen to answer False under MXNET_EXEC_BULK_EXEC_TRAIN=1 before the first step).
        bulked = next((o.name for o in ops if "," in o.name), None)
        if bulked:
            plan, problem = None, (f"MXNet ran consecutive operators as one event ({bulked[:60]!r}"
                                   f"...): MXNET_EXEC_BULK_EXEC_TRAIN=1, bulks are regions")
            if BULK_WARNING not in self.notes:
                self.notes.append(BULK_WARNING)
        else:
            plan, problem = self._current_plan()
        events, mapping_problem = self._op_events(ops, offset, plan, window)
        problem = problem or mapping_problem
        if problem:
            self.step_problems[step] = problem
        else:
            self.steps_attributed.append(step)
        self.record(step, attribute(events, window), track=TRACK, phases=False)

    def accounting(self) -> Dict[str, object]:
        """The report's "trace" section (TraceInstrumentBase's), with which steps got layers
        and why others did not, and the clock's error at the last step."""
        measured = [s for s in self.steps_attributed if s >= 0]
        return {**super().accounting(),
                "attributed": ("layers by the cached graph's node order (probed), where a "
                               "step's events match it exactly" if self.mode == "graph"
                               else "phases only (eager: no node names)"),
                "steps_with_layers": measured,
                "steps_phases_only": {str(s): why for s, why in self.step_problems.items()
                                      if s >= 0},
                "clock_error_us": None if self.clock_error_ns is None
                else self.clock_error_ns / 1e3}

    # -- the plan ---------------------------------------------------------------------------
    def _remember_inputs(self, block, args) -> None:
        if autograd.is_recording():
            self._signature = _input_signature(args)

    def _current_plan(self) -> Tuple[Optional[GraphPlan], Optional[str]]:
        if not getattr(self.net, "_active", False):
            return None, ("the network runs imperatively: MXNet's events carry no node names "
                          "and the network no graph to order them by")
        cached = getattr(self.net, "_cached_op", None)
        if cached is None or self._signature is None:
            return None, "the network's cached graph did not run in this step"
        if not (self._plan_key and self._plan_key[0] is cached
                and self._plan_key[1] == self._signature):
            self._session.pause()           # the probe's ops are no part of any step
            try:
                forward, backward, imperative = probe_graph(self.net, self._signature)
            finally:
                self._session.resume()
            self._plan = build_plan(forward, backward, imperative, self.prefixes,
                                    _bulk_sizes(self.net._flags))
            # A CachedOp takes no weak reference; held, it is the network's own (or, after
            # a rebuild, the old one until the next step's probe).
            self._plan_key = (cached, self._signature)
        return self._plan, None

    # -- events -> OpEvents ------------------------------------------------------------------
    def _op_events(self, ops: List[TraceOp], offset: int, plan: Optional[GraphPlan],
                   window: Tuple[int, int]) -> Tuple[List[OpEvent], Optional[str]]:
        """The step's OpEvents, and why its layer ops could not be mapped (None: mapped).
        Only the ops that ran in the step's window are the step's: MXNet records every
        operator of the process while it runs, between steps too."""
        start_us, end_us = (window[0] + offset) // 1000, (window[1] + offset) // 1000 + 1
        ops = [o for o in ops if o.name not in HOUSEKEEPING
               and o.end_us >= start_us and o.start_us <= end_us]
        assigned: Dict[int, PlannedOp] = {}
        problem = None
        if plan is not None:
            mapped = [i for i, o in enumerate(ops) if o.name in plan.mapped_types]
            expected = plan.expected()
            got = [ops[i].name for i in mapped]
            if got == expected:
                planned = [op for op in plan.ops if op.name in plan.mapped_types]
                assigned = dict(zip(mapped, planned))
            else:
                problem = _mismatch(got, expected)
        windows = _direction_windows(ops, assigned)
        events = []
        bulks: Dict[str, int] = {"forward": 0, "backward": 0}
        for i, o in enumerate(ops):
            start, end = o.start_us * 1000 - offset, o.end_us * 1000 - offset
            p = assigned.get(i)
            if p is not None:
                events.append(OpEvent(start, end, o.name, p.direction, layer=p.layer,
                                      direction=p.direction if p.layer else None,
                                      region=p.region))
            elif "," in o.name:   # a bulk of several operators (bulking on), in step order
                direction = "backward" if "_backward_" in o.name else "forward"
                events.append(OpEvent(start, end, o.name, direction,
                                      region=f"{direction} bulk {bulks[direction]}"))
                bulks[direction] += 1
            else:
                events.append(OpEvent(start, end, o.name, _phase_of(o, windows)))
        return events, problem

    def _on_output_grad(self, _=None) -> None:
        self.on_output_grad()

    # -- the report's sentences -------------------------------------------------------------
    def _describe(self) -> List[str]:
        notes = [
            "MXNet trace (mx.profiler, read after each step, track trace:mxnet): an op's time "
            "is when MXNet's engine ran it. Per-layer ranges exist for a hybridized network "
            "only: MXNet names its events by op type, so each event is mapped to a graph node "
            "by position, in the order the network's CachedOp runs its nodes (probed once per "
            "graph and input shape on copies of the parameters), and only in a step whose "
            "sequence of events of the layers' op types matches that order exactly; other "
            "steps get no layer range (step_problems says why).",
            "A layer's range covers its own operators only (convolution, batch norm, dense, "
            "and their backward operators); operators of no layer (activations, residual "
            "additions, gradient sums, pooling means, the loss, the optimizer's update) are "
            "in no layer, unlike the hook instrument's ranges, which run to the next layer. "
            "A layer whose ops MXNet runs in one ImperativeBulk with another layer's gets a "
            "region (a 'mark' range) instead.",
            "Imperative (eager) networks get no layer range from the trace: their events carry "
            "no node name and no graph orders them; their layers' call order is not their "
            "registration order (a shortcut is called before, and registered after, its "
            "block's convolutions).",
            "MXNet's profiler records every operator of the process: only those that ran in "
            "the step's window are the step's, and other MXNet work running inside it "
            "(another model, MXNet operators in the data pipeline) breaks the match: that "
            "step then gets phases only.",
            "Clock: MXNet stamps events in whole microseconds; markers bracketed by "
            "perf_counter_ns align them each step, within clock_error_ns (a few us).",
            "The loss backward ends where the model output's gradient arrives: an identity "
            "marker on the output (as the hook instrument's) reports it.",
            "MXNet has no way to read its profiler's configuration: remove() stops the "
            "profiler, discards what it holds and deletes the trace file, but cannot put back "
            "a configuration someone set before (a later mx.profiler.set_config sets all of "
            "it); do not run mx.profiler yourself while this instrument is installed.",
        ]
        if self.ambiguous_prefixes:
            notes.append(f"No layer range for layers without a Gluon prefix of their own: "
                         f"{', '.join(self.ambiguous_prefixes)}.")
        return notes


def _mismatch(got: List[str], expected: List[str]) -> str:
    """Where a step's event names leave the plan's, in words."""
    for k, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            return (f"event {k} of the layers' op types is {g!r}, the graph's plan expects "
                    f"{e!r} ({len(got)} such events, {len(expected)} expected)")
    return f"{len(got)} events of the layers' op types, the graph's plan expects {len(expected)}"


def _direction_windows(ops: List[TraceOp], assigned: Dict[int, PlannedOp]
                       ) -> Dict[str, Tuple[int, int]]:
    """(first start, last end) in us of the mapped forward and backward ops."""
    windows: Dict[str, Tuple[int, int]] = {}
    for i, p in assigned.items():
        s, e = windows.get(p.direction, (ops[i].start_us, ops[i].end_us))
        windows[p.direction] = (min(s, ops[i].start_us), max(e, ops[i].end_us))
    return windows


def _phase_of(op: TraceOp, windows: Dict[str, Tuple[int, int]]) -> Optional[str]:
    """The phase of an op of no layer, from its name and, with a mapped step, from where it
    ran: inside the network's forward or backward ops, or outside them (the loss)."""
    if _is_optimizer(op.name):
        return "optimizer"
    for direction in ("forward", "backward"):
        s, e = windows.get(direction, (None, None))
        if s is not None and s <= op.start_us and op.end_us <= e:
            return direction
    if not windows:      # nothing mapped: the network's and the loss's ops are not told apart
        return "backward" if _is_backward(op.name) else "forward"
    backwardish = _is_backward(op.name) or "CustomFunction" in op.name
    return "loss_backward" if backwardish else "loss_forward"
