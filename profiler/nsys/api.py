"""The door to profiler.nsys: read a capture, analyse it, write its files.

``analyze_capture`` is the one call a user (or ``profiler.layerwise --nsys``) needs; ``analyze``
is the same analysis of an already-read Capture (pure: the tests call it on synthetic data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from profiler.nsys import attribution, flame, summary
from profiler.nsys.reader import DOMAIN, Capture, read_capture
from profiler.nsys.errors import ProfilerNsysError

PathLike = Union[str, os.PathLike]
OUTPUT_FILES = ("nsys.folded", "nsys.speedscope.json", "nsys.svg", "nsys_analysis.json")


def analyze(capture: Capture, report: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The analysis of a capture as a JSON-able dict (see docs/nsys.md, "Reading a capture").

    With the profiler's report, its first ``warmup`` steps are left out of the per-step means
    and the agreement of both clocks is computed; without it every step counts.
    """
    att = attribution.attribute(capture)
    warmup = int(report.get("warmup", 0) or 0) if report else 0
    if warmup > len(att.steps):
        warmup = 0   # a capture of fewer steps than the report's warm-up: do not drop them all
    cpu = flame.cpu_stacks(att)
    gpu = flame.gpu_stacks(att)
    kind = "gpu" if capture.gpu else "cpu"
    stacks = gpu if kind == "gpu" else cpu
    ranges_total = (summary.ranges_total_ns(att) if kind == "cpu"
                    else sum(a.duration_ns for a in capture.gpu))
    return {
        "capture": capture.path,
        "domain": DOMAIN,
        "schema": capture.schema,
        "warnings": list(capture.warnings) + att.warnings,
        "steps": {"in_capture": len(att.steps), "warmup": warmup,
                  "measured": max(len(att.steps) - warmup, 0)},
        "main_thread": {"pid": att.main_thread[0], "tid": att.main_thread[1]},
        "ranges": len(att.ranges),
        "samples": len(capture.samples),
        "sampling_period_ns": att.sampling_period_ns,
        "unsampled_share": summary.unsampled_share(att),
        "gpu_activities": len(capture.gpu),
        "phases": summary.phase_rows(att, warmup),
        "layers": summary.layer_rows(att, warmup),
        "outside_ranges": summary.outside_ranges(att),
        "flame": {"kind": kind, "total_ns": sum(stacks.values()),
                  "ranges_total_ns": ranges_total,
                  "folded": flame.folded_lines(stacks),
                  "cpu_folded": flame.folded_lines(cpu) if kind == "gpu" else None},
        "agreement": summary.agreement(att, report) if report else None,
    }


def _load_report(report: Union[None, PathLike, Mapping[str, Any]]) -> Optional[Mapping]:
    if report is None or isinstance(report, Mapping):
        return report
    path = Path(report)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ProfilerNsysError(f"report {str(path)!r}: no such file; expected the profiler's "
                                f"report.json") from None
    except json.JSONDecodeError as e:
        raise ProfilerNsysError(f"report {str(path)!r}: not JSON ({e}); expected the "
                                f"profiler's report.json") from None
    if not isinstance(doc, Mapping) or doc.get("tool") != "deepprof":
        raise ProfilerNsysError(f"report {str(path)!r}: not a deepprof report (no \"tool\": "
                                f"\"deepprof\"); expected the profiler's report.json")
    return doc


def _sqlite_of(path: Path) -> Path:
    """The SQLite export of a .nsys-rep (exported beside it by nsys when not there yet)."""
    if not path.exists():
        raise ProfilerNsysError(f"capture {str(path)!r}: no such file; expected an nsys "
                                f".sqlite export or .nsys-rep report")
    beside = path.with_suffix(".sqlite")
    if beside.exists() and beside.stat().st_mtime >= path.stat().st_mtime:
        return beside
    try:
        from profiler.nsys import tool
    except ImportError:
        tool = None
    if tool is None or not hasattr(tool, "export_sqlite"):
        raise ProfilerNsysError(f"capture {str(path)!r}: a .nsys-rep needs nsys to export it "
                                f"and this installation has no nsys export helper; run `nsys "
                                f"export --type sqlite {path}` and pass the .sqlite")
    try:
        exported = tool.export_sqlite(path)
    except getattr(tool, "NsysNotFound", ()) as e:
        raise ProfilerNsysError(f"capture {str(path)!r}: a .nsys-rep needs nsys to export it, "
                                f"and nsys was not found ({e}); install it (docs/nsys.md) or "
                                f"pass a .sqlite exported elsewhere") from e
    except getattr(tool, "NsysFailed", ()) as e:
        raise ProfilerNsysError(f"capture {str(path)!r}: nsys could not export it to SQLite "
                                f"({e}); expected a complete .nsys-rep") from e
    return Path(exported) if exported else beside


def analyze_capture(path: PathLike, report: Union[None, PathLike, Mapping[str, Any]] = None
                    ) -> Dict[str, Any]:
    """Reads an nsys capture (.sqlite, or .nsys-rep exported with nsys) and analyses the ranges
    of domain "deepprof". ``report`` (report.json's path or dict) adds the clock agreement.

    Raises ProfilerNsysError for a missing, corrupt or truncated file, a capture without our
    ranges, or a .nsys-rep when no nsys is available.
    """
    path = Path(path)
    if path.suffix == ".nsys-rep":
        path = _sqlite_of(path)
    doc = _load_report(report)
    return analyze(read_capture(path), doc)


def write_outputs(analysis: Mapping[str, Any], out_dir: PathLike) -> Dict[str, str]:
    """Writes nsys.folded, nsys.speedscope.json, nsys.svg and nsys_analysis.json into out_dir
    (created if needed); returns {file name: path}."""
    from profiler.report import write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stacks = {}
    for line in analysis["flame"]["folded"]:
        stack, ns = line.rsplit(" ", 1)
        stacks[tuple(stack.split(";"))] = int(ns)
    kind = analysis["flame"]["kind"]
    title = (f"deepprof nsys {'GPU device time' if kind == 'gpu' else 'CPU wall time'} by "
             f"range: {Path(analysis['capture']).name}")
    paths = {name: str(out / name) for name in OUTPUT_FILES}
    Path(paths["nsys.folded"]).write_text("".join(f"{line}\n" for line in
                                                  analysis["flame"]["folded"]))
    write_json_atomic(paths["nsys.speedscope.json"], flame.to_speedscope(stacks, name=title))
    Path(paths["nsys.svg"]).write_text(flame.render_svg(stacks, title=title))
    write_json_atomic(paths["nsys_analysis.json"], analysis)
    return paths
