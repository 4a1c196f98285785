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
