"""Records the ranges of a training run into a Timeline and mirrors each as an NVTX range.

The instrumentation of every framework (profiler.instrument.<framework>) calls
:class:`Recorder` only: ``begin``/``end`` (or ``range``) for ranges timed on the host clock as
they happen, ``record`` for ranges whose times were taken elsewhere (e.g. on an engine thread).
On the GPU a :class:`DeviceClock` adds a second clock: an event recorded on the stream at each
boundary, read once per step (no host synchronisation per range), giving a "device:" track
beside the host one. ``sync`` mode instead synchronises the device at every boundary.

NVTX: every range opened with ``begin`` is also an NVTX start/end range in domain "deepprof",
one colour per phase, so an Nsight Systems capture shows the same structure (``record`` ranges
were timed elsewhere: their callers emit NVTX through ``NVTX`` themselves, as the engine's
phase cursor does). They go through the NVTX C API (ops.nvtx, csrc/
nvtx_ranges.cpp), which every nsys records; where ops._C was built without the nvtx3 headers,
through the ``nvtx`` package, whose ranges nsys 2022.4 does not record (the emitter says so).
A range costs about 0.3 us without a tool attached. ``NVTX`` is the emitter used; tests
replace it with a recording double.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol

from profiler.timeline import Range, Timeline

NVTX_DOMAIN = "deepprof"
PHASE_COLOURS = {"step": "white", "data_wait": "grey", "h2d": "cyan", "forward": "green",
                 "loss_forward": "yellow", "loss_backward": "orange", "backward": "red",
                 "optimizer": "purple", "other": "black"}
LAYER_COLOURS = {"forward": "lime", "backward": "magenta"}


class NvtxEmitter:
    """Start/end NVTX ranges (they need not nest per thread, which engine-thread callbacks and
    ranges ending on another thread require) through the first backend that is there:

    - ``"c-api"``: ops.nvtx, the NVTX C API in ops._C (recorded by every nsys);
    - ``"nvtx-package"``: the ``nvtx`` package (not recorded by nsys 2022.4; ``note`` says so);
    - ``None``: no NVTX at all (a profiling run without NVTX is still a run).
    """

    def __init__(self, prefer: Optional[str] = None):
        self.backend: Optional[str] = None
        self.note = ""
        self._start = self._end = None
        if prefer not in (None, "c-api", "nvtx-package"):
            raise ValueError(f"prefer: expected 'c-api', 'nvtx-package' or None, got {prefer!r}")
        for backend in [prefer] if prefer else ["c-api", "nvtx-package"]:
            if backend == "c-api":
                try:
                    from ops import nvtx as c_api
                    if not c_api.built():
                        self.note = ("ops._C was built without the NVTX C API (no nvtx3 "
                                     "headers); ")
                        continue
                except ImportError as error:          # ops._C not built
                    self.note = f"ops.nvtx does not import ({error}); "
                    continue
                self.backend, self._start, self._end = backend, c_api.start_range, c_api.end_range
                self.note = ""
                break
            if backend == "nvtx-package":
                try:
                    import nvtx
                except ImportError:
                    continue
                self.backend = backend
                self._start = lambda message, colour: nvtx.start_range(
                    message=message, color=colour, domain=NVTX_DOMAIN)
                self._end = nvtx.end_range
                self.note += ("NVTX ranges go through the nvtx Python package, which Nsight "
                              "Systems 2022.4 does not record (rebuild ops._C with the CUDA "
                              "toolkit's nvtx3 headers)")
                break
        if self.backend is None:
            self.note += "no NVTX ranges: neither the NVTX C API nor the nvtx package is here"
        if self.backend == "c-api":
            # Bound straight to ops.nvtx: one Python call less per range (about 0.3 us of 0.7).
            # Its start never returns None, so its end needs no None check.
            self.start, self.end = self._start, self._end
        else:
            # Said once per process, where a capture would otherwise silently lack our ranges.
            logging.getLogger(__name__).warning("%s", self.note)

    @property
    def available(self) -> bool:
        return self.backend is not None

    def start(self, message: str, colour: str) -> Any:
        if self._start is None:
            return None
        return self._start(message, colour)

    def end(self, handle: Any) -> None:
        if handle is not None:
            self._end(handle)


NVTX = NvtxEmitter()


class DeviceClock(Protocol):
    """A GPU stream's clock as the framework offers it (torch.cuda.Event, cupy Event)."""

    def mark(self) -> Any:
        """Records an event on the current stream and returns it (no synchronisation)."""

    def elapsed_ms(self, start: Any, end: Any) -> float:
        """ms between two recorded events (after synchronize)."""

    def synchronize(self) -> None:
        """Waits until the device has run everything queued."""


@dataclass
class _Open:
    name: str
    kind: str
    start_ns: int
    nvtx: Any
    direction: Optional[str]
    layer_type: Optional[str]
    track: str
    device_start: Any = None


class Recorder:
    """Collects ranges for one run. ``step`` is the current training step (-1 while warming
    up: recorded but not counted); ``enabled`` False makes every call a cheap no-op (the
    uninstrumented steps)."""

    def __init__(self, timeline: Optional[Timeline] = None, *,
                 device_clock: Optional[DeviceClock] = None, sync: bool = False,
                 clock: Callable[[], int] = time.perf_counter_ns):
        self.timeline = timeline if timeline is not None else Timeline()
        self.device_clock = device_clock
        self.sync = sync
        self.clock = clock
        self.step = -1
        self.enabled = True
        self._lock = threading.Lock()        # engine threads record too (MXNet markers)
        self._pending_device: List[tuple] = []
        self._anchor: Optional[tuple] = None  # (host ns, device event) at the step's start

    # -- host ranges -------------------------------------------------------------------------
    def begin(self, name: str, kind: str, *, direction: Optional[str] = None,
              layer_type: Optional[str] = None, track: Optional[str] = None) -> Optional[_Open]:
        if not self.enabled:
            return None
        if self.sync and self.device_clock is not None:
            self.device_clock.synchronize()
        colour = LAYER_COLOURS[direction] if kind == "layer" else PHASE_COLOURS.get(name,
                                                                                    "blue")
        label = f"{name} ({direction})" if direction else name
        device_start = self.device_clock.mark() if (self.device_clock is not None
                                                     and not self.sync) else None
        return _Open(name, kind, self.clock(), NVTX.start(label, colour), direction, layer_type,
                     track or f"host:{threading.current_thread().name}", device_start)

    def end(self, token: Optional[_Open]) -> None:
        if token is None:
            return
        if self.sync and self.device_clock is not None:
            self.device_clock.synchronize()
        end_ns = self.clock()
        NVTX.end(token.nvtx)
        self._add(Range(token.name, token.kind, token.start_ns, end_ns, token.track, self.step,
                        token.direction, token.layer_type))
        if token.device_start is not None:
            self._pending_device.append((token, self.device_clock.mark(), self.step))

    def range(self, name: str, kind: str, **kwargs) -> "_RangeContext":
        """``with recorder.range("forward", "phase"): ...``"""
        return _RangeContext(self, name, kind, kwargs)

    def record(self, name: str, kind: str, start_ns: int, end_ns: int, *, track: str,
               direction: Optional[str] = None, layer_type: Optional[str] = None,
               step: Optional[int] = None) -> None:
        """A range timed elsewhere (e.g. engine-thread markers): added as given."""
        if not self.enabled:
            return
        self._add(Range(name, kind, start_ns, end_ns, track,
                        self.step if step is None else step, direction, layer_type))

    def now_ns(self) -> int:
        return self.clock()

    def _add(self, r: Range) -> None:
        with self._lock:
            self.timeline.add(r)

    # -- steps and the device clock ----------------------------------------------------------
    def start_step(self, step: int) -> None:
        """Begins step ``step`` (-1: warm-up); on the GPU, anchors the device clock."""
        self.step = step
        if self.enabled and self.device_clock is not None and not self.sync:
            self._anchor = (self.clock(), self.device_clock.mark())

    def finish_step(self) -> None:
        """Resolves the step's device events into "device:" ranges (one synchronisation per
        step, after the step's own work was queued)."""
        if not self._pending_device or self._anchor is None:
            self._pending_device.clear()
            return
        self.device_clock.synchronize()
        anchor_ns, anchor_event = self._anchor
        for token, end_event, step in self._pending_device:
            start = anchor_ns + int(self.device_clock.elapsed_ms(anchor_event,
                                                                 token.device_start) * 1e6)
            end = anchor_ns + int(self.device_clock.elapsed_ms(anchor_event, end_event) * 1e6)
            self._add(Range(token.name, token.kind, start, max(start, end), "device:stream",
                            step, token.direction, token.layer_type))
        self._pending_device.clear()


class _RangeContext:
    def __init__(self, recorder: Recorder, name: str, kind: str, kwargs):
        self.recorder, self.name, self.kind, self.kwargs = recorder, name, kind, kwargs

    def __enter__(self):
        self.token = self.recorder.begin(self.name, self.kind, **self.kwargs)
        return self.token

    def __exit__(self, *exc):
        self.recorder.end(self.token)
        return False
