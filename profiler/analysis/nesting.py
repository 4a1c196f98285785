"""Nesting of ranges on a track: the check that they nest, and the forest they form.

Every other analysis (self time, flame graphs, trace export) assumes that on one track any two
ranges are disjoint or one contains the other; this module is where that assumption is checked.
It must not interpret what the ranges mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

from profiler.timeline import Range, Timeline

# At equal extents a step contains its phases and a phase its layers; ranking the kinds keeps
# that reading stable however the instrumentation happened to append them.
_KIND_RANK = {"step": 0, "phase": 1, "layer": 2, "mark": 3}

# How many offending pairs an error message lists before it stops; the first few are enough
# to find the bug, a thousand are noise.
_MAX_REPORTED = 5


@dataclass
class Node:
    """One range in a nesting forest and the ranges directly inside it, in start order."""
    range: Range
    children: List["Node"] = field(default_factory=list)


def nesting_order_key(r: Range) -> Tuple[int, int, int]:
    """Sort key putting ranges in start order, outer before inner where they start together."""
    return (r.start_ns, -r.end_ns, _KIND_RANK.get(r.kind, len(_KIND_RANK)))


def _describe(r: Range) -> str:
    return f"{r.kind} {r.name!r} (step {r.step}) [{r.start_ns}, {r.end_ns}] ns"


def _overlaps(ranges: Sequence[Range]) -> Iterator[Tuple[Range, Range]]:
    """Pairs (outer, inner) where inner starts inside outer but ends after it."""
    open_ranges: List[Range] = []
    for r in sorted(ranges, key=nesting_order_key):
        # Touching endpoints (outer ends where r starts) are not an overlap.
        while open_ranges and open_ranges[-1].end_ns <= r.start_ns:
            open_ranges.pop()
        if open_ranges and r.end_ns > open_ranges[-1].end_ns:
            yield open_ranges[-1], r
            # Keep scanning as if r were closed at once, so later ranges are judged against
            # the ranges that really enclose them rather than against the offender.
            continue
        open_ranges.append(r)


def _raise_overlaps(track: str, pairs: List[Tuple[Range, Range]]) -> None:
    lines = [f"  {_describe(a)} and {_describe(b)}" for a, b in pairs[:_MAX_REPORTED]]
    more = len(pairs) - _MAX_REPORTED
    if more > 0:
        lines.append(f"  ... and {more} more")
    raise ValueError(f"ranges on track {track!r} partially overlap (expected each pair to be "
                     f"disjoint or one inside the other):\n" + "\n".join(lines))


def check_nesting(timeline: Timeline) -> None:
    """Raise ValueError naming the offending ranges if two ranges on one track partially overlap.

    Proper nesting: on one track any two ranges are disjoint or one contains the other. Ranges
    that only touch (one ends where the next starts) are fine.
    """
    for track in timeline.tracks():
        pairs = list(_overlaps(timeline.on_track(track)))
        if pairs:
            _raise_overlaps(track, pairs)


def build_tree(ranges_on_one_track: Iterable[Range]) -> List[Node]:
    """The nesting forest of ranges that all lie on one track: roots in start order.

    Raises ValueError if the ranges lie on several tracks or do not nest properly.
    """
    ranges = sorted(ranges_on_one_track, key=nesting_order_key)
    tracks = sorted({r.track for r in ranges})
    if len(tracks) > 1:
        raise ValueError(f"build_tree: ranges_on_one_track holds ranges of {len(tracks)} "
                         f"tracks {tracks}; expected one track")
    if not ranges:
        return []
    pairs = list(_overlaps(ranges))
    if pairs:
        _raise_overlaps(tracks[0], pairs)

    roots: List[Node] = []
    open_nodes: List[Node] = []
    for r in ranges:
        while open_nodes and open_nodes[-1].range.end_ns <= r.start_ns:
            open_nodes.pop()
        node = Node(r)
        (open_nodes[-1].children if open_nodes else roots).append(node)
        open_nodes.append(node)
    return roots


def trees_by_track(timeline: Timeline) -> Dict[str, List[Node]]:
    """The nesting forest of every track of the timeline, keyed by track name."""
    return {track: build_tree(timeline.on_track(track)) for track in timeline.tracks()}


def walk(roots: Iterable[Node]) -> Iterator[Tuple[Tuple[Node, ...], Node]]:
    """Every node depth-first, outer before inner, with the tuple of its ancestors (root first)."""
    # An explicit stack rather than recursion: a deep model could pass Python's recursion limit.
    stack: List[Tuple[Tuple[Node, ...], Node]] = [((), n) for n in reversed(list(roots))]
    while stack:
        ancestors, node = stack.pop()
        yield ancestors, node
        inner = ancestors + (node,)
        stack.extend((inner, child) for child in reversed(node.children))
