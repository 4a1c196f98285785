"""Per-framework instrumentation: each framework's natural hooks turned into layer ranges on a
Recorder. One module per framework with the same shape; the contract they meet is written in
``base.py``. Where a framework writes a trace of its own, ``<framework>_trace`` holds a second
instrument that reads it after the step (:func:`load_trace`).

:func:`load` is the one way to get a framework's module: importing it may configure the
framework before its first operator runs (MXNet's backward bulking), so it must come before a
workload or a user's model is built, and everything that builds one calls this first.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ops import frameworks

#: Why a framework has no trace-based instrument.
NO_TRACE = {"chainer": "Chainer writes no trace of its own on the CPU (its TimerHook is a "
                       "function hook, the same mechanism as the hook-based instrument)"}


def load(framework: str, function: str = "profiler.instrument.load") -> ModuleType:
    """The instrument module of ``framework`` (one of ops.frameworks.FRAMEWORKS), imported."""
    frameworks.check_name(function, framework)
    return importlib.import_module(f"profiler.instrument.{framework}")


def load_trace(framework: str, function: str = "profiler.instrument.load_trace") -> ModuleType:
    """The trace-based instrument module of ``framework`` (``TraceInstrument``), imported
    after the framework's own module (which configures the framework)."""
    load(framework, function)
    if framework in NO_TRACE:
        raise ValueError(f"{function}: instrument 'trace': no trace-based instrument for "
                         f"{framework}: {NO_TRACE[framework]}; use instrument 'hooks'")
    return importlib.import_module(f"profiler.instrument.{framework}_trace")


def has_trace(framework: str) -> bool:
    """Whether ``framework`` has a trace-based instrument."""
    return framework not in NO_TRACE


def choose(framework: str, mode: str, requested: str = "auto",
           function: str = "profiler.instrument.choose") -> str:
    """The instrument a run uses: ``requested`` ("hooks" or "trace"), or for "auto" the trace
    where it times layers in ``mode`` (no hook runs inside a compiled graph), else hooks."""
    if requested not in ("auto", "hooks", "trace"):
        raise ValueError(f"{function}: instrument: expected 'auto', 'hooks' or 'trace', got "
                         f"{requested!r}")
    if requested != "auto":
        return requested
    if mode != "graph" or not has_trace(framework):
        return "hooks"
    return "trace" if load_trace(framework, function).TraceInstrument.layers_in["graph"] \
        else "hooks"
