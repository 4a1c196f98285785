"""Variants of one training setup measured in interleaved rounds: per phase, each variant's
median and spread over rounds, and each variant's difference to the first with a paired
bootstrap 95% interval.

A pure function of the variants' Timelines and the round each measured step ran in; the
engine's comparisons (profiler.engine.Comparison.differences), of seed workloads and of a
user's factory alike, end here. Nothing here measures or renders.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Sequence

from profiler.analysis.phases import phase_breakdown
from profiler.analysis.stats import bootstrap_diff_ci, describe_diff, iqr, median
from profiler.timeline import Timeline, phases_of


def compare_variants(timelines: Mapping[str, Timeline],
                     step_round: Mapping[str, Mapping[int, int]],
                     variants: Sequence[str]) -> Dict[str, object]:
    """The comparison of ``variants`` (the first is the baseline) from each one's Timeline and
    ``step_round[variant][step]``, the round its measured step ran in.

    Each round counts once, as the median of its steps, so a variant's samples pair with the
    baseline's round by round (bootstrap_diff_ci resamples rounds jointly, which cancels the
    drift between rounds); a difference uses the rounds both completed. Steps with no round
    (e.g. a step that failed half-way) are left out, and so is a variant with no measured
    step.

    Returns {"phases_ms": {name: {variant: {"median_ms", "iqr_ms"}}} for "step" and each
    phase, "per_round_ms": {variant: {name: [ms per round, in round order]}},
    "differences": [describe_diff lines, or why a difference has no value]}.
    """
    by_round: Dict[str, Dict[str, Dict[int, float]]] = {}
    phases_seen: set = set()
    for variant in variants:
        if variant not in timelines:
            continue
        try:
            breakdown = phase_breakdown(timelines[variant])
        except ValueError:             # no measured step
            continue
        rounds = step_round[variant]
        series = {"step": breakdown["step_ms"]["samples"],
                  **{p: s["samples"] for p, s in breakdown["phases_ms"].items()}}
        by_round[variant] = {name: _round_medians(breakdown["steps"], values, rounds)
                             for name, values in series.items()}
        phases_seen |= set(breakdown["phases_ms"])
    names = ["step"] + list(phases_of(phases_seen))

    table, lines = {}, []
    baseline = variants[0]
    for name in names:
        table[name] = {v: {"median_ms": median(list(r[name].values())),
                           "iqr_ms": iqr(list(r[name].values()))}
                       for v, r in by_round.items() if r.get(name)}
        if baseline not in by_round or name not in by_round[baseline]:
            continue
        label = name.replace("_", " ")
        for variant in variants[1:]:
            if variant not in by_round or name not in by_round[variant]:
                continue
            base, other = by_round[baseline][name], by_round[variant][name]
            common = sorted(set(base) & set(other))
            if len(common) < 2:
                continue
            try:
                est, lo, hi = bootstrap_diff_ci([base[r] for r in common],
                                                [other[r] for r in common])
            except ValueError as e:    # e.g. a phase that took 0 ms in the baseline
                lines.append(f"{label}, {variant} vs {baseline}: no ratio ({e})")
                continue
            lines.append(describe_diff(label, variant, baseline, est, lo, hi))
    per_round = {v: {name: [ms for _, ms in sorted(rounds.items())]
                     for name, rounds in r.items()} for v, r in by_round.items()}
    return {"phases_ms": table, "per_round_ms": per_round, "differences": lines}


def _round_medians(steps: Sequence[int], values: Sequence[float],
                   rounds: Mapping[int, int]) -> Dict[int, float]:
    """{round: the median of its steps' values}."""
    grouped: Dict[int, List[float]] = defaultdict(list)
    for step, value in zip(steps, values):
        if step in rounds:
            grouped[rounds[step]].append(value)
    return {r: median(v) for r, v in grouped.items()}
