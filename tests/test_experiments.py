"""The experiments: the s/epoch extrapolation, the slope
interval, the worker protocol's answers to bad input and its graph-mode builds, the --mode
argument and the published modes, Table B's graph / eager ratio on synthetic rounds, and every
study's result.json (and the report built from them) at tiny settings: PyTorch and Chainer, 2
rounds, batches of 1-2; resnet_depth once more in both modes (PyTorch and MXNet)."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

from experiments import study
from experiments.workers import ModeUnavailable, Worker, WorkerError
from profiler.analysis.stats import bootstrap_slope_ci


# The verdict rules, the exact intervals and their coverage: tests/test_verdicts.py.


# --------------------------------------------------------------------------- arithmetic

def test_steps_per_epoch_and_extrapolation_arithmetic():
    assert study.steps_per_epoch() == 391                 # 50000 / 128 = 390.625
    assert study.steps_per_epoch(50000, 100) == 500       # exact division: no extra step
    assert study.steps_per_epoch(1000, 32) == 32
    assert study.extrapolate_epoch_s(100.0) == pytest.approx(39.1)
    assert study.extrapolate_epoch_s(250.0, steps=4) == pytest.approx(1.0)
    assert "extrapolated from 5 measured steps" in study.extrapolation_label(5)
    with pytest.raises(ValueError, match="batch_size"):
        study.steps_per_epoch(50000, 0)
    with pytest.raises(ValueError, match="step_ms"):
        study.extrapolate_epoch_s(float("nan"))
    with pytest.raises(ValueError, match="steps"):
        study.extrapolate_epoch_s(1.0, steps=0)


def test_published_comparison_takes_ratios_on_each_side():
    out = study.published_comparison({"torch": 2.0, "chainer": 3.0},
                                     {"torch": 26.6, "chainer": 35.4, "mxnet": 50.2})
    assert out["torch"] == {"ours_ratio": 1.0, "published_ratio": 1.0,
                            "ours_over_published": 1.0}
    assert out["chainer"]["ours_ratio"] == pytest.approx(1.5)
    assert out["chainer"]["published_ratio"] == pytest.approx(35.4 / 26.6)
    assert out["chainer"]["ours_over_published"] == pytest.approx(1.5 / (35.4 / 26.6))
    assert "mxnet" not in out
    with pytest.raises(ValueError, match="baseline"):
        study.ratios_to({"chainer": 1.0}, "torch")


# --------------------------------------------------------------------------- slope interval

def test_slope_interval_covers_the_true_slope_of_noisy_data():
    rng = np.random.default_rng(7)
    x = [20, 32, 44, 56]
    y = [[3.0 + 0.5 * xi + rng.normal(0, 0.5) for xi in x] for _ in range(10)]
    slope, low, high = bootstrap_slope_ci(x, y)
    assert low <= 0.5 <= high and low > 0
    assert slope == pytest.approx(0.5, abs=0.1)
    assert high - low < 0.2


def test_slope_interval_of_exact_data_is_the_slope():
    x = [1, 2, 3]
    slope, low, high = bootstrap_slope_ci(x, [[2.0, 4.0, 6.0]] * 3)
    assert (slope, low, high) == pytest.approx((2.0, 2.0, 2.0))


def test_relative_slope_against_a_baseline_is_paired():
    rng = np.random.default_rng(3)
    x = [20, 32, 44, 56]
    drift = rng.normal(0, 5, size=10)          # round-to-round drift shared by both
    base = [[1.0 * xi + d for xi in x] for d in drift]
    double = [[2.0 * xi + 2 * d for xi in x] for d in drift]
    est, low, high = bootstrap_slope_ci(x, double, baseline_rounds=base)
    assert est == pytest.approx(100.0) and low == pytest.approx(100.0)
    assert high == pytest.approx(100.0)


@pytest.mark.parametrize("x, y, word", [
    ([1, 1, 1], [[1, 2, 3], [1, 2, 3]], "x"),
    ([1, 2, 3], [[1, 2, 3]], "y_rounds"),
    ([1, 2, 3], [[1, 2], [1, 2]], "y_rounds"),
])
def test_slope_interval_refuses_bad_input(x, y, word):
    with pytest.raises(ValueError, match=word):
        bootstrap_slope_ci(x, y)


# --------------------------------------------------------------------------- worker protocol

@pytest.fixture(scope="module")
def chainer_worker():
    worker = Worker("chainer", threads=1)
    yield worker
    worker.close()


@pytest.mark.parametrize("request_fields, words", [
    (dict(cmd="fly"), ["cmd", "expected one of", "'fly'"]),
    (dict(cmd="steps", name="missing", n=1, mode="plain"), ["name", "built workload"]),
    (dict(cmd="build", name="w", config={"model": "resnet20", "colour": 1}, steps_needed=1),
     ["config", "unknown", "colour"]),
    (dict(cmd="build", name="w", config={"model": "vgg"}, steps_needed=1),
     ["model", "'vgg'"]),
    (dict(cmd="build", name="w", config={"model": "resnet20"}, steps_needed="2"),
     ["steps_needed", "expected int"]),
    (dict(cmd="set_impls", name="missing"), ["name", "built workload"]),
])
def test_worker_answers_bad_requests_with_one_clear_error(chainer_worker, request_fields,
                                                          words):
    cmd = request_fields.pop("cmd")
    with pytest.raises(WorkerError) as info:
        chainer_worker.call(cmd, **request_fields)
    for word in words:
        assert word in str(info.value)


def test_worker_survives_a_line_that_is_not_json_and_checks_steps(chainer_worker):
    chainer_worker.proc.stdin.write("not json\n")
    chainer_worker.proc.stdin.flush()
    answer = json.loads(chainer_worker.proc.stdout.readline())
    assert answer["ok"] is False and "JSON" in answer["error"]
    assert chainer_worker.call("hello")["framework"] == "chainer"
    chainer_worker.call("build", name="w", config={"model": "resnet20", "batch_size": 2,
                                                   "train_size": 8, "test_size": 2},
                        steps_needed=3)
    with pytest.raises(WorkerError, match="mode"):
        chainer_worker.call("steps", name="w", n=1, mode="fast")
    with pytest.raises(WorkerError, match="n: expected an int >= 1"):
        chainer_worker.call("steps", name="w", n=0, mode="plain")
    answer = chainer_worker.call("steps", name="w", n=1, mode="instrumented")
    assert len(answer["step_ms"]) == 1 and "loss_backward" in answer["phases_ms"]


def test_worker_refuses_graph_mode_for_chainer_with_the_reason(chainer_worker):
    with pytest.raises(ModeUnavailable) as info:
        chainer_worker.call("build", name="g", steps_needed=2, config={
            "model": "resnet20", "mode": "graph", "batch_size": 2, "train_size": 8,
            "test_size": 2})
    assert "graph compiler" in info.value.reason and "mode" in str(info.value)
    assert chainer_worker.call("hello")["framework"] == "chainer"     # still serving


@pytest.fixture(scope="module")
def tensorflow_worker():
    pytest.importorskip("tensorflow")
    worker = Worker("tensorflow", threads=1)
    yield worker
    worker.close()


def test_worker_builds_a_graph_mode_workload_and_steps_it(tensorflow_worker):
    """TensorFlow's graph mode: the whole step is one compiled call; plain and instrumented
    steps run (the instrumented one timed as compiled_step), the compile count is the graph
    built in the first step, and forward_backward is refused saying why."""
    built = tensorflow_worker.call("build", name="g", steps_needed=6, config={
        "model": "resnet20", "mode": "graph", "batch_size": 2, "train_size": 8,
        "test_size": 2})
    assert built["mode"] == "graph" and built["step_calls"] == ["train_step"]
    assert "kernel" in built["unavailable"]["conv"]       # Python glue: refused in a graph
    plain = tensorflow_worker.call("steps", name="g", n=2, mode="plain")
    assert len(plain["step_ms"]) == 2 and plain["compile_count"] >= 1
    assert all(math.isfinite(v) for v in plain["losses"])
    instrumented = tensorflow_worker.call("steps", name="g", n=1, mode="instrumented")
    assert instrumented["phases_ms"]["compiled_step"][0] > 0
    assert instrumented["compile_count"] == plain["compile_count"]   # no recompile
    with pytest.raises(WorkerError) as info:
        tensorflow_worker.call("steps", name="g", n=1, mode="forward_backward")
    assert "one compiled call" in str(info.value) and "forward_backward" in str(info.value)
    with pytest.raises(WorkerError, match="xla"):
        tensorflow_worker.call("build", name="x", steps_needed=2, config={
            "model": "resnet20", "mode": "eager", "xla": True})
    tensorflow_worker.call("drop", name="g")


def test_worker_refuses_an_unknown_framework():
    with pytest.raises(ValueError, match="framework"):
        Worker("keras", threads=1)


# --------------------------------------------------------------------------- benchmarks

def test_bench_kernels_writes_its_rows_into_a_new_folder(tmp_path):
    """A tiny conv run of experiments.bench_kernels: --out in a folder that does not exist yet
    (profiler.report.write_json_atomic makes none; the benchmark does), every row with its
    medians, IQRs and ratio, and no temporary file left behind."""
    pytest.importorskip("torch")
    from experiments import bench_kernels
    from ops import core
    before = core.gemm_path()
    out = tmp_path / "new" / "bench.json"
    assert bench_kernels.main(["--device", "cpu", "--only", "conv", "--batches", "1",
                               "--rounds", "2", "--warmup", "0", "--repeat", "1",
                               "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    paths = core.gemm_paths()
    per_path = 3 * (1 + len(bench_kernels.CONV_LAYERS))  # 3 directions each
    assert len(doc["rows"]) == len(paths) * per_path      # every GEMM path this CPU runs
    assert [r["gemm_path"] for r in doc["rows"]] == [p for p in paths for _ in range(per_path)]
    for row in doc["rows"]:
        assert row["ours_ms"] > 0 and row["torch_ms"] > 0 and row["ratio"] > 0
        assert row["ours_iqr_ms"] >= 0 and row["torch_iqr_ms"] >= 0 and row["ratio_iqr"] >= 0
    # The summary per path and direction: the geometric mean and the worst of its rows' ratios.
    for line in doc["conv_summary"]:
        ratios = [r["ratio"] for r in doc["rows"] if r["gemm_path"] == line["gemm_path"]
                  and (line["direction"] == "all" or r["group"] == f"conv {line['direction']}")]
        assert line["rows"] == len(ratios)
        assert line["worst"] == max(ratios)
        assert line["geomean"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / len(ratios)))
    assert {(line["gemm_path"], line["direction"]) for line in doc["conv_summary"]} == {
        (p, d) for p in paths for d in bench_kernels.CONV_DIRECTIONS + ("all",)}
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]
    assert core.gemm_path() == before   # the path in use is restored


def test_bench_impls_reports_stats_medians_iqrs_and_per_round_ratios(tmp_path):
    """experiments.bench_impls at tiny settings: each impl's median and IQR are
    profiler.analysis.stats' of its samples, its ratio the median of per-round ratios to the
    baseline's sample of the same round."""
    pytest.importorskip("torch")
    from experiments import bench_impls
    from profiler.analysis.stats import iqr, median
    out = tmp_path / "new" / "impls.json"
    assert bench_impls.main(["--frameworks", "torch", "--device", "cpu", "--loss-batches", "1",
                             "--conv-batch", "1", "--rounds", "3", "--warmup", "0", "--repeat",
                             "1", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [row["case"] for row in doc["rows"]] == ["deeppose loss 1x28",
                                                    "conv 3x3 16->16 @32 b1"]
    for row in doc["rows"]:
        base = row["impls"][row["baseline"]]["samples_ms"]
        for impl, s in row["impls"].items():
            assert len(s["samples_ms"]) == 3, impl
            assert s["median_ms"] == pytest.approx(median(s["samples_ms"]))
            assert s["iqr_ms"] == pytest.approx(iqr(s["samples_ms"]))
            assert s["ratio"] == pytest.approx(
                median([v / b for v, b in zip(s["samples_ms"], base)]))
            assert s["ratio_iqr"] == pytest.approx(
                iqr([v / b for v, b in zip(s["samples_ms"], base)]))


# --------------------------------------------------------------------------- studies

# Eager only here (resnet_depth, swap and parity default to both modes: PyTorch's compiles
# would take minutes); the run in both modes is its own test below.
TINY = {
    "resnet_depth": ["--models", "resnet20,resnet32", "--rounds", "2", "--batch-size", "2",
                     "--small-batch", "1", "--mode", "eager"],
    # Ten rounds (the fewest a verdict takes) of batch-1 steps: real verdicts to check.
    "deeppose_loss": ["--h1-rounds", "10", "--h1-batch", "1", "--curve-max-n", "0",
                      "--curve-rounds", "2"],
    "swap": ["--rounds", "2", "--batch-size", "2", "--mode", "eager"],
    "data_loading": ["--rounds", "2", "--batch-size", "2"],
    "parity": ["--steps", "3", "--batch-size", "2", "--mode", "eager"],
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    import importlib
    root = tmp_path_factory.mktemp("experiments")
    for name, options in TINY.items():
        module = importlib.import_module(f"experiments.{name}")
        assert module.main([*options, "--frameworks", "torch,chainer", "--threads", "1",
                            "--quiet-wait", "0", "--out", str(root / name)]) == 0
    return root


@pytest.mark.parametrize("name", list(TINY))
def test_study_writes_a_complete_result(tiny_runs, name):
    doc = json.loads((tiny_runs / name / "result.json").read_text())
    study.validate_result(doc)
    assert doc["status"] == "complete", doc["errors"]
    assert doc["study"] == name and doc["settings"]["frameworks"] == ["torch", "chainer"]
    assert doc["settings"]["mode"] == "eager"
    assert doc["settings"]["modes"] == {"torch": ["eager"], "chainer": ["eager"]}
    assert set(doc["versions"]) >= {"torch", "chainer", "numpy"}
    assert doc["machine"]["physical_cores"] >= 1 and "load_average_end" in doc["machine"]
    assert doc["tables"] and doc["samples"]
    for plot in doc["plots"]:
        assert (tiny_runs / name / plot["file"]).read_bytes()[:4] == b"\x89PNG"
    for record in doc["verdicts"]:
        assert record["conditions"]["threads"] == 1
        assert set(record["conditions"]["modes"].values()) == {"eager"}
        assert record["quantity"]["n"] == record["n"] and record["quantity"]["batch"] >= 1
        assert record["kind"] in study.CLAIM_KINDS
        if record["n"] < study.MIN_ROUNDS:
            assert record["verdict"] == "too few rounds" and record["interval_pct"] is None
        else:
            assert record["verdict"] in study.VERDICTS + study.NO_VERDICTS
            assert record["confidence"] >= 0.95
    if name == "parity":
        return      # trains each framework in turn: no interleaved rounds to contend
    # Every visit's CPU use was measured, and the rounds' contention kept.
    assert doc["contention"]["blocks"] and all(
        "others_cores_max" in r for block in doc["contention"]["blocks"] for r in block)


def test_resnet_depth_extrapolates_from_its_raw_samples(tiny_runs):
    doc = json.loads((tiny_runs / "resnet_depth" / "result.json").read_text())
    rounds = doc["samples"]["rounds"]["torch"]["resnet20/eager"]
    median_ms = float(np.median([r["step_ms"][0] for r in rounds]))
    table_a = next(t for t in doc["tables"] if t["title"].startswith("Table A"))
    assert "all eager" in table_a["title"]
    row = next(r for r in table_a["rows"] if r[0] == 20 and r[1] == "PyTorch" and r[3] == 2)
    assert row[2] == "eager"
    assert float(row[6]) == pytest.approx(median_ms * 391 / 1000, abs=0.06)
    # The small-batch row beside the published batch.
    assert any(r[0] == 20 and r[1] == "Chainer" and r[3] == 1 for r in table_a["rows"])
    assert not any(t["title"].startswith("Table B") for t in doc["tables"])
    assert {v["key"] for v in doc["verdicts"]} == {
        f"resnet_depth.chainer.{m}.{claim}" for m in ("resnet20", "resnet32")
        for claim in ("slower_than_torch", "ratio_as_published")}
    assert {v["verdict"] for v in doc["verdicts"]} == {"too few rounds"}   # 2 rounds


def test_report_collects_every_study(tiny_runs):
    from experiments import report
    assert report.main(["--root", str(tiny_runs)]) == 0
    text = (tiny_runs / "REPORT.md").read_text()
    for name in TINY:
        assert f"## {name}" in text
    assert text.index("## Summary: every claim and its verdict") < text.index("## Machine")
    assert "| claim | kind | quantity |" in text and "not measured yet" in text
    assert "too few rounds" in text and "[direction]" in text
    assert "resnet_depth/time_vs_depth.png" in text


def test_a_failed_result_is_reported_not_hidden(tmp_path):
    from experiments import report
    (tmp_path / "swap").mkdir()
    (tmp_path / "swap" / "result.json").write_text(json.dumps({"schema": study.SCHEMA}))
    text = report.render(report.load_results(tmp_path), tmp_path)
    assert "Unreadable result" in text and "Not run" in text


def test_cuda_device_without_a_gpu_says_so(capsys):
    import ops
    if ops.cuda_available():
        pytest.skip("this machine has a GPU")
    from experiments import swap
    with pytest.raises(SystemExit):
        swap.parse_args(["--device", "cuda"])
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_validate_result_names_the_missing_key():
    with pytest.raises(ValueError, match="schema"):
        study.validate_result({"study": "x"})
    assert not math.isnan(study.extrapolate_epoch_s(0.0))


def test_deeppose_loss_verdicts_come_from_its_raw_rounds(tiny_runs):
    """H1's verdicts, recomputed from the rounds result.json keeps: the native-vs-autograd
    step effect is the median of the rounds' paired ratios with its exact interval; the
    classic mechanism is the loss backward's per-round share of Chainer's gap."""
    from profiler.analysis.stats import median_ci, paired_ratio_interval
    doc = json.loads((tiny_runs / "deeppose_loss" / "result.json").read_text())
    rounds = doc["samples"]["h1_rounds"]["eager"]

    def per_round(framework, impl, phase=None):
        return [float(np.median(r["phases_ms"][phase] if phase else r["step_ms"]))
                for r in rounds[framework][impl]]
    by_key = {v["key"]: v for v in doc["verdicts"]}
    record = by_key["deeppose_loss.torch.native_vs_autograd"]
    expected = paired_ratio_interval(per_round("torch", "autograd"),
                                     per_round("torch", "native"))
    assert record["n"] == 10 and record["kind"] == "direction"
    assert record["estimate_pct"] == pytest.approx(expected.estimate)
    assert record["interval_pct"] == pytest.approx([expected.low, expected.high])
    mechanism = by_key["deeppose_loss.loss_backward_explains_gap"]
    gaps = [c - t for c, t in zip(per_round("chainer", "autograd"),
                                  per_round("torch", "autograd"))]
    diffs = [c - t for c, t in zip(per_round("chainer", "autograd", "loss_backward"),
                                   per_round("torch", "autograd", "loss_backward"))]
    shares = [d / g * 100 if g > 0 else 0.0 for d, g in zip(diffs, gaps)]
    assert mechanism["kind"] == "mechanism"
    assert mechanism["estimate_pct"] == pytest.approx(median_ci(shares).estimate)
    if min(gaps) <= 0:
        assert mechanism["verdict"] == "not testable here" and "no gap" in mechanism["reason"]
    assert {"deeppose_loss.chainer_slower_than_torch",
            "deeppose_loss.chainer_over_torch_as_published"} <= set(by_key)


def test_bench_instruments_times_every_variant_paired_with_plain(tmp_path, capsys):
    """experiments.bench_instruments at tiny settings: every variant timed in every round,
    each but plain with its paired overhead and interval, written and printed."""
    pytest.importorskip("torch")
    from experiments import bench_instruments
    out = tmp_path / "inst.json"
    assert bench_instruments.main(["--framework", "torch", "--batch-size", "2", "--rounds",
                                   "6", "--warmup", "0", "--threads", "1", "--out",
                                   str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rounds"] == 6 and set(doc["variants"]) == {"plain", "phases", "hooks_idle",
                                                           "instrumented"}
    for name, row in doc["variants"].items():
        assert len(row["samples_ms"]) == 6 and row["median_ms"] > 0
        if name != "plain":
            low, high = row["overhead_ci_pct"]
            assert math.isfinite(low) and math.isfinite(high) and low <= high
            assert row["n"] == 6 and row["coverage"] == pytest.approx(0.96875)
    printed = capsys.readouterr().out
    assert "instrumented" in printed and "%" in printed
    with pytest.raises(SystemExit):
        bench_instruments.main(["--rounds", "0"])
    assert bench_instruments.main(["--model", "resnet99", "--rounds", "2"]) == 2
    assert "model: expected one of" in capsys.readouterr().err


def test_bench_impls_has_a_case_per_registered_framework():
    from experiments import bench_impls
    from ops.frameworks import FRAMEWORKS
    assert tuple(bench_impls.CASES) == FRAMEWORKS


@pytest.mark.parametrize("module, argv", [
    ("experiments.parity", ["--out", "/proc/deepprof-no-such-dir"]),
    ("experiments.bench_kernels", ["--out", "/proc/deepprof-no-such-dir/k.json"]),
    ("experiments.bench_instruments", ["--out", "/proc/deepprof-no-such-dir/i.json"]),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(module, argv,
                                                                           capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: expected a folder this process can create and write in" in err


# --------------------------------------------------------------------------- modes

def test_published_modes_are_those_of_the_published_comparison():
    assert study.PUBLISHED_MODES == {"tensorflow": "graph", "mxnet": "graph",
                                     "torch": "eager", "chainer": "eager"}
    fws = ["torch", "chainer", "tensorflow", "mxnet"]
    assert study.modes_for("published", fws) == {"torch": ["eager"], "chainer": ["eager"],
                                                 "tensorflow": ["graph"], "mxnet": ["graph"]}
    assert study.modes_for("both", ["torch"]) == {"torch": ["eager", "graph"]}
    assert study.modes_for("graph", ["chainer"]) == {"chainer": ["graph"]}
    assert study.comparison_sets("both", ["torch", "mxnet"]) == {
        "eager": {"torch": "eager", "mxnet": "eager"},
        "graph": {"torch": "graph", "mxnet": "graph"}}
    assert study.comparison_sets("published", ["torch", "tensorflow"]) == {
        "published": {"torch": "eager", "tensorflow": "graph"}}
    assert study.describe_modes({"torch": "eager", "tensorflow": "graph"}) == (
        "PyTorch eager, Keras(TF) graph")
    assert study.describe_modes({"torch": "graph", "mxnet": "graph"}) == "all graph"
    assert study.keyed("swap.x", "eager") == "swap.x"
    assert study.keyed("swap.x", "published") == "swap.x@published"
    with pytest.raises(ValueError, match="mode"):
        study.modes_for("compiled", fws)
    with pytest.raises(ValueError, match="frameworks"):
        study.modes_for("eager", ["keras"])


@pytest.mark.parametrize("module, default", [
    ("resnet_depth", "both"), ("deeppose_loss", "eager"), ("swap", "both"),
    ("data_loading", "eager"), ("parity", "both")])
def test_every_study_takes_a_mode_with_its_default(module, default, capsys):
    parse_args = importlib.import_module(f"experiments.{module}").parse_args
    assert parse_args([]).mode == default
    for mode in study.MODE_CHOICES:
        assert parse_args(["--mode", mode]).mode == mode
    with pytest.raises(SystemExit):
        parse_args(["--mode", "compiled"])
    assert "--mode: invalid choice: 'compiled'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("eager (op by op", "graph (the framework's compiled mode",
                  "both (eager and graph side by side", "published (each framework in the "
                  "mode the published comparison ran it in: TensorFlow and MXNet graph, "
                  "PyTorch and Chainer eager)", f"(default: {default})"):
        assert words in text, words


def test_conditions_record_each_frameworks_mode():
    class Args:
        device, threads = "cpu", 2
    conds = study.conditions(Args, {"torch": {"version": "2"}}, "quick", ["torch", "mxnet"],
                             {"torch": "eager", "mxnet": "graph"})
    assert conds["modes"] == {"torch": "eager", "mxnet": "graph"}
    assert study.conditions(Args, {}, "quick", ["torch"], "graph")["modes"] == {"torch": "graph"}
    with pytest.raises(ValueError, match="modes"):
        study.conditions(Args, {}, "quick", ["torch", "mxnet"], {"torch": "eager"})


class RefusingWorker:
    """A worker double: Chainer refuses graph mode, as the real one answers."""
    framework = "chainer"

    def __init__(self):
        self.calls = []

    def call(self, cmd, **fields):
        self.calls.append(fields["config"]["mode"])
        if fields["config"]["mode"] == "graph":
            raise ModeUnavailable("chainer worker: build: no graph", "it has no graph compiler")
        return {"mode": "eager"}


def test_mode_plan_skips_a_refused_mode_with_the_reason_noted(tmp_path):
    result = study.Result("parity", tmp_path, settings={}, scale="quick")
    plan = study.ModePlan("both", ["torch", "chainer"])
    worker = RefusingWorker()
    assert plan.build(worker, result, name="a", config={"mode": "eager"}, steps_needed=1)
    assert plan.build(worker, result, name="b", config={"mode": "graph"}, steps_needed=1) is None
    # Refused once: the mode leaves the plan, so no second request is made.
    assert plan.build(worker, result, name="c", config={"mode": "graph"}, steps_needed=1) is None
    assert worker.calls == ["eager", "graph"]
    assert plan.modes == {"torch": ["eager", "graph"], "chainer": ["eager"]}
    assert plan.skipped == {"chainer": {"graph": "it has no graph compiler"}}
    assert any("Chainer not measured in graph mode: it has no graph compiler" in n
               for n in result.doc["notes"])
    assert result.doc["settings"]["modes_skipped"] == plan.skipped
    assert plan.sets() == {"eager": {"torch": "eager", "chainer": "eager"},
                           "graph": {"torch": "graph"}}


# --------------------------------------------------------------------------- Table B

def test_graph_over_eager_is_the_paired_ratio_with_its_interval():
    from experiments.resnet_depth import graph_over_eager, round_slopes
    rng = np.random.default_rng(11)
    drift = rng.uniform(0.7, 1.6, size=10)           # load shared by a round's two cells
    eager = [100.0 * d for d in drift]
    exact = graph_over_eager(eager, [0.6 * e for e in eager])
    assert exact["ratio"] == pytest.approx(0.6) and exact["n"] == 10
    assert exact["confidence"] == pytest.approx(0.9785, abs=1e-4)    # [x(2), x(9)]
    assert exact["interval"] == pytest.approx([0.6, 0.6])    # pairing cancels the drift
    noisy = graph_over_eager(eager, [0.6 * e * rng.normal(1, 0.02) for e in eager])
    assert noisy["interval"][0] < 0.6 < noisy["interval"][1] and noisy["interval"][1] < 0.7
    # Five rounds: no interval at all (their range covers the median only 93.75% of the time).
    assert graph_over_eager(eager[:5], [0.6 * e for e in eager[:5]])["interval"] is None
    assert graph_over_eager([10.0], [5.0]) == {"ratio": 0.5, "interval": None,
                                               "confidence": None, "n": 1}
    with pytest.raises(ValueError, match="as many"):
        graph_over_eager([1.0, 2.0], [1.0])
    # One slope per round: eager = 5 + 3 x layers, scaled by the round's drift.
    x = [20, 32, 44, 56]
    assert round_slopes(x, [[(5 + 3 * xi) * d for xi in x] for d in (1.0, 2.0)]) == \
        pytest.approx([3.0, 6.0])


def test_table_b_gives_each_frameworks_graph_over_eager_ratio(tmp_path):
    """Synthetic rounds with known ratios (TensorFlow 0.5, MXNet 0.8; PyTorch eager only) and a
    known gap slope: the rows, the slope table and the per-depth verdicts say so."""
    from experiments import resnet_depth

    class Args:
        device, threads, mode = "cpu", 2, "both"
    models = ["resnet20", "resnet56"]
    drift = [1.0, 1.3, 0.9, 1.1, 1.2, 0.8, 1.0, 1.4, 0.95, 1.05]
    eager = {m: [10.0 * resnet_depth.layers(m) * d for d in drift] for m in models}
    times = {"tensorflow": {"eager": eager,
                            "graph": {m: [0.5 * v for v in eager[m]] for m in models}},
             "mxnet": {"eager": eager,
                       "graph": {m: [0.8 * v for v in eager[m]] for m in models}},
             "torch": {"eager": eager}}
    result = study.Result("resnet_depth", tmp_path, settings={}, scale="quick",
                          quiet_wait_s=0)
    resnet_depth.table_b(Args, {"rounds": 10, "batch_size": 128}, result, times, models,
                         contended=[4])
    ratios = result.doc["graph_over_eager"]
    assert set(ratios) == {"tensorflow", "mxnet"}
    assert ratios["tensorflow"]["resnet56"]["ratio"] == pytest.approx(0.5)
    assert ratios["mxnet"]["resnet20"]["ratio"] == pytest.approx(0.8)
    table, slopes = result.doc["tables"]
    assert table["title"].startswith("Table B")
    row = next(r for r in table["rows"] if r[0] == "Keras(MXNet)" and r[1] == 20)
    assert row[4] == "0.80 [0.80, 0.80]" and row[5] == "97.9%" and row[7] == 10
    # Gap = (1 - ratio) x 10 ms x layers x the round's drift: per round a slope of 5 x drift.
    gap_slope = 0.5 * 10.0 * float(np.median(drift))
    tf_row = next(r for r in slopes["rows"] if r[0] == "Keras(TF)")
    assert tf_row[3].startswith(f"{gap_slope:.2f} [")
    verdicts = {v["key"]: v for v in result.doc["verdicts"]}
    assert set(verdicts) == {f"resnet_depth.{f}.{m}.graph_faster_than_eager"
                             for f in ("tensorflow", "mxnet") for m in models}
    tf56 = verdicts["resnet_depth.tensorflow.resnet56.graph_faster_than_eager"]
    assert tf56["estimate_pct"] == pytest.approx(-50.0) and tf56["kind"] == "direction"
    assert tf56["quantity"]["layers"] == 56 and tf56["quantity"]["batch"] == 128
    assert tf56["contended_rounds"] == [4]
    mx20 = verdicts["resnet_depth.mxnet.resnet20.graph_faster_than_eager"]
    assert mx20["verdict"] == "supported"
    assert mx20["conditions"]["modes"] == {"mxnet": study.BOTH_MODES}


def test_resnet_depth_in_both_modes_gives_tables_a_and_b(tmp_path):
    """A tiny real run: PyTorch (eager and torch.compile) and MXNet (eager and hybridized),
    one depth, 2 rounds. Table A has each framework in its published mode, Table B both."""
    from experiments import report, resnet_depth
    out = tmp_path / "resnet_depth"
    assert resnet_depth.main(["--frameworks", "torch,mxnet", "--models", "resnet20",
                              "--rounds", "2", "--batch-size", "2", "--small-batch", "1",
                              "--threads", "1", "--mode", "both", "--quiet-wait", "0",
                              "--out", str(out)]) == 0
    doc = json.loads((out / "result.json").read_text())
    assert doc["status"] == "complete", doc["errors"]
    assert doc["settings"]["mode"] == "both"
    assert set(doc["samples"]["rounds"]["mxnet"]) == {"resnet20/eager", "resnet20/graph",
                                                      "resnet20/b1/graph"}
    titles = [t["title"] for t in doc["tables"]]
    table_a = next(t for t in doc["tables"] if t["title"].startswith("Table A"))
    assert "PyTorch eager, Keras(MXNet) graph" in table_a["title"]
    assert [(r[2], r[3]) for r in table_a["rows"]] == [("eager", 2), ("graph", 2),
                                                        ("eager", 1), ("graph", 1)]
    table_b = next(t for t in doc["tables"] if t["title"].startswith("Table B"))
    assert {r[0] for r in table_b["rows"]} == {"PyTorch", "Keras(MXNet)"}
    assert any(t.startswith("Compilation") for t in titles)
    for f in ("torch", "mxnet"):
        compiled = doc["compile"][f]["graph"]["resnet20"]
        assert compiled["graphs_compiled_in_warmup"] >= 1
        assert compiled["first_step_ms"] > 0
    keys = {v["key"] for v in doc["verdicts"]}
    assert keys == {"resnet_depth.mxnet.resnet20.slower_than_torch@published",
                    "resnet_depth.mxnet.resnet20.ratio_as_published@published",
                    "resnet_depth.torch.resnet20.graph_faster_than_eager",
                    "resnet_depth.mxnet.resnet20.graph_faster_than_eager"}
    assert report.main(["--root", str(tmp_path)]) == 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Each framework as its users train it" in text
    assert "### Table A" in text and "### Table B" in text
    assert "Keras(MXNet) graph vs PyTorch eager" in text      # the verdicts' quantity
