"""Study H3: do asynchronous loaders with workers keep the step from waiting for data?

    python -m experiments.data_loading                 # quick scale (make experiments)
    python -m experiments.data_loading --full

ResNet-20 on CIFAR-shaped data, augmented (pad, crop, flip) by each framework's own loader,
with 0, 1 and 2 loader workers (processes for PyTorch, Chainer and Gluon, threads for
tf.data): the data-wait phase's share of the step and the step time, in interleaved rounds.
The GPU-only factors (pinned memory, cuDNN autotune, channels-last) are rows that run only
with --device cuda on the GPU machine; on the CPU they are listed as not measured.

Execution modes (--mode): each (loader workers, mode) is a workload and a cell of the same
rounds; a compiled step is shorter, so the same loader leaves a larger share of it waiting.
Each figure carries its mode; Chainer has no graph mode (skipped, the reason noted).
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
    study.add_common_arguments(parser, STUDY, default_mode="eager")
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
                    loader_workers=list(WORKERS), mode=args.mode,
                    modes=study.modes_for(args.mode, args.frameworks_list))
    departures = [f"batch {settings['batch_size']} on the CPU, where the published advice "
                  f"was about not starving a GPU; here the loader's workers compete with the "
                  f"step for the same {args.threads} cores"]
    if args.device == "cpu":
        departures.append("GPU-only rows not measured: " + "; ".join(GPU_ONLY))
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures)
    return result.run(run, args, settings, result)


def cell_name(workers: int, mode: str) -> str:
    """The name a (loader workers, execution mode) cell is built and sampled under."""
    return f"workers{workers}/{mode}"


def run(args, settings, result: study.Result) -> None:
    frameworks = args.frameworks_list
    batch = settings["batch_size"]
    steps_needed = settings["warmup"] + settings["rounds"] * settings["steps_per_round"] + 1
    plan = study.ModePlan(args.mode, frameworks)
    with Pool(frameworks, threads=args.threads, device=args.device, log_dir=result.out) as pool:
        warmups, cells = {}, {}
        for framework in frameworks:
            result.record_worker(framework, pool.hello[framework])
            worker = pool.use(framework)
            warmups[framework], cells[framework] = {}, []
            for mode in list(plan.modes[framework]):
                for n in WORKERS:
                    name = cell_name(n, mode)
                    study.progress(f"{STUDY}: {framework} {mode}: build with {n} loader "
                                   f"workers")
                    built = plan.build(worker, result, name=name, steps_needed=steps_needed,
                                       config={"model": settings["model"], "batch_size": batch,
                                               "workers": n, "mode": mode,
                                               "train_size": settings["train_size"],
                                               "test_size": batch if settings["train_size"]
                                               else None})
                    if built is None:
                        break
                    warmups[framework][name] = worker.call("steps", name=name,
                                                           n=settings["warmup"],
                                                           mode="instrumented")["step_ms"]
                    cells[framework].append(Cell(name, name))
        result.add_samples("warmup_step_ms", warmups)
        cells = {f: c for f, c in cells.items() if c}

        def saved(r, samples):
            result.add_samples("rounds", samples)
            study.progress(f"{STUDY}: round {r + 1}/{settings['rounds']} done")

        samples = interleaved_rounds(pool, cells, rounds=settings["rounds"],
                                     steps=settings["steps_per_round"], mode="instrumented",
                                     on_round=saved)
        result.doc["settings"]["handoff_settle"] = pool.settle_summary()
        result.doc["machine"]["worker_peak_rss_mib"] = pool.peak_rss_mib()
        result.save()
    analyse(args, settings, result, samples, plan)


def analyse(args, settings, result, samples, plan: study.ModePlan) -> None:
    rows, shares = [], {}
    for f in samples:
        for mode in plan.modes[f]:
            step = {n: round_values(samples[f][cell_name(n, mode)]) for n in WORKERS}
            wait = {n: round_values(samples[f][cell_name(n, mode)], phase="data_wait")
                    for n in WORKERS}
            label = study.mode_label(f, mode)
            shares[label] = {n: median([w / s * 100 for w, s in zip(wait[n], step[n])])
                             for n in WORKERS}
            for n in WORKERS:
                row = [study.PUBLISHED_NAMES[f], mode, n, study.fmt(median(step[n])),
                       study.fmt(median(wait[n]), 2), f"{shares[label][n]:.1f}%"]
                if n == 0 or len(step[n]) < 2:
                    row.append("baseline" if n == 0 else "-")
                else:
                    row.append(study.fmt_ci(*bootstrap_diff_ci(step[0], step[n])))
                rows.append(row)
            if len(step[0]) >= 2:
                most = max(WORKERS)
                conds = study.conditions(args, result.doc["workers"], result.doc["scale"], [f],
                                         mode)
                conds.update(batch_size=settings["batch_size"], model=settings["model"])
                est, lo, hi = bootstrap_diff_ci(step[0], step[most])
                result.add_verdict(study.judge(
                    study.Hypothesis(
                        key=study.keyed(f"data_loading.{f}.workers_speed_up_step", mode),
                        claim=f"{label}: an asynchronous loader with {most} workers makes the "
                              f"training step faster than loading in the training process",
                        effect=f"step time, {most} loader workers vs 0, {mode} mode",
                        direction="lower"),
                    est, lo, hi, conds, data_wait_share_pct={str(n): shares[label][n]
                                                             for n in WORKERS}))
    for factor in GPU_ONLY if args.device == "cpu" else ():
        rows.append(["(GPU only)", "-", factor, "not measured (CPU run)", "-", "-", "-"])
    in_modes = ", ".join(sorted({m for f in samples for m in plan.modes[f]}))
    result.add_table(
        f"Loader workers: data-wait share of the step ({settings['model']}, batch "
        f"{settings['batch_size']}; {in_modes} mode)",
        ["framework", "mode", "loader workers", "step ms", "data wait ms", "data-wait share",
         "step vs 0 workers [95% CI]"], rows,
        note="Instrumented steps; data wait is the time blocked on the loader's next batch. "
             "Each framework's loaders stay alive side by side (their idle workers sleep on "
             "full prefetch queues). The mode column is the execution mode of the step.")
    plot(result, shares)


def plot(result, shares) -> None:
    """Bars per framework and mode (``shares``: {label: {workers: share %}})."""
    plt = study.pyplot()
    labels = list(shares)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(labels)), 4))
    width = 0.8 / len(WORKERS)
    for k, n in enumerate(WORKERS):
        ax.bar([x + (k - 1) * width for x in range(len(labels))],
               [shares[label][n] for label in labels], width, label=f"{n} workers")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("data wait, % of step (median)")
    ax.set_title("Time blocked on the loader")
    ax.legend()
    result.add_plot(fig, "data_wait_share.png",
                    "Data-wait share of the training step per framework, execution mode and "
                    "loader workers.")


if __name__ == "__main__":
    sys.exit(main())
