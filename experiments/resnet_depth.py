"""Study: ResNet-20/32/44/56 for CIFAR-10 in four frameworks, the published seconds-per-epoch
table reproduced as ratios to PyTorch, the per-layer cost of depth per framework, and what each
framework's compiled (graph) mode saves over its eager one.

    python -m experiments.resnet_depth                 # quick scale, --mode both (make experiments)
    python -m experiments.resnet_depth --mode published   # only the published table's modes
    python -m experiments.resnet_depth --full          # more rounds and steps, full data set

Each framework runs in a worker process of its own; rounds order the frameworks (and the cells
within a framework: each depth in each execution mode) by a balanced Latin square, and each
visit times uninstrumented training steps at batch 128, so a framework's eager and graph steps
of one depth are measured in the same visit and pair by round. Seconds per epoch are
extrapolated from the measured steps (x 391 steps). Warm-up steps per (depth, mode) cover the
compilation (the first step's time and the graphs compiled are recorded).

Table A is the published table with each framework in the mode it ran in there (--mode both or
published: Keras(TF) and Keras(MXNet) graph, PyTorch and Chainer eager; --mode eager or graph:
every framework in that mode), as ratios to PyTorch (the median of the rounds' paired ratios
with its exact interval, study.paired_effect), with a row at the profiler's batch 32 beside the
published 128, and per framework and depth a direction verdict (slower than PyTorch by more
than 5%) and a magnitude verdict (the published ratio within 1.25x). Table B (--mode both)
gives each framework's graph / eager step ratio per depth the same way, with a direction
verdict per depth, and how the eager-minus-graph gap grows with depth (per-round slopes over
layers, their median and interval): the cost of eager dispatch per framework and per layer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from experiments import study
from experiments.workers import Cell, Pool, interleaved_rounds, round_values
from profiler.analysis.stats import iqr, median, median_ci

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
# At least study.MIN_ROUNDS rounds: every verdict is a median over rounds with its exact
# interval. small_batch: the profiler's default batch, measured beside the published one on
# the shallowest depth (each framework in Table A's mode).
QUICK = dict(batch_size=128, rounds=10, steps_per_round=1, warmup=2, graph_warmup=3,
             train_size=2048, small_batch=32)
FULL = dict(batch_size=128, rounds=20, steps_per_round=5, warmup=3, graph_warmup=4,
            train_size=None, small_batch=32)
PUBLISHED_REGIME = ("published: s/epoch on a K80 GPU, batch 128, Keras 2 (TensorFlow and MXNet "
                    "backends), Chainer and PyTorch of 2017")


def layers(model: str) -> int:
    """6n + 2."""
    return 6 * MODELS[model] + 2


def cell_name(model: str, mode: str, batch: Optional[int] = None) -> str:
    """The name a (depth, execution mode) cell is built and sampled under: "resnet20/graph";
    the small-batch cell: "resnet20/b32/eager"."""
    return f"{model}/{mode}" if batch is None else f"{model}/b{batch}/{mode}"


def model_name(model: str) -> str:
    """'ResNet-20'."""
    return f"ResNet-{layers(model)}"


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
    parser.add_argument("--small-batch", type=study.non_negative_int,
                        help="the batch of the extra shallowest-depth row beside the published "
                             "one (default: the profiler's 32; 0: no such row)")
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
    settings.update({k: v for k, v in (("rounds", args.rounds), ("batch_size", args.batch_size),
                                       ("small_batch", args.small_batch)) if v is not None})
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
                          departures=departures, notes=[study.STAND_IN_NOTE],
                          quiet_wait_s=args.quiet_wait)
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
        small = settings["small_batch"]
        if small and small != batch:
            # The profiler's default batch beside the published one, shallowest depth, each
            # framework in its Table A mode.
            small_config = {**config, "batch_size": small,
                            "test_size": small if settings["train_size"] else None}
            for framework, mode in table_a_modes(args.mode, plan).items():
                name = cell_name(models[0], mode, small)
                study.progress(f"{STUDY}: {framework} {models[0]} {mode} batch {small}: build, "
                               f"{warmup[mode]} warm-up steps")
                worker = pool.use(framework)
                if plan.build(worker, result, name=name, steps_needed=steps_needed,
                              config={"model": models[0], "mode": mode, **small_config}):
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
    contended = result.contention(samples)
    # {framework: {mode: {model: one value per round}}}
    times = {f: {mode: {m: round_values(samples[f][cell_name(m, mode)]) for m in models}
                 for mode in plan.modes[f]} for f in samples}
    small = settings["small_batch"]
    small_times = {f: {mode: round_values(samples[f][cell_name(models[0], mode, small)])
                       for mode in plan.modes[f]
                       if cell_name(models[0], mode, small) in samples[f]} for f in samples}
    compile_table(result, settings, times, warmups, samples, models)
    modes_a = table_a_modes(args.mode, plan)
    if "torch" not in modes_a:
        raise RuntimeError("resnet_depth: PyTorch was not measured in the mode of Table A; "
                           "the ratios need it")
    table_a(args, settings, result, {f: times[f][m] for f, m in modes_a.items()}, modes_a,
            {f: small_times[f].get(m) for f, m in modes_a.items()}, contended)
    if args.mode == "both":
        table_b(args, settings, result, times, models, contended)
    records = [r for r in result.doc["verdicts"] if r["key"].startswith(STUDY)]
    study.plot_verdicts(result, records, "verdicts.png",
                        "resnet_depth verdicts (CPU; batch and modes in each claim's key)")


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


def round_slopes(x: List[int], rounds_by_model: List[List[float]]) -> List[float]:
    """One least-squares slope per round: ``rounds_by_model[r][i]`` is round r at x[i] (ms);
    ms per layer."""
    import numpy as np
    xs = np.asarray(x, dtype=float)
    xc = xs - xs.mean()
    return [float(np.dot(np.asarray(row) - np.mean(row), xc) / np.dot(xc, xc))
            for row in rounds_by_model]


def table_a(args, settings, result: study.Result, rounds, modes, small_rounds,
            contended) -> None:
    """The published table with each framework in ``modes`` (its mode there), the small-batch
    row, the per-layer cost, and per depth the direction and magnitude verdicts;
    ``rounds``: {framework: {model: one value per round}}; ``small_rounds``: {framework: one
    value per round at the small batch, or None}."""
    frameworks = list(rounds)
    models = args.models_list
    batch, small = settings["batch_size"], settings["small_batch"]
    measured_steps = settings["rounds"] * settings["steps_per_round"]
    label = study.extrapolation_label(measured_steps)
    set_label = "published" if args.mode in ("both", "published") else args.mode
    conds = study.conditions(args, result.doc["workers"], result.doc["scale"], frameworks,
                             modes)
    name = {f: study.mode_label(f, modes[f]) for f in frameworks}
    in_modes = study.describe_modes(modes)

    rows, effects = [], {}
    for model in models:
        epoch_s = {f: study.extrapolate_epoch_s(median(rounds[f][model])) for f in frameworks}
        compared = study.published_comparison(epoch_s, PUBLISHED_S_PER_EPOCH[model])
        for f in frameworks:
            effect = None if f == "torch" else study.paired_effect(rounds["torch"][model],
                                                                   rounds[f][model])
            effects[(f, model)] = effect
            rows.append([layers(model), study.PUBLISHED_NAMES[f], modes[f], batch,
                         study.fmt(median(rounds[f][model])), study.fmt(iqr(rounds[f][model])),
                         study.fmt(epoch_s[f]),
                         "1 (baseline)" if f == "torch" else study.fmt_effect(effect,
                                                                              ratio=True),
                         study.fmt(PUBLISHED_S_PER_EPOCH[model][f]),
                         study.fmt(compared[f]["published_ratio"], 2),
                         study.fmt(compared[f]["ours_over_published"], 2)])
    if small_rounds.get("torch"):
        for f in frameworks:
            if not small_rounds.get(f):
                continue
            effect = None if f == "torch" else study.paired_effect(small_rounds["torch"],
                                                                   small_rounds[f])
            rows.append([layers(models[0]), study.PUBLISHED_NAMES[f], modes[f], small,
                         study.fmt(median(small_rounds[f])), study.fmt(iqr(small_rounds[f])),
                         "-", "1 (baseline)" if f == "torch" else study.fmt_effect(
                             effect, ratio=True), "-", "-", "-"])
    result.add_table(
        f"Table A: step time and seconds per epoch by depth ({in_modes}), ours (CPU) beside "
        f"the published (K80)",
        ["layers", "framework", "mode", "batch", "step ms (median)", "IQR ms",
         "s/epoch (extrapolated)", f"ratio to {name['torch']} [interval] (n rounds)",
         "published s/epoch", "published ratio", "ours / published ratio"], rows,
        note=f"Uninstrumented training steps, data loading included, {args.device}, "
             f"{args.threads} threads. s/epoch {label}. Ratios are the median of the rounds' "
             f"paired ratios (both frameworks measured in the same round). {study.INTERVAL_NOTE} "
             f"The batch-{small} rows are the profiler's default batch on the shallowest depth "
             f"(no published figure). Absolute published times are from another machine and "
             f"compare only as ratios. The mode column is the execution mode of each figure.")

    for model in models:
        q_base = dict(model=model_name(model), layers=layers(model), batch=batch,
                      timed="uninstrumented training step (data loading included)",
                      device=args.device, threads=args.threads)
        for f in frameworks:
            if f == "torch":
                continue
            effect = effects[(f, model)]
            q = study.quantity(compared=f"{name[f]} vs {name['torch']}", **q_base)
            published = (PUBLISHED_S_PER_EPOCH[model][f] /
                         PUBLISHED_S_PER_EPOCH[model]["torch"])
            values = _ratios_pct(rounds["torch"][model], rounds[f][model])
            result.add_verdict(study.judge(
                study.Claim(key=study.keyed(f"{STUDY}.{f}.{model}.slower_than_torch",
                                            set_label),
                            kind="direction", direction="higher",
                            threshold=study.DEFAULT_THRESHOLD_PCT,
                            claim=f"{name[f]} trains {model_name(model)} slower than "
                                  f"{name['torch']} by more than "
                                  f"{study.DEFAULT_THRESHOLD_PCT:g}%",
                            published=published,
                            published_text=f"{published:.2f}x ({PUBLISHED_REGIME})"),
                effect if effect is not None else values, q, conds,
                contended_rounds=contended))
            result.add_verdict(study.judge(
                study.Claim(key=study.keyed(f"{STUDY}.{f}.{model}.ratio_as_published",
                                            set_label),
                            kind="magnitude", threshold=study.MAGNITUDE_BAND,
                            claim=f"{name[f]} / {name['torch']} on {model_name(model)} is the "
                                  f"published ratio, within {study.MAGNITUDE_BAND:g}x",
                            published=published,
                            published_text=f"{published:.2f}x ({PUBLISHED_REGIME}); here: "
                                           f"{args.device}, {args.threads} threads, "
                                           f"{name[f]} vs {name['torch']}"),
                effect if effect is not None else values, q, conds,
                contended_rounds=contended))

    if len(models) >= 2:
        layer_counts = [layers(m) for m in models]
        slope_rows = []
        for f in frameworks:
            slopes = round_slopes(layer_counts, [[rounds[f][m][r] for m in models]
                                                 for r in range(settings["rounds"])])
            effect = study.per_round_effect(slopes)
            published_slope = _published_slope(f, models)
            cell = (f"{effect.estimate:.2f} [{effect.low:.2f}, {effect.high:.2f}] (n "
                    f"{effect.n})" if effect else f"{median(slopes):.2f} (too few rounds)")
            row = [study.PUBLISHED_NAMES[f], modes[f], cell]
            if f == "torch":
                row.append("baseline")
            else:
                torch_slopes = round_slopes(layer_counts, [[rounds["torch"][m][r]
                                                            for m in models]
                                                           for r in range(settings["rounds"])])
                ratio = study.per_round_effect([s / t for s, t in zip(slopes, torch_slopes)])
                row.append(f"{ratio.estimate:.2f} [{ratio.low:.2f}, {ratio.high:.2f}]"
                           if ratio else "-")
            row += [study.fmt(published_slope * 1000 / study.steps_per_epoch(), 2),
                    study.fmt(published_slope / _published_slope("torch", models), 2)]
            slope_rows.append(row)
        result.add_table(
            f"Per-layer cost of depth: slope of step time over layer count ({in_modes}, batch "
            f"{batch})",
            ["framework", "mode", "ms per layer [interval] (n rounds)",
             "slope / PyTorch's [interval]", "published ms per layer (s/epoch slope / 391)",
             "published slope ratio"],
            slope_rows, note="Descriptive, no verdict: per round the least-squares slope "
                             "through that round's depths, then the median over rounds with "
                             "its exact interval (the same for the per-round slope ratio). "
                             + study.INTERVAL_NOTE)
    plot(result, rounds, models, label, modes)


def _ratios_pct(a: List[float], b: List[float]) -> List[float]:
    """Per round (b / a - 1) x 100: what a verdict with too few rounds still shows."""
    return [(y / x - 1) * 100 for x, y in zip(a, b)]


def graph_over_eager(eager: List[float], graph: List[float]) -> Dict[str, object]:
    """Table B's cell: the graph / eager step ratio of paired rounds (eager[r] and graph[r]
    measured in the same visit): the median of the rounds' ratios with its exact interval
    (study.paired_effect), its coverage and n; no interval under 6 rounds."""
    if len(eager) != len(graph) or not eager:
        raise ValueError(f"graph_over_eager: expected as many (>= 1) eager as graph rounds, got "
                         f"{len(eager)} and {len(graph)}")
    effect = study.paired_effect(eager, graph)
    if effect is None:
        return {"ratio": median([g / e for e, g in zip(eager, graph)]), "interval": None,
                "confidence": None, "n": len(eager)}
    return {"ratio": 1 + effect.estimate / 100,
            "interval": [1 + effect.low / 100, 1 + effect.high / 100],
            "confidence": effect.confidence, "n": effect.n}


def table_b(args, settings, result: study.Result, times, models, contended) -> None:
    """Per framework with both modes: graph / eager per depth with its interval and verdict,
    and how the eager-minus-graph gap grows with depth."""
    both = [f for f in times if set(times[f]) == {"eager", "graph"}]
    if not both:
        result.note("Table B (graph / eager) has no rows: no framework ran in both modes")
        return
    rounds = settings["rounds"]
    rows, summary_rows, ratios = [], [], {}
    for f in both:
        eager, graph = times[f]["eager"], times[f]["graph"]
        ratios[f] = {}
        conds = study.conditions(args, result.doc["workers"], result.doc["scale"], [f],
                                 study.BOTH_MODES)
        for m in models:
            cell = graph_over_eager(eager[m], graph[m])
            ratios[f][m] = cell
            gap = [e - g for e, g in zip(eager[m], graph[m])]
            ci = (f" [{cell['interval'][0]:.2f}, {cell['interval'][1]:.2f}]"
                  if cell["interval"] else "")
            rows.append([study.PUBLISHED_NAMES[f], layers(m), study.fmt(median(eager[m])),
                         study.fmt(median(graph[m])), f"{cell['ratio']:.2f}{ci}",
                         f"{cell['confidence']:.1%}" if cell["confidence"] else "-",
                         study.fmt(median(gap)), cell["n"]])
            q = study.quantity(model=model_name(m), layers=layers(m),
                               batch=settings["batch_size"],
                               compared=f"{study.PUBLISHED_NAMES[f]} graph vs eager",
                               timed="uninstrumented training step (data loading included)",
                               device=args.device, threads=args.threads)
            result.add_verdict(study.judge(
                study.Claim(key=f"{STUDY}.{f}.{m}.graph_faster_than_eager", kind="direction",
                            direction="lower", threshold=study.DEFAULT_THRESHOLD_PCT,
                            claim=f"{study.PUBLISHED_NAMES[f]}'s compiled (graph) mode trains "
                                  f"{model_name(m)} faster than its eager mode by more than "
                                  f"{study.DEFAULT_THRESHOLD_PCT:g}%",
                            published_text="no published figure (the published comparison "
                                           "ran each framework in one mode)"),
                study.paired_effect(eager[m], graph[m]) or _ratios_pct(eager[m], graph[m]),
                q, conds, contended_rounds=contended))
    result.doc["graph_over_eager"] = ratios
    result.add_table(
        "Table B: graph / eager step time per framework and depth (each framework's compiled "
        "mode against its eager mode)",
        ["framework", "layers", "eager step ms", "graph step ms", "graph / eager [interval]",
         "interval coverage", "eager - graph ms (median of rounds)", "n (rounds)"], rows,
        note=f"Uninstrumented training steps at batch {settings['batch_size']}, data loading "
             f"included. Both modes of a depth are measured in the same visit of every round; "
             f"the ratio is the median of the rounds' graph/eager ratios. "
             f"{study.INTERVAL_NOTE} Below 1: the compiled step is faster, and 1 - ratio is the "
             "share of the eager step that eager dispatch costs. Graph mode: TensorFlow's whole "
             "step in one tf.function; MXNet's hybridized network and PyTorch's "
             "torch.compile'd network, the loss, the backward call and the optimizer staying "
             "eager in both.")
    if len(models) >= 2:
        x = [layers(m) for m in models]
        for f in both:
            by_round = {mode: [[times[f][mode][m][r] for m in models] for r in range(rounds)]
                        for mode in ("eager", "graph")}
            gap = [[e - g for e, g in zip(er, gr)]
                   for er, gr in zip(by_round["eager"], by_round["graph"])]
            cells = []
            for series in (gap, by_round["eager"], by_round["graph"]):
                slopes = round_slopes(x, series)
                effect = study.per_round_effect(slopes)
                cells.append(f"{effect.estimate:.2f} [{effect.low:.2f}, {effect.high:.2f}]"
                             if effect else f"{median(slopes):.2f}")
            shallow, deep = models[0], models[-1]
            summary_rows.append([study.PUBLISHED_NAMES[f], f"{ratios[f][shallow]['ratio']:.2f}",
                                 f"{ratios[f][deep]['ratio']:.2f}", *cells])
        result.add_table(
            "Table B (depth): how eager dispatch grows with depth, the slope of the "
            "eager-minus-graph gap over layers",
            ["framework", f"graph / eager at {layers(models[0])} layers",
             f"graph / eager at {layers(models[-1])} layers",
             "eager - graph gap, ms per layer [interval]", "eager ms per layer [interval]",
             "graph ms per layer [interval]"], summary_rows,
            note="Descriptive: per round the least-squares slope through that round's depths, "
                 "the median over rounds with its exact interval. A positive gap slope: eager "
                 "dispatch costs more with every layer, which the compiled step saves. "
                 + study.INTERVAL_NOTE)
    plot_b(result, ratios, models)


def _published_slope(framework: str, models: List[str]) -> float:
    """Published s/epoch per layer: least-squares slope over the chosen depths."""
    import numpy as np
    x = np.array([layers(m) for m in models], dtype=float)
    y = np.array([PUBLISHED_S_PER_EPOCH[m][framework] for m in models])
    return float(np.polyfit(x, y, 1)[0]) if len(models) >= 2 else float("nan")


def _bars(centres: List[float], effects) -> Optional[List[List[float]]]:
    """errorbar's yerr from MedianIntervals (None where any is missing)."""
    if not all(effects):
        return None
    return [[c - e.low for c, e in zip(centres, effects)],
            [e.high - c for c, e in zip(centres, effects)]]


def plot(result, rounds, models, label, modes) -> None:
    plt = study.pyplot()
    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.4))
    x = [layers(m) for m in models]
    n = len(rounds["torch"][models[0]])
    for f in rounds:
        name = study.mode_label(f, modes[f])
        effects = [study.per_round_effect(rounds[f][m]) for m in models]
        meds = [median(rounds[f][m]) for m in models]
        line = ax_time.errorbar(x, meds, yerr=_bars(meds, effects), marker="o", capsize=3,
                                label=name)
        colour = line[0].get_color()
        if f == "torch":
            continue
        ratio = [study.paired_effect(rounds["torch"][m], rounds[f][m]) for m in models]
        centres = [median([b / a for a, b in zip(rounds["torch"][m], rounds[f][m])])
                   for m in models]
        if all(ratio):
            centres = [1 + e.estimate / 100 for e in ratio]
            yerr = [[c - (1 + e.low / 100) for c, e in zip(centres, ratio)],
                    [(1 + e.high / 100) - c for c, e in zip(centres, ratio)]]
        else:
            yerr = None
        ax_ratio.errorbar(x, centres, yerr=yerr, marker="o", capsize=3, color=colour,
                          label=f"{name} (ours)")
        published = [PUBLISHED_S_PER_EPOCH[m][f] / PUBLISHED_S_PER_EPOCH[m]["torch"]
                     for m in models]
        ax_ratio.fill_between(x, [p / study.MAGNITUDE_BAND for p in published],
                              [p * study.MAGNITUDE_BAND for p in published], color=colour,
                              alpha=0.15)
        ax_ratio.plot(x, published, ls="--", color=colour, alpha=0.8,
                      label=f"{study.PUBLISHED_NAMES[f]} (published, band "
                            f"{study.MAGNITUDE_BAND:g}x)")
    ax_time.set(xlabel="layers", ylabel="step time, ms (median)", yscale="log",
                title=f"Step time vs depth (bars: exact interval of the median, n {n})")
    ax_time.legend(fontsize=8)
    ax_ratio.axhline(1.0, color="grey", lw=0.8)
    ax_ratio.set(xlabel="layers", ylabel="step time / PyTorch's (ratio)", yscale="log",
                 title=f"Ratio to PyTorch: ours (bars: interval, n {n}) vs published band")
    ax_ratio.legend(fontsize=7, ncol=2)
    result.add_plot(fig, "time_vs_depth.png",
                    f"Step time vs depth per framework ({study.describe_modes(modes)}; "
                    f"uninstrumented steps, batch 128, {n} rounds), and the median paired ratio "
                    f"to PyTorch with the interval its verdicts use beside the published ratio "
                    f"and its {study.MAGNITUDE_BAND:g}x band ({label} for s/epoch).")


def plot_b(result, ratios, models) -> None:
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = [layers(m) for m in models]
    n = None
    for f, by_model in ratios.items():
        values = [by_model[m]["ratio"] for m in models]
        cis = [by_model[m]["interval"] for m in models]
        n = by_model[models[0]]["n"]
        if all(cis):
            yerr = [[v - c[0] for v, c in zip(values, cis)],
                    [c[1] - v for v, c in zip(values, cis)]]
            ax.errorbar(x, values, yerr=yerr, marker="o", capsize=3,
                        label=study.PUBLISHED_NAMES[f])
        else:
            ax.plot(x, values, marker="o", label=study.PUBLISHED_NAMES[f])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1 - study.DEFAULT_THRESHOLD_PCT / 100, color="#b07d00", lw=0.8, ls=":",
               label=f"threshold (-{study.DEFAULT_THRESHOLD_PCT:g}%)")
    ax.set(xlabel="layers", ylabel="graph step / eager step (ratio)",
           title=f"Compiled vs eager, per framework (bars: exact interval, n {n})")
    ax.legend(fontsize=8)
    result.add_plot(fig, "graph_over_eager.png",
                    "Each framework's graph-mode step over its eager step vs depth (median of "
                    "paired round ratios with the exact interval its verdict uses); below the "
                    "dotted threshold the compiled step is faster by more than the claim's 5%.")


if __name__ == "__main__":
    sys.exit(main())
