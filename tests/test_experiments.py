"""The experiments: the verdict rule on known inputs, the s/epoch extrapolation, the slope
interval, the worker protocol's answers to bad input, and every study's result.json (and the
report built from them) at tiny settings: PyTorch and Chainer, 2 rounds, batches of 1-2."""

from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

from experiments import study
from experiments.workers import Worker, WorkerError
from profiler.analysis.stats import bootstrap_slope_ci


# --------------------------------------------------------------------------- verdict rule

@pytest.mark.parametrize("estimate, low, high, direction, expected", [
    (-10.0, -15.0, -6.0, "lower", "supported"),       # excludes 0 on the claimed side, >= 5%
    (-5.0, -7.0, -3.0, "lower", "supported"),         # estimate exactly at the threshold
    (12.0, 8.0, 16.0, "higher", "supported"),
    (-1.0, -3.0, 2.0, "lower", "refuted"),            # inside +-threshold
    (0.0, -5.0, 5.0, "lower", "refuted"),             # the interval's ends on the threshold
    (8.0, 3.0, 12.0, "lower", "refuted"),             # excludes 0 on the other side
    (-8.0, -12.0, -3.0, "higher", "refuted"),
    (-10.0, -20.0, 1.0, "lower", "inconclusive"),     # too wide: includes 0 and beyond 5%
    (-4.0, -9.0, -1.0, "lower", "inconclusive"),      # excludes 0 but estimate < threshold
    (-2.0, -3.0, -1.0, "lower", "refuted"),           # a real but negligible effect
    (3.0, -1.0, 7.0, "higher", "inconclusive"),
])
def test_verdict_rule_on_known_inputs(estimate, low, high, direction, expected):
    assert study.verdict(estimate, low, high, direction=direction, threshold=5.0) == expected


@pytest.mark.parametrize("kwargs, word", [
    (dict(direction="down", threshold=5.0), "direction"),
    (dict(direction="lower", threshold=0.0), "threshold"),
    (dict(direction="lower", threshold=-1.0), "threshold"),
])
def test_verdict_rule_refuses_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        study.verdict(-1.0, -2.0, 0.0, **kwargs)


def test_verdict_rule_refuses_an_estimate_outside_its_interval():
    with pytest.raises(ValueError, match="low <= estimate <= high"):
        study.verdict(-10.0, -5.0, -1.0, direction="lower", threshold=5.0)
    with pytest.raises(ValueError, match="high"):
        study.verdict(-1.0, -2.0, float("nan"), direction="lower", threshold=5.0)


def test_judge_records_claim_interval_threshold_and_conditions():
    hypothesis = study.Hypothesis(key="k", claim="c", effect="e", direction="lower",
                                  threshold_pct=10.0)
    record = study.judge(hypothesis, -12.0, -15.0, -11.0, {"device": "cpu"})
    assert record["verdict"] == "supported"
    assert record["threshold_pct"] == 10.0 and record["ci95_pct"] == [-15.0, -11.0]
    assert record["conditions"] == {"device": "cpu"}
    assert "supported" in study.describe_verdict(record)
    with pytest.raises(ValueError, match="direction"):
        study.Hypothesis(key="k", claim="c", effect="e", direction="faster")


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
    assert low <= 0.5 <= high and low > 0 and low <= slope <= high
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
    out = tmp_path / "new" / "bench.json"
    assert bench_kernels.main(["--device", "cpu", "--only", "conv", "--batches", "1",
                               "--rounds", "2", "--warmup", "0", "--repeat", "1",
                               "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert len(doc["rows"]) == 3 * (1 + len(bench_kernels.CONV_LAYERS))  # 3 directions each
    for row in doc["rows"]:
        assert row["ours_ms"] > 0 and row["torch_ms"] > 0 and row["ratio"] > 0
        assert row["ours_iqr_ms"] >= 0 and row["torch_iqr_ms"] >= 0 and row["ratio_iqr"] >= 0
    assert [p.name for p in out.parent.iterdir()] == ["bench.json"]


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

TINY = {
    "resnet_depth": ["--models", "resnet20,resnet32", "--rounds", "2", "--batch-size", "2"],
    "deeppose_loss": ["--h1-rounds", "2", "--h1-batch", "1", "--curve-max-n", "0",
                      "--curve-rounds", "2"],
    "swap": ["--rounds", "2", "--batch-size", "2"],
    "data_loading": ["--rounds", "2", "--batch-size", "2"],
    "parity": ["--steps", "3", "--batch-size", "2"],
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    import importlib
    root = tmp_path_factory.mktemp("experiments")
    for name, options in TINY.items():
        module = importlib.import_module(f"experiments.{name}")
        assert module.main([*options, "--frameworks", "torch,chainer", "--threads", "1",
                            "--out", str(root / name)]) == 0
    return root


@pytest.mark.parametrize("name", list(TINY))
def test_study_writes_a_complete_result(tiny_runs, name):
    doc = json.loads((tiny_runs / name / "result.json").read_text())
    study.validate_result(doc)
    assert doc["status"] == "complete", doc["errors"]
    assert doc["study"] == name and doc["settings"]["frameworks"] == ["torch", "chainer"]
    assert set(doc["versions"]) >= {"torch", "chainer", "numpy"}
    assert doc["machine"]["physical_cores"] >= 1 and "load_average_end" in doc["machine"]
    assert doc["tables"] and doc["samples"]
    for plot in doc["plots"]:
        assert (tiny_runs / name / plot["file"]).read_bytes()[:4] == b"\x89PNG"
    for record in doc["verdicts"]:
        low, high = record["ci95_pct"]
        assert low <= record["estimate_pct"] <= high
        assert record["conditions"]["threads"] == 1


def test_resnet_depth_extrapolates_from_its_raw_samples(tiny_runs):
    doc = json.loads((tiny_runs / "resnet_depth" / "result.json").read_text())
    rounds = doc["samples"]["rounds"]["torch"]["resnet20"]
    median_ms = float(np.median([r["step_ms"][0] for r in rounds]))
    row = next(r for r in doc["tables"][0]["rows"] if r[0] == 20 and r[1] == "PyTorch")
    assert float(row[4]) == pytest.approx(median_ms * 391 / 1000, abs=0.06)
    assert {v["key"] for v in doc["verdicts"]} == {"resnet_depth.chainer.per_layer_cost",
                                                   "resnet_depth.chainer.slower_than_torch"}


def test_report_collects_every_study(tiny_runs):
    from experiments import report
    assert report.main(["--root", str(tiny_runs)]) == 0
    text = (tiny_runs / "REPORT.md").read_text()
    for name in TINY:
        assert f"## {name}" in text
    assert "| study | claim |" in text and "not measured yet" in text
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


def test_deeppose_loss_judges_the_step_through_its_loss_phase(tiny_runs):
    # The mechanism's verdict: the autograd step of each round plus the round's change of the
    # loss-backward phase, against the autograd step, paired by round.
    from profiler.analysis.stats import bootstrap_diff_ci
    doc = json.loads((tiny_runs / "deeppose_loss" / "result.json").read_text())
    rounds = doc["samples"]["h1_rounds"]["torch"]

    def per_round(impl, phase=None):
        return [float(np.median(r["phases_ms"][phase] if phase else r["step_ms"]))
                for r in rounds[impl]]
    base = per_round("autograd")
    through = [a + b - c for a, b, c in zip(base, per_round("native", "loss_backward"),
                                             per_round("autograd", "loss_backward"))]
    record = next(v for v in doc["verdicts"]
                  if v["key"] == "deeppose_loss.torch.native_vs_autograd_loss_phase")
    assert record["estimate_pct"] == pytest.approx(bootstrap_diff_ci(base, through)[0])
    assert record["direction"] == "lower"
    assert "deeppose_loss.chainer.explicit_vs_autograd_loss_phase" in {
        v["key"] for v in doc["verdicts"]}


def test_bench_instruments_times_every_variant_paired_with_plain(tmp_path, capsys):
    """experiments.bench_instruments at tiny settings: every variant timed in every round,
    each but plain with its paired overhead and interval, written and printed."""
    pytest.importorskip("torch")
    from experiments import bench_instruments
    out = tmp_path / "inst.json"
    assert bench_instruments.main(["--framework", "torch", "--batch-size", "2", "--rounds",
                                   "2", "--warmup", "0", "--threads", "1", "--out",
                                   str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["rounds"] == 2 and set(doc["variants"]) == {"plain", "phases", "hooks_idle",
                                                           "instrumented"}
    for name, row in doc["variants"].items():
        assert len(row["samples_ms"]) == 2 and row["median_ms"] > 0
        if name != "plain":
            low, high = row["overhead_ci_pct"]
            assert low <= row["overhead_pct"] <= high
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
