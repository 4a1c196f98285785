"""MXNet/Gluon instrumentation: layer ranges timed where MXNet's engine runs the work.

MXNet queues every operator on its engine and returns at once; the engine's threads run them
in dependency order. Host times around a Gluon block's forward are therefore enqueue times (a
fraction of the work). Every layer range here is read by an engine thread as the work
completes, on the ``host:mxnet-engine`` track (host clock):

Forward: a forward pre-hook on each layer queues an engine operation that only reads the
clock. It declares a *write* of the layer's input (nothing is written: the engine merely runs
it after the input is complete and before the layer's operators, which read the input) and of
a private one-element clock array (operations on one array run in queue order, so boundaries
come in program order); a forward post-hook queues an operation reading the layer's output
and writing the clock array (so the next boundary also waits for this layer's operators,
whichever arrays they touch); a post-hook on the network queues the last boundary. Layer k's
forward range runs from its boundary to the next: its operators plus the parameter-free
operators after it up to the next layer (activation, pooling, addition, dropout).

Backward: Gluon has no backward hook, and MXNet queues the whole backward pass inside one
``backward()`` call. ``mark_output`` puts an identity marker on the model output (a view of the
same memory, recorded on the autograd tape with ``MXCustomFunctionRecord``); its backward runs
on a custom-op thread once the loss backward is done, calls ``on_output_grad`` and then holds
the backward pass (everything after depends on it) until ``backward()`` has returned (the
instrument wraps ``NDArray.backward`` while installed) and queued, for every layer that ran, an
engine operation declaring a write of the layer's first trainable parameter (a weight, batch
norm's gamma). The engine runs it as soon as the layer's backward operator, the last to read
that parameter, is done (that operator computes all the layer's gradients), and before the
next backward operator: completing an operator, the engine first hands on the arrays it read,
then those it wrote. A first layer, whose input needs no gradient, is covered like any other.
Layer k's backward range runs from the previous such moment (the output's gradient, or
another layer's) to its own: its backward operators plus those of the parameter-free
operators after it in forward order, and sums of gradients of arrays used twice. The ranges
tile the backward phase, so they nest by construction. The hold costs the overlap of MXNet's
queueing of the backward pass with its first operators (the rest of the ``backward()`` call);
without it a boundary queued after its layer was done would read the clock late.

Why no markers on each layer's output and input, the PyTorch instrument's shape? In MXNet 1.9's
CPU build a custom function (or CustomOp) given an array still in oneDNN's blocked layout (what
its convolution, batch norm and activation gradients are) is handed a temporary plain copy that
is freed before its Python code runs: the gradients came out as garbage. Guarding each marker
with an out-of-place copy (``ops.mxnet.loader.custom_op``) costs two to three passes over every
activation, measured here at 10-20% of a ResNet-20 step. The output marker is read through a
recorded slice, whose backward is no oneDNN operator, so it gets a plain gradient.

Engine marks: the boundary operations run no Python; each is a C mark (csrc/engine_marks.cpp)
that stores its slot and the clock reading, read back once the engine has run the pass
(finish_backward). How this module talks to MXNet's engine and to those marks (its C
interfaces, the slots, the output marker's callbacks) and why the marks are C is
profiler/instrument/mxnet_engine.py; which ranges a layer gets, and when, is here.

Backward bulking: by default (``MXNET_EXEC_BULK_EXEC_TRAIN=1``) MXNet runs up to 15
(``MXNET_EXEC_BULK_EXEC_MAX_NODE_TRAIN_BWD``) backward operators as one engine operation, and
the weight gradients of one bulk all appear when it ends: backward ranges then resolve bulks,
not layers. MXNet reads the variable once, when it runs its first operator. Importing this
module sets it to 0 unless it is set (a side effect on the process, meant for profiling runs:
import it before building the workload); ``backward_is_bulked`` (from mxnet_engine, importable
from here) measures which mode MXNet is really in, and ``notes`` carry a warning when it is the
bulked one.

NVTX (started and ended by the C marks, so only where the recorder emits through the NVTX C
API): forward ranges are mirrored exactly. Which layer a backward range belongs to is known only
when it ends, but NVTX names a range when it starts: the backward NVTX ranges are named in the
order the previous pass reached the layers (reverse forward order on the first pass); the
timeline names the layer observed.

GPU (not run here): the boundaries run on CPU engine threads; MXNet 1.x completes a GPU
operator once its stream has finished, so engine times are GPU execution times; MXNet does not
expose its streams to Python, so there is no device clock (``device_clock()`` is None).

A user's own Gluon model and loop (profiler.api): ``UserModel``, ``PhaseEvents`` (the backward
and Trainer calls as phase boundaries) and ``training_step`` (Gluon's loop), at the end.

This module must not change what the network computes: the output marker is an identity
(outputs and gradients bit-identical, tests/test_instrument_mxnet.py), the boundaries write
nothing, and ``remove()`` leaves no hook behind.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import mxnet as mx
from mxnet import autograd
from mxnet.ndarray import NDArray

from ops import _C
from profiler import recorder as recorder_module

from .base import InstrumentBase

# MXNet reads its bulking setting once, when it runs its first operator (importing it runs
# none): a process that imports this module before building its workload profiles unbulked
# backward passes (see "Backward bulking" above) unless the environment says otherwise.
os.environ.setdefault("MXNET_EXEC_BULK_EXEC_TRAIN", "0")

# After the setting: the engine plumbing's import (its ctypes callbacks, ops._C's mark
# callback) runs no MXNet operator, but importing it second keeps the setting first.
from .mxnet_engine import (  # noqa: E402
    NEXT_EVENT, NO_EVENT, backward_is_bulked, collect_marks, mark, mark_slot, marker_callbacks,
    new_slot, push_mark, register_nvtx_event)

ENGINE_TRACK = "host:mxnet-engine"
_OUTPUT = "<model output>"  # the backward boundary before the first layer's backward
# How long the output marker holds the backward pass for the layer boundaries to be queued.
# Far longer than any backward() call; reached only if the pass was started by something other
# than NDArray.backward that then waits for the engine before finish_backward (the hold is then
# dropped for good, see _on_output_grad).
HOLD_TIMEOUT_S = 5.0


def _layer_nvtx_events(layers) -> Dict[Tuple[str, str], int]:
    """(layer, direction) -> NVTX event of its range, for the C marks to start; empty (engine
    ranges without NVTX) unless the recorder emits through the NVTX C API, whose events those
    are (not with the nvtx package's fallback, nor a test's recording double)."""
    if getattr(recorder_module.NVTX, "backend", None) != "c-api":
        return {}
    events = {}
    for name, _ in layers:
        for direction in ("forward", "backward"):
            events[(name, direction)] = register_nvtx_event(
                f"{name} ({direction})", recorder_module.LAYER_COLOURS[direction])
    return events


# The instruments whose pass is between forward and backward. NDArray.backward is wrapped while
# one is installed: MXNet queues the whole backward pass inside that one call, and only once it
# returns may the layer boundaries be queued behind it (see Instrument._queue_backward).
_INSTALLED: "weakref.WeakSet[Instrument]" = weakref.WeakSet()
# The PhaseEvents installed: told of the same call's start and end. One wrapper serves both, so
# that installing and removing them in any order restores NDArray.backward exactly, and so that
# the layer boundaries are queued before the backward's end is reported (whose handler waits for
# the engine: the other way round, the held backward pass would wait for HOLD_TIMEOUT_S).
_EVENTS: "weakref.WeakSet[PhaseEvents]" = weakref.WeakSet()
_NDARRAY_BACKWARD = NDArray.backward


@functools.wraps(_NDARRAY_BACKWARD)
def _backward_then_queue_boundaries(self, *args, **kwargs):
    events = list(_EVENTS)
    for listener in events:
        listener.on_event("backward_start")
    try:
        return _NDARRAY_BACKWARD(self, *args, **kwargs)
    finally:
        for instrument in list(_INSTALLED):
            instrument._queue_backward()
        for listener in events:
            listener.on_event("backward_end")


def _wrap_ndarray_backward() -> None:
    """NDArray.backward is wrapped while an Instrument or a PhaseEvents is installed, else
    MXNet's own."""
    NDArray.backward = (_backward_then_queue_boundaries if (_INSTALLED or _EVENTS)
                        else _NDARRAY_BACKWARD)


def _arrays(values) -> List[NDArray]:
    """The NDArrays among ``values`` (a block's args or output), each once: the engine refuses
    an operation listing one array twice."""
    if isinstance(values, NDArray):
        values = (values,)
    found: Dict[int, NDArray] = {}
    for v in values if isinstance(values, (tuple, list)) else ():
        if isinstance(v, NDArray):
            found.setdefault(v.handle.value, v)
    return list(found.values())


def _first_trainable(block):
    """The block's first trainable Parameter (a conv's or dense layer's weight, batch norm's
    gamma), which its backward operator reads; None if it has none."""
    return next((p for p in block._reg_params.values() if p.grad_req != "null"), None)


class Instrument(InstrumentBase):
    """Layer ranges for an imperative (not hybridized) Gluon network: see the module
    docstring for what each range covers."""

    phase_sync = True  # MXNet returns before its work has run: phases need the engine drained

    def __init__(self, workload, recorder):
        super().__init__(workload, recorder)
        self._clock = mx.nd.zeros((1,), ctx=mx.cpu())  # orders the forward boundaries
        self._hooks: list = []
        self._kinds = [type(block).__name__ for _, block in self.layers]
        self._watched = [_first_trainable(block) for _, block in self.layers]
        # The boundaries are C marks (see "Engine marks" in mxnet_engine); each slot says
        # which NVTX range its mark starts on its track.
        self._nvtx_events = _layer_nvtx_events(self.layers)
        self._forward_track, self._backward_track = _C.engine_mark_track(), _C.engine_mark_track()
        self._start_slots = [
            mark_slot(self, "_on_layer_start", k, self._forward_track,
                      self._nvtx_events.get((name, "forward"), NO_EVENT))
            for k, (name, _) in enumerate(self.layers)]
        self._end_slot = mark_slot(self, "_on_network_end", None, self._forward_track,
                                   NO_EVENT)
        self._gradient_slots = [mark_slot(self, "_on_weight_grad", k, self._backward_track,
                                          NEXT_EVENT) for k in range(len(self.layers))]
        self._output_slot = mark_slot(self, "_on_output_mark", None, self._backward_track,
                                      NEXT_EVENT)
        self._output_marker = marker_callbacks(new_slot(self, "_on_output_grad"))
        self._ran: set = set()                     # layers whose forward ran since a backward
        self._hold = threading.Event()             # set: the backward pass may go on
        self._hold_dropped = False
        # Main thread only: marks are read after the engine has run them (collect_marks).
        self._forward_open: Optional[Tuple[int, int]] = None   # (layer, start ns)
        self._backward_from: Optional[int] = None  # ns of the last boundary, None: no pass
        self._backward_after = _OUTPUT             # which boundary that was
        self._next_after: Dict[str, str] = {}     # boundary -> layer seen next (NVTX names)
        self._backward_order = [name for (name, _), p in zip(self.layers, self._watched)
                                if p is not None][::-1]
        # The NVTX ranges the engine marks of the last pass started (their messages).
        self.engine_nvtx_ranges: List[str] = []
        self.notes = self._describe()

    # -- the driver's interface -------------------------------------------------------------
    def install(self) -> None:
        if self._hooks:
            return
        hybridized = [name for name, block in self.layers if getattr(block, "_active", False)]
        if getattr(self.workload.net, "_active", False) or hybridized:
            raise ValueError(f"profiler.instrument.mxnet: the network runs hybridized "
                             f"({hybridized[:3] or 'the whole network'}); Gluon calls no "
                             f"per-block hook inside a cached graph: profile it imperatively")
        for k, (name, block) in enumerate(self.layers):
            self._hooks.append(block.register_forward_pre_hook(
                functools.partial(self._layer_start, k)))
            self._hooks.append(block.register_forward_hook(self._layer_end))
        self._hooks.append(self.workload.net.register_forward_hook(self._network_end))
        _INSTALLED.add(self)
        _wrap_ndarray_backward()

    def remove(self) -> None:
        for handle in self._hooks:
            handle.detach()
        self._hooks.clear()
        _INSTALLED.discard(self)
        _wrap_ndarray_backward()
        self._ran.clear()
        self._hold.set()  # never leave a backward pass held

    def mark_output(self, output):
        if not (self._hooks and isinstance(output, NDArray) and output.ndim
                and autograd.is_recording()):
            return output
        if not self._hold_dropped:
            self._hold.clear()
        if self._nvtx_events:
            _C.engine_mark_sequence(self._backward_track, [
                self._nvtx_events[(name, "backward")] for name in self._predicted_backward()])
        marked = mark(output, self._output_marker)
        # A recorded slice (a view in the forward): its backward, not a oneDNN operator, hands
        # the marker a gradient in the plain layout (module docstring).
        return marked[0:marked.shape[0]]

    def finish_backward(self) -> None:
        """Waits for the engine, closes the pass (an NVTX range opened for a layer that did not
        come is ended) and records the pass's ranges from its marks. The boundaries were
        queued when NDArray.backward returned (before anything a workload's backward() does
        after it); after mx.autograd.backward they are queued now."""
        self._queue_backward()
        mx.nd.waitall()
        _C.engine_mark_end(self._forward_track)   # a pass whose network end did not come
        _C.engine_mark_end(self._backward_track)
        self.engine_nvtx_ranges = collect_marks()
        self._backward_from = None

    def _queue_backward(self) -> None:
        """Right after MXNet has queued the backward pass (main thread): queues each layer's
        weight-gradient boundary, then lets the held pass go on."""
        for k in sorted(self._ran):
            param, block = self._watched[k], self.layers[k][1]
            if param is None or not self.recorder.enabled:
                continue
            if getattr(block, "impl", None) == "kernel":
                # ops.mxnet's kernel impl is a Python Function that reads the weight outside
                # the engine: wait for the gradient it writes instead (the engine then runs
                # this after the next backward operator, which it hands that gradient first).
                push_mark(self._gradient_slots[k], param.list_grad(), ())
            else:
                push_mark(self._gradient_slots[k], (), param.list_data())
        self._ran.clear()
        self._hold.set()

    # -- forward: hooks on the main thread queue boundaries ---------------------------------
    def _recording(self) -> bool:
        return self.recorder.enabled and autograd.is_recording()

    def _layer_start(self, k, block, args) -> None:
        if self._recording():
            self._ran.add(k)
            push_mark(self._start_slots[k], (), _arrays(args) + [self._clock])

    def _layer_end(self, block, args, output) -> None:
        if self._recording():
            push_mark(0, _arrays(output), [self._clock])  # ordering only (slot 0: none)

    def _network_end(self, block, args, output) -> None:
        if self._recording():
            push_mark(self._end_slot, _arrays(output), [self._clock])

    # -- the marks, read on the main thread after the engine ran them (collect_marks) -------
    # One clock reading ends a range and starts the next, so the ranges tile the pass.
    def _on_layer_start(self, k: int, now: int) -> None:
        self._end_forward(now)
        self._forward_open = (k, now)

    def _on_network_end(self, _, now: int) -> None:
        self._end_forward(now)

    def _end_forward(self, now: int) -> None:
        if self._forward_open is not None:
            k, start = self._forward_open
            self._forward_open = None
            self._record(k, "forward", start, now)

    def _on_output_mark(self, _, now: int) -> None:
        self._backward_from = now
        self._backward_after = _OUTPUT

    def _on_weight_grad(self, k: int, now: int) -> None:
        if self._backward_from is not None:
            name = self.layers[k][0]
            self._record(k, "backward", self._backward_from, now)
            self._next_after[self._backward_after] = name
            self._backward_after = name
            self._backward_from = now

    # -- backward: the output marker (custom-op thread) --------------------------------------
    def _on_output_grad(self, _=None) -> None:
        self.on_output_grad()  # first: the loss backward ends before the first layer's starts
        _C.engine_mark(self._output_slot)
        if not self._hold.wait(HOLD_TIMEOUT_S):
            # Nothing queued the boundaries (see HOLD_TIMEOUT_S): stop holding, for good; a
            # boundary queued after its layer is done then reads the clock late.
            self._hold_dropped = True
            self._hold.set()
            warnings.warn(f"profiler.instrument.mxnet: finish_backward did not come within "
                          f"{HOLD_TIMEOUT_S} s of the output gradient; no longer holding the "
                          f"backward pass, so early weight-gradient boundaries may read late")

    def _predicted_backward(self) -> List[str]:
        """The layers in the order the backward pass is expected to reach them (NVTX names a
        range when it starts): the previous pass's order, then the rest in reverse forward
        order."""
        order, after = [], _OUTPUT
        while self._next_after.get(after) not in (None, *order):
            after = self._next_after[after]
            order.append(after)
        return order + [name for name in self._backward_order if name not in order]

    # -- the recorder ------------------------------------------------------------------------
    def _record(self, k: int, direction: str, start_ns: int, end_ns: int) -> None:
        self.recorder.record(self.layers[k][0], "layer", start_ns, end_ns, track=ENGINE_TRACK,
                             direction=direction, layer_type=self._kinds[k])

    # -- the report's sentences -------------------------------------------------------------
    def _describe(self) -> List[str]:
        notes = [
            "MXNet (imperative Gluon): layer times are when MXNet's engine ran the work (track "
            "host:mxnet-engine), not when Python queued it. Forward: from the engine reaching "
            "the layer (its input complete, the previous layer done) to it reaching the next "
            "layer: the layer's operators plus the parameter-free ones after it (activation, "
            "pooling, addition, dropout); they add up to the forward phase less the wait for "
            "the first operator. Backward: from the previous layer's weight gradient (for the "
            "first, the model output's gradient) to the engine releasing this layer's weight "
            "after its backward operator: its backward operators plus those of the "
            "parameter-free operators after it and sums of gradients; they add up to the "
            "backward phase.",
            "Phases are execution times: the driver waits for MXNet's engine (mx.nd.waitall) "
            "at every phase boundary; uninstrumented steps do not, and overlap Python's "
            "queueing with the engine's work across those boundaries. The backward phase also "
            "holds MXNet's backward work until backward() has queued all of it (the layer "
            "boundaries must be queued first), losing that overlap too.",
            "NVTX: backward layer ranges are named when they start, for the layer expected "
            "next (the previous pass's order); the timeline names the layer observed.",
        ]
        if not self._nvtx_events:
            notes.append("No NVTX ranges for the layers: the engine's C marks emit them through "
                         "the NVTX C API, and this run's recorder does not use it "
                         f"({getattr(recorder_module.NVTX, 'note', '') or 'another emitter'}).")
        if backward_is_bulked():
            notes.append(
                "WARNING: this MXNet runs its backward operators in bulks (up to 15 per engine "
                "operation, MXNET_EXEC_BULK_EXEC_TRAIN=1): the weight gradients of one bulk "
                "appear together, so backward layer times are per bulk, not per layer. Set "
                "MXNET_EXEC_BULK_EXEC_TRAIN=0 before MXNet runs its first operator.")
        else:
            notes.append("MXNet's backward bulking is off (MXNET_EXEC_BULK_EXEC_TRAIN=0, "
                         "checked) so that each backward operator, and layer boundary, runs "
                         "on its own; MXNet's default bulks up to 15 per engine operation.")
        if self.workload.ctx.device_type == "gpu":
            notes.append("GPU (unverified): MXNet completes a GPU operator after its stream "
                         "has finished, so engine times are GPU execution times; MXNet does "
                         "not expose its streams, so there is no separate device track.")
        missing = [name for (name, _), p in zip(self.layers, self._watched) if p is None]
        if missing:
            notes.append(f"No backward range for layers without a trainable parameter: "
                         f"{', '.join(missing)}.")
        return notes


# --------------------------------------------------------------------------- a user's model

def _named_blocks(block, name: str = ""):
    """(dotted attribute path, block) of ``block`` and every block under it, parents first,
    children in registration order: the seed workloads' layer names
    (profiler.workloads.mxnet.common.named_blocks) and PyTorch's named_modules. Gluon 1.x has
    no public accessor for a child's attribute name; ``_children`` maps it to the child."""
    yield name, block
    for child_name, child in block._children.items():
        yield from _named_blocks(child, f"{name}.{child_name}" if name else child_name)


def _model_context(model, function: str):
    """The one context ``model``'s parameters live on (cpu(0) for a model without any); a
    ValueError naming the model when they are not initialized or on several."""
    contexts = set()
    for param in model.collect_params().values():
        try:
            contexts.update(param.list_ctx())
        except RuntimeError:   # Gluon: "Parameter ... has not been initialized"
            raise ValueError(f"{function}: model: expected a model whose parameters are "
                             f"initialized, got {type(model).__name__} with {param.name} not "
                             f"initialized: call model.initialize(ctx=...) first") from None
    if len(contexts) > 1:
        raise ValueError(f"{function}: model: expected its parameters on one context, got "
                         f"{sorted(map(str, contexts))}: profile one device's replica")
    return contexts.pop() if contexts else mx.cpu(0)


def _resolve_context(device):
    """An MXNet context from the CLI's names ("cpu", "cuda", "cuda:N") or MXNet's ("gpu",
    "gpu:N", an mx.Context); a ValueError naming ``device`` otherwise."""
    if isinstance(device, mx.Context):
        return device
    kind, _, index = str(device).partition(":")
    if kind in ("cpu", "cuda", "gpu") and (index.isdigit() or not index):
        return mx.cpu(0) if kind == "cpu" else mx.gpu(int(index or 0))
    raise ValueError(f"profile_training: device: expected 'cpu', 'cuda[:N]', 'gpu[:N]' or an "
                     f"mx.Context, got {device!r}")


class UserModel:
    """What the Instrument needs of a workload, for a user's gluon.Block
    (profiler.api.LayerProfiler): its blocks with parameters of their own, named by their
    attribute paths ("features.0"), that ``keep(name, block)`` accepts. The model must run
    imperatively (not hybridized): Gluon calls no per-block hook inside a cached graph."""

    framework = "mxnet"

    def __init__(self, model, keep):
        if not isinstance(model, mx.gluon.Block):
            raise TypeError(f"LayerProfiler: model: expected a mxnet.gluon.Block (a Block or "
                            f"HybridBlock) for framework 'mxnet', got "
                            f"{type(model).__module__}.{type(model).__name__}")
        blocks = list(_named_blocks(model))
        hybridized = [name or "the model" for name, block in blocks
                      if getattr(block, "_active", False)]
        if hybridized:
            raise ValueError(f"LayerProfiler: model: expected an imperative (not hybridized) "
                             f"Gluon model, got {type(model).__name__} with {hybridized[:3]} "
                             f"hybridized (a cached graph calls no per-block hook): "
                             f"model.hybridize(active=False) while profiling")
        self.net = model
        self.ctx = _model_context(model, "LayerProfiler")
        with_params = [(name, block) for name, block in blocks if name and block._reg_params]
        missing = [n for n in getattr(keep, "names", ()) if n not in dict(blocks)]
        if missing:
            raise ValueError(f"LayerProfiler: layers: {missing} not in the "
                             f"{type(model).__name__}; its blocks with parameters of their own: "
                             f"{[n for n, _ in with_params][:20]}")
        self._layers = [(name, block) for name, block in with_params if keep(name, block)]
        if not self._layers:
            raise ValueError(f"LayerProfiler: layers: no layer of the {type(model).__name__} "
                             f"was selected; blocks with parameters of their own: "
                             f"{[n for n, _ in with_params][:20]}")

    def named_layers(self):
        return self._layers

    def synchronize(self) -> None:
        # MXNet queues every operator on its engine and returns: wait for all of them.
        mx.nd.waitall()

    def batch_size_of(self, output) -> int:
        value = output[0] if isinstance(output, (tuple, list)) and output else output
        shape = getattr(value, "shape", ())
        return int(shape[0]) if len(shape) else 1

    def version(self) -> str:
        return mx.__version__

    def device_kind(self) -> str:
        return "cuda" if self.ctx.device_type == "gpu" else "cpu"

    def device_name(self) -> str:
        if self.ctx.device_type == "gpu":
            return f"GPU {self.ctx.device_id} (MXNet names no device model)"
        import platform
        return platform.processor() or platform.machine()


def _classes_defining(base: type, name: str) -> List[type]:
    """``base`` and its subclasses (imported so far) whose own body defines ``name``."""
    found, seen, stack = [], set(), [base]
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if name in cls.__dict__:
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


# The calls PhaseEvents reports, wrapped once for all of them while any is installed (as
# NDArray.backward is, see _EVENTS): each installed PhaseEvents hears every call, and removing
# them in any order leaves MXNet's own functions in place.
_AUTOGRAD_BACKWARD = autograd.backward
_TRAINER_METHODS: List[Tuple[type, str, object]] = []   # (class, name, its own) while wrapped
_optimizer_depth = 0


@functools.wraps(_AUTOGRAD_BACKWARD)
def _autograd_backward_with_events(*args, **kwargs):
    events = list(_EVENTS)
    for listener in events:
        listener.on_event("backward_start")
    try:
        return _AUTOGRAD_BACKWARD(*args, **kwargs)
    finally:
        for listener in events:
            listener.on_event("backward_end")


def _trainer_call_with_events(own):
    # Only the outermost of nested calls counts: a subclass's step calling super().step, or a
    # step calling update.
    @functools.wraps(own)
    def call(trainer, *args, **kwargs):
        global _optimizer_depth
        _optimizer_depth += 1
        events = list(_EVENTS) if _optimizer_depth == 1 else []
        for listener in events:
            listener.on_event("optimizer_start")
        try:
            return own(trainer, *args, **kwargs)
        finally:
            _optimizer_depth -= 1
            for listener in events:
                listener.on_event("optimizer_end")
    return call


def _wrap_phase_calls() -> None:
    """The phase calls are wrapped while a PhaseEvents is installed, else MXNet's own."""
    global _optimizer_depth
    _wrap_ndarray_backward()
    if _EVENTS and not _TRAINER_METHODS:
        autograd.backward = _autograd_backward_with_events
        for method in ("step", "update"):
            for cls in _classes_defining(mx.gluon.Trainer, method):
                own = cls.__dict__[method]
                _TRAINER_METHODS.append((cls, method, own))
                setattr(cls, method, _trainer_call_with_events(own))
    elif not _EVENTS and _TRAINER_METHODS:
        autograd.backward = _AUTOGRAD_BACKWARD
        for cls, method, own in _TRAINER_METHODS:
            setattr(cls, method, own)
        _TRAINER_METHODS.clear()
        _optimizer_depth = 0


class PhaseEvents:
    """MXNet's own events at the step's phase boundaries, reported to ``on_event``: the
    backward call's start and end (NDArray.backward, through the wrapper the Instrument also
    uses, and mx.autograd.backward; neither calls the other in MXNet 1.9, so each call is one
    pair of events), and the optimizer step's start and end (gluon.Trainer.step and .update,
    and the same methods of every Trainer subclass defined before installing; the outermost of
    nested calls counts, e.g. a subclass's step calling super().step), all wrapped while
    installed: Gluon has no hooks of its own for either. The driver waits for MXNet's engine
    at each of these boundaries (Instrument.phase_sync), so each phase is the time its work
    ran."""

    def __init__(self, on_event):
        self.on_event = on_event
        self.notes = ["Phases: backward = NDArray.backward and mx.autograd.backward calls (and "
                      "until the engine has run the pass; mx.autograd.grad is not a phase "
                      "boundary); optimizer = gluon.Trainer.step/update calls (any Trainer "
                      "subclass) until the engine has run the update."]

    def install(self) -> None:
        _EVENTS.add(self)
        _wrap_phase_calls()

    def remove(self) -> None:
        _EVENTS.discard(self)
        _wrap_phase_calls()


def training_step(model, loss_fn, optimizer, device=None, mode="eager"):
    """The common loop's step for profiler.api.profile_training, Gluon's own loop:
    ``step(prof, (x, t))`` copies the batch to ``device`` (default: the model's context; it
    must be the model's), runs ``out = model(x); loss = loss_fn(out, t)`` under
    ``autograd.record()`` (the output marked inside it, so the loss phases split there),
    ``loss.backward()`` and ``trainer.step(batch_size)`` (Gluon's losses are per sample and
    backward sums them; the Trainer divides by the batch size); ``prof`` None runs it
    unprofiled. ``mode`` "graph": the model runs hybridized (``static_alloc``,
    ``static_shape``: hybridized here, on the caller's block, unless it already is)."""
    if not isinstance(model, mx.gluon.Block):
        raise TypeError(f"profile_training: model: expected a mxnet.gluon.Block, got "
                        f"{type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"profile_training: loss_fn: expected a callable (output, target) -> "
                        f"loss NDArray (e.g. gluon.loss.SoftmaxCrossEntropyLoss()), got "
                        f"{type(loss_fn).__name__}")
    if not isinstance(optimizer, mx.gluon.Trainer):
        raise TypeError(f"profile_training: optimizer: expected a mxnet.gluon.Trainer, got "
                        f"{type(optimizer).__name__}")
    # Gluon 1.x has no public accessor for a Trainer's parameters; _params is its list.
    ours = {id(p) for p in model.collect_params().values()}
    if not any(id(p) in ours for p in getattr(optimizer, "_params", ())):
        raise ValueError("profile_training: optimizer: expected a gluon.Trainer over the "
                         "model's parameters (gluon.Trainer(model.collect_params(), ...)), "
                         "got one holding none of them")
    if mode == "graph" and not getattr(model, "_active", False):
        if not isinstance(model, mx.gluon.HybridBlock):
            raise TypeError(f"profile_training: model: graph mode hybridizes the model; "
                            f"expected a mxnet.gluon.HybridBlock, got {type(model).__name__}")
        model.hybridize(static_alloc=True, static_shape=True)   # Gluon's compiled mode
    model_ctx = _model_context(model, "profile_training")
    ctx = model_ctx if device is None else _resolve_context(device)
    if ctx != model_ctx:
        raise ValueError(f"profile_training: device: {ctx} is not the model's context "
                         f"({model_ctx}); move the model first: "
                         f"model.collect_params().reset_ctx({ctx})")

    def to_context(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"profile_training: loader: expected batches (inputs, targets), "
                             f"got {type(batch).__name__}"
                             + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        # Worker batches arrive in cpu_shared memory: copied to the model's context too.
        return tuple(b if isinstance(b, NDArray) and b.context == ctx
                     else b.as_in_context(ctx) if isinstance(b, NDArray)
                     else mx.nd.array(b, ctx=ctx, dtype=getattr(b, "dtype", None))
                     for b in batch)

    def step(prof, batch):
        if prof is None:
            x, t = to_context(batch)
        else:
            with prof.phase("h2d"):
                x, t = to_context(batch)
        with autograd.record():
            out = model(x)
            if prof is not None:
                out = prof.mark_output(out)
            loss = loss_fn(out, t)
        if not isinstance(loss, NDArray):
            raise TypeError(f"profile_training: loss_fn: expected it to return an NDArray, "
                            f"got {type(loss).__name__}")
        loss.backward()
        optimizer.step(x.shape[0])
        return loss

    return step
