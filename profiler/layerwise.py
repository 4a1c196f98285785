"""``python -m profiler.layerwise``: where a training step's time goes, layer by layer, in one
framework or in all four.

Examples::

    python -m profiler.layerwise --framework chainer
    python -m profiler.layerwise --framework all --model resnet20
    python -m profiler.layerwise --framework torch --model deeppose --compare loss=autograd,native
    python -m profiler.layerwise --model tests/user_models/torch_cnn.py:factory \
        --compare conv=torch,kernel

Writes report.json (schema: profiler.report), trace.json (Chrome trace events: Perfetto,
chrome://tracing), flame.folded and flame.speedscope.json into --out, and prints a table.

``--nsys`` runs the same profile again as a child under Nsight Systems (``nsys profile``, the
flags for the device: profiler.nsys.tool) and adds profile.nsys-rep, profile.sqlite and the
analysis of the capture (profiler.nsys) to --out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import keyword
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from profiler.analysis.flamegraph import folded_stacks, to_speedscope
from profiler.analysis.nesting import check_nesting
from profiler.analysis.phases import layer_breakdown, phase_breakdown
from profiler.analysis.stats import OVERHEAD_GOAL_PCT, median, overhead_summary
from profiler.analysis.trace_events import to_chrome_trace
from profiler.report import (build_report, from_layer_breakdown, from_phase_breakdown,
                             render_comparison, render_table, render_variant_phases,
                             validate_report,
                             write_json_atomic)
from ops.threads import physical_cores, set_cpu_threads, thread_report

FRAMEWORKS = ("torch", "chainer", "tensorflow", "mxnet")
MODELS = ("resnet20", "resnet32", "resnet44", "resnet56", "deeppose")
CONV_IMPLS = ("framework", "kernel", "native")
LOSS_IMPLS = ("autograd", "explicit", "kernel", "native")


# --------------------------------------------------------------------------- arguments

def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m profiler.layerwise",
        description="Profile training steps of a seed workload layer by layer: per-layer "
                    "forward/backward, loss forward/backward, optimizer, data-loader wait, "
                    "host-to-device copy and the rest, with NVTX ranges for Nsight Systems.",
        epilog="Outputs in --out: report.json, trace.json (open in https://ui.perfetto.dev), "
               "flame.folded (flamegraph.pl), flame.speedscope.json (speedscope.app); with "
               "--nsys also profile.nsys-rep (Nsight Systems), profile.sqlite (its export) and "
               "the capture's analysis: nsys.folded, nsys.speedscope.json, nsys.svg, "
               "nsys_analysis.json. Nsight Systems: `make nsys` installs it (as root, Debian); "
               "nsys is found through $NSYS, PATH and the usual install places.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--framework", default="torch", choices=FRAMEWORKS + ("all",),
                        help="framework to profile; 'all' runs each in its own process and "
                             "merges the results")
    parser.add_argument("--model", default="resnet20", metavar="MODEL|FACTORY",
                        help=f"a seed workload ({', '.join(MODELS)}) or your own model: "
                             f"'package.module:function' or 'path/to/file.py:function', a "
                             f"function returning dict(model=, loader=, loss_fn=, "
                             f"optimizer=[, framework=, name=]) as profiler.api."
                             f"profile_training takes them; with --compare KEY=A,B,... the "
                             f"factory is called once per variant with KEY=variant")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="auto: cuda where the framework sees a GPU, else cpu")
    parser.add_argument("--batch-size", type=_positive_int, default=32)
    parser.add_argument("--warmup", type=_non_negative_int, default=2,
                        help="steps run first and not counted")
    parser.add_argument("--iters", type=_positive_int, default=8, help="measured steps")
    parser.add_argument("--overhead-iters", type=_non_negative_int, default=None,
                        help="uninstrumented steps timed for the instrumentation overhead "
                             "(default: --iters; 0 skips)")
    parser.add_argument("--conv-impl", default="framework", choices=CONV_IMPLS)
    parser.add_argument("--loss-impl", default="autograd", choices=LOSS_IMPLS,
                        help="deeppose's loss (ResNet uses the framework's cross-entropy)")
    parser.add_argument("--workers", type=_non_negative_int, default=0,
                        help="data-loader worker processes (threads for tf.data)")
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (built in) or a path: cifar-10-batches-py for "
                             "ResNet, an LSP folder (joints.mat + images/) for deeppose")
    parser.add_argument("--synthetic-size", type=_positive_int, default=None, metavar="N",
                        help="training-set size of the synthetic data (default: the real "
                             "dataset's, 50000 CIFAR / 1000 LSP images); for quick runs")
    parser.add_argument("--seed", type=_non_negative_int, default=0)
    parser.add_argument("--sync", action="store_true",
                        help="synchronise the device at every range boundary (simple, "
                             "serialising) instead of reading events once per step")
    parser.add_argument("--compare", default=None, metavar="KEY=A,B,...",
                        help="compare variants in interleaved rounds, the first the baseline: "
                             "for a seed workload its impls, loss=autograd,explicit,kernel,"
                             "native or conv=framework,native; for a factory any keyword "
                             "argument it takes, called once per variant with KEY=variant "
                             "(a string), e.g. conv=torch,kernel; each variant's report goes "
                             "to --out/<variant>/")
    parser.add_argument("--rounds", type=_positive_int, default=5,
                        help="rounds of --compare (each runs every variant)")
    parser.add_argument("--steps-per-round", type=_positive_int, default=2)
    parser.add_argument("--out", default=None,
                        help="output folder (default: runs/layerwise/<framework>-<model>)")
    parser.add_argument("--format", default="table", choices=("table", "json"),
                        help="what to print: a table, or the report JSON")
    parser.add_argument("--python", action="append", default=[], metavar="FRAMEWORK=PATH",
                        help="with --framework all: the Python interpreter for a framework "
                             "kept in another environment (repeatable)")
    parser.add_argument("--pyspy", action="store_true",
                        help="also record a py-spy flame graph (pyspy.svg) of this process "
                             "while it profiles (warm-up included; needs py-spy on PATH)")
    parser.add_argument("--threads", type=_positive_int, default=physical_cores(), metavar="N",
                        help="CPU threads for the framework's intra-op pool, its BLAS and "
                             "OpenMP libraries and our kernels, set before the framework "
                             "starts; report.json's 'threads' records what each then used. "
                             "The default is the physical cores this process may use")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--nsys", action="store_true",
                        help="run this profile under Nsight Systems (nsys profile: NVTX and CPU "
                             "samples with call stacks, plus CUDA on a GPU), write "
                             "profile.nsys-rep and profile.sqlite into --out, analyse them per "
                             "range and print the tables; one framework, no --compare")
    parser.add_argument("--nsys-timeout", type=_positive_int, default=1800, metavar="S",
                        help="with --nsys: stop nsys after S seconds (nsys 2022.4 sometimes "
                             "never finishes after the profile has ended)")
    parser.add_argument("--nsys-cpu-sampling", default="on", choices=("on", "off"),
                        help="with --nsys: sample CPU call stacks (the per-library split of "
                             "each range). 'off' keeps a GPU capture small: on the GPU machine "
                             "nsys 2025.3 with CPU sampling wrote a 2 GB stream and no report "
                             "for a five-matmul script")
    args = parser.parse_args(argv)
    # Options one mode has no use for are refused, not ignored: a run must do what it says.
    per_mode = {True: ("iters", "overhead_iters"), False: ("rounds", "steps_per_round")}
    unused = [n for n in per_mode[args.compare is not None]
              if getattr(args, n) != parser.get_default(n)]
    if unused:
        flags = ", ".join("--" + n.replace("_", "-") for n in unused)
        parser.error(f"{flags}: " + (
            "--compare runs --warmup, then --rounds rounds of --steps-per-round steps of every "
            "variant, all of them measured" if args.compare is not None else
            "only with --compare; a profile runs --warmup, --iters and --overhead-iters steps"))
    if args.overhead_iters is None:
        args.overhead_iters = args.iters
    args.user_model = args.model not in MODELS
    if args.user_model:
        _check_user_model_args(parser, args)
    if args.compare is not None:
        args.compare = (_parse_factory_compare(parser, args.compare) if args.user_model
                        else _parse_compare(parser, args.compare))
    args.python = _parse_pythons(parser, args.python)
    if args.model != "deeppose" and args.loss_impl != "autograd":
        parser.error(f"--loss-impl: {args.model} trains with the framework's softmax "
                     f"cross-entropy; loss impls apply to --model deeppose")
    if (args.compare and not args.user_model and args.compare[0] == "loss"
            and args.model != "deeppose"):
        parser.error("--compare loss=...: loss impls apply to --model deeppose")
    if args.framework == "all" and args.compare:
        parser.error("--compare runs in one framework; pick --framework")
    if args.nsys and (args.framework == "all" or args.compare):
        parser.error("--nsys: captures one profile; expected one --framework and no --compare, "
                     f"got --framework {args.framework}"
                     + (f" --compare {args.compare[0]}=..." if args.compare else ""))
    if args.out is None:
        label = (args.model.rpartition(":")[2] if args.user_model else args.model)
        args.out = os.path.join("runs", "layerwise", f"{args.framework}-{label}")
    return args


# Options that shape a seed workload, with nothing to act on in a user's factory.
_SEED_ONLY = ("batch_size", "conv_impl", "loss_impl", "workers", "data", "synthetic_size",
              "seed", "python", "pyspy")


def _check_user_model_args(parser, args) -> None:
    if ":" not in args.model:
        parser.error(f"--model: expected one of {list(MODELS)} or a factory "
                     f"'package.module:function' / 'path/to/file.py:function', got "
                     f"{args.model!r}")
    given = [name for name in _SEED_ONLY if getattr(args, name) != parser.get_default(name)]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        parser.error(f"{flags}: apply to the seed workloads; a factory's model, loader, loss "
                     f"and optimizer are its own (set them in the factory), got --model "
                     f"{args.model}")
    if args.framework == "all":
        parser.error(f"--framework all: a factory builds one framework's model; pass its "
                     f"--framework, got --model {args.model}")


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _parse_compare(parser, text: str):
    kind, _, names = text.partition("=")
    known = {"loss": LOSS_IMPLS, "conv": CONV_IMPLS}
    if kind not in known or not names:
        parser.error(f"--compare: expected loss=A,B,... or conv=A,B,..., got {text!r}")
    variants = [n.strip() for n in names.split(",") if n.strip()]
    bad = [v for v in variants if v not in known[kind]]
    if bad or len(variants) < 2 or len(set(variants)) != len(variants):
        parser.error(f"--compare: expected at least two distinct {kind} impls from "
                     f"{list(known[kind])}, got {variants}")
    return kind, variants


def _parse_factory_compare(parser, text: str):
    """--compare KEY=A,B,... for a factory: KEY a keyword argument (a Python identifier),
    at least two distinct variants, each usable as the folder of its report in --out."""
    key, sep, names = text.partition("=")
    if not sep or not key.isidentifier() or keyword.iskeyword(key):
        parser.error(f"--compare: expected KEY=A,B,... with KEY a keyword argument of the "
                     f"factory (a Python identifier), got {text!r}")
    variants = [n.strip() for n in names.split(",") if n.strip()]
    if len(variants) < 2 or len(set(variants)) != len(variants):
        parser.error(f"--compare {key}=...: expected at least two distinct variants, got "
                     f"{variants}")
    bad = [v for v in variants if not re.fullmatch(r"\w[\w.+-]*", v)]
    if bad:
        parser.error(f"--compare {key}=...: each variant names its report's folder in --out; "
                     f"expected letters, digits and _ . + - (not first: . + -), got {bad}")
    return key, variants


def _parse_pythons(parser, items: List[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        framework, _, path = item.partition("=")
        if framework not in FRAMEWORKS or not path:
            parser.error(f"--python: expected FRAMEWORK=PATH with FRAMEWORK one of "
                         f"{list(FRAMEWORKS)}, got {item!r}")
        if shutil.which(path) is None and not os.access(path, os.X_OK):
            parser.error(f"--python: {path}: not an executable")
        out[framework] = path
    return out


# --------------------------------------------------------------------------- one framework

def framework_version(framework: str) -> str:
    if framework == "chainer":
        from ops.chainer.loader import load_chainer
        return load_chainer().__version__
    module = importlib.import_module({"torch": "torch", "tensorflow": "tensorflow",
                                      "mxnet": "mxnet"}[framework])
    return module.__version__


def resolve_device(framework: str, device: str) -> str:
    """'auto' -> 'cuda' where the framework sees a GPU, else 'cpu'."""
    if device != "auto":
        return device
    try:
        if framework == "torch":
            import torch
            return "cuda" if torch.cuda.is_available() else "cpu"
        if framework == "chainer":
            from ops.chainer.loader import load_chainer
            return "cuda" if load_chainer().backends.cuda.available else "cpu"
        if framework == "tensorflow":
            import tensorflow as tf
            return "cuda" if tf.config.list_physical_devices("GPU") else "cpu"
        import mxnet as mx
        return "cuda" if mx.context.num_gpus() > 0 else "cpu"
    except Exception:          # a probe that fails means no usable GPU
        return "cpu"


class _Progress:
    """A rich progress bar that appears only once a run has taken a few seconds."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled, self.began, self.bar = label, enabled, time.monotonic(), None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None and time.monotonic() - self.began > 3:
            from rich.progress import Progress
            self.bar = Progress(transient=True, console=_stderr_console())
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _stderr_console():
    from rich.console import Console
    return Console(stderr=True)


def _base_fields(args, framework: str, device: str) -> dict:
    return dict(framework=framework, framework_version=_safe(framework_version, framework),
                device={"name": _device_name(framework, device), "kind": device},
                model=args.model, batch_size=args.batch_size,
                impls={"conv": args.conv_impl, "loss": args.loss_impl
                       if args.model == "deeppose" else "framework cross-entropy"},
                workers=args.workers, seed=args.seed, sync=args.sync, iters=args.iters,
                warmup=args.warmup)


def _safe(fn, *a) -> str:
    try:
        return str(fn(*a))
    except Exception as e:
        return f"unknown ({type(e).__name__})"


def _device_name(framework: str, device: str) -> str:
    if device == "cuda" and framework == "torch":
        import torch
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def apply_threads(args, framework: str, notes: List[str]) -> None:
    """--threads for ``framework``, before it runs anything; what it refused goes to notes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # returned, and noted instead
        refused = set_cpu_threads(args.threads, [framework])
    notes += [f"threads: {problem}" for problem in refused]


def threads_section(args, framework: str, notes: List[str]) -> dict:
    """The report's ``threads``: what each pool used; a warning (stderr and notes) for any
    that did not take --threads."""
    report = thread_report(framework, args.threads)
    if report["ignored"]:
        message = (f"threads: asked for {args.threads}, but these did not take it: "
                   f"{', '.join(report['ignored'])} (report.json 'threads' has the counts)")
        notes.append(message)
        _stderr_console().print(f"[yellow]warning[/yellow]: {framework}: {message}")
    return report


def run_one(args, framework: str) -> dict:
    """Profiles ``framework``; writes and returns its report (with errors, if it failed)."""
    from profiler.runner import profile
    from profiler.workloads import WorkloadConfig, build_workload

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(framework, args.device)
    fields = _base_fields(args, framework, device)
    notes: List[str] = [
        "Times are host wall-clock milliseconds per measured step (means; medians and IQR in "
        "step_ms and phases_ms); layer times are inclusive of the framework's per-layer "
        "overhead.",
        "loss_backward ends when the model output's gradient exists; backward is the rest of "
        "the backward call; 'other' is the step minus the seven measured phases."]
    errors: List[str] = []
    pyspy = None
    try:
        apply_threads(args, framework, notes)
        # An instrument may configure its framework before the first operator runs (MXNet
        # reads its backward-bulking setting once, then).
        importlib.import_module(f"profiler.instrument.{framework}")
        config = WorkloadConfig(model=args.model, device=device, batch_size=args.batch_size,
                                seed=args.seed, conv_impl=args.conv_impl,
                                loss_impl=args.loss_impl, workers=args.workers,
                                data=args.data, train_size=args.synthetic_size,
                                test_size=args.synthetic_size)
        workload = build_workload(framework, config)
        if args.pyspy:
            pyspy = _start_pyspy(out, notes)
        progress = _Progress(f"{framework} {args.model}", not args.no_progress)
        result = profile(workload, warmup=args.warmup, iters=args.iters,
                         overhead_iters=args.overhead_iters, sync=args.sync,
                         progress=progress)
        progress.close()
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
        result = None
    finally:
        if pyspy is not None:
            _stop_pyspy(pyspy, notes)
    if result is not None:
        notes += result.notes
        errors += result.errors
        if args.sync:
            notes.append("--sync: the device was synchronised at every range boundary; "
                         "ranges are complete but the GPU could not run ahead of the host.")
        fields.update(_measured_sections(result, errors, device))
        _write_views(out, result.timeline, fields, errors)
    try:
        fields["threads"] = threads_section(args, framework, notes)
    except Exception as e:   # a failed run keeps its report
        errors.append(f"threads: {type(e).__name__}: {e}")
    report = build_report(**fields, notes=notes, errors=errors)
    try:
        validate_report(report)
    except ValueError as e:
        report["errors"].append(f"report check: {e}")
    write_json_atomic(out / "report.json", report)
    return report


def _measured_sections(result, errors: List[str], device: str) -> dict:
    try:
        breakdown = phase_breakdown(result.timeline)
    except ValueError as e:          # no measured step completed
        errors.append(f"no measured step: {e}")
        return {}
    errors += [f"phase accounting: {w}" for w in breakdown["warnings"]]
    sections = from_phase_breakdown(breakdown)
    sections["layers"] = from_layer_breakdown(layer_breakdown(result.timeline))
    inst, plain = result.instrumented_step_ms, result.uninstrumented_step_ms
    sections["instrumentation"] = {
        "instrumented_step_ms_median": median(inst) if inst else None,
        "uninstrumented_step_ms_median": median(plain) if plain else None,
        **overhead_summary(inst, plain, goal_pct=OVERHEAD_GOAL_PCT[device]),
        "instrumented_step_ms": inst, "uninstrumented_step_ms": plain}
    return sections


def _write_views(out: Path, timeline, fields: dict, errors: List[str]) -> None:
    """trace.json and the flame graphs; a failure here is reported, not fatal."""
    try:
        check_nesting(timeline)
    except ValueError as e:
        errors.append(f"ranges not properly nested (trace still written): {e}")
    try:
        meta = {k: fields[k] for k in ("framework", "model", "batch_size")}
        write_json_atomic(out / "trace.json", to_chrome_trace(timeline, metadata=meta))
        (out / "flame.folded").write_text("\n".join(folded_stacks(timeline)) + "\n")
        write_json_atomic(out / "flame.speedscope.json",
                          to_speedscope(timeline, name=f"{fields['framework']} "
                                                       f"{fields['model']}"))
    except ValueError as e:
        errors.append(f"trace/flame graph: {e}")


def _start_pyspy(out: Path, notes: List[str]):
    exe = shutil.which("py-spy")
    if exe is None:
        notes.append("--pyspy: py-spy not found on PATH; no Python flame graph recorded.")
        return None
    target = out / "pyspy.svg"
    proc = subprocess.Popen([exe, "record", "--pid", str(os.getpid()), "--output",
                             str(target), "--format", "flamegraph", "--rate", "200"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)            # py-spy attaches asynchronously
    if proc.poll() is not None:
        notes.append(f"--pyspy: py-spy exited at start: "
                     f"{proc.stderr.read().decode(errors='replace').strip()[-300:]}")
        return None
    return proc, target


def _stop_pyspy(handle, notes: List[str]) -> None:
    proc, target = handle
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    notes.append(f"--pyspy: Python flame graph in {target.name}" if target.exists()
                 else "--pyspy: py-spy wrote no flame graph")


# --------------------------------------------------------------------------- comparisons

def run_compare(args, framework: str) -> dict:
    """--compare: the variants in interleaved rounds; per phase, median and spread per
    variant and each variant's difference to the first with a bootstrap 95% interval."""
    from profiler.analysis.variants import compare_variants
    from profiler.runner import compare
    from profiler.workloads import WorkloadConfig, build_workload

    kind, variants = args.compare
    notes: List[str] = []
    apply_threads(args, framework, notes)
    importlib.import_module(f"profiler.instrument.{framework}")   # see run_one
    device = resolve_device(framework, args.device)
    config = WorkloadConfig(model=args.model, device=device, batch_size=args.batch_size,
                            seed=args.seed, conv_impl=args.conv_impl, loss_impl=args.loss_impl,
                            workers=args.workers, data=args.data,
                            train_size=args.synthetic_size, test_size=args.synthetic_size)
    workload = build_workload(framework, config)
    progress = _Progress(f"{framework} {kind} compare", not args.no_progress)
    outcome = compare(workload, kind=kind, variants=variants, rounds=args.rounds,
                      steps_per_round=args.steps_per_round, warmup=args.warmup,
                      sync=args.sync, progress=progress)
    progress.close()
    doc = {"framework": framework, "model": args.model, "device": device, "kind": kind,
           "variants": variants, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
           **compare_variants(outcome["timelines"], outcome["step_round"], variants),
           "threads": threads_section(args, framework, notes),
           "errors": outcome["errors"], "notes": notes + outcome["notes"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "comparison.json", doc)
    return doc


# --------------------------------------------------------------------------- all frameworks

def run_all(args, argv: List[str]) -> List[dict]:
    """Each framework in a clean subprocess (its own interpreter if --python says so); a
    framework that fails leaves an error report and the others still run."""
    reports = []
    passthrough = _strip_options(argv, ("--framework", "--out", "--format", "--python"))
    for framework in FRAMEWORKS:
        out = Path(args.out) / framework
        out.mkdir(parents=True, exist_ok=True)
        python = args.python.get(framework, sys.executable)
        cmd = [python, "-m", "profiler.layerwise", *passthrough, "--framework", framework,
               "--out", str(out), "--format", "json", "--no-progress"]
        _stderr_console().print(f"[bold]{framework}[/bold]: {' '.join(cmd[1:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
        report_path = out / "report.json"
        if report_path.exists():
            report = json.loads(report_path.read_text())
        else:
            report = build_report(**_base_fields(args, framework, args.device), errors=[
                f"the {framework} process exited with status {proc.returncode} and wrote no "
                f"report: {proc.stderr.strip()[-800:]}"])
            write_json_atomic(report_path, report)
        if proc.returncode != 0 and not report["errors"]:
            report["errors"].append(f"exit status {proc.returncode}: "
                                    f"{proc.stderr.strip()[-800:]}")
        reports.append(report)
    write_json_atomic(Path(args.out) / "summary.json", {"reports": reports})
    return reports


def _strip_options(argv: List[str], names) -> List[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        name = item.split("=", 1)[0]
        if name in names:
            skip = "=" not in item
            continue
        out.append(item)
    return out


# --------------------------------------------------------------------------- under nsys

NSYS_REPORT = "profile"      # profile.nsys-rep, profile.sqlite in --out
# Set for the child under nsys: a child that still asked for --nsys would capture itself again.
_NSYS_CHILD = "DEEPPROF_UNDER_NSYS"


def _nsys_device(args) -> str:
    """The nsys flags' device without importing the framework here (the child does): an
    explicit --device, else whether ops._C sees a CUDA device."""
    if args.device != "auto":
        return args.device
    try:
        import ops
        return "cuda" if ops.cuda_available() else "cpu"
    except Exception:          # no build: the child will say so
        return "cpu"


def run_under_nsys(args, argv: List[str]) -> int:
    """--nsys: this same command (less --nsys) as a child under ``nsys profile``, then the
    export to SQLite and the capture's analysis (profiler.nsys) written into --out. A missing
    nsys is one error line naming how to install it."""
    from profiler.nsys import tool

    console = _stderr_console()
    if os.environ.get(_NSYS_CHILD):
        console.print(f"[red]error[/red]: --nsys: this process already runs under nsys "
                      f"({_NSYS_CHILD} is set); not capturing again", highlight=False)
        return 2
    try:
        nsys = tool.find_nsys()
    except tool.NsysNotFound as e:
        console.print(f"[red]error[/red]: --nsys: {e}", markup=True, highlight=False)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = _nsys_device(args)
    # The child writes the same outputs into the same --out (it is made explicit, so that a
    # default computed elsewhere cannot differ).
    # argparse takes any unambiguous prefix of --nsys ("--ns") for it: drop those too.
    own = [a for a in argv if not (a.startswith("--ns") and "--nsys".startswith(a))]
    child = [sys.executable, "-m", "profiler.layerwise",
             *_strip_options(own, ("--out", "--nsys-timeout", "--nsys-cpu-sampling")),
             "--out", str(out)]
    console.print(f"[bold]nsys[/bold] ({device}): {nsys} profile ... "
                  f"-o {out / NSYS_REPORT} {' '.join(child)}", highlight=False)
    try:
        report_path, status = tool.capture(child, out / NSYS_REPORT, device=device, nsys=nsys,
                                           sample_cpu=args.nsys_cpu_sampling == "on",
                                           env={**os.environ, _NSYS_CHILD: "1"},
                                           timeout_s=args.nsys_timeout)
        sqlite = tool.export_sqlite(report_path, nsys=nsys)
    except (tool.NsysFailed, FileNotFoundError) as e:
        console.print(f"[red]error[/red]: --nsys: {e}", highlight=False)
        return 1
    console.print(f"written: {report_path}, {sqlite}", highlight=False)
    if status != 0:
        console.print(f"[yellow]warning[/yellow]: the profile under nsys exited with status "
                      f"{status} (its report.json 'errors' say why); analysing what was "
                      f"captured", highlight=False)
    try:
        from profiler.nsys import analyze_capture, render_tables, write_outputs
    except ImportError as e:   # the analysis half is not installed: the capture still stands
        console.print(f"[red]error[/red]: --nsys: captured, but the analysis is not available "
                      f"({e})", highlight=False)
        return 1
    report_json = out / "report.json"
    report = json.loads(report_json.read_text()) if report_json.exists() else None
    try:
        analysis = analyze_capture(sqlite, report=report)
    except ValueError as e:    # profiler.nsys' errors are ValueErrors naming the file
        console.print(f"[red]error[/red]: --nsys: {e}", highlight=False)
        return 1
    written = write_outputs(analysis, out)
    if args.format == "table":
        render_tables(analysis)
    console.print(f"written: {', '.join(str(Path(p).name) for p in written.values())} in {out}",
                  highlight=False)
    return status


def run_user_model(args) -> dict:
    """--model FACTORY: the factory's model profiled by profiler.api.profile_training, with
    --iters, --warmup, --overhead-iters, --device, --threads, --sync as for a seed workload;
    writes the report and views into --out. A run that fails half-way keeps what it measured
    (its error in the report); one that measured nothing raises (main prints one line)."""
    from profiler.api import build_from_factory, profile_training

    out = Path(args.out)
    notes: List[str] = []
    rank = _start_distributed(args, notes)
    if rank is not None:
        out = out / f"rank{rank}"
    out.mkdir(parents=True, exist_ok=True)
    apply_threads(args, args.framework, notes)
    built = build_from_factory(args.model)
    if rank is not None:
        built["model"] = _data_parallel(built["model"])
    framework = _factory_framework(args, built)
    device = None if args.device == "auto" else args.device
    progress = _Progress(f"{framework} {built.get('name', args.model)}", not args.no_progress)
    report = profile_training(built["model"], built["loader"], built["loss_fn"],
                              built["optimizer"], framework=framework, steps=args.iters,
                              warmup=args.warmup, overhead_steps=args.overhead_iters,
                              device=device, name=built.get("name"), sync=args.sync,
                              progress=progress)
    progress.close()
    report.doc["notes"] += notes
    report.doc["threads"] = threads_section(args, framework, report.doc["notes"])
    report.save(out)
    if rank is not None:
        from profiler import distributed
        gathered = distributed.gather_to_rank0(report)
        if rank == 0:
            distributed.write_merged(gathered, Path(args.out))
            args.merged = distributed.merge(gathered)
    return report.doc


def run_user_compare(args) -> dict:
    """--model FACTORY --compare KEY=A,B,...: the factory built once per variant (called with
    KEY=variant), the variants run by profiler.api.compare_training in interleaved rounds
    (--rounds, --steps-per-round, --warmup) and compared as run_compare compares a seed
    workload's impls; writes comparison.json into --out and each variant's report (and its
    views) into --out/<variant>/. Bad input (a factory without KEY, one that raises for a
    variant) raises before anything runs (main prints one line)."""
    from profiler.analysis.variants import compare_variants
    from profiler.api import build_variants, compare_training

    key, variants = args.compare
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--compare {key}=...: compares variants in one process; under "
                         f"torchrun (WORLD_SIZE {os.environ['WORLD_SIZE']}) profile one "
                         f"variant per run instead")
    out = Path(args.out)
    notes: List[str] = []
    apply_threads(args, args.framework, notes)
    builds = build_variants(args.model, key, variants)
    for built in builds.values():
        _factory_framework(args, built)
    device = None if args.device == "auto" else args.device
    progress = _Progress(f"{args.framework} {key} compare", not args.no_progress)
    comparison = compare_training(builds, framework=args.framework, rounds=args.rounds,
                                  steps_per_round=args.steps_per_round, warmup=args.warmup,
                                  device=device, sync=args.sync, progress=progress)
    progress.close()
    threads = threads_section(args, args.framework, notes)
    for variant, report in comparison.reports.items():
        report.doc["notes"] += notes
        report.doc["threads"] = threads
        report.save(out / variant)
    measured = next(iter(comparison.reports.values()))   # compare_training raised if none
    doc = {"framework": args.framework, "model": args.model,
           "device": measured.doc["device"]["kind"], "kind": key, "variants": variants,
           "rounds": args.rounds, "steps_per_round": args.steps_per_round,
           **compare_variants({v: r.timeline for v, r in comparison.reports.items()},
                              comparison.step_round, variants),
           "threads": threads, "errors": comparison.errors,
           "notes": notes + comparison.notes}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "comparison.json", doc)
    return doc


def _factory_framework(args, built: dict) -> str:
    """The framework a factory's build says (removed from it), which must be --framework."""
    framework = built.pop("framework", args.framework)
    if framework != args.framework:
        raise ValueError(f"--model {args.model}: the factory says framework {framework!r}, "
                         f"--framework is {args.framework!r}")
    return framework


def _start_distributed(args, notes: List[str]) -> Optional[int]:
    """Under torchrun (WORLD_SIZE > 1 in the environment): joins the process group (gloo on
    the CPU, NCCL on GPUs) unless the caller did, and returns this rank; else None. Each
    rank's default --threads is its share of the cores."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if args.framework != "torch":
        raise ValueError(f"--framework {args.framework}: several ranks (WORLD_SIZE "
                         f"{os.environ['WORLD_SIZE']}) are profiled for torch.distributed "
                         f"only")
    import torch
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if args.threads == physical_cores() and local > 1:
        args.threads = max(1, physical_cores() // local)
        notes.append(f"threads: {args.threads} per rank, the cores shared by {local} ranks "
                     f"on this machine")
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    notes.append(f"rank {dist.get_rank()} of {dist.get_world_size()} "
                 f"({dist.get_backend()})")
    return dist.get_rank()


def _data_parallel(model):
    """The factory's model in DistributedDataParallel (as it is if already wrapped)."""
    import torch
    ddp = torch.nn.parallel.DistributedDataParallel
    if isinstance(model, ddp):
        return model
    params = list(model.parameters())
    on_gpu = bool(params) and params[0].device.type == "cuda"
    return ddp(model, device_ids=[params[0].device.index] if on_gpu else None)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nsys:
        return run_under_nsys(args, argv)
    if args.user_model and args.compare:
        try:
            doc = run_user_compare(args)
        except (ValueError, TypeError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)    # plain, as below
            return 2
        return _print_comparison(args, doc)
    if args.user_model:
        args.merged = None
        try:
            report = run_user_model(args)
        except (ValueError, TypeError, RuntimeError) as e:
            # Plain: rich would fold the line and read ":factory:" in a path as an emoji.
            print(f"error: {e}", file=sys.stderr)
            return 2
        distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if args.format == "json":
            print(json.dumps(args.merged or report, indent=1))
        elif args.merged is not None:        # rank 0 of several: the merged table
            from profiler.distributed import render_merged
            render_merged(args.merged)
            _stderr_console().print(f"written: {args.out}/merged_report.json, "
                                    f"trace_ranks.json, rank*/report.json")
        elif not distributed:                # the other ranks leave the printing to rank 0
            render_table(report)
            _stderr_console().print(f"written: {args.out}/report.json, trace.json, "
                                    f"flame.folded, flame.speedscope.json")
        return 1 if report["errors"] else 0
    if args.compare:
        return _print_comparison(args, run_compare(args, args.framework))
    if args.framework == "all":
        reports = run_all(args, argv)
        if args.format == "json":
            print(json.dumps(reports, indent=1))
        else:
            render_table(reports)
        return 0 if any(not r["errors"] for r in reports) else 1
    report = run_one(args, args.framework)
    if args.format == "json":
        print(json.dumps(report, indent=1))
    else:
        render_table(report)
        _stderr_console().print(f"written: {args.out}/report.json, trace.json, flame.folded, "
                                f"flame.speedscope.json")
    return 1 if report["errors"] else 0


def _print_comparison(args, doc: dict) -> int:
    """A comparison's tables (or its JSON); the exit status: 1 if it has errors."""
    if args.format == "json":
        print(json.dumps(doc, indent=1))
    else:
        what = "variants" if args.user_model else "impls"
        render_variant_phases(doc["phases_ms"])
        render_comparison(doc["differences"], title=f"{doc['framework']} {doc['model']}: "
                                                    f"{doc['kind']} {what} vs "
                                                    f"{doc['variants'][0]}")
        if args.user_model:
            _stderr_console().print(f"written: {args.out}/comparison.json, and per variant "
                                    f"report.json, trace.json, flame.folded, "
                                    f"flame.speedscope.json in "
                                    f"{', '.join(v + '/' for v in doc['variants'])}",
                                    highlight=False, soft_wrap=True)
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
