"""The one exception the capture reader raises for input it cannot use.

A ValueError subclass, so callers that already catch bad input (the CLI) catch this too.
"""

from __future__ import annotations


class ProfilerNsysError(ValueError):
    """An Nsight Systems capture that cannot be read or holds none of our ranges; the message
    names the file, what was expected and what was found."""
