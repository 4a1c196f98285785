"""Two runs of the same model compared phase by phase and layer by layer: where the gap between
them comes from, with intervals.

Pure functions from report dicts (profiler.report's schema, one rank's report each) to plain
dicts: the per-phase and per-layer differences (:func:`diff_reports`), the gap broken down
(:func:`gap_breakdown`), the comparability warnings (:func:`comparability`), the regression
gate (:func:`gate`) and the cross-framework layer table (:func:`layers_across`). Reading files,
choosing a rank of a merged report, printing and plotting are profiler.diff's; nothing here
reads a file, measures or renders.

Statistics (profiler.analysis.stats), chosen by how the runs were measured:

- Runs measured in the same interleaved run (``--compare``: their reports carry the same
  ``interleaved.run_id``) are paired by round: per round the median of its steps, per round
  the ratio B / A (the round's drift cancels), and the median of the rounds' ratios with its
  exact distribution-free interval (stats.paired_ratio_interval; its stated confidence is its
  exact coverage at that n). Fewer than 6 shared rounds give no interval.
- Any other two runs (separate processes, machines, commits) are not paired: the ratio of the
  per-step medians with a percentile bootstrap interval, each run resampled on its own
  (stats.bootstrap_diff_ci, paired=False). Fewer than 6 steps in either run give no interval.

Every interval carries its n. The gap breakdown uses means, not medians: the phases' means
add up to the step's mean (report.py), so the gap's parts add up to the gap.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from profiler.analysis.stats import (bootstrap_diff_ci, iqr, median, paired_ratio_interval)
from profiler.timeline import phases_of

#: The fewest values (steps of each run, or shared rounds) an interval is computed from: with
#: fewer, a "95%" bracket is little more than the values' range (stats.median_interval_rank).
MIN_INTERVAL_N = 6
CONFIDENCE = 0.95
DIRECTIONS = ("forward", "backward")
#: What the gate and a row can be about: the step, a phase, or a layer (its forward and
#: backward per step, or one direction as NAME:forward / NAME:backward).
STEP = "step"


# --------------------------------------------------------------------------- series

def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def renamed_layers(report: Mapping[str, Any], renames: Mapping[str, str],
                   label: str) -> Dict[str, Mapping[str, Any]]:
    """The report's layers by name, each name passed through ``renames`` (``--map``); a
    ValueError naming --map where two layers would end up with one name."""
    out: Dict[str, Mapping[str, Any]] = {}
    for layer in report.get("layers", []):
        name = renames.get(layer["name"], layer["name"])
        if name in out:
            raise ValueError(f"--map: two layers of {label} map to the name {name!r} "
                             f"({layer['name']!r} and another); expected one layer per name")
        out[name] = layer
    return out


def series(report: Mapping[str, Any], what: str,
           layers: Optional[Mapping[str, Mapping[str, Any]]] = None
           ) -> Optional[Dict[str, Any]]:
    """One quantity of a report as {"mean": ms per step, "samples": per-step ms or None}:
    ``what`` is "step", a phase, "LAYER:forward" / "LAYER:backward", or "LAYER" (its forward
    plus backward, step by step). None where the report has no such quantity. ``layers``: the
    report's layers by (renamed) name (renamed_layers); by their own names if not given."""
    if what == STEP:
        step = report["step_ms"]
        return {"mean": step["mean"], "samples": list(step["samples"])}
    if what in report.get("phases_ms", {}):
        entry = report["phases_ms"][what]
        return {"mean": entry["mean"], "samples": entry.get("samples")}
    layers = layers if layers is not None else {e["name"]: e for e in report.get("layers", [])}
    name, _, direction = what.rpartition(":")
    if direction in DIRECTIONS and name in layers:
        layer = layers[name]
        return {"mean": layer[f"{direction}_ms"],
                "samples": layer.get(f"{direction}_samples_ms")}
    if what in layers:
        layer = layers[what]
        fwd, bwd = layer.get("forward_samples_ms"), layer.get("backward_samples_ms")
        return {"mean": layer["forward_ms"] + layer["backward_ms"],
                "samples": [f + b for f, b in zip(fwd, bwd)] if fwd and bwd else None}
    return None


# --------------------------------------------------------------------------- pairing

def pairing(a: Mapping[str, Any], b: Mapping[str, Any]) -> Dict[str, Any]:
    """How two reports' samples may be compared: {"paired": bool, "why": str, and for paired
    runs "run_id"}. Paired only when both were measured in the same interleaved run (the same
    ``interleaved.run_id``, rounds recorded per step); separate runs' steps share nothing."""
    ia, ib = a.get("interleaved"), b.get("interleaved")
    if ia and ib and ia.get("run_id") == ib.get("run_id") \
            and ia.get("step_rounds") and ib.get("step_rounds"):
        shared = sorted({r for r in ia["step_rounds"] if r is not None}
                        & {r for r in ib["step_rounds"] if r is not None})
        return {"paired": True, "run_id": ia["run_id"], "rounds": len(shared),
                "why": f"paired by round: measured in the same interleaved run "
                       f"({len(shared)} shared rounds); per round the median of its steps, "
                       f"the median of the rounds' ratios B/A with its exact "
                       f"order-statistic interval"}
    if ia and ib:
        why = "not paired: measured in two different interleaved runs"
    else:
        why = "not paired: separate runs"
    return {"paired": False,
            "why": f"{why}; the ratio of the per-step medians with a bootstrap percentile "
                   f"interval, each run's steps resampled on their own"}


def _round_medians(samples: Sequence[float], rounds: Sequence[Optional[int]]
                   ) -> Dict[int, float]:
    grouped: Dict[int, List[float]] = {}
    for value, r in zip(samples, rounds):
        if r is not None:
            grouped.setdefault(r, []).append(value)
    return {r: median(v) for r, v in grouped.items()}


def compare_series(a: Optional[Mapping[str, Any]], b: Optional[Mapping[str, Any]], *,
                   rounds: Optional[Tuple[Sequence, Sequence]] = None,
                   labels: Tuple[str, str] = ("A", "B")) -> Dict[str, Any]:
    """One quantity in two runs: each run's median and IQR over its steps (the mean where a
    report has no per-step samples), B minus A in ms (medians) and in percent, and the 95%
    interval of the percentage (module docstring: paired by ``rounds`` = (A's step_rounds, B's
    step_rounds) when given, else unpaired). ``interval`` is None with ``no_interval`` saying
    why where none can be given."""
    row: Dict[str, Any] = {}
    for side, s in zip("ab", (a, b)):
        samples = s.get("samples") if s else None
        row[f"{side}_mean_ms"] = s["mean"] if s else None
        row[f"{side}_median_ms"] = median(samples) if samples else None
        row[f"{side}_iqr_ms"] = iqr(samples) if samples else None
        row[f"{side}_n"] = len(samples) if samples else 0
    if a is None or b is None:
        row.update(diff_ms=None, diff_pct=None, interval=None,
                   no_interval=f"only in {labels[0] if b is None else labels[1]}")
        return row
    a_s, b_s = a.get("samples"), b.get("samples")
    center_a = row["a_median_ms"] if a_s else a["mean"]
    center_b = row["b_median_ms"] if b_s else b["mean"]
    row["diff_ms"] = center_b - center_a
    row["diff_pct"] = (center_b / center_a - 1) * 100 if center_a > 0 else None
    row["interval"], row["no_interval"] = None, None
    if not a_s or not b_s:
        missing = labels[0] if not a_s else labels[1]
        row["no_interval"] = (f"no per-step samples in {missing}'s report (schema 2 keeps "
                              f"only the mean): medians are means here")
        return row
    if rounds is not None:
        ra, rb = _round_medians(a_s, rounds[0]), _round_medians(b_s, rounds[1])
        common = sorted(set(ra) & set(rb))
        if len(common) < MIN_INTERVAL_N:
            row["no_interval"] = (f"{len(common)} shared rounds; an interval needs >= "
                                  f"{MIN_INTERVAL_N} (--rounds)")
            return row
        xa, xb = [ra[r] for r in common], [rb[r] for r in common]
        if min(xa) <= 0 or min(xb) <= 0:
            row["no_interval"] = "0 ms in some round: no ratio"
            return row
        exact = paired_ratio_interval(xa, xb, confidence=CONFIDENCE)
        row["diff_pct"] = exact.estimate
        row["interval"] = {"low_pct": exact.low, "high_pct": exact.high,
                           "confidence": exact.confidence, "n": exact.n, "unit": "rounds",
                           "method": "median of per-round ratios, exact order-statistic "
                                     "interval"}
        return row
    if len(a_s) < MIN_INTERVAL_N or len(b_s) < MIN_INTERVAL_N:
        row["no_interval"] = (f"{len(a_s)} and {len(b_s)} steps; an interval needs >= "
                              f"{MIN_INTERVAL_N} in each (--iters)")
        return row
    if center_a <= 0:
        row["no_interval"] = f"{labels[0]}'s median is 0 ms: no ratio"
        return row
    try:
        est, low, high = bootstrap_diff_ci(a_s, b_s, confidence=CONFIDENCE, paired=False)
    except ValueError as e:       # a baseline of 0 ms in some resample
        row["no_interval"] = f"no ratio ({e})"
        return row
    row["diff_pct"] = est
    row["interval"] = {"low_pct": low, "high_pct": high, "confidence": CONFIDENCE,
                       "n": [len(a_s), len(b_s)], "unit": "steps",
                       "method": "ratio of medians, bootstrap percentile interval "
                                 "(unpaired)"}
    return row


# --------------------------------------------------------------------------- comparability

def _describe(report: Mapping[str, Any], key: str) -> Any:
    if key == "device":
        return report.get("device", {}).get("kind")
    if key == "threads":
        return (report.get("threads") or {}).get("requested")
    if key == "cpu":
        return (report.get("machine") or {}).get("cpu")
    if key == "cores":
        m = report.get("machine") or {}
        return m.get("usable_cores")
    return report.get(key)


def comparability(a: Mapping[str, Any], b: Mapping[str, Any],
                  labels: Tuple[str, str] = ("A", "B")) -> Dict[str, List[str]]:
    """Why a difference between the two runs may not be the framework's (or the change's)
    alone: {"warnings": [...], "stated": [...]}. Warnings: a different model, parameter count
    (or, where a report has none, different layers), batch, dtype, device, mode, thread count,
    instrument kind, and a report with errors. Stated: the machines (CPU model, cores, host)
    where they differ; a framework, impl or version differing is what a diff is usually for
    and is not warned about."""
    la, lb = labels
    warnings: List[str] = []
    for key, what in (("model", "model"), ("batch_size", "batch size"), ("dtype", "dtype"),
                      ("device", "device"), ("mode", "mode"), ("threads", "threads")):
        va, vb = _describe(a, key), _describe(b, key)
        if va is None or vb is None:
            if key in ("dtype", "threads") and (va, vb) != (None, None):
                warnings.append(f"{what}: {la} {va if va is not None else 'not recorded'}, "
                                f"{lb} {vb if vb is not None else 'not recorded'}")
            continue
        if va != vb:
            warnings.append(f"{what} differs: {la} {va}, {lb} {vb}")
    pa, pb = a.get("parameters"), b.get("parameters")
    if pa is not None and pb is not None:
        if pa != pb:
            warnings.append(f"parameter count differs: {la} {pa:,}, {lb} {pb:,}: not the same "
                            f"model")
    else:
        names_a = {e["name"] for e in a.get("layers", [])}
        names_b = {e["name"] for e in b.get("layers", [])}
        if names_a and names_b and names_a != names_b:
            warnings.append(f"parameter count not recorded in "
                            f"{la if pa is None else lb}'s report, and the layers differ "
                            f"({len(names_a - names_b)} only in {la}, {len(names_b - names_a)} "
                            f"only in {lb}, before --map)")
    ka, kb = a.get("instrument_kind"), b.get("instrument_kind")
    if ka and kb and ka != kb:
        warnings.append(f"instrument differs: {la}'s layer times from {ka}, {lb}'s from {kb}: "
                        f"what a layer's range covers may differ")
    for label, r in ((la, a), (lb, b)):
        if r.get("errors"):
            warnings.append(f"{label}'s report has errors: {r['errors'][0]}"
                            + (f" (and {len(r['errors']) - 1} more)"
                               if len(r["errors"]) > 1 else ""))
        if r.get("sync"):
            warnings.append(f"{label} synchronised the device at every range (--sync)")
    stated: List[str] = []
    na, nb = a.get("device", {}).get("name"), b.get("device", {}).get("name")
    if na != nb:
        stated.append(f"device names differ: {la} {na}, {lb} {nb}")
    ma, mb = a.get("machine") or {}, b.get("machine") or {}
    if ma and mb:
        diffs = [k for k in ("cpu", "usable_cores", "logical_cores", "host")
                 if ma.get(k) != mb.get(k)]
        if diffs:
            stated.append(f"different machines: {la} {_machine(ma)}; {lb} {_machine(mb)}")
    elif ma or mb:
        stated.append(f"machine not recorded in {la if not ma else lb}'s report (schema 2)")
    return {"warnings": warnings, "stated": stated}


def _machine(m: Mapping[str, Any]) -> str:
    return (f"{m.get('cpu')}, {m.get('usable_cores')} of {m.get('logical_cores')} logical "
            f"cores usable, host {m.get('host')}")


# --------------------------------------------------------------------------- the diff

def diff_reports(a: Mapping[str, Any], b: Mapping[str, Any], *,
                 renames: Optional[Mapping[str, str]] = None,
                 labels: Tuple[str, str] = ("A", "B")) -> Dict[str, Any]:
    """B against A: {"labels", "pairing", "comparability", "step": row, "phases": {phase: row},
    "layers": [{"name", "direction", "type", **row}], "only_in": {label: [layer names]},
    "breakdown"} where each row is compare_series'. Phases and layers are matched by name
    (layer names through ``renames``, ``--map``); what one run has and the other lacks is
    listed in "only_in" (layers) or has a row with one side None (phases)."""
    renames = dict(renames or {})
    la, lb = labels
    layers_a = renamed_layers(a, renames, la)
    layers_b = renamed_layers(b, renames, lb)
    pair = pairing(a, b)
    rounds = ((a["interleaved"]["step_rounds"], b["interleaved"]["step_rounds"])
              if pair["paired"] else None)

    def row(what: str) -> Dict[str, Any]:
        return compare_series(series(a, what, layers_a), series(b, what, layers_b),
                              rounds=rounds, labels=labels)

    phases = phases_of(set(a.get("phases_ms", {})) | set(b.get("phases_ms", {})))
    names = list(layers_a) + [n for n in layers_b if n not in layers_a]
    layer_rows = []
    for name in names:
        if name not in layers_a or name not in layers_b:
            continue
        for direction in DIRECTIONS:
            layer_rows.append({"name": name, "direction": direction,
                               "type": layers_a[name].get("type"),
                               **row(f"{name}:{direction}")})
    return {"labels": list(labels), "pairing": pair,
            "comparability": comparability(a, b, labels),
            "step": row(STEP), "phases": {p: row(p) for p in phases},
            "layers": layer_rows,
            "only_in": {la: [n for n in layers_a if n not in layers_b],
                        lb: [n for n in layers_b if n not in layers_a]},
            "breakdown": gap_breakdown(a, b, renames=renames, labels=labels)}


# --------------------------------------------------------------------------- the gap

def gap_breakdown(a: Mapping[str, Any], b: Mapping[str, Any], *,
                  renames: Optional[Mapping[str, str]] = None,
                  labels: Tuple[str, str] = ("A", "B")) -> Dict[str, Any]:
    """B's mean step minus A's, split into the parts that make it up: each phase's difference
    of means, the forward and backward phases further split into their layers' differences
    (self times, so a block and its convolutions are not counted twice) and what those phases
    spent outside any layer. A phase one run has not split (no layers of that direction, e.g.
    graph mode) stays whole. The parts add up to the gap.

    Returns {"a_step_ms", "b_step_ms", "gap_ms", "parts_sum_ms", "items": [{"what", "kind":
    "phase" | "layer" | "outside layers", "phase", "name"?, "type"?, "delta_ms"}], "by_type":
    [{"type", "direction", "delta_ms", "layers"}]}, items and types sorted by size (|delta|),
    largest first."""
    renames = dict(renames or {})
    layers_a = renamed_layers(a, renames, labels[0])
    layers_b = renamed_layers(b, renames, labels[1])
    pa, pb = a["phases_ms"], b["phases_ms"]
    items: List[Dict[str, Any]] = []
    for phase in phases_of(set(pa) | set(pb)):
        ma = pa[phase]["mean"] if phase in pa else 0.0
        mb = pb[phase]["mean"] if phase in pb else 0.0
        split = phase in DIRECTIONS and _has_direction(layers_a, phase) \
            and _has_direction(layers_b, phase)
        if not split:
            items.append({"what": phase, "kind": "phase", "phase": phase,
                          "delta_ms": mb - ma})
            continue
        key = f"self_{phase}_ms"
        inside_a = sum(e[key] for e in layers_a.values())
        inside_b = sum(e[key] for e in layers_b.values())
        for name in list(layers_a) + [n for n in layers_b if n not in layers_a]:
            va = layers_a[name][key] if name in layers_a else 0.0
            vb = layers_b[name][key] if name in layers_b else 0.0
            typ = (layers_a.get(name) or layers_b.get(name)).get("type")
            items.append({"what": f"{name} ({phase})", "kind": "layer", "phase": phase,
                          "name": name, "type": typ, "delta_ms": vb - va})
        items.append({"what": f"{phase}, outside layers", "kind": "outside layers",
                      "phase": phase, "delta_ms": (mb - inside_b) - (ma - inside_a)})
    gap = b["step_ms"]["mean"] - a["step_ms"]["mean"]
    parts = sum(i["delta_ms"] for i in items)
    items.sort(key=lambda i: -abs(i["delta_ms"]))
    groups: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for i in items:
        if i["kind"] == "layer":
            g = groups.setdefault((str(i["type"]), i["phase"]),
                                  {"type": str(i["type"]), "direction": i["phase"],
                                   "delta_ms": 0.0, "layers": 0})
            g["delta_ms"] += i["delta_ms"]
            g["layers"] += 1
    by_type = sorted(groups.values(), key=lambda g: -abs(g["delta_ms"]))
    return {"a_step_ms": a["step_ms"]["mean"], "b_step_ms": b["step_ms"]["mean"],
            "gap_ms": gap, "parts_sum_ms": parts, "items": items, "by_type": by_type}


def _has_direction(layers: Mapping[str, Mapping[str, Any]], direction: str) -> bool:
    return any(e[f"{direction}_ms"] > 0 for e in layers.values())


def top_with_rest(items: Sequence[Mapping[str, Any]], top: int) -> List[Dict[str, Any]]:
    """The first ``top`` items (already largest first) and one "rest" item summing the others
    (with how many), so that the shown parts still add up to the gap."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top_with_rest: top: expected an int >= 1, got {top!r}")
    shown = [dict(i) for i in items[:top]]
    rest = items[top:]
    if rest:
        shown.append({"what": f"rest ({len(rest)} parts)", "kind": "rest",
                      "delta_ms": sum(i["delta_ms"] for i in rest), "count": len(rest)})
    return shown


# --------------------------------------------------------------------------- the gate

def parse_threshold(text: str) -> float:
    """``--fail-if-slower``'s value: "5%" or "5" (percent) as 5.0; a ValueError naming the
    option otherwise."""
    raw = str(text).strip()
    number = raw[:-1].strip() if raw.endswith("%") else raw
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--fail-if-slower: expected a percentage such as 5% or 2.5, got "
                         f"{text!r}") from None
    if not 0.0 <= value < 1e6:
        raise ValueError(f"--fail-if-slower: expected a percentage >= 0, got {text!r}")
    return value


GATE_PASS, GATE_SLOWER, GATE_UNDECIDED = "not slower", "slower", "cannot judge"


def gate(a: Mapping[str, Any], b: Mapping[str, Any], threshold_pct: float,
         on: Sequence[str] = (STEP,), *, renames: Optional[Mapping[str, str]] = None,
         labels: Tuple[str, str] = ("A", "B")) -> List[Dict[str, Any]]:
    """The regression gate for B against A: for each quantity in ``on`` ("step", a phase, a
    layer or LAYER:forward / LAYER:backward), "slower" when its 95% interval lies wholly above
    ``threshold_pct``, "cannot judge" when it has no interval (too few steps or rounds, no
    per-step samples, absent in a run), else "not slower". Returns [{"on", "verdict",
    "diff_pct", "interval", "why"}]. A name neither run has is a ValueError naming --on."""
    renames = dict(renames or {})
    layers_a = renamed_layers(a, renames, labels[0])
    layers_b = renamed_layers(b, renames, labels[1])
    pair = pairing(a, b)
    rounds = ((a["interleaved"]["step_rounds"], b["interleaved"]["step_rounds"])
              if pair["paired"] else None)
    out = []
    for what in on:
        sa, sb = series(a, what, layers_a), series(b, what, layers_b)
        if sa is None and sb is None:
            known = [STEP] + list(phases_of(a.get("phases_ms", {}))) + list(layers_a)[:5]
            raise ValueError(f"--on: expected 'step', a phase or a layer (NAME, NAME:forward, "
                             f"NAME:backward) of the runs, got {what!r}; e.g. {known}")
        r = compare_series(sa, sb, rounds=rounds, labels=labels)
        interval = r["interval"]
        if interval is None:
            verdict, why = GATE_UNDECIDED, r["no_interval"]
        elif interval["low_pct"] > threshold_pct:
            verdict, why = GATE_SLOWER, (f"the interval lies wholly above +{threshold_pct:g}%")
        else:
            verdict, why = GATE_PASS, (f"the interval does not lie wholly above "
                                       f"+{threshold_pct:g}%")
        out.append({"on": what, "verdict": verdict, "diff_pct": r["diff_pct"],
                    "interval": interval, "why": why, "threshold_pct": threshold_pct})
    return out


# --------------------------------------------------------------------------- across frameworks

def layers_across(reports: Sequence[Mapping[str, Any]], labels: Sequence[str]
                  ) -> Dict[str, Any]:
    """One row per layer name, a column per report (e.g. per framework): forward and backward
    mean ms per step and the ratio of each report's forward + backward to the first's.

    Returns {"labels", "rows": [{"name", "type", "forward_ms": {label: ms or None},
    "backward_ms": {...}, "ratio": {label: x or None}}]}; layers in the first report's order,
    then those only others have. A report without layers (graph mode, an error) has None."""
    if len(reports) != len(labels):
        raise ValueError(f"layers_across: labels: expected one per report ({len(reports)}), "
                         f"got {len(labels)}")
    by_label = [{e["name"]: e for e in r.get("layers", []) or []} for r in reports]
    names: List[str] = []
    for layers in by_label:
        names += [n for n in layers if n not in names]
    rows = []
    for name in names:
        entries = [layers.get(name) for layers in by_label]
        typ = next((e.get("type") for e in entries if e is not None), None)
        fwd = {lab: (e["forward_ms"] if e else None) for lab, e in zip(labels, entries)}
        bwd = {lab: (e["backward_ms"] if e else None) for lab, e in zip(labels, entries)}
        first = entries[0]
        base = first["forward_ms"] + first["backward_ms"] if first else None
        ratio = {lab: ((e["forward_ms"] + e["backward_ms"]) / base if e and base else None)
                 for lab, e in zip(labels, entries)}
        rows.append({"name": name, "type": typ, "forward_ms": fwd, "backward_ms": bwd,
                     "ratio": ratio})
    return {"labels": list(labels), "rows": rows}
