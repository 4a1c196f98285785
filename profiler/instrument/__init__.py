"""Per-framework instrumentation: each framework's natural hooks turned into layer ranges on a
Recorder. One module per framework with the same shape; the contract they meet is written in
``base.py``.

:func:`load` is the one way to get a framework's module: importing it may configure the
framework before its first operator runs (MXNet's backward bulking), so it must come before a
workload or a user's model is built, and everything that builds one calls this first.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ops import frameworks


def load(framework: str, function: str = "profiler.instrument.load") -> ModuleType:
    """The instrument module of ``framework`` (one of ops.frameworks.FRAMEWORKS), imported."""
    frameworks.check_name(function, framework)
    return importlib.import_module(f"profiler.instrument.{framework}")
