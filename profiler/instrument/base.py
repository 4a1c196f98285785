"""What every framework's Instrument offers the driver (profiler.layerwise).

Members:

- ``install()`` / ``remove()``: attach / detach the layer hooks.
- ``mark_output(output)``: returns ``output`` (or an identity of it) whose gradient, when the
  backward pass reaches it, calls ``on_output_grad``: the end of the loss backward.
- ``on_output_grad``: set by the driver, a callable taking no arguments.
- ``finish_backward()``: called right after the backward call returns; closes layer backward
  ranges whose end no hook could see (e.g. a first layer whose input has no gradient, where
  the framework offers no parameter-gradient hook) at that moment.
- ``device_clock()``: a recorder.DeviceClock for the workload's GPU, or None on the CPU.
- ``phase_sync``: True where the framework runs asynchronously and the driver must wait for
  its queue at every phase boundary for phase times to mean compute time.
- ``notes``: sentences for the report, what each number means for this framework.

Layer ranges: the recorder's ``begin``/``end`` with kind "layer", the layer's canonical name
(workload.named_layers()), direction "forward"/"backward" and the layer's type. A layer whose
input needs no gradient (the first one) must still get its backward end: a hook on its
parameters' gradients, not on its input's.
"""

from __future__ import annotations

from typing import List, Optional


class InstrumentBase:
    phase_sync = False

    def __init__(self, workload, recorder):
        self.workload = workload
        self.recorder = recorder
        self.on_output_grad = lambda: None
        self.notes: List[str] = []
        self.layers = workload.named_layers()

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def mark_output(self, output):
        raise NotImplementedError

    def finish_backward(self) -> None:
        """Default: every layer's backward end was seen by a hook."""

    def device_clock(self) -> Optional[object]:
        return None
