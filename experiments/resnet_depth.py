"""Study: ResNet-20/32/44/56 for CIFAR-10 in four frameworks, the published seconds-per-epoch
table reproduced as ratios to PyTorch, the per-layer cost of depth per framework, and what each
framework's compiled (graph) mode saves over its eager one.

    python -m experiments.resnet_depth                 # quick scale, --mode both (make experiments)
    python -m experiments.resnet_depth --mode published   # only the published table's modes
    python -m experiments.resnet_depth --full          # more rounds and steps, full data set

Each framework runs in a worker process of its own; rounds rotate the frameworks' order (and
the cells' within a framework: each depth in each execution mode), and each visit times
uninstrumented training steps at batch 128, so a framework's eager and graph steps of one depth
are measured in the same visit and pair by round. Seconds per epoch are extrapolated from the
measured steps (x 391 steps). Warm-up steps per (depth, mode) cover the compilation (the first
step's time and the graphs compiled are recorded).

Table A is the published table with each framework in the mode it ran in there (--mode both or
published: Keras(TF) and Keras(MXNet) graph, PyTorch and Chainer eager; --mode eager or graph:
every framework in that mode), as ratios to PyTorch paired by round, and the per-layer cost is
the slope of step time over the layer count with a bootstrap interval over rounds. Table B
(--mode both) gives each framework's graph / eager step ratio per depth, the median of the
rounds' paired ratios with a bootstrap 95% interval (profiler.analysis.stats.paired_ratio_ci),
and how the eager-minus-graph gap grows with depth (its slope over layers,
bootstrap_slope_ci): the cost of eager dispatch per framework and per layer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from experiments import study
from experiments.workers import Cell, Pool, interleaved_rounds, round_values
from profiler.analysis.stats import (bootstrap_diff_ci, bootstrap_slope_ci, iqr, median,
                                     paired_ratio_ci)

STUDY = "resnet_depth"
MODELS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}   # model -> n
# Seconds per epoch, K80 GPU, batch 128 (the published table).
PUBLISHED_S_PER_EPOCH = {
    "resnet20": {"tensorflow": 51.8, "mxnet": 50.2, "chainer": 35.4, "torch": 26.6},
    "resnet32": {"tensorflow": 75.7, "mxnet": 69.3, "chainer": 56.9, "torch": 40.7},
    "resnet44": {"tensorflow": 96.9, "mxnet": 86.9, "chainer": 80.9, "torch": 55.5},
    "resnet56": {"tensorflow": 119.4, "mxnet": 111.8, "chainer": 100.7, "torch": 70.8},
}
# graph_warmup: the warm-up of a graph-mode cell; its first step compiles.
QUICK = dict(batch_size=128, rounds=5, steps_per_round=1, warmup=2, graph_warmup=3,
             train_size=2048)
FULL = dict(batch_size=128, rounds=10, steps_per_round=5, warmup=3, graph_warmup=4,
            train_size=None)


def layers(model: str) -> int:
    """6n + 2."""
    return 6 * MODELS[model] + 2


def cell_name(model: str, mode: str) -> str:
    """The name a (depth, execution mode) cell is built and sampled under: "resnet20/graph"."""
    return f"{model}/{mode}"


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{STUDY}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_common_arguments(parser, STUDY, default_mode="both")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of the depths")
    parser.add_argument("--rounds", type=study.positive_int, help="override the scale's rounds")
    parser.add_argument("--batch-size", type=study.positive_int,
                        help="override the scale's batch (the published one is 128)")
    args = parser.parse_args(argv)
    args.frameworks_list = study.resolve_frameworks(parser, args, study.FRAMEWORKS)
    args.models_list = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.models_list or any(m not in MODELS for m in args.models_list):
        parser.error(f"--models: expected a comma-separated subset of {','.join(MODELS)}, got "
                     f"{args.models!r}")
    if "torch" not in args.frameworks_list:
        parser.error("--frameworks: the ratios are to PyTorch; expected torch among them")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    scale = "full" if args.full else "quick"
    settings = dict(FULL if args.full else QUICK)
    settings.update({k: v for k, v in (("rounds", args.rounds), ("batch_size", args.batch_size))
                     if v is not None})
    settings.update(frameworks=args.frameworks_list, models=args.models_list,
                    threads=args.threads, device=args.device, timed="plain training steps",
                    mode=args.mode, modes=study.modes_for(args.mode, args.frameworks_list))
    departures = [f"{settings['rounds']} rounds x {settings['steps_per_round']} measured "
                  f"step(s) per framework, depth and mode instead of 100 epochs; seconds per "
                  f"epoch are extrapolated", "CPU instead of the published K80 GPU"]
    if settings["train_size"]:
        departures.append(f"synthetic CIFAR-shaped data, {settings['train_size']} training "
                          f"images cycled (step time does not depend on the set's size)")
    if settings["batch_size"] != study.PUBLISHED_BATCH:
        departures.append(f"batch {settings['batch_size']} instead of 128")
    if args.mode in ("eager", "graph"):
        departures.append(f"every framework in {args.mode} mode (published: Keras(TF) and "
                          f"Keras(MXNet) graph, PyTorch and Chainer eager)")
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures, notes=[study.STAND_IN_NOTE])
    return result.run(run, args, settings, result)


def run(args, settings: Dict[str, object], result: study.Result) -> None:
    frameworks, models = args.frameworks_list, args.models_list
    batch, rounds = settings["batch_size"], settings["rounds"]
    steps = settings["steps_per_round"]
    warmup = {"eager": settings["warmup"], "graph": settings["graph_warmup"]}
    steps_needed = max(warmup.values()) + rounds * steps + 1
    config = {"batch_size": batch, "train_size": settings["train_size"],
              "test_size": batch if settings["train_size"] else None}
    plan = study.ModePlan(args.mode, frameworks)
    with Pool(frameworks, threads=args.threads, device=args.device, log_dir=result.out) as pool:
        for framework in frameworks:
            result.record_worker(framework, pool.hello[framework])
        # Per cell: the warm-up's step times (the first compiles in graph mode) and the graphs
        # compiled by its end.
        warmups: Dict[str, Dict[str, dict]] = {}
        cells: Dict[str, List[Cell]] = {}
        for framework in frameworks:
            worker = pool.use(framework)
            warmups[framework], cells[framework] = {}, []
            for mode in list(plan.modes[framework]):
                for model in models:
                    name = cell_name(model, mode)
                    study.progress(f"{STUDY}: {framework} {model} {mode}: build, "
                                   f"{warmup[mode]} warm-up steps")
                    if plan.build(worker, result, name=name, steps_needed=steps_needed,
                                  config={"model": model, "mode": mode, **config}) is None:
                        break
                    answer = worker.call("steps", name=name, n=warmup[mode], mode="plain")
                    warmups[framework][name] = {"step_ms": answer["step_ms"],
                                                "compile_count": answer["compile_count"]}
                    cells[framework].append(Cell(name, name))
            result.add_samples("warmup", warmups)
        cells = {f: c for f, c in cells.items() if c}

        def saved(r, samples):
            result.add_samples("rounds", samples)
            result.add_samples("settle_s", pool.settle_s)
            study.progress(f"{STUDY}: round {r + 1}/{rounds} done")

        samples = interleaved_rounds(pool, cells, rounds=rounds, steps=steps, mode="plain",
                                     on_round=saved)
        result.doc["settings"]["handoff_settle"] = pool.settle_summary()
        result.doc["machine"]["worker_peak_rss_mib"] = pool.peak_rss_mib()
        result.save()
    analyse(args, settings, result, samples, warmups, plan)


def table_a_modes(mode: str, plan: study.ModePlan) -> Dict[str, str]:
    """Table A's mode per framework: the published one (--mode both or published), else the
    one mode measured; a framework whose mode was refused is left out."""
    wanted = study.comparison_sets("published" if mode in ("both", "published") else mode,
                                   list(plan.modes))
    (members,) = wanted.values()
    return {f: m for f, m in members.items() if plan.runs(f, m)}


def analyse(args, settings, result: study.Result, samples, warmups, plan) -> None:
    models = args.models_list
    # {framework: {mode: {model: one value per round}}}
    times = {f: {mode: {m: round_values(samples[f][cell_name(m, mode)]) for m in models}
                 for mode in plan.modes[f]} for f in samples}
    compile_table(result, settings, times, warmups, samples, models)
    modes_a = table_a_modes(args.mode, plan)
    if "torch" not in modes_a:
        raise RuntimeError("resnet_depth: PyTorch was not measured in the mode of Table A; "
                           "the ratios need it")
    table_a(args, settings, result, {f: times[f][m] for f, m in modes_a.items()}, modes_a)
    if args.mode == "both":
        table_b(args, settings, result, times, models)


def compile_table(result, settings, times, warmups, samples, models) -> None:
    """The first (compiling) step beside the steady step, per framework, depth and mode; a
    note where a measured round compiled again."""
    rows, doc = [], {}
    for f, by_mode in times.items():
        for mode, by_model in by_mode.items():
            for m in models:
                name = cell_name(m, mode)
                warm = warmups[f][name]
                steady = median(by_model[m])
                rounds_count = max((a.get("compile_count") or 0) for a in samples[f][name])
                recompiled = rounds_count - (warm["compile_count"] or 0)
                first = warm["step_ms"][0]
                # Eager steps compile nothing: no estimate there (its first step's extra time
                # is one-time set-up).
                estimate = max(0.0, first - steady) if mode == "graph" else None
                doc.setdefault(f, {}).setdefault(mode, {})[m] = {
                    "first_step_ms": first, "warmup_step_ms": warm["step_ms"],
                    "steady_step_ms": steady, "compile_ms_estimate": estimate,
                    "graphs_compiled_in_warmup": warm["compile_count"],
                    "graphs_compiled_in_rounds": recompiled}
                rows.append([study.PUBLISHED_NAMES[f], mode, layers(m), study.fmt(first),
                             ", ".join(study.fmt(v) for v in warm["step_ms"][1:]) or "-",
                             study.fmt(steady), study.fmt(estimate), warm["compile_count"],
                             recompiled])
                if recompiled > 0:
                    result.note(f"{study.mode_label(f, mode)} {m}: {recompiled} graph(s) "
                                f"compiled during the measured rounds (after the warm-up): "
                                f"those rounds include compilation")
    result.doc["compile"] = doc
    result.add_table(
        "Compilation: the first (compiling) step per framework, depth and execution mode",
        ["framework", "mode", "layers", "first step ms", "later warm-up steps ms",
         "steady step ms (median of rounds)", "first - steady ms (compile estimate)",
         "graphs compiled in the warm-up", "graphs compiled in the rounds"], rows,
        note=f"Warm-up: {settings['warmup']} step(s) in eager mode, {settings['graph_warmup']} "
             f"in graph mode, none of them measured. Eager steps compile nothing (0 graphs, no "
             f"estimate); an eager first step is slower too (allocations, caches, one-time "
             f"set-up), which the graph estimate includes as well.")


def table_a(args, settings, result: study.Result, rounds, modes) -> None:
    """The published table with each framework in ``modes`` (its mode there), its per-layer
    cost, and the R1/R2 verdicts; ``rounds``: {framework: {model: one value per round}}."""
    frameworks = list(rounds)
    models = args.models_list
    measured_steps = settings["rounds"] * settings["steps_per_round"]
    label = study.extrapolation_label(measured_steps)
    set_label = "published" if args.mode in ("both", "published") else args.mode
    conds = study.conditions(args, result.doc["workers"], result.doc["scale"], frameworks,
                             modes)
    conds["batch_size"] = settings["batch_size"]
    name = {f: study.mode_label(f, modes[f]) for f in frameworks}
    in_modes = study.describe_modes(modes)

    rows = []
    for model in models:
        epoch_s = {f: study.extrapolate_epoch_s(median(rounds[f][model])) for f in frameworks}
        compared = study.published_comparison(epoch_s, PUBLISHED_S_PER_EPOCH[model])
        for f in frameworks:
            cells = [layers(model), study.PUBLISHED_NAMES[f], modes[f],
                     study.fmt(median(rounds[f][model])), study.fmt(iqr(rounds[f][model])),
                     study.fmt(epoch_s[f])]
            if f == "torch" or len(rounds[f][model]) < 2:
                cells.append("1 (baseline)" if f == "torch" else study.fmt(
                    compared[f]["ours_ratio"], 2))
            else:
                est, lo, hi = bootstrap_diff_ci(rounds["torch"][model], rounds[f][model])
                cells.append(f"{1 + est / 100:.2f} [{1 + lo / 100:.2f}, {1 + hi / 100:.2f}]")
            cells += [study.fmt(PUBLISHED_S_PER_EPOCH[model][f]),
                      study.fmt(compared[f]["published_ratio"], 2),
                      study.fmt(compared[f]["ours_over_published"], 2)]
            rows.append(cells)
    result.add_table(
        f"Table A: step time and seconds per epoch by depth ({in_modes}), ours (CPU) beside "
        f"the published (K80)",
        ["layers", "framework", "mode", "step ms (median)", "IQR ms", "s/epoch (extrapolated)",
         f"ratio to {name['torch']} [95% CI]", "published s/epoch", "published ratio",
         "ours / published ratio"], rows,
        note=f"s/epoch {label}. Ratios are per-round (paired) medians; absolute published "
             f"times are from another machine and compare only as ratios. The mode column is "
             f"the execution mode each figure was measured in.")

    slope_rows = []
    layer_counts = [layers(m) for m in models]
    per_layer = {}
    if len(models) >= 2 and settings["rounds"] >= 2:
        for f in frameworks:
            matrix = [[rounds[f][m][r] for m in models] for r in range(settings["rounds"])]
            per_layer[f] = bootstrap_slope_ci(layer_counts, matrix)
        torch_matrix = [[rounds["torch"][m][r] for m in models]
                        for r in range(settings["rounds"])]
        published_slope = {f: _published_slope(f, models) for f in frameworks}
        for f in frameworks:
            slope, lo, hi = per_layer[f]
            row = [study.PUBLISHED_NAMES[f], modes[f], f"{slope:.2f} [{lo:.2f}, {hi:.2f}]"]
            if f == "torch":
                row.append("baseline")
            else:
                matrix = [[rounds[f][m][r] for m in models] for r in range(settings["rounds"])]
                est, lo_r, hi_r = bootstrap_slope_ci(layer_counts, matrix,
                                                     baseline_rounds=torch_matrix)
                row.append(study.fmt_ci(est, lo_r, hi_r))
                result.add_verdict(study.judge(
                    study.Hypothesis(
                        key=study.keyed(f"resnet_depth.{f}.per_layer_cost", set_label),
                        claim=f"{name[f]}'s cost per added layer exceeds {name['torch']}'s "
                              f"(published: "
                              f"{published_slope[f] / published_slope['torch']:.2f}x)",
                        effect=f"slope of step time over layers, {f} {modes[f]} vs torch "
                               f"{modes['torch']}",
                        direction="higher"),
                    est, lo_r, hi_r, conds))
            row += [study.fmt(published_slope[f] * 1000 / study.steps_per_epoch(), 2),
                    study.fmt(published_slope[f] / published_slope["torch"], 2)]
            slope_rows.append(row)
        result.add_table(
            f"Per-layer cost of depth: slope of step time over layer count ({in_modes})",
            ["framework", "mode", "ms per layer [95% CI]", "slope vs PyTorch [95% CI]",
             "published ms per layer (s/epoch slope / 391)", "published slope ratio"],
            slope_rows, note="Least-squares slope through the per-depth medians; the interval "
                             "resamples whole rounds (bootstrap, 9999 resamples).")

    for f in frameworks:
        if f == "torch" or settings["rounds"] < 2:
            continue
        # The whole table at once: per round, the sum of the four depths' steps.
        total_f = [sum(rounds[f][m][r] for m in models) for r in range(settings["rounds"])]
        total_t = [sum(rounds["torch"][m][r] for m in models)
                   for r in range(settings["rounds"])]
        est, lo, hi = bootstrap_diff_ci(total_t, total_f)
        published = [PUBLISHED_S_PER_EPOCH[m][f] / PUBLISHED_S_PER_EPOCH[m]["torch"]
                     for m in models]
        result.add_verdict(study.judge(
            study.Hypothesis(
                key=study.keyed(f"resnet_depth.{f}.slower_than_torch", set_label),
                claim=f"{name[f]} trains ResNet slower than {name['torch']} (published: "
                      f"{min(published):.2f}-{max(published):.2f}x the time)",
                effect=f"step time summed over {','.join(models)}, {f} {modes[f]} vs torch "
                       f"{modes['torch']}",
                direction="higher"),
            est, lo, hi, conds))
    plot(result, rounds, models, label, modes)


def graph_over_eager(eager: List[float], graph: List[float]) -> Dict[str, object]:
    """Table B's cell: the graph / eager step ratio of paired rounds (eager[r] and graph[r]
    measured in the same visit), the median of the rounds' ratios with a bootstrap 95% interval
    over rounds (profiler.analysis.stats.paired_ratio_ci), n, and what the bracket is: "95% CI",
    or "range" under study.MIN_ROUNDS_FOR_INTERVAL rounds (then it is about the range of the
    rounds' ratios). With one round, the ratio alone."""
    if len(eager) != len(graph) or not eager:
        raise ValueError(f"graph_over_eager: expected as many (>= 1) eager as graph rounds, got "
                         f"{len(eager)} and {len(graph)}")
    if len(eager) < 2:
        return {"ratio": graph[0] / eager[0], "ci95": None, "n": 1, "bracket": None}
    est, lo, hi = paired_ratio_ci(eager, graph)
    bracket = "95% CI" if len(eager) >= study.MIN_ROUNDS_FOR_INTERVAL else "range"
    return {"ratio": 1 + est / 100, "ci95": [1 + lo / 100, 1 + hi / 100], "n": len(eager),
            "bracket": bracket}


def eager_gap_slope(x: List[int], eager_rounds: List[List[float]],
                    graph_rounds: List[List[float]]):
    """How eager dispatch grows with depth: the least-squares slope of the eager-minus-graph
    step gap over ``x`` (layers), ms per layer, with a bootstrap 95% interval over rounds
    (profiler.analysis.stats.bootstrap_slope_ci; ``*_rounds[r][i]`` is round r at x[i])."""
    gap = [[e - g for e, g in zip(er, gr)] for er, gr in zip(eager_rounds, graph_rounds)]
    return bootstrap_slope_ci(x, gap)


def table_b(args, settings, result: study.Result, times, models) -> None:
    """Per framework with both modes: graph / eager per depth with its interval, how the gap
    grows with depth, and whether the graph step is faster."""
    both = [f for f in times if set(times[f]) == {"eager", "graph"}]
    if not both:
        result.note("Table B (graph / eager) has no rows: no framework ran in both modes")
        return
    rounds = settings["rounds"]
    rows, summary_rows, ratios = [], [], {}
    for f in both:
        eager, graph = times[f]["eager"], times[f]["graph"]
        ratios[f] = {}
        for m in models:
            cell = graph_over_eager(eager[m], graph[m])
            ratios[f][m] = cell
            gap = [e - g for e, g in zip(eager[m], graph[m])]
            ci = (f" [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}]" if cell["ci95"] else "")
            rows.append([study.PUBLISHED_NAMES[f], layers(m), study.fmt(median(eager[m])),
                         study.fmt(median(graph[m])), f"{cell['ratio']:.2f}{ci}",
                         cell["bracket"] or "-", study.fmt(median(gap)), cell["n"]])
    result.doc["graph_over_eager"] = ratios
    result.add_table(
        "Table B: graph / eager step time per framework and depth (each framework's compiled "
        "mode against its eager mode)",
        ["framework", "layers", "eager step ms", "graph step ms", "graph / eager [bracket]",
         "bracket", "eager - graph ms (median of rounds)", "n (rounds)"], rows,
        note="Both modes of a depth are measured in the same visit of every round; the ratio is "
             "the median of the rounds' graph/eager ratios with a bootstrap percentile 95% "
             f"interval over rounds (profiler.analysis.stats.paired_ratio_ci); with fewer "
             f"than {study.MIN_ROUNDS_FOR_INTERVAL} rounds that bracket is about the range of "
             f"the rounds' ratios (bracket 'range'), not a 95% interval: `--rounds "
             f"{study.MIN_ROUNDS_FOR_INTERVAL}` gives one. Below 1: the "
             "compiled step is faster, and 1 - ratio is the share of the eager step that eager "
             "dispatch costs. Graph mode: TensorFlow's whole step in one tf.function; MXNet's "
             "hybridized network and PyTorch's torch.compile'd network, the loss, the backward "
             "call and the optimizer staying eager in both.")
    if len(models) >= 2 and rounds >= 2:
        x = [layers(m) for m in models]
        for f in both:
            eager_m = [[times[f]["eager"][m][r] for m in models] for r in range(rounds)]
            graph_m = [[times[f]["graph"][m][r] for m in models] for r in range(rounds)]
            gap_slope = eager_gap_slope(x, eager_m, graph_m)
            eager_slope = bootstrap_slope_ci(x, eager_m)
            graph_slope = bootstrap_slope_ci(x, graph_m)
            shallow, deep = models[0], models[-1]
            summary_rows.append([
                study.PUBLISHED_NAMES[f], f"{ratios[f][shallow]['ratio']:.2f}",
                f"{ratios[f][deep]['ratio']:.2f}",
                "{:.2f} [{:.2f}, {:.2f}]".format(*gap_slope),
                "{:.2f} [{:.2f}, {:.2f}]".format(*eager_slope),
                "{:.2f} [{:.2f}, {:.2f}]".format(*graph_slope)])
        result.add_table(
            "Table B (depth): how eager dispatch grows with depth, the slope of the "
            "eager-minus-graph gap over layers",
            ["framework", f"graph / eager at {layers(models[0])} layers",
             f"graph / eager at {layers(models[-1])} layers",
             "eager - graph gap, ms per layer [95% CI]", "eager ms per layer [95% CI]",
             "graph ms per layer [95% CI]"], summary_rows,
            note="Least-squares slopes through the per-depth medians, the interval resampling "
                 "whole rounds (profiler.analysis.stats.bootstrap_slope_ci, 9999 resamples). "
                 "A positive gap slope: eager dispatch costs more with every layer, which the "
                 "compiled step saves.")
    if rounds >= 2:
        for f in both:
            conds = study.conditions(args, result.doc["workers"], result.doc["scale"], [f],
                                     study.BOTH_MODES)
            conds["batch_size"] = settings["batch_size"]
            total_e = [sum(times[f]["eager"][m][r] for m in models) for r in range(rounds)]
            total_g = [sum(times[f]["graph"][m][r] for m in models) for r in range(rounds)]
            est, lo, hi = paired_ratio_ci(total_e, total_g)
            result.add_verdict(study.judge(
                study.Hypothesis(
                    key=f"resnet_depth.{f}.graph_faster_than_eager",
                    claim=f"{study.PUBLISHED_NAMES[f]}'s compiled (graph) mode trains ResNet "
                          f"faster than its eager mode",
                    effect=f"step time summed over {','.join(models)}, {f} graph vs eager "
                           f"(median of paired round ratios)",
                    direction="lower"),
                est, lo, hi, conds))
    plot_b(result, ratios, models)


def _published_slope(framework: str, models: List[str]) -> float:
    """Published s/epoch per layer: least-squares slope over the chosen depths."""
    import numpy as np
    x = np.array([layers(m) for m in models], dtype=float)
    y = np.array([PUBLISHED_S_PER_EPOCH[m][framework] for m in models])
    return float(np.polyfit(x, y, 1)[0]) if len(models) >= 2 else float("nan")


def plot(result, rounds, models, label, modes) -> None:
    plt = study.pyplot()
    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [layers(m) for m in models]
    for f in rounds:
        name = study.mode_label(f, modes[f])
        meds = [study.extrapolate_epoch_s(median(rounds[f][m])) for m in models]
        spread = [study.extrapolate_epoch_s(iqr(rounds[f][m])) / 2 for m in models]
        line = ax_time.errorbar(x, meds, yerr=spread, marker="o", capsize=3, label=name)
        colour = line[0].get_color()
        ax_ratio.plot(x, [median(rounds[f][m]) / median(rounds["torch"][m]) for m in models],
                      marker="o", color=colour, label=f"{name} (ours)")
        ax_ratio.plot(x, [PUBLISHED_S_PER_EPOCH[m][f] / PUBLISHED_S_PER_EPOCH[m]["torch"]
                          for m in models], ls="--", color=colour, alpha=0.7,
                      label=f"{study.PUBLISHED_NAMES[f]} (published)")
    ax_time.set(xlabel="layers", ylabel="s/epoch (extrapolated, CPU)",
                title="Time vs depth (median, bars: IQR/2)")
    ax_time.legend(fontsize=8)
    ax_ratio.set(xlabel="layers", ylabel="time / PyTorch's",
                 title="Ratio to PyTorch: ours (solid) vs published (dashed)")
    ax_ratio.legend(fontsize=7, ncol=2)
    result.add_plot(fig, "time_vs_depth.png",
                    f"Seconds per epoch vs depth per framework ({study.describe_modes(modes)}; "
                    f"{label}), and the ratio to PyTorch beside the published ratio.")


def plot_b(result, ratios, models) -> None:
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [layers(m) for m in models]
    for f, by_model in ratios.items():
        values = [by_model[m]["ratio"] for m in models]
        cis = [by_model[m]["ci95"] for m in models]
        if all(cis):
            yerr = [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in
                                                                zip(values, cis)]]
            ax.errorbar(x, values, yerr=yerr, marker="o", capsize=3,
                        label=study.PUBLISHED_NAMES[f])
        else:
            ax.plot(x, values, marker="o", label=study.PUBLISHED_NAMES[f])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="layers", ylabel="graph step / eager step",
           title="Compiled vs eager, per framework (bars: 95% CI)")
    ax.legend(fontsize=8)
    result.add_plot(fig, "graph_over_eager.png",
                    "Each framework's graph-mode step over its eager step vs depth (median of "
                    "paired round ratios, 95% bootstrap interval); below 1 the compiled step is "
                    "faster.")


if __name__ == "__main__":
    sys.exit(main())
