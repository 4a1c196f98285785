"""One long-lived process per framework, driven over JSON lines, so a study can interleave
rounds across frameworks while each framework keeps a process of its own (frameworks' thread
pools and allocators interfere when they share one).

The worker (``python -m experiments.workers --framework torch --threads 2``) sets the thread
count before its framework starts, then answers one JSON line on stdout for every JSON line on
stdin. Requests (``cmd`` and its fields):

=============  ========================================================  ==================
cmd            fields                                                    answer
=============  ========================================================  ==================
hello          -                                                         framework, version,
                                                                         pid, threads
build          name, config (WorkloadConfig fields, ``mode`` and         parameters,
               ``xla`` included), steps_needed                           unavailable, mode,
                                                                         step_calls
set_impls      name, conv and/or loss                                    -
steps          name, n, mode: "plain" (uninstrumented train steps),      step_ms, losses,
               "instrumented" (every phase timed), "forward_backward"    phases_ms,
               (forward + loss + backward, no optimizer, no data         compile_count
               loading)
drop           name                                                      -
quit           -                                                         -
=============  ========================================================  ==================

Every answer has ``ok``; a failed request answers ``{"ok": false, "error": "..."}`` naming the
field, what was expected and what came, and the worker keeps serving.

Two request fields are both called "mode": a build's ``config["mode"]`` is the workload's
execution mode ("eager" or "graph", profiler.workloads.base), a ``steps`` request's ``mode`` is
what kind of steps to time. A build in graph mode that the framework has none of (Chainer) is
refused with the reason and ``"mode_unavailable": reason`` in the error answer (the client raises
:class:`ModeUnavailable`), so a study can skip it instead of failing. "forward_backward" needs
the forward, the loss and the backward as separate calls; where the graph-mode step is one
compiled call (TensorFlow: ``step_calls == ["train_step"]``) it is refused, saying so.
``compile_count`` is the workload's count of graphs compiled so far (0 in eager mode): a study
compares it before and after its measured steps to see that nothing recompiled there.

The client side is :class:`Worker` (one process) and :class:`Pool` (one per framework, one
running at a time, waiting after each hand-off until the previous worker's threads, and its
loader processes', have gone idle); :func:`interleaved_rounds` measures each visit's CPU with
experiments.contention.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

from experiments.contention import VisitMeter, tree_ticks
from ops import frameworks
from ops.frameworks import FRAMEWORKS

MODES = ("plain", "instrumented", "forward_backward")
CONFIG_FIELDS = ("model", "device", "batch_size", "seed", "conv_impl", "loss_impl", "workers",
                 "data", "mode", "xla", "augment", "standardize", "dropout", "train_size",
                 "test_size")
# A graph-mode step made of one compiled call (profiler.workloads.base: step_calls).
ONE_CALL = ("train_step",)
REPO = Path(__file__).resolve().parent.parent


class WorkerError(RuntimeError):
    """A request a worker refused or failed, or a worker that died."""


class ThreadSettingIgnored(WorkerError):
    """A worker whose framework or libraries did not take the requested thread count: its
    timings would not be of the machine the study describes, so the pool refuses to start."""


class ModeUnavailable(WorkerError):
    """A build in an execution mode its framework does not have (Chainer in graph mode);
    ``reason`` is the framework's own reason."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class _Refusal(ValueError):
    """A refused request whose error answer carries ``fields`` besides the message."""

    def __init__(self, message: str, **fields):
        super().__init__(message)
        self.fields = fields


# --------------------------------------------------------------------------- worker side

class _Server:
    """The worker's state: its framework's workloads by name, each a profiler.engine.Session
over a seed workload's target."""

    def __init__(self, framework: str, threads: int, device: str):
        from ops.threads import set_cpu_threads, thread_report
        import warnings
        self.framework, self.threads, self.device = framework, threads, device
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # reported in hello instead
            set_cpu_threads(threads, [framework])
        self.thread_report = thread_report
        self.sessions: Dict[str, object] = {}

    def handle(self, request: object) -> Dict[str, object]:
        if not isinstance(request, dict):
            raise ValueError(f"request: expected a JSON object, got {type(request).__name__}")
        cmd = request.get("cmd")
        handler = getattr(self, f"cmd_{cmd}", None) if isinstance(cmd, str) else None
        if handler is None:
            raise ValueError(f"cmd: expected one of hello, build, set_impls, steps, drop, quit, "
                             f"got {cmd!r}")
        return handler(request)

    def cmd_hello(self, request) -> Dict[str, object]:
        return {"framework": self.framework, "version": frameworks.version(self.framework),
                "pid": os.getpid(), "threads": self.thread_report(self.framework, self.threads)}

    def cmd_build(self, request) -> Dict[str, object]:
        from profiler.engine import Session
        from profiler.targets import WorkloadTarget
        from profiler.workloads import WorkloadConfig
        name = _field(request, "name", str)
        config = _field(request, "config", dict)
        unknown = sorted(set(config) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"build: config: expected fields from {list(CONFIG_FIELDS)}, got "
                             f"unknown {unknown}")
        steps_needed = _field(request, "steps_needed", int)
        if steps_needed < 1:
            raise ValueError(f"build: steps_needed: expected an int >= 1, got {steps_needed}")
        config = WorkloadConfig(**{"device": self.device, **config})
        self._drop(name)
        if config.mode == "graph":
            reason = _no_graph_mode(self.framework, config.model)
            if reason:
                raise _Refusal(f"build: config: mode: 'graph' is not available for "
                               f"{self.framework}: {reason}", mode_unavailable=reason)
        target = WorkloadTarget.build(self.framework, config)
        workload = target.workload
        self.sessions[name] = Session(target, steps_needed=steps_needed)
        return {"parameters": workload.parameter_count(),
                # What set_impls refuses here: unavailable_impls plus, in graph mode, kernel.
                "unavailable": {kind: workload.refused_impls(kind) for kind in ("conv", "loss")},
                "mode": workload.mode, "step_calls": list(workload.step_calls)}

    def _session(self, request, cmd: str):
        name = _field(request, "name", str)
        if name not in self.sessions:
            raise ValueError(f"{cmd}: name: expected a built workload "
                             f"({sorted(self.sessions)}), got {name!r}")
        return self.sessions[name]

    def _drop(self, name: str) -> None:
        session = self.sessions.pop(name, None)
        if session is not None:
            session.close()
        gc.collect()

    def cmd_set_impls(self, request) -> Dict[str, object]:
        target = self._session(request, "set_impls").target
        impls = {k: request[k] for k in ("conv", "loss") if request.get(k) is not None}
        if not impls:
            raise ValueError("set_impls: expected 'conv' and/or 'loss', got neither")
        target.workload.set_impls(**impls)
        return {}

    def cmd_steps(self, request) -> Dict[str, object]:
        from profiler.analysis.phases import phase_breakdown
        session = self._session(request, "steps")
        n = _field(request, "n", int)
        if n < 1:
            raise ValueError(f"steps: n: expected an int >= 1, got {n}")
        mode = request.get("mode")
        if mode not in MODES:
            raise ValueError(f"steps: mode: expected one of {list(MODES)}, got {mode!r}")
        workload = session.target.workload
        if mode == "forward_backward" and tuple(workload.step_calls) == ONE_CALL:
            raise ValueError(f"steps: mode: 'forward_backward' times the forward, the loss and "
                             f"the backward as separate calls, but this {self.framework} "
                             f"workload runs in {workload.mode} mode, where the whole step "
                             f"(forward, loss, gradients, update) is one compiled call "
                             f"(step_calls {list(workload.step_calls)}): there is no forward + "
                             f"backward to time apart; time 'plain' steps, or build it in eager "
                             f"mode")
        losses = session.target.losses
        first_loss = len(losses)
        if mode == "instrumented":
            timeline = session.restart()
            step_ms = [session.step() for _ in range(n)]
            breakdown = phase_breakdown(timeline)
            phases_ms = {p: s["samples"] for p, s in breakdown["phases_ms"].items()}
            return {"step_ms": step_ms, "phases_ms": phases_ms, "losses": losses[first_loss:],
                    "compile_count": workload.compile_count()}
        if mode == "plain":
            step_ms = [session.plain_step() for _ in range(n)]
        else:
            session.hooks_off()
            step_ms = [_forward_backward_ms(session) for _ in range(n)]
        return {"step_ms": step_ms, "losses": losses[first_loss:],
                "compile_count": workload.compile_count()}

    def cmd_drop(self, request) -> Dict[str, object]:
        self._session(request, "drop")
        self._drop(request["name"])
        return {}

    def cmd_quit(self, request) -> Dict[str, object]:
        return {}


def _forward_backward_ms(session) -> float:
    """Forward, loss and backward of one batch already on the device: the published
    "forward + backward time of loss-plus-network" (no optimizer, no data loading)."""
    w = session.target.workload
    batch = w.to_device(session.next_batch())
    w.synchronize()
    began = time.perf_counter_ns()
    loss = w.loss_forward(w.forward(batch), batch)
    w.backward(loss)
    w.synchronize()
    elapsed_ms = (time.perf_counter_ns() - began) / 1e6
    session.target.losses.append(w.loss_value(loss))
    return elapsed_ms


def _no_graph_mode(framework: str, model: str) -> Optional[str]:
    """Why ``framework``'s workloads have no graph mode (their class's ``no_graph_mode``,
    profiler.workloads.base), or None where they have one."""
    kind = "deeppose" if model == "deeppose" else "resnet"
    module = importlib.import_module(f"profiler.workloads.{framework}.{kind}")
    return getattr(module.Workload, "no_graph_mode", None)


def _field(request: dict, key: str, kind: type):
    value = request.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{request.get('cmd')}: {key}: expected {kind.__name__}, got "
                         f"{type(value).__name__} {value!r}")
    return value


def serve(framework: str, threads: int, device: str) -> int:
    """The worker loop: one JSON answer line per JSON request line, until quit or EOF."""
    # Frameworks print to stdout; keep the protocol's channel private and send the rest of
    # fd 1 to stderr.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    try:
        server = _Server(framework, threads, device)
    except Exception as e:
        channel.write(json.dumps({"ok": False, "error": f"start-up: {type(e).__name__}: {e}"})
                      + "\n")
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError as e:
            request = None
            answer = {"ok": False, "error": f"request: expected one JSON object per line, got "
                                            f"{line.strip()[:80]!r} ({e})"}
        else:
            try:
                answer = {"ok": True, **server.handle(request)}
            except Exception as e:
                # A refusal reads as the ValueError it is, its fields beside the message.
                kind = "ValueError" if isinstance(e, _Refusal) else type(e).__name__
                answer = {"ok": False, "error": f"{kind}: {e}", **getattr(e, "fields", {})}
        channel.write(json.dumps(answer) + "\n")
        if isinstance(request, dict) and request.get("cmd") == "quit" and answer["ok"]:
            break
    channel.close()
    # Frameworks' atexit handlers can hang (MXNet's engine with queued Python work); the
    # answers are out, nothing is left to save.
    os._exit(0)


# --------------------------------------------------------------------------- client side

class Worker:
    """One framework's worker process; ``call`` sends a request and returns its answer, or
    raises WorkerError with the worker's error (and the tail of its log if it died)."""

    def __init__(self, framework: str, *, threads: int, device: str = "cpu",
                 log: Optional[Path] = None, python: str = sys.executable):
        if framework not in FRAMEWORKS:
            raise ValueError(f"Worker: framework: expected one of {list(FRAMEWORKS)}, got "
                             f"{framework!r}")
        self.framework = framework
        self.log_path = Path(log) if log else None
        log_file = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        self.proc = subprocess.Popen(
            [python, "-m", "experiments.workers", "--framework", framework, "--threads",
             str(threads), "--device", device],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
            cwd=REPO, env=env, bufsize=1)
        if log_file is not subprocess.DEVNULL:
            log_file.close()
        self.pid = self.proc.pid

    def call(self, cmd: str, **fields) -> Dict[str, object]:
        """Sends {"cmd": cmd, **fields}; returns the answer (without ``ok``)."""
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.framework} worker: exited ({self.proc.returncode}) "
                              f"before {cmd}: {self._log_tail()}")
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass   # the worker died; readline says so below
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise WorkerError(f"{self.framework} worker: exited ({self.proc.returncode}) "
                              f"during {cmd}: {self._log_tail()}")
        answer = json.loads(line)
        if not answer.pop("ok", False):
            message = f"{self.framework} worker: {cmd}: {answer.get('error')}"
            if answer.get("mode_unavailable"):
                raise ModeUnavailable(message, answer["mode_unavailable"])
            raise WorkerError(message)
        return answer

    def close(self) -> None:
        """Asks the worker to quit; kills it if it does not within 30 s."""
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (WorkerError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def peak_rss_mib(self) -> Optional[float]:
        """The worker's peak resident memory so far (VmHWM), in MiB; None if unreadable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _log_tail(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace").strip()[-800:]
        return "(no log)"


def wait_until_idle(worker: Worker, *, window_s: float = 0.05, max_s: float = 2.0) -> float:
    """Waits until ``worker`` and its descendants have used no CPU for one ``window_s`` (its
    OpenMP threads spin for a while after their last work: GOMP_SPINCOUNT, KMP_BLOCKTIME, and
    so do its data-loader processes' threads), at most ``max_s``. Returns the seconds waited,
    which the studies record."""
    began = time.monotonic()
    try:
        before = tree_ticks(worker.pid)
        while time.monotonic() - began < max_s:
            time.sleep(window_s)
            after = tree_ticks(worker.pid)
            if after == before:
                break
            before = after
    except (OSError, IndexError, ValueError):   # the worker is gone: nothing to wait for
        pass
    return time.monotonic() - began


class Pool:
    """One worker per framework; ``use(framework)`` returns it, after waiting for the worker
    used before (if another) to go idle, so one framework's spinning threads never take the
    next one's cores. The waits are kept in ``settle_s``."""

    def __init__(self, frameworks: List[str], *, threads: int, device: str,
                 log_dir: Optional[Path] = None):
        self.workers: Dict[str, Worker] = {}
        self.hello: Dict[str, Dict[str, object]] = {}
        self.settle_s: List[float] = []
        self.last: Optional[str] = None
        self.threads, self.device, self.log_dir = threads, device, log_dir
        try:
            for framework in frameworks:
                self.start(framework)
        except BaseException:
            self.close()
            raise

    def start(self, framework: str) -> Dict[str, object]:
        """Starts ``framework``'s worker (one at a time: imports are CPU-heavy) and returns
        its hello. Raises ThreadSettingIgnored (the worker stopped) if any of its thread pools
        did not take ``threads``."""
        log = self.log_dir / f"worker-{framework}.log" if self.log_dir else None
        worker = Worker(framework, threads=self.threads, device=self.device, log=log)
        self.workers[framework] = worker
        self.hello[framework] = worker.call("hello")
        report = self.hello[framework]["threads"]
        if report.get("ignored"):
            counts = pool_counts(report)
            pools = ", ".join(f"{name} runs {counts.get(name, 'an unreported count')}"
                              for name in report["ignored"])
            self.stop(framework)
            raise ThreadSettingIgnored(f"{framework} worker: threads: requested "
                                       f"{self.threads} for every pool, but {pools}")
        return self.hello[framework]

    def effective_threads(self) -> Dict[str, Dict[str, int]]:
        """{framework: {pool: threads}}: every pool each worker reported at start-up
        (intra_op, inter_op where the framework has it, and each BLAS, OpenMP and our own
        kernels' library), named as in the report's "ignored", for the studies to record."""
        return {framework: pool_counts(hello["threads"])
                for framework, hello in self.hello.items()}

    def stop(self, framework: str) -> None:
        """Ends ``framework``'s worker (to free its memory)."""
        worker = self.workers.pop(framework, None)
        if worker is not None:
            worker.close()
        if self.last == framework:
            self.last = None

    def use(self, framework: str) -> Worker:
        if framework not in self.workers:
            raise ValueError(f"Pool.use: framework: expected one of {sorted(self.workers)}, "
                             f"got {framework!r}")
        if self.last is not None and self.last != framework:
            self.settle_s.append(wait_until_idle(self.workers[self.last]))
        self.last = framework
        return self.workers[framework]

    def settle_summary(self) -> Dict[str, float]:
        """How long hand-offs waited for the previous worker to go idle."""
        if not self.settle_s:
            return {"handoffs": 0}
        ordered = sorted(self.settle_s)
        return {"handoffs": len(ordered), "median_s": ordered[len(ordered) // 2],
                "max_s": ordered[-1]}

    def peak_rss_mib(self) -> Dict[str, Optional[float]]:
        """Each live worker's peak resident memory, in MiB."""
        return {f: w.peak_rss_mib() for f, w in self.workers.items()}

    def close(self) -> None:
        for framework in list(self.workers):
            self.stop(framework)

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pool_counts(report: Dict[str, object]) -> Dict[str, int]:
    """ops.threads.thread_report's counts flattened under the names its "ignored" uses:
    intra_op, inter_op, ours:<library>, blas:<library>, openmp:<library>."""
    counts = {kind: report[kind] for kind in ("intra_op", "inter_op")
              if report.get(kind) is not None}
    for kind in ("ours", "blas", "openmp"):
        counts.update({f"{kind}:{name}": n for name, n in report.get(kind, {}).items()})
    return counts


@dataclass(frozen=True)
class Cell:
    """One thing a round measures: a built workload (``workload``, the name it was built
    under) with ``impls`` set first (None: as it is); ``key`` names it in the samples."""
    key: str
    workload: str
    impls: Optional[Dict[str, str]] = None


def interleaved_rounds(pool: Pool, cells: Dict[str, List[Cell]], *, rounds: int, steps: int,
                       mode: str, on_round: Optional[Callable[[int, dict], None]] = None
                       ) -> Dict[str, Dict[str, List[dict]]]:
    """Measures every cell of ``cells[framework]`` once per round. The frameworks' order and
    the order of each framework's cells follow balanced_order: over each of its periods every
    framework (cell) takes every position equally often and follows every other one equally
    often, so drift and what one leaves behind for the next (spinning threads, caches) hit
    every cell alike; use a multiple of stats.balanced_period rounds for the full balance.
    Each visit sets the cell's impls, then runs ``steps`` steps of ``mode``, measured by a
    contention.VisitMeter. Returns {framework: {cell key: [one answer per round]}} (answers
    as the worker's ``steps``, plus the visit's CPU under "cpu": wall_s, worker_cpu_s,
    others_cpu_s, worker_utilization, others_cores; contention.round_contention reads them),
    and calls ``on_round(r, samples_so_far)`` after every round, so a caller can save what was
    measured before a later round fails."""
    from profiler.analysis.stats import balanced_order
    samples: Dict[str, Dict[str, List[dict]]] = {f: {c.key: [] for c in framework_cells}
                                                 for f, framework_cells in cells.items()}
    framework_orders = balanced_order(list(cells), rounds)
    cell_orders = {f: balanced_order([c.key for c in framework_cells], rounds)
                   for f, framework_cells in cells.items()}
    meter = VisitMeter()
    for r in range(rounds):
        for framework in framework_orders[r]:
            worker = pool.use(framework)
            by_key = {c.key: c for c in cells[framework]}
            for key in cell_orders[framework][r]:
                cell = by_key[key]
                meter.start(worker.pid)
                if cell.impls:
                    worker.call("set_impls", name=cell.workload, **cell.impls)
                answer = worker.call("steps", name=cell.workload, n=steps, mode=mode)
                answer["cpu"] = meter.stop(pool.threads)
                samples[framework][key].append(answer)
        if on_round is not None:
            on_round(r, samples)
    return samples


def round_values(answers: List[dict], key: str = "step_ms", phase: Optional[str] = None
                 ) -> List[float]:
    """One value per round: the median of that round's steps (of ``phases_ms[phase]`` when
    ``phase`` is given), so the values pair across cells measured in the same rounds."""
    from profiler.analysis.stats import median
    if phase is None:
        return [median(a[key]) for a in answers]
    return [median(a["phases_ms"][phase]) for a in answers]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.workers",
        description="A framework worker for the experiments: JSON requests on stdin, one JSON "
                    "answer per line on stdout (see the module docstring).")
    parser.add_argument("--framework", required=True, choices=FRAMEWORKS)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected a positive int, got {args.threads}")
    return serve(args.framework, args.threads, args.device)


if __name__ == "__main__":
    sys.exit(main())
