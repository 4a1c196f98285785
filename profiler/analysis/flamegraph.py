"""Flame-graph views of a Timeline: Brendan Gregg's folded stacks and a speedscope document.

Stacks come from nesting on each track, with the track as the root frame. Only builds the
data; writing files is the report layer's job.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List

from profiler.analysis.nesting import Node, build_tree, walk
from profiler.timeline import Range, Timeline

SPEEDSCOPE_SCHEMA = "https://www.speedscope.app/file-format-schema.json"


def frame_name(r: Range) -> str:
    """The flame-graph frame of a range.

    Steps are one frame "step" (their index would give every step its own tower instead of
    merging them); layers carry their direction ("conv1 (backward)"), since on a device track
    no phase frame above them says which pass they belong to.
    """
    if r.kind == "step":
        return "step"
    if r.kind == "layer" and r.direction is not None:
        return f"{r.name} ({r.direction})"
    return r.name


def _folded_frame(name: str) -> str:
    # ';' separates frames and a line ends at a newline; neither may occur inside a frame.
    return name.replace(";", ":").replace("\n", " ").replace("\r", " ")


def folded_stacks(timeline: Timeline) -> List[str]:
    """The timeline in folded format, one "track;outer;...;inner <weight>" line per stack.

    weight is the stack's self time (the range's duration minus the ranges directly inside it)
    in integer microseconds, summed over identical stacks and then rounded; stacks whose weight
    rounds to 0 are dropped. Lines are sorted. Raises ValueError if ranges do not nest.
    """
    self_ns: Dict[str, int] = defaultdict(int)
    for track in timeline.tracks():
        for ancestors, node in walk(build_tree(timeline.on_track(track))):
            frames = [track] + [frame_name(a.range) for a in ancestors] + [frame_name(node.range)]
            stack = ";".join(_folded_frame(f) for f in frames)
            child_ns = sum(c.range.duration_ns for c in node.children)
            self_ns[stack] += node.range.duration_ns - child_ns
    lines = []
    for stack, ns in self_ns.items():
        us = (ns + 500) // 1000   # round half up on the merged total, not per range
        if us > 0:
            lines.append(f"{stack} {us}")
    return sorted(lines)


def _events(roots: List[Node], frame_index: Dict[str, int], origin_ns: int
            ) -> List[Dict[str, Any]]:
    """Open and close events of a forest, depth-first, each inner range closed before its outer.

    Ranges that touch (one ends where the next starts) close before the next opens because
    the tree places them as siblings.
    """
    events: List[Dict[str, Any]] = []
    # (node, closing?) on an explicit stack: deep nesting must not hit the recursion limit.
    stack = [(n, False) for n in reversed(roots)]
    while stack:
        node, closing = stack.pop()
        r = node.range
        frame = frame_index[frame_name(r)]
        if closing:
            events.append({"type": "C", "frame": frame, "at": r.end_ns - origin_ns})
            continue
        events.append({"type": "O", "frame": frame, "at": r.start_ns - origin_ns})
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(node.children))
    return events


def to_speedscope(timeline: Timeline, *, name: str) -> Dict[str, Any]:
    """The timeline as a speedscope file (https://www.speedscope.app/file-format-schema.json).

    One "evented" profile per track (named by the track) with open ("O") and close ("C")
    events in integer nanoseconds counted from the timeline's earliest start, so tracks line
    up; frames are shared across profiles and named as in folded_stacks. Raises ValueError if
    ranges do not nest.
    """
    origin_ns = min((r.start_ns for r in timeline.ranges), default=0)
    frame_index: Dict[str, int] = {}
    for r in sorted(timeline.ranges, key=lambda r: r.start_ns):
        frame_index.setdefault(frame_name(r), len(frame_index))

    profiles = []
    for track in timeline.tracks():
        roots = build_tree(timeline.on_track(track))
        profiles.append({
            "type": "evented", "name": track, "unit": "nanoseconds",
            "startValue": roots[0].range.start_ns - origin_ns,
            "endValue": max(n.range.end_ns for n in roots) - origin_ns,
            "events": _events(roots, frame_index, origin_ns)})
    return {"$schema": SPEEDSCOPE_SCHEMA,
            "shared": {"frames": [{"name": f} for f in frame_index]},
            "profiles": profiles, "name": name, "activeProfileIndex": 0,
            "exporter": "deepprof"}
