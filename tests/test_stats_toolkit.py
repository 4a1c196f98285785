"""One statistics and timing toolkit (issue 19, item 5): one IQR (profiler.analysis.stats.iqr,
linear interpolation) wherever the project computes one; the benchmarks' rounds in
stats.interleaved_order's order; ratios taken within a round; one atomic JSON writer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from experiments import study, timing
from profiler import report as rep
from profiler.analysis import phases, stats
from profiler.timeline import Range, Timeline

ONE_TO_EIGHT = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
# numpy.percentile's linear interpolation: 6.25 - 2.75. statistics.quantiles' default
# ("exclusive") gives 6.75 - 2.25 = 4.5: the other IQR this project used to report.
LINEAR_IQR = 3.5
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- one IQR

def test_stats_iqr_is_the_linear_definition():
    assert stats.iqr(ONE_TO_EIGHT) == pytest.approx(LINEAR_IQR)
    assert stats.iqr([5.0, 1.0, 8.0, 3.0, 2.0, 7.0, 4.0, 6.0]) == pytest.approx(LINEAR_IQR)


def test_stats_summarize_reports_the_same_iqr():
    assert stats.summarize(ONE_TO_EIGHT)["iqr_ms"] == pytest.approx(LINEAR_IQR)


def test_timing_summarize_reports_the_same_iqr():
    out = timing.summarize({"ours": ONE_TO_EIGHT, "theirs": [1.0] * 8}, baseline="theirs")
    assert out["ours"]["iqr_ms"] == pytest.approx(LINEAR_IQR)
    # Against a baseline of 1 ms in every round the ratios are the samples themselves.
    assert out["ours"]["ratio_iqr"] == pytest.approx(LINEAR_IQR)
    assert out["ours"]["median_ms"] == pytest.approx(4.5)


def test_report_step_summary_reports_the_same_iqr():
    """A report's step_ms (phases.phase_breakdown, then report.from_phase_breakdown) from eight
    steps of 1..8 ms."""
    timeline, start_ms = Timeline(), 0.0
    for step, ms in enumerate(ONE_TO_EIGHT):
        timeline.add(Range("step", "step", int(start_ms * 1e6), int((start_ms + ms) * 1e6),
                           step=step))
        start_ms += ms
    sections = rep.from_phase_breakdown(phases.phase_breakdown(timeline))
    assert sections["step_ms"]["iqr"] == pytest.approx(LINEAR_IQR)
    # No phase measured: all of each step is "other", with the step's spread.
    assert sections["phases_ms"]["other"]["iqr"] == pytest.approx(LINEAR_IQR)


def test_timing_keeps_no_statistic_or_writer_of_its_own():
    for name in ("iqr", "write_json"):
        assert not hasattr(timing, name), f"experiments.timing.{name} is back"


def test_no_experiment_or_script_computes_its_own_quartiles():
    """statistics.quantiles (the "exclusive" IQR) or a def of iqr outside analysis.stats would
    make "IQR" mean two things again."""
    offenders = []
    for path in sorted((REPO / "experiments").glob("*.py")) + sorted(
            (REPO / "scripts").glob("*.py")):
        text = path.read_text()
        if re.search(r"\bquantiles\(|^\s*def iqr\b", text, re.M):
            offenders.append(path.relative_to(REPO).as_posix())
    assert offenders == []


# --------------------------------------------------------------------------- rounds

class RecordingTimer(timing.Timer):
    """Calls the variant once and says it took 1 ms."""

    def __init__(self):
        super().__init__("cpu")

    def __call__(self, fn, repeat):
        fn()
        return 1.0


@pytest.mark.parametrize("names, rounds", [(["A", "B", "C"], 7), (["ours", "torch"], 5),
                                           (["only"], 3), (["A", "B", "C", "D"], 0)])
def test_interleaved_runs_rounds_in_interleaved_order(names, rounds):
    ran = []
    variants = {name: (lambda name=name: ran.append(name)) for name in names}
    samples = timing.interleaved(variants, RecordingTimer(), rounds=rounds, warmup=2, repeat=1)
    warmup = names * 2
    assert ran[:len(warmup)] == warmup
    expected = [name for order in stats.interleaved_order(names, rounds) for name in order]
    assert ran[len(warmup):] == expected
    assert {name: len(values) for name, values in samples.items()} == {n: rounds for n in names}


def test_interleaved_refuses_negative_rounds_before_running_anything():
    ran = []
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved({"A": lambda: ran.append("A")}, RecordingTimer(), rounds=-1,
                           warmup=3, repeat=1)
    assert ran == []


# --------------------------------------------------------------------------- ratios

def test_summarize_takes_ratios_within_a_round():
    """One slow round in ``ours`` (32 ms against 1 ms) is one outlying ratio, not a shift of
    the ratio: the median of per-round ratios is 1, the ratio of the medians would be 2."""
    samples = {"torch": [1.0, 2.0, 4.0, 8.0, 16.0], "ours": [32.0, 2.0, 4.0, 8.0, 16.0]}
    out = timing.summarize(samples, baseline="torch")
    assert out["ours"]["ratio"] == pytest.approx(1.0)
    assert out["ours"]["median_ms"] / out["torch"]["median_ms"] == pytest.approx(2.0)
    assert out["torch"]["ratio"] == 1.0 and out["torch"]["ratio_iqr"] == 0.0
    assert out["ours"]["samples_ms"] == samples["ours"]


def test_summarize_ratio_cancels_drift_between_rounds():
    """Every round 10% slower than the baseline's while the machine drifts 4x: the ratio is
    1.1 with no spread though each variant's own IQR is wide."""
    base = [10.0, 20.0, 30.0, 40.0]
    out = timing.summarize({"base": base, "slow": [1.1 * b for b in base]}, baseline="base")
    assert out["slow"]["ratio"] == pytest.approx(1.1)
    assert out["slow"]["ratio_iqr"] == pytest.approx(0.0, abs=1e-12)
    assert out["slow"]["iqr_ms"] == pytest.approx(stats.iqr([1.1 * b for b in base]))


def test_summarize_refuses_unpaired_samples():
    with pytest.raises(ValueError, match="baseline"):
        timing.summarize({"a": [1.0, 2.0]}, baseline="b")
    with pytest.raises(ValueError, match="samples\\['a'\\]"):
        timing.summarize({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0]}, baseline="b")


# --------------------------------------------------------------------------- one writer

def test_study_result_is_strict_json_even_with_a_diverged_loss(tmp_path):
    """Result.save writes with profiler.report.write_json_atomic, which refuses NaN: a loss
    that diverged is kept, as the string "NaN", and the file stays valid JSON."""
    result = study.Result("parity", tmp_path / "new" / "parity", settings={"steps": 2},
                          scale="quick")
    result.add_samples("losses", {"torch": [2.3, math.nan], "chainer": [2.3, math.inf]})
    result.add_samples("where", {"out": tmp_path})     # not JSON: written as its str()
    doc = json.loads((tmp_path / "new" / "parity" / "result.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"{c} in result.json"))
    assert doc["samples"]["losses"] == {"torch": [2.3, "NaN"], "chainer": [2.3, "Infinity"]}
    assert doc["samples"]["where"] == {"out": str(tmp_path)}
    study.validate_result(doc)
    assert list((tmp_path / "new" / "parity").glob("*.tmp")) == []
