"""What a profiling run sets up around the engine, the same for the CLI, the experiments and
the benchmarks: the CPU thread count (set before the framework starts) and what each pool then
used, output folders checked before any work is done, and py-spy recording this process.

Nothing here measures or reports; it prints only the warnings it is asked to give.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

from ops.threads import set_cpu_threads, thread_report


def use_threads(threads: int, frameworks: Sequence[str], notes: List[str]) -> None:
    """``threads`` for the frameworks' intra-op pools, the BLAS/OpenMP libraries and our
    kernels (ops.threads.set_cpu_threads), before the frameworks run anything; what a
    framework refused goes to ``notes`` instead of a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # returned, and noted instead
        refused = set_cpu_threads(threads, list(frameworks))
    notes += [f"threads: {problem}" for problem in refused]


def _warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def threads_section(threads: int, framework: str, notes: List[str],
                    warn: Callable[[str], None] = _warn_on_stderr) -> Dict[str, object]:
    """A report's ``threads``: what each pool of ``framework`` used (ops.threads.
    thread_report); any pool that did not take ``threads`` is a note and a warning, so a
    figure is never silently measured at another thread count."""
    report = thread_report(framework, threads)
    if report["ignored"]:
        message = (f"threads: asked for {threads}, but these did not take it: "
                   f"{', '.join(report['ignored'])} (report.json 'threads' has the counts)")
        notes.append(message)
        warn(f"{framework}: {message}")
    return report


def check_output_dir(path: Union[str, os.PathLike], argument: str = "--out", *,
                     shared: bool = False) -> Path:
    """Checks, before a run starts, that ``path`` is a folder this process can create and
    write files in; else one ValueError naming ``argument``, the path and why. It is tried,
    not inferred (os.access says yes to root under /proc): folders made for the try are
    removed again, so a run refused later leaves nothing behind, unless ``shared`` (several
    processes check the same folder at once, as torchrun's ranks do: one removing it would
    pull it from under another's try)."""
    out = Path(path)
    missing = [] if shared else [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        where = f"{argument}: " if argument else ""
        raise ValueError(f"{where}expected a folder this process can create and write in, got "
                         f"{str(path)!r} ({reason})") from None
    finally:
        for made in missing:              # deepest first
            try:
                made.rmdir()
            except OSError:
                break
    return out


@contextlib.contextmanager
def pyspy_recording(out: Path, notes: List[str], *, enabled: bool = True,
                    rate_hz: int = 200) -> Iterator[Optional[Path]]:
    """While the block runs, py-spy records this process into ``out/pyspy.svg`` (a flame
    graph of its Python and native frames). py-spy missing or failing to attach is a note,
    not an error: the profile is still the run's result. Yields the SVG's path (None when
    nothing records)."""
    if not enabled:
        yield None
        return
    exe = shutil.which("py-spy")
    if exe is None:
        notes.append("--pyspy: py-spy not found on PATH; no Python flame graph recorded.")
        yield None
        return
    target = Path(out) / "pyspy.svg"
    proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--output",
                             str(target), "--format", "flamegraph", "--rate", str(rate_hz)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)            # py-spy attaches asynchronously
    if proc.poll() is not None:
        notes.append(f"--pyspy: py-spy exited at start: "
                     f"{proc.stderr.read().decode(errors='replace').strip()[-300:]}")
        yield None
        return
    try:
        yield target
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        notes.append(f"--pyspy: Python flame graph in {target.name}" if target.exists()
                     else "--pyspy: py-spy wrote no flame graph")
