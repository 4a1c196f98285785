"""experiments.bench_modes on a tiny workload: every variant timed in every round, the graph
step compiled in the warm-up, the paired ratios present, and a framework without a graph mode
(Chainer) measured eagerly with the reason noted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

TINY = ["--batch-size", "2", "--synthetic-size", "8", "--rounds", "2", "--warmup", "1",
        "--threads", "1", "--json"]


def run(framework: str) -> dict:
    """The benchmark in a process of its own (it sets the process's thread counts)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_modes", "--framework",
                           framework, *TINY], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tensorflow_times_the_profiler_against_a_plain_tf_function_loop():
    pytest.importorskip("tensorflow")
    result = run("tensorflow")
    assert set(result["variants"]) == {"eager", "graph", "graph_profiled", "plain_tf_function"}
    assert all(len(v["samples_ms"]) == 2 for v in result["variants"].values())
    assert set(result["ratios"]) == {"graph / eager", "graph_profiled / plain_tf_function",
                                     "graph_profiled / graph"}
    # The first graph step traces the step; a steady one does not.
    assert result["first_step_ms"]["graph"] > result["variants"]["graph"]["median_ms"]


def test_chainer_is_measured_eagerly_with_the_reason():
    result = run("chainer")
    assert set(result["variants"]) == {"eager"} and result["ratios"] == {}
    assert any("not available for chainer" in n for n in result["notes"])
