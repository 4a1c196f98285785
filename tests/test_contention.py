"""Measured contention and the balanced round order: stats.balanced_order's position and
carry-over balance, the /proc counters (experiments.contention) against real busy processes,
round_contention at the edges of its level, wait_for_quiet on a fake clock of ticks, and the
worker pool's thread preflight and per-visit CPU, with doubles for the workers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from experiments import contention, workers
from experiments.workers import Cell, Pool, ThreadSettingIgnored, WorkerError
from profiler.analysis import stats


# --------------------------------------------------------------------------- balanced order

@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_balanced_order_balances_positions_and_neighbours_over_a_period(k):
    names = [chr(ord("A") + i) for i in range(k)]
    period = stats.balanced_period(k)
    assert period == (1 if k == 1 else k if k % 2 == 0 else 2 * k)
    rows = stats.balanced_order(names, period)
    assert len(rows) == period and all(sorted(row) == names for row in rows)
    positions = Counter((name, i) for row in rows for i, name in enumerate(row))
    assert set(positions) == {(n, i) for n in names for i in range(k)}
    assert set(positions.values()) == {period // k}
    follows = Counter((row[i], row[i + 1]) for row in rows for i in range(k - 1))
    assert set(follows) == {(a, b) for a in names for b in names if a != b}
    assert len(set(follows.values())) <= 1        # every ordered pair equally often


def test_balanced_order_cycles_over_rounds():
    assert stats.balanced_order(["A"], 3) == [["A"], ["A"], ["A"]]
    assert stats.balanced_order(["A", "B"], 3) == [["A", "B"], ["B", "A"], ["A", "B"]]
    six = stats.balanced_order("ABC", 6)
    assert stats.balanced_order("ABC", 14) == six + six + six[:2]
    assert stats.balanced_order("ABCD", 0) == []


@pytest.mark.parametrize("variants, rounds, words", [
    ([], 2, ["variants", "empty"]),
    (["A", "A"], 2, ["variants", "repeat", "distinct"]),
    (["A", "B"], -1, ["rounds", ">= 0", "-1"]),
    (["A", "B"], 2.0, ["rounds", "int", "2.0"]),
    (["A", "B"], True, ["rounds", "True"]),
])
def test_balanced_order_refuses_bad_input(variants, rounds, words):
    with pytest.raises(ValueError) as info:
        stats.balanced_order(variants, rounds)
    assert str(info.value).startswith("balanced_order:")
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("k", [0, -2, 1.0, True])
def test_balanced_period_refuses_bad_input(k):
    with pytest.raises(ValueError, match="balanced_period: k"):
        stats.balanced_period(k)


# --------------------------------------------------------------------------- /proc counters

# Spins until it has used CPU_S of CPU (not of wall time: on a loaded machine it still uses as
# much), then waits for stdin to close.
SPIN = """
import sys, time
began = time.process_time()
while time.process_time() - began < {cpu_s}:
    pass
print("spun", flush=True)
sys.stdin.read()
"""
# A "worker" that spins SPIN's way in itself and in a child at once; says "done" with the
# child still alive, and on a line from stdin ends the child and waits for it ("reaped").
WORKER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", {spin!r}], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
began = time.process_time()
while time.process_time() - began < {cpu_s}:
    pass
child.stdout.readline()
print("done", flush=True)
sys.stdin.readline()
child.stdin.close()
child.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""
CPU_S = 0.8
SPINNER = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
IDLE = "import sys\nsys.stdin.read()"


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def test_busy_ticks_grow_with_a_busy_process():
    before = contention.busy_ticks()
    spinner = _python(SPINNER)
    spinner.wait(timeout=60)
    assert contention.busy_ticks() - before >= 0.4 * contention.TICKS_PER_S


def test_visit_meter_counts_the_workers_whole_tree():
    worker = _python(WORKER.format(spin=SPIN.format(cpu_s=CPU_S), cpu_s=CPU_S))
    try:
        meter = contention.VisitMeter()
        meter.start(worker.pid)
        assert worker.stdout.readline().strip() == "done"   # both spun, grandchild alive
        cpu = meter.stop(2)
        # CPU_S in each: well over what the worker alone could have used.
        assert cpu["worker_cpu_s"] >= 1.5 * CPU_S
        assert cpu["worker_utilization"] == pytest.approx(
            cpu["worker_cpu_s"] / (cpu["wall_s"] * 2))
        assert set(cpu) == {"wall_s", "worker_cpu_s", "others_cpu_s", "worker_utilization",
                            "others_cores"}
        assert cpu["others_cores"] >= 0 and cpu["others_cpu_s"] >= 0
        live = contention.tree_ticks(worker.pid)
        worker.stdin.write("reap\n")
        worker.stdin.flush()
        assert worker.stdout.readline().strip() == "reaped"
        # The reaped grandchild's ticks moved into the worker's cutime, not out of the tree.
        assert contention.tree_ticks(worker.pid) >= live - 2
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)


def test_visit_meter_counts_an_unrelated_busy_process_as_others():
    worker = _python(IDLE)
    try:
        meter = contention.VisitMeter()
        meter.start(worker.pid)
        _python(SPINNER).wait(timeout=60)
        cpu = meter.stop(1)
        assert cpu["others_cores"] > 0.3
        assert cpu["others_cpu_s"] >= 0.4
        assert cpu["worker_cpu_s"] < 0.3
    finally:
        worker.stdin.close()
        worker.wait(timeout=60)


def test_tree_ticks_and_visit_meter_refuse_what_they_cannot_measure():
    gone = _python("pass")
    gone.wait(timeout=60)
    with pytest.raises(ProcessLookupError, match="tree_ticks: pid"):
        contention.tree_ticks(gone.pid)
    meter = contention.VisitMeter()
    with pytest.raises(RuntimeError, match="before start"):
        meter.stop(1)
    meter.start(os.getpid())
    with pytest.raises(ValueError, match="threads: expected an int >= 1, got 0"):
        meter.stop(0)


# --------------------------------------------------------------------------- round_contention

def _cpu(others_cores: float, utilization: float = 0.9) -> dict:
    return {"wall_s": 1.0, "worker_cpu_s": 1.8, "others_cpu_s": others_cores,
            "worker_utilization": utilization, "others_cores": others_cores}


def test_round_contention_at_the_edges_of_the_level():
    """A round is contended when others' CPU over the round's wall time (its visits
    together, each 1 s here) exceeds the level: exactly at it is not above it."""
    level = contention.CONTENTION_LEVEL_CORES
    samples = {
        "torch": {"a": [{"cpu": _cpu(level)}, {"cpu": _cpu(0.0, 0.5)}, {"step_ms": [1.0]}],
                  "b": [{"cpu": _cpu(level)}, {"cpu": _cpu(3 * level + 0.03)},
                        {"step_ms": [1.0]}]},
        "mxnet": {"a": [{"cpu": _cpu(level, 0.7)}, {"cpu": _cpu(0.0)}]},
    }
    table = contention.round_contention(samples)
    assert [row["round"] for row in table] == [0, 1, 2]
    assert table[0]["contended"] is False                  # at the level is not above it
    assert table[0]["others_cores_mean"] == pytest.approx(level)
    assert table[0]["others_cores_max"] == pytest.approx(level)
    assert table[0]["worker_utilization_min"] == pytest.approx(0.7)
    assert table[1]["contended"] is True                   # (3 level + 0.03) / 3 s: above it
    assert table[1]["others_cores_mean"] == pytest.approx(level + 0.01)
    assert table[1]["others_cores_max"] == pytest.approx(3 * level + 0.03)
    assert table[1]["worker_utilization_min"] == pytest.approx(0.5)
    assert table[2] == {"round": 2, "others_cores_max": None, "others_cores_mean": None,
                        "worker_utilization_min": None, "contended": False}
    assert contention.round_contention({}) == []
    # One short busy visit in a long round: its few ticks do not flag the round.
    blip = {"torch": {"a": [{"cpu": {**_cpu(1.0), "wall_s": 0.02, "others_cpu_s": 0.02}}],
                      "b": [{"cpu": {**_cpu(0.0), "wall_s": 2.0}}]}}
    assert contention.round_contention(blip)[0]["contended"] is False


def test_round_contention_refuses_what_is_not_interleaved_rounds_result():
    with pytest.raises(ValueError, match="samples: expected"):
        contention.round_contention({"torch": [{"cpu": _cpu(0.0)}]})


# --------------------------------------------------------------------------- wait_for_quiet

def _fake_machine(monkeypatch, busy_cores):
    """busy_ticks as a machine using busy_cores[i] cores in window i (1 s windows)."""
    ticks = [0]
    for cores in busy_cores:
        ticks.append(ticks[-1] + round(cores * contention.TICKS_PER_S))
    readings = iter(ticks)
    monkeypatch.setattr(contention, "busy_ticks", lambda: next(readings))
    slept = []
    return slept, slept.append


def test_wait_for_quiet_waits_for_enough_quiet_windows_in_a_row(monkeypatch):
    slept, sleep = _fake_machine(monkeypatch, [1.5, 0.1, 0.1, 0.9, 0.1, 0.2, 0.0, 2.0])
    out = contention.wait_for_quiet(max_s=60.0, window_s=1.0, windows=3, sleep=sleep)
    assert out["quiet"] is True
    assert out["waited_s"] == pytest.approx(7.0) and slept == [1.0] * 7
    assert out["busy_cores_last"] == pytest.approx(0.0)
    assert out["quiet_cores"] == 0.25


def test_wait_for_quiet_gives_up_after_max_s(monkeypatch):
    slept, sleep = _fake_machine(monkeypatch, [1.0] * 10)
    out = contention.wait_for_quiet(max_s=5.0, window_s=1.0, windows=2, sleep=sleep)
    assert out == {"waited_s": pytest.approx(5.0), "quiet": False,
                   "busy_cores_last": pytest.approx(1.0), "quiet_cores": 0.25}
    assert len(slept) == 5


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_s=0), ["max_s", "> 0", "0"]),
    (dict(window_s=float("nan")), ["window_s", "finite"]),
    (dict(quiet_cores=-1), ["quiet_cores", "-1"]),
    (dict(windows=0), ["windows", ">= 1", "0"]),
    (dict(max_s=2.0, window_s=1.0, windows=3), ["max_s", "windows * window_s", "3"]),
    (dict(sleep=None), ["sleep", "callable"]),
])
def test_wait_for_quiet_refuses_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as info:
        contention.wait_for_quiet(**kwargs)
    for word in words:
        assert word in str(info.value)


# --------------------------------------------------------------------------- the pool

THREADS = {"intra_op": 1, "inter_op": None, "blas": {"libopenblas.so": 4},
           "openmp": {"libgomp.so.1": 2}, "ours": {"ops._C": 2}, "requested": 2}


class FakeWorker:
    """A worker double: its hello reports ``ignored`` as the class says; close is recorded."""
    ignored: dict = {}
    made: list = []

    def __init__(self, framework, *, threads, device, log=None):
        self.framework, self.pid, self.closed = framework, os.getpid(), False
        self.calls = []
        FakeWorker.made.append(self)

    def call(self, cmd, **fields):
        self.calls.append((cmd, fields))
        if cmd == "hello":
            return {"framework": self.framework, "pid": self.pid,
                    "threads": {**THREADS, "ignored": self.ignored.get(self.framework, [])}}
        if cmd == "steps":
            return {"step_ms": [1.0], "losses": [0.5], "compile_count": 0}
        return {}

    def close(self):
        self.closed = True


@pytest.fixture
def fake_workers(monkeypatch):
    monkeypatch.setattr(workers, "Worker", FakeWorker)
    monkeypatch.setattr(FakeWorker, "made", [])
    monkeypatch.setattr(FakeWorker, "ignored", {})
    return FakeWorker


def test_pool_refuses_a_worker_whose_pools_ignored_the_thread_count(fake_workers):
    fake_workers.ignored = {"mxnet": ["blas:libopenblas.so", "intra_op"]}
    with pytest.raises(ThreadSettingIgnored) as info:
        Pool(["torch", "mxnet"], threads=2, device="cpu")
    assert isinstance(info.value, WorkerError)
    message = str(info.value)
    for words in ("mxnet", "requested 2", "blas:libopenblas.so runs 4", "intra_op runs 1"):
        assert words in message, words
    # The refused worker and the one started before it are both closed.
    assert [w.framework for w in fake_workers.made] == ["torch", "mxnet"]
    assert all(w.closed for w in fake_workers.made)


def test_pool_reports_each_workers_effective_threads(fake_workers):
    with Pool(["torch"], threads=2, device="cpu") as pool:
        assert pool.effective_threads() == {"torch": {
            "intra_op": 1, "blas:libopenblas.so": 4, "openmp:libgomp.so.1": 2,
            "ours:ops._C": 2}}


def test_interleaved_rounds_follow_the_balanced_order_and_record_each_visits_cpu(fake_workers):
    cells = {"torch": [Cell("a", "wa"), Cell("b", "wb", {"conv": "ours"}), Cell("c", "wc")],
             "chainer": [Cell("a", "wa")]}
    with Pool(["torch", "chainer"], threads=2, device="cpu") as pool:
        samples = workers.interleaved_rounds(pool, cells, rounds=6, steps=1, mode="plain")
        torch_calls = pool.workers["torch"].calls
    visited = [fields["name"][1] for cmd, fields in torch_calls if cmd == "steps"]
    order = stats.balanced_order(["a", "b", "c"], 6)
    assert visited == [key for row in order for key in row]
    assert sum(cmd == "set_impls" for cmd, _ in torch_calls) == 6     # b's, once a round
    assert {f: sorted(s) for f, s in samples.items()} == {"torch": ["a", "b", "c"],
                                                         "chainer": ["a"]}
    for cells_samples in samples.values():
        for answers in cells_samples.values():
            assert len(answers) == 6
            assert all(set(a["cpu"]) == {"wall_s", "worker_cpu_s", "others_cpu_s",
                                         "worker_utilization", "others_cores"}
                       for a in answers)
    assert [row["round"] for row in contention.round_contention(samples)] == list(range(6))
