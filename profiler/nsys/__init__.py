"""Nsight Systems captures of the profiler's runs: capture (``tool``), read (``reader``),
attribute (``attribution``), sum (``summary``), draw (``flame``) and print (``tables``).

The facade: ``analyze_capture(path, report=None)``, ``write_outputs(analysis, out_dir)``,
``render_tables(analysis)``; ``python -m profiler.nsys CAPTURE`` is the same from a shell.
Nothing upstream (instrumentation, analyses of a Timeline) imports this package.
"""

from profiler.nsys.api import OUTPUT_FILES, analyze, analyze_capture, write_outputs
from profiler.nsys.errors import ProfilerNsysError
from profiler.nsys.tables import render_tables

try:   # the capture half (nsys on PATH, profile, export) may be absent: reading still works
    from profiler.nsys.tool import (NsysFailed, NsysNotFound, capture,  # noqa: F401
                                    export_sqlite, find_nsys)
except ImportError:
    pass

__all__ = ["OUTPUT_FILES", "ProfilerNsysError", "analyze", "analyze_capture", "render_tables",
           "write_outputs", "NsysFailed", "NsysNotFound", "capture", "export_sqlite", "find_nsys"]
