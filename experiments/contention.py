"""Measured CPU contention for the experiments: how much CPU a framework worker (with its
loader processes) used during a visit, how much every other process on the machine used
meanwhile, which rounds that makes "contended", and a wait for a quiet machine before a study.

Everything is read from /proc (Linux): /proc/stat for the whole machine, /proc/<pid>/stat for
processes, in clock ticks (10 ms at the usual 100 Hz). It imports no framework and measures no
time of its own beyond the wall clock of a visit.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

TICKS_PER_S = os.sysconf("SC_CLK_TCK")

# Above this many cores taken by other processes on average during a visit, the visit's round
# is "contended". On the 2-core machines the studies run on, a quarter of a core is already a
# ~12% share taken from a worker using both cores, about the size of the effects the studies
# look for; below it, the 10 ms tick resolution and the machine's own housekeeping (the
# orchestrator, the kernel's threads) blur into noise.
CONTENTION_LEVEL_CORES = 0.25


def busy_ticks() -> int:
    """The whole machine's busy clock ticks since boot, all cores: user + nice + system + irq
    + softirq + steal from /proc/stat's first line. Idle and iowait are not busy; guest time
    is already counted in user; steal is time the hypervisor gave our cores to someone else,
    which a worker loses as surely as to a local process."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    if not fields or fields[0] != "cpu":
        raise OSError(f"/proc/stat: expected a first line starting with 'cpu', got {fields[:1]}")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return user + nice + system + irq + softirq + steal


def _stat(pid: str) -> List[str]:
    """/proc/<pid>/stat's fields after the command name (which may hold spaces and ')'):
    [0] is the state (field 3), [1] the parent (4), [11..14] utime, stime, cutime, cstime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def tree_ticks(pid: int) -> int:
    """CPU clock ticks (user + system, all threads) used so far by ``pid`` and every live
    descendant: a framework worker's data-loader processes are its children, so their CPU is
    the worker's. Children already reaped count too (their parent's cutime + cstime), so a
    loader process that exits mid-visit does not take its ticks out of the tree. Processes that
    vanish while /proc is scanned are skipped; raises ProcessLookupError if ``pid`` itself is
    gone."""
    parents: Dict[int, int] = {}
    ticks: Dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(entry.name)
        except (OSError, IndexError):   # exited between the listing and the read
            continue
        child = int(entry.name)
        parents[child] = int(fields[1])
        ticks[child] = sum(int(v) for v in fields[11:15])
    if pid not in ticks:
        raise ProcessLookupError(f"tree_ticks: pid: no process {pid} in /proc")
    children: Dict[int, List[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += ticks[current]
        todo += children.get(current, [])
    return total


class VisitMeter:
    """The CPU around one visit to a worker: ``start(pid)`` before it, ``stop(threads)`` after.

    "Others" is the machine's busy time minus the worker tree's. It includes the orchestrating
    process, but that one sits blocked reading the worker's answer for the whole visit, so its
    share is negligible. Ticks are 10 ms: a visit of a few tens of ms reads as 0, 1 or 2 ticks
    per process, so its figures are coarse; visits of a second or more are good to ~1%."""

    def __init__(self) -> None:
        self._began: Optional[float] = None

    def start(self, pid: int) -> None:
        """Reads the counters for the worker ``pid`` (and its descendants)."""
        self._pid = pid
        self._tree, self._busy = tree_ticks(pid), busy_ticks()
        self._began = time.monotonic()

    def stop(self, threads: int) -> Dict[str, float]:
        """Reads the counters again; returns the visit's wall_s, worker_cpu_s, others_cpu_s,
        worker_utilization (worker CPU over wall_s * ``threads``, the share of the cores it
        was given that it used; loader processes can take it above 1) and others_cores (the
        cores other processes used on average)."""
        if self._began is None:
            raise RuntimeError("VisitMeter.stop: called before start")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"VisitMeter.stop: threads: expected an int >= 1, got {threads!r}")
        wall_s = max(time.monotonic() - self._began, 1e-9)
        worker_ticks = tree_ticks(self._pid) - self._tree
        busy = busy_ticks() - self._busy
        self._began = None
        # Per-process times and /proc/stat are accounted apart (and the tree read first, the
        # machine last), so at tick resolution the difference can dip below zero.
        others_cpu_s = max(busy - worker_ticks, 0) / TICKS_PER_S
        worker_cpu_s = worker_ticks / TICKS_PER_S
        return {"wall_s": wall_s, "worker_cpu_s": worker_cpu_s, "others_cpu_s": others_cpu_s,
                "worker_utilization": worker_cpu_s / (wall_s * threads),
                "others_cores": others_cpu_s / wall_s}


def round_contention(samples: Dict[str, Dict[str, List[dict]]]) -> List[Dict[str, object]]:
    """Per round of ``samples`` (interleaved_rounds' result: {framework: {cell: [answer per
    round]}}, each answer with its visit's "cpu"): {"round", "others_cores_max",
    "others_cores_mean", "worker_utilization_min", "contended"}. others_cores_mean is the
    round's others CPU over its wall time (its visits together); the round is contended when
    that exceeds CONTENTION_LEVEL_CORES. Answers without "cpu"
    (results from before it was measured) are left out; a round with none gives None values
    and contended False."""
    if not isinstance(samples, dict) or not all(
            isinstance(cells, dict) and all(isinstance(a, list) for a in cells.values())
            for cells in samples.values()):
        raise ValueError("round_contention: samples: expected {framework: {cell: [answer per "
                         f"round]}}, got {type(samples).__name__} {str(samples)[:80]}")
    answers = [a for cells in samples.values() for a in cells.values()]
    rounds = max((len(a) for a in answers), default=0)
    table = []
    for r in range(rounds):
        cpu = [a[r]["cpu"] for a in answers
               if len(a) > r and isinstance(a[r], dict) and a[r].get("cpu")]
        if not cpu:
            table.append({"round": r, "others_cores_max": None, "others_cores_mean": None,
                          "worker_utilization_min": None, "contended": False})
            continue
        others = [c["others_cores"] for c in cpu]
        # The round's own share, time-weighted over its visits: a visit of a few ticks (10 ms
        # each) alone can read a whole core busy; the round's total cannot.
        wall = sum(c["wall_s"] for c in cpu)
        mean = sum(c["others_cpu_s"] for c in cpu) / wall if wall > 0 else 0.0
        table.append({"round": r, "others_cores_max": max(others),
                      "others_cores_mean": mean,
                      "worker_utilization_min": min(c["worker_utilization"] for c in cpu),
                      "contended": mean > CONTENTION_LEVEL_CORES})
    return table


def wait_for_quiet(*, max_s: float = 120.0, window_s: float = 1.0, quiet_cores: float = 0.25,
                   windows: int = 3, sleep: Callable[[float], None] = time.sleep
                   ) -> Dict[str, object]:
    """Waits until the whole machine uses fewer than ``quiet_cores`` busy cores for
    ``windows`` windows of ``window_s`` in a row, at most ``max_s``. Returns {"waited_s",
    "quiet" (False if max_s ran out first), "busy_cores_last" (the last window's), and
    "quiet_cores"}, for a study to record the conditions it started in."""
    for name, value in (("max_s", max_s), ("window_s", window_s), ("quiet_cores", quiet_cores)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or value <= 0:
            raise ValueError(f"wait_for_quiet: {name}: expected a finite number > 0, got "
                             f"{value!r}")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"wait_for_quiet: windows: expected an int >= 1, got {windows!r}")
    if windows * window_s > max_s:
        raise ValueError(f"wait_for_quiet: max_s: expected at least windows * window_s = "
                         f"{windows * window_s:g} s (else it can never be quiet), got {max_s!r}")
    if not callable(sleep):
        raise ValueError(f"wait_for_quiet: sleep: expected a callable, got {sleep!r}")
    # Windows are timed by their nominal length, not a clock: sleep may be injected (tests),
    # and a sleep's overshoot of a few ms is below the 10 ms tick anyway.
    waited_s, quiet_in_row, busy_cores = 0.0, 0, math.nan
    before = busy_ticks()
    while quiet_in_row < windows and waited_s + window_s <= max_s + 1e-9:
        sleep(window_s)
        waited_s += window_s
        after = busy_ticks()
        busy_cores, before = (after - before) / TICKS_PER_S / window_s, after
        quiet_in_row = quiet_in_row + 1 if busy_cores < quiet_cores else 0
    return {"waited_s": waited_s, "quiet": quiet_in_row >= windows,
            "busy_cores_last": busy_cores, "quiet_cores": quiet_cores}
