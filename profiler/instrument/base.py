"""The instrument contract: what every framework's module ``profiler.instrument.<framework>``
offers the engine (profiler.engine), in one place. ``check_module`` checks a module against
it; tests/test_instrument_contract.py runs that check for every framework of
ops.frameworks.FRAMEWORKS.

A framework's module holds four things:

- ``Instrument`` (a subclass of :class:`InstrumentBase`): produces the ranges of a step, layer
  by layer. Two kinds (``InstrumentBase.kind``): ``"hooks"`` records ranges on the Recorder
  while the step runs; ``"trace"`` reads them after the step from a trace the framework itself
  wrote, in ``collect_step`` (``profiler.instrument.<framework>_trace``: ``TraceInstrument``,
  built with the step's ``mode``; profiler.instrument.attribution turns op events into
  ranges). The engine calls both through the same seam, so every analysis, view and
  comparison works on either.
- ``UserModel``: a user's own model seen as a :class:`Subject` (what an Instrument needs of
  the thing it instruments). A seed workload (profiler.workloads) is a Subject too.
- ``PhaseEvents``: the framework's own events at a step's phase boundaries (the backward call,
  the optimizer step), reported to the engine as they happen (:class:`PhaseEventSource`).
- ``training_step(model, loss_fn, optimizer, device=None, mode="eager")``: the framework's
  common training loop body for a user's model (:class:`TrainingStep`), in its eager or its
  compiled ("graph") mode (a framework without one refuses "graph" with the reason).

Layer ranges: the recorder's ``begin``/``end`` (or ``record``, for times taken elsewhere) with
kind "layer", the layer's name from ``subject.named_layers()``, direction "forward" or
"backward" and the layer's type. A layer whose input needs no gradient (the first one) must
still get its backward end: a hook on its parameters' gradients, not on its input's.

This module knows no framework; it must not import one.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import (Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple,
                    runtime_checkable)

#: The boundary events a step reports (PhaseEvents, or a seed workload's step itself).
PHASE_EVENTS = ("backward_start", "backward_end", "optimizer_start", "optimizer_end")
INSTRUMENT_KINDS = ("hooks", "trace")


@runtime_checkable
class Subject(Protocol):
    """What an Instrument and the engine need of the model they profile: a user's model
    (``UserModel``) or a seed workload (profiler.workloads). A framework's Instrument may need
    more of it (PyTorch's the ``device``, MXNet's the ``net`` and ``ctx``); its module
    docstring says what. Optional: ``watch_communication(on_launch) -> note or None``, for a
    model that all-reduces its gradients (PyTorch's DistributedDataParallel): calls
    ``on_launch`` as each gradient bucket's all-reduce is launched."""

    framework: str

    def named_layers(self) -> Sequence[Tuple[str, Any]]:
        """(name, layer object) of every layer to time, in forward order."""

    def synchronize(self) -> None:
        """Waits until queued device or engine work has run."""

    def batch_size_of(self, output) -> int:
        """Samples in a step, from the model's output."""

    def version(self) -> str:
        """The framework's version string."""

    def device_kind(self) -> str:
        """"cpu" or "cuda"."""

    def device_name(self) -> str:
        """The processor or GPU the model runs on, as its maker names it."""


@runtime_checkable
class PhaseEventSource(Protocol):
    """A framework's phase boundaries: ``PhaseEvents(on_event)`` calls ``on_event(name)``, a
    name from PHASE_EVENTS, at each boundary while installed."""

    notes: List[str]

    def install(self) -> None:
        """Starts reporting (idempotent)."""

    def remove(self) -> None:
        """Stops reporting and puts back everything it changed (idempotent)."""


class NoPhaseEvents:
    """A PhaseEventSource that reports nothing: for a step that reports its boundaries itself
    (a seed workload's step, profiler.targets.WorkloadTarget)."""

    def __init__(self, on_event: Callable[[str], None]):
        self.notes: List[str] = []

    def install(self) -> None:
        pass

    def remove(self) -> None:
        pass


class TrainingStep(Protocol):
    """What ``training_step(model, loss_fn, optimizer, device=None, mode="eager")`` returns:
    ``step(prof, batch)`` runs one training step on ``batch`` (inputs, targets); with ``prof``
    a LayerProfiler it marks the h2d phase and the model's output (``prof.mark_output``),
    with ``prof`` None it runs unprofiled. Returns the loss (the framework's value)."""

    def __call__(self, prof, batch) -> Any:
        ...


class InstrumentBase:
    """The base of every framework's Instrument. The engine calls, in a step:
    ``install()`` (before an instrumented step; idempotent), ``mark_output(output)``,
    ``finish_backward()`` (right after the backward call returns), ``collect_step(step,
    window)`` (after the step, outside its timing, for a "trace" instrument), ``remove()`` (before an uninstrumented step
    and at the end; idempotent). ``on_output_grad`` is set by the engine."""

    #: "hooks": ranges recorded while the step runs; "trace": read after it (collect_step).
    kind = "hooks"
    #: True where the framework runs asynchronously and the engine must wait for its queue at
    #: every phase boundary for phase times to mean compute time.
    phase_sync = False

    def __init__(self, subject: Subject, recorder):
        self.workload = subject          # the Subject; named so for the instruments' history
        self.recorder = recorder
        self.on_output_grad: Callable[[], None] = lambda: None
        self.notes: List[str] = []       # sentences for the report: what each number means
        self.layers = subject.named_layers()

    def install(self) -> None:
        """Attaches the layer hooks (or starts the framework's tracer)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Detaches every hook; leaves nothing of the instrument behind."""
        raise NotImplementedError

    def mark_output(self, output):
        """Returns ``output`` (or an identity of it) whose gradient, when the backward pass
        reaches it, calls ``on_output_grad``: the end of the loss backward."""
        raise NotImplementedError

    def finish_backward(self) -> None:
        """Called right after the backward call returns: closes layer backward ranges whose
        end no hook could see. Default: every layer's backward end was seen by a hook."""

    def collect_step(self, step: int, window: Tuple[int, int]) -> None:
        """After step ``step`` (-1: warm-up) has ended, outside its timing: a "trace"
        instrument records the step's layer ranges from the framework's trace here;
        ``window`` is the step's (start_ns, end_ns) on the recorder's clock. Default: nothing
        to collect."""

    def op_counts(self) -> Dict[tuple, float]:
        """A "trace" instrument: the op events per measured step it attributed to each
        (layer, direction) (the report counts them in place of calls). Default: none."""
        return {}

    def accounting(self) -> Optional[Dict[str, Any]]:
        """A "trace" instrument: the report's "trace" section (what the trace covered of the
        step). Default: None (no section)."""
        return None

    def device_clock(self) -> Optional[object]:
        """A recorder.DeviceClock for the subject's GPU, or None on the CPU."""
        return None


_STEP_PARAMETERS = ("model", "loss_fn", "optimizer", "device", "mode")


def check_module(module: ModuleType) -> List[str]:
    """What ``module`` (a ``profiler.instrument.<framework>``) lacks of the contract; empty
    when it meets it. Checks the names, the types and the call signatures, not behaviour
    (the per-framework instrument and API tests do that)."""
    problems: List[str] = []
    instrument = getattr(module, "Instrument", None)
    if not (inspect.isclass(instrument) and issubclass(instrument, InstrumentBase)):
        problems.append("Instrument: expected a subclass of InstrumentBase")
    else:
        if instrument.kind not in INSTRUMENT_KINDS:
            problems.append(f"Instrument.kind: expected one of {INSTRUMENT_KINDS}, got "
                            f"{instrument.kind!r}")
        for name in ("install", "remove", "mark_output"):
            if getattr(instrument, name) is getattr(InstrumentBase, name):
                problems.append(f"Instrument.{name}: not implemented")
        if instrument.kind == "trace" and instrument.collect_step is InstrumentBase.collect_step:
            problems.append("Instrument.collect_step: a trace instrument must implement it")
    user_model = getattr(module, "UserModel", None)
    if not inspect.isclass(user_model):
        problems.append("UserModel: expected a class")
    else:
        for name in ("named_layers", "synchronize", "batch_size_of", "version", "device_kind",
                     "device_name"):
            if not callable(getattr(user_model, name, None)):
                problems.append(f"UserModel.{name}: expected a method")
        if not isinstance(getattr(user_model, "framework", None), str):
            problems.append("UserModel.framework: expected the framework's name")
        elif user_model.framework != module.__name__.rpartition(".")[2]:
            problems.append(f"UserModel.framework: expected "
                            f"{module.__name__.rpartition('.')[2]!r}, got "
                            f"{user_model.framework!r}")
    events = getattr(module, "PhaseEvents", None)
    if not inspect.isclass(events):
        problems.append("PhaseEvents: expected a class")
    else:
        for name in ("install", "remove"):
            if not callable(getattr(events, name, None)):
                problems.append(f"PhaseEvents.{name}: expected a method")
        if list(inspect.signature(events).parameters) != ["on_event"]:
            problems.append(f"PhaseEvents: expected PhaseEvents(on_event), got "
                            f"PhaseEvents{inspect.signature(events)}")
    step = getattr(module, "training_step", None)
    if not callable(step):
        problems.append("training_step: expected a function")
    else:
        params = inspect.signature(step).parameters
        if tuple(params) != _STEP_PARAMETERS or params["device"].default is not None \
                or params["mode"].default != "eager":
            problems.append(f"training_step: expected training_step(model, loss_fn, "
                            f"optimizer, device=None, mode='eager'), got training_step"
                            f"{inspect.signature(step)}")
    return problems
