"""TensorFlow/Keras instrumentation: each named Keras layer's ``call`` wrapped (on the instance,
undone by ``remove``) with identity markers whose gradients mark the layer's backward
boundaries on the eager GradientTape. A marker is an Identity op recorded on the tape with a
backward function of ours, as ``tf.custom_gradient`` records one (that public path is the
fallback; it costs ~0.5 ms of Python per marker, see ``_marker``).

What the numbers mean here:

- forward: host time around the layer's ``call`` (inside Keras' ``Layer.__call__``, so Keras'
  own per-call bookkeeping, e.g. argument checks and name scopes, counts to the forward phase,
  not to the layer). Eager ops on the CPU run synchronously, so this is compute time.
- backward: from the moment the tape computes the gradient of the layer's output marker (the
  gradient reached the layer) to the moment it computes the gradient of its input marker
  (the layer's ops, weight gradients included, are done). The first layer's input (the image
  batch) is not watched by the tape, so it has no input marker: its backward ends when
  ``tape.gradient`` returns (``finish_backward``), which is where TensorFlow finishes anyway,
  since the first layer is the last whose gradient it computes.

Order: TensorFlow's tape runs ready gradient ops first-in-first-out, so two branches (a
residual block's conv2 and its shortcut) would run interleaved, one layer's range holding the
other's work. Each input marker therefore also takes the previously called layer's output as
an input it passes no gradient to: that layer's backward cannot start before this one's has
ended, so layers run their backward one at a time, in reverse call order, and ranges nest.
The work is the same; only the order in which TensorFlow runs independent branches changes.

The markers are identities: forward outputs are unchanged bit for bit, and gradients are
passed through unchanged. Where a layer's input feeds several ops inside the layer (batch
norm), TensorFlow adds those ops' gradients at the marker before adding the gradients from
outside the layer, a different order of float additions than without the marker (results
differ in the last bits).

Inside ``tf.function`` (graph building) the wrapper calls the layer unchanged: gradient
functions run when the graph is built, not when it runs, so markers could not time anything.

GPU (unverified): eager GPU ops return once queued, so the driver waits at phase boundaries
(``phase_sync``) and the device clock synchronises at every layer boundary (TensorFlow has no
public GPU event API): device ranges say when the queued work finished.

This module must not change what a layer computes; it knows layers, not workloads' models.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, List, Optional, Sequence

import tensorflow as tf

import ops.tensorflow as ops_tf

from .base import InstrumentBase

try:
    # What tf.custom_gradient does inside, without its ~0.5 ms of Python per call (argument
    # inspection, nest packing), which at two markers per layer would be most of the
    # instrumentation's cost: an Identity op recorded on the tape with our backward function.
    # TensorFlow offers both calls only privately; should_record_backprop (whether any active
    # tape watches a tensor) has no public equivalent at all.
    from tensorflow.python.eager.record import record_operation as _record_operation
    from tensorflow.python.eager.record import should_record_backprop as _watched
except ImportError:                               # pragma: no cover - other TF versions
    _record_operation = None

    def _watched(tensors) -> bool:
        """Unknown: assume watched. A marker on an unwatched tensor is simply not recorded;
        only a tie (see the module docstring) would then make the tape compute the gradient
        of a later layer's unwatched input, which it would otherwise skip."""
        return True


def _marker(tensors: Sequence[tf.Tensor], ties: Sequence[tf.Tensor],
            on_gradient: Callable[[], None]) -> List[tf.Tensor]:
    """Identities of ``tensors``; when the tape computes their gradient it calls
    ``on_gradient`` and passes the gradients on unchanged. ``ties`` are recorded as further
    inputs that get no gradient: they only order the tape's work."""
    if _record_operation is None or not USE_RECORD_OPERATION:
        return _custom_gradient_marker(tensors, ties, on_gradient)
    outputs = tf.identity_n(list(tensors))
    n_ties = len(ties)

    def backward(*grads):
        on_gradient()
        return list(grads) + [None] * n_ties
    _record_operation("DeepprofLayerMarker", outputs, list(tensors) + list(ties), backward)
    return outputs


def _custom_gradient_marker(tensors, ties, on_gradient):
    """_marker through the public tf.custom_gradient (slower; the same tape op)."""
    n = len(tensors)

    @tf.custom_gradient
    def marker(*xs):
        def grad(*grads):
            on_gradient()
            return list(grads) + [None] * (len(xs) - n)
        return list(xs[:n]), grad
    return marker(*tensors, *ties)


# Tests switch this off to check the tf.custom_gradient path gives the same ranges.
USE_RECORD_OPERATION = True


class SyncedDeviceClock:
    """recorder.DeviceClock for TensorFlow's GPU (unverified: no GPU where this was written).

    TensorFlow offers no public event API on its GPU stream, so ``mark`` waits for every
    device to finish the work queued so far and takes the host clock: device ranges are then
    when the work finished, at the cost of a synchronisation at every boundary."""

    def mark(self) -> int:
        tf.test.experimental.sync_devices()
        return time.perf_counter_ns()

    def elapsed_ms(self, start: int, end: int) -> float:
        return (end - start) / 1e6

    def synchronize(self) -> None:
        tf.test.experimental.sync_devices()


class _BackwardRange:
    """One layer call's backward range: begun by its output marker's gradient, ended by its
    input marker's (or by finish_backward)."""

    __slots__ = ("token",)

    def __init__(self):
        self.token = None


class Instrument(InstrumentBase):
    """Layer ranges for a TensorFlow/Keras workload (see the module docstring); the contract
    is profiler.instrument.base's."""

    def __init__(self, workload, recorder):
        super().__init__(workload, recorder)
        self._wrapped = {}             # id(layer) -> layer, whose instance ``call`` is ours
        self._open_backward: List[_BackwardRange] = []   # begun, not yet ended, in order
        self._last_output: Optional[tf.Tensor] = None    # previous layer call's marked output
        self._on_gpu = getattr(workload, "device", "cpu") == "cuda"
        # GPU eager ops return once queued: phases must wait for the device to mean compute.
        self.phase_sync = self._on_gpu
        self.notes = [
            "TensorFlow/Keras (eager, GradientTape): layer forward = host time around the "
            "layer's call (Keras' own per-call bookkeeping outside it); layer backward = from "
            "the tape reaching the layer's output marker to its reaching the layer's input "
            "marker (identity ops on the tape), weight gradients included.",
            "The first layer's input is not watched by the tape, so its backward ends when "
            "tape.gradient returns: it is the last layer TensorFlow differentiates, and the "
            "tape's own wrap-up after it (collecting the variables' gradients) counts to it.",
            "TensorFlow runs ready gradient ops first-in-first-out, interleaving parallel "
            "branches (a block's conv2 and shortcut); the markers make layers run their "
            "backward one at a time in reverse call order, so each range holds one layer's "
            "work. The work is the same, its order across branches differs from an "
            "uninstrumented step.",
        ]
        self.notes.append(ops_tf.conv_layout_note())
        if getattr(workload, "layout_note", None):
            self.notes.append(workload.layout_note)
        if self._on_gpu:
            self.notes.append("GPU (unverified): TensorFlow has no public GPU event API, so "
                              "the device clock synchronises at every boundary: device ranges "
                              "are when queued work finished; host ranges when it was issued.")

    def device_clock(self) -> Optional[SyncedDeviceClock]:
        """A synchronising clock on the GPU (see SyncedDeviceClock), None on the CPU."""
        return SyncedDeviceClock() if self._on_gpu else None

    # -- install / remove --------------------------------------------------------------------
    def install(self) -> None:
        """Wraps every named layer's ``call`` (once: a second install does nothing)."""
        if self._wrapped:
            return
        for name, layer in self.layers:
            if id(layer) in self._wrapped:
                continue
            # The instance attribute shadows the class's call; Keras' __call__ looks ``call``
            # up on every call. object.__setattr__: Keras' attribute tracking has no business
            # with a function.
            object.__setattr__(layer, "call", self._wrap(name, layer, layer.call))
            self._wrapped[id(layer)] = layer

    def remove(self) -> None:
        """Gives every layer its class's ``call`` back and forgets the step's state."""
        for layer in self._wrapped.values():
            if "call" in vars(layer):
                object.__delattr__(layer, "call")   # back to the class's call: no trace left
        self._wrapped.clear()
        self._open_backward.clear()
        self._last_output = None

    # -- output ------------------------------------------------------------------------------
    def mark_output(self, output):
        """``output`` through a marker whose gradient calls ``on_output_grad`` (``output``
        itself where no tape watches it, or while a graph is traced)."""
        # A forward ends here: the next forward's first layer has nothing to be tied to, and
        # ranges a failed backward left open are dropped.
        self._last_output = None
        self._open_backward.clear()
        if not tf.executing_eagerly() or not isinstance(output, tf.Tensor) \
                or not _watched([output]):
            return output
        # Looked up when the gradient arrives: the driver sets on_output_grad after install.
        (marked,) = _marker([output], (), lambda: self.on_output_grad())
        return marked

    def finish_backward(self) -> None:
        """Ends the backward ranges no input marker ended (the first layer's), innermost
        first: tape.gradient has returned, so their work is done."""
        while self._open_backward:
            self.recorder.end(self._open_backward.pop().token)

    # -- the wrapper -------------------------------------------------------------------------
    def _wrap(self, name, layer, call):
        kind = type(layer).__name__
        recorder = self.recorder

        @functools.wraps(call)
        def instrumented_call(*args, **kwargs):
            if not tf.executing_eagerly():          # tracing a graph: see the module docstring
                return call(*args, **kwargs)
            backward = _BackwardRange()
            args, kwargs = self._mark_inputs(backward, args, kwargs)
            token = recorder.begin(name, "layer", direction="forward", layer_type=kind)
            try:
                outputs = call(*args, **kwargs)
            finally:
                recorder.end(token)
            return self._mark_outputs(name, kind, backward, outputs)
        return instrumented_call

    def _mark_inputs(self, backward, args, kwargs):
        """The layer's first argument through an identity whose gradient ends the layer's
        backward, tied to the previous layer call's output (see the module docstring)."""
        if args:
            inputs = args[0]
        elif "inputs" in kwargs:
            inputs = kwargs["inputs"]
        else:
            return args, kwargs
        flat, indices = _watched_float_tensors(inputs)
        if not indices:
            return args, kwargs
        tensors = [flat[i] for i in indices]
        after = self._last_output
        ties = () if after is None or any(after is t for t in tensors) else (after,)
        recorder, open_backward = self.recorder, self._open_backward

        def end_backward():
            if backward in open_backward:
                open_backward.remove(backward)
                recorder.end(backward.token)

        inputs = _replace(inputs, flat, indices, _marker(tensors, ties, end_backward))
        if args:
            return (inputs,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, inputs=inputs)

    def _mark_outputs(self, name, kind, backward, outputs):
        """The layer's outputs through an identity whose gradient begins its backward."""
        flat, indices = _watched_float_tensors(outputs)
        if not indices:
            return outputs
        recorder, open_backward = self.recorder, self._open_backward

        def begin_backward():
            backward.token = recorder.begin(name, "layer", direction="backward",
                                            layer_type=kind)
            open_backward.append(backward)

        marked = _marker([flat[i] for i in indices], (), begin_backward)
        self._last_output = marked[-1]
        return _replace(outputs, flat, indices, marked)


def _watched_float_tensors(structure):
    """(the structure's leaves, the indices of float tensors a tape watches)."""
    flat = [structure] if isinstance(structure, tf.Tensor) else tf.nest.flatten(structure)
    return flat, [i for i, t in enumerate(flat)
                  if isinstance(t, tf.Tensor) and t.dtype.is_floating and _watched([t])]


def _replace(structure, flat, indices, marked):
    """``structure`` with its leaves at ``indices`` replaced by ``marked``."""
    if isinstance(structure, tf.Tensor):
        return marked[0]
    flat = list(flat)
    for i, t in zip(indices, marked):
        flat[i] = t
    return tf.nest.pack_sequence_as(structure, flat)
