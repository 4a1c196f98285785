"""What every framework's test_api_<framework>.py checks alike: a report's layers against its
phases, and the CLI run on a user's factory. A helper module, not a test file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from profiler.report import validate_report

ROOT = Path(__file__).resolve().parent.parent


def check_layers_nest_in_phases(report) -> None:
    """Each layer range nests in its phase: forward layers add up within the forward phase,
    backward layers within the two backward phases; the first layer's backward is seen."""
    phases, layers = report["phases_ms"], report["layers"]
    assert sum(layer["forward_ms"] for layer in layers) <= phases["forward"]["mean"]
    assert sum(layer["backward_ms"] for layer in layers) <= (
        phases["backward"]["mean"] + phases["loss_backward"]["mean"])
    assert all(layer["backward_ms"] > 0 for layer in layers), layers


def profile_factory_cli(framework: str, factory: str, out: Path) -> dict:
    """``python -m profiler.layerwise --framework F --model FACTORY`` with 3 measured steps;
    checks it succeeded and wrote a valid report (loader time as the data wait, a trace) and
    returns the report."""
    proc = subprocess.run(
        [sys.executable, "-m", "profiler.layerwise", "--framework", framework, "--model",
         factory, "--iters", "3", "--warmup", "1", "--overhead-iters", "2", "--out", str(out),
         "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((Path(out) / "report.json").read_text())
    validate_report(report)
    assert report["framework"] == framework and report["iters"] == 3
    assert report["phases_ms"]["data_wait"]["mean"] > 0
    assert report["instrumentation"]["overhead_pct"] is not None
    assert (Path(out) / "trace.json").is_file()
    return report
