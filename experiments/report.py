"""Collects every study's result.json under runs/experiments/ into REPORT.md: per study its
settings and where they depart from the published ones, the machine and versions, its tables,
plots and verdicts, and first one summary table of every verdict (with the execution modes it
was measured in) and resnet_depth's two mode tables: Table A, the published table with each
framework in its published mode, and Table B, each framework's graph / eager ratio.

    python -m experiments.report                       # runs/experiments/REPORT.md
    python -m experiments.report --root runs/experiments --out REPORT.md

Reads only; measures nothing. A study that failed or is missing is listed as such.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from experiments import study
from profiler.console import output_file

STUDIES = ("parity", "resnet_depth", "deeppose_loss", "swap", "data_loading")
# Tables shown at the top of the report (study, title prefix), not again in the study's section.
HEADLINE_TABLES = (("resnet_depth", "Table A"), ("resnet_depth", "Table B"))


def load_results(root: Path) -> Dict[str, Dict[str, object]]:
    """{study: result.json} for every study folder under ``root`` with one; a result that
    does not validate is returned as {"invalid": reason}."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"load_results: root: expected a folder, got {str(root)!r}")
    results: Dict[str, Dict[str, object]] = {}
    for path in sorted(root.glob("*/result.json")):
        try:
            doc = json.loads(path.read_text())
            study.validate_result(doc)
        except (ValueError, json.JSONDecodeError) as e:
            results[path.parent.name] = {"invalid": f"{path}: {e}"}
            continue
        results[doc["study"]] = doc
    return results


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: List[str], rows: List[List[object]]) -> List[str]:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
             "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


VERDICT_RULES = (
    "How to read it. Each effect is the median over rounds of a per-round paired value (a ratio "
    "of two cells measured in the same round, or a part's share of a gap), with its exact "
    "distribution-free interval: two order statistics of the rounds, whose coverage is printed "
    "(97.9% at n = 10). Every claim has one kind. **direction** (\"X is slower than Y by more "
    "than 5%\"): supported when the whole interval lies beyond the threshold, refuted when it "
    "lies short of it, inconclusive when it straddles it. **magnitude** (\"our ratio agrees "
    "with the published one\"): an equivalence test, supported when our interval lies inside "
    "the band published / 1.25 to published x 1.25, refuted when it lies wholly outside, "
    "inconclusive otherwise; the published figures come from another regime (a K80 GPU or "
    "another CPU, 2017 versions), named in the line. **mechanism** (\"a part accounts for at "
    "least s of the gap\"): supported when the interval's low end reaches s, refuted when its "
    "high end falls short. **too few rounds**: fewer than 10 rounds, no verdict. **not testable "
    "here**: what the claim needs cannot happen at this scale (the reason is given). A flag "
    "marks verdicts whose rounds other processes contended for (more than the stated share of "
    "a core, measured per round from /proc).")


def _verdict(record) -> str:
    """'**supported**', '**not testable here**: data wait is 2.2% of the step', with a flag
    where rounds were contended."""
    text = f"**{record['verdict']}**"
    if record.get("reason"):
        text += f": {record['reason']}"
    if record.get("contended_rounds"):
        text += (f" (flag: {len(record['contended_rounds'])} of {record.get('n')} rounds "
                 f"contended)")
    return text


def _modes(conditions: Dict[str, object]) -> str:
    """A verdict's execution modes: "Keras(TF) graph, PyTorch eager"; "eager" where the
    conditions predate modes (every study ran eager then)."""
    modes = conditions.get("modes")
    if not isinstance(modes, dict) or not modes:
        return "eager"
    return ", ".join(f"{study.PUBLISHED_NAMES.get(f, f)} {m}" for f, m in modes.items())


def _headline(name: str, table: Dict[str, object]) -> bool:
    return any(name == s and table.get("title", "").startswith(prefix)
               for s, prefix in HEADLINE_TABLES)


def _render_table(table: Dict[str, object]) -> List[str]:
    lines = [f"### {table['title']}", ""] + _table(table["columns"], table["rows"])
    if table.get("note"):
        lines += ["", f"_{table['note']}_"]
    return lines + [""]


def render(results: Dict[str, Dict[str, object]], root: Path) -> str:
    """The REPORT.md text for ``results`` (plots linked relative to ``root``)."""
    lines = ["# Experiments: the published framework comparisons, reproduced", "",
             "Generated by `python -m experiments.report` from each study's `result.json` "
             "(`make experiments` reruns everything at the quick scale). Every number below "
             "was measured by the run recorded beside it.", ""]
    present = [s for s in STUDIES if s in results] + sorted(set(results) - set(STUDIES))
    verdict_rows = []
    for name in present:
        doc = results[name]
        for record in doc.get("verdicts", []):
            if "kind" not in record:      # a result.json of schema 1: no kind, no quantity
                continue
            verdict_rows.append([record["claim"], record["kind"],
                                 study.describe_quantity(record["quantity"]),
                                 study.describe_effect(record), record["threshold_text"],
                                 record.get("published_text") or "-", _verdict(record)])
    lines += ["## Summary: every claim and its verdict", ""]
    if verdict_rows:
        lines += _table(["claim", "kind", "quantity", "our effect [interval] (coverage, n)",
                         "judged against", "published figure and its regime", "verdict"],
                        verdict_rows)
    else:
        lines.append("No verdicts: no study has finished.")
    lines += ["", VERDICT_RULES]
    headline = [(name, t) for name in present for t in results[name].get("tables", [])
                if _headline(name, t)]
    lines += ["", "## Each framework as its users train it (resnet_depth)", ""]
    if headline:
        lines += ["Table A is the published table with each framework in the execution mode it "
                  "ran in there (Keras on TensorFlow and on MXNet: graph; Chainer and PyTorch: "
                  "eager); Table B gives each framework's compiled (graph) step over its eager "
                  "step with its interval, and how the gap grows with depth: what eager dispatch "
                  "costs. The mode of every figure is in its row or title.", ""]
        for _, table in headline:
            lines += _render_table(table)
        if not any(t["title"].startswith("Table B") for _, t in headline):
            lines.append("Table B (graph / eager) needs `python -m experiments.resnet_depth "
                         "--mode both` (the default).")
    else:
        lines.append("Not measured: resnet_depth has no result here with these tables.")
    devices = {r.get("settings", {}).get("device") for r in results.values()}
    if "cuda" not in devices:
        lines += ["", "GPU rows: **not measured yet** (every study here ran with --device cpu; "
                      "the GPU rows need `--device cuda` on the GPU machine, PyTorch and "
                      "Chainer only)."]
    parity = results.get("parity", {}).get("parity")
    if parity is not None:
        lines += ["", f"Parity check (the models learn alike): "
                      f"**{'passed' if parity['passed'] else 'FAILED'}** (final losses within "
                      f"{parity['tolerance_rel']:.0%} of PyTorch's and falling)."]
    missing = [s for s in STUDIES if s not in results]
    if missing:
        lines += ["", f"Not run (no result.json): {', '.join(missing)}."]
    first = next((results[s] for s in present if "machine" in results[s]), None)
    if first is not None:
        m = first["machine"]
        lines += ["", "## Machine", "",
                  f"- CPU: {m.get('cpu_model')}; AVX2 {m.get('avx2')}, FMA {m.get('fma')}, "
                  f"AVX-512 {', '.join(m.get('avx512') or []) or 'none'}; "
                  f"{m.get('physical_cores')} physical cores, {m.get('logical_cpus')} logical "
                  f"CPUs usable; {m.get('memory_gib') or 0:.1f} GiB memory",
                  f"- {m.get('platform')}, Python {m.get('python')}",
                  "- load average (1, 5, 15 min) at each study's start and end:"]
        for name in present:
            mm = results[name].get("machine", {})
            if mm:
                lines.append(f"  - {name}: {_load(mm.get('load_average_start'))} -> "
                             f"{_load(mm.get('load_average_end'))}")
        versions = {}
        for name in present:
            versions.update({k: v for k, v in results[name].get("versions", {}).items() if v})
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    for name in present:
        lines += ["", *render_study(name, results[name], root)]
    return "\n".join(lines) + "\n"


def _load(values) -> str:
    return "?" if not values else ", ".join(f"{v:.2f}" for v in values)


def render_study(name: str, doc: Dict[str, object], root: Path) -> List[str]:
    """One study's section."""
    lines = [f"## {name}", ""]
    if "invalid" in doc:
        return lines + [f"Unreadable result: {doc['invalid']}"]
    settings = doc["settings"]
    lines += [f"Status: **{doc['status']}**, scale **{doc['scale']}**, "
              f"{doc.get('wall_s') or 0:.0f} s wall, started {doc['started']}. "
              f"Command: `{doc['command']}`.", "",
              "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    machine = doc["machine"]
    if machine.get("worker_peak_rss_mib"):
        lines += ["Peak memory per framework worker (MiB): " + ", ".join(
            f"{f} {v:.0f}" for f, v in machine["worker_peak_rss_mib"].items() if v) + "; "
            f"load average {_load(machine.get('load_average_start'))} at the start, "
            f"{_load(machine.get('load_average_end'))} at the end.", ""]
    if doc["departures"]:
        lines += ["Where this run departs from the published settings:", ""]
        lines += [f"- {d}" for d in doc["departures"]] + [""]
    for table in doc["tables"]:
        if _headline(name, table):
            lines += [f"### {table['title']}", "", "Shown at the top of this report.", ""]
        else:
            lines += _render_table(table)
    for plot in doc["plots"]:
        lines += [f"![{plot['caption']}]({name}/{plot['file']})", "", f"_{plot['caption']}_",
                  ""]
    if doc["verdicts"]:
        lines += ["### Verdicts", ""]
        for record in doc["verdicts"]:
            if "kind" not in record:
                continue
            c = record["conditions"]
            versions = ", ".join(f"{k} {v}" for k, v in (c.get("versions") or {}).items())
            lines.append(f"- {_verdict(record)} [{record['kind']}] {record['claim']}: "
                         f"{study.describe_quantity(record['quantity'])}: "
                         f"{study.describe_effect(record)}, judged against "
                         f"{record['threshold_text']}. Conditions: {c.get('scale')} scale, "
                         f"modes: {_modes(c)}; {versions}.")
        lines.append("")
    contention = doc.get("contention")
    if contention:
        flagged = sum(r["contended"] for block in contention["blocks"] for r in block)
        total = sum(len(block) for block in contention["blocks"])
        worst = max((r["others_cores_max"] or 0.0 for block in contention["blocks"]
                     for r in block), default=0.0)
        lines += [f"Contention: {flagged} of {total} rounds had other processes above "
                  f"{contention['level_cores']:g} cores (the worst visit: {worst:.2f} cores)."]
        wait = doc["machine"].get("quiet_wait")
        if wait:
            lines[-1] += (f" Before starting it waited {wait['waited_s']:.0f} s for a quiet "
                          f"machine ({'reached' if wait['quiet'] else 'not reached'}).")
        lines.append("")
    if doc["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    if doc["errors"]:
        lines += ["Errors:", ""] + [f"- {e}" for e in doc["errors"]] + [""]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/experiments"),
                        help="folder holding one folder per study (default: %(default)s)")
    parser.add_argument("--out", type=output_file, default=None,
                        help="the report file (default: ROOT/REPORT.md)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root: expected a folder with the studies' outputs, got "
                     f"{str(args.root)!r} (run `make experiments` first)")
    results = load_results(args.root)
    out = args.out or args.root / "REPORT.md"
    text = render(results, args.root)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(f"wrote {out} ({len(results)} studies, "
          f"{sum(len(d.get('verdicts', [])) for d in results.values())} verdicts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
