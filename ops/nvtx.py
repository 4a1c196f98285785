"""NVTX start/end ranges in domain "deepprof" through the NVTX C API (csrc/nvtx_ranges.cpp).

The profiler (profiler/recorder.py) emits its ranges through this module: the C API's ranges are
recorded by every Nsight Systems we target, the ``nvtx`` Python package's are not by nsys 2022.4.
Each (message, colour) is registered once (prebuilt event attributes in the C shim); a range
then costs one dictionary lookup and one call into ops._C. Without a tool
attached a range start returns 0 and costs a few hundred nanoseconds in all.

This module knows nothing about the profiler; ``built()`` is False where ops._C was compiled
without the nvtx3 headers, and the caller chooses its fallback.
"""

from __future__ import annotations

from typing import Dict, Tuple

from . import _C

DOMAIN = _C.NVTX_DOMAIN

# The colours the profiler names, as 0xAARRGGBB (the nvtx package's names for them).
COLOURS: Dict[str, int] = {
    "white": 0xFFFFFFFF, "grey": 0xFF808080, "cyan": 0xFF00FFFF, "green": 0xFF008000,
    "yellow": 0xFFFFFF00, "orange": 0xFFFFA500, "red": 0xFFFF0000, "purple": 0xFF800080,
    "black": 0xFF000000, "blue": 0xFF0000FF, "lime": 0xFF00FF00, "magenta": 0xFFFF00FF,
}

_events: Dict[Tuple[str, str], int] = {}


def built() -> bool:
    """True when ops._C emits NVTX through the C API (it was built with the nvtx3 headers)."""
    return bool(_C.nvtx_built())


def colour_argb(colour: str) -> int:
    """The ARGB value of a colour name of COLOURS, or of a '#RRGGBB' string."""
    if colour in COLOURS:
        return COLOURS[colour]
    if isinstance(colour, str) and len(colour) == 7 and colour.startswith("#"):
        try:
            return 0xFF000000 | int(colour[1:], 16)
        except ValueError:
            pass
    raise ValueError(f"colour: expected one of {sorted(COLOURS)} or '#RRGGBB', got {colour!r}")


def register(message: str, colour: str = "blue") -> int:
    """The event index of (``message``, ``colour``), registered once: what C code starting
    ranges itself takes (csrc/engine_marks.cpp). Raises RuntimeError where not built()."""
    event = _events.get((message, colour))
    if event is None:
        if not isinstance(message, str):
            raise TypeError(f"message: expected a str, got {type(message).__name__}")
        # A race between two threads registering the same pair is harmless: the shim returns
        # the same index for the same pair.
        event = _events[(message, colour)] = _C.nvtx_register(message, colour_argb(colour))
    return event


def start_range(message: str, colour: str = "blue") -> int:
    """Starts a range named ``message`` on the calling thread; returns its id for end_range
    (which may be called from another thread). Raises RuntimeError where not built()."""
    event = _events.get((message, colour))
    return _C.nvtx_range_start(register(message, colour) if event is None else event)


def end_range(range_id: int) -> None:
    """Ends the range ``range_id`` returned by start_range."""
    _C.nvtx_range_end(range_id)


__all__ = ["DOMAIN", "COLOURS", "built", "colour_argb", "register", "start_range",
           "end_range"]
