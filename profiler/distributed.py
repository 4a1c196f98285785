"""Several ranks of one torch.distributed job, profiled each by profiler.api, merged into one
report on rank 0: per rank and per layer, the slowest rank per phase, the straggler spread, and
one Chrome trace with a process row per rank.

Ranks time on their own host clocks (time.perf_counter_ns, CLOCK_MONOTONIC): on one machine
they share it and the merged trace lines up; across machines it does not, and the merged
trace starts every rank at its first step instead (``align``).

This module joins the job (``join``, ``data_parallel``) and merges reports; it does not
measure (profiler.engine does).
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from profiler.analysis.trace_events import to_chrome_trace
from profiler.report import write_json_atomic
from profiler.timeline import phases_of

MERGED_SCHEMA_VERSION = 1


def world_size() -> int:
    """The number of ranks torchrun started (WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(framework: str, device: str, threads: int, default_threads: int,
         notes: List[str]) -> Optional[tuple]:
    """Under torchrun (WORLD_SIZE > 1): joins the process group (gloo on the CPU, NCCL on
    GPUs) unless the caller did, and returns (this rank, the threads it should use: its share
    of the cores when ``threads`` is the machine's ``default_threads``); else None."""
    if world_size() <= 1:
        return None
    if framework != "torch":
        raise ValueError(f"--framework {framework}: several ranks (WORLD_SIZE "
                         f"{world_size()}) are profiled for torch.distributed only")
    import torch
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if threads == default_threads and local > 1:
        threads = max(1, default_threads // local)
        notes.append(f"threads: {threads} per rank, the cores shared by {local} ranks on this "
                     f"machine")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    notes.append(f"rank {dist.get_rank()} of {dist.get_world_size()} ({dist.get_backend()})")
    return dist.get_rank(), threads


def data_parallel(model):
    """``model`` in DistributedDataParallel (as it is if already wrapped)."""
    import torch
    ddp = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp):
        return model
    params = list(model.parameters())
    on_gpu = bool(params) and params[0].device.type == "cuda"
    return ddp(model, device_ids=[params[0].device.index] if on_gpu else None)


def gather_to_rank0(report) -> Optional[List[Dict[str, Any]]]:
    """Every rank's report dict and Chrome trace, gathered on rank 0 (a collective: every rank
    calls it). Returns [{"rank", "host", "report", "trace"}] in rank order on rank 0, None on
    the others."""
    import socket

    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gather_to_rank0: torch.distributed is not initialised; expected a "
                           "process group (torchrun, init_process_group)")
    rank, size = dist.get_rank(), dist.get_world_size()
    mine = {"rank": rank, "host": socket.gethostname(), "report": report.doc,
            "trace": to_chrome_trace(report.timeline, metadata={"rank": rank})}
    # Through the job's key-value store, not gather_object: gloo's worker thread frees a
    # gather's tensors after the call returns, and needs the GIL for it; a rank that exits
    # meanwhile aborts ("terminate called without an active exception", seen on 1 run in ~10
    # on 2 cores). The store's get blocks until the key is set (the store's timeout applies).
    global _GATHERS
    _GATHERS += 1
    store = dist.distributed_c10d._get_default_store()
    prefix = f"deepprof/gather{_GATHERS}/"
    store.set(f"{prefix}{rank}", json.dumps(mine))
    if rank != 0:
        return None
    return [json.loads(store.get(f"{prefix}{r}")) for r in range(size)]


_GATHERS = 0   # gathers so far in this process: each uses keys of its own


def _phase_names(reports: Sequence[Dict[str, Any]]) -> List[str]:
    """The phases any rank measured, in display order (a graph-mode rank has fewer)."""
    return list(phases_of({p for r in reports for p in r["phases_ms"]}))


def _spread(values_by_rank: Dict[int, float]) -> Dict[str, Any]:
    values = list(values_by_rank.values())
    slowest = max(values_by_rank, key=values_by_rank.get)
    mid = statistics.median(values)
    spread = max(values) - min(values)
    return {"per_rank_ms": {str(r): v for r, v in values_by_rank.items()},
            "slowest_rank": slowest, "slowest_ms": values_by_rank[slowest],
            "fastest_ms": min(values), "median_ms": mid, "spread_ms": spread,
            "spread_pct": spread / mid * 100 if mid > 0 else None}


def merge(ranks: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """The merged report of the gathered ranks (gather_to_rank0's list): per phase and for the
    step, each rank's mean ms, the slowest rank, the spread (slowest minus fastest, also in %
    of the median rank); per layer and direction the same. Errors of any rank are kept."""
    if not ranks:
        raise ValueError("merge: ranks: expected the gathered reports of at least one rank, got "
                         "none")
    reports = {int(r["rank"]): r["report"] for r in ranks}
    measured = {k: v for k, v in reports.items() if "step_ms" in v}
    errors = [f"rank {k}: {e}" for k, v in sorted(reports.items()) for e in v["errors"]]
    merged: Dict[str, Any] = {
        "schema_version": MERGED_SCHEMA_VERSION, "world_size": len(reports),
        "hosts": {str(r["rank"]): r["host"] for r in ranks},
        "framework": next(iter(reports.values()))["framework"],
        "model": next(iter(reports.values()))["model"], "errors": errors}
    if not measured:
        return merged
    merged["step_ms"] = _spread({k: v["step_ms"]["mean"] for k, v in measured.items()})
    merged["phases_ms"] = {p: _spread({k: v["phases_ms"].get(p, {"mean": 0.0})["mean"]
                                       for k, v in measured.items()})
                           for p in _phase_names(list(measured.values()))}
    layers: Dict[str, Dict[str, Dict[int, float]]] = {}
    for k, v in measured.items():
        for layer in v["layers"]:
            entry = layers.setdefault(layer["name"], {"forward": {}, "backward": {}})
            entry["forward"][k] = layer["forward_ms"]
            entry["backward"][k] = layer["backward_ms"]
    merged["layers"] = [{"name": name, "forward_ms": _spread(d["forward"]),
                         "backward_ms": _spread(d["backward"])} for name, d in layers.items()]
    merged["ranks"] = {str(k): v for k, v in sorted(reports.items())}
    return merged


def merged_trace(ranks: Sequence[Dict[str, Any]], *, align: bool = False) -> Dict[str, Any]:
    """One Chrome trace with a process row per rank (pid = rank + 1, named "rank N"); with
    ``align`` every rank's events are shifted so that its first event starts at 0 (ranks on
    different machines, whose clocks are unrelated)."""
    events: List[Dict[str, Any]] = []
    for r in ranks:
        pid = int(r["rank"]) + 1
        own = r["trace"]["traceEvents"]
        shift = min((e["ts"] for e in own if "ts" in e), default=0) if align else 0
        for e in own:
            e = dict(e, pid=pid)
            if "ts" in e:
                e["ts"] = e["ts"] - shift
            if e.get("name") == "process_name":
                e["args"] = {"name": f"rank {r['rank']} ({r['host']})"}
            events.append(e)
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_merged(ranks: Sequence[Dict[str, Any]], out: Path) -> Dict[str, Path]:
    """merged_report.json and trace_ranks.json into ``out`` (rank 0's job)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = merge(ranks)
    one_host = len({r["host"] for r in ranks}) == 1
    write_json_atomic(out / "merged_report.json", doc)
    write_json_atomic(out / "trace_ranks.json", merged_trace(ranks, align=not one_host))
    return {"merged": out / "merged_report.json", "trace": out / "trace_ranks.json"}


def render_merged(doc: Dict[str, Any], console=None) -> None:
    """The merged phase table: mean ms per rank, the slowest rank and the spread."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    if "phases_ms" not in doc:
        console.print(f"no rank measured a step: {doc['errors']}")
        return
    ranks = sorted(doc["step_ms"]["per_rank_ms"], key=int)
    table = Table(title=f"{doc['framework']} {doc['model']}: {doc['world_size']} ranks, mean ms "
                        f"per step")
    table.add_column("phase")
    for r in ranks:
        table.add_column(f"rank {r}", justify="right")
    for name in ("slowest", "spread ms", "spread %"):
        table.add_column(name, justify="right")
    rows = list(doc["phases_ms"].items()) + [("step", doc["step_ms"])]
    for name, s in rows:
        pct = "-" if s["spread_pct"] is None else f"{s['spread_pct']:.1f}"
        table.add_row(name, *[f"{s['per_rank_ms'][r]:.3f}" for r in ranks],
                      f"rank {s['slowest_rank']}", f"{s['spread_ms']:.3f}", pct)
    console.print(table)
    for e in doc["errors"]:
        console.print(f"[red]error[/red]: {e}")
