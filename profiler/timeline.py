"""The profiler's one record of what ran when: ranges on tracks, nested as they ran.

Instrumentation (profiler.instrument_*) produces a :class:`Timeline`; every analysis
(profiler.analysis.*) is a pure function of one. Nothing here knows about frameworks,
NVTX or reports.

Times are integer nanoseconds on one clock per track: ``host:<thread>`` tracks use the host's
``time.perf_counter_ns``; ``device:<stream>`` tracks hold GPU time from events, shifted onto the
host clock at one anchor point per step so both tracks line up in a trace viewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

# The eight phases of a training step; their means add up to the mean step time.
PHASES = ("data_wait", "h2d", "forward", "loss_forward", "loss_backward", "backward",
          "optimizer", "other")
# Phases only some runs have, listed in a report only where measured, shown before "other":
# - "communication": the time a distributed step waits for its gradient all-reduce after the
#   backward computation is done (DistributedDataParallel);
# - "compiled_step": a graph-mode step that is one call (TensorFlow's tf.function: forward,
#   loss, backward and the optimizer's update inside it, none of them a phase of its own).
OPTIONAL_PHASES = ("communication", "compiled_step")


def phases_of(phases_ms) -> tuple:
    """The phases ``phases_ms`` (a report's, or any collection of phase names) holds, in
    display order: PHASES, any optional phase before "other"."""
    order = PHASES[:-1] + OPTIONAL_PHASES + PHASES[-1:]
    return tuple(p for p in order if p in phases_ms)


@dataclass(frozen=True)
class Range:
    """One timed range.

    kind: "step" (a whole training step), "phase" (name is one of PHASES), "layer" (name is
    the layer's name in the model, direction says which pass) or "mark" (anything else, e.g. a
    framework op when a trace is imported).
    """
    name: str
    kind: str
    start_ns: int
    end_ns: int
    track: str = "host:main"
    step: int = -1                    # training step index; -1 outside the measured steps
    direction: Optional[str] = None   # "forward" | "backward" for kind == "layer"
    layer_type: Optional[str] = None  # e.g. "Conv2d", for kind == "layer"

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


@dataclass
class Timeline:
    """Every range recorded during one run, in no particular order."""
    ranges: List[Range] = field(default_factory=list)

    def add(self, r: Range) -> None:
        if r.end_ns < r.start_ns:
            raise ValueError(f"Timeline.add: range {r.name!r} ends ({r.end_ns}) before it "
                             f"starts ({r.start_ns})")
        self.ranges.append(r)

    def tracks(self) -> List[str]:
        return sorted({r.track for r in self.ranges})

    def on_track(self, track: str) -> List[Range]:
        """The track's ranges, sorted by start, outer before inner at equal starts."""
        return sorted((r for r in self.ranges if r.track == track),
                      key=lambda r: (r.start_ns, -r.end_ns))
