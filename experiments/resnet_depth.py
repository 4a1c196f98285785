"""Study: ResNet-20/32/44/56 for CIFAR-10 in four frameworks, the published seconds-per-epoch
table reproduced as ratios to PyTorch, and the per-layer cost of depth per framework.

    python -m experiments.resnet_depth                 # quick scale (make experiments)
    python -m experiments.resnet_depth --full          # more rounds and steps, full data set

Each framework runs in a worker process of its own; rounds rotate the frameworks' order (and
the depths' within a framework), and each visit times uninstrumented training steps at batch
128. Seconds per epoch are extrapolated from the measured steps (x 391 steps). The per-layer
cost is the slope of step time over the layer count, with a bootstrap interval over rounds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from experiments import study
from experiments.workers import Cell, Pool, interleaved_rounds, round_values
from profiler.analysis.stats import bootstrap_diff_ci, bootstrap_slope_ci, iqr, median

STUDY = "resnet_depth"
MODELS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}   # model -> n
# Seconds per epoch, K80 GPU, batch 128 (the published table).
PUBLISHED_S_PER_EPOCH = {
    "resnet20": {"tensorflow": 51.8, "mxnet": 50.2, "chainer": 35.4, "torch": 26.6},
    "resnet32": {"tensorflow": 75.7, "mxnet": 69.3, "chainer": 56.9, "torch": 40.7},
    "resnet44": {"tensorflow": 96.9, "mxnet": 86.9, "chainer": 80.9, "torch": 55.5},
    "resnet56": {"tensorflow": 119.4, "mxnet": 111.8, "chainer": 100.7, "torch": 70.8},
}
QUICK = dict(batch_size=128, rounds=5, steps_per_round=1, warmup=2, train_size=2048)
FULL = dict(batch_size=128, rounds=10, steps_per_round=5, warmup=3, train_size=None)


def layers(model: str) -> int:
    """6n + 2."""
    return 6 * MODELS[model] + 2


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{STUDY}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_common_arguments(parser, STUDY)
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
                    threads=args.threads, device=args.device, mode="plain training steps")
    departures = [f"{settings['rounds']} rounds x {settings['steps_per_round']} measured "
                  f"step(s) per framework and depth instead of 100 epochs; seconds per epoch "
                  f"are extrapolated", "CPU instead of the published K80 GPU"]
    if settings["train_size"]:
        departures.append(f"synthetic CIFAR-shaped data, {settings['train_size']} training "
                          f"images cycled (step time does not depend on the set's size)")
    if settings["batch_size"] != study.PUBLISHED_BATCH:
        departures.append(f"batch {settings['batch_size']} instead of 128")
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures, notes=[study.STAND_IN_NOTE])
    return result.run(run, args, settings, result)


def run(args, settings: Dict[str, object], result: study.Result) -> None:
    frameworks, models = args.frameworks_list, args.models_list
    batch, rounds = settings["batch_size"], settings["rounds"]
    steps, warmup = settings["steps_per_round"], settings["warmup"]
    steps_needed = warmup + rounds * steps + 1
    config = {"batch_size": batch, "train_size": settings["train_size"],
              "test_size": batch if settings["train_size"] else None}
    with Pool(frameworks, threads=args.threads, device=args.device, log_dir=result.out) as pool:
        for framework in frameworks:
            result.record_worker(framework, pool.hello[framework])
        warmups: Dict[str, Dict[str, list]] = {}
        for framework in frameworks:
            worker = pool.use(framework)
            warmups[framework] = {}
            for model in models:
                study.progress(f"{STUDY}: {framework} {model}: build, {warmup} warm-up steps")
                worker.call("build", name=model, config={"model": model, **config},
                            steps_needed=steps_needed)
                warmups[framework][model] = worker.call("steps", name=model, n=warmup,
                                                        mode="plain")["step_ms"]
        result.add_samples("warmup_step_ms", warmups)

        def saved(r, samples):
            result.add_samples("rounds", samples)
            result.add_samples("settle_s", pool.settle_s)
            study.progress(f"{STUDY}: round {r + 1}/{rounds} done")

        samples = interleaved_rounds(pool, {f: [Cell(m, m) for m in models] for f in frameworks},
                                     rounds=rounds,
                                     steps=steps, mode="plain", on_round=saved)
        result.doc["settings"]["handoff_settle"] = pool.settle_summary()
        result.doc["machine"]["worker_peak_rss_mib"] = pool.peak_rss_mib()
        result.save()
    analyse(args, settings, result, samples)


def analyse(args, settings, result: study.Result, samples) -> None:
    frameworks, models = args.frameworks_list, args.models_list
    rounds = {f: {m: round_values(samples[f][m]) for m in models} for f in frameworks}
    measured_steps = settings["rounds"] * settings["steps_per_round"]
    label = study.extrapolation_label(measured_steps)
    conds = study.conditions(args, result.doc["workers"], result.doc["scale"], frameworks)
    conds["batch_size"] = settings["batch_size"]
    name = study.PUBLISHED_NAMES

    rows = []
    for model in models:
        epoch_s = {f: study.extrapolate_epoch_s(median(rounds[f][model])) for f in frameworks}
        compared = study.published_comparison(epoch_s, PUBLISHED_S_PER_EPOCH[model])
        for f in frameworks:
            cells = [layers(model), name[f], study.fmt(median(rounds[f][model])),
                     study.fmt(iqr(rounds[f][model])), study.fmt(epoch_s[f])]
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
        "Step time and seconds per epoch by depth, ours (CPU) beside the published (K80)",
        ["layers", "framework", "step ms (median)", "IQR ms", "s/epoch (extrapolated)",
         "ratio to PyTorch [95% CI]", "published s/epoch", "published ratio",
         "ours / published ratio"], rows,
        note=f"s/epoch {label}. Ratios are per-round (paired) medians; absolute published "
             f"times are from another machine and compare only as ratios.")

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
            row = [name[f], f"{slope:.2f} [{lo:.2f}, {hi:.2f}]"]
            if f == "torch":
                row.append("baseline")
            else:
                matrix = [[rounds[f][m][r] for m in models] for r in range(settings["rounds"])]
                est, lo_r, hi_r = bootstrap_slope_ci(layer_counts, matrix,
                                                     baseline_rounds=torch_matrix)
                row.append(study.fmt_ci(est, lo_r, hi_r))
                result.add_verdict(study.judge(
                    study.Hypothesis(
                        key=f"resnet_depth.{f}.per_layer_cost",
                        claim=f"{name[f]}'s cost per added layer exceeds PyTorch's (published: "
                              f"{published_slope[f] / published_slope['torch']:.2f}x)",
                        effect=f"slope of step time over layers, {f} vs torch",
                        direction="higher"),
                    est, lo_r, hi_r, conds))
            row += [study.fmt(published_slope[f] * 1000 / study.steps_per_epoch(), 2),
                    study.fmt(published_slope[f] / published_slope["torch"], 2)]
            slope_rows.append(row)
        result.add_table(
            "Per-layer cost of depth: slope of step time over layer count",
            ["framework", "ms per layer [95% CI]", "slope vs PyTorch [95% CI]",
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
                key=f"resnet_depth.{f}.slower_than_torch",
                claim=f"{name[f]} trains ResNet slower than PyTorch (published: "
                      f"{min(published):.2f}-{max(published):.2f}x the time)",
                effect=f"step time summed over {','.join(models)}, {f} vs torch",
                direction="higher"),
            est, lo, hi, conds))
    plot(result, frameworks, models, rounds, label, per_layer)


def _published_slope(framework: str, models: List[str]) -> float:
    """Published s/epoch per layer: least-squares slope over the chosen depths."""
    import numpy as np
    x = np.array([layers(m) for m in models], dtype=float)
    y = np.array([PUBLISHED_S_PER_EPOCH[m][framework] for m in models])
    return float(np.polyfit(x, y, 1)[0]) if len(models) >= 2 else float("nan")


def plot(result, frameworks, models, rounds, label, per_layer) -> None:
    plt = study.pyplot()
    fig, (ax_time, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [layers(m) for m in models]
    for f in frameworks:
        meds = [study.extrapolate_epoch_s(median(rounds[f][m])) for m in models]
        spread = [study.extrapolate_epoch_s(iqr(rounds[f][m])) / 2 for m in models]
        line = ax_time.errorbar(x, meds, yerr=spread, marker="o", capsize=3,
                                label=study.PUBLISHED_NAMES[f])
        colour = line[0].get_color()
        ax_ratio.plot(x, [median(rounds[f][m]) / median(rounds["torch"][m]) for m in models],
                      marker="o", color=colour, label=f"{study.PUBLISHED_NAMES[f]} (ours)")
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
                    f"Seconds per epoch vs depth per framework ({label}), and the ratio to "
                    f"PyTorch beside the published ratio.")


if __name__ == "__main__":
    sys.exit(main())
