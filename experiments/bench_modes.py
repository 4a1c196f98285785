"""Benchmark: each framework's step in eager and in graph mode, and the profiler's graph-mode
step against a plain loop, as ratios measured side by side.

    python -m experiments.bench_modes                          # every framework, one by one
    python -m experiments.bench_modes --framework tensorflow --rounds 30 --out runs/modes.json

One seed workload (default ResNet-20, batch 32) per mode, built from the same config (the same
weights and batches), each stepped through the engine (profiler.engine.Session) in interleaved
rounds (the order rotating each round), after warm-up steps that compile the graph:

- ``eager``: the uninstrumented eager step;
- ``graph``: the uninstrumented graph-mode step (the framework's compiled mode);
- ``graph_profiled``: the graph-mode step as ``python -m profiler.layerwise --mode graph``
  times it (its phases recorded);
- ``plain_tf_function`` (TensorFlow): a training loop written as a TensorFlow user writes it,
  one ``tf.function`` step over the same Keras model and optimizer, not our workload's code.

Prints each variant's median step with its IQR, and the paired ratios (the median of the
rounds' ratios with a bootstrap 95% interval): graph / eager (what eager dispatch costs) and,
for TensorFlow, graph_profiled / plain_tf_function (whether the profiler's graph step is the
step a user runs). The first (compiling) step's time is printed apart. Each framework runs in a
process of its own (``--framework all``, the default). This is a script, not a test: it never
fails on speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from experiments.timing import add_threads_argument, apply_threads
from ops.frameworks import FRAMEWORKS, import_order
from profiler.analysis.stats import interleaved_order, iqr, median, paired_ratio_ci
from profiler.console import output_file, positive_int
from profiler.report import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
# Below this many paired rounds a percentile bootstrap of their median covers the true value
# far less often than 95% (at 5 it is the rounds' min..max): issue 22's finding.
MIN_ROUNDS_FOR_INTERVAL = 10


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_modes",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", default="all", choices=FRAMEWORKS + ("all",),
                        help="one framework, or each in a process of its own (default: all)")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=12,
                        help="rounds; each runs every variant once (default: 12)")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="uncounted steps of each variant first; the first compiles "
                             "(default: 2)")
    parser.add_argument("--synthetic-size", type=positive_int, default=512,
                        help="training-set size of the synthetic data (default: 512)")
    parser.add_argument("--xla", action="store_true",
                        help="TensorFlow's graph step with jit_compile=True")
    parser.add_argument("--out", type=output_file, default=None,
                        help="also write the results (JSON) here")
    parser.add_argument("--json", action="store_true", help="print the result as JSON only")
    add_threads_argument(parser)
    return parser.parse_args(argv)


def plain_tf_function_step(workload) -> Callable[[object], float]:
    """A TensorFlow user's training step over the workload's Keras model and optimizer: one
    tf.function (forward, loss, gradients, weight decay on the kernels, the update), with no
    code of ours in it. Returns step(batch) -> loss."""
    import tensorflow as tf
    from profiler.workloads import spec
    net, optimizer = workload.net, workload.optimizer
    variables = net.trainable_variables
    decayed = ["kernel" in v.path for v in variables]

    @tf.function(reduce_retracing=True)
    def step(images, *targets):
        with tf.GradientTape() as tape:
            loss = workload.compute_loss(net(images, training=True), (images, *targets))
        grads = tape.gradient(loss, variables)
        grads = [g + spec.WEIGHT_DECAY * v if d else g
                 for g, v, d in zip(grads, variables, decayed)]
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return lambda batch: float(step(*workload.to_device(batch)))


def measure(args) -> Dict[str, object]:
    """The variants of one framework (module docstring), interleaved; the result as a dict."""
    threads = apply_threads(args.threads, [args.framework])
    from profiler.engine import Session
    from profiler.targets import WorkloadTarget
    from profiler.workloads import WorkloadConfig
    config = WorkloadConfig(model=args.model, batch_size=args.batch_size,
                            train_size=args.synthetic_size, test_size=args.synthetic_size)
    steps_needed = args.warmup + args.rounds + 1
    eager = Session(WorkloadTarget.build(args.framework, config), steps_needed=steps_needed)
    variants: Dict[str, Callable[[], float]] = {"eager": eager.plain_step}
    notes: List[str] = []
    graph_target = None
    try:
        graph_target = WorkloadTarget.build(args.framework,
                                            config.with_(mode="graph", xla=args.xla))
    except ValueError as e:                  # a framework without a graph mode says why
        notes.append(str(e))
    if graph_target is not None:
        graph = Session(graph_target, steps_needed=2 * steps_needed)
        variants.update(graph=graph.plain_step, graph_profiled=graph.step)
        if args.framework == "tensorflow":
            plain = plain_tf_function_step(graph_target.workload)
            variants["plain_tf_function"] = _timed(lambda: plain(graph.next_batch()),
                                                   graph_target.workload.synchronize)
    first_ms: Dict[str, float] = {}
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for name, step in variants.items():
        for k in range(args.warmup):
            ms = step()
            if k == 0:
                first_ms[name] = ms
    for order in interleaved_order(list(variants), args.rounds):
        for name in order:
            times[name].append(variants[name]())
    eager.close()
    result = {"framework": args.framework, "model": args.model, "batch_size": args.batch_size,
              "rounds": args.rounds, "warmup": args.warmup, "xla": args.xla,
              "threads": threads[args.framework], "notes": notes,
              "first_step_ms": first_ms,
              "variants": {name: {"median_ms": median(v), "iqr_ms": iqr(v), "samples_ms": v}
                           for name, v in times.items()},
              "ratios": {}}
    for label, top, bottom in (("graph / eager", "graph", "eager"),
                               ("graph_profiled / plain_tf_function", "graph_profiled",
                                "plain_tf_function"),
                               ("graph_profiled / graph", "graph_profiled", "graph")):
        if top in times and bottom in times:
            est, low, high = paired_ratio_ci(times[bottom], times[top])
            result["ratios"][label] = {"estimate_pct": est, "ci95_pct": [low, high],
                                       "n": args.rounds}
    return result


def _timed(fn: Callable[[], object], synchronize: Callable[[], None]) -> Callable[[], float]:
    import time

    def step() -> float:
        began = time.perf_counter_ns()
        fn()
        synchronize()
        return (time.perf_counter_ns() - began) / 1e6
    return step


def print_result(result: Dict[str, object]) -> None:
    print(f"{result['framework']} {result['model']} batch {result['batch_size']}, "
          f"{result['rounds']} rounds, ms per step: median [IQR]")
    for name, row in result["variants"].items():
        first = result["first_step_ms"].get(name)
        print(f"  {name:18s} {row['median_ms']:9.1f} [{row['iqr_ms']:.1f}]"
              + (f"   first step {first:.0f} ms" if first is not None else ""))
    for label, ratio in result["ratios"].items():
        low, high = ratio["ci95_pct"]
        # A bootstrap interval of a median of few rounds is only their range (issue 22).
        what = ("95% bootstrap interval" if ratio["n"] >= MIN_ROUNDS_FOR_INTERVAL else
                f"fewer than {MIN_ROUNDS_FOR_INTERVAL} rounds: the bracket is about the range "
                f"of the rounds' ratios, not a 95% interval")
        print(f"  {label}: {ratio['estimate_pct']:+.1f}% [{low:+.1f}, {high:+.1f}] "
              f"(median of {ratio['n']} paired rounds; {what})")
    for note in result["notes"]:
        print(f"  note: {note}")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.framework != "all":
        result = measure(args)
        print(json.dumps(result)) if args.json else print_result(result)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(args.out, result)
        return 0
    results, status = [], 0
    rest = [a for a in argv if a not in ("--json",)]
    for framework in import_order(FRAMEWORKS):
        cmd = [sys.executable, "-m", "experiments.bench_modes", *_without_out(rest),
               "--framework", framework, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if proc.returncode != 0:
            status = 1
            print(f"{framework}: failed (exit {proc.returncode}): {proc.stderr.strip()[-600:]}",
                  file=sys.stderr)
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(result)
        print_result(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"results": results})
    return status


def _without_out(argv: List[str]) -> List[str]:
    from profiler.nsys.capture import strip_options
    return strip_options(argv, ("--out", "--framework"))


if __name__ == "__main__":
    sys.exit(main())
