"""What the engine profiles (profiler.engine.Target): a user's own model and training loop
(:class:`UserTarget`), or one of the seed workloads (:class:`WorkloadTarget`). Both give the
engine the same things (a profiler over the model, batches, one training step), so the CLI, the
API, the experiments and the benchmarks profile either through the same engine calls.

Nothing here measures, reports or parses arguments.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

from profiler import instrument as instruments
from profiler.engine import LayerFilter, LayerProfiler, RunDescription, layer_filter
from profiler.instrument.base import NoPhaseEvents

# What a seed workload's report says its phases are (the step reports its own boundaries).
SEED_NOTES = [
    "Times are host wall-clock milliseconds per measured step (means; medians and IQR in "
    "step_ms and phases_ms); layer times are inclusive of the framework's per-layer overhead.",
    "loss_backward ends when the model output's gradient exists; backward is the rest of the "
    "backward call; 'other' is the step minus the seven measured phases."]


class UserTarget:
    """A user's model, loader, loss and optimizer in ``framework``, trained by the
    framework's common loop (``profiler.instrument.<framework>.training_step``). Checked here,
    before anything runs: the model by the framework's UserModel (and ``layers``), the loss
    and optimizer by its training_step."""

    def __init__(self, model, loader: Iterable, loss_fn, optimizer, *,
                 framework: str = "torch", device: Optional[str] = None,
                 layers: LayerFilter = None, name: Optional[str] = None,
                 mode: str = "eager", function: str = "profile_training"):
        module = instruments.load(framework, function)
        if mode not in ("eager", "graph"):
            raise ValueError(f"{function}: mode: expected 'eager' or 'graph', got {mode!r}")
        self.framework = framework
        self.mode = mode
        self.subject = module.UserModel(model, layer_filter(layers))
        self.events = module.PhaseEvents
        self.name = name or type(model).__name__
        self.loader = loader
        self.function = function
        self._step = module.training_step(model, loss_fn, optimizer, device, mode)
        self.instrument, self.cross_check = "hooks", False     # engine.RunDescription's

    def profiler(self, *, warmup: int, sync: bool) -> LayerProfiler:
        return LayerProfiler.for_subject(
            self.subject, self.events, warmup=warmup, sync=sync,
            description=RunDescription(self.name, mode=self.mode, instrument=self.instrument,
                                       cross_check=self.cross_check))

    def batches(self, steps_needed: Optional[int] = None) -> Iterator:
        return cycle(self.loader, self.function)

    def activate(self) -> None:
        """Nothing to switch: the model is this target's own."""

    def step(self, prof, batch):
        return self._step(prof, batch)

    def compile_count(self) -> Optional[int]:
        return None            # what a user's step compiles is not counted


class WorkloadTarget:
    """A seed workload (profiler.workloads), the same in every framework. ``impls`` (e.g.
    {"conv": "native"}) are set on it before each of its steps: a comparison's variants share
    one workload and differ in them. Its step reports its own phase boundaries (the workload's
    methods are the phases) and keeps each step's loss in ``losses``."""

    def __init__(self, workload, *, impls: Optional[Dict[str, str]] = None):
        self.workload = workload
        self.framework = workload.framework
        self.impls = dict(impls or {})
        self.losses: List[float] = []
        self.instrument, self.cross_check = "hooks", False     # engine.RunDescription's

    @classmethod
    def build(cls, framework: str, config=None, **fields) -> "WorkloadTarget":
        """The seed workload of ``framework`` and ``config`` (profiler.workloads.
        build_workload), built after the framework's instrument was imported (it may set the
        framework up before its first operator runs: MXNet's backward bulking)."""
        instruments.load(framework, "WorkloadTarget.build")
        from profiler.workloads import build_workload
        return cls(build_workload(framework, config, **fields))

    def description(self) -> RunDescription:
        w = self.workload
        impls = {"conv": w.conv_impl,
                 "loss": w.loss_impl if w.is_pose else "framework cross-entropy"}
        notes = list(SEED_NOTES[:1]) + (["In graph mode this step is one compiled call, the "
                                         "compiled_step phase."] if self._one_call
                                        else list(SEED_NOTES[1:]))
        if w.config.xla:
            notes.append("XLA: the compiled step was built with jit_compile=True.")
        return RunDescription(w.config.model, w.config.batch_size, impls, w.config.workers,
                              w.config.seed, notes, mode=w.mode, one_call=self._one_call,
                              instrument=self.instrument, cross_check=self.cross_check)

    @property
    def _one_call(self) -> bool:
        return tuple(self.workload.step_calls) == ("train_step",)

    def compile_count(self) -> Optional[int]:
        return self.workload.compile_count()

    def profiler(self, *, warmup: int, sync: bool) -> LayerProfiler:
        self.activate()                 # the report names the impls this target runs
        return LayerProfiler.for_subject(self.workload, NoPhaseEvents, warmup=warmup,
                                         sync=sync, description=self.description())

    def batches(self, steps_needed: Optional[int] = None) -> Iterator:
        """The workload's loader, for as many epochs as ``steps_needed`` takes, again and
        again."""
        w = self.workload
        per_epoch = max(1, len(w.sample_stream("train")) // w.config.batch_size)
        epochs = max(1, math.ceil((steps_needed or 1) / per_epoch))
        while True:
            yield from w.make_loader("train", epochs=epochs)

    def activate(self) -> None:
        changed = {kind: impl for kind, impl in self.impls.items()
                   if getattr(self.workload, f"{kind}_impl", None) != impl}
        if changed:
            self.workload.set_impls(**changed)

    def step(self, prof: Optional[LayerProfiler], batch) -> float:
        w = self.workload
        if prof is None:
            loss = w.train_step(w.to_device(batch))
            self.losses.append(loss)
            return loss
        with prof.phase("h2d"):
            batch = w.to_device(batch)
        if self._one_call:        # graph mode's one compiled call: no boundary inside it
            with prof.phase("compiled_step"):
                value = w.train_step(batch)
            self.losses.append(value)
            return value
        output = prof.mark_output(w.forward(batch))
        loss = w.loss_forward(output, batch)
        prof.boundary("backward_start")
        w.backward(loss)
        prof.boundary("backward_end")
        prof.boundary("optimizer_start")
        w.optimizer_step()
        prof.boundary("optimizer_end")
        value = w.loss_value(loss)
        self.losses.append(value)
        return value


def factory_targets(spec: str, framework: str, *, device: Optional[str] = None,
                    compare: Optional[Tuple[str, List[str]]] = None,
                    wrap: Optional[Callable] = None,
                    mode: str = "eager") -> Dict[Optional[str], UserTarget]:
    """The targets of a factory (profiler.api.load_factory's ``spec``): {None: its target},
    or with ``compare`` (KEY, variants) {variant: the target of factory(KEY=variant)}.
    ``wrap`` is applied to each model (DistributedDataParallel under torchrun). A factory that
    names another framework than ``framework`` is a ValueError."""
    from profiler import api
    builds = (api.build_variants(spec, *compare) if compare
              else {None: api.build_from_factory(spec)})
    targets: Dict[Optional[str], UserTarget] = {}
    for variant, built in builds.items():
        named = built.pop("framework", framework)
        if named != framework:
            raise ValueError(f"--model {spec}: the factory says framework {named!r}, "
                             f"--framework is {framework!r}")
        if wrap is not None:
            built["model"] = wrap(built["model"])
        targets[variant] = UserTarget(**built, framework=framework, device=device, mode=mode,
                                      function=f"--model {spec}")
    return targets


def seed_targets(framework: str, config, *, compare: Optional[Tuple[str, List[str]]] = None
                 ) -> Dict[Optional[str], WorkloadTarget]:
    """The seed workload of ``framework`` and ``config``: {None: its target}, or with
    ``compare`` (kind, impls) {impl: a target with that impl}. In eager mode the variants share
    the one workload (its weights, data and optimizer state), switched before each step; in
    graph mode each has a workload of its own, built from the same config (the same weights
    and batches), so switching never throws away a compiled graph."""
    if config is not None and config.mode == "graph" and compare:
        kind, variants = compare
        return {v: WorkloadTarget.build(framework, config.with_(**{f"{kind}_impl": v}))
                for v in variants}
    seed = WorkloadTarget.build(framework, config)
    if not compare:
        return {None: seed}
    kind, variants = compare
    return {v: WorkloadTarget(seed.workload, impls={kind: v}) for v in variants}


def cycle(loader: Iterable, caller: str = "profile_training") -> Iterator:
    """Batches of ``loader``, starting over when it ends; a loader that yields nothing, or
    that cannot start over (a generator, an iterator without repeat), is an error, not a
    hang."""
    served = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            served += 1
            yield batch
        if empty and served == 0:
            raise ValueError(f"{caller}: loader: expected an iterable that yields "
                             "batches, got one that yielded nothing")
        if empty:
            raise ValueError(f"{caller}: loader: ran out after {served} batches and "
                             f"yields nothing when iterated again (a generator or a one-pass "
                             f"iterator); pass a re-iterable loader (a list, a DataLoader, "
                             f"an iterator with repeat=True) or fewer steps")
