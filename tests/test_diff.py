"""python -m profiler.diff and profiler.analysis.diff: on synthetic reports with known
differences (the intervals cover them; pairing by round only when two reports share an
interleaved run), the comparability warnings, --map, merged reports of several ranks, the
regression gate's exit codes, the cross-framework layer table; and on two real tiny runs
(PyTorch and Chainer ResNet-20) the gap breakdown adds up to the step difference."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from rich.console import Console

from profiler import diff as cli
from profiler import report as rep
from profiler.analysis import diff as analysis
from profiler.analysis.stats import iqr, median
from profiler.timeline import PHASES

LAYERS = (("conv1", "Conv2d"), ("bn1", "BatchNorm2d"), ("conv2", "Conv2d"), ("fc", "Linear"))
# Per-step ms of each layer direction, and of each phase outside the layers.
BASE_LAYER_MS = {"conv1": (2.0, 4.0), "bn1": (0.5, 0.8), "conv2": (3.0, 6.0), "fc": (0.4, 0.6)}
BASE_PHASE_MS = {"data_wait": 0.5, "h2d": 0.0, "forward": 1.0, "loss_forward": 0.3,
                 "loss_backward": 0.4, "backward": 1.2, "optimizer": 2.0, "other": 0.6}


def synthetic_report(*, steps=20, seed=0, scale=None, noise=0.05, round_drift=None,
                     interleaved=None, framework="torch", **fields):
    """A schema-3 report of ``steps`` steps whose per-step times are the base times times
    ``scale`` ({layer:direction or phase: factor}), times lognormal noise, times the step's
    round's drift (``round_drift``: one factor per step). Phase "forward"/"backward" hold
    their layers' times plus the BASE_PHASE_MS outside them."""
    rng = np.random.default_rng(seed)
    scale = scale or {}
    drift = np.ones(steps) if round_drift is None else np.asarray(round_drift)

    def draw(key, base):
        return base * scale.get(key, 1.0) * drift * np.exp(rng.normal(0, noise, steps))

    layer_samples = {}
    for name, _ in LAYERS:
        for d, base in zip(("forward", "backward"), BASE_LAYER_MS[name]):
            layer_samples[(name, d)] = draw(f"{name}:{d}", base)
    phase_samples = {}
    for phase, base in BASE_PHASE_MS.items():
        values = draw(phase, base)
        if phase in ("forward", "backward"):
            values = values + sum(layer_samples[(n, phase)] for n, _ in LAYERS)
        phase_samples[phase] = values
    step = sum(phase_samples.values())

    def summary(values):
        values = [float(v) for v in values]
        return {"mean": float(np.mean(values)), "median": median(values),
                "iqr": iqr(values), "samples": values}

    layers = []
    for name, typ in LAYERS:
        fwd, bwd = layer_samples[(name, "forward")], layer_samples[(name, "backward")]
        layers.append({"name": name, "type": typ, "forward_ms": float(fwd.mean()),
                       "backward_ms": float(bwd.mean()), "self_forward_ms": float(fwd.mean()),
                       "self_backward_ms": float(bwd.mean()), "calls": 1.0,
                       "forward_samples_ms": [float(v) for v in fwd],
                       "backward_samples_ms": [float(v) for v in bwd]})
    step_summary = summary(step)
    step_summary.update(min=float(step.min()), max=float(step.max()), n=steps)
    doc = dict(framework=framework, framework_version="1.0",
               device={"name": "x86_64", "kind": "cpu"}, model="resnet20", mode="eager",
               batch_size=32, impls={"conv": "framework", "loss": "framework cross-entropy"},
               workers=0, seed=0, sync=False, iters=steps, warmup=2, step_ms=step_summary,
               phases_ms={p: summary(v) for p, v in phase_samples.items()}, layers=layers,
               instrumentation={"instrumented_step_ms_median": step_summary["median"],
                                "uninstrumented_step_ms_median": None, "overhead_pct": None},
               parameters=272282, dtype="float32", instrument_kind="hooks",
               threads={"requested": 2, "ignored": []},
               machine={"cpu": "Test CPU", "logical_cores": 2, "usable_cores": 2,
                        "host": "testhost"})
    if interleaved is not None:
        doc["interleaved"] = interleaved
    doc.update(fields)
    report = rep.build_report(**doc)
    report["machine"] = doc["machine"]      # the synthetic machine, not this one
    rep.validate_report(report)
    return report


def interleaved(run_id, variant, rounds, steps_per_round=2):
    return {"run_id": run_id, "variant": variant, "variants": ["a", "b"], "rounds": rounds,
            "steps_per_round": steps_per_round,
            "step_rounds": [r for r in range(rounds) for _ in range(steps_per_round)]}


def row_of(pair, name, direction):
    return next(r for r in pair["layers"] if r["name"] == name and r["direction"] == direction)


def covers(interval, true_pct):
    return interval["low_pct"] <= true_pct <= interval["high_pct"]


# ----------------------------------------------------------------------------- intervals

def test_unpaired_interval_covers_a_known_slowdown_and_says_so():
    a = synthetic_report(seed=1)
    b = synthetic_report(seed=2, scale={"conv2:backward": 1.3}, framework="chainer")
    pair = analysis.diff_reports(a, b, labels=("torch", "chainer"))
    assert pair["pairing"]["paired"] is False and "separate runs" in pair["pairing"]["why"]
    conv2 = row_of(pair, "conv2", "backward")
    assert conv2["interval"]["n"] == [20, 20] and conv2["interval"]["unit"] == "steps"
    assert covers(conv2["interval"], 30.0) and conv2["interval"]["low_pct"] > 0
    conv1 = row_of(pair, "conv1", "backward")   # unchanged: 0 inside
    assert covers(conv1["interval"], 0.0)
    assert conv2["diff_ms"] == pytest.approx(1.8, rel=0.15)


def test_unpaired_coverage_over_many_runs():
    """The unpaired bootstrap's 95% interval covers a known +20% on the step in most of 60
    synthetic run pairs (n = 20 steps each; a percentile bootstrap of a median runs a little
    under its nominal level at this n)."""
    hits = 0
    truth = 20.0
    for k in range(60):
        a = synthetic_report(seed=100 + k, noise=0.08)
        b = synthetic_report(seed=500 + k, noise=0.08, scale={
            p: 1.2 for p in list(BASE_PHASE_MS) + [f"{n}:{d}" for n, _ in LAYERS
                                                  for d in ("forward", "backward")]})
        row = analysis.compare_series(analysis.series(a, "step"), analysis.series(b, "step"))
        hits += covers(row["interval"], truth)
    assert hits >= 51, hits         # >= 85%


def test_paired_by_round_only_when_the_rounds_are_shared():
    """A drift of up to 60% between rounds hits both variants of a round alike: paired by
    round (same interleaved run) the interval is narrow and covers +10%; the same samples
    from two different interleaved runs are not paired, and their interval is much wider."""
    rng = np.random.default_rng(7)
    rounds = 10
    drift = np.repeat(1 + 0.6 * rng.random(rounds), 2)
    a = synthetic_report(seed=3, steps=20, round_drift=drift, noise=0.02,
                         interleaved=interleaved("run-1", "a", rounds))
    b = synthetic_report(seed=4, steps=20, round_drift=drift, noise=0.02,
                         scale={p: 1.1 for p in BASE_PHASE_MS} | {
                             f"{n}:{d}": 1.1 for n, _ in LAYERS for d in ("forward",
                                                                          "backward")},
                         interleaved=interleaved("run-1", "b", rounds))
    paired = analysis.diff_reports(a, b)
    assert paired["pairing"]["paired"] is True and paired["pairing"]["rounds"] == 10
    step = paired["step"]
    assert step["interval"]["unit"] == "rounds" and step["interval"]["n"] == 10
    assert step["interval"]["confidence"] >= 0.95
    assert covers(step["interval"], 10.0) and step["interval"]["low_pct"] > 0

    b_other = copy.deepcopy(b)
    b_other["interleaved"]["run_id"] = "run-2"
    unpaired = analysis.diff_reports(a, b_other)
    assert unpaired["pairing"]["paired"] is False
    assert "two different interleaved runs" in unpaired["pairing"]["why"]
    width = lambda iv: iv["high_pct"] - iv["low_pct"]          # noqa: E731
    assert width(unpaired["step"]["interval"]) > 3 * width(step["interval"])


def test_too_few_rounds_or_steps_give_no_interval():
    a = synthetic_report(seed=1, steps=10, interleaved=interleaved("r", "a", 5))
    b = synthetic_report(seed=2, steps=10, interleaved=interleaved("r", "b", 5))
    row = analysis.diff_reports(a, b)["step"]
    assert row["interval"] is None and "5 shared rounds" in row["no_interval"]
    a, b = synthetic_report(seed=1, steps=5), synthetic_report(seed=2, steps=5)
    row = analysis.diff_reports(a, b)["step"]
    assert row["interval"] is None and "5 and 5 steps" in row["no_interval"]
    assert row["diff_pct"] is not None       # the estimate is still given


def test_a_schema_2_report_without_samples_still_diffs():
    a = synthetic_report(seed=1)
    b = synthetic_report(seed=2)
    b["schema_version"] = 2
    for key in ("parameters", "dtype", "instrument_kind", "machine"):
        b.pop(key)
    for entry in b["phases_ms"].values():
        entry.pop("samples")
    for layer in b["layers"]:
        layer.pop("forward_samples_ms")
        layer.pop("backward_samples_ms")
    rep.validate_report(b)
    pair = analysis.diff_reports(a, b, labels=("new", "old"))
    assert "schema 2" in pair["phases"]["forward"]["no_interval"]
    assert pair["step"]["interval"] is not None      # step samples were always kept
    assert "machine not recorded in old's report" in pair["comparability"]["stated"][0]


# ----------------------------------------------------------------------------- the gap

def test_gap_breakdown_adds_up_and_puts_the_known_part_first():
    a = synthetic_report(seed=1, noise=0.01)
    b = synthetic_report(seed=2, noise=0.01, scale={"conv2:backward": 2.0, "optimizer": 1.5})
    bd = analysis.gap_breakdown(a, b)
    assert bd["gap_ms"] == pytest.approx(b["step_ms"]["mean"] - a["step_ms"]["mean"])
    assert bd["parts_sum_ms"] == pytest.approx(bd["gap_ms"], rel=1e-9)
    first, second = bd["items"][:2]
    assert first["what"] == "conv2 (backward)" and first["delta_ms"] == pytest.approx(6.0,
                                                                                      rel=0.05)
    assert second["what"] == "optimizer" and second["delta_ms"] == pytest.approx(1.0, rel=0.1)
    assert bd["by_type"][0]["type"] == "Conv2d" and bd["by_type"][0]["direction"] == "backward"
    shown = analysis.top_with_rest(bd["items"], 3)
    assert shown[-1]["kind"] == "rest" and shown[-1]["count"] == len(bd["items"]) - 3
    assert sum(i["delta_ms"] for i in shown) == pytest.approx(bd["gap_ms"])


def test_gap_of_a_graph_mode_run_keeps_its_phases_whole():
    a = synthetic_report(seed=1)
    b = synthetic_report(seed=2)
    inner = ("forward", "loss_forward", "loss_backward", "backward", "optimizer")
    b["phases_ms"]["compiled_step"] = {"mean": sum(b["phases_ms"][p]["mean"] for p in inner),
                                       "median": 1.0, "iqr": 0.0}
    for p in inner:
        del b["phases_ms"][p]
    b.update(mode="graph", layers=[], phases_absent={p: "inside the compiled step"
                                                     for p in inner})
    rep.validate_report(b)
    pair = analysis.diff_reports(a, b)
    bd = pair["breakdown"]
    assert bd["parts_sum_ms"] == pytest.approx(bd["gap_ms"], rel=1e-9)
    assert {i["what"] for i in bd["items"]} >= {"compiled_step", "forward", "backward"}
    assert all(i["kind"] == "phase" for i in bd["items"])
    assert pair["phases"]["compiled_step"]["no_interval"].startswith("only in")
    assert "mode differs: A eager, B graph" in pair["comparability"]["warnings"]


# ----------------------------------------------------------------------------- warnings

def test_comparability_warnings_name_what_differs():
    a = synthetic_report(seed=1)
    same = analysis.comparability(a, synthetic_report(seed=2, framework="chainer"))
    assert same == {"warnings": [], "stated": []}
    b = synthetic_report(seed=2, model="resnet32", batch_size=64, dtype="float16",
                         device={"name": "H100", "kind": "cuda"}, mode="graph",
                         threads={"requested": 8, "ignored": []}, parameters=466906,
                         instrument_kind="trace",
                         machine={"cpu": "Other CPU", "logical_cores": 16,
                                  "usable_cores": 16, "host": "gpu1"})
    b["machine"] = {"cpu": "Other CPU", "logical_cores": 16, "usable_cores": 16,
                    "host": "gpu1"}
    out = analysis.comparability(a, b, ("A", "B"))
    text = "\n".join(out["warnings"])
    for fragment in ("model differs: A resnet20, B resnet32", "batch size differs: A 32, B 64",
                     "dtype differs: A float32, B float16", "device differs: A cpu, B cuda",
                     "mode differs: A eager, B graph", "threads differs: A 2, B 8",
                     "parameter count differs: A 272,282, B 466,906",
                     "instrument differs: A's layer times from hooks, B's from trace"):
        assert fragment in text, (fragment, text)
    stated = "\n".join(out["stated"])
    assert "different machines: A Test CPU, 2 of 2" in stated and "Other CPU" in stated
    assert "device names differ" in stated


def test_trace_based_reports_diff_like_hook_based_ones():
    a = synthetic_report(seed=1, instrument_kind="trace")
    b = synthetic_report(seed=2, instrument_kind="trace", scale={"fc:forward": 1.5})
    pair = analysis.diff_reports(a, b)
    assert pair["comparability"]["warnings"] == []
    assert covers(row_of(pair, "fc", "forward")["interval"], 50.0)


# ----------------------------------------------------------------------------- --map

def test_map_matches_renamed_layers_and_lists_the_rest():
    a = synthetic_report(seed=1)
    b = synthetic_report(seed=2)
    b["layers"][0]["name"] = "features.0"
    pair = analysis.diff_reports(a, b, labels=("A", "B"))
    assert pair["only_in"] == {"A": ["conv1"], "B": ["features.0"]}
    assert "parameter count" not in " ".join(pair["comparability"]["warnings"])
    mapped = analysis.diff_reports(a, b, renames={"features.0": "conv1"})
    assert mapped["only_in"] == {"A": [], "B": []}
    assert len(mapped["layers"]) == 2 * len(LAYERS)
    with pytest.raises(ValueError, match="--map: two layers of B map to the name 'conv2'"):
        analysis.diff_reports(a, b, renames={"features.0": "conv2"}, labels=("A", "B"))
    assert cli.parse_renames(["a=b", "c=d"]) == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match="--map: expected FROM=TO"):
        cli.parse_renames(["conv1"])


# ----------------------------------------------------------------------------- reading runs

def write(path, doc):
    path.mkdir(parents=True, exist_ok=True)
    (path / "report.json").write_text(json.dumps(doc))
    return path


def test_merged_reports_per_rank_or_the_slowest(tmp_path):
    ranks = {"0": synthetic_report(seed=1), "1": synthetic_report(seed=2, scale={
        p: 1.5 for p in BASE_PHASE_MS})}
    merged = {"schema_version": 1, "world_size": 2, "hosts": {"0": "h", "1": "h"},
              "framework": "torch", "model": "resnet20", "errors": [], "ranks": ranks}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "merged_report.json").write_text(json.dumps(merged))
    runs = cli.load_runs([tmp_path / "a", tmp_path / "b"])
    assert [r.rank for r in runs] == [1, 1] and "the slowest" in runs[0].note
    assert [r.label for r in runs] == ["a-rank1", "b-rank1"]
    runs = cli.load_runs([tmp_path / "a", tmp_path / "b"], rank=0)
    assert [r.rank for r in runs] == [0, 0]
    result = cli.diff_runs(tmp_path / "a", tmp_path / "b", rank="each")
    assert [(p["a"], p["b"]) for p in result.doc["pairs"]] == [("a-rank0", "b-rank0"),
                                                               ("a-rank1", "b-rank1")]
    with pytest.raises(ValueError, match=r"--rank: expected one of the measured ranks \[0, 1\]"):
        cli.load_runs([tmp_path / "a", tmp_path / "b"], rank=5)


def test_bad_inputs_are_one_error_naming_the_argument(tmp_path):
    with pytest.raises(ValueError, match="RUN 2 .*no such file or folder"):
        cli.load_runs([write(tmp_path / "a", synthetic_report()), tmp_path / "none"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="expected a folder holding report.json"):
        cli.load_runs([tmp_path / "a", tmp_path / "empty"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is not JSON"):
        cli.load_runs([tmp_path / "a", tmp_path / "bad.json"])
    failed = {k: v for k, v in synthetic_report().items() if k not in ("step_ms", "phases_ms",
                                                                       "layers",
                                                                       "instrumentation")}
    failed["errors"] = ["import failed"]
    write(tmp_path / "failed", failed)
    with pytest.raises(ValueError, match="has no measurements .*import failed"):
        cli.load_runs([tmp_path / "a", tmp_path / "failed"])
    with pytest.raises(ValueError, match="at least two runs"):
        cli.load_runs([tmp_path / "a"])
    with pytest.raises(ValueError, match="--labels: expected 2 distinct"):
        cli.load_runs([tmp_path / "a", tmp_path / "a"], labels=["x", "x"])
    with pytest.raises(ValueError, match="--fail-if-slower: expected a percentage"):
        analysis.parse_threshold("five")


# ----------------------------------------------------------------------------- the CLI and gate

@pytest.fixture
def two_runs(tmp_path):
    a = write(tmp_path / "torch-resnet20", synthetic_report(seed=1))
    b = write(tmp_path / "chainer-resnet20", synthetic_report(
        seed=2, framework="chainer", scale={"conv2:backward": 1.3, "conv2:forward": 1.3}))
    return a, b


def test_cli_prints_tables_and_writes_diff_and_waterfall(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "out"
    assert cli.main([str(a), str(b), "--out", str(out)]) == cli.EXIT_OK
    text = capsys.readouterr().out
    for fragment in ("chainer vs torch (the baseline)", "Phases: median (IQR) ms per step",
                     "not paired: separate runs", "conv2 bwd", "The gap: chainer",
                     "sum of the parts", "by layer type: Conv2d backward"):
        assert fragment in text, fragment
    doc = json.loads((out / "diff.json").read_text())
    assert doc["schema"] == cli.DIFF_SCHEMA and doc["pairs"][0]["a"] == "torch"
    assert (out / "waterfall-chainer.png").stat().st_size > 1000
    assert (out / "waterfall-chainer.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("argv, code", [
    (["--fail-if-slower", "5%"], cli.EXIT_SLOWER),                           # step +~10%
    (["--fail-if-slower", "50%"], cli.EXIT_OK),
    (["--fail-if-slower", "5", "--on", "conv2:backward"], cli.EXIT_SLOWER),  # +30%
    (["--fail-if-slower", "5%", "--on", "conv1"], cli.EXIT_OK),              # unchanged
    (["--fail-if-slower", "5%", "--on", "optimizer"], cli.EXIT_OK),
])
def test_gate_exit_codes(two_runs, tmp_path, argv, code, capsys):
    a, b = two_runs
    assert cli.main([str(a), str(b), "--out", str(tmp_path / "o"), "--no-plot",
                     *argv]) == code
    assert "gate chainer vs torch" in capsys.readouterr().out


def test_gate_cannot_judge_without_an_interval(tmp_path, capsys):
    a = write(tmp_path / "a", synthetic_report(seed=1, steps=4))
    b = write(tmp_path / "b", synthetic_report(seed=2, steps=4, scale={"optimizer": 3.0},
                                               framework="chainer"))
    code = cli.main([str(a), str(b), "--out", str(tmp_path / "o"), "--no-plot",
                     "--fail-if-slower", "1%"])
    assert code == cli.EXIT_UNDECIDED
    assert "cannot judge" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--fail-if-slower", "fast"], "--fail-if-slower: expected a percentage"),
    (["--on", "step"], "--on: judges with --fail-if-slower"),
    (["--rank", "last"], "--rank: expected 'slowest', 'each' or a rank number"),
    (["--map", "conv1"], "--map: expected FROM=TO"),
    (["--top", "0"], "expected a positive integer"),
])
def test_cli_bad_arguments_exit_2(two_runs, argv, message, capsys):
    a, b = two_runs
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args([str(a), str(b), *argv])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_cli_unknown_on_and_missing_run_exit_2(two_runs, tmp_path, capsys):
    a, b = two_runs
    assert cli.main([str(a), str(b), "--out", str(tmp_path / "o"), "--no-plot",
                     "--fail-if-slower", "5%", "--on", "conv9"]) == cli.EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: --on: expected 'step', a phase or a "
                                              "layer")
    assert cli.main([str(a), str(tmp_path / "nope")]) == cli.EXIT_BAD_INPUT
    assert "no such file or folder" in capsys.readouterr().err


def test_api_diff_runs_takes_report_dicts():
    from profiler import api
    a, b = synthetic_report(seed=1), synthetic_report(seed=2, framework="mxnet")
    result = api.diff_runs(a, b)
    assert [r.label for r in result.runs] == ["torch", "mxnet"]
    assert result.gate(5.0).exit_code == cli.EXIT_OK
    console = Console(record=True, width=200)
    result.print(console)
    assert "mxnet vs torch" in console.export_text()


# ----------------------------------------------------------------------------- across frameworks

def test_layers_across_frameworks_table_and_ratio():
    reports = [synthetic_report(seed=1, noise=0.0),
               synthetic_report(seed=2, noise=0.0, framework="chainer",
                                scale={"conv2:forward": 2.0, "conv2:backward": 2.0})]
    reports[1]["layers"].append({**reports[1]["layers"][0], "name": "extra"})
    table = analysis.layers_across(reports, ["torch", "chainer"])
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["conv1", "bn1", "conv2", "fc", "extra"]
    assert rows["conv2"]["ratio"]["chainer"] == pytest.approx(2.0)
    assert rows["conv1"]["ratio"]["torch"] == pytest.approx(1.0)
    assert rows["extra"]["forward_ms"]["torch"] is None and rows["extra"]["ratio"]["chainer"] \
        is None
    console = Console(record=True, width=200)
    rep.render_table(reports, console)
    text = console.export_text()
    assert "Layers across frameworks" in text and "2.00x" in text


def test_schema_3_samples_are_checked():
    doc = synthetic_report()
    doc["phases_ms"]["forward"]["samples"] = doc["phases_ms"]["forward"]["samples"][:-1]
    with pytest.raises(ValueError, match="report.phases_ms.forward.samples: expected 20"):
        rep.validate_report(doc)
    doc = synthetic_report()
    doc["layers"][0].pop("backward_samples_ms")
    with pytest.raises(ValueError, match=r"report.layers\[0\].backward_samples_ms"):
        rep.validate_report(doc)
    doc = synthetic_report(interleaved=interleaved("r", "a", 10))
    doc["interleaved"]["step_rounds"] = doc["interleaved"]["step_rounds"][:6]
    with pytest.raises(ValueError, match="report.interleaved.step_rounds: expected 20"):
        rep.validate_report(doc)
    doc = synthetic_report()
    doc["schema_version"] = 2
    with pytest.raises(ValueError, match="report: keys .* need schema_version 3"):
        rep.validate_report(doc)


# ----------------------------------------------------------------------------- real runs

TINY_RUN = ["--model", "resnet20", "--batch-size", "8", "--synthetic-size", "32",
            "--warmup", "1", "--no-progress", "--format", "json"]


def _available(framework):
    import importlib
    for module in (f"profiler.workloads.{framework}.common", f"profiler.instrument.{framework}"):
        try:
            importlib.import_module(module)
        except ImportError as e:
            pytest.skip(f"{framework}: {e}")


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """PyTorch and Chainer ResNet-20, batch 8, 6 measured steps each, by the profiler's CLI."""
    from profiler import layerwise
    out = tmp_path_factory.mktemp("real")
    for framework in ("torch", "chainer"):
        _available(framework)
        assert layerwise.main([*TINY_RUN, "--framework", framework, "--iters", "6",
                               "--overhead-iters", "0", "--out", str(out / framework)]) == 0
    return out / "torch", out / "chainer"


def test_real_runs_breakdown_adds_up_to_the_step_difference(real_runs, tmp_path, capsys):
    capsys.readouterr()
    a_dir, b_dir = real_runs
    code = cli.main([str(a_dir), str(b_dir), "--out", str(tmp_path / "diff")])
    assert code == cli.EXIT_OK
    assert "chainer vs torch (the baseline)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "diff" / "diff.json").read_text())
    pair = doc["pairs"][0]
    a = json.loads((a_dir / "report.json").read_text())
    b = json.loads((b_dir / "report.json").read_text())
    assert a["schema_version"] == b["schema_version"] == rep.SCHEMA_VERSION
    step_gap = b["step_ms"]["mean"] - a["step_ms"]["mean"]
    bd = pair["breakdown"]
    assert bd["parts_sum_ms"] == pytest.approx(step_gap, rel=0.02, abs=1e-6)
    # The canonical layer names match across the frameworks: every layer has a row.
    assert pair["only_in"] == {"torch": [], "chainer": []}
    assert len(pair["layers"]) == 2 * len(a["layers"]) > 0
    assert any(i["kind"] == "layer" for i in bd["items"])
    # The layers' own times lie inside their phases (what "outside layers" is the rest of).
    for report in (a, b):
        for direction in ("forward", "backward"):
            inside = sum(e[f"self_{direction}_ms"] for e in report["layers"])
            assert inside <= report["phases_ms"][direction]["mean"] * 1.02
        assert report["parameters"] == 272282 and report["dtype"] == "float32"
        assert len(report["layers"][0]["forward_samples_ms"]) == 6
    assert pair["step"]["interval"]["n"] == [6, 6]
    assert (tmp_path / "diff" / "waterfall-chainer.png").is_file()


def test_real_compare_is_paired_by_round(tmp_path, capsys):
    """A --compare run's variants carry one interleaved run id: the diff pairs them by round."""
    _available("torch")
    from profiler import layerwise
    out = tmp_path / "cmp"
    assert layerwise.main([*TINY_RUN, "--framework", "torch", "--rounds", "6",
                           "--steps-per-round", "1", "--compare", "conv=framework,native",
                           "--out", str(out)]) == 0
    capsys.readouterr()
    result = cli.diff_runs(out)
    pair = result.doc["pairs"][0]
    assert (pair["a"], pair["b"]) == ("framework", "native")
    assert pair["pairing"]["paired"] is True and pair["pairing"]["rounds"] == 6
    assert pair["step"]["interval"]["unit"] == "rounds" and pair["step"]["interval"]["n"] == 6
