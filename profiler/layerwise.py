"""``python -m profiler.layerwise``: where a training step's time goes, layer by layer, in one
framework or in all four.

Examples::

    python -m profiler.layerwise --framework chainer
    python -m profiler.layerwise --framework all --model resnet20
    python -m profiler.layerwise --framework torch --model deeppose --compare loss=autograd,native
    python -m profiler.layerwise --model tests/user_models/torch_cnn.py:factory \\
        --compare conv=torch,kernel

Writes report.json (schema: profiler.report), trace.json (Chrome trace events: Perfetto,
chrome://tracing), flame.folded and flame.speedscope.json into --out, and prints a table.
``--nsys`` runs the same profile again as a child under Nsight Systems (profiler.nsys.capture).

This module maps arguments to library calls (profiler.engine with a target of profiler.targets,
the same calls a user makes from Python); it holds no mechanism of its own.
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

from ops.frameworks import FRAMEWORKS, cpu_name, resolve_device, version_or_unknown
from ops.impls import CONV_IMPLS, LOSS_IMPLS
from ops.threads import physical_cores
from profiler import console, distributed, engine, environment
from profiler import instrument as instruments
from profiler.console import non_negative_int, positive_int
from profiler.report import (build_report, render_comparison, render_table,
                             render_variant_phases, write_json_atomic)
from profiler.workloads.base import MODES
from profiler.workloads.spec import MODELS

OUTPUTS = "report.json, trace.json, flame.folded, flame.speedscope.json"


# --------------------------------------------------------------------------- arguments

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m profiler.layerwise", formatter_class=console.HelpFormatter,
        description="Profile training steps layer by layer: per-layer forward/backward, loss "
                    "forward/backward, optimizer, data-loader wait, host-to-device copy and the "
                    "rest, with NVTX ranges for Nsight Systems.",
        epilog=f"Outputs in --out: {OUTPUTS} (trace.json opens in https://ui.perfetto.dev, "
               "flame.folded in flamegraph.pl, the speedscope file in speedscope.app); with "
               "--nsys also profile.nsys-rep, profile.sqlite and the capture's analysis "
               "(nsys.folded, nsys.speedscope.json, nsys.svg, nsys_analysis.json). Guide: "
               "docs/profiler.md.")
    what = p.add_argument_group("what to profile")
    what.add_argument("--framework", default="torch", choices=FRAMEWORKS + ("all",),
                      help="'all' runs each framework in its own process and merges them")
    what.add_argument("--model", default="resnet20", metavar="MODEL|FACTORY",
                      help=f"a seed workload ({', '.join(MODELS)}) or your own model: "
                           f"'package.module:function' or 'path/to/file.py:function' returning "
                           f"dict(model=, loader=, loss_fn=, optimizer=[, framework=, name=]) "
                           f"(docs/your-own-model.md)")
    what.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                      help="auto: cuda where the framework sees a GPU, else cpu")
    what.add_argument("--mode", default="eager", choices=MODES,
                      help="eager: op by op; graph: the framework's compiled mode, as its users "
                           "train (tf.function, hybridized Gluon, torch.compile; Chainer has "
                           "none): docs/profiler.md, 'Modes'")
    what.add_argument("--xla", action="store_true",
                      help="with --framework tensorflow --mode graph: jit_compile=True")
    seed = p.add_argument_group("seed workloads only")
    seed.add_argument("--batch-size", type=positive_int, default=32, help="samples per step")
    seed.add_argument("--conv-impl", default="framework", choices=CONV_IMPLS,
                      help="every convolution's impl (docs/kernels-and-adapters.md)")
    seed.add_argument("--loss-impl", default="autograd", choices=LOSS_IMPLS,
                      help="deeppose's loss (ResNet uses the framework's cross-entropy)")
    seed.add_argument("--workers", type=non_negative_int, default=0,
                      help="data-loader worker processes (threads for tf.data)")
    seed.add_argument("--data", default="synthetic",
                      help="'synthetic' or a path: cifar-10-batches-py for ResNet, an LSP "
                           "folder (joints.mat + images/) for deeppose")
    seed.add_argument("--synthetic-size", type=positive_int, default=None, metavar="N",
                      help="training-set size of the synthetic data (default: the real "
                           "dataset's, 50000 CIFAR / 1000 LSP images); for quick runs")
    seed.add_argument("--seed", type=non_negative_int, default=0,
                      help="seed of the weights, the data and its order")
    seed.add_argument("--python", action="append", default=[], metavar="FRAMEWORK=PATH",
                      help="with --framework all: the interpreter of a framework kept in "
                           "another environment (repeatable)")
    steps = p.add_argument_group("steps")
    steps.add_argument("--warmup", type=non_negative_int, default=2,
                       help="steps run first and not counted")
    steps.add_argument("--iters", type=positive_int, default=8, help="measured steps")
    steps.add_argument("--overhead-iters", type=non_negative_int, default=None,
                       help="uninstrumented steps timed for the instrumentation overhead "
                            "(default: --iters; 0 skips)")
    steps.add_argument("--instrument", default="auto", choices=("auto", "hooks", "trace"),
                       help="hooks: our hooks time each layer while the step runs; trace: the "
                            "framework's own trace (TensorFlow's XSpace, torch.profiler, "
                            "MXNet's profiler) is read after each step; auto: trace in graph "
                            "mode where it times layers (no hook runs inside a compiled "
                            "graph), else hooks (docs/profiler.md, 'Instruments')")
    steps.add_argument("--cross-check", action="store_true",
                       help="eager mode: read the framework's trace on the same steps as the "
                            "hooks and print how far their layer times agree")
    steps.add_argument("--sync", action="store_true",
                       help="synchronise the device at every range boundary instead of "
                            "reading events once per step")
    steps.add_argument("--threads", type=positive_int, default=physical_cores(), metavar="N",
                       help="CPU threads for the framework, its BLAS/OpenMP and our kernels, "
                            "set before the framework starts (default: the physical cores "
                            "this process may use)")
    comp = p.add_argument_group("comparing variants (interleaved rounds)")
    comp.add_argument("--compare", default=None, metavar="KEY=A,B,...",
                      help="variants, the first the baseline: a seed workload's impls "
                           "(loss=autograd,explicit,kernel,native or conv=framework,native), "
                           "or any keyword argument of a factory, called once per variant "
                           "with KEY=variant; each variant's report goes to --out/<variant>/")
    comp.add_argument("--rounds", type=positive_int, default=5,
                      help="rounds; each runs every variant")
    comp.add_argument("--steps-per-round", type=positive_int, default=2,
                      help="measured steps of a variant in each round")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None,
                     help="output folder (default: runs/layerwise/<framework>-<model>)")
    out.add_argument("--format", default="table", choices=("table", "json"),
                     help="what to print: tables, or the report JSON")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument("--pyspy", action="store_true",
                     help="also record a py-spy flame graph (pyspy.svg) of this process")
    nsys = p.add_argument_group("Nsight Systems (docs/nsys.md)")
    nsys.add_argument("--nsys", action="store_true",
                      help="run this profile under nsys profile (NVTX, CPU samples, CUDA on a "
                           "GPU) and analyse the capture per range; one framework, no --compare")
    nsys.add_argument("--nsys-timeout", type=positive_int, default=1800, metavar="S",
                      help="stop nsys after S seconds (nsys 2022.4 sometimes never finishes)")
    nsys.add_argument("--nsys-cpu-sampling", default="on", choices=("on", "off"),
                      help="sample CPU call stacks; 'off' keeps a GPU capture small")
    return p


# Options that shape a seed workload, with nothing to act on in a user's factory.
_SEED_ONLY = ("batch_size", "conv_impl", "loss_impl", "workers", "data", "synthetic_size",
              "seed", "python", "pyspy", "xla")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    fail = parser.error
    # Options a mode has no use for are refused, not ignored: a run must do what it says.
    per_mode = {True: ("iters", "overhead_iters"), False: ("rounds", "steps_per_round")}
    unused = [n for n in per_mode[args.compare is not None]
              if getattr(args, n) != parser.get_default(n)]
    if unused:
        fail(f"{', '.join(_flag(n) for n in unused)}: " + (
            "--compare runs --warmup, then --rounds rounds of --steps-per-round steps of every "
            "variant, all of them measured" if args.compare is not None else
            "only with --compare; a profile runs --warmup, --iters and --overhead-iters steps"))
    if args.overhead_iters is None:
        args.overhead_iters = args.iters
    args.user_model = args.model not in MODELS
    if args.user_model:
        if ":" not in args.model:
            fail(f"--model: expected one of {list(MODELS)} or a factory 'package.module:"
                 f"function' / 'path/to/file.py:function', got {args.model!r}")
        given = [n for n in _SEED_ONLY if getattr(args, n) != parser.get_default(n)]
        if given:
            fail(f"{', '.join(_flag(n) for n in given)}: apply to the seed workloads; a "
                 f"factory's model, loader, loss and optimizer are its own (set them in the "
                 f"factory), got --model {args.model}")
        if args.framework == "all":
            fail(f"--framework all: a factory builds one framework's model; pass its "
                 f"--framework, got --model {args.model}")
    if args.compare is not None:
        args.compare = _parse_compare(fail, args.compare, args.user_model)
    args.python = _parse_pythons(fail, args.python)
    if args.model != "deeppose" and args.loss_impl != "autograd":
        fail(f"--loss-impl: {args.model} trains with the framework's softmax cross-entropy; "
             f"loss impls apply to --model deeppose")
    if args.compare and not args.user_model and args.compare[0] == "loss" \
            and args.model != "deeppose":
        fail("--compare loss=...: loss impls apply to --model deeppose")
    if args.xla and (args.mode != "graph" or args.framework != "tensorflow"):
        fail(f"--xla: compiles TensorFlow's graph-mode step; expected --framework tensorflow "
             f"--mode graph, got --framework {args.framework} --mode {args.mode}")
    if args.cross_check and (args.mode != "eager" or args.instrument == "trace"
                             or args.framework in ("chainer", "all")):
        fail(f"--cross-check: compares the hooks with the framework's trace on eager steps "
             f"of one framework that has a trace (tensorflow, torch, mxnet); got --framework "
             f"{args.framework} --mode {args.mode} --instrument {args.instrument}")
    if args.instrument == "trace" and args.framework in instruments.NO_TRACE:
        fail(f"--instrument trace: no trace-based instrument for {args.framework}: "
             f"{instruments.NO_TRACE[args.framework]}")
    if args.framework == "all" and args.compare:
        fail("--compare runs in one framework; pick --framework")
    if args.nsys and (args.framework == "all" or args.compare):
        fail(f"--nsys: captures one profile; expected one --framework and no --compare, got "
             f"--framework {args.framework}"
             + (f" --compare {args.compare[0]}=..." if args.compare else ""))
    if args.out is None:
        label = args.model.rpartition(":")[2] if args.user_model else args.model
        args.out = str(Path("runs", "layerwise", f"{args.framework}-{label}"))
    return args


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_compare(fail, text: str, user_model: bool):
    """--compare KEY=A,B,...: for a seed workload KEY is loss or conv and the variants its
    impls; for a factory any keyword argument (a Python identifier), each variant usable as
    the folder of its report."""
    key, sep, names = text.partition("=")
    variants = [n.strip() for n in names.split(",") if n.strip()]
    distinct = len(variants) >= 2 and len(set(variants)) == len(variants)
    if not user_model:
        known = {"loss": LOSS_IMPLS, "conv": CONV_IMPLS}
        if key not in known or not names:
            fail(f"--compare: expected loss=A,B,... or conv=A,B,..., got {text!r}")
        if not distinct or any(v not in known[key] for v in variants):
            fail(f"--compare: expected at least two distinct {key} impls from "
                 f"{list(known[key])}, got {variants}")
        return key, variants
    if not sep or not key.isidentifier() or keyword.iskeyword(key):
        fail(f"--compare: expected KEY=A,B,... with KEY a keyword argument of the factory (a "
             f"Python identifier), got {text!r}")
    if not distinct:
        fail(f"--compare {key}=...: expected at least two distinct variants, got {variants}")
    bad = [v for v in variants if not re.fullmatch(r"\w[\w.+-]*", v)]
    if bad:
        fail(f"--compare {key}=...: each variant names its report's folder in --out; expected "
             f"letters, digits and _ . + - (not first: . + -), got {bad}")
    return key, variants


def _parse_pythons(fail, items: List[str]) -> Dict[str, str]:
    out = {}
    for item in items:
        framework, _, path = item.partition("=")
        if framework not in FRAMEWORKS or not path:
            fail(f"--python: expected FRAMEWORK=PATH with FRAMEWORK one of {list(FRAMEWORKS)}, "
                 f"got {item!r}")
        if shutil.which(path) is None:
            fail(f"--python: {path}: not an executable")
        out[framework] = path
    return out


# --------------------------------------------------------------------------- runs

def _seed_fields(args) -> dict:
    """What a seed workload's error report says of the run (no measurement came)."""
    return dict(device={"name": cpu_name(), "kind": args.device}, model=args.model,
                mode=args.mode,
                batch_size=args.batch_size, workers=args.workers, seed=args.seed,
                impls={"conv": args.conv_impl, "loss": args.loss_impl if args.model ==
                       "deeppose" else "framework cross-entropy"},
                sync=args.sync, iters=args.iters, warmup=args.warmup)


def run(args) -> dict:
    """Profiles (or, with --compare, compares) as the arguments say; writes the outputs into
    --out and returns the report (or the comparison). A seed workload that fails leaves a
    report saying why; a factory's bad input raises (main prints one line)."""
    notes: List[str] = []
    args.rank = None
    if args.user_model:
        if args.compare and distributed.world_size() > 1:
            raise ValueError(f"--compare {args.compare[0]}=...: compares variants in one "
                             f"process; under torchrun (WORLD_SIZE {distributed.world_size()}) "
                             f"profile one variant per run instead")
        joined = distributed.join(args.framework, args.device, args.threads, physical_cores(),
                                  notes)
        if joined:
            args.rank, args.threads = joined
    out = Path(args.out) / (f"rank{args.rank}" if args.rank is not None else "")
    environment.check_output_dir(out)
    environment.use_threads(args.threads, [args.framework], notes)
    what = f"{args.framework} {args.compare[0] + ' compare' if args.compare else args.model}"
    progress = console.Progress(what, not args.no_progress)
    try:
        with environment.pyspy_recording(out, notes, enabled=args.pyspy):
            targets = _targets(args)
            chosen = instruments.choose(args.framework, args.mode, args.instrument)
            for target in targets.values():
                target.instrument, target.cross_check = chosen, args.cross_check
            if args.compare:
                result = engine.compare(targets, rounds=args.rounds, warmup=args.warmup,
                                        steps_per_round=args.steps_per_round, sync=args.sync,
                                        progress=progress)
            else:
                result = engine.profile(targets[None], steps=args.iters, warmup=args.warmup,
                                        overhead_steps=args.overhead_iters, sync=args.sync,
                                        progress=progress)
    except Exception as e:
        if args.user_model:
            raise
        progress.close()
        report = build_report(framework=args.framework, **_seed_fields(args),
                              framework_version=version_or_unknown(args.framework),
                              notes=notes, errors=[f"{type(e).__name__}: {e}"])
        write_json_atomic(out / "report.json", report)
        return report
    progress.close()
    threads = environment.threads_section(args.threads, args.framework, notes)
    if not args.compare:
        result.doc["notes"] = notes + result.doc["notes"]
        result.doc["threads"] = threads
        result.save(out)
        if args.rank is not None:
            gathered = distributed.gather_to_rank0(result)
            if args.rank == 0:
                distributed.write_merged(gathered, Path(args.out))
                args.merged = distributed.merge(gathered)
        return result.doc
    for report in result.reports.values():
        report.doc["notes"] = notes + report.doc["notes"]
        report.doc["threads"] = threads
    doc = result.document(notes, framework=args.framework, model=args.model,
                          mode=args.mode, kind=args.compare[0], rounds=args.rounds,
                          steps_per_round=args.steps_per_round, threads=threads)
    result.save(out, doc)
    return doc


def _targets(args) -> dict:
    """{variant: target} for --compare, else {None: target} (profiler.targets)."""
    from profiler import targets
    if args.user_model:
        wrap = distributed.data_parallel if args.rank is not None else None
        return targets.factory_targets(args.model, args.framework, compare=args.compare,
                                       device=None if args.device == "auto" else args.device,
                                       wrap=wrap, mode=args.mode)
    from profiler.workloads import WorkloadConfig
    config = WorkloadConfig(model=args.model, device=resolve_device(args.framework, args.device),
                            batch_size=args.batch_size, seed=args.seed, conv_impl=args.conv_impl,
                            loss_impl=args.loss_impl, workers=args.workers, data=args.data,
                            train_size=args.synthetic_size, test_size=args.synthetic_size,
                            mode=args.mode, xla=args.xla)
    return targets.seed_targets(args.framework, config, compare=args.compare)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.merged = None
    try:
        environment.check_output_dir(args.out, shared=distributed.world_size() > 1)
    except ValueError as e:
        console.error_line(str(e))
        return 2
    if args.nsys:
        from profiler.nsys.capture import auto_device, profile_under_nsys
        device = args.device if args.device != "auto" else auto_device()
        return profile_under_nsys(argv, Path(args.out), device=device,
                                  sample_cpu=args.nsys_cpu_sampling == "on",
                                  timeout_s=args.nsys_timeout, print_tables=args.format == "table",
                                  console=console.stderr_console())
    if args.framework == "all":
        from profiler.all_frameworks import profile_each
        fields = _seed_fields(args)
        reports = profile_each(argv, Path(args.out), pythons=args.python, fields=fields,
                               console=console.stderr_console())
        print(json.dumps(reports, indent=1)) if args.format == "json" else render_table(reports)
        return 0 if any(not r["errors"] for r in reports) else 1
    try:
        doc = run(args)
    except (ValueError, TypeError, RuntimeError) as e:
        console.error_line(str(e))
        return 2
    if args.format == "json":
        print(json.dumps(args.merged or doc, indent=1))
    elif args.compare:
        _print_comparison(args, doc)
    elif args.merged is not None:        # rank 0 of several: the merged table
        distributed.render_merged(args.merged)
        console.stderr_console().print(f"written: {args.out}/merged_report.json, "
                                       f"trace_ranks.json, rank*/report.json")
    elif args.rank is None:              # the other ranks leave the printing to rank 0
        render_table(doc)
        console.stderr_console().print(f"written: {args.out}/report.json, trace.json, "
                                       f"flame.folded, flame.speedscope.json")
    return 1 if doc["errors"] else 0


def _print_comparison(args, doc: dict) -> None:
    what = "variants" if args.user_model else "impls"
    render_variant_phases(doc["phases_ms"])
    render_comparison(doc["differences"], title=f"{doc['framework']} {doc['model']}: "
                                                f"{doc['kind']} {what} vs {doc['variants'][0]}")
    console.stderr_console().print(
        f"written: {args.out}/comparison.json, and per variant {OUTPUTS} in "
        f"{', '.join(v + '/' for v in doc['variants'])}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
