"""Where a training step's time goes: per-phase and per-layer breakdowns of a Timeline.

Pure functions from a Timeline to plain dicts of milliseconds. Only measured steps (step >= 0)
count. Nothing here renders, measures or knows a framework.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional

from profiler.analysis.nesting import nesting_order_key, trees_by_track, walk
from profiler.analysis.stats import iqr, median
from profiler.timeline import OPTIONAL_PHASES, PHASES, Range, Timeline

_NS_PER_MS = 1e6
_DEVICE_PREFIX = "device:"


def _is_device(track: str) -> bool:
    return track.startswith(_DEVICE_PREFIX)


def _step_ranges(timeline: Timeline) -> Dict[int, Range]:
    """The measured steps' host step ranges, keyed by step index."""
    steps: Dict[int, Range] = {}
    for r in timeline.ranges:
        if r.kind != "step" or r.step < 0 or _is_device(r.track):
            continue
        if r.step in steps:
            raise ValueError(f"timeline has two step ranges for step {r.step}: "
                             f"{steps[r.step].name!r} and {r.name!r}; expected one per step")
        steps[r.step] = r
    return steps


def _summary_ms(samples_ns: List[int]) -> Dict[str, object]:
    samples_ms = [ns / _NS_PER_MS for ns in samples_ns]
    return {"samples": samples_ms,
            # From the integer total, so the phases' means add up to the step mean.
            "mean": sum(samples_ns) / len(samples_ns) / _NS_PER_MS,
            "median": median(samples_ms), "iqr": iqr(samples_ms)}


def phase_breakdown(timeline: Timeline) -> Dict[str, object]:
    """Per-phase time of the measured steps, from host ranges of kind "step" and "phase".

    Returns {"steps": [step indices], "step_ms": S, "phases_ms": {phase: S for each of
    timeline.PHASES}, "warnings": [str]}, where S = {"samples": per-step ms in step order,
    "mean", "median", "iqr"}. A phase occurring several times in one step counts the sum;
    a phase absent from a step counts 0. "other" is computed per step as the step's duration
    minus the seven measured phases (a phase range named "other" is ignored), so the phases'
    means add up to the mean step time by construction. Phases are assumed to be disjoint: a
    negative "other" means they overlap or leak out of the step, and is listed in "warnings".
    Ranges on "device:" tracks are not used here.
    """
    steps = _step_ranges(timeline)
    if not steps:
        raise ValueError("phase_breakdown: the timeline has no host range of kind 'step' with "
                         "step >= 0; expected one per measured step")
    # Every phase but "other", which is what is left, and the optional phases that occur.
    seen = {r.name for r in timeline.ranges if r.kind == "phase" and r.step >= 0}
    measured = PHASES[:-1] + tuple(p for p in OPTIONAL_PHASES if p in seen)
    per_step_ns: Dict[str, Dict[int, int]] = {p: defaultdict(int) for p in measured}
    for r in timeline.ranges:
        if r.kind != "phase" or r.step < 0 or _is_device(r.track):
            continue
        if r.name not in PHASES and r.name not in OPTIONAL_PHASES:
            raise ValueError(f"phase_breakdown: phase range {r.name!r} (step {r.step}) is not "
                             f"one of {PHASES + OPTIONAL_PHASES}")
        if r.step not in steps:
            raise ValueError(f"phase_breakdown: phase range {r.name!r} belongs to step {r.step}, "
                             f"which has no step range")
        if r.name == "other":
            continue
        per_step_ns[r.name][r.step] += r.duration_ns

    order = sorted(steps)
    phase_ns = {p: [per_step_ns[p].get(s, 0) for s in order] for p in measured}
    step_ns = [steps[s].duration_ns for s in order]
    phase_ns["other"] = [step_ns[i] - sum(phase_ns[p][i] for p in measured)
                         for i in range(len(order))]
    warnings = [f"step {s}: the measured phases add up to more than the step "
                f"({-other / _NS_PER_MS:.3f} ms over); phases overlap or leave the step"
                for s, other in zip(order, phase_ns["other"]) if other < 0]
    return {"steps": order, "step_ms": _summary_ms(step_ns),
            "phases_ms": {p: _summary_ms(phase_ns[p]) for p in measured + ("other",)},
            "warnings": warnings}


def _self_ns(timeline: Timeline) -> Dict[int, int]:
    """Each layer range's own time, keyed by id(range): its duration minus the layer ranges
    directly inside it.

    Only layer ranges are subtracted: ops or marks inside a layer are the layer's own work.
    Keyed by identity because two equal ranges (same name, same times) are still two calls.
    """
    self_ns: Dict[int, int] = {}
    for roots in trees_by_track(timeline).values():
        for ancestors, node in walk(roots):
            r = node.range
            if r.kind != "layer":
                continue
            self_ns[id(r)] = self_ns.get(id(r), 0) + r.duration_ns
            parent = next((a.range for a in reversed(ancestors) if a.range.kind == "layer"),
                          None)
            if parent is not None:
                self_ns[id(parent)] = self_ns.get(id(parent), 0) - r.duration_ns
    return self_ns


def layer_breakdown(timeline: Timeline) -> List[Dict[str, object]]:
    """Per-layer forward and backward time per measured step, one dict per layer name.

    Layers come in the order their forward pass was first seen (layers only seen in backward
    after them). Each dict has name, layer_type, forward_ms, backward_ms (inclusive: a block
    includes its convs), self_forward_ms, self_backward_ms (inclusive minus the layer ranges
    directly inside, on the same track) and calls (forward calls per step). All are means per
    measured step, summing the calls within a step. forward_samples_ms and backward_samples_ms
    are the inclusive times step by step (in step order, 0 in a step without the layer): what
    an interval of a layer's time is computed from (profiler.analysis.diff).

    When a layer has ranges on a "device:" track, its dict also has host_forward_ms,
    host_backward_ms, device_forward_ms and device_backward_ms, and forward_ms, backward_ms and
    the self times are the device numbers: with asynchronous launches the host only measures
    the enqueueing. Without device ranges (a CPU-only run) the host numbers are the numbers.
    """
    step_indices = set(_step_ranges(timeline))
    layer_ranges = [r for r in timeline.ranges if r.kind == "layer" and r.step >= 0]
    if not step_indices:
        step_indices = {r.step for r in layer_ranges}
    n_steps = len(step_indices)
    if not layer_ranges:
        return []
    for r in layer_ranges:
        if r.direction not in ("forward", "backward"):
            raise ValueError(f"layer_breakdown: layer range {r.name!r} (step {r.step}) has "
                             f"direction {r.direction!r}; expected 'forward' or 'backward'")

    self_ns = _self_ns(timeline)
    # totals[name][(place, direction, what)] in ns over all measured steps; per_step the same
    # inclusive times by step.
    totals: Dict[str, Dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
    per_step: Dict[str, Dict[tuple, int]] = defaultdict(lambda: defaultdict(int))
    types: Dict[str, Optional[str]] = {}
    for r in layer_ranges:
        place = "device" if _is_device(r.track) else "host"
        t = totals[r.name]
        t[(place, r.direction, "inclusive")] += r.duration_ns
        per_step[r.name][(place, r.direction, r.step)] += r.duration_ns
        t[(place, r.direction, "self")] += self_ns[id(r)]
        t[(place, r.direction, "calls")] += 1
        if types.get(r.name) is None:
            types[r.name] = r.layer_type

    # First-seen forward order; device times are on the host clock, so starts compare.
    first_seen = sorted(layer_ranges,
                        key=lambda r: (r.direction != "forward", nesting_order_key(r)))
    names = list(dict.fromkeys(r.name for r in first_seen))

    order = sorted(step_indices)

    def ms(total_ns: int) -> float:
        return total_ns / n_steps / _NS_PER_MS

    rows: List[Dict[str, object]] = []
    for name in names:
        t = totals[name]
        has_device = any(key[0] == "device" for key in t)
        main = "device" if has_device else "host"
        host_calls = t[("host", "forward", "calls")]
        row: Dict[str, object] = {
            "name": name, "layer_type": types[name],
            "forward_ms": ms(t[(main, "forward", "inclusive")]),
            "backward_ms": ms(t[(main, "backward", "inclusive")]),
            "self_forward_ms": ms(t[(main, "forward", "self")]),
            "self_backward_ms": ms(t[(main, "backward", "self")]),
            "calls": (host_calls or t[(main, "forward", "calls")]) / n_steps,
        }
        for direction in ("forward", "backward"):
            row[f"{direction}_samples_ms"] = [per_step[name][(main, direction, s)] / _NS_PER_MS
                                              for s in order]
        if has_device:
            for place in ("host", "device"):
                for direction in ("forward", "backward"):
                    row[f"{place}_{direction}_ms"] = ms(t[(place, direction, "inclusive")])
        rows.append(row)
    return rows


def region_breakdown(timeline: Timeline) -> List[Dict[str, object]]:
    """The fused regions a trace showed (kind "mark" ranges on a "trace:" track: a compiled
    program's kernels that cover several layers), largest first: name, ms (mean per measured
    step) and ranges per step."""
    steps = set(_step_ranges(timeline)) or {0}
    total: Dict[str, int] = defaultdict(int)
    count: Dict[str, int] = defaultdict(int)
    for r in timeline.ranges:
        if r.kind == "mark" and r.step >= 0 and r.track.startswith("trace:"):
            total[r.name] += r.duration_ns
            count[r.name] += 1
    return [{"name": name, "ms": ns / len(steps) / _NS_PER_MS,
             "per_step": count[name] / len(steps)}
            for name, ns in sorted(total.items(), key=lambda item: -item[1])]
