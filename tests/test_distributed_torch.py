"""Several ranks of a torch.distributed job (two CPU processes over gloo): each rank's report
with a communication phase, one merged report on rank 0, and the merge's arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from profiler import distributed
from profiler.report import validate_report

ROOT = Path(__file__).resolve().parent.parent


def test_two_ranks_over_gloo_write_one_merged_report(tmp_path):
    pytest.importorskip("torch")
    # --out does not exist yet: both ranks create and try it at once (neither may remove it
    # under the other, environment.check_output_dir's shared).
    tmp_path = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "-m", "profiler.layerwise", "--model", "tests/user_models/torch_cnn.py:factory",
         "--iters", "3", "--warmup", "1", "--overhead-iters", "2", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}" / "report.json").read_text())
        validate_report(report)
        assert f"rank {rank} of 2 (gloo)" in report["notes"]
        # The wait for the all-reduce is a phase of its own, inside the step.
        assert report["phases_ms"]["communication"]["mean"] > 0
    merged = json.loads((tmp_path / "merged_report.json").read_text())
    assert merged["world_size"] == 2 and sorted(merged["ranks"]) == ["0", "1"]
    assert "communication" in merged["phases_ms"]
    assert set(merged["phases_ms"]["forward"]["per_rank_ms"]) == {"0", "1"}
    assert [layer["name"] for layer in merged["layers"]] == [
        "module.features.0", "module.features.3", "module.classifier"]
    trace = json.loads((tmp_path / "trace_ranks.json").read_text())
    assert {e["pid"] for e in trace["traceEvents"]} == {1, 2}
    assert "communication" in proc.stdout and "rank 1" in proc.stdout


def _rank(rank, forward_ms, step_ms, errors=()):
    report = {"framework": "torch", "model": "M", "errors": list(errors),
              "step_ms": {"mean": step_ms},
              "phases_ms": {"forward": {"mean": forward_ms}, "other": {"mean": 1.0}},
              "layers": [{"name": "fc", "forward_ms": forward_ms / 2, "backward_ms": 1.0}]}
    trace = {"traceEvents": [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "deepprof"}},
        {"name": "step", "ph": "X", "pid": 1, "tid": 1, "ts": 1000.0 * (rank + 1), "dur": 5.0}]}
    return {"rank": rank, "host": f"h{rank}", "report": report, "trace": trace}


def test_merge_names_the_slowest_rank_and_the_spread():
    merged = distributed.merge([_rank(0, 10.0, 20.0), _rank(1, 14.0, 24.0),
                                _rank(2, 12.0, 22.0, errors=["a warning"])])
    forward = merged["phases_ms"]["forward"]
    assert forward["slowest_rank"] == 1 and forward["spread_ms"] == pytest.approx(4.0)
    assert forward["spread_pct"] == pytest.approx(4.0 / 12.0 * 100)
    assert merged["step_ms"]["fastest_ms"] == 20.0
    assert merged["layers"][0]["forward_ms"]["slowest_ms"] == 7.0
    assert merged["errors"] == ["rank 2: a warning"]
    # Ranks on other hosts start at 0 each; on one host their clocks are kept.
    aligned = distributed.merged_trace([_rank(0, 1, 2), _rank(1, 1, 2)], align=True)
    starts = {e["pid"]: e["ts"] for e in aligned["traceEvents"] if e.get("ph") == "X"}
    assert starts == {1: 0.0, 2: 0.0}
    names = {e["pid"]: e["args"]["name"] for e in aligned["traceEvents"]
             if e["name"] == "process_name"}
    assert names == {1: "rank 0 (h0)", 2: "rank 1 (h1)"}


def test_merge_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="ranks: expected the gathered reports"):
        distributed.merge([])


def test_gather_without_a_process_group_is_an_error():
    pytest.importorskip("torch")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        distributed.gather_to_rank0(object())
