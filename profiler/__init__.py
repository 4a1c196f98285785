"""deepprof's profiler: instrumentation records a Timeline, analyses reduce it, reports show it.

The flow reads one way: workloads -> instrumentation -> ``timeline`` -> ``analysis`` ->
``report``. Nothing downstream reaches back up.
"""
