"""Rich tables of an nsys analysis dict: per phase, per layer (native-library split, top
function, GPU work) and the agreement with the profiler's own clocks.

Rendering only: the numbers come from profiler.nsys.api.analyze.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

_LIB_COLUMNS = 3     # libraries shown per row, largest first
_DIRECTION = {"forward": "fwd", "backward": "bwd"}


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def _libs(row: Mapping[str, Any]) -> str:
    libs = row.get("libraries_ms") or {}
    total = sum(libs.values())
    if not total:
        return "-"
    # escape: "[not sampled]" and C++/kernel names would otherwise read as rich markup.
    return escape(", ".join(f"{k} {100 * v / total:.0f}%"
                            for k, v in list(libs.items())[:_LIB_COLUMNS]))


def _top_function(row: Mapping[str, Any]) -> str:
    top = row.get("top_functions") or []
    if not top:
        return "-"
    f = top[0]["function"]
    return escape((f if len(f) <= 48 else f[:46] + "..") + f" ({top[0]['share']:.0%})")


def _gpu_cells(row: Mapping[str, Any]):
    g = row.get("gpu")
    if not g:
        return ["-", "-", "-"]
    top = g["top"][0]["name"] if g["top"] else "-"
    top = top if len(top) <= 40 else top[:38] + ".."
    return [_ms(g["device_ms"]), _ms(g["idle_ms"]), escape(top)]


def _console() -> Console:
    """stdout; where it is not a terminal (a pipe, a CI log) rich would assume 80 columns and
    fold every row, so a wide page is assumed there instead."""
    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def render_tables(analysis: Mapping[str, Any], console: Optional[Console] = None) -> None:
    """Prints the per-phase and per-layer tables, time outside our ranges, and the agreement
    table (with every disagreement) when a report was given."""
    console = console or _console()
    steps = analysis["steps"]
    has_gpu = bool(analysis.get("gpu_activities"))
    console.print(f"[bold]nsys capture[/bold] {escape(analysis['capture'])}: "
                  f"{analysis['ranges']} ranges, "
                  f"{analysis['samples']} CPU samples, {analysis['gpu_activities']} GPU "
                  f"activities; {steps['measured']} measured steps ({steps['warmup']} warm-up "
                  f"left out); ms are means per measured step")
    gpu_cols = ["device ms", "GPU idle ms", "top kernel"] if has_gpu else []

    phases = Table(title="Per phase (nsys ranges)")
    for c in ["phase", "ms", "outside ms", "samples", "native libraries", *gpu_cols]:
        phases.add_column(c, justify="left" if c in ("phase", "native libraries", "top kernel")
                          else "right")
    for r in analysis["phases"]:
        cells = [escape(r["name"]), _ms(r["ms"]), _ms(r["outside_ms"]), str(r["samples"]), _libs(r)]
        phases.add_row(*cells, *(_gpu_cells(r) if has_gpu else []))
    console.print(phases)

    layers = Table(title="Per layer (nsys ranges, inclusive of nested layers)")
    # Layer names are what the table is for: never cut; the top function is cut instead.
    name_width = max((len(r["name"]) for r in analysis["layers"]), default=5)
    for c in ["layer", "dir", "ms", "samples", "native libraries", "top function", *gpu_cols]:
        layers.add_column(c, justify="right" if c in ("ms", "samples", "device ms",
                                                      "GPU idle ms") else "left",
                          no_wrap=c in ("layer", "dir", "top function", "top kernel"),
                          min_width=name_width if c == "layer" else None,
                          overflow="ellipsis", max_width=36 if c.startswith("top") else None)
    for r in analysis["layers"]:
        cells = [escape(r["name"]), _DIRECTION.get(r["direction"], r["direction"]), _ms(r["ms"]),
                 str(r["samples"]), _libs(r), _top_function(r)]
        layers.add_row(*cells, *(_gpu_cells(r) if has_gpu else []))
    console.print(layers)

    out = analysis["outside_ranges"]
    by_lib = ", ".join(f"{k} {v}" for k, v in list(out["samples_by_library"].items())[:4])
    by_when = ", ".join(f"{k} {v}" for k, v in out.get("samples_by_when", {}).items())
    console.print(f"Outside our ranges: {out['samples']} CPU samples ({escape(by_lib) or 'none'}"
                  + (f"; {by_when}" if by_when else "") + ")"
                  + (f", {out['gpu_activities']} GPU activities ({out['gpu_device_ms']:.3f} ms)"
                     if has_gpu else ""))

    agreement = analysis.get("agreement")
    if agreement:
        t = Table(title=f"Agreement with the profiler's clocks ({agreement['rule']})")
        for c in ["range", "profiler ms", "nsys ms", "diff ms", "diff %", "verdict"]:
            t.add_column(c, justify="left" if c in ("range", "verdict") else "right")
        for r in agreement["rows"]:
            verdict = ("agrees" if r["agrees"] else "[red]DISAGREES[/red]") if r["checked"] \
                else ("agrees" if r["agrees"] else "differs (under 1 ms, not checked)")
            t.add_row(escape(r["name"]), _ms(r["profiler_ms"]), _ms(r["nsys_ms"]),
                      _ms(r["diff_ms"]),
                      "-" if r["diff_pct"] is None else f"{r['diff_pct']:+.1f}", verdict)
        console.print(t)
        n_bad = len(agreement["disagreements"])
        console.print(f"{n_bad} checked range(s) disagree" if n_bad else
                      "Every checked range agrees.")
        for note in agreement["notes"]:
            console.print(f"note: {escape(note)}")
    for w in analysis.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(w)}")
