"""What the command-line tools (the profiler, the experiments, the benchmarks) share besides
their tables: argument types, a progress bar for long runs, one-line errors on stderr. Nothing
here measures or writes files."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, unless its help already says it or there is none
    to say (None, off, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == [] \
                or default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def output_dir(text: str) -> Path:
    """argparse type: a folder this process can create and write in (checked now, before the
    run: profiler.environment.check_output_dir)."""
    from profiler.environment import check_output_dir
    try:
        return check_output_dir(text, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def output_file(text: str) -> Path:
    """argparse type: a file path whose folder this process can create and write in."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path, got the folder {text!r}")
    output_dir(str(path.parent))
    return path


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    value = non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def stderr_console():
    """A rich console on stderr (tables and JSON go to stdout)."""
    from rich.console import Console
    return Console(stderr=True)


def error_line(message: str) -> None:
    """One plain ``error: ...`` line on stderr (plain: rich would fold a long line and read
    ":factory:" in a path as an emoji)."""
    print(f"error: {message}", file=sys.stderr)


class Progress:
    """A rich progress bar that appears only once a run has taken a few seconds; called as
    ``progress(done, total)`` (the engine's progress callback)."""

    def __init__(self, label: str, enabled: bool = True, after_s: float = 3.0):
        self.label, self.enabled, self.after_s = label, enabled, after_s
        self.began, self.bar = time.monotonic(), None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None and time.monotonic() - self.began > self.after_s:
            from rich.progress import Progress as Bar
            self.bar = Bar(transient=True, console=stderr_console())
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
