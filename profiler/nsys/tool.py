"""Nsight Systems, the tool: find ``nsys``, run a command under ``nsys profile`` with the flags
for the device, export the report to SQLite.

Running nsys only: reading and analysing a capture is the rest of profiler.nsys (nothing here
imports it, and it calls this module only to export a .nsys-rep).

Where nsys is looked for, in order (``find_nsys``): the ``NSYS`` environment variable (a binary
or a folder holding one; set but wrong is an error, not a fall-through), ``PATH``, then the
usual install places: Debian's /usr/lib/nsight-systems, NVIDIA's /opt/nvidia/nsight-systems*
(and the nsys that Nsight Compute ships under /opt/nvidia/nsight-compute*), and the CUDA
toolkit's ($CUDA_HOME, /usr/local/cuda*: bin/ and nsight-systems-*/bin/); newest version first
within one place.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]

INSTALL_HINT = ("install it with `make nsys` (as root, Debian bookworm: Debian's nsight-systems "
                "package, scripts/install_nsys.sh), or point the NSYS environment variable at an "
                "nsys binary")

# The usual install places, as glob patterns under ``prefix`` (tests use a fake root).
INSTALL_PLACES = (
    "/usr/lib/nsight-systems/bin/nsys",                                  # Debian, Ubuntu
    "/usr/lib/x86_64-linux-gnu/nsight-systems/target-linux-x64/nsys",    # Debian's target half
    "/opt/nvidia/nsight-systems*/bin/nsys",                              # NVIDIA .run/.deb
    "/opt/nvidia/nsight-systems*/*/bin/nsys",                            # .../<version>/bin
    "/opt/nvidia/nsight-systems*/*/target-linux-x64/nsys",
    "/opt/nvidia/nsight-compute/*/host/target-linux-x64/nsys",           # Nsight Compute's copy
    "/usr/local/cuda*/bin/nsys",                                         # CUDA toolkit
    "/usr/local/cuda*/nsight-systems-*/bin/nsys",
)

# nsys profile flags per device. CPU: our NVTX ranges, OS runtime calls, CPU samples with DWARF
# call stacks (frame pointers are missing in most native libraries); context switches off (they
# add nothing the samples do not give, and make the capture larger). GPU: the same plus CUDA
# (runtime calls and kernels, joined by correlation id).
PROFILE_FLAGS = {
    "cpu": ["-t", "nvtx,osrt", "-s", "cpu", "--backtrace=dwarf", "--cpuctxsw=none"],
    "cuda": ["-t", "nvtx,cuda,osrt", "-s", "cpu", "--backtrace=dwarf", "--cpuctxsw=none"],
}
# Without CPU sampling (``capture(..., sample_cpu=False)``): the device README notes that the
# GPU machine's nsys 2025.3 wrote a 2 GB stream and no report with sampling on.
NO_SAMPLING_FLAGS = ["-s", "none", "--cpuctxsw=none"]


class NsysNotFound(RuntimeError):
    """No usable nsys; the message says where it looked and how to install it."""


class NsysFailed(RuntimeError):
    """nsys ran and did not produce what was asked (no report, no export); the message holds
    the command and the end of its output."""


def _is_executable(path: PathLike) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _version_key(path: str):
    # Newest first within one glob: compare the numbers in the path, as numbers.
    return [int(n) for n in re.findall(r"\d+", path)]


def find_nsys(*, environ: Optional[Mapping[str, str]] = None, search_path: Optional[str] = None,
              prefix: str = "") -> str:
    """The nsys binary to use (an absolute path). ``environ`` (default os.environ) gives NSYS,
    PATH and CUDA_HOME/CUDA_PATH; ``search_path`` overrides PATH; ``prefix`` is prepended to the
    usual install places (tests).

    Raises NsysNotFound naming where it looked and how to install nsys; NSYS set to something
    that is not an nsys binary (or a folder with bin/nsys or nsys) is that error too.
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get("NSYS")
    if explicit:
        candidates = [explicit, os.path.join(explicit, "nsys"),
                      os.path.join(explicit, "bin", "nsys")]
        for candidate in candidates:
            if _is_executable(candidate):
                return os.path.abspath(candidate)
        raise NsysNotFound(f"NSYS: expected an nsys binary or a folder holding bin/nsys, got "
                           f"{explicit!r} (no executable there); unset it to search PATH and the "
                           f"usual places, or {INSTALL_HINT}")
    on_path = shutil.which("nsys", path=environ.get("PATH", os.defpath) if search_path is None
                           else search_path)
    if on_path:
        return os.path.abspath(on_path)
    patterns = [prefix + place for place in INSTALL_PLACES]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        root = environ.get(variable)
        if root:
            patterns += [os.path.join(root, "bin", "nsys"),
                         os.path.join(root, "nsight-systems-*", "bin", "nsys")]
    for pattern in patterns:
        for candidate in sorted(glob.glob(pattern), key=_version_key, reverse=True):
            if _is_executable(candidate):
                return os.path.abspath(candidate)
    raise NsysNotFound("Nsight Systems (nsys) was not found: not in NSYS, not on PATH, not in "
                       + ", ".join(patterns) + f"; {INSTALL_HINT}")


def profile_command(nsys: str, command: Sequence[str], output: PathLike, *, device: str = "cpu",
                    sample_cpu: bool = True, extra_args: Sequence[str] = ()) -> List[str]:
    """The ``nsys profile`` command line that captures ``command`` into ``output``.nsys-rep."""
    if device not in PROFILE_FLAGS:
        raise ValueError(f"device: expected one of {sorted(PROFILE_FLAGS)}, got {device!r}")
    if not command:
        raise ValueError("command: expected the program to profile and its arguments, got "
                         "nothing")
    flags = list(PROFILE_FLAGS[device])
    if not sample_cpu:
        flags = flags[:2] + NO_SAMPLING_FLAGS
    return [nsys, "profile", *flags, *extra_args, "-o", str(output), "--force-overwrite=true",
            *command]


def _tail(text: str, chars: int = 2000) -> str:
    text = (text or "").strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def capture(command: Sequence[str], output: PathLike, *, device: str = "cpu",
            sample_cpu: bool = True, extra_args: Sequence[str] = (), nsys: Optional[str] = None,
            env: Optional[Mapping[str, str]] = None, cwd: Optional[PathLike] = None,
            quiet: bool = False, timeout_s: Optional[float] = None) -> "tuple[Path, int]":
    """Runs ``command`` under ``nsys profile`` (flags: PROFILE_FLAGS[device]) and returns
    (the .nsys-rep written, the command's exit status).

    ``output`` is the report path with or without ``.nsys-rep``; an existing one is replaced.
    The command's own output passes through unless ``quiet``. Raises NsysNotFound (no nsys),
    NsysFailed (nsys wrote no report: its output is in the message; or it ran past
    ``timeout_s``: then nsys and its agent are stopped). nsys 2022.4 here sometimes never ends
    after the profiled process has exited (its agent spins); ``timeout_s`` bounds that.
    """
    nsys = nsys or find_nsys()
    output = Path(output)
    if output.suffix == ".nsys-rep":
        output = output.with_suffix("")
    output.parent.mkdir(parents=True, exist_ok=True)
    report = output.with_name(output.name + ".nsys-rep")
    if report.exists():
        report.unlink()    # a stale report must not pass for this capture's
    cmd = profile_command(nsys, command, output, device=device, sample_cpu=sample_cpu,
                          extra_args=extra_args)
    proc = subprocess.Popen(cmd, env=None if env is None else dict(env), cwd=cwd, text=True,
                            stdout=subprocess.PIPE if quiet else None,
                            stderr=subprocess.PIPE if quiet else None)
    # A SIGTERM (timeout(1), a CI runner, a batch system) must stop nsys and its agent too:
    # the agent runs detached and, left behind, spins on a core for good.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise NsysFailed(f"nsys profile ran past timeout_s={timeout_s} s and was stopped (nsys "
                         f"2022.4 sometimes never finishes after the profiled process exits; "
                         f"run it again): {' '.join(cmd)}") from None
    except BaseException:       # Ctrl-C, SIGTERM: stop what was started, then go on failing
        _stop(proc)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    proc.stdout, proc.stderr = stdout, stderr
    if not report.exists():
        left = sorted(p.name for p in output.parent.glob(output.name + ".*"))
        raise NsysFailed(f"nsys profile wrote no {report} (exit status {proc.returncode}; files "
                         f"left: {left or 'none'}; a lone .qdstrm means nsys did not find its "
                         f"QdstrmImporter: see scripts/install_nsys.sh): {' '.join(cmd)}"
                         + (f"\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}" if quiet else ""))
    return report, proc.returncode


class Terminated(SystemExit):
    """SIGTERM arrived while nsys ran (raised after nsys and its agent were stopped)."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()
    _stop_agent(proc.pid)


def _stop_agent(nsys_pid: int) -> None:
    """Stops the agent that ``nsys profile`` (pid ``nsys_pid``) started: it runs detached, with
    the profile's pid at the end of its session name, and outlives a killed nsys."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--start-agent" in args and any(
                a.startswith(b"--session-name=profile-") and a.endswith(b"-%d" % nsys_pid)
                for a in args):
            try:
                os.kill(int(entry.name), 9)
            except OSError:
                pass


def export_sqlite(report: PathLike, sqlite: Optional[PathLike] = None, *,
                  nsys: Optional[str] = None) -> Path:
    """Exports the .nsys-rep ``report`` to SQLite (default: beside it, suffix .sqlite, replaced
    if there) and returns its path. Raises FileNotFoundError for a missing report, NsysNotFound,
    NsysFailed (nsys exported nothing: its output is in the message)."""
    report = Path(report)
    if not report.is_file():
        raise FileNotFoundError(f"report: expected an nsys report (.nsys-rep), got {str(report)!r}"
                                f" (no such file)")
    sqlite = Path(sqlite) if sqlite is not None else report.with_suffix(".sqlite")
    nsys = nsys or find_nsys()
    if sqlite.exists():
        sqlite.unlink()    # nsys refuses to overwrite in some versions, even with -f
    cmd = [nsys, "export", "--type", "sqlite", "--force-overwrite", "true", "-o", str(sqlite),
           str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not sqlite.is_file():
        raise NsysFailed(f"nsys export wrote no {sqlite} (exit status {proc.returncode}): "
                         f"{' '.join(cmd)}\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}")
    return sqlite


__all__ = ["INSTALL_HINT", "INSTALL_PLACES", "PROFILE_FLAGS", "NsysNotFound", "NsysFailed",
           "find_nsys", "profile_command", "capture", "export_sqlite"]
