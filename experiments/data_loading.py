"""Study H3: do asynchronous loaders with workers keep the step from waiting for data?

    python -m experiments.data_loading                 # quick scale (make experiments)
    python -m experiments.data_loading --full

ResNet-20 on CIFAR-shaped data, augmented (pad, crop, flip) by each framework's own loader,
with 0, 1 and 2 loader workers (processes for PyTorch, Chainer and Gluon, threads for
tf.data): the data-wait phase's share of the step and the step time, in interleaved rounds.
The GPU-only factors (pinned memory, cuDNN autotune, channels-last) are rows that run only
with --device cuda on the GPU machine; on the CPU they are listed as not measured.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from experiments import study
from experiments.workers import Cell, Pool, interleaved_rounds, round_values
from profiler.analysis.stats import bootstrap_diff_ci, median

STUDY = "data_loading"
WORKERS = (0, 1, 2)
GPU_ONLY = ("pinned memory (PyTorch DataLoader pin_memory)", "cuDNN autotune on/off",
            "channels-last memory format")
QUICK = dict(model="resnet20", batch_size=32, rounds=6, steps_per_round=2, warmup=2,
             train_size=1024)
FULL = dict(model="resnet20", batch_size=128, rounds=15, steps_per_round=5, warmup=3,
            train_size=None)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{STUDY}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_common_arguments(parser, STUDY)
    parser.add_argument("--rounds", type=study.positive_int, help="override the scale's rounds")
    parser.add_argument("--batch-size", type=study.positive_int,
                        help="override the scale's batch")
    args = parser.parse_args(argv)
    args.frameworks_list = study.resolve_frameworks(parser, args, study.FRAMEWORKS)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    scale = "full" if args.full else "quick"
    settings = dict(FULL if args.full else QUICK)
    settings.update({k: v for k, v in (("rounds", args.rounds), ("batch_size", args.batch_size))
                     if v is not None})
    settings.update(frameworks=args.frameworks_list, threads=args.threads, device=args.device,
                    loader_workers=list(WORKERS))
    departures = [f"batch {settings['batch_size']} on the CPU, where the published advice "
                  f"was about not starving a GPU; here the loader's workers compete with the "
                  f"step for the same {args.threads} cores"]
    if args.device == "cpu":
        departures.append("GPU-only rows not measured: " + "; ".join(GPU_ONLY))
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures)
    return result.run(run, args, settings, result)


def run(args, settings, result: study.Result) -> None:
    frameworks = args.frameworks_list
    batch = settings["batch_size"]
    steps_needed = settings["warmup"] + settings["rounds"] * settings["steps_per_round"] + 1
    with Pool(frameworks, threads=args.threads, device=args.device, log_dir=result.out) as pool:
        warmups = {}
        for framework in frameworks:
            result.record_worker(framework, pool.hello[framework])
            worker = pool.use(framework)
            warmups[framework] = {}
            for n in WORKERS:
                study.progress(f"{STUDY}: {framework}: build with {n} loader workers")
                worker.call("build", name=f"workers{n}", steps_needed=steps_needed, config={
                    "model": settings["model"], "batch_size": batch, "workers": n,
                    "train_size": settings["train_size"],
                    "test_size": batch if settings["train_size"] else None})
                warmups[framework][n] = worker.call("steps", name=f"workers{n}",
                                                    n=settings["warmup"],
                                                    mode="instrumented")["step_ms"]
        result.add_samples("warmup_step_ms", warmups)

        def saved(r, samples):
            result.add_samples("rounds", samples)
            study.progress(f"{STUDY}: round {r + 1}/{settings['rounds']} done")

        cells = {f: [Cell(f"workers{n}", f"workers{n}") for n in WORKERS] for f in frameworks}
        samples = interleaved_rounds(pool, cells, rounds=settings["rounds"],
                                     steps=settings["steps_per_round"], mode="instrumented",
                                     on_round=saved)
        result.doc["settings"]["handoff_settle"] = pool.settle_summary()
        result.doc["machine"]["worker_peak_rss_mib"] = pool.peak_rss_mib()
        result.save()
    analyse(args, settings, result, samples)


def analyse(args, settings, result, samples) -> None:
    frameworks = args.frameworks_list
    conds = study.conditions(args, result.doc["workers"], result.doc["scale"], frameworks)
    conds.update(batch_size=settings["batch_size"], model=settings["model"])
    rows, shares = [], {}
    for f in frameworks:
        step = {n: round_values(samples[f][f"workers{n}"]) for n in WORKERS}
        wait = {n: round_values(samples[f][f"workers{n}"], phase="data_wait") for n in WORKERS}
        shares[f] = {n: median([w / s * 100 for w, s in zip(wait[n], step[n])])
                     for n in WORKERS}
        for n in WORKERS:
            row = [study.PUBLISHED_NAMES[f], n, study.fmt(median(step[n])),
                   study.fmt(median(wait[n]), 2), f"{shares[f][n]:.1f}%"]
            if n == 0 or len(step[n]) < 2:
                row.append("baseline" if n == 0 else "-")
            else:
                row.append(study.fmt_ci(*bootstrap_diff_ci(step[0], step[n])))
            rows.append(row)
        if len(step[0]) >= 2:
            most = max(WORKERS)
            est, lo, hi = bootstrap_diff_ci(step[0], step[most])
            result.add_verdict(study.judge(
                study.Hypothesis(
                    key=f"data_loading.{f}.workers_speed_up_step",
                    claim=f"{study.PUBLISHED_NAMES[f]}: an asynchronous loader with {most} "
                          f"workers makes the training step faster than loading in the "
                          f"training process",
                    effect=f"step time, {most} loader workers vs 0", direction="lower"),
                est, lo, hi, conds, data_wait_share_pct={str(n): shares[f][n]
                                                         for n in WORKERS}))
    for factor in GPU_ONLY if args.device == "cpu" else ():
        rows.append(["(GPU only)", factor, "not measured (CPU run)", "-", "-", "-"])
    result.add_table(
        f"Loader workers: data-wait share of the step ({settings['model']}, batch "
        f"{settings['batch_size']})",
        ["framework", "loader workers", "step ms", "data wait ms", "data-wait share",
         "step vs 0 workers [95% CI]"], rows,
        note="Instrumented steps; data wait is the time blocked on the loader's next batch. "
             "Each framework's three loaders stay alive side by side (their idle workers "
             "sleep on full prefetch queues).")
    plot(result, frameworks, shares)


def plot(result, frameworks, shares) -> None:
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(WORKERS)
    for k, n in enumerate(WORKERS):
        ax.bar([x + (k - 1) * width for x in range(len(frameworks))],
               [shares[f][n] for f in frameworks], width, label=f"{n} workers")
    ax.set_xticks(range(len(frameworks)))
    ax.set_xticklabels([study.PUBLISHED_NAMES[f] for f in frameworks])
    ax.set_ylabel("data wait, % of step (median)")
    ax.set_title("Time blocked on the loader")
    ax.legend()
    result.add_plot(fig, "data_wait_share.png",
                    "Data-wait share of the training step per framework and loader workers.")


if __name__ == "__main__":
    sys.exit(main())
