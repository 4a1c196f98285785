"""Runs a workload's training steps under the recorder: phases, layers, warm-up, measured
steps and uninstrumented steps (for the instrumentation overhead), and impl comparisons in
interleaved rounds. Produces Timelines and step times; reports are built by the caller.

A step's phases, in order: data_wait (``next`` on the framework's loader), h2d, forward,
loss_forward, loss_backward (from the backward call to the moment the model output's
gradient exists), backward (the rest of the backward call), optimizer; "other" is what is
left of the step (reading the loss value, waiting for the device at the step's end).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

from profiler.analysis.stats import interleaved_order, overhead_schedule
from profiler.instrument import instrument_for
from profiler.recorder import NVTX, Recorder
from profiler.timeline import Timeline


@dataclass
class RunResult:
    timeline: Timeline
    losses: List[float] = field(default_factory=list)
    uninstrumented_step_ms: List[float] = field(default_factory=list)
    instrumented_step_ms: List[float] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


class _BackwardSplit:
    """Times the backward call as two phases: loss_backward until the model output's
    gradient exists (the instrument's marker calls ``mark``), backward after it."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.mark_ns: Optional[int] = None
        self._nvtx = None

    def begin(self) -> None:
        self.mark_ns = None
        self.start_ns = self.recorder.now_ns()
        if self.recorder.enabled:
            self._nvtx = NVTX.start("loss_backward", "orange")

    def mark(self) -> None:
        if self.mark_ns is None:
            self.mark_ns = self.recorder.now_ns()
            if self._nvtx is not None:
                NVTX.end(self._nvtx)
                self._nvtx = NVTX.start("backward", "red")

    def end(self, phase_sync: Callable[[], None]) -> None:
        phase_sync()
        end_ns = self.recorder.now_ns()
        if self._nvtx is not None:
            NVTX.end(self._nvtx)
            self._nvtx = None
        # No marker (the output needed no gradient): the whole call counts as backward.
        split = min(max(self.mark_ns or self.start_ns, self.start_ns), end_ns)
        track = "host:" + __import__("threading").current_thread().name
        self.recorder.record("loss_backward", "phase", self.start_ns, split, track=track)
        self.recorder.record("backward", "phase", split, end_ns, track=track)


class StepRunner:
    """One workload, its instrument and its loader, stepping on demand."""

    def __init__(self, workload, *, steps_needed: int, sync: bool = False):
        self.workload = workload
        self.timeline = Timeline()
        self.recorder = Recorder(self.timeline, sync=sync)
        self.instrument = instrument_for(workload, self.recorder)
        self.recorder.device_clock = self.instrument.device_clock()
        self.split = _BackwardSplit(self.recorder)
        self.instrument.on_output_grad = self.split.mark
        per_epoch = len(workload.sample_stream("train")) // workload.config.batch_size
        self.batches = self._batches(max(1, math.ceil(steps_needed / max(per_epoch, 1))))
        self.losses: List[float] = []

    def _batches(self, epochs: int) -> Iterator:
        yield from self.workload.make_loader("train", epochs=epochs)

    def instrumented_step(self, step: int) -> float:
        """One step with every range recorded; ``step`` -1 for warm-up. Returns ms."""
        w, rec = self.workload, self.recorder
        sync = w.synchronize if self.instrument.phase_sync else (lambda: None)
        rec.enabled = True
        rec.start_step(step)
        began = time.perf_counter_ns()
        step_token = rec.begin("step", "step")
        with rec.range("data_wait", "phase"):
            batch = next(self.batches)
        with rec.range("h2d", "phase"):
            batch = w.to_device(batch)
            sync()
        with rec.range("forward", "phase"):
            output = self.instrument.mark_output(w.forward(batch))
            sync()
        with rec.range("loss_forward", "phase"):
            loss = w.loss_forward(output, batch)
            sync()
        self.split.begin()
        w.backward(loss)
        self.instrument.finish_backward()
        self.split.end(sync)
        with rec.range("optimizer", "phase"):
            w.optimizer_step()
            sync()
        self.losses.append(w.loss_value(loss))
        w.synchronize()
        rec.end(step_token)
        rec.finish_step()
        return (time.perf_counter_ns() - began) / 1e6

    def plain_step(self) -> float:
        """One step without hooks, ranges or phase synchronisation. Returns ms."""
        w = self.workload
        self.recorder.enabled = False
        began = time.perf_counter_ns()
        batch = w.to_device(next(self.batches))
        self.losses.append(w.train_step(batch))
        w.synchronize()
        return (time.perf_counter_ns() - began) / 1e6

    @contextlib.contextmanager
    def uninstrumented(self):
        self.instrument.remove()
        try:
            yield
        finally:
            self.instrument.install()


def profile(workload, *, warmup: int, iters: int, overhead_iters: int, sync: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> RunResult:
    """Warm-up steps, then ``iters`` instrumented steps and ``overhead_iters`` uninstrumented
    ones, alternating step by step (stats.overhead_schedule: load and drift hit both alike)."""
    runner = StepRunner(workload, steps_needed=warmup + iters + overhead_iters, sync=sync)
    result = RunResult(runner.timeline, notes=list(runner.instrument.notes))
    total, done = warmup + iters + overhead_iters, 0
    try:
        for _ in range(warmup):
            runner.instrumented_step(-1)
            done += 1
            if progress:
                progress(done, total)
        for instrumented in overhead_schedule(iters, overhead_iters):
            if instrumented:
                result.instrumented_step_ms.append(
                    runner.instrumented_step(len(result.instrumented_step_ms)))
            else:
                with runner.uninstrumented():     # hooks off and back on, outside the timing
                    result.uninstrumented_step_ms.append(runner.plain_step())
            done += 1
            if progress:
                progress(done, total)
    except Exception as e:   # keep what was measured: the caller reports the error beside it
        result.errors.append(f"{type(e).__name__}: {e}")
    finally:
        runner.instrument.remove()
    result.losses = runner.losses
    return result


def compare(workload, *, kind: str, variants: List[str], rounds: int, steps_per_round: int,
            warmup: int, sync: bool = False,
            progress: Optional[Callable[[int, int], None]] = None) -> Dict[str, object]:
    """Runs ``variants`` of the ``kind`` impl ("conv" or "loss") in interleaved rounds (the
    order rotating each round) on one workload. Returns {variant: Timeline} and the round
    each step belonged to."""
    runner = StepRunner(workload, steps_needed=warmup * len(variants)
                        + rounds * steps_per_round * len(variants), sync=sync)
    timelines = {v: Timeline() for v in variants}
    step_round: Dict[str, Dict[int, int]] = {v: {} for v in variants}
    total, done = (warmup + rounds * steps_per_round) * len(variants), 0
    errors: List[str] = []
    try:
        for variant in variants:
            workload.set_impls(**{kind: variant})
            for _ in range(warmup):
                runner.instrumented_step(-1)
                done += 1
                if progress:
                    progress(done, total)
        for r, order in enumerate(interleaved_order(variants, rounds)):
            for variant in order:
                workload.set_impls(**{kind: variant})
                runner.recorder.timeline = timelines[variant]
                for _ in range(steps_per_round):
                    step = len(step_round[variant])
                    runner.instrumented_step(step)
                    step_round[variant][step] = r
                    done += 1
                    if progress:
                        progress(done, total)
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
    finally:
        runner.instrument.remove()
    return {"timelines": timelines, "step_round": step_round, "errors": errors,
            "notes": list(runner.instrument.notes)}
