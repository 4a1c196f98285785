"""Two mechanisms that check each other: the hook-based instrument's layer times against the
framework's own trace of the same steps (``--cross-check``, eager mode).

What separates them: a hook's range holds the layer's ops *and* the host work around and
between them (the layer's Python: Keras' or Gluon's call, our adapter, the framework's Python
per op, the hook itself); the trace holds the ops' execution only. That host time is real (an
eager step pays it), so the hook's time is expected above the trace's by

    gap = hook - trace = per_call + ops x per_op

per direction, with ``ops`` the op events the trace saw in the layer. ``per_call`` and
``per_op`` are fitted (least squares) over the layers over ``MIN_MS`` in this run, and a layer
agrees when its gap is within max(0.2 ms, 10% of hook, 25% of the expected gap) of that line:
the two mechanisms then tell the same story up to the same host cost everywhere. (The last
term: the host cost of an op grows a little with its tensors, e.g. their allocation, so layers
with the same op count differ; TensorFlow's eager batch-norm layers, 25 and 42 ops each, had
gaps 0.67-0.95 ms backward at batch 16 on one machine and spread wider on a slower one.) A layer whose range missed some
of its work, or held another layer's, stands out by more than that. What the fit cannot see:
an error every layer shares alike (it becomes part of per_call) — the fitted per_call and
per_op are printed, so a reader can judge them (TensorFlow's eager per-op cost is tens of
microseconds; a per_call of milliseconds would be suspect).

Two kinds of trace:
- one that names layers (PyTorch's): its layer ranges are compared with the hooks' by name;
- one that does not (TensorFlow's eager trace names ops by type only): its op ranges ("mark",
  named ``op:<type>``) are summed inside each hook range, so the comparison checks the hooks'
  boundaries and timing against TensorFlow's own op timing, not an independent attribution;
  the op types inside each range are listed, and a convolution op outside every convolution
  layer's range is counted (it would mean a range missed its layer's work).

Pure functions of two Timelines; nothing here measures or knows a framework.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from profiler.analysis.phases import layer_breakdown
from profiler.analysis.stats import median
from profiler.timeline import Range, Timeline

MIN_MS = 1.0
REL_TOL = 0.10
GAP_REL_TOL = 0.25
ABS_TOL_MS = 0.2
TOLERANCE = ("|gap - expected| <= max(0.2 ms, 10% of hook, 25% of expected), gap = hook - "
             "trace, expected = per_call + ops x per_op, the line fitted per direction over "
             "the layers over 1 ms (profiler.analysis.cross_check)")


def fit_host_cost(rows: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    """(per_call, per_op) of gap = per_call + ops x per_op, least squares over (ops, gap)
    pairs; with fewer than two distinct op counts, (median gap, 0)."""
    if not rows:
        return 0.0, 0.0
    xs = [x for x, _ in rows]
    ys = [y for _, y in rows]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx <= 1e-12:
        return sorted(ys)[len(ys) // 2], 0.0
    per_op = sum((x - mean_x) * (y - mean_y) for x, y in rows) / sxx
    return mean_y - per_op * mean_x, per_op


def cross_check(hooks: Timeline, trace: Timeline,
                op_counts: Optional[Dict[tuple, float]] = None) -> Dict[str, object]:
    """The agreement table of the measured steps: one row per layer and direction with
    hook_ms, trace_ms (means per step), gap_ms, ops (op events per step), expected_gap_ms,
    judged (over MIN_MS) and agrees; with the fitted host costs and the summary."""
    hook_rows = layer_breakdown(hooks)
    by_name = any(r.kind == "layer" and r.step >= 0 for r in trace.ranges)
    if by_name:
        trace_samples = {(row["name"], d): row[f"{d}_samples_ms"]
                         for row in layer_breakdown(trace) for d in ("forward", "backward")}
        ops = dict(op_counts or {})
        kinds: Dict[tuple, List[str]] = {}
        outside = None
    else:
        trace_samples, ops, kinds, outside = _ops_inside_hook_ranges(hooks, trace)
    rows = []
    for row in hook_rows:
        for direction in ("forward", "backward"):
            key = (row["name"], direction)
            hook_samples = row[f"{direction}_samples_ms"]
            if key not in trace_samples and not any(hook_samples):
                continue
            found_samples = trace_samples.get(key, [0.0] * len(hook_samples))
            # Medians over the steps, of each and of the per-step gap: a step slowed by
            # something else on the machine moves both, and a median drops it.
            hook, found = median(hook_samples), median(found_samples)
            gap = median([h - t for h, t in zip(hook_samples, found_samples)])
            rows.append({"layer": row["name"], "direction": direction, "type": row["layer_type"],
                         "hook_ms": hook, "trace_ms": found, "gap_ms": gap,
                         "ops": ops.get(key, 0.0), "judged": hook >= MIN_MS,
                         **({"op_types": kinds[key]} if key in kinds else {})})
    host_cost = {}
    for direction in ("forward", "backward"):
        judged = [r for r in rows if r["judged"] and r["direction"] == direction]
        per_call, per_op = fit_host_cost([(r["ops"], r["gap_ms"]) for r in judged])
        host_cost[direction] = {"per_call_ms": per_call, "per_op_ms": per_op,
                                "layers": len(judged)}
        for r in rows:
            if r["direction"] == direction:
                r["expected_gap_ms"] = per_call + per_op * r["ops"]
                r["tolerance_ms"] = max(ABS_TOL_MS, REL_TOL * r["hook_ms"],
                                        GAP_REL_TOL * abs(r["expected_gap_ms"]))
                r["agrees"] = abs(r["gap_ms"] - r["expected_gap_ms"]) <= r["tolerance_ms"]
    judged = [r for r in rows if r["judged"]]
    doc = {"mechanism": ("trace layers by name" if by_name else
                         "trace ops inside the hooks' layer ranges"),
           "tolerance": TOLERANCE, "host_cost": host_cost,
           "layers_judged": len(judged),
           "layers_agreeing": sum(r["agrees"] for r in judged),
           "disagreeing": [f"{r['layer']} ({r['direction']})" for r in judged
                           if not r["agrees"]],
           "rows": rows}
    if outside is not None:
        doc["conv_ops_outside_conv_layers_per_step"] = outside
    return doc


def _ops_inside_hook_ranges(hooks: Timeline, trace: Timeline):
    """Per (layer, direction): the time trace op ranges ran inside the hooks' ranges of that
    layer (per measured step, in step order), the ops per step, the op types seen; and how
    many convolution ops per step ran outside every convolution layer's range."""
    steps = sorted({r.step for r in hooks.ranges if r.kind == "step" and r.step >= 0}
                   or {r.step for r in hooks.ranges if r.kind == "layer" and r.step >= 0})
    layer_ranges = sorted((r for r in hooks.ranges if r.kind == "layer" and r.step >= 0),
                          key=lambda r: r.start_ns)
    ops = sorted((r for r in trace.ranges if r.kind == "mark" and r.step >= 0),
                 key=lambda r: r.start_ns)
    starts = [o.start_ns for o in ops]
    longest = max((o.duration_ns for o in ops), default=0)
    busy_ns: Dict[tuple, int] = defaultdict(int)
    count: Dict[tuple, int] = defaultdict(int)
    kinds: Dict[tuple, set] = defaultdict(set)
    conv_ops = [o for o in ops if "Conv2D" in o.name]
    conv_inside = set()
    for layer in layer_ranges:
        key = (layer.name, layer.direction)
        # ops that may overlap the layer: started at most `longest` before it, before its end
        candidates = ops[bisect_left(starts, layer.start_ns - longest):
                         bisect_left(starts, layer.end_ns)]
        inside = [o for o in candidates if o.end_ns > layer.start_ns]
        busy_ns[key + (layer.step,)] += _union_ns(inside, layer)
        for o in inside:
            if layer.start_ns <= o.start_ns and o.end_ns <= layer.end_ns:
                count[key] += 1
                kinds[key].add(o.name.partition(":")[2] or o.name)
                if "Conv2D" in o.name and "conv" in (layer.layer_type or "").lower():
                    conv_inside.add(id(o))
    n = max(len(steps), 1)
    trace_ms = {key: [busy_ns.get(key + (step,), 0) / 1e6 for step in steps]
                for key in {k[:2] for k in busy_ns}}
    per_step_ops = {k: v / n for k, v in count.items()}
    outside = sum(1 for o in conv_ops if id(o) not in conv_inside) / n
    return trace_ms, per_step_ops, {k: sorted(v) for k, v in kinds.items()}, outside


def _union_ns(ranges: Sequence[Range], within: Range) -> int:
    """The time at least one of ``ranges`` covers inside ``within``."""
    total, reach = 0, within.start_ns
    for r in sorted(ranges, key=lambda r: r.start_ns):
        start, end = max(r.start_ns, reach), min(r.end_ns, within.end_ns)
        if end > start:
            total += end - start
            reach = end
    return total


def render_cross_check(doc: Dict[str, object], console=None) -> None:
    """The agreement table (rich)."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    table = Table(title=f"Cross-check: hooks vs the framework's trace ({doc['mechanism']}); "
                        f"{doc['layers_agreeing']} of {doc['layers_judged']} layer directions "
                        f"over {MIN_MS:g} ms agree", title_justify="left")
    for column in ("layer", "dir", "hook", "trace", "gap", "ops", "fit", "ok"):
        table.add_column(column, justify="left" if column in ("layer", "dir") else "right",
                         no_wrap=True)
    for r in doc["rows"]:
        table.add_row(r["layer"], r["direction"][:3], f"{r['hook_ms']:.2f}",
                      f"{r['trace_ms']:.2f}", f"{r['gap_ms']:+.2f}", f"{r['ops']:.0f}",
                      f"{r['expected_gap_ms']:+.2f}",
                      ("yes" if r["agrees"] else "NO") if r["judged"] else "<1ms")
    console.print(table)
    cost = "; ".join(f"{d}: {c['per_call_ms']:.3f} ms per layer call + "
                     f"{c['per_op_ms'] * 1000:.1f} us per op" for d, c in doc["host_cost"].items())
    console.print(f"ms per step (medians over the steps): hook, trace, gap = hook - trace, "
                  f"fit = the gap expected from the host time the hooks hold beyond the ops, "
                  f"fitted: {cost}. Agreement: "
                  f"{doc['tolerance']}."
                  + (f" Convolution ops outside every convolution layer's range per step: "
                     f"{doc['conv_ops_outside_conv_layers_per_step']:g}."
                     if "conv_ops_outside_conv_layers_per_step" in doc else ""),
                  highlight=False, soft_wrap=True)
