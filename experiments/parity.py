"""Study: before comparing times, show the four frameworks' models learn alike.

    python -m experiments.parity                       # quick scale (make experiments)
    python -m experiments.parity --full

ResNet-20 trained for a fixed number of steps from the same initial weights on the same
batches (the shared sample plan, the same seed) in every framework, each in its own worker.
The loss curves go on one plot; the check passes when every framework's final loss (the mean
of the last steps) lies within the stated tolerance of PyTorch's, and every framework's loss
fell.

Execution modes (--mode): each framework trains once per mode it runs in, from the same weights
and batches; the baseline is PyTorch eager where it ran (else PyTorch in the mode measured), and
where a framework ran in both modes its graph-mode final loss is also compared with its own
eager one (the same model compiled: the same tolerance). Chainer has no graph mode (skipped, the
reason noted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import List, Optional

from experiments import study
from experiments.workers import Pool

STUDY = "parity"
# Relative tolerance on the final loss, stated before measuring: the tests show the same
# weights after two steps (rtol 1e-4); over tens of steps float rounding (summation order,
# fused kernels) and batch norm's bias correction drift apart, a few percent at most.
TOLERANCE = 0.10
QUICK = dict(model="resnet20", batch_size=32, steps=40, final_window=5, train_size=1280)
FULL = dict(model="resnet20", batch_size=128, steps=400, final_window=20, train_size=None)


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{STUDY}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_common_arguments(parser, STUDY, default_mode="both")
    parser.add_argument("--steps", type=study.positive_int, help="override the scale's steps")
    parser.add_argument("--batch-size", type=study.positive_int,
                        help="override the scale's batch")
    args = parser.parse_args(argv)
    args.frameworks_list = study.resolve_frameworks(parser, args, study.FRAMEWORKS)
    if "torch" not in args.frameworks_list:
        parser.error("--frameworks: losses are compared to PyTorch's; expected torch among "
                     "them")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    scale = "full" if args.full else "quick"
    settings = dict(FULL if args.full else QUICK)
    settings.update({k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size))
                     if v is not None})
    settings["final_window"] = min(settings["final_window"], settings["steps"])
    settings.update(frameworks=args.frameworks_list, threads=args.threads, device=args.device,
                    tolerance_rel=TOLERANCE, seed=0, mode=args.mode,
                    modes=study.modes_for(args.mode, args.frameworks_list))
    departures = [f"{settings['steps']} steps instead of 100 epochs (the published runs "
                  f"reached a minimum test error of 0.08-0.10 in all four); synthetic "
                  f"CIFAR-shaped data"]
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures, notes=[study.STAND_IN_NOTE],
                          quiet_wait_s=args.quiet_wait)
    return result.run(run, args, settings, result)


def run(args, settings, result: study.Result) -> None:
    frameworks = args.frameworks_list
    plan = study.ModePlan(args.mode, frameworks)
    losses = {}           # {mode: {framework: loss per step}}
    # One framework at a time: nothing is timed, so nothing needs interleaving.
    for framework in frameworks:
        with Pool([framework], threads=args.threads, device=args.device,
                  log_dir=result.out) as pool:
            result.record_worker(framework, pool.hello[framework])
            worker = pool.use(framework)
            for mode in list(plan.modes[framework]):
                study.progress(f"{STUDY}: {framework} {mode}: {settings['steps']} steps")
                built = plan.build(worker, result, name=mode, steps_needed=settings["steps"],
                                   config={"model": settings["model"], "mode": mode,
                                           "batch_size": settings["batch_size"], "seed": 0,
                                           "train_size": settings["train_size"],
                                           "test_size": settings["batch_size"]
                                           if settings["train_size"] else None})
                if built is None:
                    continue
                losses.setdefault(mode, {})[framework] = worker.call(
                    "steps", name=mode, n=settings["steps"], mode="plain")["losses"]
                worker.call("drop", name=mode)
                result.add_samples("losses", losses)
    analyse(args, settings, result, losses)


def analyse(args, settings, result, losses) -> None:
    window = settings["final_window"]
    final = {m: {f: statistics.mean(v[-window:]) for f, v in by_f.items()}
             for m, by_f in losses.items()}
    first = {m: {f: statistics.mean(v[:window]) for f, v in by_f.items()}
             for m, by_f in losses.items()}
    base_mode = "eager" if "torch" in losses.get("eager", {}) else next(
        m for m in losses if "torch" in losses[m])
    baseline = final[base_mode]["torch"]
    rows, passed = [], True
    for mode, by_f in losses.items():
        for f, values in by_f.items():
            rel = final[mode][f] / baseline - 1.0
            within = abs(rel) <= TOLERANCE
            fell = final[mode][f] < first[mode][f]
            own = "-"
            if mode == "graph" and f in final.get("eager", {}):
                rel_own = final[mode][f] / final["eager"][f] - 1.0
                within &= abs(rel_own) <= TOLERANCE
                own = f"{rel_own * 100:+.2f}%"
            passed &= within and fell
            rows.append([study.PUBLISHED_NAMES[f], mode, f"{values[0]:.4f}",
                         f"{first[mode][f]:.4f}", f"{final[mode][f]:.4f}",
                         f"{rel * 100:+.2f}%", own, "yes" if fell else "NO",
                         "pass" if within and fell else "FAIL"])
    result.add_table(
        f"Parity: {settings['steps']} training steps from the same weights and batches "
        f"({settings['model']}, batch {settings['batch_size']}; "
        f"{', '.join(losses)} mode)",
        ["framework", "mode", "first loss", f"mean of first {window}",
         f"mean of last {window}", f"final vs PyTorch {base_mode}",
         "graph final vs its own eager", "loss fell", f"within {TOLERANCE:.0%}"], rows,
        note=f"Tolerance stated before measuring: final loss within {TOLERANCE:.0%} of "
             f"PyTorch's ({base_mode}) and, in graph mode, of the framework's own eager run; "
             f"lower than at the start.")
    result.doc["parity"] = {"passed": passed, "tolerance_rel": TOLERANCE,
                            "baseline": f"torch {base_mode}", "final_loss": final,
                            "first_loss": first}
    result.note(f"parity {'passed' if passed else 'FAILED'}: every framework's final loss "
                f"within {TOLERANCE:.0%} of PyTorch's and falling" if passed else
                f"parity FAILED: see the table (tolerance {TOLERANCE:.0%})")
    plt = study.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, by_f in losses.items():
        for f, values in by_f.items():
            ax.plot(range(1, len(values) + 1), values, label=study.mode_label(f, mode), lw=1.2,
                    ls="-" if mode == "eager" else "--")
    ax.set(xlabel="step", ylabel="training loss", title="Same weights, same batches")
    ax.legend(fontsize=8)
    result.add_plot(fig, "loss_curves.png", "Training loss per step in every framework and "
                                            "execution mode (graph dashed).")


if __name__ == "__main__":
    sys.exit(main())
