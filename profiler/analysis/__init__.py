"""Framework-independent analyses of a :class:`profiler.timeline.Timeline`.

One module per question (nesting, phases, stats, trace export, flame graphs); each is a set of
pure functions from a Timeline (or samples) to plain data. Nothing here measures, imports a
framework or renders.
"""
