"""Per-phase and per-layer tables of an attributed capture, the time outside our ranges, and the
agreement of the capture's range times with the profiler's own report.

Pure functions from an :class:`profiler.nsys.attribution.Attribution` (and optionally a
report.json dict) to plain JSON-able dicts; milliseconds are means per measured step. Nothing
here reads files or renders.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from profiler.analysis.phases import layer_breakdown, phase_breakdown
from profiler.nsys.attribution import UNSAMPLED, Attribution, RangeNode, to_timeline
from profiler.nsys.reader import GpuActivity
from profiler.timeline import PHASES

_NS_PER_MS = 1e6
TOP_N = 5
# Point 5 of issue 11: range times agree within 5% or 50 us, checked for ranges over 1 ms.
AGREE_REL = 0.05
AGREE_ABS_MS = 0.05
AGREE_MIN_MS = 1.0


def union_ns(intervals: Iterable[Tuple[int, int]], lo: int, hi: int) -> int:
    """Length of the union of intervals clipped to [lo, hi)."""
    clipped = sorted((max(a, lo), min(b, hi)) for a, b in intervals if b > lo and a < hi)
    total, cur_a, cur_b = 0, None, None
    for a, b in clipped:
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def subtree(nodes: Sequence[RangeNode], root: RangeNode) -> List[RangeNode]:
    """root and every range nested in it on its thread."""
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(nodes[c] for c in n.children)
    return out


def _gpu_stats(acts: Sequence[GpuActivity], windows: Sequence[Tuple[int, int]],
               all_intervals: Sequence[Tuple[int, int]], n_steps: int) -> Dict[str, Any]:
    """Device time of the given activities and the GPU's idle time inside the windows (idle:
    no activity of any range on any stream)."""
    device_ns = sum(a.duration_ns for a in acts)
    busy_ns = sum(union_ns(((a.start_ns, a.end_ns) for a in acts), lo, hi)
                  for lo, hi in windows) if acts else 0
    window_ns = sum(hi - lo for lo, hi in windows)
    idle_ns = window_ns - sum(union_ns(all_intervals, lo, hi) for lo, hi in windows)
    latencies = [a.start_ns - a.launch_start_ns for a in acts if a.launch_start_ns is not None]
    by_name: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for a in acts:
        by_name[a.name][0] += 1
        by_name[a.name][1] += a.duration_ns
    top = sorted(by_name.items(), key=lambda kv: (-kv[1][1], kv[0]))[:TOP_N]
    per = max(n_steps, 1)
    return {
        "kernels_per_step": sum(1 for a in acts if a.kind == "kernel") / per,
        "memcpys_per_step": sum(1 for a in acts if a.kind != "kernel") / per,
        "device_ms": device_ns / per / _NS_PER_MS,
        "busy_in_range_ms": busy_ns / per / _NS_PER_MS,
        "idle_ms": idle_ns / per / _NS_PER_MS,
        "launch_to_start_us_mean": (sum(latencies) / len(latencies) / 1e3) if latencies
        else None,
        "launch_to_start_us_max": max(latencies) / 1e3 if latencies else None,
        "top": [{"name": k, "count_per_step": v[0] / per, "ms": v[1] / per / _NS_PER_MS}
                for k, v in top],
    }


def _cpu_split(members: Sequence[RangeNode], n_steps: int) -> Dict[str, Any]:
    libs: Dict[str, int] = defaultdict(int)
    functions: Counter = Counter()
    worker: Counter = Counter()
    samples = 0
    for n in members:
        for lib, ns in n.cpu_library_ns.items():
            libs[lib] += ns
        functions.update(n.functions)
        worker.update(n.worker_samples)
        samples += n.samples
    per = max(n_steps, 1)
    total_samples = sum(functions.values())
    return {
        "samples": samples,
        "libraries_ms": {k: v / per / _NS_PER_MS
                         for k, v in sorted(libs.items(), key=lambda kv: -kv[1])},
        "top_functions": [{"function": f, "library": lib,
                           "share": c / total_samples if total_samples else 0.0}
                          for (f, lib), c in functions.most_common(TOP_N)],
        "worker_thread_samples": dict(worker.most_common()),
    }


def _measured(n: RangeNode, warmup: int) -> bool:
    return n.step is not None and n.step >= warmup


def phase_rows(att: Attribution, warmup: int) -> List[Dict[str, Any]]:
    """One row per phase seen in measured steps (in PHASES order), then one for the step.

    outside_ms is the part of the phase no layer range covers (on any thread), for the step
    the part no phase covers: time outside our ranges, reported rather than dropped.
    """
    nodes = att.ranges
    n_steps = max(len(att.steps) - warmup, 0)
    gpu_intervals = [(a.start_ns, a.end_ns) for a in att.all_gpu]
    layers_by_step: Dict[int, List[RangeNode]] = defaultdict(list)
    phases_by_step: Dict[int, List[RangeNode]] = defaultdict(list)
    for n in nodes:
        if n.kind == "layer" and n.step is not None:
            layers_by_step[n.step].append(n)
        if n.kind == "phase" and n.step is not None:
            phases_by_step[n.step].append(n)
    rows = []
    groups: Dict[str, List[RangeNode]] = defaultdict(list)
    for n in nodes:
        if n.kind in ("phase", "step") and _measured(n, warmup) and (
                n.pid, n.tid) == att.main_thread:
            groups[n.name].append(n)
    for name in [p for p in PHASES if p in groups] + (["step"] if "step" in groups else []):
        members = groups[name]
        outside = 0
        for m in members:
            inner = layers_by_step[m.step] if m.kind == "phase" else phases_by_step[m.step]
            outside += m.duration_ns - union_ns(((r.start_ns, r.end_ns) for r in inner),
                                                m.start_ns, m.end_ns)
        everything = [x for m in members for x in subtree(nodes, m)]
        # Device work of the phase: launched from any range of the phase, on any thread.
        acts = [a for n in nodes if n.step is not None and n.step >= warmup and
                (n.phase == name or name == "step") for a in n.gpu]
        per = max(n_steps, 1)
        row = {"name": name, "calls_per_step": len(members) / per,
               "ms": sum(m.duration_ns for m in members) / per / _NS_PER_MS,
               "outside_ms": outside / per / _NS_PER_MS}
        row.update(_cpu_split(everything, n_steps))
        row["gpu"] = _gpu_stats(acts, [(m.start_ns, m.end_ns) for m in members],
                                gpu_intervals, n_steps) if att.all_gpu else None
        rows.append(row)
    return rows


def layer_rows(att: Attribution, warmup: int) -> List[Dict[str, Any]]:
    """One row per (layer, direction) in measured steps, in first-seen order: time inclusive
    of nested layers, its split by native library, top functions and GPU work launched."""
    nodes = att.ranges
    n_steps = max(len(att.steps) - warmup, 0)
    gpu_intervals = [(a.start_ns, a.end_ns) for a in att.all_gpu]
    groups: Dict[Tuple[str, str], List[RangeNode]] = {}
    for n in sorted(nodes, key=lambda n: (n.direction != "forward", n.start_ns)):
        if n.kind == "layer" and _measured(n, warmup):
            groups.setdefault((n.name, n.direction), []).append(n)
    rows = []
    per = max(n_steps, 1)
    for (name, direction), members in groups.items():
        everything = [x for m in members for x in subtree(nodes, m)]
        row = {"name": name, "direction": direction, "calls_per_step": len(members) / per,
               "ms": sum(m.duration_ns for m in members) / per / _NS_PER_MS,
               "self_ms": sum(max(m.self_ns, 0) for m in members) / per / _NS_PER_MS,
               "threads": sorted({m.thread for m in members})}
        row.update(_cpu_split(everything, n_steps))
        acts = [a for x in everything for a in x.gpu]
        row["gpu"] = _gpu_stats(acts, [(m.start_ns, m.end_ns) for m in members],
                                gpu_intervals, n_steps) if att.all_gpu else None
        rows.append(row)
    return rows


def outside_ranges(att: Attribution) -> Dict[str, Any]:
    """Samples and GPU work that no range of ours claims (before the first step, between
    steps, in threads never inside a range)."""
    return {"samples": sum(att.outside_samples.values()),
            "samples_by_library": dict(att.outside_samples.most_common()),
            "samples_by_when": {w: att.outside_samples_when[w] for w in
                                ("before the first step", "between steps",
                                 "after the last step") if att.outside_samples_when[w]},
            "gpu_activities": len(att.outside_gpu),
            "gpu_device_ms": sum(a.duration_ns for a in att.outside_gpu) / _NS_PER_MS}


def _agree(kind: str, name: str, profiler_ms: Optional[float], nsys_ms: Optional[float]
           ) -> Dict[str, Any]:
    row: Dict[str, Any] = {"kind": kind, "name": name, "profiler_ms": profiler_ms,
                           "nsys_ms": nsys_ms, "diff_ms": None, "diff_pct": None}
    if profiler_ms is None or nsys_ms is None:
        row["checked"] = True
        row["agrees"] = False
        row["why"] = "missing in the capture" if nsys_ms is None else "missing in the report"
        return row
    diff = nsys_ms - profiler_ms
    row["diff_ms"] = diff
    row["diff_pct"] = 100.0 * diff / profiler_ms if profiler_ms else None
    row["checked"] = max(profiler_ms, nsys_ms) > AGREE_MIN_MS
    row["agrees"] = abs(diff) <= max(AGREE_REL * abs(profiler_ms), AGREE_ABS_MS)
    return row


def agreement(att: Attribution, report: Mapping[str, Any]) -> Dict[str, Any]:
    """The profiler's own times (report.json) beside the capture's range times, per step,
    phase and layer direction, with the difference.

    Both sides are means per measured step; the capture's first report["warmup"] steps are
    the warm-up. A row agrees within 5% or 50 us; only rows over 1 ms are checked, and every
    checked row that does not agree is listed in "disagreements".
    """
    warmup = int(report.get("warmup", 0) or 0)
    expected_steps = warmup + int(report.get("iters", 0) or 0)
    notes = []
    if expected_steps and expected_steps != len(att.steps):
        notes.append(f"the capture has {len(att.steps)} step ranges; the report expects "
                     f"{expected_steps} (warmup {warmup} + iters {report.get('iters')})")
    rows: List[Dict[str, Any]] = []
    timeline = to_timeline(att, warmup)
    try:
        phases = phase_breakdown(timeline)
    except ValueError as e:
        phases = None
        notes.append(f"phases not compared: {e}")
    if phases is not None and "step_ms" in report:
        rows.append(_agree("step", "step", report["step_ms"].get("mean"),
                           phases["step_ms"]["mean"]))
        for p in PHASES:
            if p in report.get("phases_ms", {}):
                rows.append(_agree("phase", p, report["phases_ms"][p].get("mean"),
                                   phases["phases_ms"][p]["mean"]))
    try:
        layers = {r["name"]: r for r in layer_breakdown(timeline)}
    except ValueError as e:
        layers = {}
        notes.append(f"layers not compared: {e}")
    for layer in report.get("layers", []):
        for direction in ("forward", "backward"):
            # NVTX ranges are host ranges: compare with the host clock where there are two.
            key = f"host_{direction}_ms" if f"host_{direction}_ms" in layer else \
                f"{direction}_ms"
            got = layers.get(layer["name"])
            rows.append(_agree("layer", f"{layer['name']} ({direction})", layer.get(key),
                               got[f"{direction}_ms"] if got is not None else None))
    disagreements = [r for r in rows if r["checked"] and not r["agrees"]]
    return {"rule": f"agree within {AGREE_REL:.0%} or {AGREE_ABS_MS * 1000:.0f} us; checked "
                    f"where either side is over {AGREE_MIN_MS:g} ms",
            "rows": rows, "disagreements": disagreements, "notes": notes}


def ranges_total_ns(att: Attribution) -> int:
    """Wall time of every outermost range on its thread: what the CPU flame graph spans."""
    return sum(n.duration_ns for n in att.ranges if n.parent is None)


def unsampled_share(att: Attribution) -> Optional[float]:
    total = sum(ns for n in att.ranges for ns in n.cpu_library_ns.values())
    unsampled = sum(n.cpu_library_ns.get(UNSAMPLED, 0) for n in att.ranges)
    return unsampled / total if total else None
