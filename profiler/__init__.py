"""deepprof's profiler: instrumentation records a Timeline, analyses reduce it, reports show it.

The flow reads one way: workloads -> instrumentation -> ``timeline`` -> ``analysis`` ->
``report``. Nothing downstream reaches back up. One engine (``engine``) runs whatever is
profiled (``targets``: a seed workload or a user's own model); ``api`` is its public facade and
``layerwise`` its command line.
"""

# The public API for a user's own model (profiler.api), importable as
# ``from profiler import LayerProfiler`` without importing it (and NumPy, SciPy) for every
# other use of the package.
_API = ("LayerProfiler", "profile_training", "compare_training", "Report", "Comparison")


def __getattr__(name):
    if name in _API:
        from profiler import api
        return getattr(api, name)
    raise AttributeError(f"module 'profiler' has no attribute {name!r}")


__all__ = list(_API)
