"""Chainer instrumentation: link hooks for layer forwards, function hooks for layer backwards
(in the spirit of Chainer's own ``link_hooks.TimerHook`` and ``function_hooks.TimerHook``).

Forward: a ``chainer.LinkHook`` added to each named link times ``Link.__call__`` (the link's
``forward``) and keeps the stack of named links being run. While that stack is non-empty a
tagging ``chainer.FunctionHook`` sits in the running thread's function hooks; every
``FunctionNode`` created then belongs to the innermost named link, and gets that layer's own
``FunctionHook`` as a local hook (``FunctionNode.add_hook``).

Backward: Chainer's backprop runs one node at a time, in decreasing topological rank, and
calls a node's hooks around its whole backward: the gradients of *all* its inputs that need
one, the weight's included. So a layer's backward range runs from the first of its nodes'
``backward_preprocess`` to the last of its nodes' ``backward_postprocess``; the first layer,
whose input needs no gradient, still has its node run (for W, and b), so its range is its
weight-gradient work, not ~0.

What the layer numbers leave out: summing the gradients of an activation used twice (a ResNet
block's pre-activation) happens between nodes, in Chainer's backprop loop; so do activations,
pooling, additions and dropout, which belong to no named link; the parameters' gradients are
stored after the last node. All of that is in the "backward" phase, outside every layer.

A user's own Chainer model and loop (profiler.api): ``UserModel``, ``PhaseEvents`` (the
backward calls and the optimizer's hooks as phase boundaries) and ``training_step`` (Chainer's
loop), at the end.

Times are host times. Chainer on NumPy computes synchronously: host ranges are compute time.
On CuPy kernels queue asynchronously: host ranges say when work was issued, and the recorder's
CuPy events (device_clock) when it ran (the GPU path is unverified here).
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

import numpy

from ops.chainer.loader import load_chainer

from .base import InstrumentBase

chainer = load_chainer()

# Hook names: unique among the hooks a link, a node or a thread may hold besides ours.
_LINK_HOOK_NAME = "deepprof-layer"
_NODE_HOOK_NAME = "deepprof-layer-backward"
_TAGGER_NAME = "deepprof-layer-tagger"


class CupyEventClock:
    """recorder.DeviceClock over cupy.cuda.Event on the current stream (unverified here: this
    machine has no GPU)."""

    def __init__(self, device):
        self._cupy = chainer.backends.cuda.cupy
        self._device = device            # the workload's cupy.cuda.Device

    def mark(self):
        event = self._cupy.cuda.Event()  # timing enabled, non-blocking
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return float(self._cupy.cuda.get_elapsed_time(start, end))

    def synchronize(self) -> None:
        self._device.synchronize()


class _LayerForward(chainer.LinkHook):
    """Added to one named link: its forward range, and the stack of links being run."""

    name = _LINK_HOOK_NAME

    def __init__(self, instrument: "Instrument", layer: str, layer_type: str,
                 backward: "_LayerBackward"):
        self.instrument, self.layer, self.layer_type = instrument, layer, layer_type
        self.backward = backward

    def forward_preprocess(self, args) -> None:
        self.instrument._enter_layer(self, args.link)

    def forward_postprocess(self, args) -> None:
        self.instrument._leave_layer(self, args.link)


class _LayerBackward(chainer.FunctionHook):
    """A local hook of every node one named link created: that layer's backward range."""

    name = _NODE_HOOK_NAME

    def __init__(self, instrument: "Instrument", layer: str, layer_type: str):
        self.instrument, self.layer, self.layer_type = instrument, layer, layer_type

    def backward_preprocess(self, function, in_data, out_grad) -> None:
        self.instrument._node_backward_begins(self)

    def backward_postprocess(self, function, in_data, out_grad) -> None:
        self.instrument._node_backward_ends(self)


class _Tagger(chainer.FunctionHook):
    """In the thread's function hooks only while a named link runs: hands each node created
    there to the innermost link's _LayerBackward."""

    name = _TAGGER_NAME

    def __init__(self, instrument: "Instrument"):
        self.instrument = instrument

    def forward_preprocess(self, function, in_data) -> None:
        self.instrument._node_created(function)


class _Frame:
    """One named link's forward in progress."""

    __slots__ = ("hook", "link", "token", "nodes")

    def __init__(self, hook: _LayerForward, link, token):
        self.hook, self.link, self.token = hook, link, token
        self.nodes: List[object] = []


class _OutputMarker(chainer.FunctionNode):
    """Identity on the model output; its backward runs when the output's gradient exists (all
    of the loss's nodes have higher rank, so they ran before), calls ``callback`` and passes
    the gradient on untouched."""

    def __init__(self, callback):
        self._callback = callback

    def forward(self, inputs):
        return inputs[0],

    def backward(self, indexes, grad_outputs):
        self._callback()
        return grad_outputs


class Instrument(InstrumentBase):
    """Layer ranges for a Chainer workload's named links (the contract: instrument.base)."""

    def __init__(self, workload, recorder):
        super().__init__(workload, recorder)
        self._link_hooks: List[tuple] = []      # (link, _LayerForward) while installed
        self._stack: List[_Frame] = []          # named links whose forward is running
        self._tagger = _Tagger(self)
        self._tagger_hooks: Optional[dict] = None   # the thread's hook dict holding the tagger
        self._pending: Dict[str, int] = {}      # layer -> its nodes still to run backward
        self._open_backward: Optional[tuple] = None  # (_LayerBackward, recorder token)
        self.notes = [
            "Chainer: layer forward = a LinkHook around the link's forward; layer backward = "
            "from the backward_preprocess of the first FunctionNode the link created to the "
            "backward_postprocess of its last (FunctionHooks); a node's backward computes "
            "every input gradient it owes, the weights' included, so the first layer's range "
            "is its weight-gradient work.",
            "Chainer: activations, pooling, additions, dropout and the sum of an activation's "
            "gradients where it feeds two layers run between nodes: they count in the "
            "backward phase, in no layer. Where another layer's node runs between two nodes "
            "of one layer, that layer has several backward ranges in a step, summed.",
            "Chainer: loss_backward runs from loss.backward() to the backward of an identity "
            "node on the model output: the loss's own nodes.",
        ]
        if workload.on_gpu:
            self.notes.append("GPU (CuPy): host ranges are when work was issued; device "
                              "ranges (CuPy events at the same boundaries) when it ran.")
        else:
            self.notes.append("CPU (NumPy): Chainer computes synchronously, so each host "
                              "range is compute time plus Chainer's per-node Python work "
                              "(type checks, graph building).")

    def device_clock(self) -> Optional[CupyEventClock]:
        """CuPy events on the workload's GPU; None on the CPU (NumPy is synchronous)."""
        return CupyEventClock(self.workload.device.device) if self.workload.on_gpu else None

    # -- install / remove ------------------------------------------------------------------
    def install(self) -> None:
        """Adds a LinkHook to every named link (local hooks: the other links, and links of
        other models, stay hook-free, and no thread-local state is left between forwards)."""
        if self._link_hooks:
            return
        for name, link in self.layers:
            kind = type(link).__name__
            hook = _LayerForward(self, name, kind, _LayerBackward(self, name, kind))
            link.add_hook(hook)
            self._link_hooks.append((link, hook))

    def remove(self) -> None:
        """Deletes the link hooks; Link.__call__ is back on its hook-free path (no local
        hooks, no thread-local ones). A backward range still open is closed here."""
        for link, hook in self._link_hooks:
            link.delete_hook(hook.name)
        self._link_hooks.clear()
        self._reset()

    def mark_output(self, output):
        """An identity node after ``output`` whose backward calls ``on_output_grad``."""
        self._drop_frames()   # the forward is over: frames left are links that raised
        if not output.requires_grad or output.creator_node is None:
            # No graph behind it (e.g. built under no_backprop_mode): no backward to mark.
            return output
        # on_output_grad is looked up at backward time: the driver may set it after this.
        return _OutputMarker(lambda: self.on_output_grad()).apply((output,))[0]

    def finish_backward(self) -> None:
        """Closes a range whose last node never ran (its output got no gradient) and forgets
        nodes still counted."""
        self._close_backward()
        self._pending.clear()
        self._drop_frames()

    # -- forward ---------------------------------------------------------------------------
    def _enter_layer(self, hook: _LayerForward, link) -> None:
        if not self._stack:
            # Register the tagger in *this* thread's hooks (Chainer's function hooks are
            # thread-local), only for the span of the outermost named link's forward.
            self._tagger_hooks = chainer.get_function_hooks()
            self._tagger_hooks[_TAGGER_NAME] = self._tagger
        token = self.recorder.begin(hook.layer, "layer", direction="forward",
                                    layer_type=hook.layer_type)
        self._stack.append(_Frame(hook, link, token))

    def _leave_layer(self, hook: _LayerForward, link) -> None:
        # Frames above ours are links whose forward raised (their postprocess never came) and
        # whose exception ours caught: dropped unrecorded, as any time given them would be
        # made up (and would overlap the ranges after them).
        while self._stack:
            frame = self._stack.pop()
            if frame.link is link:
                self.recorder.end(frame.token)
                self._count_nodes(frame)
                break
        if not self._stack:
            self._untag()

    def _node_created(self, function) -> None:
        if self._stack:
            frame = self._stack[-1]
            function.add_hook(frame.hook.backward)
            frame.nodes.append(function)

    def _count_nodes(self, frame: _Frame) -> None:
        # Backprop skips, without calling hooks, a node none of whose inputs needs a gradient;
        # the graph's edges (node.inputs) exist only now, after the node's forward.
        runs = sum(1 for node in frame.nodes
                   if node.inputs is not None and any(x.requires_grad for x in node.inputs))
        if runs:
            layer = frame.hook.layer
            self._pending[layer] = self._pending.get(layer, 0) + runs

    def _untag(self) -> None:
        if self._tagger_hooks is not None:
            self._tagger_hooks.pop(_TAGGER_NAME, None)
            self._tagger_hooks = None

    # -- backward --------------------------------------------------------------------------
    def _node_backward_begins(self, hook: _LayerBackward) -> None:
        if self._open_backward is not None and self._open_backward[0] is not hook:
            # Another layer's node runs before this layer's last one (or a node counted for
            # it never ran): close it here so ranges nest; it reopens on its next node.
            self._close_backward()
        if self._open_backward is None:
            self._open_backward = (hook, self.recorder.begin(hook.layer, "layer",
                                                             direction="backward",
                                                             layer_type=hook.layer_type))

    def _node_backward_ends(self, hook: _LayerBackward) -> None:
        left = self._pending.get(hook.layer, 0) - 1
        if left > 0:
            self._pending[hook.layer] = left
            return
        self._pending.pop(hook.layer, None)
        if self._open_backward is not None and self._open_backward[0] is hook:
            self._close_backward()

    def _close_backward(self) -> None:
        if self._open_backward is not None:
            self.recorder.end(self._open_backward[1])
            self._open_backward = None

    def _drop_frames(self) -> None:
        """Forgets forwards left unfinished by an exception (no range: see _leave_layer) and
        takes the tagger out of its thread's hooks."""
        self._stack.clear()
        self._untag()

    def _reset(self) -> None:
        self._drop_frames()
        self._close_backward()
        self._pending.clear()


# --------------------------------------------------------------------------- a user's model

def _own_params(link) -> bool:
    """Whether ``link`` holds a parameter of its own (not only through its children):
    namedparams names a link's own parameters "/W", its children's "/child/W". Parameters
    not initialized yet (L.Linear(None, n) sizes itself at its first call) count."""
    return any(name.count("/") == 1 for name, _ in link.namedparams(include_uninit=True))


def _layer_name(path: str) -> str:
    """A link path as a layer name: "/features/0" -> "features.0", the seed workloads'
    (and PyTorch's) dotted form, so a Chainer port's table reads like its PyTorch original."""
    return path[1:].replace("/", ".")


def _resolve_device(device, argument: str):
    """A chainer Device from a Chainer specifier ("@numpy", "@cupy:0") or the CLI's names
    ("cpu", "cuda", "cuda:N"); a ValueError naming ``argument`` otherwise."""
    if isinstance(device, str):
        if device == "cpu":
            device = "@numpy"
        elif device == "cuda" or device.startswith("cuda:"):
            device = f"@cupy:{device.partition(':')[2] or 0}"
    try:
        return chainer.get_device(device)
    except Exception as e:  # Chainer raises ValueError, or RuntimeError without CuPy
        raise ValueError(f"profile_training: {argument}: expected 'cpu', 'cuda[:N]' or a "
                         f"Chainer device ('@numpy', '@cupy:N'), got {device!r} ({e})") from None


class UserModel:
    """What the Instrument needs of a workload, for a user's chainer.Link
    (profiler.api.LayerProfiler): its links with parameters of their own, named by their link
    paths in dotted form ("features.0" for /features/0), that ``keep(name, link)`` accepts, in
    Chainer's order (namedlinks: a Chain's children sorted by name, a ChainList's by index)."""

    framework = "chainer"

    def __init__(self, model, keep):
        if not isinstance(model, chainer.Link):
            raise TypeError(f"LayerProfiler: model: expected a chainer.Link (a Chain, ChainList "
                            f"or link) for framework 'chainer', got "
                            f"{type(model).__module__}.{type(model).__name__}")
        self.model = model
        self.device = model.device
        if self.device.xp is chainer.backend.chainerx:
            # ChainerX arrays run their backward in C++: no FunctionNode, so no FunctionHook
            # sees a layer's backward.
            raise ValueError(f"LayerProfiler: model: expected a model on a NumPy or CuPy "
                             f"device, got one on {self.device} (ChainerX runs no function "
                             f"hooks): model.to_device('@numpy') or '@cupy:N'")
        links = [(_layer_name(path), link) for path, link in model.namedlinks(skipself=True)]
        with_params = [(name, link) for name, link in links if _own_params(link)]
        missing = [n for n in getattr(keep, "names", ()) if n not in dict(links)]
        if missing:
            raise ValueError(f"LayerProfiler: layers: {missing} not in the "
                             f"{type(model).__name__}; its links with parameters of their own: "
                             f"{[n for n, _ in with_params][:20]}")
        self._layers = [(name, link) for name, link in with_params if keep(name, link)]
        if not self._layers:
            raise ValueError(f"LayerProfiler: layers: no layer of the {type(model).__name__} "
                             f"was selected; links with parameters of their own: "
                             f"{[n for n, _ in with_params][:20]}")

    @property
    def on_gpu(self) -> bool:
        return self.device.xp is not numpy

    def named_layers(self):
        return self._layers

    def synchronize(self) -> None:
        # NumPy computes synchronously; CuPy queues kernels on the device.
        if self.on_gpu:
            self.device.device.synchronize()

    def batch_size_of(self, output) -> int:
        value = output[0] if isinstance(output, (tuple, list)) and output else output
        shape = getattr(value, "shape", ())
        return int(shape[0]) if len(shape) else 1

    def version(self) -> str:
        return chainer.__version__

    def device_kind(self) -> str:
        return "cuda" if self.on_gpu else "cpu"

    def device_name(self) -> str:
        if self.on_gpu:
            cupy = chainer.backends.cuda.cupy
            props = cupy.cuda.runtime.getDeviceProperties(self.device.device.id)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        import platform
        return platform.processor() or platform.machine()


class PhaseEvents:
    """Chainer's own events at the step's phase boundaries, reported to ``on_event``: the
    backward call's start and end (Variable.backward and chainer.backward, wrapped while
    installed) and the optimizer's update, from its 'pre' hooks to its 'post' hooks
    (Optimizer.call_hooks, wrapped while installed: every GradientMethod calls it around its
    parameter updates, so any Chainer optimizer is seen, and ``optimizer.update(lossfun)``,
    which runs forward and backward first, splits correctly)."""

    def __init__(self, on_event):
        self.on_event = on_event
        self.notes = ["Phases: backward = Variable.backward and chainer.backward calls "
                      "(chainer.grad is not a phase boundary); optimizer = from the "
                      "optimizer's 'pre' hooks (weight decay, clipping) to its 'post' hooks "
                      "(Optimizer.call_hooks), the parameter updates between them."]
        self._originals = None   # (Variable.backward, chainer.backward, Optimizer.call_hooks)
        self._backward_depth = 0

    def install(self) -> None:
        if self._originals is not None:
            return
        variable_backward = chainer.Variable.__dict__["backward"]
        module_backward = chainer.backward
        call_hooks = chainer.Optimizer.__dict__["call_hooks"]
        self._originals = (variable_backward, module_backward, call_hooks)
        on_event = self.on_event

        @functools.wraps(call_hooks)
        def call_hooks_with_events(optimizer, timing="pre"):
            if timing == "pre":
                on_event("optimizer_start")   # before the 'pre' hooks: they are its work
            try:
                return call_hooks(optimizer, timing)
            finally:
                if timing == "post":
                    on_event("optimizer_end")

        chainer.Variable.backward = self._backward_with_events(variable_backward)
        chainer.backward = self._backward_with_events(module_backward)
        chainer.Optimizer.call_hooks = call_hooks_with_events

    def remove(self) -> None:
        if self._originals is None:
            return
        variable_backward, module_backward, call_hooks = self._originals
        chainer.Variable.backward = variable_backward
        chainer.backward = module_backward
        chainer.Optimizer.call_hooks = call_hooks
        self._originals = None

    def _backward_with_events(self, original):
        # One pair of events per outermost call: a backward started inside another (a
        # function's backward that backpropagates on its own) is part of it.
        @functools.wraps(original)
        def backward(*args, **kwargs):
            self._backward_depth += 1
            if self._backward_depth == 1:
                self.on_event("backward_start")
            try:
                return original(*args, **kwargs)
            finally:
                self._backward_depth -= 1
                if self._backward_depth == 0:
                    self.on_event("backward_end")
        return backward


def _is_example(value) -> bool:
    return isinstance(value, tuple)


def training_step(model, loss_fn, optimizer, device=None, mode="eager"):
    """The common loop's step for profiler.api.profile_training: ``step(prof, batch)`` sends
    the batch to ``device`` (default: the model's; it must be the model's), runs the forward,
    the loss, ``model.cleargrads()``, ``loss.backward()`` and ``optimizer.update()``; ``prof``
    None runs it unprofiled. A batch is ``(inputs, targets)`` or a list of ``(input, target)``
    examples as Chainer's iterators yield them, concatenated with
    ``chainer.dataset.concat_examples`` as Chainer's StandardUpdater does (that and the
    transfer are the h2d phase). The cleargrads runs between the loss and the backward call,
    where Chainer's own idiom puts it: in loss_forward, about a microsecond per parameter."""
    if not isinstance(model, chainer.Link):
        raise TypeError(f"profile_training: model: expected a chainer.Link, got "
                        f"{type(model).__name__}")
    if mode == "graph":
        raise ValueError("profile_training: mode: 'graph' is not available for chainer: "
                         "Chainer runs define-by-run Python only and has no graph compiler")
    if not callable(loss_fn):
        raise TypeError(f"profile_training: loss_fn: expected a callable (output, target) -> "
                        f"loss Variable, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, chainer.Optimizer):
        raise TypeError(f"profile_training: optimizer: expected a chainer.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if getattr(optimizer, "target", None) is not model:
        raise ValueError(f"profile_training: optimizer: expected one set up on the model "
                         f"(optimizer.setup(model)), got one set up on "
                         f"{type(getattr(optimizer, 'target', None)).__name__}")
    target = model.device if device is None else _resolve_device(device, "device")
    if target != model.device:
        raise ValueError(f"profile_training: device: {target} is not the model's device "
                         f"({model.device}); move the model first: model.to_device({target})")

    def to_device(batch):
        if isinstance(batch, list) and batch and all(_is_example(e) for e in batch):
            batch = chainer.dataset.concat_examples(batch, target)
            if isinstance(batch, tuple) and len(batch) == 2:
                return batch
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            return tuple(target.send(b) for b in batch)
        raise ValueError(f"profile_training: loader: expected batches (inputs, targets) or "
                         f"lists of (input, target) examples, got {type(batch).__name__}"
                         + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))

    def step(prof, batch):
        if prof is None:
            x, t = to_device(batch)
            loss = loss_fn(model(x), t)
        else:
            with prof.phase("h2d"):
                x, t = to_device(batch)
            loss = loss_fn(prof.mark_output(model(x)), t)
        if not isinstance(loss, chainer.Variable):
            raise TypeError(f"profile_training: loss_fn: expected it to return a "
                            f"chainer.Variable, got {type(loss).__name__}")
        model.cleargrads()   # Chainer accumulates into existing gradients
        loss.backward()
        optimizer.update()
        return loss

    return step
