"""One profile in every framework, each in a clean process of its own (frameworks' thread
pools, allocators and import-order rules interfere in one process), merged into one list of
reports: ``python -m profiler.layerwise --framework all``.

A framework whose process fails leaves a report saying why, and the others still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from ops import frameworks
from profiler.nsys.capture import strip_options
from profiler.report import build_report, layer_table_across, write_json_atomic

REPO = Path(__file__).resolve().parent.parent
# The options of the parent's command line that each child gets its own value of.
_PER_CHILD = ("--framework", "--out", "--format", "--python")


def profile_each(argv: Sequence[str], out: Path, *, pythons: Mapping[str, str],
                 fields: Dict[str, Any], console) -> List[Dict[str, Any]]:
    """Runs ``python -m profiler.layerwise argv`` once per framework (with ``pythons``'
    interpreter where given) into ``out/<framework>``; returns the reports in registry order
    and writes them to ``out/summary.json`` with their layers side by side
    (``layers_across_frameworks``: report.layer_table_across). ``fields``: what an error report
    says of the run (model, batch_size, ...) for a child that wrote none."""
    reports = []
    passthrough = strip_options(argv, _PER_CHILD)
    for framework in frameworks.FRAMEWORKS:
        child_out = Path(out) / framework
        child_out.mkdir(parents=True, exist_ok=True)
        python = pythons.get(framework, sys.executable)
        cmd = [python, "-m", "profiler.layerwise", *passthrough, "--framework", framework,
               "--out", str(child_out), "--format", "json", "--no-progress"]
        console.print(f"[bold]{framework}[/bold]: {' '.join(cmd[1:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        report_path = child_out / "report.json"
        if report_path.exists():
            report = json.loads(report_path.read_text())
        else:
            report = build_report(framework=framework,
                                  framework_version=frameworks.version_or_unknown(framework),
                                  **fields, errors=[
                                      f"the {framework} process exited with status "
                                      f"{proc.returncode} and wrote no report: "
                                      f"{proc.stderr.strip()[-800:]}"])
            write_json_atomic(report_path, report)
        if proc.returncode != 0 and not report["errors"]:
            report["errors"].append(f"exit status {proc.returncode}: "
                                    f"{proc.stderr.strip()[-800:]}")
        reports.append(report)
    measured = [r for r in reports if "layers" in r]
    write_json_atomic(Path(out) / "summary.json", {
        "reports": reports,
        "layers_across_frameworks": layer_table_across(measured) if measured else None})
    return reports

