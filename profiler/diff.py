"""``python -m profiler.diff A B [C ...]``: where the gap between two runs of the same model
comes from, phase by phase and layer by layer, with intervals, a breakdown of the gap, a
waterfall plot and a regression gate.

A run is a report folder or file (report.json), a merged report of several ranks
(merged_report.json: one rank, the slowest by default, or each rank against the same rank), a
``--framework all`` folder (summary.json: its frameworks, in order) or a ``--compare`` folder
(comparison.json: its variants, paired by round). The first run is the baseline A; every other
run is compared with it. ``profiler.api.diff_runs`` is the same from Python.

This module reads the runs, prints and plots, and maps the command line; the arithmetic is
profiler.analysis.diff's (pure functions of report dicts). Nothing here measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from profiler import console as cli
from profiler.analysis import diff as analysis
from profiler.report import validate_report, write_json_atomic

#: Exit statuses of ``python -m profiler.diff`` (also in --help and docs/diff.md).
EXIT_OK = 0            # the diff was made; with a gate: nothing slower beyond the threshold
EXIT_SLOWER = 1        # the gate: some interval lies wholly above the threshold
EXIT_BAD_INPUT = 2     # bad arguments, or a run that cannot be read
EXIT_UNDECIDED = 3     # the gate: nothing slower, but some quantity has no interval to judge
EXIT_CODES = f"""exit status: {EXIT_OK} the diff was made (with --fail-if-slower: no gated
quantity is slower beyond the threshold); {EXIT_SLOWER} --fail-if-slower: some gated
quantity's 95% interval lies wholly above the threshold; {EXIT_BAD_INPUT} bad arguments or a run
that cannot be read; {EXIT_UNDECIDED} --fail-if-slower: none slower, but some gated quantity has
no interval (too few steps or rounds, a schema-2 report without per-step samples, absent in a
run)."""

DIFF_SCHEMA = "deepprof.diff/1"
RunLike = Union[str, Path, Mapping[str, Any], Any]


# --------------------------------------------------------------------------- reading runs

@dataclass
class Run:
    """One run as the diff reads it: its label, where it came from, the report (one rank's),
    and for a rank of a merged report which one and why."""
    label: str
    source: str
    report: Dict[str, Any]
    rank: Optional[int] = None
    note: Optional[str] = None
    # Which input it came from and, within it, which part (a framework of a summary, a
    # variant of a comparison), for labels.
    input_index: int = 0
    part: Optional[str] = None


def _read_json(path: Path, argument: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"{argument}: cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{argument}: {path} is not JSON: {e}") from None


def _checked(report: Any, where: str) -> Dict[str, Any]:
    """A report the diff can use: measured (step, phases, layers); a report failing the
    schema check is still used when it has those, the failure added to its errors."""
    if not isinstance(report, Mapping) or report.get("tool") != "deepprof":
        raise ValueError(f"{where}: expected a deepprof report (report.json), got "
                         f"{type(report).__name__}"
                         + (f" with keys {sorted(report)[:8]}" if isinstance(report, Mapping)
                            else ""))
    missing = [k for k in ("step_ms", "phases_ms", "layers") if k not in report]
    if missing:
        errors = "; ".join(report.get("errors", [])) or "none given"
        raise ValueError(f"{where}: the report has no measurements ({', '.join(missing)} "
                         f"missing); its errors: {errors}")
    report = dict(report)
    try:
        validate_report(report)
    except ValueError as e:
        report["errors"] = list(report.get("errors", [])) + [f"schema check: {e}"]
    return report


def _merged_ranks(merged: Mapping[str, Any], where: str, rank: Union[str, int]
                  ) -> List[Tuple[int, Dict[str, Any], str]]:
    """(rank, its report, a note) of a merged report: the slowest rank (the largest mean
    step), one given rank, or every rank ("each")."""
    ranks = {int(k): v for k, v in (merged.get("ranks") or {}).items()
             if isinstance(v, Mapping) and "step_ms" in v}
    if not ranks:
        raise ValueError(f"{where}: the merged report has no measured rank; its errors: "
                         f"{'; '.join(merged.get('errors', [])) or 'none given'}")
    world = merged.get("world_size", len(ranks))
    if rank == "each":
        return [(k, ranks[k], f"rank {k} of {world}") for k in sorted(ranks)]
    if rank == "slowest":
        k = max(ranks, key=lambda r: ranks[r]["step_ms"]["mean"])
        return [(k, ranks[k], f"rank {k} of {world}, the slowest (mean step "
                              f"{ranks[k]['step_ms']['mean']:.3f} ms)")]
    if rank not in ranks:
        raise ValueError(f"--rank: expected one of the measured ranks {sorted(ranks)}, "
                         f"'slowest' or 'each', got {rank!r} for {where}")
    return [(rank, ranks[rank], f"rank {rank} of {world}")]


def _from_path(path: Path, index: int, rank: Union[str, int]) -> List[Run]:
    argument = f"RUN {index + 1} ({path})"
    if path.is_dir():
        for name in ("report.json", "merged_report.json", "summary.json", "comparison.json"):
            if (path / name).is_file():
                return _from_file(path / name, index, rank)
        raise ValueError(f"{argument}: expected a folder holding report.json, "
                         f"merged_report.json, summary.json or comparison.json, found none")
    if not path.exists():
        raise ValueError(f"{argument}: no such file or folder")
    return _from_file(path, index, rank)


def _from_file(path: Path, index: int, rank: Union[str, int]) -> List[Run]:
    argument = f"RUN {index + 1} ({path})"
    doc = _read_json(path, argument)
    if not isinstance(doc, Mapping):
        raise ValueError(f"{argument}: expected a JSON object, got {type(doc).__name__}")
    if "ranks" in doc and "world_size" in doc:
        return [Run("", f"{path} rank {k}", _checked(r, f"{argument} rank {k}"), rank=k,
                    note=note, input_index=index)
                for k, r, note in _merged_ranks(doc, argument, rank)]
    if isinstance(doc.get("reports"), list):           # --framework all: summary.json
        return [Run("", f"{path} [{r.get('framework')}]", _checked(r, f"{argument} "
                                                                       f"[{r.get('framework')}]"),
                    input_index=index, part=str(r.get("framework")))
                for r in doc["reports"] if "step_ms" in r]
    if "variants" in doc and "differences" in doc:     # --compare: comparison.json
        runs = []
        for variant in doc["variants"]:
            report_path = path.parent / variant / "report.json"
            if report_path.is_file():
                report = _checked(_read_json(report_path, argument), f"{argument} "
                                                                      f"[{variant}]")
                runs.append(Run("", str(report_path), report, input_index=index,
                                part=variant))
        return runs
    return [Run("", str(path), _checked(doc, argument), input_index=index)]


def _from_object(obj: Any, index: int, rank: Union[str, int]) -> List[Run]:
    doc = getattr(obj, "doc", obj)       # an engine Report, or its dict
    where = f"runs[{index}]"
    if isinstance(doc, Mapping) and "ranks" in doc and "world_size" in doc:
        return [Run("", f"{where} rank {k}", _checked(r, f"{where} rank {k}"), rank=k,
                    note=note, input_index=index)
                for k, r, note in _merged_ranks(doc, where, rank)]
    return [Run("", where, _checked(doc, where), input_index=index)]


def load_runs(runs: Sequence[RunLike], *, rank: Union[str, int] = "slowest",
              labels: Optional[Sequence[str]] = None) -> List[Run]:
    """The runs to compare, in order: each of ``runs`` is a path (a report folder or file, a
    merged report, a --framework all or --compare folder: module docstring), a report dict or
    an engine Report. ``rank``: which rank of a merged report ("slowest", an int, or "each").
    ``labels``: one per run read (default: the framework, or more where that repeats)."""
    if isinstance(runs, (str, Path)) or not isinstance(runs, Sequence):
        raise ValueError(f"runs: expected a list of report paths or reports, got "
                         f"{type(runs).__name__}")
    if not (rank in ("slowest", "each") or (isinstance(rank, int) and not isinstance(rank, bool)
                                            and rank >= 0)):
        raise ValueError(f"--rank: expected 'slowest', 'each' or a rank number >= 0, got "
                         f"{rank!r}")
    loaded: List[Run] = []
    for i, item in enumerate(runs):
        if isinstance(item, (str, Path)):
            loaded += _from_path(Path(item), i, rank)
        else:
            loaded += _from_object(item, i, rank)
    if len(loaded) < 2:
        raise ValueError(f"runs: expected at least two runs to compare, got {len(loaded)} "
                         f"from {len(runs)} input(s)")
    if labels is not None:
        labels = list(labels)
        if len(labels) != len(loaded) or len(set(labels)) != len(labels) \
                or not all(isinstance(x, str) and x for x in labels):
            raise ValueError(f"--labels: expected {len(loaded)} distinct non-empty labels (one "
                             f"per run read), got {labels}")
    else:
        labels = default_labels(loaded)
    for run, label in zip(loaded, labels):
        run.label = label
    return loaded


def default_labels(runs: Sequence[Run]) -> List[str]:
    """The framework; where that repeats, the variant or folder name (or the mode); then a
    number. A rank of a merged report adds "rankN"."""
    def with_rank(base: List[str]) -> List[str]:
        return [b + (f"-rank{r.rank}" if r.rank is not None else "") for b, r in zip(base, runs)]

    labels = with_rank([str(r.report.get("framework")) for r in runs])
    if len(set(labels)) < len(labels):
        labels = with_rank([r.part or _folder(r.source) for r in runs])
    if len(set(labels)) < len(labels):
        labels = [f"{label}#{i + 1}" for i, label in enumerate(labels)]
    return labels


def _folder(source: str) -> str:
    path = Path(source.split(" ")[0])
    return (path.parent.name if path.suffix == ".json" else path.name) or "run"


def pairs_of(runs: Sequence[Run], rank: Union[str, int] = "slowest") -> List[Tuple[Run, Run]]:
    """(A, B) for every comparison: the first run against each other; with rank "each", every
    rank against the same rank of the first input."""
    if rank != "each" or all(r.rank is None for r in runs):
        return [(runs[0], other) for other in runs[1:]]
    first = [r for r in runs if r.input_index == runs[0].input_index]
    by_rank = {r.rank: r for r in first}
    pairs = []
    for other in runs:
        if other.input_index == runs[0].input_index:
            continue
        if other.rank not in by_rank:
            raise ValueError(f"--rank each: {other.label} has rank {other.rank}, which the "
                             f"first run lacks (its ranks: {sorted(by_rank)})")
        pairs.append((by_rank[other.rank], other))
    return pairs


# --------------------------------------------------------------------------- renames

def parse_renames(items: Sequence[str]) -> Dict[str, str]:
    """``--map`` values: FROM=TO (a layer named FROM in any run is matched as TO), or a JSON
    file holding {FROM: TO}. A ValueError naming --map otherwise."""
    renames: Dict[str, str] = {}
    for item in items:
        if "=" not in item and item.endswith(".json"):
            doc = _read_json(Path(item), "--map")
            if not isinstance(doc, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in doc.items()):
                raise ValueError(f"--map {item}: expected a JSON object of layer names "
                                 f"{{FROM: TO}}")
            pairs = list(doc.items())
        else:
            old, sep, new = item.partition("=")
            if not sep or not old or not new:
                raise ValueError(f"--map: expected FROM=TO (layer names) or a .json file of "
                                 f"them, got {item!r}")
            pairs = [(old, new)]
        for old, new in pairs:
            if renames.get(old, new) != new:
                raise ValueError(f"--map: {old!r} is mapped twice ({renames[old]!r} and "
                                 f"{new!r})")
            renames[old] = new
    return renames


# --------------------------------------------------------------------------- the facade

@dataclass
class GateResult:
    """The regression gate's verdicts ({"a", "b", "on", "verdict", ...} per gated quantity
    and pair) and the exit status they give (EXIT_OK, EXIT_SLOWER, EXIT_UNDECIDED)."""
    threshold_pct: float
    results: List[Dict[str, Any]]

    @property
    def exit_code(self) -> int:
        verdicts = {r["verdict"] for r in self.results}
        if analysis.GATE_SLOWER in verdicts:
            return EXIT_SLOWER
        if analysis.GATE_UNDECIDED in verdicts:
            return EXIT_UNDECIDED
        return EXIT_OK

    def lines(self) -> List[str]:
        out = []
        for r in self.results:
            iv = r["interval"]
            interval = (f"[{_pct(iv['low_pct'])}, {_pct(iv['high_pct'])}] ({_n(iv)})"
                        if iv else "no interval")
            out.append(f"gate {r['b']} vs {r['a']}, {r['on']}: {_pct(r['diff_pct'])} "
                       f"{interval}: {r['verdict']} ({r['why']})")
        return out


@dataclass
class Diff:
    """The diff of runs: ``doc`` (what diff.json holds: the runs, and per pair of runs the
    phase and layer rows, the gap breakdown and the comparability warnings), ``print()``,
    ``save(out)`` (diff.json and the waterfall plots) and ``gate(threshold_pct, on)``."""
    runs: List[Run]
    pairs: List[Tuple[Run, Run]]
    renames: Dict[str, str] = field(default_factory=dict)
    doc: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.doc = {
            "schema": DIFF_SCHEMA,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "runs": [_run_summary(r) for r in self.runs], "renames": self.renames,
            "pairs": [{"a": a.label, "b": b.label,
                       **analysis.diff_reports(a.report, b.report, renames=self.renames,
                                               labels=(a.label, b.label))}
                      for a, b in self.pairs]}

    def gate(self, threshold_pct: float, on: Sequence[str] = (analysis.STEP,)) -> GateResult:
        """B against A for every pair: "slower" where the 95% interval of ``on`` ("step", a
        phase, a layer, LAYER:forward/backward) lies wholly above ``threshold_pct``."""
        if isinstance(threshold_pct, str):
            threshold_pct = analysis.parse_threshold(threshold_pct)
        results = []
        for a, b in self.pairs:
            for r in analysis.gate(a.report, b.report, threshold_pct, on,
                                   renames=self.renames, labels=(a.label, b.label)):
                results.append({"a": a.label, "b": b.label, **r})
        self.doc["gate"] = {"threshold_pct": threshold_pct, "on": list(on),
                            "results": results}
        return GateResult(threshold_pct, results)

    def print(self, console=None, *, top: int = 12) -> None:
        """The tables of every pair (render_pair)."""
        from rich.console import Console
        console = console or Console()
        for pair, (a, b) in zip(self.doc["pairs"], self.pairs):
            render_pair(pair, a, b, console, top=top)

    def save(self, out: Union[str, Path], *, plot: bool = True, top: int = 12
             ) -> Dict[str, Path]:
        """diff.json and, with ``plot``, a waterfall of each pair's gap (waterfall-<B>.png and
        .svg) into ``out`` (created)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written: Dict[str, Path] = {}
        if plot:
            for pair in self.doc["pairs"]:
                stem = out / f"waterfall-{_file_label(pair['b'])}"
                if len(self.doc["pairs"]) > 1 and pair["a"] != self.doc["pairs"][0]["a"]:
                    stem = out / f"waterfall-{_file_label(pair['b'])}-vs-" \
                                 f"{_file_label(pair['a'])}"
                written.update(plot_waterfall(pair, stem, top=top))
        write_json_atomic(out / "diff.json", self.doc)
        written["diff"] = out / "diff.json"
        return written


def diff_runs(*runs: RunLike, renames: Optional[Mapping[str, str]] = None,
              rank: Union[str, int] = "slowest", labels: Optional[Sequence[str]] = None
              ) -> Diff:
    """The diff of ``runs`` (paths, report dicts or engine Reports; load_runs), the first the
    baseline: module docstring. ``renames``: {layer name: the name to match it as}."""
    if len(runs) == 1 and isinstance(runs[0], (list, tuple)):
        runs = tuple(runs[0])
    renames = dict(renames or {})
    loaded = load_runs(list(runs), rank=rank, labels=labels)
    return Diff(loaded, pairs_of(loaded, rank), renames)


def _run_summary(run: Run) -> Dict[str, Any]:
    r = run.report
    return {"label": run.label, "source": run.source, "rank": run.rank, "note": run.note,
            "framework": r.get("framework"), "framework_version": r.get("framework_version"),
            "model": r.get("model"), "mode": r.get("mode"), "batch_size": r.get("batch_size"),
            "impls": r.get("impls"), "device": r.get("device"), "parameters": r.get("parameters"),
            "dtype": r.get("dtype"), "threads": (r.get("threads") or {}).get("requested"),
            "machine": r.get("machine"), "instrument_kind": r.get("instrument_kind"),
            "iters": r.get("iters"), "schema_version": r.get("schema_version"),
            "created": r.get("created")}


def _file_label(label: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", label).strip("_") or "run"


# --------------------------------------------------------------------------- rendering

def _ms(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x + 0.0:+.3f}" if signed else f"{x:.3f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{round(x, 1) + 0.0:+.1f}%"


def _n(interval: Mapping[str, Any]) -> str:
    if interval["unit"] == "rounds":
        return f"{interval['n']} rounds, {interval['confidence']:.1%} exact"
    return f"{interval['n'][0]}/{interval['n'][1]} steps"


def _run_line(run: Run) -> str:
    r = run.report
    device = r.get("device", {})
    threads = (r.get("threads") or {}).get("requested")
    params = r.get("parameters")
    return (f"{run.label}: {r.get('framework')} {r.get('framework_version')}, {r.get('model')}"
            f"{f' ({params:,} parameters)' if params else ''}, {r.get('mode', 'eager')} mode, "
            f"batch {r.get('batch_size')}, conv={r.get('impls', {}).get('conv')}, "
            f"{device.get('kind')}"
            f"{f', {threads} threads' if threads else ''}, {r.get('iters')} steps"
            f"{f', {run.note}' if run.note else ''}; {run.source}")


def _row_cells(row: Mapping[str, Any]) -> List[str]:
    def side(s: str) -> str:
        if row[f"{s}_median_ms"] is not None:
            return f"{row[f'{s}_median_ms']:.3f} ({row[f'{s}_iqr_ms']:.3f})"
        return "-" if row[f"{s}_mean_ms"] is None else f"{row[f'{s}_mean_ms']:.3f} (mean)"
    iv = row["interval"]
    interval = (f"[{_num_pct(iv['low_pct'])}, {_num_pct(iv['high_pct'])}]" if iv else
                (row["no_interval"] or "-"))
    n = "-" if not iv else (f"{iv['n']} rnd" if iv["unit"] == "rounds"
                            else f"{iv['n'][0]}/{iv['n'][1]}")
    return [side("a"), side("b"), _ms(row["diff_ms"], signed=True), _pct(row["diff_pct"]),
            interval, n]


def _num_pct(x: float) -> str:
    return f"{round(x, 1) + 0.0:+.1f}"


def _diff_table(title: str, first: str, a: str, b: str, names: Sequence[str] = ()):
    from rich.table import Table
    from rich.text import Text
    table = Table(title=Text(title, style="table.title"))
    # Names are what users look up: never cut them.
    table.add_column(first, no_wrap=True, min_width=max((len(n) for n in names), default=5))
    for name in (a, b, "B-A ms", "B-A %", "95% CI %", "n"):
        table.add_column(Text(name), justify="right", no_wrap=True)
    return table


def render_pair(pair: Mapping[str, Any], a: Run, b: Run, console, *, top: int = 12) -> None:
    """One pair's output: the runs, the comparability warnings, how the samples were
    compared, the phase table, the layer table (the ``top`` largest differences), layers in
    one run only, and the gap breakdown."""
    from rich.table import Table
    from rich.text import Text
    la, lb = pair["a"], pair["b"]
    console.print(Text(f"{lb} vs {la} (the baseline)", style="bold"))
    console.print(Text(f"  A = {_run_line(a)}"))
    console.print(Text(f"  B = {_run_line(b)}"))
    for w in pair["comparability"]["warnings"]:
        console.print(Text(f"warning: {w}", style="yellow"))
    for s in pair["comparability"]["stated"]:
        console.print(Text(f"note: {s}", style="dim"))
    console.print(Text(f"statistics: {pair['pairing']['why']}; 95% intervals of B/A - 1 "
                       f"in %, n: steps of A/B or rounds (rnd)", style="dim"))

    table = _diff_table("Phases: median (IQR) ms per step", "phase", la, lb)
    for phase, row in pair["phases"].items():
        table.add_row(phase, *_row_cells(row))
    table.add_section()
    table.add_row(Text("step", style="bold"), *_row_cells(pair["step"]))
    console.print(table)

    rows = sorted((r for r in pair["layers"] if r["diff_ms"] is not None),
                  key=lambda r: -abs(r["diff_ms"]))
    if rows:
        labels = [f"{r['name']} {'fwd' if r['direction'] == 'forward' else 'bwd'}"
                  for r in rows[:top]]
        table = _diff_table(f"Layers: median (IQR) ms per step, the {min(top, len(rows))} "
                            f"largest differences of {len(rows)} (all in diff.json)", "layer",
                            la, lb, labels)
        for r in rows[:top]:
            table.add_row(Text(f"{r['name']} {'fwd' if r['direction'] == 'forward' else 'bwd'}"),
                          *_row_cells(r))
        console.print(table)
    else:
        console.print(Text("Layers: no layer measured in both runs (graph mode has none)",
                           style="dim"))
    for (label, names), run in zip(pair["only_in"].items(), (b, a)):
        if names and not run.report.get("layers"):
            console.print(Text(f"layers only in {label} ({len(names)}): {run.label} has no "
                               f"layer times ({run.report.get('mode')} mode)", style="dim"))
        elif names:
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8
                                            else "")
            console.print(Text(f"layers only in {label} ({len(names)}): {shown} (--map FROM=TO "
                               f"matches renamed layers)", style="yellow"))

    bd = pair["breakdown"]
    gap = bd["gap_ms"]
    console.print(Text(f"The gap: {lb} {bd['b_step_ms']:.3f} ms - {la} {bd['a_step_ms']:.3f} "
                       f"ms = {gap:+.3f} ms per step (mean steps; their parts add up)",
                       style="bold"))
    table = Table(title=Text("The gap's parts, largest first", style="table.title"))
    table.add_column("part", no_wrap=True)
    table.add_column("B-A ms", justify="right")
    table.add_column("% of gap", justify="right")
    table.add_column("running total ms", justify="right")
    total = 0.0
    for item in analysis.top_with_rest(bd["items"], top):
        total += item["delta_ms"]
        table.add_row(Text(item["what"]), f"{item['delta_ms']:+.3f}",
                      f"{100 * item['delta_ms'] / gap:+.1f}%" if gap else "-", f"{total:+.3f}")
    table.add_section()
    table.add_row(Text("sum of the parts", style="bold"), f"{bd['parts_sum_ms']:+.3f}",
                  f"{100 * bd['parts_sum_ms'] / gap:.1f}%" if gap else "-", "")
    console.print(table)
    for g in bd["by_type"][:3]:
        console.print(Text(f"  by layer type: {g['type']} {g['direction']}: "
                           f"{g['delta_ms']:+.3f} ms in {g['layers']} layer(s)"
                           + (f" ({100 * g['delta_ms'] / gap:+.0f}% of the gap)" if gap
                              else "")))
    console.print()


# --------------------------------------------------------------------------- the plot

def plot_waterfall(pair: Mapping[str, Any], stem: Path, *, top: int = 12) -> Dict[str, Path]:
    """The gap as a horizontal waterfall: A's mean step, each of the ``top`` largest parts
    (red: B slower there, green: faster), the rest, B's mean step; saved as stem.png and
    stem.svg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bd = pair["breakdown"]
    items = analysis.top_with_rest(bd["items"], top)
    la, lb = pair["a"], pair["b"]
    labels = [f"{la} step"] + [i["what"] for i in items] + [f"{lb} step"]
    starts, widths, colours = [0.0], [bd["a_step_ms"]], ["0.55"]
    level = bd["a_step_ms"]
    for i in items:
        starts.append(level if i["delta_ms"] >= 0 else level + i["delta_ms"])
        widths.append(abs(i["delta_ms"]))
        colours.append("tab:red" if i["delta_ms"] > 0 else "tab:green")
        level += i["delta_ms"]
    starts.append(0.0)
    widths.append(bd["b_step_ms"])
    colours.append("0.35")

    fig, ax = plt.subplots(figsize=(9, 0.42 * len(labels) + 1.6))
    y = list(range(len(labels)))[::-1]
    ax.barh(y, widths, left=starts, color=colours, edgecolor="black", linewidth=0.4)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ends = [s + w for s, w in zip(starts, widths)]
    lows = [s for s in starts[1:-1]] + [bd["a_step_ms"], bd["b_step_ms"]]
    highs = ends[1:-1] + [bd["a_step_ms"], bd["b_step_ms"]]
    low, high = min(lows), max(highs)
    span = max(high - low, 1e-9)
    # A small gap on a long step is invisible from 0: start the axis near the parts instead.
    if low > 3 * span:
        ax.set_xlim(low - 0.4 * span, high + 0.4 * span)
        ax.set_xlabel("ms per step (mean); the axis does not start at 0")
    else:
        ax.set_xlim(0, high + 0.15 * span)
        ax.set_xlabel("ms per step (mean)")
    for yi, s, w, i in zip(y[1:-1], starts[1:-1], widths[1:-1], items):
        ax.text(s + w, yi, f" {i['delta_ms']:+.2f}", va="center", fontsize=7)
    for yi, total in ((y[0], bd["a_step_ms"]), (y[-1], bd["b_step_ms"])):
        ax.text(total, yi, f" {total:.2f}", va="center", fontsize=7)
    ax.set_title(f"{lb} vs {la}: {bd['gap_ms']:+.2f} ms per step, where it comes from",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext in ("png", "svg"):
        path = stem.with_name(f"{stem.name}.{ext}")
        fig.savefig(path, dpi=120)
        paths[f"{stem.name}.{ext}"] = path
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m profiler.diff", formatter_class=cli.HelpFormatter,
        description="Where the gap between two runs of the same model comes from: per phase "
                    "and per layer (matched by name) each run's median and IQR, B minus A in "
                    "ms and %, and a 95% interval from the per-step samples (paired by round "
                    "only for runs measured in the same interleaved --compare run); B's step "
                    "minus A's broken down into phases and layers, largest first, as a table "
                    "and a waterfall plot; warnings where the runs are not comparable; a "
                    "regression gate for CI. The first run is the baseline A, every other "
                    "run B.",
        epilog=f"Writes diff.json and waterfall-<B>.png/.svg into --out. {EXIT_CODES} "
               f"Guide: docs/diff.md.")
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="a report folder or file (report.json), a merged_report.json of "
                        "several ranks, a --framework all folder (summary.json: its "
                        "frameworks) or a --compare folder (comparison.json: its variants)")
    p.add_argument("--map", action="append", default=[], metavar="FROM=TO",
                   help="match the layer FROM (in any run) as TO; or a .json file of "
                        "{FROM: TO}; repeatable")
    p.add_argument("--rank", default="slowest", metavar="slowest|each|N",
                   help="which rank of a merged report: the slowest (largest mean step), "
                        "rank N, or each rank against the same rank of the first run")
    p.add_argument("--labels", default=None, metavar="A,B,...",
                   help="names of the runs read, in order (default: the framework, or the "
                        "variant or folder where that repeats)")
    p.add_argument("--top", type=cli.positive_int, default=12, metavar="N",
                   help="layers shown, and parts of the gap before the rest")
    p.add_argument("--out", default=None,
                   help="output folder (default: runs/diff/<A>-vs-<B>)")
    p.add_argument("--format", default="table", choices=("table", "json"),
                   help="what to print: tables, or diff.json's content")
    p.add_argument("--no-plot", action="store_true", help="no waterfall plot")
    gate = p.add_argument_group("regression gate (for CI)")
    gate.add_argument("--fail-if-slower", default=None, metavar="PCT",
                      help="exit 1 when B's 95%% interval (against A) lies wholly above PCT "
                           "percent slower, e.g. 5%%; 3 when there is no interval to judge")
    gate.add_argument("--on", action="append", default=[], metavar="WHAT",
                      help="what the gate judges: step (the default), a phase, a layer (its "
                           "forward + backward) or LAYER:forward / LAYER:backward; repeatable")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.renames = parse_renames(args.map)
        if args.fail_if_slower is not None:
            args.threshold_pct = analysis.parse_threshold(args.fail_if_slower)
        elif args.on:
            raise ValueError(f"--on: judges with --fail-if-slower PCT; got --on "
                             f"{' '.join(args.on)} without it")
    except ValueError as e:
        parser.error(str(e))
    if args.rank not in ("slowest", "each"):
        if not args.rank.isdigit():
            parser.error(f"--rank: expected 'slowest', 'each' or a rank number, got "
                         f"{args.rank!r}")
        args.rank = int(args.rank)
    if args.labels is not None:
        args.labels = [x.strip() for x in args.labels.split(",")]
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        result = diff_runs(*args.runs, renames=args.renames, rank=args.rank,
                           labels=args.labels)
        gate = (result.gate(args.threshold_pct, args.on or [analysis.STEP])
                if args.fail_if_slower is not None else None)
        out = Path(args.out) if args.out else Path(
            "runs", "diff", "-vs-".join(_file_label(r.label) for r in result.runs[:4]))
        from profiler.environment import check_output_dir
        check_output_dir(out)
        written = result.save(out, plot=not args.no_plot, top=args.top)
    except ValueError as e:
        cli.error_line(str(e))
        return EXIT_BAD_INPUT
    if args.format == "json":
        print(json.dumps(result.doc, indent=1))
    else:
        from rich.console import Console
        console = Console()
        result.print(console, top=args.top)
        if gate is not None:
            from rich.text import Text
            for line, r in zip(gate.lines(), gate.results):
                style = {analysis.GATE_SLOWER: "red", analysis.GATE_UNDECIDED: "yellow"}.get(
                    r["verdict"], "green")
                console.print(Text(line, style=style))
        cli.stderr_console().print(f"written: {', '.join(str(p) for p in written.values())}",
                                   highlight=False, soft_wrap=True)
    return gate.exit_code if gate is not None else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
