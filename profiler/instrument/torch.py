"""PyTorch instrumentation: module forward pre-/post-hooks, full backward pre-/post-hooks,
and parameter post-accumulate-grad hooks for layers whose input needs no gradient.

Why the parameter hooks: PyTorch fires a module's full backward hook once the gradients with
respect to its *inputs* are computed; for the first layer no input needs a gradient, so the
hook fires as soon as the output's gradient exists, before the layer's weight gradient is
computed (backward time ~0: the common trap). There the backward ends when the last of the
layer's parameter gradients has been accumulated.

Times are host times. On the GPU, kernels run asynchronously: host ranges say when the work
was issued, and the recorder's CUDA events (device_clock) say when it ran.
"""

from __future__ import annotations

import functools
import warnings
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


class Instrument(InstrumentBase):
    def __init__(self, workload, recorder):
        super().__init__(workload, recorder)
        self._handles = []
        self._open = {}                # (layer, direction) -> recorder token
        self._waiting_params = {}      # layer -> parameter grads still to come this backward
        self._input_needs_grad = {}    # layer -> whether its last forward input needed one
        self.notes = ["PyTorch: layer forward = module forward hooks; layer backward = from "
                      "the module's backward pre-hook to its backward hook (to its last "
                      "parameter gradient where no input needs a gradient)."]
        if workload.device.type == "cuda":
            self.notes.append("GPU: host ranges are when work was issued; device ranges "
                              "(CUDA events at the same boundaries) when it ran.")

    def device_clock(self) -> Optional[CudaEventClock]:
        return CudaEventClock() if self.workload.device.type == "cuda" else None

    def install(self) -> None:
        if self._handles:
            return
        # PyTorch warns that the first layer's backward hook fires early; handled (see top).
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients",
                                category=UserWarning)
        for name, module in self.layers:
            kind = type(module).__name__
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            self._handles += [
                module.register_forward_pre_hook(self._forward_pre(name, kind)),
                module.register_forward_hook(self._forward_post(name)),
                module.register_full_backward_pre_hook(self._backward_pre(name, kind,
                                                                          len(params))),
                module.register_full_backward_hook(self._backward_post(name)),
            ]
            self._handles += [p.register_post_accumulate_grad_hook(self._param_done(name))
                              for p in params]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def mark_output(self, output):
        if output.requires_grad:
            output.register_hook(self._output_grad)
        return output

    def _output_grad(self, grad):
        self.on_output_grad()

    # -- hooks -----------------------------------------------------------------------------
    def _forward_pre(self, name, kind):
        def hook(module, args):
            self._input_needs_grad[name] = any(isinstance(a, torch.Tensor) and a.requires_grad
                                               for a in args)
            self._open[(name, "forward")] = self.recorder.begin(name, "layer",
                                                                direction="forward",
                                                                layer_type=kind)
        return hook

    def _forward_post(self, name):
        def hook(module, args, output):
            self.recorder.end(self._open.pop((name, "forward"), None))
        return hook

    def _backward_pre(self, name, kind, n_params):
        def hook(module, grad_output):
            self._open[(name, "backward")] = self.recorder.begin(name, "layer",
                                                                 direction="backward",
                                                                 layer_type=kind)
            if not self._input_needs_grad.get(name, True):
                self._waiting_params[name] = n_params
        return hook

    def _backward_post(self, name):
        def hook(module, grad_input, grad_output):
            if name not in self._waiting_params:
                self.recorder.end(self._open.pop((name, "backward"), None))
        return hook

    def _param_done(self, name):
        def hook(param):
            waiting = self._waiting_params.get(name)
            if waiting is None:
                return
            if waiting <= 1:
                del self._waiting_params[name]
                self.recorder.end(self._open.pop((name, "backward"), None))
            else:
                self._waiting_params[name] = waiting - 1
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


def training_step(model, loss_fn, optimizer, device=None):
    """The common loop's step for profiler.api.profile_training: ``step(prof, (x, t))`` moves
    the batch to ``device`` (default: the model's), runs forward, loss, backward and the
    optimizer, then clears the gradients (counted as 'other'); ``prof`` None runs it
    unprofiled."""
    if not callable(loss_fn):
        raise TypeError(f"profile_training: loss_fn: expected a callable (output, target) -> "
                        f"loss, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"profile_training: optimizer: expected a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    params = list(model.parameters())
    target = torch.device(device) if device else (params[0].device if params
                                                   else torch.device("cpu"))

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
