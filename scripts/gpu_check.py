"""The prepared GPU check (issue 13): everything our GPU paths need proven, in one command, under
one time budget, with one summary.

On the GPU machine (docs/gpu.md), from the repository root:

    python3 scripts/gpu_check.py --out $OUT/gpu_check --work /tmp/gpu_check --budget-s 480

Steps, in priority order; each gets a timeout of at most its own allowance and never more than
what is left of the budget, is skipped when less than its minimum is left, and a step that fails
or times out is recorded while the next one still runs:

    gpu-info   the GPU's name, driver and memory (nvidia-smi)
    build      ops._C and libdeepprof_torch.so against this Python's torch, for sm_90
    tests      every GPU test (tests/test_cuda.py, the torch adapter's CUDA cases), junit XML
    bench      experiments.bench_kernels --device cuda (loss and conv against PyTorch/cuDNN)
    profile-*  profiler.layerwise on the GPU: resnet20, deeppose, deeppose --compare loss=...
    chainer    Chainer on CuPy, when its wheels were carried (the two-command recipe)
    nsys       an Nsight Systems capture of resnet20, when .nsysdeps was carried

Outputs: ``--out`` holds summary.json, summary.txt and artifacts.tar.gz (every step's log and
reports; the device tool brings back at most 8 files), rewritten after every step, so a run cut
short still leaves everything measured so far. ``--work`` holds the same files unpacked.

``--dry-run`` (``make gpu-check DRY_RUN=1``) runs nothing on a GPU: it prints the plan, checks
every step's command (pytest collects the tests, each module parses its arguments) and runs a
plan of fake steps through the same runner under a short budget, to show the budget handling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_VERSION = 1
DEFAULT_BUDGET_S = 480.0
# Kept back from every step for writing the summary and packing the artifacts.
RESERVE_S = 10.0
# Files larger than this stay out of artifacts.tar.gz (listed in the summary instead): the
# device tool brings back 16 MiB per file.
ARTIFACT_FILE_LIMIT = 6 << 20
ARTIFACT_TOTAL_LIMIT = 14 << 20
# Build for the machine's Hopper GPU only; torch ops required (the GPU tests use them);
# TensorFlow and MXNet are not installed there.
BUILD_ENV = {"OPS_CUDA": "1", "OPS_CUDA_ARCH": "90", "OPS_TORCH": "1", "OPS_TF": "0",
             "OPS_MXNET": "0", "OPS_NVTX": "auto"}
# test_cuda.py is GPU-only (its module name matches); of the torch adapter's tests, the ones
# parametrised on device "cuda" (they exist only where a GPU does, so here none is collected).
GPU_TEST_SELECTION = ["tests/test_cuda.py", "tests/test_torch_adapter.py", "-k", "cuda"]
CHAINER_TESTS = ["tests/test_chainer_adapter.py", "-k", "gpu"]
NSYS_DEPS = ".nsysdeps"
CHAINER_WHEELS = ["/root/stash", ".whl/b"]


# ---- the plan ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Step:
    """One step of the check: commands run in order in ``cwd``; the first that fails ends it."""
    name: str
    purpose: str
    commands: List[List[str]]
    want_s: float                   # the most this step may take
    min_s: float                    # not started with less than this left
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    needs: Sequence[str] = ()       # steps that must have passed first
    # Returns why the step cannot run here (then it is skipped), or None.
    precondition: Optional[Callable[[], Optional[str]]] = None
    # Reads the step's outputs (in its folder) into facts for the summary.
    outcome: Optional[Callable[[Path], dict]] = None
    # Dry run: commands that prove the step's command is well formed, without a GPU.
    validation: List[List[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StepResult:
    name: str
    status: str                     # passed | failed | timed_out | skipped
    duration_s: float = 0.0
    timeout_s: Optional[float] = None
    returncode: Optional[int] = None
    reason: str = ""
    log: Optional[str] = None       # relative to the work folder
    outcome: dict = dataclasses.field(default_factory=dict)


def build_plan(python: str, work: Path, *, rounds: int = 7) -> List[Step]:
    """The real check, in priority order. ``work`` holds each step's folder."""
    def out(step: str, *parts: str) -> str:
        return str(work / step / Path(*parts)) if parts else str(work / step)

    def module(name: str, *args: str) -> List[str]:
        return [python, "-m", name, *args]

    def parses(name: str, args: Sequence[str]) -> List[str]:
        # The module's own parser on the exact arguments: a renamed option fails here.
        return [python, "-c", f"import sys, {name} as m; m.parse_args(sys.argv[1:])", *args]

    # ResNet shapes at batch 128 and DeepPose's at 32, as issue 13's P2 asks.
    bench_args = ["--device", "cuda", "--batches", "128", "--rounds", str(rounds), "--out",
                  out("bench", "bench_kernels.json")]
    profile = ["--framework", "torch", "--device", "cuda", "--no-progress"]
    resnet = [*profile, "--model", "resnet20", "--out", out("profile-resnet20")]
    deeppose = [*profile, "--model", "deeppose", "--out", out("profile-deeppose")]
    compare = [*profile, "--model", "deeppose", "--compare", "loss=autograd,explicit,native",
               "--out", out("compare-deeppose-loss")]
    # No CPU sampling on the GPU machine: with it nsys 2025.3 wrote a 2 GB stream and no
    # report (shared/device/README.md).
    nsys = [*profile, "--model", "resnet20", "--nsys", "--nsys-timeout", "240",
            "--nsys-cpu-sampling", "off",
            "--out", out("nsys-resnet20")]
    chainer_site = out("chainer", "site")
    return [
        Step("gpu-info", "the GPU's name, driver and memory",
             [["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
               "--format=csv,noheader"]],
             want_s=30, min_s=5, outcome=lambda d: gpu_info(d / "log.txt")),
        Step("build", "ops._C and libdeepprof_torch.so against this torch, sm_90",
             [[python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
               "-e", "."],
              [python, "-c", "import ops, ops.torch.loader as l; print(ops.build_info()); "
                             "assert ops.cuda_available(), 'ops: no usable GPU'; l.native_ops(); "
                             "print('deepprof torch ops loaded')"]],
             want_s=240, min_s=60, env=BUILD_ENV,
             validation=[[python, "-c", "import pybind11, setuptools; print('build tools ok')"]]),
        Step("tests", "every GPU test, as junit XML",
             [[python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
               f"--junitxml={out('tests', 'junit.xml')}", *GPU_TEST_SELECTION]],
             want_s=180, min_s=30, needs=("build",),
             outcome=lambda d: junit_counts(d / "junit.xml"),
             validation=[[python, "-m", "pytest", "--collect-only", "-q", "-p",
                          "no:cacheprovider", *GPU_TEST_SELECTION]]),
        Step("bench", "our kernels against PyTorch/cuDNN, with the copy bandwidth",
             [module("experiments.bench_kernels", *bench_args)],
             want_s=150, min_s=30, needs=("build",),
             outcome=lambda d: bench_outcome(d / "bench_kernels.json"),
             validation=[parses("experiments.bench_kernels", bench_args)]),
        Step("profile-resnet20", "the layer-wise profiler on the GPU, ResNet-20",
             [module("profiler.layerwise", *resnet)], want_s=60, min_s=20, needs=("build",),
             outcome=lambda d: report_outcome(d / "report.json"),
             validation=[parses("profiler.layerwise", resnet)]),
        Step("profile-deeppose", "the layer-wise profiler on the GPU, DeepPose",
             [module("profiler.layerwise", *deeppose)], want_s=60, min_s=20, needs=("build",),
             outcome=lambda d: report_outcome(d / "report.json"),
             validation=[parses("profiler.layerwise", deeppose)]),
        Step("compare-deeppose-loss", "DeepPose's loss impls in interleaved rounds",
             [module("profiler.layerwise", *compare)], want_s=90, min_s=30, needs=("build",),
             outcome=lambda d: comparison_outcome(d / "comparison.json"),
             validation=[parses("profiler.layerwise", compare)]),
        Step("chainer", "Chainer on CuPy: the CuPy tests and the profiler",
             [[python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--target", chainer_site, *chainer_wheel_args()],
              [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
               f"--junitxml={out('chainer', 'junit.xml')}", *CHAINER_TESTS],
              module("profiler.layerwise", "--framework", "chainer", "--model", "resnet20",
                     "--device", "cuda", "--no-progress", "--out",
                     out("chainer", "profile-resnet20"))],
             want_s=120, min_s=45, needs=("build",), env={"PYTHONPATH": chainer_site},
             precondition=chainer_missing,
             outcome=lambda d: {**junit_counts(d / "junit.xml"),
                                "profile": report_outcome(d / "profile-resnet20" /
                                                          "report.json")}),
        Step("nsys", "an Nsight Systems capture of ResNet-20 on the GPU",
             [["bash", "-c", f". {NSYS_DEPS}/nsys-env.sh {NSYS_DEPS} && exec "
                             + shlex.join(module("profiler.layerwise", *nsys))]],
             want_s=180, min_s=60, needs=("build",), precondition=nsys_missing,
             outcome=lambda d: nsys_outcome(d / "nsys-resnet20"),
             validation=[parses("profiler.layerwise", nsys)]),
    ]


def chainer_wheel_args() -> List[str]:
    return [str(p) for folder in CHAINER_WHEELS for p in sorted((ROOT / folder).glob("*.whl"))]


def chainer_missing() -> Optional[str]:
    found = {folder: list((ROOT / folder).glob("*.whl")) for folder in CHAINER_WHEELS}
    empty = [folder for folder, wheels in found.items() if not wheels]
    if empty:
        return (f"no Chainer/CuPy wheels in {', '.join(empty)} (docs/gpu.md: stash "
                f".whl/a, then run with .whl/b carried)")
    return None


def nsys_missing() -> Optional[str]:
    folder = ROOT / NSYS_DEPS
    if not (folder / "nsys-env.sh").is_file() or not list(folder.glob("*.deb")):
        return (f"{NSYS_DEPS}/ with nsys-env.sh and the libdw/libelf .debs was not carried "
                f"(docs/gpu.md)")
    return None


# ---- running -------------------------------------------------------------------------------------

def run_command(argv: List[str], timeout_s: float, log, env: Dict[str, str], cwd: Path) -> tuple:
    """Runs argv with its output appended to ``log``; returns (returncode, timed_out).

    The command gets its own process group, so a timeout ends it and everything it started
    (pytest workers, nsys and its child), first politely, then for good."""
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    try:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                 env={**os.environ, **env}, start_new_session=True)
    except OSError as e:
        log.write(f"could not start: {e}\n")
        return 127, False
    try:
        return child.wait(timeout=max(timeout_s, 0.1)), False
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                break
            try:
                child.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        log.write(f"\n[gpu-check] timed out after {timeout_s:.0f} s: stopped\n")
        return child.returncode, True


class Runner:
    """Runs steps in order under one budget and keeps the summary up to date after each."""

    def __init__(self, out: Path, work: Path, budget_s: float, *, reserve_s: float = RESERVE_S,
                 clock: Callable[[], float] = time.monotonic, cwd: Path = ROOT,
                 echo: Callable[[str], None] = print, facts: Optional[dict] = None):
        self.out, self.work, self.budget_s, self.reserve_s = out, work, budget_s, reserve_s
        self.clock, self.cwd, self.echo = clock, cwd, echo
        self.facts = dict(facts or {})
        self.results: List[StepResult] = []
        self.started = clock()

    def left_s(self) -> float:
        return self.budget_s - (self.clock() - self.started) - self.reserve_s

    def run(self, steps: List[Step]) -> dict:
        for step in steps:
            result = self.run_step(step)
            self.results.append(result)
            self.echo(f"[gpu-check] {step.name}: {result.status} in {result.duration_s:.1f} s"
                      + (f" ({result.reason})" if result.reason else "")
                      + f"; {max(self.left_s(), 0):.0f} s of the budget left")
            if result.status in ("failed", "timed_out") and result.log:
                tail = (self.work / result.log).read_text(errors="replace").splitlines()[-15:]
                for line in tail:
                    self.echo(f"    | {line}")
            self.write_summary(final=False)
        return self.write_summary(final=True)

    def run_step(self, step: Step) -> StepResult:
        passed = {r.name for r in self.results if r.status == "passed"}
        missing = [n for n in step.needs if n not in passed]
        if missing:
            return StepResult(step.name, "skipped",
                              reason=f"needs {', '.join(missing)}, which did not pass")
        reason = step.precondition() if step.precondition else None
        if reason:
            return StepResult(step.name, "skipped", reason=reason)
        left = self.left_s()
        if left < step.min_s:
            return StepResult(step.name, "skipped",
                              reason=f"budget: {max(left, 0):.0f} s left, it needs at least "
                                     f"{step.min_s:.0f} s")
        timeout = min(step.want_s, left)
        folder = self.work / step.name
        folder.mkdir(parents=True, exist_ok=True)
        log_path = folder / "log.txt"
        self.echo(f"[gpu-check] {step.name}: {step.purpose} (timeout {timeout:.0f} s)")
        began = self.clock()
        result = StepResult(step.name, "passed", timeout_s=round(timeout, 1),
                            log=str(log_path.relative_to(self.work)))
        with open(log_path, "w") as log:
            for argv in step.commands:
                remaining = timeout - (self.clock() - began)
                code, timed_out = run_command(argv, remaining, log, step.env, self.cwd)
                result.returncode = code
                if timed_out:
                    result.status, result.reason = "timed_out", f"stopped after {timeout:.0f} s"
                    break
                if code != 0:
                    result.status = "failed"
                    result.reason = f"exit status {code} from {Path(argv[0]).name}"
                    break
        result.duration_s = round(self.clock() - began, 2)
        if step.outcome:
            # Whatever the step left is read, also after a failure or a timeout.
            try:
                result.outcome = step.outcome(folder)
            except Exception as e:  # a summary must not die on one unreadable report
                result.outcome = {"error": f"{type(e).__name__}: {e}"}
        return result

    def write_summary(self, *, final: bool) -> dict:
        summary = {
            "schema_version": SCHEMA_VERSION, "tool": "deepprof gpu-check",
            "final": final, "budget_s": self.budget_s,
            "elapsed_s": round(self.clock() - self.started, 2),
            **self.facts,
            "gpu": next((r.outcome.get("gpu") for r in self.results
                         if r.name == "gpu-info" and r.outcome), None),
            "steps": [dataclasses.asdict(r) for r in self.results],
            "counts": {s: sum(r.status == s for r in self.results)
                       for s in ("passed", "failed", "timed_out", "skipped")},
        }
        self.out.mkdir(parents=True, exist_ok=True)
        summary["artifacts"] = pack_artifacts(self.work, self.out / "artifacts.tar.gz")
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
        write_atomic(self.out / "summary.txt", render_summary(summary))
        return summary


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pack_artifacts(work: Path, target: Path) -> dict:
    """Every file under ``work`` into one tar.gz (the device tool returns 8 files at most),
    smallest first, leaving out files over ARTIFACT_FILE_LIMIT and whatever would pass
    ARTIFACT_TOTAL_LIMIT; returns what was packed and what was left out."""
    files = sorted((p for p in work.rglob("*") if p.is_file() and "site" not in p.parts),
                   key=lambda p: p.stat().st_size) if work.is_dir() else []
    packed, left_out, total = [], [], 0
    tmp = target.with_name(target.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in files:
            size = path.stat().st_size
            name = str(path.relative_to(work))
            if size > ARTIFACT_FILE_LIMIT or total + size > ARTIFACT_TOTAL_LIMIT:
                left_out.append(f"{name} ({size} bytes)")
                continue
            tar.add(path, arcname=name)
            packed.append(name)
            total += size
    os.replace(tmp, target)
    return {"file": target.name, "packed": len(packed), "left_out": left_out}


# ---- outcomes: what each step's outputs say ------------------------------------------------------

def gpu_info(log: Path) -> dict:
    lines = [line for line in log.read_text().splitlines()
             if line and not line.startswith("$") and "," in line]
    if not lines:
        return {}
    name, driver, memory = (part.strip() for part in lines[0].split(",")[:3])
    return {"gpu": name, "driver": driver, "memory": memory, "gpus": len(lines)}


def junit_counts(path: Path) -> dict:
    if not path.is_file():
        return {"junit": "missing"}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites)
              for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
           if case.find("failure") is not None or case.find("error") is not None]
    counts["not_passed"] = bad[:30]
    return counts


def bench_outcome(path: Path) -> dict:
    """The figures issue 13's P1 and P2 are judged by, from bench_kernels' JSON."""
    if not path.is_file():
        return {"bench": "missing"}
    doc = json.loads(path.read_text())
    rows = doc.get("rows", [])
    out = {"rows": len(rows), "copy_gbps": doc.get("copy_gbps"), "loss": [], "conv": []}
    for row in rows:
        brief = {"case": row["name"], "ratio": round(row["ratio"], 3),
                 "ratio_iqr": round(row["ratio_iqr"], 3),
                 "ours_ms": round(row["ours_ms"], 4), "torch_ms": round(row["torch_ms"], 4)}
        brief.update({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in row.get("extra", {}).items()})
        out["loss" if row["group"].startswith("loss") else "conv"].append(
            {"group": row["group"], **brief})
    return out


def report_outcome(path: Path) -> dict:
    if not path.is_file():
        return {"report": "missing"}
    doc = json.loads(path.read_text())
    phases = {name: round(p["mean"], 3) for name, p in doc.get("phases_ms", {}).items()}
    return {"device": doc.get("device"), "step_ms": doc.get("step_ms", {}).get("mean"),
            "phases_ms": phases,
            "overhead_pct": doc.get("instrumentation", {}).get("overhead_pct"),
            "errors": doc.get("errors", [])}


def comparison_outcome(path: Path) -> dict:
    if not path.is_file():
        return {"comparison": "missing"}
    doc = json.loads(path.read_text())
    return {"differences": doc.get("differences", []), "errors": doc.get("errors", [])}


def nsys_outcome(folder: Path) -> dict:
    names = ("profile.nsys-rep", "profile.sqlite", "nsys_analysis.json", "report.json")
    return {name: (folder / name).is_file() for name in names}


def render_summary(summary: dict) -> str:
    lines = [f"deepprof gpu-check ({'final' if summary['final'] else 'in progress'}): "
             f"GPU {summary.get('gpu') or 'unknown'}, {summary['elapsed_s']:.0f} s of a "
             f"{summary['budget_s']:.0f} s budget",
             "steps: " + ", ".join(f"{n} {s}" for s, n in summary["counts"].items() if n), ""]
    for step in summary["steps"]:
        lines.append(f"{step['name']:<22} {step['status']:<10} {step['duration_s']:>7.1f} s  "
                     f"{step['reason']}")
        outcome = step.get("outcome") or {}
        if "tests" in outcome:
            lines.append(f"    tests {outcome['tests']}: {outcome['passed']} passed, "
                         f"{outcome['failures']} failed, {outcome['errors']} errors, "
                         f"{outcome['skipped']} skipped")
            lines += [f"    not passed: {name}" for name in outcome.get("not_passed", [])]
        for row in outcome.get("loss", []) + outcome.get("conv", []):
            extra = ", ".join(f"{k}={v}" for k, v in row.items()
                              if k not in ("group", "case", "ratio", "ratio_iqr", "ours_ms",
                                           "torch_ms"))
            lines.append(f"    {row['group']:<26} {row['case']:<26} ours/torch "
                         f"{row['ratio']:.2f}x (IQR {row['ratio_iqr']:.2f})  {extra}")
        if outcome.get("step_ms") is not None:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in outcome["phases_ms"].items())
            lines.append(f"    step {outcome['step_ms']:.2f} ms (overhead "
                         f"{outcome.get('overhead_pct')}%): {phases}")
        lines += [f"    {line}" for line in outcome.get("differences", [])]
        lines += [f"    error: {e}" for e in outcome.get("errors", [])]
        if "error" in outcome:
            lines.append(f"    could not read its outputs: {outcome['error']}")
    left_out = summary.get("artifacts", {}).get("left_out", [])
    if left_out:
        lines.append(f"\nleft out of artifacts.tar.gz (too large): {', '.join(left_out)}")
    return "\n".join(lines) + "\n"


# ---- the dry run ---------------------------------------------------------------------------------

def print_plan(steps: List[Step], budget_s: float, echo=print) -> None:
    echo(f"[gpu-check] plan under a {budget_s:.0f} s budget ({RESERVE_S:.0f} s kept for the "
         f"summary), in priority order:")
    for step in steps:
        echo(f"  {step.name:<22} up to {step.want_s:>4.0f} s, skipped under {step.min_s:>3.0f} s "
             f"left: {step.purpose}")
        for argv in step.commands:
            env = " ".join(f"{k}={v}" for k, v in step.env.items())
            echo(f"      $ {env + ' ' if env else ''}{shlex.join(argv)}")


def validate_plan(steps: List[Step], echo=print, timeout_s: float = 300) -> List[str]:
    """Runs every step's validation commands here; returns the problems found."""
    problems = []
    for step in steps:
        reason = step.precondition() if step.precondition else None
        if reason:
            echo(f"[gpu-check] {step.name}: would be skipped here: {reason}")
        for argv in step.validation:
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout_s)
            last = (done.stdout.strip().splitlines() or [""])[-1]
            if done.returncode != 0:
                problems.append(f"{step.name}: {shlex.join(argv[:4])} ...: exit "
                                f"{done.returncode}: {done.stderr.strip()[-400:]}")
                echo(f"[gpu-check] {step.name}: command check FAILED")
            else:
                echo(f"[gpu-check] {step.name}: command checked ({last[:100]})")
    return problems


def fake_plan(python: str) -> List[Step]:
    """Steps that only sleep or fail, to exercise the budget: under a 6 s budget with 1 s
    reserved, 'quick' passes, 'broken' fails, 'slow' is stopped at its allowance, 'after'
    still runs, and 'late' is skipped for want of time."""
    def sleep(seconds: float, code: int = 0) -> List[str]:
        return [python, "-c", f"import time, sys; time.sleep({seconds}); sys.exit({code})"]
    return [
        Step("quick", "sleeps 0.2 s", [sleep(0.2)], want_s=2, min_s=0.5),
        Step("broken", "fails", [sleep(0, 3)], want_s=2, min_s=0.5),
        Step("slow", "sleeps 60 s, stopped at 2 s", [sleep(60)], want_s=2, min_s=0.5),
        Step("after", "runs after a failure and a timeout", [sleep(0.1)], want_s=2, min_s=0.5,
             needs=("quick",)),
        Step("needs-broken", "depends on the failed step", [sleep(0)], want_s=1, min_s=0,
             needs=("broken",)),
        Step("late", "wants more than is left", [sleep(0)], want_s=30, min_s=20),
    ]


FAKE_EXPECTED = {"quick": "passed", "broken": "failed", "slow": "timed_out", "after": "passed",
                 "needs-broken": "skipped", "late": "skipped"}


def dry_run(args, echo=print) -> int:
    work = Path(args.work) if args.work else Path(args.out) / "work"
    steps = select(build_plan(args.python, work), args.only)
    print_plan(steps, args.budget_s, echo)
    problems = [] if args.no_validate else validate_plan(steps, echo)
    echo("[gpu-check] the budget handling, with fake steps under a 6 s budget:")
    fake_out = Path(args.out) / "dry-run"
    shutil.rmtree(fake_out, ignore_errors=True)
    runner = Runner(fake_out, fake_out / "work", 6.0, reserve_s=1.0, echo=echo,
                    facts={"dry_run": True})
    summary = runner.run(fake_plan(args.python))
    got = {s["name"]: s["status"] for s in summary["steps"]}
    if got != FAKE_EXPECTED:
        problems.append(f"budget handling: expected {FAKE_EXPECTED}, got {got}")
    for problem in problems:
        echo(f"[gpu-check] PROBLEM: {problem}")
    echo(f"[gpu-check] dry run: {'OK' if not problems else f'{len(problems)} problem(s)'}; "
         f"fake summary in {fake_out / 'summary.txt'}")
    return 1 if problems else 0


# ---- command line --------------------------------------------------------------------------------

def select(steps: List[Step], only: Optional[str]) -> List[Step]:
    """The steps named in ``only`` (comma-separated) and the steps they need, in plan order."""
    if not only:
        return steps
    by_name = {s.name: s for s in steps}
    wanted = set(only.split(","))
    unknown = wanted - set(by_name)
    if unknown:
        raise SystemExit(f"--only: unknown step(s) {', '.join(sorted(unknown))}; steps: "
                         f"{', '.join(by_name)}")
    for name in list(wanted):
        wanted.update(by_name[name].needs)
    wanted.add("gpu-info")
    return [s for s in steps if s.name in wanted]


def has_gpu() -> Optional[str]:
    """None where nvidia-smi lists a GPU, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi is not on PATH"
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or "GPU" not in done.stdout:
        return f"nvidia-smi -L lists no GPU ({(done.stderr or done.stdout).strip()[:200]})"
    return None


def parse_args(argv=None):
    default_out = Path(os.environ["OUT"]) / "gpu_check" if os.environ.get("OUT") else \
        ROOT / "runs" / "gpu_check"
    p = argparse.ArgumentParser(prog="python scripts/gpu_check.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help="the whole check's time budget in seconds (default: %(default)s)")
    p.add_argument("--out", default=str(default_out),
                   help="summary.json, summary.txt, artifacts.tar.gz (default: $OUT/gpu_check "
                        "where OUT is set, else runs/gpu_check)")
    p.add_argument("--work", default=None,
                   help="each step's logs and reports (default: OUT/work)")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that builds and runs everything (default: this one)")
    p.add_argument("--rounds", type=int, default=7, help="bench_kernels rounds (default: 7)")
    p.add_argument("--only", default=None, metavar="STEP,...",
                   help="run only these steps (and the ones they need)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: print the plan, check each command, exercise the budget")
    p.add_argument("--no-validate", action="store_true",
                   help="with --dry-run: skip the command checks (the fake steps still run)")
    args = p.parse_args(argv)
    if args.budget_s <= RESERVE_S:
        p.error(f"--budget-s must be more than the {RESERVE_S:.0f} s kept for the summary, "
                f"got {args.budget_s}")
    if args.rounds < 2:
        p.error(f"--rounds must be >= 2, got {args.rounds}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    why_not = has_gpu()
    if why_not:
        print(f"[gpu-check] no GPU here: {why_not}. This check runs on the GPU machine "
              f"(docs/gpu.md); here, run `make gpu-check DRY_RUN=1`.",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    steps = select(build_plan(args.python, work, rounds=args.rounds), args.only)
    print_plan(steps, args.budget_s)
    facts = {"python": sys.version.split()[0], "argv": sys.argv, "host": os.uname().nodename}
    summary = Runner(out, work, args.budget_s, facts=facts).run(steps)
    print()
    print(render_summary(summary), end="", flush=True)
    return 0 if summary["counts"]["failed"] + summary["counts"]["timed_out"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
