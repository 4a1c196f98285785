"""Reads an Nsight Systems SQLite export into plain records: our NVTX ranges, CPU samples with
their call stacks, and CUDA kernels/memcpys joined to the runtime call that launched them.

Parsing only: nothing here attributes, sums or renders (that is profiler.nsys.attribution and
profiler.nsys.summary). Schemas differ between nsys versions (2022.4 keeps NVTX text inline,
2025.x mostly in StringIds; tables appear only when their data was captured; some columns come
and go), so every query is built from the columns the file actually has, never from a version
number.

Times are the capture's own integer nanoseconds, one clock for every table.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from profiler.nsys.errors import ProfilerNsysError

DOMAIN = "deepprof"

# NVTX_EVENTS.eventType values (the same in 2022.4 and 2025.x; 2025 also ships them in
# ENUM_NSYS_EVENT_TYPE, which we do not need).
EVENT_PUSH_POP = 59
EVENT_START_END = 60
EVENT_DOMAIN_CREATE = 75

_SQLITE_MAGIC = b"SQLite format 3\x00"

# cudaMemcpyKind-like names of CUPTI's copyKind, for captures without ENUM_CUDA_MEMCPY_OPER.
_COPY_KINDS = {0: "unknown", 1: "HtoD", 2: "DtoH", 3: "HtoA", 4: "AtoH", 5: "AtoA", 6: "AtoD",
               7: "DtoA", 8: "DtoD", 9: "HtoH", 10: "PtoP"}


def split_global_tid(global_tid: int) -> Tuple[int, int]:
    """(pid, tid) of an nsys serialized globalTid/globalPid: pid in bits 24-47, tid in 0-23
    (the bits above hold hardware/VM ids we do not need)."""
    return (global_tid >> 24) & 0xFFFFFF, global_tid & 0xFFFFFF


@dataclass(frozen=True)
class NvtxRange:
    """One closed NVTX range of our domain, on the thread that opened it."""
    name: str
    start_ns: int
    end_ns: int
    pid: int
    tid: int


@dataclass(frozen=True)
class Frame:
    symbol: str
    module: str


@dataclass(frozen=True)
class Sample:
    """One CPU sample: when, on which thread, and its call stack, leaf (innermost) first."""
    time_ns: int
    pid: int
    tid: int
    frames: Tuple[Frame, ...]


@dataclass(frozen=True)
class GpuActivity:
    """A kernel, memcpy or memset and the runtime call that launched it (launch_* are None when
    the capture has no runtime row with its correlation id)."""
    kind: str                    # "kernel" | "memcpy" | "memset"
    name: str
    start_ns: int
    end_ns: int
    pid: int
    correlation_id: int
    device: int
    stream: int
    bytes: int = 0
    launch_tid: Optional[int] = None
    launch_start_ns: Optional[int] = None
    launch_end_ns: Optional[int] = None

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class Capture:
    """What one export holds of our run."""
    path: str
    schema: Dict[str, object]
    ranges: List[NvtxRange]
    samples: List[Sample]
    gpu: List[GpuActivity]
    thread_names: Dict[Tuple[int, int], str]
    pids: Set[int]
    warnings: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- file checks

def check_sqlite_file(path: Path) -> None:
    """Raise ProfilerNsysError unless path is a complete SQLite file: the header's magic, and a
    file at least as long as the header's page count says (a copy cut short reads as a valid
    database with pages missing, so sqlite alone would not always notice)."""
    if not path.exists():
        raise ProfilerNsysError(f"capture {str(path)!r}: no such file; expected an nsys .sqlite "
                                f"export or .nsys-rep report")
    if not path.is_file():
        raise ProfilerNsysError(f"capture {str(path)!r}: not a regular file; expected an nsys "
                                f".sqlite export or .nsys-rep report")
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(100)
    if not header.startswith(_SQLITE_MAGIC):
        raise ProfilerNsysError(f"capture {str(path)!r}: not a SQLite database (first bytes "
                                f"{header[:16]!r}); expected the output of `nsys export --type "
                                f"sqlite`")
    if len(header) < 100:
        raise ProfilerNsysError(f"capture {str(path)!r}: truncated SQLite file ({size} bytes, "
                                f"shorter than its 100-byte header)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    page_count = int.from_bytes(header[28:32], "big")
    # The in-header page count is only valid when the two change counters agree.
    if header[24:28] == header[92:96] and page_count and size < page_size * page_count:
        raise ProfilerNsysError(f"capture {str(path)!r}: truncated SQLite file ({size} bytes; its "
                                f"header says {page_size * page_count}); re-export it with "
                                f"`nsys export --type sqlite`")


# ----------------------------------------------------------------------------- reading

class _Db:
    """A read-only connection that knows which tables and columns the file has."""

    def __init__(self, path: Path):
        self.path = path
        uri = Path(os.path.abspath(path)).as_uri() + "?mode=ro"
        self.con = sqlite3.connect(uri, uri=True)
        self.tables: Set[str] = {r[0] for r in self.query(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        self._columns: Dict[str, Dict[str, str]] = {}

    def query(self, sql: str, args: Sequence = ()) -> List[tuple]:
        try:
            return self.con.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise ProfilerNsysError(f"capture {str(self.path)!r}: SQLite could not read it "
                                    f"({e}); expected a complete `nsys export --type sqlite` "
                                    f"file") from e

    def columns(self, table: str) -> Dict[str, str]:
        """{column: declared type (upper case)} of table, {} if the table is absent."""
        if table not in self.tables:
            return {}
        if table not in self._columns:
            self._columns[table] = {r[1]: (r[2] or "").upper()
                                    for r in self.query(f"PRAGMA table_info('{table}')")}
        return self._columns[table]


class _Strings:
    """StringIds lookup; values that are already text (inline columns) pass through."""

    def __init__(self, db: _Db):
        self.by_id: Dict[int, str] = {}
        if "StringIds" in db.tables:
            self.by_id = {i: v for i, v in db.query("SELECT id, value FROM StringIds")}

    def text(self, value) -> Optional[str]:
        if value is None:
            return None
        if isinstance(value, str):
            return value
        return self.by_id.get(value, f"[string {value}]")


def _nvtx_text_expr(cols: Dict[str, str]) -> Tuple[str, str]:
    """SELECT expressions for an event's inline text and its StringIds id, NULL where the
    capture lacks the column (2022.4 exports inline text; 2025.x mostly textId)."""
    return ("text" if "text" in cols else "NULL",
            "textId" if "textId" in cols else "NULL")


def _read_ranges(db: _Db, strings: _Strings, domain: str, warnings: List[str]
                 ) -> Tuple[List[NvtxRange], Set[int], Dict[str, object]]:
    cols = db.columns("NVTX_EVENTS")
    if not cols:
        raise ProfilerNsysError(f"capture {str(db.path)!r}: no NVTX_EVENTS table; expected a "
                                f"capture traced with NVTX (`nsys profile -t nvtx,...`)")
    for needed in ("start", "eventType", "globalTid", "domainId"):
        if needed not in cols:
            raise ProfilerNsysError(f"capture {str(db.path)!r}: NVTX_EVENTS has no column "
                                    f"{needed!r} (columns: {sorted(cols)}); expected an nsys "
                                    f"2022.4 or later export")
    text, text_id = _nvtx_text_expr(cols)
    # Domain ids are per process: key them by (pid, domainId).
    ours: Set[Tuple[int, int]] = set()
    seen_domains: Set[str] = set()
    for global_tid, domain_id, t, tid_ in db.query(
            f"SELECT globalTid, domainId, {text}, {text_id} FROM NVTX_EVENTS "
            f"WHERE eventType = ?", (EVENT_DOMAIN_CREATE,)):
        name = t if t is not None else strings.text(tid_)
        seen_domains.add(str(name))
        if name == domain:
            ours.add((split_global_tid(global_tid)[0], domain_id))
    if not ours:
        raise ProfilerNsysError(
            f"capture {str(db.path)!r}: no NVTX domain {domain!r} (domains present: "
            f"{sorted(seen_domains) or 'none'}); expected a capture of `python -m "
            f"profiler.layerwise` traced with `-t nvtx`")
    end_col = "end" if "end" in cols else "NULL"
    ranges: List[NvtxRange] = []
    unclosed = 0
    for start, end, global_tid, domain_id, t, tid_ in db.query(
            f"SELECT start, {end_col}, globalTid, domainId, {text}, {text_id} FROM NVTX_EVENTS "
            f"WHERE eventType IN (?, ?) ORDER BY start", (EVENT_PUSH_POP, EVENT_START_END)):
        pid, tid = split_global_tid(global_tid)
        if (pid, domain_id) not in ours:
            continue
        if end is None or end < start:
            unclosed += 1    # a range still open when the capture stopped has no duration
            continue
        name = t if t is not None else strings.text(tid_)
        ranges.append(NvtxRange(str(name), int(start), int(end), pid, tid))
    if unclosed:
        warnings.append(f"{unclosed} range(s) of domain {domain!r} were still open when the "
                        f"capture ended and are left out")
    if not ranges:
        raise ProfilerNsysError(
            f"capture {str(db.path)!r}: NVTX domain {domain!r} is present but holds no ranges; "
            f"expected push/pop or start/end ranges (ranges from the `nvtx` Python package are "
            f"not recorded by every nsys: see docs/nsys.md)")
    flavour = "inline-text" if text != "NULL" and any(
        r[0] is not None for r in db.query(
            f"SELECT {text} FROM NVTX_EVENTS WHERE eventType IN (?, ?) LIMIT 50",
            (EVENT_PUSH_POP, EVENT_START_END))) else "string-ids"
    return ranges, {pid for pid, _ in ours}, {"nvtx_text": flavour}


def _read_thread_names(db: _Db, strings: _Strings) -> Dict[Tuple[int, int], str]:
    cols = db.columns("ThreadNames")
    if not {"globalTid", "nameId"} <= set(cols):
        return {}
    return {split_global_tid(g): str(strings.text(n))
            for n, g in db.query("SELECT nameId, globalTid FROM ThreadNames")}


def _read_samples(db: _Db, strings: _Strings, pids: Set[int]) -> List[Sample]:
    ev, cc = db.columns("COMPOSITE_EVENTS"), db.columns("SAMPLING_CALLCHAINS")
    if not ({"id", "start", "globalTid"} <= set(ev) and {"id", "stackDepth"} <= set(cc)):
        return []
    symbol = "c.symbol" if "symbol" in cc else "NULL"
    module = "c.module" if "module" in cc else "NULL"
    rows = db.query(f"SELECT e.id, e.start, e.globalTid, c.stackDepth, {symbol}, {module} "
                    f"FROM COMPOSITE_EVENTS e JOIN SAMPLING_CALLCHAINS c ON c.id = e.id "
                    f"ORDER BY e.id, c.stackDepth")
    samples: List[Sample] = []
    current: Optional[tuple] = None
    frames: List[Frame] = []

    def flush():
        if current is not None:
            pid, tid = split_global_tid(current[2])
            if pid in pids:
                samples.append(Sample(int(current[1]), pid, tid, tuple(frames)))

    for sample_id, start, global_tid, _depth, sym, mod in rows:
        if current is None or current[0] != sample_id:
            flush()
            current, frames = (sample_id, start, global_tid), []
        # stackDepth 0 is the leaf: rows come leaf first.
        frames.append(Frame(strings.text(sym) or "[unknown]", strings.text(mod) or ""))
    flush()
    samples.sort(key=lambda s: s.time_ns)
    return samples


def _copy_kind_names(db: _Db) -> Dict[int, str]:
    cols = db.columns("ENUM_CUDA_MEMCPY_OPER")
    if {"id", "label"} <= set(cols):
        return {i: str(label) for i, label in db.query(
            "SELECT id, label FROM ENUM_CUDA_MEMCPY_OPER")}
    if {"id", "name"} <= set(cols):
        return {i: str(n) for i, n in db.query("SELECT id, name FROM ENUM_CUDA_MEMCPY_OPER")}
    return dict(_COPY_KINDS)


def _read_gpu(db: _Db, strings: _Strings, pids: Set[int], warnings: List[str]
              ) -> List[GpuActivity]:
    launches: Dict[Tuple[int, int], Tuple[int, int, int]] = {}
    rt = db.columns("CUPTI_ACTIVITY_KIND_RUNTIME")
    if {"correlationId", "globalTid", "start", "end"} <= set(rt):
        for corr, global_tid, start, end in db.query(
                "SELECT correlationId, globalTid, start, end FROM CUPTI_ACTIVITY_KIND_RUNTIME"):
            pid, tid = split_global_tid(global_tid)
            launches[(pid, corr)] = (tid, start, end)
    out: List[GpuActivity] = []
    copy_kinds = _copy_kind_names(db)

    def pid_of(cols, global_pid, global_tid):
        # KERNEL/MEMCPY carry globalPid; some exports only globalTid.
        value = global_pid if global_pid is not None else global_tid
        return split_global_tid(int(value))[0] if value is not None else None

    for table, kind in (("CUPTI_ACTIVITY_KIND_KERNEL", "kernel"),
                        ("CUPTI_ACTIVITY_KIND_MEMCPY", "memcpy"),
                        ("CUPTI_ACTIVITY_KIND_MEMSET", "memset")):
        cols = db.columns(table)
        if not {"start", "end", "correlationId"} <= set(cols):
            continue
        gpid = "globalPid" if "globalPid" in cols else "NULL"
        gtid = "globalTid" if "globalTid" in cols else "NULL"
        if kind == "kernel":
            # demangledName is the full signature; shortName the bare name; either may be
            # absent or a StringIds id depending on the version.
            name_col = next((c for c in ("shortName", "demangledName", "mangledName")
                             if c in cols), "NULL")
            extra = "NULL"
        else:
            name_col = "copyKind" if (kind == "memcpy" and "copyKind" in cols) else "NULL"
            extra = "bytes" if "bytes" in cols else "NULL"
        dev = "deviceId" if "deviceId" in cols else "0"
        stream = "streamId" if "streamId" in cols else "0"
        for start, end, corr, gp, gt, name, nbytes, d, s in db.query(
                f"SELECT start, end, correlationId, {gpid}, {gtid}, {name_col}, {extra}, "
                f"{dev}, {stream} FROM {table}"):
            pid = pid_of(cols, gp, gt)
            if pid is not None and pid not in pids:
                continue
            if kind == "kernel":
                label = strings.text(name) or "[kernel]"
            elif kind == "memcpy":
                label = f"[memcpy {copy_kinds.get(name, name) if name is not None else ''}]"
                label = label.replace(" ]", "]")
            else:
                label = "[memset]"
            launch = launches.get((pid, corr)) if pid is not None else None
            out.append(GpuActivity(kind, label, int(start), int(end), pid if pid is not None
                                   else -1, int(corr), int(d or 0), int(s or 0),
                                   int(nbytes or 0),
                                   *(launch if launch is not None else (None, None, None))))
    missing = sum(1 for a in out if a.launch_start_ns is None)
    if missing:
        warnings.append(f"{missing} GPU activit(y/ies) have no runtime call with their "
                        f"correlation id (was `-t cuda` on?); they count as outside our ranges")
    out.sort(key=lambda a: a.start_ns)
    return out


def _meta(db: _Db, key: str) -> Optional[str]:
    if not {"name", "value"} <= set(db.columns("EXPORT_META_DATA")):
        return None
    row = db.query("SELECT value FROM EXPORT_META_DATA WHERE name = ?", (key,))
    return str(row[0][0]) if row else None


def read_capture(path, *, domain: str = DOMAIN) -> Capture:
    """The records of domain ``domain`` in the nsys SQLite export at ``path``.

    Raises ProfilerNsysError for a missing, non-SQLite or truncated file, a file without
    NVTX_EVENTS, or one without a range of the domain.
    """
    path = Path(path)
    check_sqlite_file(path)
    db = _Db(path)
    try:
        if not db.tables:
            raise ProfilerNsysError(f"capture {str(path)!r}: an empty SQLite database; "
                                    f"expected an nsys export (tables NVTX_EVENTS, StringIds)")
        strings = _Strings(db)
        warnings: List[str] = []
        ranges, pids, schema = _read_ranges(db, strings, domain, warnings)
        samples = _read_samples(db, strings, pids)
        gpu = _read_gpu(db, strings, pids, warnings)
        schema.update({
            "tables": sorted(t for t in db.tables if not t.startswith("sqlite_")),
            "nvtx_columns": sorted(db.columns("NVTX_EVENTS")),
            # What nsys says it is (2022.4 already has ENUM_* and TARGET_INFO_* tables, so
            # the tables present do not tell versions apart); None when absent.
            "nsys_version": _meta(db, "EXPORT_PRODUCT_VERSION"),
            "export_schema_version": _meta(db, "EXPORT_SCHEMA_VERSION"),
        })
        return Capture(str(path), schema, ranges, samples, gpu,
                       _read_thread_names(db, strings), pids, warnings)
    finally:
        db.con.close()
