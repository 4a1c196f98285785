"""Benchmark: what a framework's instrument costs a training step, and which part of it.

    python -m experiments.bench_instruments --framework mxnet
    python -m experiments.bench_instruments --framework torch --rounds 100 --out runs/inst.json
    python -m experiments.bench_instruments --framework tensorflow --mode graph --instrument trace

One seed workload, four ways of running its step, timed in interleaved rounds (the order
rotating each round), each round's step paired with the round's plain one:

- ``plain``: the uninstrumented step the profiler times for its overhead;
- ``phases``: the profiler's step with its phase ranges (and, for an asynchronous framework, its
  waits at every phase boundary), no instrument installed;
- ``hooks_idle``: the plain step with the instrument installed and the recorder off (what its
  hooks cost when they record nothing);
- ``instrumented``: the profiler's step as it runs (phases, layer ranges, NVTX).

``--instrument trace`` times the trace-based instrument instead (``hooks_idle`` is then the
framework's profiler running with nothing read; reading the trace after a step is outside every
timing, as in the profiler). ``--mode graph`` times the compiled step.

Prints each variant's median step and its paired overhead against ``plain``: the median of the
rounds' ratios with its exact interval (profiler.analysis.stats.paired_ratio_interval; its
coverage and n printed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Dict, List, Optional

from experiments.timing import add_threads_argument, apply_threads
from ops.frameworks import FRAMEWORKS
from profiler.analysis.stats import interleaved_order, median, paired_ratio_interval
from profiler.console import output_file
from profiler.report import write_json_atomic


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_instruments",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--framework", default="torch", choices=FRAMEWORKS)
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mode", default="eager", choices=("eager", "graph"))
    parser.add_argument("--instrument", default="hooks", choices=("hooks", "trace"),
                        help="which instrument's cost to time")
    parser.add_argument("--rounds", type=int, default=60,
                        help="rounds; each runs every variant once")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each variant first")
    parser.add_argument("--out", type=output_file, default=None, help="also write the results here")
    add_threads_argument(parser)
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got "
                         f"{getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected an integer >= 0, got {args.warmup}")
    return args


def variants(session) -> Dict[str, Callable[[], float]]:
    """The four ways of running one step (module docstring), each returning its ms: the
    engine's Session runs each (profiler.engine)."""
    return {"plain": session.plain_step, "phases": session.phases_step,
            "hooks_idle": session.idle_hooks_step, "instrumented": session.step}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    threads = apply_threads(args.threads, [args.framework])
    from profiler.engine import Session
    from profiler.targets import WorkloadTarget
    try:
        target = WorkloadTarget.build(args.framework, model=args.model,
                                      batch_size=args.batch_size, mode=args.mode)
        target.instrument = args.instrument
        session = Session(target, steps_needed=(args.warmup + args.rounds) * 4 + 1)
    except ValueError as e:        # a bad --model, --batch-size, --mode: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    steps = variants(session)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    try:
        for name, step in steps.items():
            for _ in range(args.warmup):
                step()
        for done, order in enumerate(interleaved_order(list(steps), args.rounds), 1):
            for name in order:
                times[name].append(steps[name]())
            if done % 10 == 0:
                print(f"round {done}/{args.rounds}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:      # keep what was measured
        print("interrupted: the rounds so far", file=sys.stderr)
    finally:
        session.close()
    rounds = min(len(v) for v in times.values())
    if rounds < 2:
        print("error: fewer than two complete rounds", file=sys.stderr)
        return 1
    rows = {}
    print(f"{args.framework} {args.model} {args.mode} batch {args.batch_size}, "
          f"{args.instrument} instrument: {rounds} rounds, overhead = median of the rounds' "
          f"ratios to plain [exact interval of that median]")
    for name, samples in times.items():
        samples = samples[:rounds]
        row = {"median_ms": median(samples), "samples_ms": samples}
        if name != "plain":
            try:
                effect = paired_ratio_interval(times["plain"][:rounds], samples)
            except ValueError as e:          # too few rounds for an interval
                print(f"  {name:13s} {row['median_ms']:9.1f} ms  (no interval: {e})")
                rows[name] = row
                continue
            row.update(overhead_pct=effect.estimate, overhead_ci_pct=[effect.low, effect.high],
                       coverage=effect.confidence, n=effect.n)
            print(f"  {name:13s} {row['median_ms']:9.1f} ms  {effect.estimate:+6.1f}% "
                  f"[{effect.low:+.1f}, {effect.high:+.1f}] ({effect.confidence:.1%}, "
                  f"n = {effect.n})")
        else:
            print(f"  {name:13s} {row['median_ms']:9.1f} ms")
        rows[name] = row
    if args.out is not None:
        write_json_atomic(args.out, {"framework": args.framework, "model": args.model,
                              "mode": args.mode, "instrument": args.instrument,
                              "batch_size": args.batch_size, "rounds": rounds,
                              "threads": threads, "variants": rows})
        print(f"written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
