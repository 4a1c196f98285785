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
from profiler.analysis.stats import median

STUDY = "data_loading"
WORKERS = (0, 1, 2)
GPU_ONLY = ("pinned memory (PyTorch DataLoader pin_memory)", "cuDNN autotune on/off",
            "channels-last memory format")
# rounds >= study.MIN_ROUNDS: the verdicts are medians over rounds with exact intervals.
QUICK = dict(model="resnet20", batch_size=32, rounds=10, steps_per_round=2, warmup=2,
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
                          departures=departures, quiet_wait_s=args.quiet_wait)
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
    contended = result.contention(samples)
    for f in samples:
        for mode in plan.modes[f]:
            step = {n: round_values(samples[f][cell_name(n, mode)]) for n in WORKERS}
            wait = {n: round_values(samples[f][cell_name(n, mode)], phase="data_wait")
                    for n in WORKERS}
            label = study.mode_label(f, mode)
            per_round = {n: [w / s * 100 for w, s in zip(wait[n], step[n])] for n in WORKERS}
            shares[label] = {n: per_round[n] for n in WORKERS}
            for n in WORKERS:
                share = study.per_round_effect(per_round[n])
                row = [study.PUBLISHED_NAMES[f], mode, n, study.fmt(median(step[n])),
                       study.fmt(median(wait[n]), 2),
                       f"{share.estimate:.1f}% [{share.low:.1f}, {share.high:.1f}]" if share
                       else f"{median(per_round[n]):.1f}%"]
                row.append("baseline" if n == 0 else
                           study.fmt_effect(study.paired_effect(step[0], step[n])))
                rows.append(row)
            most = max(WORKERS)
            conds = study.conditions(args, result.doc["workers"], result.doc["scale"], [f], mode)
            base_share = study.per_round_effect(per_round[0])
            ceiling = None
            if base_share is not None and base_share.high < study.DEFAULT_THRESHOLD_PCT:
                ceiling = (f"data wait is {base_share.estimate:.1f}% [{base_share.low:.1f}, "
                           f"{base_share.high:.1f}] of the step with 0 loader workers: no "
                           f"loader can make the step {study.DEFAULT_THRESHOLD_PCT:g}% faster")
            q = study.quantity(model=model_label(settings["model"]),
                               batch=settings["batch_size"],
                               compared=f"{label}, {most} loader workers vs 0",
                               timed="instrumented training step (data loading included)",
                               device=args.device, threads=args.threads)
            effect = study.paired_effect(step[0], step[most])
            result.add_verdict(study.judge(
                study.Claim(key=study.keyed(f"data_loading.{f}.workers_speed_up_step", mode),
                            kind="direction", direction="lower",
                            threshold=study.DEFAULT_THRESHOLD_PCT,
                            claim=f"{label}: an asynchronous loader with {most} workers makes "
                                  f"the training step faster than loading in the training "
                                  f"process, by more than {study.DEFAULT_THRESHOLD_PCT:g}%",
                            published_text="common advice for GPU training (keep the device "
                                           "fed); no published figure for a CPU"),
                effect or [(b / a - 1) * 100 for a, b in zip(step[0], step[most])], q, conds,
                ceiling=ceiling, contended_rounds=contended,
                data_wait_share_pct={str(n): median(per_round[n]) for n in WORKERS}))
    for factor in GPU_ONLY if args.device == "cpu" else ():
        rows.append(["(GPU only)", "-", factor, "not measured (CPU run)", "-", "-", "-"])
    in_modes = ", ".join(sorted({m for f in samples for m in plan.modes[f]}))
    result.add_table(
        f"Loader workers: data-wait share of the step ({settings['model']}, batch "
        f"{settings['batch_size']}; {in_modes} mode)",
        ["framework", "mode", "loader workers", "step ms", "data wait ms",
         "data-wait share [interval]", "step vs 0 workers [interval] (n)"], rows,
        note="Instrumented steps; data wait is the time blocked on the loader's next batch. "
             "Each framework's loaders stay alive side by side (their idle workers sleep on "
             "full prefetch queues). The mode column is the execution mode of the step. "
             + study.INTERVAL_NOTE)
    plot(result, shares)
    study.plot_verdicts(result, [r for r in result.doc["verdicts"]
                                 if r["key"].startswith("data_loading.")], "verdicts.png",
                        f"data_loading verdicts ({settings['model']}, batch "
                        f"{settings['batch_size']}, {in_modes} mode)")


def model_label(model: str) -> str:
    """'ResNet-20'."""
    return model.replace("resnet", "ResNet-")


def plot(result, shares) -> None:
    """Bars per framework and mode (``shares``: {label: {workers: per-round share %}}), each
    the median with its exact interval."""
    plt = study.pyplot()
    labels = list(shares)
    fig, ax = plt.subplots(figsize=(max(7, 1.4 * len(labels)), 4))
    width = 0.8 / len(WORKERS)
    n = None
    for k, workers in enumerate(WORKERS):
        centres, err = [], [[], []]
        for label in labels:
            n = len(shares[label][workers])
            centre, below, above = study.median_bar(shares[label][workers])
            centres.append(centre)
            err[0].append(below)
            err[1].append(above)
        ax.bar([x + (k - 1) * width for x in range(len(labels))], centres, width, yerr=err,
               capsize=3, label=f"{workers} workers")
    ax.axhline(study.DEFAULT_THRESHOLD_PCT, color="#b07d00", lw=0.8, ls=":",
               label=f"{study.DEFAULT_THRESHOLD_PCT:g}% (the speed-up claim's threshold)")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("data wait, % of the step (median of rounds)")
    ax.set_title(f"Time blocked on the loader (bars: exact interval, n {n} rounds)")
    ax.legend(fontsize=8)
    result.add_plot(fig, "data_wait_share.png",
                    "Data-wait share of the training step per framework, execution mode and "
                    "loader workers (median of per-round shares with its exact interval); "
                    "below the dotted line, removing the wait could not make the step 5% "
                    "faster.")


if __name__ == "__main__":
    sys.exit(main())
