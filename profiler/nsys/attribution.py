"""Attributes a capture's CPU samples and GPU work to our NVTX ranges.

Pure functions of a :class:`profiler.nsys.reader.Capture`: ranges nest per thread (as
NVTX push/pop ranges do); a range's step and phase come from time (a layer's backward may run
on an autograd or engine thread while the driver thread sits in the backward phase); a sample
belongs to the innermost range on its own thread; a kernel or memcpy belongs to the innermost
range on the thread whose runtime call launched it, wherever and whenever it then ran.

Nothing here reads files, sums per layer or renders (profiler.nsys.summary does the sums).
"""

from __future__ import annotations

import bisect
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from profiler.nsys.reader import Capture, GpuActivity, NvtxRange, Sample
from profiler.nsys.libraries import frame_label, sample_library
from profiler.timeline import PHASES, Range, Timeline

UNSAMPLED = "[not sampled]"        # range time no sample fell in: off-CPU, waiting, or chance
_LAYER_LABEL = re.compile(r"^(?P<name>.+) \((?P<direction>forward|backward)\)$")
_STEP_LABEL = re.compile(r"^step(?: (?P<index>\d+))?$")


def classify_label(label: str) -> Tuple[str, str, Optional[str]]:
    """(kind, name, direction) of an NVTX label as the profiler's recorder writes them:
    "step", a phase name, "<layer> (forward|backward)"; anything else is a "mark"."""
    if _STEP_LABEL.match(label):
        return "step", "step", None
    if label in PHASES:
        return "phase", label, None
    m = _LAYER_LABEL.match(label)
    if m:
        return "layer", m.group("name"), m.group("direction")
    return "mark", label, None


@dataclass
class RangeNode:
    """One NVTX range with its place in the run and what was attributed to it."""
    index: int
    label: str
    kind: str
    name: str
    direction: Optional[str]
    start_ns: int
    end_ns: int
    pid: int
    tid: int
    thread: str
    parent: Optional[int] = None                  # enclosing range on the same thread
    children: List[int] = field(default_factory=list)
    step: Optional[int] = None                    # order of the step it lies in, from 0
    phase: Optional[str] = None
    frames: Tuple[str, ...] = ()                  # step;phase;layer...;direction
    self_ns: int = 0
    # CPU, this range's own (self) part only: flame stacks (sampled frames, root first) -> ns,
    # library -> ns (both sum to self_ns), sample counts.
    cpu_stacks_ns: Dict[Tuple[str, ...], int] = field(default_factory=dict)
    cpu_library_ns: Dict[str, int] = field(default_factory=dict)
    samples: int = 0
    functions: Counter = field(default_factory=Counter)          # (leaf frame, library) -> n
    worker_samples: Counter = field(default_factory=Counter)     # library -> n, other threads
    gpu: List[GpuActivity] = field(default_factory=list)          # launched here (self)

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class Attribution:
    ranges: List[RangeNode]
    steps: List[int]                     # indices of the step ranges, in time order
    main_thread: Tuple[int, int]         # (pid, tid) of the thread that ran the steps
    sampling_period_ns: Optional[int]
    outside_samples: Counter             # library -> samples on our threads outside any range
    outside_gpu: List[GpuActivity]
    all_gpu: List[GpuActivity]
    warnings: List[str]
    # The same samples by when they fell: before the first step (start-up, imports, building
    # the model), between steps (the uninstrumented steps timed for the overhead, the loader
    # between epochs), after the last step (writing the report, exit).
    outside_samples_when: Counter = field(default_factory=Counter)


# ----------------------------------------------------------------------------- ranges

def _nest(nodes: List[RangeNode], warnings: List[str]) -> None:
    """Parent/children links per thread; a range that starts inside another but ends after it
    cannot be its child and becomes its sibling (listed in warnings)."""
    by_thread: Dict[Tuple[int, int], List[RangeNode]] = defaultdict(list)
    for n in nodes:
        by_thread[(n.pid, n.tid)].append(n)
    overlaps = 0
    for thread_nodes in by_thread.values():
        thread_nodes.sort(key=lambda n: (n.start_ns, -n.end_ns, n.index))
        stack: List[RangeNode] = []
        for n in thread_nodes:
            while stack and (stack[-1].end_ns <= n.start_ns or stack[-1].end_ns < n.end_ns):
                if stack[-1].end_ns > n.start_ns:
                    overlaps += 1
                stack.pop()
            if stack:
                n.parent = stack[-1].index
                stack[-1].children.append(n.index)
            stack.append(n)
    if overlaps:
        warnings.append(f"{overlaps} range(s) partially overlap a range on the same thread "
                        f"instead of nesting in it; they are treated as siblings")


def _containing(sorted_nodes: List[RangeNode], starts: List[int], t: int
                ) -> Optional[RangeNode]:
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and sorted_nodes[i].start_ns <= t < sorted_nodes[i].end_ns:
        return sorted_nodes[i]
    return None


def build_ranges(ranges: Sequence[NvtxRange], thread_names: Dict[Tuple[int, int], str],
                 warnings: List[str]) -> Tuple[List[RangeNode], List[int], Tuple[int, int]]:
    """Range nodes with nesting, step, phase and flame frames; the step ranges' indices in time
    order; and the main thread (the one with most step ranges)."""
    nodes = []
    for i, r in enumerate(sorted(ranges, key=lambda r: (r.start_ns, -r.end_ns))):
        kind, name, direction = classify_label(r.name)
        nodes.append(RangeNode(i, r.name, kind, name, direction, r.start_ns, r.end_ns, r.pid,
                               r.tid, thread_names.get((r.pid, r.tid), str(r.tid))))
    _nest(nodes, warnings)

    step_nodes = [n for n in nodes if n.kind == "step"]
    threads = Counter((n.pid, n.tid) for n in step_nodes)
    main = threads.most_common(1)[0][0] if threads else (
        Counter((n.pid, n.tid) for n in nodes).most_common(1)[0][0])
    steps = [n for n in step_nodes if (n.pid, n.tid) == main]
    if len(steps) != len(step_nodes):
        warnings.append(f"{len(step_nodes) - len(steps)} step range(s) on threads other than "
                        f"the main one ({main[1]}) are not counted as steps")
    for k, s in enumerate(steps):
        s.step = k
    phases = sorted((n for n in nodes if n.kind == "phase" and (n.pid, n.tid) == main),
                    key=lambda n: n.start_ns)
    step_starts = [s.start_ns for s in steps]
    phase_starts = [p.start_ns for p in phases]
    for n in nodes:
        if n.kind != "step":
            s = _containing(steps, step_starts, n.start_ns)
            n.step = s.step if s is not None else None
        if n.kind == "phase":
            n.phase = n.name
        elif n.kind != "step":
            p = _containing(phases, phase_starts, n.start_ns)
            n.phase = p.name if p is not None else None
    for n in nodes:
        chain = []
        a: Optional[RangeNode] = n
        while a is not None:
            chain.append(a)
            a = nodes[a.parent] if a.parent is not None else None
        inner = [c for c in reversed(chain) if c.kind in ("layer", "mark")]
        frames = (["step"] if n.step is not None else []) + ([n.phase] if n.phase else [])
        frames += [c.name for c in inner]
        direction = next((c.direction for c in reversed(inner) if c.direction), None)
        if direction:
            frames.append(direction)
        n.frames = tuple(frames)
        n.self_ns = n.duration_ns - sum(nodes[c].duration_ns for c in n.children)
    return nodes, [s.index for s in steps], main


def _self_segments(nodes: List[RangeNode]) -> Dict[Tuple[int, int], Tuple[List[int], list]]:
    """Per thread, the intervals where each range is the innermost one: sorted starts and
    (start, end, index) triples, for bisecting sample and launch times."""
    out: Dict[Tuple[int, int], list] = defaultdict(list)
    for root in (n for n in nodes if n.parent is None):
        todo = [root]
        while todo:
            n = todo.pop()
            at = n.start_ns
            for c in sorted((nodes[i] for i in n.children), key=lambda c: c.start_ns):
                if c.start_ns > at:
                    out[(n.pid, n.tid)].append((at, c.start_ns, n.index))
                at = max(at, c.end_ns)
                todo.append(c)
            if n.end_ns > at:
                out[(n.pid, n.tid)].append((at, n.end_ns, n.index))
    result = {}
    for key, segs in out.items():
        segs.sort()
        result[key] = ([s[0] for s in segs], segs)
    return result


def _innermost(segments, key: Tuple[int, int], t: int) -> Optional[int]:
    found = segments.get(key)
    if found is None:
        return None
    starts, segs = found
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and segs[i][0] <= t < segs[i][1]:
        return segs[i][2]
    return None


# ----------------------------------------------------------------------------- CPU

def sampling_period_ns(samples: Sequence[Sample]) -> Optional[int]:
    """The sampling interval: the median gap between consecutive samples of one thread (a
    running thread is sampled once per interval; longer gaps are time off the CPU)."""
    last: Dict[Tuple[int, int], int] = {}
    gaps = []
    for s in samples:
        key = (s.pid, s.tid)
        if key in last and s.time_ns > last[key]:
            gaps.append(s.time_ns - last[key])
        last[key] = s.time_ns
    return int(statistics.median(gaps)) if gaps else None


def split_exact(total: int, weights: Dict, order: Sequence) -> Dict:
    """total split over weights' keys in proportion, in integers that add up to total exactly
    (largest remainders get the leftover units; ties go to keys earlier in order)."""
    wsum = sum(weights.values())
    if total <= 0 or wsum <= 0:
        return {k: 0 for k in weights}
    shares = {k: total * w // wsum for k, w in weights.items()}
    left = total - sum(shares.values())
    rank = {k: i for i, k in enumerate(order)}
    by_remainder = sorted(weights, key=lambda k: (-(total * weights[k] % wsum), rank[k]))
    for k in by_remainder[:left]:
        shares[k] += 1
    return shares


def allocate_self_time(self_ns: int, stack_counts: Dict[Tuple[str, ...], int],
                       period_ns: Optional[int]) -> Dict[Tuple[str, ...], int]:
    """A range's self time split over its sampled stacks, adding up to self_ns exactly.

    Each sample stands for one sampling period; what the samples do not cover goes to
    (UNSAMPLED,). If the samples cover more than the range (sampling jitter), or the period is
    unknown, the time is split in proportion to the sample counts instead.
    """
    if self_ns <= 0:
        return {}
    n = sum(stack_counts.values())
    if n == 0:
        return {(UNSAMPLED,): self_ns}
    order = sorted(stack_counts)
    if period_ns and n * period_ns < self_ns:
        out = {k: c * period_ns for k, c in stack_counts.items()}
        out[(UNSAMPLED,)] = self_ns - n * period_ns
        return out
    return split_exact(self_ns, stack_counts, order)


def _when(nodes, steps: List[int], time_ns: int) -> str:
    if not steps or time_ns < nodes[steps[0]].start_ns:
        return "before the first step"
    return "after the last step" if time_ns > nodes[steps[-1]].end_ns else "between steps"


def _attribute_samples(nodes, segments, samples, main, period, outside: Counter,
                       steps: List[int], outside_when: Counter) -> None:
    ranged_threads = set(segments)
    per_range: Dict[int, Counter] = defaultdict(Counter)   # stack -> samples
    stack_lib: Dict[Tuple[str, ...], str] = {}
    for s in samples:
        key = (s.pid, s.tid)
        lib = sample_library(s.frames)
        if key in ranged_threads:
            idx = _innermost(segments, key, s.time_ns)
            if idx is None:
                outside[lib] += 1
                outside_when[_when(nodes, steps, s.time_ns)] += 1
                continue
            stack = tuple(frame_label(f) for f in reversed(s.frames))
            stack_lib[stack] = lib
            per_range[idx][stack] += 1
            node = nodes[idx]
            node.samples += 1
            if s.frames:
                node.functions[(frame_label(s.frames[0]), lib)] += 1
        else:
            # A thread without ranges (an OpenMP or BLAS worker) works for whatever the main
            # thread is in at that moment: counted there, apart from the main thread's time.
            idx = _innermost(segments, main, s.time_ns) if s.pid == main[0] else None
            if idx is None:
                outside[lib] += 1
                outside_when[_when(nodes, steps, s.time_ns)] += 1
            else:
                nodes[idx].worker_samples[lib] += 1
    for node in nodes:
        counts = per_range.get(node.index, {})
        node.cpu_stacks_ns = allocate_self_time(node.self_ns, dict(counts), period)
        libs: Dict[str, int] = defaultdict(int)
        for stack, ns in node.cpu_stacks_ns.items():
            libs[stack_lib.get(stack, UNSAMPLED)] += ns
        node.cpu_library_ns = dict(libs)


# ----------------------------------------------------------------------------- GPU

def _attribute_gpu(nodes, segments, activities, main) -> List[GpuActivity]:
    outside = []
    for a in activities:
        idx = None
        if a.launch_start_ns is not None:
            key = (a.pid, a.launch_tid)
            if key not in segments and a.pid == main[0]:
                key = main    # launched from a thread without ranges: the main thread's range
            idx = _innermost(segments, key, a.launch_start_ns)
        if idx is None:
            outside.append(a)
        else:
            nodes[idx].gpu.append(a)
    return outside


def attribute(capture: Capture) -> Attribution:
    """Every range of the capture with its CPU samples and GPU work attributed."""
    warnings: List[str] = []
    nodes, steps, main = build_ranges(capture.ranges, capture.thread_names, warnings)
    segments = _self_segments(nodes)
    period = sampling_period_ns(capture.samples)
    outside_samples: Counter = Counter()
    outside_when: Counter = Counter()
    _attribute_samples(nodes, segments, capture.samples, main, period, outside_samples, steps,
                       outside_when)
    outside_gpu = _attribute_gpu(nodes, segments, capture.gpu, main)
    negative = sum(1 for n in nodes if n.self_ns < 0)
    if negative:
        warnings.append(f"{negative} range(s) have children longer than themselves; their "
                        f"self time counts as 0")
    return Attribution(nodes, steps, main, period, outside_samples, outside_gpu,
                       list(capture.gpu), warnings, outside_when)


def to_timeline(attribution: Attribution, warmup: int = 0) -> Timeline:
    """Our ranges as a profiler Timeline (host tracks named by thread), the first ``warmup``
    steps numbered -1 as the profiler numbers them, so profiler.analysis applies unchanged."""
    tl = Timeline()
    for n in attribution.ranges:
        if n.kind not in ("step", "phase", "layer"):
            continue
        step = -1 if n.step is None or n.step < warmup else n.step - warmup
        tl.add(Range(n.name, n.kind, n.start_ns, n.end_ns, f"host:{n.thread}", step,
                     n.direction))
    return tl
