"""Study H1: does a natively run loss backward make DeepPose train faster? And the published
curve: forward + backward time of loss-plus-network vs batch 2^n, PyTorch vs Chainer.

    python -m experiments.deeppose_loss                # quick scale (make experiments)
    python -m experiments.deeppose_loss --full         # published repetitions, larger batches

Part 1 (H1): in every framework, DeepPose's loss impls (autograd: the framework's primitives;
explicit: a hand-written backward in Python array ops; kernel: our kernel through DLPack;
native: our kernel registered as a framework op) rotate within interleaved rounds on one
workload; instrumented steps give the loss-backward phase and the whole step. Part 2: the
forward + backward time (no optimizer, no data loading) at batch 1, 2, 4, ... repeated in
rounds alternating PyTorch and Chainer, mean and spread, as the original plot.

Execution modes (--mode, default eager: the published DeepPose comparison ran PyTorch and
Chainer eager, the H1 claims are about the loss-backward phase, which eager mode separates in
every framework, and graph mode here costs a compilation per loss impl and, for the curve, per
batch size): each part runs once per mode, the frameworks of that mode together. In graph mode
each loss impl has a workload of its own (switching impls would recompile a TensorFlow or MXNet
graph every round) and ``kernel`` is refused (Python glue cannot run in a compiled graph).
Where a graph-mode step has no loss-backward phase of its own (TensorFlow's step is one call;
MXNet's hybridized backward gives no hook; PyTorch's eager loss after its compiled network
keeps it), H1 judges the whole step only, saying so. The curve needs the forward and backward
as separate calls, which TensorFlow's one-call graph step has none of (said in the result, not
run); Chainer has no graph mode (skipped, the reason noted).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Dict, List, Optional

from experiments import study
from experiments.workers import ONE_CALL, Cell, Pool, interleaved_rounds, round_values
from profiler.analysis.stats import iqr, median

STUDY = "deeppose_loss"
IMPLS = ("autograd", "explicit", "kernel", "native")
CURVE_FRAMEWORKS = ("torch", "chainer")
# Published: per-epoch time Chainer / PyTorch on the CPU and the GPU.
PUBLISHED_REGIME = {"cpu": "published: DeepPose (LSP) seconds per epoch on a CPU, Chainer 1.x "
                           "and PyTorch 0.x of 2017, their batch",
                    "cuda": "published: DeepPose (LSP) seconds per epoch on a GPU, Chainer 1.x "
                            "and PyTorch 0.x of 2017, their batch"}
# The classic claim: "PyTorch trains faster than Chainer because its loss backward runs
# natively". As a mechanism: the loss backward's difference accounts for at least this share
# of Chainer's gap to PyTorch.
MECHANISM_SHARE_PCT = 50.0
PUBLISHED_EPOCH_S = {"cpu": {"chainer": 8.2, "torch": 5.0},
                     "cuda": {"chainer": 0.45, "torch": 0.28}}
# h1_rounds >= study.MIN_ROUNDS: H1's verdicts are medians over rounds with exact intervals.
# The curve is descriptive (mean and spread, as the published plot), its rounds few: the
# per-epoch Chainer / PyTorch claim is judged on H1's training steps, n = h1_rounds.
QUICK = dict(h1_batch=8, h1_rounds=10, h1_steps=1, h1_warmup=2, curve_max_n=7,
             curve_rounds=3, curve_warmup=2, train_size=64)
FULL = dict(h1_batch=32, h1_rounds=20, h1_steps=3, h1_warmup=3, curve_max_n=8,
            curve_rounds=100, curve_warmup=3, train_size=None)
# The first graph-mode step compiles; the warm-ups above (>= 2) leave it out of the rounds.


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{STUDY}",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    study.add_common_arguments(parser, STUDY, default_mode="eager")
    parser.add_argument("--h1-rounds", type=study.positive_int,
                        help="override the scale's rounds of the impl comparison")
    parser.add_argument("--h1-batch", type=study.positive_int,
                        help="override the scale's batch of the impl comparison")
    parser.add_argument("--curve-max-n", type=int, help="largest n of the batch 2^n curve")
    parser.add_argument("--curve-rounds", type=study.positive_int,
                        help="override the scale's repetitions of the curve")
    args = parser.parse_args(argv)
    args.frameworks_list = study.resolve_frameworks(parser, args, study.FRAMEWORKS)
    if args.curve_max_n is not None and not 0 <= args.curve_max_n <= 10:
        parser.error(f"--curve-max-n: expected an int in 0..10, got {args.curve_max_n}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    scale = "full" if args.full else "quick"
    settings = dict(FULL if args.full else QUICK)
    for key in ("h1_rounds", "h1_batch", "curve_max_n", "curve_rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings.update(frameworks=args.frameworks_list, threads=args.threads, device=args.device,
                    impls=list(IMPLS), mode=args.mode,
                    modes=study.modes_for(args.mode, args.frameworks_list))
    departures = [
        f"H1 times {settings['h1_rounds']} rounds x {settings['h1_steps']} instrumented "
        f"step(s) per impl at batch {settings['h1_batch']} instead of 100 training epochs",
        f"the curve runs n = 0..{settings['curve_max_n']} with {settings['curve_rounds']} "
        f"repetitions (published: 100 repetitions)"]
    if settings["train_size"]:
        departures.append(f"synthetic LSP-shaped data, {settings['train_size']} images cycled "
                          f"(rendered on access)")
    result = study.Result(STUDY, args.out, settings=settings, scale=scale,
                          departures=departures, quiet_wait_s=args.quiet_wait)
    return result.run(run, args, settings, result)


def run(args, settings, result: study.Result) -> None:
    frameworks = args.frameworks_list
    plan = study.ModePlan(args.mode, frameworks)
    with Pool(frameworks, threads=args.threads, device=args.device, log_dir=result.out) as pool:
        for framework in frameworks:
            result.record_worker(framework, pool.hello[framework])
        # One mode at a time, its frameworks together (H1 compares impls within a framework
        # and mode); each mode's workloads are dropped before the next builds its own.
        for mode in study.EXEC_MODES:
            in_mode = [f for f in frameworks if plan.runs(f, mode)]
            if not in_mode:
                continue
            h1 = run_h1(pool, in_mode, settings, result, plan, mode)
            if h1:
                analyse_h1(args, settings, result, h1, mode)
        # The curve needs PyTorch and Chainer only: free the others' memory first.
        for framework in frameworks:
            if framework not in CURVE_FRAMEWORKS:
                pool.stop(framework)
        for mode in study.EXEC_MODES:
            curve_fws = [f for f in CURVE_FRAMEWORKS if f in frameworks and plan.runs(f, mode)]
            if curve_fws:
                curve, curve_fws = run_curve(pool, curve_fws, settings, result, plan, mode)
                if curve_fws:
                    analyse_curve(args, settings, result, curve, curve_fws, mode)
        result.doc["settings"]["handoff_settle"] = pool.settle_summary()
        result.doc["machine"]["worker_peak_rss_mib"] = pool.peak_rss_mib()
        result.save()


def run_h1(pool: Pool, frameworks, settings, result, plan: study.ModePlan, mode: str
           ) -> Dict[str, Dict[str, list]]:
    """H1's rounds in ``mode``: {framework: {impl: answers}} for the frameworks that run it.
    Eager: one workload, the impl switched before each visit; graph: one workload per impl
    (built with it), so no round recompiles."""
    batch = settings["h1_batch"]
    graph = mode == "graph"
    per_workload = 1 if graph else len(IMPLS)
    steps_needed = (settings["h1_warmup"] + settings["h1_rounds"] * settings["h1_steps"]) * \
        per_workload + 1
    config = {"model": "deeppose", "batch_size": batch, "mode": mode,
              "train_size": settings["train_size"],
              "test_size": batch if settings["train_size"] else None}
    cells, warmups, skipped, names = {}, {}, {}, {}
    for framework in frameworks:
        worker = pool.use(framework)
        study.progress(f"{STUDY}: {framework} {mode}: build DeepPose at batch {batch}")
        first = f"h1/{mode}/autograd" if graph else f"h1/{mode}"
        built = plan.build(worker, result, name=first, steps_needed=steps_needed,
                           config={**config, "loss_impl": "autograd"})
        if built is None:
            continue
        unavailable = built["unavailable"]["loss"]
        skipped[framework] = unavailable
        impls = [i for i in IMPLS if i not in unavailable]
        names[framework] = {i: f"h1/{mode}/{i}" if graph else first for i in impls}
        cells[framework] = [Cell(i, names[framework][i], None if graph else {"loss": i})
                            for i in impls]
        warmups[framework] = {}
        for impl in impls:
            if graph and impl != "autograd":
                worker.call("build", name=names[framework][impl], steps_needed=steps_needed,
                            config={**config, "loss_impl": impl})
            elif not graph:
                worker.call("set_impls", name=first, loss=impl)
            warmups[framework][impl] = worker.call("steps", name=names[framework][impl],
                                                   n=settings["h1_warmup"],
                                                   mode="instrumented")["step_ms"]
    result.doc["samples"].setdefault("h1_warmup_step_ms", {})[mode] = warmups
    result.save()
    for framework, reasons in skipped.items():
        for impl, reason in reasons.items():
            result.note(f"{framework} {mode}: loss impl {impl} not measured: {reason}")
    if not cells:
        return {}

    def saved(r, samples):
        result.doc["samples"].setdefault("h1_rounds", {})[mode] = samples
        result.save()
        study.progress(f"{STUDY}: H1 {mode} round {r + 1}/{settings['h1_rounds']} done")

    samples = interleaved_rounds(pool, cells, rounds=settings["h1_rounds"],
                                 steps=settings["h1_steps"], mode="instrumented",
                                 on_round=saved)
    for framework, by_impl in names.items():
        worker = pool.use(framework)
        for name in set(by_impl.values()):
            worker.call("drop", name=name)
    return samples


def analyse_h1(args, settings, result, samples, mode: str) -> None:
    conds = study.conditions(args, result.doc["workers"], result.doc["scale"],
                             list(samples), mode)
    contended = result.contention(samples)
    batch = settings["h1_batch"]
    timed = "instrumented training step (data loading included)"
    rows, without_phase, step_by_fw, loss_by_fw = [], [], {}, {}
    for framework, by_impl in samples.items():
        name = study.mode_label(framework, mode)
        step = {i: round_values(a) for i, a in by_impl.items()}
        loss_bwd = {i: round_values(a, phase="loss_backward") for i, a in by_impl.items()}
        loss_fwd = {i: round_values(a, phase="loss_forward") for i, a in by_impl.items()}
        step_by_fw[framework], loss_by_fw[framework] = step, loss_bwd
        # Graph mode has no loss-backward phase of its own (0 in every step): whole step only.
        separate = any(v > 0 for v in loss_bwd["autograd"])
        if not separate:
            without_phase.append(study.PUBLISHED_NAMES[framework])
        # The loss (forward + backward) as a share of the autograd step, per round: the most
        # any loss impl could save.
        loss_share = study.per_round_effect(
            [(f + b) / s * 100 for f, b, s in zip(loss_fwd["autograd"], loss_bwd["autograd"],
                                                   step["autograd"])]) if separate else None
        for impl in by_impl:
            cells = [study.PUBLISHED_NAMES[framework], mode, impl,
                     study.fmt(median(step[impl])), study.fmt(iqr(step[impl]))]
            cells += ([study.fmt(median(loss_bwd[impl]), 3), study.fmt(iqr(loss_bwd[impl]), 3)]
                      if separate else ["not separate", "-"])
            if impl == "autograd":
                cells += ["baseline", study.fmt_effect(loss_share, digits=2)
                          if separate else "-", "baseline"]
                rows.append(cells)
                continue
            cells.append(study.fmt_effect(study.paired_effect(loss_bwd["autograd"],
                                                              loss_bwd[impl]))
                         if separate and all(v > 0 for v in loss_bwd[impl]) else "-")
            cells.append("-")
            effect = study.paired_effect(step["autograd"], step[impl])
            cells.append(study.fmt_effect(effect))
            rows.append(cells)
            if impl not in ("explicit", "native"):
                continue
            ceiling = None
            if impl == "native" and loss_share is not None and (
                    loss_share.high < study.DEFAULT_THRESHOLD_PCT):
                ceiling = (f"the loss (forward + backward) is {loss_share.estimate:.2f}% "
                           f"[{loss_share.low:.2f}, {loss_share.high:.2f}] of the autograd "
                           f"step: no loss impl can make the step "
                           f"{study.DEFAULT_THRESHOLD_PCT:g}% faster")
            claim = (f"{name}: a loss backward in Python (explicit) makes the DeepPose step "
                     f"slower than the framework's autograd by more than "
                     f"{study.DEFAULT_THRESHOLD_PCT:g}%" if impl == "explicit" else
                     f"{name}: a natively run loss (our kernel as a framework op) makes the "
                     f"DeepPose step faster than the framework's autograd by more than "
                     f"{study.DEFAULT_THRESHOLD_PCT:g}%")
            q = study.quantity(model="DeepPose", batch=batch, timed=timed,
                               compared=f"{name}, {impl} vs autograd loss",
                               device=args.device, threads=args.threads)
            result.add_verdict(study.judge(
                study.Claim(key=study.keyed(f"{STUDY}.{framework}.{impl}_vs_autograd", mode),
                            kind="direction", claim=claim,
                            direction="higher" if impl == "explicit" else "lower",
                            threshold=study.DEFAULT_THRESHOLD_PCT,
                            published_text="published (PyTorch): CPU 47.6 h vs 47.6 h, GPU "
                                           "2.49 h vs 2.60 h per training run"),
                effect or _ratios_pct(step["autograd"], step[impl]), q, conds,
                ceiling=ceiling, contended_rounds=contended))
    if without_phase:
        result.note(f"H1 {mode}: {', '.join(without_phase)}: the loss backward is not a phase "
                    f"of its own in this mode (no hook runs inside a compiled graph; "
                    f"TensorFlow's graph step is one call), so only the whole step is judged "
                    f"there")
    result.add_table(
        f"H1 ({mode} mode): DeepPose loss impls, loss-backward phase and whole step "
        f"(instrumented steps)",
        ["framework", "mode", "loss impl", "step ms", "step IQR", "loss backward ms",
         "loss backward IQR", "loss backward vs autograd [interval] (n)",
         "loss (fwd + bwd) share of the step, % [interval]", "step vs autograd [interval] (n)"],
        rows,
        note=f"Batch {batch}; per-round medians paired across impls (every impl of a framework "
             f"measured in every round). {study.INTERVAL_NOTE} Chainer's native is the same "
             f"FunctionNode as its kernel (no C++ op registry), so their difference is the "
             f"noise floor."
             + (" Graph mode: one workload per impl, each compiled in its warm-up; kernel "
                "is refused there." if mode == "graph" else ""))
    judge_frameworks(args, result, step_by_fw, loss_by_fw, mode, conds, contended, batch)
    plot_h1(result, samples, mode)
    study.plot_verdicts(result, [r for r in result.doc["verdicts"]
                                 if r["key"].startswith(STUDY) and
                                 (mode == "eager") != r["key"].endswith("@graph")],
                        "verdicts.png" if mode == "eager" else f"verdicts_{mode}.png",
                        f"deeppose_loss verdicts ({mode} mode, CPU, batch {batch})")


def _ratios_pct(a, b):
    """Per round (b / a - 1) x 100: what a verdict with too few rounds still shows."""
    return [(y / x - 1) * 100 for x, y in zip(a, b)]


def judge_frameworks(args, result, step, loss_bwd, mode, conds, contended, batch) -> None:
    """Chainer against PyTorch on the autograd step (both in this mode): the published
    per-epoch ratio (magnitude and direction), and the classic mechanism, "because its loss
    backward runs natively": the loss-backward difference's share of the gap, per round."""
    if "torch" not in step or "chainer" not in step:
        return
    published = PUBLISHED_EPOCH_S[args.device]
    ratio = published["chainer"] / published["torch"]
    regime = (f"{published['chainer']} s / {published['torch']} s = {ratio:.2f}x "
              f"({PUBLISHED_REGIME[args.device]}); here: {args.device}, {args.threads} threads, "
              f"{mode} mode, batch {batch}")
    torch_s, chainer_s = step["torch"]["autograd"], step["chainer"]["autograd"]
    effect = study.paired_effect(torch_s, chainer_s)
    q = study.quantity(model="DeepPose", batch=batch,
                       timed="instrumented training step (data loading included)",
                       compared=f"Chainer {mode} vs PyTorch {mode}, autograd loss both",
                       device=args.device, threads=args.threads)
    values = effect or _ratios_pct(torch_s, chainer_s)
    result.add_verdict(study.judge(
        study.Claim(key=study.keyed(f"{STUDY}.chainer_slower_than_torch", mode),
                    kind="direction", direction="higher", threshold=study.DEFAULT_THRESHOLD_PCT,
                    claim=f"Chainer trains DeepPose slower than PyTorch by more than "
                          f"{study.DEFAULT_THRESHOLD_PCT:g}%", published=ratio,
                    published_text=regime),
        values, q, conds, contended_rounds=contended))
    result.add_verdict(study.judge(
        study.Claim(key=study.keyed(f"{STUDY}.chainer_over_torch_as_published", mode),
                    kind="magnitude", threshold=study.MAGNITUDE_BAND, published=ratio,
                    claim=f"Chainer / PyTorch on DeepPose is the published per-epoch ratio, "
                          f"within {study.MAGNITUDE_BAND:g}x",
                    published_text=regime),
        values, q, conds, contended_rounds=contended))
    gaps = [c - t for c, t in zip(chainer_s, torch_s)]
    diffs = [c - t for c, t in zip(loss_bwd["chainer"]["autograd"],
                                   loss_bwd["torch"]["autograd"])]
    if not all(v > 0 for v in loss_bwd["torch"]["autograd"] + loss_bwd["chainer"]["autograd"]):
        return     # no separate loss-backward phase in this mode
    ceiling = None
    if min(gaps) <= 0:
        ceiling = (f"Chainer's step was not slower than PyTorch's in every round (gap "
                   f"{min(gaps):.0f} to {max(gaps):.0f} ms): no gap to attribute")
    shares = [d / g * 100 if g > 0 else 0.0 for d, g in zip(diffs, gaps)]
    result.add_verdict(study.judge(
        study.Claim(key=study.keyed(f"{STUDY}.loss_backward_explains_gap", mode),
                    kind="mechanism", threshold=MECHANISM_SHARE_PCT,
                    claim=f"PyTorch trains DeepPose faster than Chainer because its loss "
                          f"backward runs natively: the loss backward accounts for at least "
                          f"{MECHANISM_SHARE_PCT:g}% of Chainer's gap",
                    published_text="the claim of a 2017 blog; its own measurement found the "
                                   "loss backward barely matters and the convolutions "
                                   "dominate"),
        shares, {**q, "timed": "loss-backward phase's difference / whole step's difference, "
                               "instrumented steps"},
        conds, ceiling=ceiling, contended_rounds=contended,
        gap_ms=median(gaps), loss_backward_difference_ms=median(diffs)))


def plot_h1(result, samples, mode: str) -> None:
    plt = study.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(IMPLS)
    any_phase, n = False, None
    for k, impl in enumerate(IMPLS):
        xs, step_ms, step_err, loss_ms = [], [], [[], []], []
        for x, (framework, by_impl) in enumerate(samples.items()):
            if impl in by_impl:
                values = round_values(by_impl[impl])
                n = len(values)
                centre, below, above = study.median_bar(values)
                xs.append(x + (k - 1.5) * width)
                step_ms.append(centre)
                step_err[0].append(below)
                step_err[1].append(above)
                loss_ms.append(median(round_values(by_impl[impl], phase="loss_backward")))
        axes[0].bar(xs, step_ms, width, yerr=step_err, capsize=2, label=impl)
        # A loss-backward phase that is not separate (graph mode) is 0: nothing to draw.
        axes[1].bar(xs, [v if v > 0 else float("nan") for v in loss_ms], width, label=impl)
        any_phase |= any(v > 0 for v in loss_ms)
    titles = (f"whole step, {mode} mode (bars: exact interval, n {n})",
              f"loss backward phase, {mode} mode (median, n {n})")
    labels = ("ms per training step (median of rounds)", "ms per loss backward (log scale)")
    for ax, title, ylabel in zip(axes, titles, labels):
        ax.set_xticks(range(len(samples)))
        ax.set_xticklabels([study.PUBLISHED_NAMES[f] for f in samples])
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, title="loss impl", title_fontsize=8)
    if any_phase:
        axes[1].set_yscale("log")
    else:
        axes[1].text(0.5, 0.5, "not a separate phase in this mode", ha="center",
                     transform=axes[1].transAxes)
    result.add_plot(fig, "h1_loss_impls.png" if mode == "eager" else f"h1_loss_impls_{mode}.png",
                    f"DeepPose step and loss-backward time per loss impl and framework, {mode} "
                    f"mode (medians over {n} rounds, the step with the exact interval of its "
                    f"median; the loss-backward axis is logarithmic, empty where the phase is "
                    f"not separate).")


def run_curve(pool: Pool, frameworks, settings, result, plan: study.ModePlan, mode: str):
    """The curve in ``mode``: ({batch: {framework: forward + backward ms per round}}, the
    frameworks measured). A framework whose step is one compiled call in this mode has no
    forward + backward to time apart: noted, left out."""
    curve: Dict[int, Dict[str, list]] = {}
    for n in range(settings["curve_max_n"] + 1):
        batch = 2 ** n
        steps_needed = settings["curve_warmup"] + settings["curve_rounds"] + 1
        for framework in list(frameworks):
            worker = pool.use(framework)
            built = plan.build(worker, result, name="curve", steps_needed=steps_needed, config={
                "model": "deeppose", "batch_size": batch, "mode": mode,
                "train_size": max(batch, settings["train_size"] or 0) or None,
                "test_size": batch if settings["train_size"] else None})
            if built is not None and tuple(built["step_calls"]) == ONE_CALL:
                worker.call("drop", name="curve")
                result.note(f"curve {mode}: {study.mode_label(framework, mode)} not measured: "
                            f"its step is one compiled call (step_calls {built['step_calls']}), "
                            f"so there is no forward + backward to time apart")
                built = None
            if built is None:
                frameworks = [f for f in frameworks if f != framework]
                continue
            worker.call("steps", name="curve", n=settings["curve_warmup"],
                        mode="forward_backward")
        if not frameworks:
            return curve, frameworks
        samples = interleaved_rounds(pool, {f: [Cell("curve", "curve")] for f in frameworks},
                                     rounds=settings["curve_rounds"], steps=1,
                                     mode="forward_backward")
        curve[batch] = {f: [a["step_ms"][0] for a in samples[f]["curve"]] for f in frameworks}
        for framework in frameworks:
            pool.use(framework).call("drop", name="curve")
        result.doc["samples"].setdefault("curve_forward_backward_ms", {})[mode] = curve
        result.save()
        study.progress(f"{STUDY}: curve {mode} batch {batch}: " + ", ".join(
            f"{f} {statistics.mean(curve[batch][f]):.0f} ms" for f in frameworks))
    return curve, frameworks


def analyse_curve(args, settings, result, curve, frameworks, mode: str) -> None:
    rows = []
    both = len(frameworks) == 2
    for batch, by_fw in curve.items():
        cells = [batch]
        for f in frameworks:
            values = by_fw[f]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells += [study.fmt(statistics.mean(values)), study.fmt(sd ** 2, 1)]
        if both:
            ratios = [c / t for c, t in zip(by_fw["chainer"], by_fw["torch"])]
            cells.append(f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        else:
            cells.append("-")
        rows.append(cells)
    columns = ["batch"]
    for f in frameworks:
        columns += [f"{study.PUBLISHED_NAMES[f]} mean ms", f"{study.PUBLISHED_NAMES[f]} "
                                                           f"variance ms^2"]
    columns.append("Chainer / PyTorch, median of repetitions (range)")
    published = PUBLISHED_EPOCH_S[args.device]
    result.add_table(
        f"Forward + backward of loss-plus-network vs batch 2^n (the published curve), "
        f"{study.describe_modes({f: mode for f in frameworks})}", columns,
        rows, note=f"Mean and variance over {settings['curve_rounds']} repetitions, "
                   f"alternating frameworks each repetition. Published per-epoch Chainer / "
                   f"PyTorch on this device kind (both eager): {published['chainer']} s / "
                   f"{published['torch']} s = {published['chainer'] / published['torch']:.2f}. "
                   f"Descriptive, no verdict ({settings['curve_rounds']} repetitions; the ratio "
                   f"column gives the range of the repetitions' paired ratios, not an "
                   f"interval): the per-epoch claim is judged on H1's whole training steps, "
                   f"n = {settings['h1_rounds']} rounds.")
    plot_curve(result, curve, frameworks, mode)


def plot_curve(result, curve, frameworks, mode: str) -> None:
    plt = study.pyplot()
    fig, (ax, ax_ratio) = plt.subplots(1, 2, figsize=(11, 4))
    batches = sorted(curve)
    for f in frameworks:
        means = [statistics.mean(curve[b][f]) for b in batches]
        sds = [statistics.stdev(curve[b][f]) if len(curve[b][f]) > 1 else 0 for b in batches]
        ax.errorbar(batches, means, yerr=sds, marker="o", capsize=3,
                    label=study.PUBLISHED_NAMES[f])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="batch size 2^n", ylabel="forward + backward ms (mean, bars: sd; descriptive)",
           title=f"Loss + network forward and backward, {mode} mode")
    ax.legend()
    if len(frameworks) == 2:
        ax_ratio.plot(batches, [median(curve[b]["chainer"]) / median(curve[b]["torch"])
                                for b in batches], marker="o")
        ax_ratio.axhline(1.0, color="grey", lw=0.8)
        ax_ratio.set_xscale("log", base=2)
        ax_ratio.set(xlabel="batch size 2^n", ylabel="Chainer / PyTorch (medians)",
                     title="Ratio")
    result.add_plot(fig, "curve_forward_backward.png" if mode == "eager" else
                    f"curve_forward_backward_{mode}.png",
                    f"Forward + backward time of DeepPose (loss plus network) vs batch size, "
                    f"{study.describe_modes({f: mode for f in frameworks})}, as in the "
                    f"original plot.")


if __name__ == "__main__":
    sys.exit(main())
