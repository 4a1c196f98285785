"""Per-framework instrumentation: each framework's natural hooks turned into layer ranges on a
Recorder. One module per framework with the same shape (a class ``Instrument``)."""

from __future__ import annotations

import importlib


def instrument_for(workload, recorder):
    """The Instrument for ``workload``'s framework, hooks installed."""
    module = importlib.import_module(f"profiler.instrument.{workload.framework}")
    instrument = module.Instrument(workload, recorder)
    instrument.install()
    return instrument
