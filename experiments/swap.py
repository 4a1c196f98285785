"""Study H2: the same convolution kernel swapped into every framework. How much of each
framework's gap to PyTorch is its convolution, and how much remains (framework overhead: the
other layers, autograd bookkeeping, optimizer, data)?

    python -m experiments.swap                         # quick scale (make experiments)
    python -m experiments.swap --full

ResNet-20 at batch 128 in every framework, each in its own worker; every round visits each
framework (rotating order) and within it the framework's own convolution ("framework") and our
kernel registered as the framework's op ("native"; Chainer's native is its kernel FunctionNode)
in rotating order, timing uninstrumented steps. Per round:

    gap           = step(framework, own conv) - step(PyTorch, own conv)
    gap, same conv = step(framework, our conv) - step(PyTorch, our conv)   (framework overhead)
    conv part      = gap - gap with the same conv

A few instrumented steps with our conv everywhere then split what remains by phase.

Execution modes (--mode): every (conv, mode) is a cell of the same rounds. In eager mode one
workload switches its conv before each visit; in graph mode each conv has a workload of its own
(built with it: switching would recompile a TensorFlow or MXNet graph every round), and "our
conv" is ``native`` there too (``kernel``, Python glue, is refused in a compiled graph). The
tables compare the frameworks within each set of modes the --mode gives (eager, graph, both
sets, or published: each framework in the mode the published comparison ran it in), every
framework's gap taken to PyTorch in the set's mode for PyTorch. Chainer has no graph mode
(skipped, the reason noted).
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from experiments import study
from experiments.workers import Cell, Pool, interleaved_rounds, round_values
from profiler.analysis.stats import iqr, median
from profiler.timeline import OPTIONAL_PHASES, PHASES

STUDY = "swap"
CONVS = ("framework", "native")
# rounds >= study.MIN_ROUNDS: the verdicts are medians over rounds with exact intervals.
QUICK = dict(model="resnet20", batch_size=128, rounds=10, steps_per_round=1, warmup=2,
             phase_rounds=2, train_size=2048)
FULL = dict(model="resnet20", batch_size=128, rounds=20, steps_per_round=3, warmup=3,
            phase_rounds=5, train_size=None)
# The mechanism claimed: the convolution implementation dominates a framework's gap, i.e. the
# same kernel in both removes at least this share of it.
CONV_SHARE_PCT = 50.0


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{STUDY}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_common_arguments(parser, STUDY, default_mode="both")
    parser.add_argument("--rounds", type=study.positive_int, help="override the scale's rounds")
    parser.add_argument("--batch-size", type=study.positive_int,
                        help="override the scale's batch")
    args = parser.parse_args(argv)
    args.frameworks_list = study.resolve_frameworks(parser, args, study.FRAMEWORKS)
    if "torch" not in args.frameworks_list:
        parser.error("--frameworks: the gaps are to PyTorch; expected torch among them")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    scale = "full" if args.full else "quick"
    settings = dict(FULL if args.full else QUICK)
    settings.update({k: v for k, v in (("rounds", args.rounds), ("batch_size", args.batch_size))
                     if v is not None})
    settings.update(frameworks=args.frameworks_list, threads=args.threads, device=args.device,
                    convs=list(CONVS), mode=args.mode,
                    modes=study.modes_for(args.mode, args.frameworks_list))
    departures = ["not a published experiment: the published comparison could not swap "
                  "kernels; ResNet-20 stands for the model"]
    if settings["train_size"]:
        departures.append(f"synthetic CIFAR-shaped data, {settings['train_size']} images cycled")
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures, notes=[study.STAND_IN_NOTE],
                          quiet_wait_s=args.quiet_wait)
    return result.run(run, args, settings, result)


def model_label(model: str) -> str:
    """'ResNet-20'."""
    return model.replace("resnet", "ResNet-")


def cell_key(conv: str, mode: str) -> str:
    """The key a (conv, execution mode) cell is sampled under: "native/graph"."""
    return f"{conv}/{mode}"


def run(args, settings, result: study.Result) -> None:
    frameworks = args.frameworks_list
    batch = settings["batch_size"]
    steps_needed = (settings["warmup"] * 2 + settings["rounds"] * settings["steps_per_round"]
                    * 2 + settings["phase_rounds"] + 1)
    config = {"model": settings["model"], "batch_size": batch,
              "train_size": settings["train_size"],
              "test_size": batch if settings["train_size"] else None}
    plan = study.ModePlan(args.mode, frameworks)
    with Pool(frameworks, threads=args.threads, device=args.device, log_dir=result.out) as pool:
        warmups, cells, phase_cells = {}, {}, {}
        for framework in frameworks:
            result.record_worker(framework, pool.hello[framework])
            worker = pool.use(framework)
            warmups[framework], cells[framework], phase_cells[framework] = {}, [], []
            for mode in list(plan.modes[framework]):
                study.progress(f"{STUDY}: {framework} {mode}: build, warm up both convs")
                for conv in CONVS:
                    # Graph mode: a workload per conv, built with it; eager: one, switched.
                    name = f"net/{mode}/{conv}" if mode == "graph" else f"net/{mode}"
                    if mode == "graph" or conv == CONVS[0]:
                        built = plan.build(worker, result, name=name,
                                           steps_needed=steps_needed,
                                           config={**config, "mode": mode, "conv_impl": conv})
                        if built is None:
                            break
                        missing = {c: r for c, r in built["unavailable"]["conv"].items()
                                   if c in CONVS}
                        if missing:
                            raise RuntimeError(f"{framework} {mode}: conv impls unavailable "
                                               f"here: {missing}")
                    impls = None if mode == "graph" else {"conv": conv}
                    if impls:
                        worker.call("set_impls", name=name, **impls)
                    warmups[framework][cell_key(conv, mode)] = worker.call(
                        "steps", name=name, n=settings["warmup"], mode="plain")["step_ms"]
                    cells[framework].append(Cell(cell_key(conv, mode), name, impls))
                    if conv == "native":
                        phase_cells[framework].append(Cell(cell_key(conv, mode), name, impls))
        result.add_samples("warmup_step_ms", warmups)
        cells = {f: c for f, c in cells.items() if c}
        phase_cells = {f: c for f, c in phase_cells.items() if c}

        def saved(r, samples):
            result.add_samples("rounds", samples)
            study.progress(f"{STUDY}: round {r + 1}/{settings['rounds']} done")

        samples = interleaved_rounds(pool, cells, rounds=settings["rounds"],
                                     steps=settings["steps_per_round"], mode="plain",
                                     on_round=saved)
        # Where the remaining overhead sits: instrumented steps with our conv everywhere.
        phases = interleaved_rounds(pool, phase_cells, rounds=settings["phase_rounds"],
                                    steps=1, mode="instrumented")
        result.add_samples("phase_rounds_native", phases)
        result.doc["settings"]["handoff_settle"] = pool.settle_summary()
        result.doc["machine"]["worker_peak_rss_mib"] = pool.peak_rss_mib()
        result.save()
    # Once for all comparison sets: they share the rounds.
    contended = result.contention(samples)
    for label, modes in plan.sets().items():
        if "torch" not in modes:
            result.note(f"swap {label}: PyTorch did not run in this set's mode; no gaps to it")
            continue
        analyse(args, settings, result, samples, phases, label, modes, contended)


def analyse(args, settings, result, samples, phases, label: str, modes, contended) -> None:
    """The decomposition for one comparison set: ``modes`` {framework: its mode}, the gap of
    each to PyTorch in PyTorch's mode of the set (``label``: its name)."""
    frameworks = list(modes)
    step = {f: {c: round_values(samples[f][cell_key(c, modes[f])]) for c in CONVS}
            for f in frameworks}
    rounds = settings["rounds"]
    conds = study.conditions(args, result.doc["workers"], result.doc["scale"], frameworks,
                             modes)
    in_modes = study.describe_modes(modes)
    rows, decomposition = [], {}
    for f in frameworks:
        own, ours = step[f]["framework"], step[f]["native"]
        row = [study.PUBLISHED_NAMES[f], modes[f], study.fmt(median(own)), study.fmt(iqr(own)),
               study.fmt(median(ours)), study.fmt(iqr(ours))]
        if f == "torch":
            rows.append(row + ["baseline"] * 6)
            continue
        gap = [own[r] - step["torch"]["framework"][r] for r in range(rounds)]
        remaining = [ours[r] - step["torch"]["native"][r] for r in range(rounds)]
        conv_part = [g - m for g, m in zip(gap, remaining)]
        decomposition[f] = {"gap_ms": gap, "conv_part_ms": conv_part,
                            "remaining_ms": remaining}
        share = median(conv_part) / median(gap) * 100 if median(gap) else float("nan")
        row += [f"{median(gap):.1f} ({iqr(gap):.1f})", f"{median(conv_part):.1f}",
                f"{median(remaining):.1f} ({iqr(remaining):.1f})", f"{share:.0f}%"]
        ratio_own = [o / t for o, t in zip(own, step["torch"]["framework"])]
        ratio_ours = [o / t for o, t in zip(ours, step["torch"]["native"])]
        row.append(study.fmt_effect(study.paired_effect(ratio_own, ratio_ours)))
        q = study.quantity(model=model_label(settings["model"]), batch=settings["batch_size"],
                           compared=f"{study.mode_label(f, modes[f])} vs "
                                    f"{study.mode_label('torch', modes['torch'])}, own convs "
                                    f"vs ours (native) in both",
                           timed="convolution part / gap, uninstrumented training steps "
                                 "(data loading included)",
                           device=args.device, threads=args.threads)
        row.append(judge_gap(result, f, gap, remaining, conds, label, modes, q, contended))
        rows.append(row)
    result.add_table(
        f"Decomposition of each framework's gap to PyTorch ({settings['model']}, batch "
        f"{settings['batch_size']}; {in_modes})",
        ["framework", "mode", "step ms, own conv", "IQR", "step ms, our conv", "IQR",
         "gap to PyTorch ms (IQR)", "of which convolution ms", "remaining overhead ms (IQR)",
         "convolution share of the gap (of medians)",
         "ratio to PyTorch, same conv vs own [interval] (n)",
         "convolution share of the gap, per round [interval] (n): verdict"],
        rows, note="Medians of per-round differences (each round measures every cell). A "
                   "negative gap means faster than PyTorch; the convolution part is what the "
                   "gap loses when both run our kernel. The ratio column moves with PyTorch's "
                   "own change of conv too; the verdict uses the per-round share of the gap in "
                   "ms. Our conv is 'native' (our kernel as the framework's op) in both "
                   "modes. " + study.INTERVAL_NOTE)
    phase_ms = {f: phases[f][cell_key("native", modes[f])] for f in frameworks}
    # The phases any framework of the set separates (a one-call graph step has compiled_step).
    shown = list(PHASES[:-1]) + [p for p in OPTIONAL_PHASES
                                 if any(p in a["phases_ms"] for f in frameworks
                                        for a in phase_ms[f])] + ["other"]
    per_phase = {f: {p: median(round_values(phase_ms[f], phase=p))
                     if all(p in a["phases_ms"] for a in phase_ms[f]) else 0.0 for p in shown}
                 for f in frameworks}
    phase_rows = []
    for f in frameworks:
        if f == "torch":
            continue
        # A phase a mode does not separate (0: inside a compiled call, or not split from the
        # backward) has no difference to show.
        whole = median(round_values(phase_ms[f])) - median(round_values(phase_ms["torch"]))
        phase_rows.append([study.PUBLISHED_NAMES[f], modes[f]] + [
            f"{per_phase[f][p] - per_phase['torch'][p]:+.1f}"
            if per_phase[f][p] > 0 and per_phase["torch"][p] > 0 else "-" for p in shown]
            + [f"{whole:+.1f}"])
    result.add_table(
        f"Where the remaining overhead sits: per-phase difference to PyTorch with our conv in "
        f"both (ms, instrumented steps; {in_modes})",
        ["framework", "mode"] + shown + ["whole step"], phase_rows,
        note=f"{settings['phase_rounds']} instrumented step(s) per framework; forward and "
             f"backward include every layer's framework overhead (batch norm, ReLU, adds, "
             f"autograd bookkeeping); instrumentation adds its own per-layer cost. '-': a "
             f"phase one side does not separate (graph mode: no hook inside a compiled graph; "
             f"TensorFlow's graph step is one call, timed as compiled_step).")
    if decomposition:
        plot(result, decomposition, frameworks, label, modes)
    keys = {study.keyed(f"swap.{f}.gap_is_convolution", label) for f in frameworks}
    study.plot_verdicts(result, [r for r in result.doc["verdicts"] if r["key"] in keys],
                        "verdicts.png" if label == "eager" else f"verdicts_{label}.png",
                        f"swap verdicts ({in_modes}, {settings['model']}, batch "
                        f"{settings['batch_size']})")


def judge_gap(result, framework, gap_ms, remaining_ms, conds, label, modes, q,
              contended) -> str:
    """The H2 verdict for one framework from its per-round gaps (own conv, then our conv in
    both): a mechanism claim, the convolution part's share of the gap per round (gap minus
    the gap that remains with the same conv, over the gap); returns the table cell. Not
    testable where the framework was not behind PyTorch in every round."""
    name = study.mode_label(framework, modes[framework])
    torch = study.mode_label("torch", modes["torch"])
    ceiling = None
    if min(gap_ms) <= 0:
        ceiling = (f"{name} was not slower than {torch} with its own conv in every round (gap "
                   f"{min(gap_ms):.0f} to {max(gap_ms):.0f} ms): no gap to attribute")
    shares = [(g - m) / g * 100 if g > 0 else 0.0 for g, m in zip(gap_ms, remaining_ms)]
    record = study.judge(
        study.Claim(key=study.keyed(f"swap.{framework}.gap_is_convolution", label),
                    kind="mechanism", threshold=CONV_SHARE_PCT,
                    claim=f"{name}'s gap to {torch} is mostly its convolution: the same conv "
                          f"kernel in both removes at least {CONV_SHARE_PCT:g}% of the gap",
                    published_text="a 2017 blog's finding (Chainer vs PyTorch on a GPU): the "
                                   "conv implementation dominates the difference"),
        shares, q, conds, ceiling=ceiling, contended_rounds=contended,
        gap_own_conv_ms=median(gap_ms), gap_same_conv_ms=median(remaining_ms))
    result.add_verdict(record)
    return f"{study.describe_effect(record)}: {record['verdict']}"


def plot(result, decomposition, frameworks, label, modes) -> None:
    """Diverging bars per framework: the gap to PyTorch, its convolution part and what remains
    with the same conv, each the median of rounds with its exact interval; negative parts go
    below the zero line beside the others, never stacked over them."""
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.4))
    names = [f for f in frameworks if f != "torch"]
    parts = (("gap_ms", "gap to PyTorch (own convs)", "#999999"),
             ("conv_part_ms", "of which convolution", "#4c72b0"),
             ("remaining_ms", "remaining with the same conv", "#dd8452"))
    width = 0.26
    n = None
    for k, (key, text, colour) in enumerate(parts):
        xs, centres, err = [], [], [[], []]
        for x, f in enumerate(names):
            n = len(decomposition[f][key])
            centre, below, above = study.median_bar(decomposition[f][key])
            xs.append(x + (k - 1) * width)
            centres.append(centre)
            err[0].append(below)
            err[1].append(above)
        ax.bar(xs, centres, width, yerr=err, capsize=3, color=colour, label=text)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([study.mode_label(f, modes[f]) for f in names])
    ax.set_ylabel("ms per training step (median of rounds)")
    ax.set_title(f"Each framework's gap to {study.mode_label('torch', modes['torch'])}, split "
                 f"(bars: exact interval, n {n})", fontsize=9)
    ax.legend(fontsize=8)
    result.add_plot(fig, "swap_decomposition.png" if label == "eager" else
                    f"swap_decomposition_{label}.png",
                    f"Diverging bars ({study.describe_modes(modes)}): each framework's gap to "
                    f"PyTorch with its own conv, the part of it that is the convolution, and "
                    f"the part that remains with our kernel in both (medians of per-round "
                    f"differences, exact intervals, n {n} rounds; below zero: faster than "
                    f"PyTorch or a negative part).")


if __name__ == "__main__":
    sys.exit(main())
