"""A profiler run under Nsight Systems: the same ``python -m profiler.layerwise`` command, less
``--nsys``, run again as a child under ``nsys profile`` (profiler.nsys.tool), then exported to
SQLite and analysed per range (profiler.nsys.api) into the run's output folder.

Orchestration only: the flags live in ``tool``, the analysis in ``api``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Sequence

NSYS_REPORT = "profile"      # profile.nsys-rep, profile.sqlite in the output folder
# Set for the child under nsys: a child that still asked for --nsys would capture itself again.
UNDER_NSYS = "DEEPPROF_UNDER_NSYS"
# The child's options that belong to the capture, not to the profile.
_CAPTURE_OPTIONS = ("--out", "--nsys-timeout", "--nsys-cpu-sampling")


def strip_options(argv: Sequence[str], names: Sequence[str]) -> List[str]:
    """``argv`` without the options ``names`` and their values (``--opt v`` or ``--opt=v``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in names:
            skip = "=" not in item
            continue
        out.append(item)
    return out


def auto_device() -> str:
    """--device auto for the nsys flags, without importing a framework here (the child does):
    whether ops._C sees a CUDA device."""
    try:
        import ops
        return "cuda" if ops.cuda_available() else "cpu"
    except Exception:          # no build: the child will say so
        return "cpu"


def profile_under_nsys(argv: Sequence[str], out: Path, *, device: str, sample_cpu: bool,
                       timeout_s: int, print_tables: bool, console) -> int:
    """Runs ``python -m profiler.layerwise argv`` (argv as the user gave it, --nsys included)
    under ``nsys profile`` into ``out``, exports profile.sqlite and writes the capture's
    analysis beside the child's report. Returns the exit status: 2 for a missing nsys or a
    nested capture (one line on ``console``), 1 when the capture or its analysis failed, else
    the child's status (its report.json says why it failed, if it did)."""
    from profiler.nsys import tool

    if os.environ.get(UNDER_NSYS):
        console.print(f"[red]error[/red]: --nsys: this process already runs under nsys "
                      f"({UNDER_NSYS} is set); not capturing again", highlight=False)
        return 2
    try:
        nsys = tool.find_nsys()
    except tool.NsysNotFound as e:
        console.print(f"[red]error[/red]: --nsys: {e}", markup=True, highlight=False)
        return 2
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # argparse takes any unambiguous prefix of --nsys ("--ns") for it: drop those too. The
    # child writes into the same --out, made explicit so that no default can differ.
    own = [a for a in argv if not (a.startswith("--ns") and "--nsys".startswith(a))]
    child = [sys.executable, "-m", "profiler.layerwise", *strip_options(own, _CAPTURE_OPTIONS),
             "--out", str(out)]
    console.print(f"[bold]nsys[/bold] ({device}): {nsys} profile ... "
                  f"-o {out / NSYS_REPORT} {' '.join(child)}", highlight=False)
    try:
        report_path, status = tool.capture(child, out / NSYS_REPORT, device=device, nsys=nsys,
                                           sample_cpu=sample_cpu,
                                           env={**os.environ, UNDER_NSYS: "1"},
                                           timeout_s=timeout_s)
        sqlite = tool.export_sqlite(report_path, nsys=nsys)
    except (tool.NsysFailed, FileNotFoundError) as e:
        console.print(f"[red]error[/red]: --nsys: {e}", highlight=False)
        return 1
    console.print(f"written: {report_path}, {sqlite}", highlight=False)
    if status != 0:
        console.print(f"[yellow]warning[/yellow]: the profile under nsys exited with status "
                      f"{status} (its report.json 'errors' say why); analysing what was "
                      f"captured", highlight=False)
    try:
        from profiler.nsys import analyze_capture, render_tables, write_outputs
    except ImportError as e:   # the analysis half is not installed: the capture still stands
        console.print(f"[red]error[/red]: --nsys: captured, but the analysis is not available "
                      f"({e})", highlight=False)
        return 1
    report_json = out / "report.json"
    report = json.loads(report_json.read_text()) if report_json.exists() else None
    try:
        analysis = analyze_capture(sqlite, report=report)
    except ValueError as e:    # profiler.nsys' errors are ValueErrors naming the file
        console.print(f"[red]error[/red]: --nsys: {e}", highlight=False)
        return 1
    written = write_outputs(analysis, out)
    if print_tables:
        render_tables(analysis)
    console.print(f"written: {', '.join(str(Path(p).name) for p in written.values())} in {out}",
                  highlight=False)
    return status
