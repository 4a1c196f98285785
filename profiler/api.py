"""Profile a user's own model and training loop: the public facade over the engine
(profiler.engine). ``LayerProfiler`` around the loop the user already has, ``profile_training``
for the common loop run for them, ``compare_training`` for variants of it (e.g. two conv
implementations) in interleaved rounds.

    prof = LayerProfiler(model, framework="torch", warmup=2)
    for x, t in loader:
        with prof.step():
            with prof.phase("h2d"):
                x, t = x.to(dev), t.to(dev)
            out = prof.mark_output(model(x))       # the loss phases start here
            loss = loss_fn(out, t)
            loss.backward()
            opt.step(); opt.zero_grad()
    prof.report().save("runs/mine")

Layer ranges come from the framework's instrument (profiler.instrument.<framework>), the same
one the seed workloads are profiled with. The step's phases come from boundaries, in order:
the step's start, ``mark_output`` (forward ends), the backward call's start (loss_forward
ends), the model output's gradient (loss_backward ends), the backward call's end (backward
ends), the optimizer step's start and end; the framework's own events supply the boundaries
where it has them (profiler.instrument.<framework>.PhaseEvents), and ``phase(name)`` marks
any phase by hand (a hand-marked phase wins over the events for that phase). What no
boundary covers is "other". The report has the CLI's schema (profiler.report), checked the
same way (its phases add up to the step).

This module is framework-free and holds no mechanism: each function checks its arguments and
hands them to the engine (profiler.engine) with a target (profiler.targets).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from profiler import engine
from profiler import instrument as instruments
from profiler.engine import Comparison, LayerFilter, LayerProfiler, Report
from profiler.targets import UserTarget

__all__ = ["LayerProfiler", "Report", "Comparison", "profile_training", "compare_training",
           "diff_runs", "layer_table_across", "load_factory", "build_from_factory",
           "build_variants", "FACTORY_KEYS"]


def profile_training(model, loader: Iterable, loss_fn: Callable, optimizer, *,
                     framework: str = "torch", steps: int = 8, warmup: int = 2,
                     overhead_steps: Optional[int] = None, device: Optional[str] = None,
                     layers: LayerFilter = None, name: Optional[str] = None,
                     sync: bool = False, mode: str = "eager", instrument: str = "auto",
                     cross_check: bool = False,
                     progress: Optional[Callable[[int, int], None]] = None) -> Report:
    """Runs ``warmup + steps`` training steps of ``model`` on batches ``(inputs, targets)``
    from ``loader`` (cycled if it runs out), profiled, and ``overhead_steps`` (default
    ``steps``) uninstrumented steps for the overhead, alternating step by step
    (stats.overhead_schedule); returns the report. A run that fails half-way returns the
    report of the steps measured so far, its error in ``errors``; one that measured nothing
    raises. ``mode`` "graph": the framework's compiled mode (torch.compile, a hybridized
    block, one tf.function for the step; Chainer has none), the compilation in the report's
    "compilation". ``instrument`` "auto" (default): per-layer times from the framework's own
    trace in graph mode where it gives them (no hook runs inside a compiled graph), from
    hooks otherwise; "hooks" or "trace" to choose. ``cross_check``: eager mode, the trace
    read on the same steps as the hooks, their agreement in the report's "cross_check"."""
    for arg, value, least in (("steps", steps, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"profile_training: {arg}: expected an int >= {least}, got "
                             f"{value!r}")
    target = UserTarget(model, loader, loss_fn, optimizer, framework=framework, device=device,
                        layers=layers, name=name, mode=mode)
    target.instrument = instruments.choose(framework, mode, instrument, "profile_training")
    target.cross_check = cross_check
    return engine.profile(target, steps=steps, warmup=warmup, overhead_steps=overhead_steps,
                          sync=sync, progress=progress, function="profile_training")


def compare_training(builds: Dict[str, Dict[str, Any]], *, framework: str = "torch",
                     rounds: int = 5, steps_per_round: int = 2, warmup: int = 2,
                     device: Optional[str] = None, layers: LayerFilter = None,
                     sync: bool = False, mode: str = "eager", instrument: str = "auto",
                     progress: Optional[Callable[[int, int], None]] = None) -> Comparison:
    """Variants of one training setup, profiled in interleaved rounds (profiler.engine.
    compare). ``builds`` maps each variant's name to what profile_training takes for it:
    dict(model=, loader=, loss_fn=, optimizer=[, name=]); the first variant is the baseline.
    Every step is instrumented (``instrument`` as in profile_training);
    ``Comparison.differences()`` gives the per-phase differences
    with their intervals. A run that fails half-way keeps what was measured (its error in
    ``errors`` and in that variant's report); one that measured nothing raises.
    """
    if not isinstance(builds, dict) or len(builds) < 2:
        got = f"{len(builds)} variant(s)" if isinstance(builds, dict) else type(builds).__name__
        raise ValueError(f"compare_training: builds: expected a dict of at least two "
                         f"variants (name -> dict(model=, loader=, loss_fn=, optimizer=)), "
                         f"got {got}")
    for variant, build in builds.items():
        _check_build(f"compare_training: builds[{variant!r}]", build)
    targets = {variant: UserTarget(build["model"], build["loader"], build["loss_fn"],
                                   build["optimizer"], framework=framework, device=device,
                                   layers=layers, name=build.get("name"), mode=mode,
                                   function=f"compare_training: {variant}")
               for variant, build in builds.items()}
    for target in targets.values():
        target.instrument = instruments.choose(framework, mode, instrument,
                                               "compare_training")
    return engine.compare(targets, rounds=rounds, steps_per_round=steps_per_round,
                          warmup=warmup, sync=sync, progress=progress,
                          function="compare_training")


def diff_runs(*runs, renames: Optional[Dict[str, str]] = None, rank="slowest",
              labels: Optional[Sequence[str]] = None):
    """Where the gap between runs comes from: ``python -m profiler.diff`` from Python
    (profiler.diff.diff_runs). ``runs``: report folders or files, merged reports, --framework
    all or --compare folders, report dicts or Reports; the first is the baseline. Returns a
    profiler.diff.Diff: ``doc`` (per phase and layer each run's median and IQR, the difference
    with its 95% interval, the gap breakdown, the comparability warnings), ``print()``,
    ``save(out)`` (diff.json, the waterfall plots) and ``gate(threshold_pct, on=["step"])``
    (``.exit_code``: 0, 1 slower, 3 cannot judge)."""
    from profiler.diff import diff_runs as run_diff
    return run_diff(*runs, renames=renames, rank=rank, labels=labels)


def layer_table_across(reports: Sequence[Any]) -> Dict[str, Any]:
    """The layers of several reports (Reports or report dicts, e.g. one per framework) side by
    side, as ``--framework all`` prints them: {"labels", "rows": [{"name", "type",
    "forward_ms": {label: ms}, "backward_ms": {...}, "ratio": {label: (fwd + bwd) over the
    first report's}}]} (profiler.report.layer_table_across; render_layers_across prints it)."""
    from profiler.report import layer_table_across as table
    docs = [getattr(r, "doc", r) for r in reports]
    if not docs or not all(isinstance(d, dict) for d in docs):
        raise ValueError(f"layer_table_across: reports: expected a list of Reports or report "
                         f"dicts, got {[type(d).__name__ for d in docs]}")
    return table(docs)


def _check_build(where: str, build: Any) -> None:
    """A variant's build holds what profile_training takes, and nothing else."""
    if not isinstance(build, dict) or any(k not in build for k in FACTORY_KEYS):
        got = sorted(build) if isinstance(build, dict) else type(build).__name__
        raise ValueError(f"{where}: expected a dict with keys {list(FACTORY_KEYS)} "
                         f"(optionally name), got {got}")
    unknown = sorted(set(build) - set(FACTORY_KEYS) - {"name"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; expected {list(FACTORY_KEYS)} and "
                         f"optionally name")

# --------------------------------------------------------------------------- factories

FACTORY_KEYS = ("model", "loader", "loss_fn", "optimizer")


def load_factory(spec: str) -> Callable[[], Dict[str, Any]]:
    """The factory named by ``spec``: "package.module:function" (imported) or
    "path/to/file.py:function" (loaded from the file). The factory takes no arguments and
    returns a dict with model, loader, loss_fn, optimizer (what profile_training takes), and
    optionally framework and name."""
    import importlib.util
    import sys
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ValueError(f"--model: expected a seed workload or FACTORY as "
                         f"'package.module:function' or 'path/to/file.py:function', got "
                         f"{spec!r}")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--model {spec}: {path}: no such file")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(path.stem, module)    # pickling of its classes (loader workers)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(f"--model {spec}: cannot import {where!r}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"--model {spec}: {where} has no function {attr!r}"
                         + ("" if factory is None else f" ({attr} is a "
                                                       f"{type(factory).__name__})"))
    return factory


def build_from_factory(spec: str) -> Dict[str, Any]:
    """Calls the factory of ``spec`` and checks what it returned."""
    return _checked_factory_result(f"--model {spec}", load_factory(spec)())


def build_variants(spec: str, key: str, variants: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """The factory of ``spec`` called once per variant with the keyword argument
    ``key=variant`` (``--compare KEY=A,B,...``), each result checked as build_from_factory
    checks it; {variant: its build}, in the given order. A factory that takes no keyword
    ``key`` (neither a parameter of that name nor **kwargs) is refused before any call; one
    that raises for a variant is a ValueError naming the variant."""
    factory = load_factory(spec)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):      # a builtin or C callable: the call will tell
        signature = None
    if signature is not None:
        params = signature.parameters.values()
        named = signature.parameters.get(key)
        if not (any(p.kind is p.VAR_KEYWORD for p in params)
                or (named is not None and named.kind in (named.POSITIONAL_OR_KEYWORD,
                                                         named.KEYWORD_ONLY))):
            listed = ", ".join(("*" if p.kind is p.VAR_POSITIONAL else "") + p.name
                               for p in params)
            raise ValueError(f"--compare {key}=...: the factory {spec} takes no keyword "
                             f"{key!r} (its parameters: {listed or 'none'})")
    builds = {}
    for variant in variants:
        try:
            built = factory(**{key: variant})
        except Exception as e:
            raise ValueError(f"--compare {key}={variant}: the factory {spec} raised "
                             f"{type(e).__name__}: {e}") from e
        builds[variant] = _checked_factory_result(f"--model {spec} ({key}={variant})", built)
    return builds


def _checked_factory_result(where: str, built: Any) -> Dict[str, Any]:
    if not isinstance(built, dict) or any(k not in built for k in FACTORY_KEYS):
        got = sorted(built) if isinstance(built, dict) else type(built).__name__
        raise ValueError(f"{where}: the factory must return a dict with keys "
                         f"{list(FACTORY_KEYS)} (optionally framework, name), got {got}")
    unknown = sorted(set(built) - set(FACTORY_KEYS) - {"framework", "name"})
    if unknown:
        raise ValueError(f"{where}: the factory returned unknown keys {unknown}; "
                         f"expected {list(FACTORY_KEYS)} and optionally framework, name")
    return built
