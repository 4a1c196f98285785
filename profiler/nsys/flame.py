"""Flame graphs of an attributed capture: folded stacks, a speedscope document and a
self-contained SVG.

Stacks read ``step;phase;layer...;direction;frame...``: on the CPU the frames are the sampled
native frames (root first) and the weight is the range's wall time split over its samples, so
the graph's total is exactly the ranges' total; on a GPU the frames end in the kernel or memcpy
and the weight is its device time. Weights are integer nanoseconds (exact sums; microseconds
would round). Building the data is pure; only ``render_svg`` produces markup, and it needs no
network or script library to open.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Dict, List, Tuple
from xml.sax.saxutils import escape

from profiler.analysis.flamegraph import SPEEDSCOPE_SCHEMA
from profiler.nsys.attribution import Attribution

OUTSIDE = "[outside our ranges]"


def _clean(frame: str) -> str:
    # ';' separates frames and a newline ends a line: neither may occur inside a frame.
    return frame.replace(";", ":").replace("\n", " ").replace("\r", " ")


def cpu_stacks(att: Attribution) -> Dict[Tuple[str, ...], int]:
    """{stack: ns} of every range's wall time, split over its sampled frames."""
    out: Dict[Tuple[str, ...], int] = defaultdict(int)
    for n in att.ranges:
        for stack, ns in n.cpu_stacks_ns.items():
            if ns:
                out[tuple(_clean(f) for f in n.frames + stack)] += ns
    return dict(out)


def gpu_stacks(att: Attribution) -> Dict[Tuple[str, ...], int]:
    """{stack: ns} of device time, each kernel/memcpy under the range that launched it and the
    unclaimed ones under OUTSIDE."""
    out: Dict[Tuple[str, ...], int] = defaultdict(int)
    for n in att.ranges:
        for a in n.gpu:
            out[tuple(_clean(f) for f in n.frames + (a.name,))] += a.duration_ns
    for a in att.outside_gpu:
        out[(OUTSIDE, _clean(a.name))] += a.duration_ns
    return dict(out)


def folded_lines(stacks: Dict[Tuple[str, ...], int]) -> List[str]:
    """Brendan Gregg's folded format, one sorted "a;b;c <ns>" line per stack with weight > 0."""
    return sorted(f"{';'.join(s)} {ns}" for s, ns in stacks.items() if ns > 0)


def to_speedscope(stacks: Dict[Tuple[str, ...], int], *, name: str) -> Dict[str, Any]:
    """A speedscope "sampled" profile (https://www.speedscope.app/file-format-schema.json):
    one weighted sample per stack, in nanoseconds."""
    frame_index: Dict[str, int] = {}
    samples, weights = [], []
    for stack in sorted(stacks):
        if stacks[stack] <= 0:
            continue
        samples.append([frame_index.setdefault(f, len(frame_index)) for f in stack])
        weights.append(stacks[stack])
    return {"$schema": SPEEDSCOPE_SCHEMA,
            "shared": {"frames": [{"name": f} for f in frame_index]},
            "profiles": [{"type": "sampled", "name": name, "unit": "nanoseconds",
                          "startValue": 0, "endValue": sum(weights),
                          "samples": samples, "weights": weights}],
            "name": name, "activeProfileIndex": 0, "exporter": "deepprof"}


# ----------------------------------------------------------------------------- SVG

_WIDTH = 1200
_ROW = 17
_PAD = 10
_MIN_PX = 0.3         # narrower frames are not drawn (their time stays in their parents)


def _tree(stacks: Dict[Tuple[str, ...], int]) -> Dict[str, Any]:
    root: Dict[str, Any] = {"name": "all", "total": 0, "children": {}}
    for stack, ns in stacks.items():
        if ns <= 0:
            continue
        node = root
        node["total"] += ns
        for f in stack:
            node = node["children"].setdefault(f, {"name": f, "total": 0, "children": {}})
            node["total"] += ns
    return root


def _colour(name: str) -> str:
    # Stable per name, in the usual warm flame-graph range.
    h = int(hashlib.md5(name.encode()).hexdigest()[:6], 16)
    if name.startswith("["):
        return "rgb(190,190,190)"
    return f"rgb({205 + h % 50},{80 + (h >> 8) % 130},{(h >> 16) % 60})"


def _depth(node: Dict[str, Any]) -> int:
    return 1 + max((_depth(c) for c in node["children"].values()), default=0)


def render_svg(stacks: Dict[Tuple[str, ...], int], *, title: str) -> str:
    """A flame graph (root at the bottom, width proportional to time) as one SVG document with
    a tooltip (<title>) on every frame; no script, font or network needed to open it."""
    root = _tree(stacks)
    total = root["total"]
    depth = _depth(root)
    height = depth * _ROW + 3 * _PAD + 20
    scale = (_WIDTH - 2 * _PAD) / total if total else 0.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
             f'viewBox="0 0 {_WIDTH} {height}" font-family="monospace" font-size="11">',
             f'<rect x="0" y="0" width="{_WIDTH}" height="{height}" fill="#fdfdf5"/>',
             f'<text x="{_WIDTH / 2}" y="{_PAD + 10}" text-anchor="middle" font-size="14">'
             f'{escape(title)}</text>']
    # (node, x, level) on an explicit stack: deep native stacks must not hit recursion limits.
    todo = [(root, float(_PAD), 0)]
    while todo:
        node, x, level = todo.pop()
        w = node["total"] * scale
        if w < _MIN_PX:
            continue
        y = height - _PAD - (level + 1) * _ROW
        pct = 100.0 * node["total"] / total if total else 0.0
        label = f'{node["name"]} ({node["total"] / 1e6:.3f} ms, {pct:.2f}%)'
        parts.append(f'<g><title>{escape(label)}</title><rect x="{x:.2f}" y="{y}" '
                     f'width="{w:.2f}" height="{_ROW - 1}" fill="{_colour(node["name"])}" '
                     f'rx="2"/>')
        chars = int((w - 4) / 6.6)
        if chars >= 3:
            text = node["name"] if len(node["name"]) <= chars else node["name"][:chars - 2] + ".."
            parts.append(f'<text x="{x + 2:.2f}" y="{y + _ROW - 5}">{escape(text)}</text>')
        parts.append("</g>")
        cx = x
        for child in sorted(node["children"].values(), key=lambda c: c["name"]):
            todo.append((child, cx, level + 1))
            cx += child["total"] * scale
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
