"""PyTorch instrumentation: each layer's forward wrapped (on the instance) for the forward
ranges; for the backward ranges, hooks on the autograd node that made each layer's output and
on the layer's parameters.

Backward: when a layer's forward returns, a pre-hook goes on its output's autograd node (the
layer's last operation): when the backward pass is about to run that node, the gradient has
reached the layer and its backward range begins. It ends when the last of the layer's
parameter gradients has been accumulated (a post-accumulate-grad hook per parameter):
the layer's nodes have computed every gradient they owe, its input's included. PyTorch runs
gradient accumulation at the highest priority, right after the node that produced it, so a
layer's range holds its own work. A layer without trainable parameters ends when its output's
node has run (exact for a one-operation layer). A layer called several times in a step has one
backward range, from the first of its nodes to run to its last accumulated gradient.

Why not the modules' full backward hooks (``register_full_backward_hook``, the obvious API):
they wrap every layer's inputs and outputs in an extra autograd function, which measured here
at about 8% of a ResNet-20 CPU step on its own (node and parameter hooks: no measurable cost),
and they fire too early for a first layer, whose input needs no gradient (the common trap).

Times are host times. On the GPU, kernels run asynchronously: host ranges say when the work
was issued, and the recorder's CUDA events (device_clock) say when it ran.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .base import InstrumentBase


class CudaEventClock:
    """recorder.DeviceClock over torch.cuda.Event on the current stream."""

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, start, end) -> float:
        return start.elapsed_time(end)

    def synchronize(self) -> None:
        torch.cuda.synchronize()


def _grad_node(output):
    """The autograd node that made ``output`` (the first tensor of a tuple/list that has one),
    or None where no gradient will flow back through it."""
    if isinstance(output, torch.Tensor):
        return output.grad_fn
    if isinstance(output, (tuple, list)):
        for item in output:
            node = _grad_node(item)
            if node is not None:
                return node
    return None


class _ForwardWrapper:
    """``module.forward`` replaced, on the instance, by ``instrumented(forward, args,
    kwargs)``; ``remove()`` gives the module its own forward back.

    Why not forward pre-/post-hooks: a module with any hook leaves Module.__call__'s fast path
    for the one that runs every hook dictionary, and two hooks are two more Python calls. The
    hooks, with the recorder off, cost +4.3% [+1.5, +6.5] of a ResNet-20 CPU step here (60
    interleaved rounds)."""

    def __init__(self, module: torch.nn.Module, instrumented):
        self.module = module
        self.own = vars(module).get("forward")      # an instance-level forward of the user's
        forward = module.forward

        def wrapped(*args, **kwargs):
            return instrumented(forward, args, kwargs)
        object.__setattr__(module, "forward", functools.wraps(forward)(wrapped))

    def remove(self) -> None:
        if self.own is not None:
            object.__setattr__(self.module, "forward", self.own)
        else:
            vars(self.module).pop("forward", None)


class Instrument(InstrumentBase):
    def __init__(self, workload, recorder):
        super().__init__(workload, recorder)
        self._handles = []             # _ForwardWrapper and parameter hook handles
        self._backward = {}            # layer -> recorder token of its open backward range
        self._waiting = {}             # layer -> parameter gradients still to come
        self._trainable = {}           # layer -> its parameters that take a gradient
        self.notes = ["PyTorch: layer forward = the module's forward call; layer backward = from "
                      "the pre-hook of the autograd node that made the layer's output to the "
                      "accumulation of its last parameter gradient (the output node's "
                      "post-hook for a layer without trainable parameters)."]
        if workload.device.type == "cuda":
            self.notes.append("GPU: host ranges are when work was issued; device ranges "
                              "(CUDA events at the same boundaries) when it ran.")

    def device_clock(self) -> Optional[CudaEventClock]:
        return CudaEventClock() if self.workload.device.type == "cuda" else None

    def install(self) -> None:
        if self._handles:
            return
        for name, module in self.layers:
            kind = type(module).__name__
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            self._trainable[name] = len(params)
            self._handles.append(_ForwardWrapper(module, self._forward_range(name, kind)))
            self._handles += [p.register_post_accumulate_grad_hook(self._param_done(name))
                              for p in params]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._close_backward()

    def mark_output(self, output):
        if output.requires_grad:
            output.register_hook(self._output_grad)
        return output

    def _output_grad(self, grad):
        self.on_output_grad()

    def finish_backward(self) -> None:
        """Closes, at the end of the backward call, a range whose end never came (a layer
        whose output got a gradient but one of whose parameters did not)."""
        self._close_backward()

    def _close_backward(self) -> None:
        for token in self._backward.values():
            self.recorder.end(token)
        self._backward.clear()
        self._waiting.clear()

    # -- hooks -----------------------------------------------------------------------------
    def _forward_range(self, name, kind):
        """The module's forward in a forward range; the output's autograd node gets the hooks
        that begin (and, for a layer without trainable parameters, end) its backward range."""
        recorder = self.recorder
        backward_begins = self._backward_begins(name, kind)
        node_done = self._node_done(name) if not self._trainable[name] else None

        def instrumented(forward, args, kwargs):
            token = recorder.begin(name, "layer", direction="forward", layer_type=kind)
            try:
                output = forward(*args, **kwargs)
            finally:
                recorder.end(token)
            node = _grad_node(output) if token is not None else None
            if node is not None:
                node.register_prehook(backward_begins)
                if node_done is not None:
                    node.register_hook(node_done)
            return output
        return instrumented

    def _backward_begins(self, name, kind):
        def hook(grad_outputs):
            if name not in self._backward:
                self._backward[name] = self.recorder.begin(name, "layer", direction="backward",
                                                           layer_type=kind)
                self._waiting[name] = self._trainable[name]
        return hook

    def _node_done(self, name):
        def hook(grad_inputs, grad_outputs):
            self._waiting.pop(name, None)
            self.recorder.end(self._backward.pop(name, None))
        return hook

    def _param_done(self, name):
        def hook(param):
            waiting = self._waiting.get(name)
            if waiting is None:
                return
            if waiting <= 1:
                del self._waiting[name]
                self.recorder.end(self._backward.pop(name, None))
            else:
                self._waiting[name] = waiting - 1
        return hook


# --------------------------------------------------------------------------- a user's model

class UserModel:
    """What the Instrument needs of a workload, for a user's torch.nn.Module
    (profiler.api.LayerProfiler): its layers with parameters of their own, named by their
    module paths, that ``keep(name, module)`` accepts."""

    framework = "torch"

    def __init__(self, model, keep):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"LayerProfiler: model: expected a torch.nn.Module for framework "
                            f"'torch', got {type(model).__module__}.{type(model).__name__}")
        params = list(model.parameters())
        self.model = model
        self.device = params[0].device if params else torch.device("cpu")
        with_params = [(name, m) for name, m in model.named_modules()
                       if name and any(True for _ in m.parameters(recurse=False))]
        missing = [n for n in getattr(keep, "names", ())
                   if n not in dict(model.named_modules())]
        if missing:
            raise ValueError(f"LayerProfiler: layers: {missing} not in the "
                             f"{type(model).__name__}; its layers with parameters of their "
                             f"own: {[n for n, _ in with_params][:20]}")
        self._layers = [(name, m) for name, m in with_params if keep(name, m)]
        if not self._layers:
            raise ValueError(f"LayerProfiler: layers: no layer of the "
                             f"{type(model).__name__} was selected; layers with parameters of "
                             f"their own: {[n for n, _ in with_params][:20]}")

    def named_layers(self):
        return self._layers

    def watch_communication(self, on_launch) -> Optional[str]:
        """For a DistributedDataParallel model: a communication hook that calls ``on_launch``
        as each gradient bucket's all-reduce is launched (the last launch means every
        gradient is computed) and wraps the all-reduce in an NVTX range, then runs DDP's
        default all-reduce. Returns a note for the report (None for a plain model)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        if not isinstance(self.model, ddp):
            return None
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        from profiler.recorder import NVTX

        def allreduce(state, bucket):
            on_launch()
            token = NVTX.start(f"allreduce (bucket {bucket.index()})", "blue")

            def done(future):
                NVTX.end(token)
                return future.value()
            return default_hooks.allreduce_hook(state, bucket).then(done)

        try:
            self.model.register_comm_hook(None, allreduce)
        except RuntimeError as e:     # DDP takes one hook per model: the user's stays
            return (f"communication: not measured: the model has a communication hook of its "
                    f"own ({e}); the all-reduce wait counts in 'backward'")
        return ("communication: from the launch of the last gradient bucket's all-reduce "
                "(every gradient computed) to the end of the backward call (DDP waits there "
                "for every all-reduce); all-reduces run in NVTX ranges 'allreduce (bucket i)'.")

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch_size_of(self, output) -> int:
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        shape = getattr(tensor, "shape", ())
        return int(shape[0]) if len(shape) else 1

    def version(self) -> str:
        return torch.__version__

    def device_kind(self) -> str:
        return "cuda" if self.device.type == "cuda" else "cpu"

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        import platform
        return platform.processor() or platform.machine()


class PhaseEvents:
    """PyTorch's own events at the step's phase boundaries, reported to ``on_event``: the
    backward call's start and end (torch.autograd.backward, through which Tensor.backward
    goes, wrapped while installed) and the optimizer step's start and end (torch.optim's
    global step hooks: any optimizer)."""

    def __init__(self, on_event):
        self.on_event = on_event
        self.notes = ["Phases: backward = torch.autograd.backward calls (Tensor.backward "
                      "included; torch.autograd.grad is not a phase boundary); optimizer = "
                      "torch.optim step hooks."]
        self._original = None
        self._handles = []

    def install(self) -> None:
        if self._original is not None:
            return
        original = self._original = torch.autograd.backward
        on_event = self.on_event

        @functools.wraps(original)
        def backward(*args, **kwargs):
            on_event("backward_start")
            try:
                return original(*args, **kwargs)
            finally:
                on_event("backward_end")

        torch.autograd.backward = backward
        from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                           register_optimizer_step_pre_hook)
        self._handles = [
            register_optimizer_step_pre_hook(lambda opt, a, k: on_event("optimizer_start")),
            register_optimizer_step_post_hook(lambda opt, a, k: on_event("optimizer_end"))]

    def remove(self) -> None:
        if self._original is not None:
            torch.autograd.backward = self._original
            self._original = None
        for handle in self._handles:
            handle.remove()
        self._handles = []


def training_step(model, loss_fn, optimizer, device=None, mode="eager"):
    """The common loop's step for profiler.api.profile_training: ``step(prof, (x, t))`` moves
    the batch to ``device`` (default: the model's), runs forward, loss, backward and the
    optimizer, then clears the gradients (counted as 'other'); ``prof`` None runs it
    unprofiled. ``mode`` "graph": the model's forward (and, through AOTAutograd, its
    backward) runs through ``torch.compile`` (the model as given if it already is a compiled
    module); the loss and the optimizer stay eager."""
    if not callable(loss_fn):
        raise TypeError(f"profile_training: loss_fn: expected a callable (output, target) -> "
                        f"loss, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"profile_training: optimizer: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    params = list(model.parameters())
    target = torch.device(device) if device else (params[0].device if params
                                                   else torch.device("cpu"))
    if mode == "graph" and not isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        model = torch.compile(model)

    def to_device(batch):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"profile_training: loader: expected batches (inputs, targets), "
                             f"got {type(batch).__name__}"
                             + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
        return tuple(b.to(target, non_blocking=True) if isinstance(b, torch.Tensor) else b
                     for b in batch)

    def step(prof, batch):
        if prof is None:
            x, t = to_device(batch)
            loss = loss_fn(model(x), t)
        else:
            with prof.phase("h2d"):
                x, t = to_device(batch)
            loss = loss_fn(prof.mark_output(model(x)), t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step
