"""Export a Timeline as Chrome trace-event JSON (chrome://tracing, Perfetto), and check one.

Only builds and checks the document; writing it to disk is the report layer's job.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Dict, List, Tuple

from profiler.analysis.nesting import check_nesting, nesting_order_key
from profiler.timeline import Timeline

# The phase letters of the trace-event format; anything else is a malformed event.
KNOWN_PHASES = frozenset("B E X i I C b n e s t f P N O D M V v R c".split())

_PID = 1
# Nesting is checked on integer ns before export; the float microseconds can round an inner
# end past its outer end by a few ulps, which is not an overlap.
_NESTING_SLACK_US = 1e-6


def _track_order(track: str) -> Tuple[int, str]:
    # Host threads first (where the step is driven), then device streams, then the rest.
    rank = 0 if track.startswith("host:") else 1 if track.startswith("device:") else 2
    return (rank, track)


def to_chrome_trace(timeline: Timeline, *, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """The timeline as a Chrome trace-event document.

    Returns {"traceEvents": [...], "displayTimeUnit": "ms", "otherData": metadata + {
    "time_origin_ns"}}. Each range is a complete event ("ph": "X") with ts and dur in
    microseconds (floats) counted from the earliest range start (time_origin_ns, on the
    timeline's clock), pid 1 and one tid per track, named by a "thread_name" metadata event.
    Events are sorted by start, outer before inner, so viewers stack nested ranges properly.
    args hold step, kind and, where set, direction and layer_type.

    Raises ValueError if the ranges on a track do not nest.
    """
    check_nesting(timeline)
    tracks = sorted(timeline.tracks(), key=_track_order)
    tids = {track: i + 1 for i, track in enumerate(tracks)}
    origin_ns = min((r.start_ns for r in timeline.ranges), default=0)

    events: List[Dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": _PID, "tid": 0, "args": {"name": "deepprof"}}]
    for track in tracks:
        tid = tids[track]
        events.append({"name": "thread_name", "ph": "M", "pid": _PID, "tid": tid,
                       "args": {"name": track}})
        # Without a sort index viewers order threads by tid or name; this pins our order.
        events.append({"name": "thread_sort_index", "ph": "M", "pid": _PID, "tid": tid,
                       "args": {"sort_index": tid}})

    for r in sorted(timeline.ranges, key=lambda r: (nesting_order_key(r), tids[r.track])):
        args: Dict[str, Any] = {"step": r.step, "kind": r.kind}
        if r.direction is not None:
            args["direction"] = r.direction
        if r.layer_type is not None:
            args["layer_type"] = r.layer_type
        events.append({"name": r.name, "cat": r.kind, "ph": "X",
                       "ts": (r.start_ns - origin_ns) / 1e3, "dur": r.duration_ns / 1e3,
                       "pid": _PID, "tid": tids[r.track], "args": args})

    other = dict(metadata)
    other["time_origin_ns"] = origin_ns
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_event(i: int, ev: Any) -> None:
    where = f"traceEvents[{i}]"
    if not isinstance(ev, dict):
        raise ValueError(f"{where}: expected an object, got {type(ev).__name__}")
    ph = ev.get("ph")
    if ph not in KNOWN_PHASES:
        raise ValueError(f"{where}: unknown ph {ph!r}; expected one of {sorted(KNOWN_PHASES)}")
    if not isinstance(ev.get("name"), str):
        raise ValueError(f"{where}: 'name' must be a string, got {ev.get('name')!r}")
    for key in ("pid", "tid"):
        if ph == "M" and key == "tid" and key not in ev:
            continue   # process-level metadata has no thread
        if not isinstance(ev.get(key), (int, str)) or isinstance(ev.get(key), bool):
            raise ValueError(f"{where} ({ev['name']!r}): {key!r} must be an int or string, "
                             f"got {ev.get(key)!r}")
    if ph == "M":
        if not isinstance(ev.get("args"), dict):
            raise ValueError(f"{where} ({ev['name']!r}): metadata event needs an 'args' object")
        return
    if not _is_number(ev.get("ts")):
        raise ValueError(f"{where} ({ev['name']!r}): 'ts' must be a finite number, got "
                         f"{ev.get('ts')!r}")
    if ph == "X":
        dur = ev.get("dur")
        if not _is_number(dur):
            raise ValueError(f"{where} ({ev['name']!r}): 'dur' must be a finite number, got "
                             f"{dur!r}")
        if dur < 0:
            raise ValueError(f"{where} ({ev['name']!r}): 'dur' is negative ({dur})")
    if "args" in ev and not isinstance(ev["args"], dict):
        raise ValueError(f"{where} ({ev['name']!r}): 'args' must be an object")


def validate_chrome_trace(doc: Any) -> None:
    """Raise ValueError if doc is not a well-formed trace-event document as we write them.

    Checks: doc is an object with a "traceEvents" list; every event has a known "ph", a name,
    pid and tid (ts too unless metadata; dur >= 0 for "X"); and within each (pid, tid) the
    complete events nest properly (disjoint or one inside the other) and appear in start
    order with outer before inner, which is what viewers need to stack them.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise ValueError("trace document: expected an object with a 'traceEvents' list")
    if "displayTimeUnit" in doc and doc["displayTimeUnit"] not in ("ms", "ns"):
        raise ValueError(f"trace document: displayTimeUnit must be 'ms' or 'ns', got "
                         f"{doc['displayTimeUnit']!r}")
    by_thread: Dict[Tuple[Any, Any], List[Tuple[int, Dict[str, Any]]]] = defaultdict(list)
    for i, ev in enumerate(doc["traceEvents"]):
        _check_event(i, ev)
        if ev["ph"] == "X":
            by_thread[(ev["pid"], ev["tid"])].append((i, ev))

    for (pid, tid), items in by_thread.items():
        open_events: List[Tuple[int, Dict[str, Any]]] = []
        prev = None
        for i, ev in items:
            start, end = ev["ts"], ev["ts"] + ev["dur"]
            if prev is not None and (start, -ev["dur"]) < prev:
                raise ValueError(f"traceEvents[{i}] ({ev['name']!r}, pid {pid}, tid {tid}): "
                                 f"out of order; expected complete events sorted by ts, outer "
                                 f"before inner")
            prev = (start, -ev["dur"])
            while open_events and open_events[-1][1]["ts"] + open_events[-1][1]["dur"] \
                    <= start + _NESTING_SLACK_US:
                open_events.pop()
            if open_events:
                j, outer = open_events[-1]
                if end > outer["ts"] + outer["dur"] + _NESTING_SLACK_US:
                    raise ValueError(
                        f"traceEvents[{i}] ({ev['name']!r}) and traceEvents[{j}] "
                        f"({outer['name']!r}) on pid {pid}, tid {tid} partially overlap; "
                        f"expected disjoint or nested")
            open_events.append((i, ev))
