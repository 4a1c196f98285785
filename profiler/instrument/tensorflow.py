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

A user's own keras.Model (profiler.api) comes in through ``UserModel`` (its layers and names),
``PhaseEvents`` (tape.gradient and the Keras optimizer as phase boundaries) and
``training_step`` (Keras' custom-loop recipe), at the end of this module.

This module must not change what a layer computes; it knows layers, not workloads' models.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, List, Optional, Sequence

import keras
import tensorflow as tf

import ops.tensorflow as ops_tf
from profiler.workloads.spec import STEP_SCOPES

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


# --------------------------------------------------------------------------- a user's model

def _own_weights(layer, sublayers) -> list:
    """The layer's variables that none of its sublayers holds (Keras' ``weights`` lists a
    layer's own and its sublayers' together)."""
    held = {id(v) for sub in sublayers for v in sub.weights}
    return [v for v in layer.weights if id(v) not in held]


def _sublayers(layer) -> list:
    """The layer's direct sublayers, in Keras' tracking order (attribute assignment order in a
    subclassed model, topological order in a functional one). Keras 3 offers this only as
    ``_flatten_layers`` (``Model.layers`` is the same list, but a plain Layer has no public
    equivalent)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def keras_layer_paths(model) -> list:
    """(name, layer, own weights) of every layer below ``model``, depth first in tracking
    order. A name is the nesting of Keras layer names below the model joined by "/" (Keras'
    own separator, which layer names cannot contain), e.g. "block1/conv": Keras 3's
    ``layer.path`` without the model's own name (``path`` itself is not usable: a functional
    model's layers are built outside the model's name scope, so theirs lack that prefix, and an
    unbuilt layer has none). A layer reached twice (shared) is listed once, at its first path;
    two sibling layers with the same name (possible in a subclassed model) are told apart by
    "#2", "#3", ... on the later ones."""
    found, seen, taken = [], set(), set()

    def walk(layer, prefix):
        for sub in _sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            name = f"{prefix}{sub.name}"
            if name in taken:
                n = 2
                while f"{name}#{n}" in taken:
                    n += 1
                name = f"{name}#{n}"
            taken.add(name)
            children = _sublayers(sub)
            found.append((name, sub, _own_weights(sub, children)))
            walk(sub, name + "/")

    walk(model, "")
    return found


def _device_of(model) -> str:
    """"cuda" where the model's variables live on a GPU, else "cpu"."""
    weights = model.weights
    if not weights:
        return "cpu"
    # A Keras 3 variable holds the tf.Variable (which knows its device) as ``value``.
    placed = getattr(weights[0], "value", weights[0])
    return "cuda" if "GPU" in getattr(placed, "device", "").upper() else "cpu"


class UserModel:
    """What the Instrument needs of a workload, for a user's keras.Model
    (profiler.api.LayerProfiler): its layers with weights of their own (trainable or not),
    named by their nesting below the model (:func:`keras_layer_paths`: "block1/conv"), that
    ``keep(name, layer)`` accepts. The model itself is not a layer of the report (its range
    would be the whole forward), as in PyTorch.

    The model must be built (its layers make their weights at the first call): a Sequential or
    functional model with an Input is; a subclassed one after ``model(x)`` or
    ``model.build(input_shape)``. It runs as the user built it: the profiler changes no layout
    (channels_last stays channels_last) and no placement.

    Eager execution only: the instrument times layers and phases by running Python at their
    boundaries, which a ``tf.function`` runs once, when it is traced (see the module
    docstring). A step inside ``tf.function`` is refused where it shows (mark_output given a
    graph tensor) and noted in the report where it shows later (tape.gradient traced)."""

    framework = "tensorflow"

    def __init__(self, model, keep):
        if not isinstance(model, keras.Model):
            raise TypeError(f"LayerProfiler: model: expected a keras.Model (Keras "
                            f"{keras.__version__}) for framework 'tensorflow', got "
                            f"{type(model).__module__}.{type(model).__name__}")
        if not model.built:
            raise ValueError(f"LayerProfiler: model: the {type(model).__name__} is not built "
                             f"yet (Keras layers make their weights at the first call); call "
                             f"it once on a batch (model(x)) or model.build(input_shape) "
                             f"before profiling it")
        self.model = model
        self.device = _device_of(model)
        paths = keras_layer_paths(model)
        with_weights = [(name, layer) for name, layer, own in paths if own]
        known = {name for name, _, _ in paths}
        names = list(getattr(keep, "names", ()))
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"LayerProfiler: layers: {missing} not in the "
                             f"{type(model).__name__}; its layers with weights of their own: "
                             f"{[n for n, _ in with_weights][:20]}")
        weighted = {name for name, _ in with_weights}
        weightless = [n for n in names if n not in weighted]
        if weightless:
            raise ValueError(f"LayerProfiler: layers: {weightless} have no weights of their "
                             f"own (a container's time is its sublayers'); layers with weights "
                             f"of their own: {[n for n, _ in with_weights][:20]}")
        self._layers = [(name, layer) for name, layer in with_weights if keep(name, layer)]
        if not self._layers:
            raise ValueError(f"LayerProfiler: layers: no layer of the "
                             f"{type(model).__name__} was selected; layers with weights of "
                             f"their own: {[n for n, _ in with_weights][:20]}")
        formats = sorted({getattr(layer, "data_format", None) for _, layer in self._layers}
                         - {None})
        self.layout_note = (f"User model {type(model).__name__}: runs as built "
                            f"({', '.join(formats) or 'no layer with a data_format'}); the "
                            f"profiler transposes nothing.")

    def named_layers(self):
        return self._layers

    def synchronize(self) -> None:
        """Waits for queued work: GPU streams, or eager ops under asynchronous execution. On
        the CPU with synchronous eager execution (TensorFlow's default) every op has already
        run, and sync_devices would cost a millisecond a call for nothing."""
        if self.device == "cuda" or not tf.config.experimental.get_synchronous_execution():
            tf.test.experimental.sync_devices()

    def batch_size_of(self, output) -> int:
        """The first dimension of the output's first tensor (1 for a scalar); a graph tensor
        is an error: the step is being traced by tf.function, where nothing can be timed."""
        if not tf.executing_eagerly():
            raise RuntimeError("LayerProfiler.mark_output: the output is a graph tensor: the "
                               "step runs inside a tf.function, whose Python (and so the "
                               "profiler) runs once, when it is traced; run the step eagerly "
                               "(no @tf.function around it, or "
                               "tf.config.run_functions_eagerly(True))")
        flat = tf.nest.flatten(output)
        shape = getattr(flat[0], "shape", ()) if flat else ()
        return int(shape[0]) if len(shape) and shape[0] is not None else 1

    def version(self) -> str:
        return tf.__version__

    def device_kind(self) -> str:
        return self.device

    def device_name(self) -> str:
        if self.device == "cuda":
            gpus = tf.config.list_physical_devices("GPU")
            details = tf.config.experimental.get_device_details(gpus[0]) if gpus else {}
            return details.get("device_name", "GPU")
        import platform
        return platform.processor() or platform.machine()


class _Wrapped:
    """Class attributes replaced while PhaseEvents is installed, put back exactly."""

    def __init__(self):
        self.saved = []                  # (class, attribute name, the original from its dict)

    def replace(self, cls, name, make):
        original = vars(cls)[name]
        self.saved.append((cls, name, original))
        setattr(cls, name, make(original))

    def restore(self):
        for cls, name, original in reversed(self.saved):
            setattr(cls, name, original)
        self.saved.clear()


def _optimizer_classes():
    """Keras' optimizer base and every optimizer class loaded now, subclasses of subclasses
    included (user-defined ones too)."""
    from keras.src.optimizers.base_optimizer import BaseOptimizer
    found, todo = [], [BaseOptimizer]
    while todo:
        cls = todo.pop()
        if cls not in found:
            found.append(cls)
            todo.extend(cls.__subclasses__())
    return found


class PhaseEvents:
    """TensorFlow/Keras events at the step's phase boundaries, reported to ``on_event``:

    - backward: ``tf.GradientTape.gradient`` (replaced on the class while installed, the
      original put back on remove). The first layer's backward ends when it returns (the
      driver calls the instrument's finish_backward at "backward_end").
    - optimizer: Keras 3's ``Optimizer.apply_gradients`` and ``apply``: apply_gradients calls
      apply, and every optimizer's update goes through an ``apply`` (BaseOptimizer's, or an
      override such as LossScaleOptimizer's, which calls its inner optimizer's apply). Each is
      replaced on every optimizer class loaded at install time that defines it, so a
      user-defined optimizer's override counts too (one defined after install is no
      boundary itself; the base apply it calls is).

    Only the outermost call of each kind is a boundary (apply_gradients -> apply -> inner
    apply fires once; a tape.gradient computed inside another's backward is part of it);
    tape.jacobian and batch_jacobian are none (replaced too, only to say so). Calls while a
    graph is traced (tf.function) are no boundaries: their Python runs once, at tracing, not
    when the work runs; the report notes that it happened. Single-threaded, as a training
    step is."""

    def __init__(self, on_event):
        self.on_event = on_event
        self.notes = ["Phases: backward = the outermost tf.GradientTape.gradient call of a "
                      "step (tape.jacobian and tf.gradients are no boundaries); optimizer = "
                      "the outermost Keras optimizer apply_gradients / apply call."]
        self._wrapped = _Wrapped()
        self._depth = {"backward": 0, "optimizer": 0}
        self._traced_noted = False

    def install(self) -> None:
        if self._wrapped.saved:
            return
        self._wrapped.replace(tf.GradientTape, "gradient",
                              lambda original: self._boundary(original, "backward"))
        # A Jacobian computes gradients row by row (eagerly without pfor): no boundaries.
        for name in ("jacobian", "batch_jacobian"):
            self._wrapped.replace(tf.GradientTape, name,
                                  lambda original: self._inside(original, "backward"))
        for cls in _optimizer_classes():
            for name in ("apply_gradients", "apply"):
                if name in vars(cls):
                    self._wrapped.replace(cls, name,
                                          lambda original: self._boundary(original,
                                                                          "optimizer"))

    def remove(self) -> None:
        self._wrapped.restore()
        self._depth = {"backward": 0, "optimizer": 0}

    def _boundary(self, original, phase):
        depth, on_event = self._depth, self.on_event

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            if depth[phase]:                  # inside the outermost call: part of its phase
                return original(*args, **kwargs)
            if not tf.executing_eagerly():
                self._note_traced(phase)
                return original(*args, **kwargs)
            depth[phase] += 1
            on_event(f"{phase}_start")
            try:
                return original(*args, **kwargs)
            finally:
                depth[phase] -= 1
                on_event(f"{phase}_end")
        return wrapper

    def _inside(self, original, phase):
        """``original`` counted as inside a call of ``phase``: no boundary in it."""
        depth = self._depth

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            depth[phase] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[phase] -= 1
        return wrapper

    def _note_traced(self, phase) -> None:
        if not self._traced_noted:
            self._traced_noted = True
            what = "tape.gradient" if phase == "backward" else "the optimizer's apply"
            self.notes.append(f"{what} ran while a graph was traced (a tf.function): that "
                              f"work is not split into phases or layers; its time falls into "
                              f"the phase around it.")


_SCALAR_HINT = ("a scalar (Keras' loss objects, e.g. keras.losses.SparseCategoricalCrossentropy"
                "(), reduce over the batch; the loss functions, e.g. "
                "keras.losses.sparse_categorical_crossentropy, return one loss per sample)")


def training_step(model, loss_fn, optimizer, device=None, mode="eager"):
    """The common loop's step for profiler.api.profile_training, Keras' own custom-loop
    recipe: ``step(prof, batch)`` takes ``(x, y)`` or ``(x, y, sample_weight)`` (tensors or
    NumPy arrays; tf.data yields such tuples), puts them on ``device`` (default: where the
    model's variables are) as tensors (the h2d phase), then

        with tf.GradientTape() as tape:
            out = prof.mark_output(model(x, training=True))
            loss = loss_fn(y, out[, sample_weight]) + sum(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    ``loss_fn`` takes Keras' argument order (y_true, y_pred), as every keras.losses object
    does, and must return a scalar; ``model.losses`` (regularisation) is added as Keras' fit
    adds it. The trainable variables are read once, here. ``prof`` None runs the step
    unprofiled. ``mode`` "graph": the same step (less ``mark_output``) in one ``tf.function``,
    as Keras' fit compiles it; the profiler times that call as the compiled_step phase."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"profile_training: model: expected a keras.Model, got "
                        f"{type(model).__module__}.{type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"profile_training: loss_fn: expected a callable (y_true, y_pred) -> "
                        f"scalar loss (Keras' order), got {type(loss_fn).__name__}")
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(f"profile_training: optimizer: expected a keras.optimizers.Optimizer "
                        f"(Keras {keras.__version__}), got {type(optimizer).__module__}."
                        f"{type(optimizer).__name__}")
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"profile_training: device: expected None, 'cpu' or 'cuda', got "
                         f"{device!r}")
    where = _device_of(model)
    if device == "cuda" and not tf.config.list_physical_devices("GPU"):
        raise RuntimeError(f"profile_training: device: 'cuda' requested but this TensorFlow "
                           f"({tf.__version__}) sees no GPU")
    if device is not None and device != where:
        raise ValueError(f"profile_training: device: {device!r}, but the model's variables "
                         f"are on the {where} (TensorFlow places them when they are made: "
                         f"build the model under tf.device(...) or pass device={where!r})")
    tf_device = "/GPU:0" if where == "cuda" else "/CPU:0"
    variables = model.trainable_variables

    def to_device(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
            raise ValueError(f"profile_training: loader: expected batches (inputs, targets) "
                             f"or (inputs, targets, sample_weight), got {type(batch).__name__}"
                             + (f" of {len(batch)}" if isinstance(batch, (tuple, list))
                                else ""))
        with tf.device(tf_device):
            # identity: a copy to the GPU where the tensor is on the host, nothing on the CPU.
            return tuple(tf.nest.map_structure(
                lambda a: tf.identity(a) if where == "cuda" else tf.convert_to_tensor(a), b)
                for b in batch)

    def compute(x, rest, prof):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            if prof is not None:
                out = prof.mark_output(out)
            with tf.name_scope(STEP_SCOPES["loss"]):   # for the trace (graph mode)
                loss = loss_fn(*rest[:1], out, *rest[1:])
            if getattr(loss, "shape", None) is None or loss.shape.rank != 0:
                raise ValueError(f"profile_training: loss_fn: expected {_SCALAR_HINT}, "
                                 f"got {type(loss).__name__} of shape "
                                 f"{getattr(loss, 'shape', None)}")
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        grads = tape.gradient(loss, variables)
        with tf.name_scope(STEP_SCOPES["optimizer"]):
            optimizer.apply_gradients(zip(grads, variables))
        return loss

    # reduce_retracing: a last, smaller batch traces once more, then shapes generalise.
    compiled = tf.function(lambda x, *rest: compute(x, rest, None), reduce_retracing=True)

    def graph_step(prof, batch):
        if prof is None:
            x, *rest = to_device(batch)
            with tf.device(tf_device):
                return compiled(x, *rest)
        with prof.phase("h2d"):
            x, *rest = to_device(batch)
        with prof.phase("compiled_step"), tf.device(tf_device):
            loss = compiled(x, *rest)
            loss.numpy()          # the call returns before its work is done on a GPU
        return loss

    if mode == "graph":
        return graph_step

    def step(prof, batch):
        if prof is None:
            x, *rest = to_device(batch)
        else:
            with prof.phase("h2d"):
                x, *rest = to_device(batch)
        with tf.device(tf_device):
            return compute(x, rest, prof)

    return step
