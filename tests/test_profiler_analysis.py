"""Known-input tests of the profiler's framework-independent analyses and report.

Every timeline here is built by hand with round numbers, so each expected value can be checked
with pencil and paper; nothing is measured.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from rich.console import Console

from profiler import report as rep
from profiler.analysis import flamegraph, nesting, phases, stats, trace_events
from profiler.timeline import PHASES, Range, Timeline

MS = 1_000_000   # ns per ms
US = 1_000       # ns per us


def ms_range(name, kind, start_ms, end_ms, **kw):
    return Range(name, kind, int(start_ms * MS), int(end_ms * MS), **kw)


def timeline_of(*ranges):
    tl = Timeline()
    for r in ranges:
        tl.add(r)
    return tl


# ----------------------------------------------------------------------------- nesting

def test_check_nesting_accepts_nested_disjoint_and_touching():
    tl = timeline_of(
        Range("step", "step", 0, 100, step=0),
        Range("forward", "phase", 0, 50, step=0),       # shares the step's start
        Range("backward", "phase", 50, 100, step=0),    # touches forward, shares the step's end
        Range("b1", "layer", 60, 60, step=0, direction="backward"),   # zero length
        Range("step", "step", 100, 200, step=1))        # touches step 0
    nesting.check_nesting(tl)


def test_check_nesting_names_partial_overlap():
    tl = timeline_of(Range("step", "step", 0, 100, step=0),
                     Range("forward", "phase", 10, 60, step=0),
                     Range("backward", "phase", 50, 100, step=0))
    with pytest.raises(ValueError) as err:
        nesting.check_nesting(tl)
    message = str(err.value)
    assert "'forward'" in message and "'backward'" in message and "host:main" in message


def test_check_nesting_ignores_overlap_across_tracks():
    tl = timeline_of(Range("a", "mark", 0, 60, track="host:main"),
                     Range("b", "mark", 50, 100, track="device:0"))
    nesting.check_nesting(tl)


def test_check_nesting_finds_overlap_with_a_later_sibling():
    # c overlaps b, a sibling inside a: caught even though c lies inside a.
    tl = timeline_of(Range("a", "mark", 0, 100), Range("b", "mark", 10, 40),
                     Range("c", "mark", 30, 50))
    with pytest.raises(ValueError, match="'b'.*'c'"):
        nesting.check_nesting(tl)


def test_build_tree_forms_the_forest():
    ranges = [Range("step1", "step", 100, 200, step=1),
              Range("conv", "layer", 10, 20, step=0, direction="forward"),
              Range("step0", "step", 0, 100, step=0),
              Range("forward", "phase", 0, 50, step=0),
              Range("relu", "layer", 20, 30, step=0, direction="forward")]
    roots = nesting.build_tree(ranges)

    def shape(node):
        return (node.range.name, [shape(c) for c in node.children])

    assert [shape(n) for n in roots] == [
        ("step0", [("forward", [("conv", []), ("relu", [])])]), ("step1", [])]


def test_build_tree_equal_extents_step_outside_phase():
    # Appended inner-first; at equal extents the step still contains the phase.
    roots = nesting.build_tree([Range("forward", "phase", 0, 10, step=0),
                                Range("step", "step", 0, 10, step=0)])
    assert roots[0].range.kind == "step" and roots[0].children[0].range.kind == "phase"


def test_build_tree_refuses_several_tracks_and_overlaps():
    with pytest.raises(ValueError, match="one track"):
        nesting.build_tree([Range("a", "mark", 0, 1, track="host:main"),
                            Range("b", "mark", 0, 1, track="device:0")])
    with pytest.raises(ValueError, match="partially overlap"):
        nesting.build_tree([Range("a", "mark", 0, 10), Range("b", "mark", 5, 15)])
    assert nesting.build_tree([]) == []


# ----------------------------------------------------------------------------- phases

def two_step_timeline():
    """Step 0: 100 ms, measured phases 95 ms (forward twice); step 1: 120 ms, phases 110 ms."""
    return timeline_of(
        ms_range("warmup", "step", -50, 0, step=-1),
        ms_range("forward", "phase", -40, -10, step=-1),   # warmup: not counted
        ms_range("step", "step", 0, 100, step=0),
        ms_range("data_wait", "phase", 0, 10, step=0),
        ms_range("h2d", "phase", 10, 15, step=0),
        ms_range("forward", "phase", 15, 35, step=0),
        ms_range("forward", "phase", 35, 45, step=0),      # a second forward range: summed
        ms_range("loss_forward", "phase", 45, 47, step=0),
        ms_range("loss_backward", "phase", 47, 50, step=0),
        ms_range("backward", "phase", 50, 90, step=0),
        ms_range("optimizer", "phase", 90, 95, step=0),
        ms_range("other", "phase", 95, 100, step=0),       # ignored: "other" is computed
        ms_range("step", "step", 100, 220, step=1),
        ms_range("data_wait", "phase", 100, 120, step=1),
        ms_range("forward", "phase", 120, 150, step=1),
        ms_range("backward", "phase", 150, 200, step=1),
        ms_range("optimizer", "phase", 200, 210, step=1),
        # A device copy of a phase must not be counted twice.
        ms_range("forward", "phase", 120, 150, step=1, track="device:0"),
    )


def test_phase_breakdown_sums_repeats_and_computes_other():
    out = phases.phase_breakdown(two_step_timeline())
    assert out["steps"] == [0, 1]
    p = out["phases_ms"]
    assert set(p) == set(PHASES)
    assert p["forward"]["samples"] == [30.0, 30.0]
    assert p["data_wait"]["samples"] == [10.0, 20.0]
    assert p["h2d"]["samples"] == [5.0, 0.0]           # absent in step 1: counts 0
    assert p["other"]["samples"] == [5.0, 10.0]         # 100 - 95, 120 - 110
    assert p["other"]["mean"] == pytest.approx(7.5)
    assert p["backward"]["median"] == pytest.approx(45.0)
    assert p["data_wait"]["iqr"] == pytest.approx(5.0)  # percentiles 12.5 and 17.5
    assert out["step_ms"]["samples"] == [100.0, 120.0]
    assert out["step_ms"]["mean"] == pytest.approx(110.0)
    assert out["warnings"] == []


def test_phase_breakdown_means_add_up_to_step_mean():
    rng = np.random.default_rng(1)
    tl = Timeline()
    t = 0
    for step in range(7):
        start = t
        for phase in PHASES[:-1]:
            for _ in range(int(rng.integers(0, 3))):
                d = int(rng.integers(1, 10**6))
                tl.add(Range(phase, "phase", t, t + d, step=step))
                t += d
        t += int(rng.integers(0, 10**6))
        tl.add(Range("step", "step", start, t, step=step))
    out = phases.phase_breakdown(tl)
    total = sum(out["phases_ms"][p]["mean"] for p in PHASES)
    assert total == pytest.approx(out["step_ms"]["mean"], rel=1e-12)


def test_phase_breakdown_flags_phases_longer_than_step():
    tl = timeline_of(ms_range("step", "step", 0, 10, step=0),
                     ms_range("forward", "phase", 0, 8, step=0),
                     ms_range("backward", "phase", 2, 7, step=0, track="host:other"))
    out = phases.phase_breakdown(tl)
    assert out["phases_ms"]["other"]["samples"] == [-3.0]
    assert len(out["warnings"]) == 1 and "step 0" in out["warnings"][0]


def test_phase_breakdown_refuses_bad_input():
    with pytest.raises(ValueError, match="no host range of kind 'step'"):
        phases.phase_breakdown(timeline_of(ms_range("forward", "phase", 0, 1, step=0)))
    with pytest.raises(ValueError, match="'fwd'"):
        phases.phase_breakdown(timeline_of(ms_range("step", "step", 0, 10, step=0),
                                           ms_range("fwd", "phase", 0, 1, step=0)))
    with pytest.raises(ValueError, match="step 3"):
        phases.phase_breakdown(timeline_of(ms_range("step", "step", 0, 10, step=0),
                                           ms_range("forward", "phase", 0, 1, step=3)))


def layer_timeline(with_device=False):
    """Two steps of block1(conv1, conv2) -> fc; conv1 runs twice in step 1's block1."""
    def layer(name, lt, direction, a, b, step, track="host:main"):
        return ms_range(name, "layer", a, b, step=step, direction=direction, layer_type=lt,
                        track=track)
    rs = []
    for step, base in ((0, 0), (1, 100)):
        rs += [ms_range("step", "step", base, base + 100, step=step),
               ms_range("forward", "phase", base, base + 20, step=step),
               layer("block1", "Block", "forward", base, base + 10, step),
               layer("conv1", "Conv2d", "forward", base, base + 3, step)]
        if step == 1:
            rs.append(layer("conv1", "Conv2d", "forward", base + 3, base + 4, step))
        rs += [layer("conv2", "Conv2d", "forward", base + 5, base + 9, step),
               layer("fc", "Linear", "forward", base + 12, base + 14, step),
               ms_range("backward", "phase", base + 30, base + 60, step=step),
               layer("fc", "Linear", "backward", base + 30, base + 33, step),
               layer("block1", "Block", "backward", base + 35, base + 47, step),
               layer("conv2", "Conv2d", "backward", base + 35, base + 40, step),
               layer("conv1", "Conv2d", "backward", base + 41, base + 45, step)]
        if with_device:
            rs += [layer("conv1", "Conv2d", "forward", base + 1, base + 2, step, "device:0"),
                   layer("conv1", "Conv2d", "backward", base + 44, base + 46, step, "device:0")]
    # Warmup layers (step -1) do not count.
    rs.append(layer("conv1", "Conv2d", "forward", -50, -10, -1))
    return timeline_of(*rs)


def test_layer_breakdown_inclusive_self_and_per_step_sums():
    rows = phases.layer_breakdown(layer_timeline())
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["block1", "conv1", "conv2", "fc"]
    b1, c1, c2, fc = (by_name[n] for n in ("block1", "conv1", "conv2", "fc"))
    assert b1["layer_type"] == "Block" and c1["layer_type"] == "Conv2d"
    assert b1["forward_ms"] == pytest.approx(10.0)
    # block1 self forward: 10 - 3 - 4 = 3 in step 0, 10 - 3 - 1 - 4 = 2 in step 1.
    assert b1["self_forward_ms"] == pytest.approx(2.5)
    assert b1["backward_ms"] == pytest.approx(12.0)
    assert b1["self_backward_ms"] == pytest.approx(3.0)        # 12 - 5 - 4
    assert c1["forward_ms"] == pytest.approx(3.5)               # (3 + (3 + 1)) / 2
    assert c1["self_forward_ms"] == pytest.approx(3.5)
    assert c1["calls"] == pytest.approx(1.5)
    assert c1["backward_ms"] == pytest.approx(4.0)
    assert c2["forward_ms"] == pytest.approx(4.0) and c2["calls"] == pytest.approx(1.0)
    assert fc["forward_ms"] == pytest.approx(2.0) and fc["backward_ms"] == pytest.approx(3.0)
    assert "device_forward_ms" not in c1 and "host_forward_ms" not in c1


def test_layer_breakdown_device_numbers_take_precedence():
    rows = {r["name"]: r for r in phases.layer_breakdown(layer_timeline(with_device=True))}
    c1 = rows["conv1"]
    assert c1["device_forward_ms"] == pytest.approx(1.0)
    assert c1["device_backward_ms"] == pytest.approx(2.0)
    assert c1["host_forward_ms"] == pytest.approx(3.5)
    assert c1["host_backward_ms"] == pytest.approx(4.0)
    assert c1["forward_ms"] == pytest.approx(1.0) and c1["backward_ms"] == pytest.approx(2.0)
    assert c1["calls"] == pytest.approx(1.5)       # host forward calls
    assert "device_forward_ms" not in rows["conv2"]
    assert rows["conv2"]["forward_ms"] == pytest.approx(4.0)


def test_layer_breakdown_refuses_missing_direction():
    tl = timeline_of(ms_range("step", "step", 0, 10, step=0),
                     ms_range("conv", "layer", 0, 1, step=0))
    with pytest.raises(ValueError, match="direction"):
        phases.layer_breakdown(tl)


# ----------------------------------------------------------------------------- stats

def test_median_iqr_summarize():
    assert stats.median([3, 1, 2, 10]) == 2.5
    assert stats.iqr([1, 2, 3, 4, 5]) == 2.0
    assert stats.summarize([4.0, 1.0, 3.0]) == {"median_ms": 3.0, "iqr_ms": 1.5, "min_ms": 1.0,
                                                 "max_ms": 4.0, "n": 3}
    with pytest.raises(ValueError, match="non-empty"):
        stats.median([])


def test_interleaved_order_rotates_the_start():
    assert stats.interleaved_order(["A", "B", "C"], 4) == [
        ["A", "B", "C"], ["B", "C", "A"], ["C", "A", "B"], ["A", "B", "C"]]
    assert stats.interleaved_order(["A", "B"], 3) == [["A", "B"], ["B", "A"], ["A", "B"]]
    assert stats.interleaved_order(["A"], 0) == []
    with pytest.raises(ValueError, match="distinct"):
        stats.interleaved_order(["A", "A"], 2)
    with pytest.raises(ValueError, match="rounds"):
        stats.interleaved_order(["A", "B"], -1)


def test_overhead_schedule_pairs_neighbours_and_alternates_who_goes_first():
    assert stats.overhead_schedule(3, 3) == [True, False, False, True, True, False]
    assert stats.overhead_schedule(3, 1) == [True, False, True, True]
    assert stats.overhead_schedule(1, 3) == [True, False, False, False]
    assert stats.overhead_schedule(2, 0) == [True, True]
    assert stats.overhead_schedule(0, 0) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="overhead_schedule: plain: expected an int >= 0"):
            stats.overhead_schedule(2, bad)


def test_bootstrap_detects_a_ten_percent_slowdown():
    rng = np.random.default_rng(42)
    a = 10.0 + rng.normal(0.0, 0.2, 40)
    b = a * 1.10 + rng.normal(0.0, 0.05, 40)
    est, lo, hi = stats.bootstrap_diff_ci(a, b, n_resamples=2000)
    assert lo <= 10.0 <= hi
    assert lo > 0.0
    assert lo <= est <= hi
    assert est == pytest.approx((np.median(b) / np.median(a) - 1) * 100)


def test_bootstrap_unpaired_and_custom_statistic():
    rng = np.random.default_rng(7)
    a = 10.0 + rng.normal(0.0, 0.2, 40)
    b = 9.0 + rng.normal(0.0, 0.2, 31)     # different lengths: resampled independently
    est, lo, hi = stats.bootstrap_diff_ci(a, b, n_resamples=2000)
    assert lo <= -10.0 <= hi and hi < 0.0
    # A statistic without an axis argument takes the slow path and agrees in the estimate.
    est2, lo2, hi2 = stats.bootstrap_diff_ci(a, b, statistic=lambda x: float(np.mean(x)),
                                             n_resamples=300)
    assert est2 == pytest.approx((b.mean() / a.mean() - 1) * 100)
    assert lo2 < -5.0 and hi2 < 0.0


def test_bootstrap_identical_samples_contain_zero():
    rng = np.random.default_rng(3)
    a = 5.0 + rng.exponential(0.5, 30)
    est, lo, hi = stats.bootstrap_diff_ci(a, a.copy(), n_resamples=1000)
    assert est == 0.0 and lo <= 0.0 <= hi


def test_bootstrap_constant_samples_do_not_crash():
    assert stats.bootstrap_diff_ci([5.0] * 10, [5.5] * 10) == pytest.approx((10.0, 10.0, 10.0))
    assert stats.bootstrap_diff_ci([2.0] * 4, [2.0] * 4) == (0.0, 0.0, 0.0)
    # One constant side still gives a finite interval.
    est, lo, hi = stats.bootstrap_diff_ci([4.0] * 8, [4.0, 4.4] * 4, n_resamples=500)
    assert np.isfinite([est, lo, hi]).all() and lo <= est <= hi


def test_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match=">= 2 samples"):
        stats.bootstrap_diff_ci([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="baseline"):
        stats.bootstrap_diff_ci([0.0, 0.0, 0.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_diff_ci([1.0, 2.0], [1.0, 2.0], confidence=95)


def test_describe_diff_wording():
    assert (stats.describe_diff("loss backward", "explicit", "autograd", -3.14, -4.0, -2.2)
            == "loss backward, explicit vs autograd: -3.1% [-4.0, -2.2] faster")
    assert (stats.describe_diff("step", "ours", "torch", 10.0, 8.04, 12.0)
            == "step, ours vs torch: +10.0% [+8.0, +12.0] slower")
    assert (stats.describe_diff("step", "ours", "torch", -0.01, -1.5, 1.2)
            == "step, ours vs torch: +0.0% [-1.5, +1.2] no clear difference")
    # An interval touching 0 does not exclude it.
    assert stats.describe_diff("x", "a", "b", -1.0, -2.0, 0.0).endswith("no clear difference")


# ----------------------------------------------------------------------------- chrome trace

def test_chrome_trace_is_valid_and_nested():
    tl = layer_timeline(with_device=True)
    doc = trace_events.to_chrome_trace(tl, metadata={"framework": "chainer"})
    trace_events.validate_chrome_trace(doc)
    assert doc["displayTimeUnit"] == "ms"
    assert doc["otherData"]["framework"] == "chainer"
    assert doc["otherData"]["time_origin_ns"] == -50 * MS
    names = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"host:main": 1, "device:0": 2}
    xs = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(tl.ranges)
    # Outer before inner at the same start: step, then phase, then block1, then conv1.
    at_zero = [e["name"] for e in xs if e["ts"] == 50_000.0 and e["tid"] == 1]
    assert at_zero == ["step", "forward", "block1", "conv1"]
    conv = next(e for e in xs if e["name"] == "conv1" and e["tid"] == 1
                and e["args"]["step"] == 0)
    assert conv["dur"] == 3000.0 and isinstance(conv["ts"], float)
    assert conv["args"] == {"step": 0, "kind": "layer", "direction": "forward",
                            "layer_type": "Conv2d"}
    json.dumps(doc)   # serializable as is


def _x(name, ts, dur, tid=1):
    return {"name": name, "ph": "X", "ts": ts, "dur": dur, "pid": 1, "tid": tid}


@pytest.mark.parametrize("events, fragment", [
    ([{"name": "a", "ph": "X", "ts": 0.0, "pid": 1, "tid": 1}], "'dur'"),
    ([_x("a", 0.0, -1.0)], "negative"),
    ([{"name": "a", "ph": "Q", "ts": 0.0, "pid": 1, "tid": 1}], "unknown ph"),
    ([{"ph": "X", "ts": 0.0, "dur": 1.0, "pid": 1, "tid": 1}], "'name'"),
    ([_x("a", 0.0, 10.0), _x("b", 5.0, 10.0)], "partially overlap"),
    ([_x("b", 5.0, 1.0), _x("a", 0.0, 10.0)], "out of order"),
    ([_x("inner", 0.0, 5.0), _x("outer", 0.0, 10.0)], "out of order"),
    ([{"name": "thread_name", "ph": "M", "pid": 1, "tid": 1}], "args"),
])
def test_validate_chrome_trace_rejects_broken_docs(events, fragment):
    with pytest.raises(ValueError, match=fragment):
        trace_events.validate_chrome_trace({"traceEvents": events})


def test_validate_chrome_trace_accepts_overlap_on_other_threads_and_rejects_non_docs():
    trace_events.validate_chrome_trace(
        {"traceEvents": [_x("a", 0.0, 10.0, tid=1), _x("b", 5.0, 10.0, tid=2)]})
    with pytest.raises(ValueError, match="traceEvents"):
        trace_events.validate_chrome_trace([_x("a", 0.0, 1.0)])


# ----------------------------------------------------------------------------- flame graphs

def flame_timeline():
    """Two 100 us steps of step > forward > block > conv on the host, and a device conv."""
    rs = []
    for step, base in ((0, 0), (1, 100)):
        rs += [Range("step %d" % step, "step", base * US, (base + 100) * US, step=step),
               Range("forward", "phase", (base + 10) * US, (base + 60) * US, step=step),
               Range("block", "layer", (base + 10) * US, (base + 50) * US, step=step,
                     direction="forward"),
               Range("conv", "layer", (base + 20) * US, (base + 30) * US, step=step,
                     direction="forward")]
    # On the device the conv is all kernel: its own weight is 0 and the line is dropped.
    rs += [Range("conv", "layer", 20 * US, 25 * US, track="device:0", step=0,
                 direction="forward"),
           Range("gemm", "mark", 20 * US, 25 * US, track="device:0", step=0)]
    return timeline_of(*rs)


def test_folded_stacks_self_times():
    assert flamegraph.folded_stacks(flame_timeline()) == sorted([
        "host:main;step 100",                                       # (100 - 50) x 2
        "host:main;step;forward 20",                                # (50 - 40) x 2
        "host:main;step;forward;block (forward) 60",                # (40 - 10) x 2
        "host:main;step;forward;block (forward);conv (forward) 20",  # 10 x 2
        "device:0;conv (forward);gemm 5",
    ])


def test_folded_stacks_round_merged_totals_and_escape_separators():
    tl = timeline_of(Range("a;b", "mark", 0, 600), Range("a;b", "mark", 1000, 1600),
                     Range("tiny", "mark", 2000, 2400))
    # 600 ns twice merge to 1.2 us -> 1; "tiny" (0.4 us) rounds to 0 and is dropped.
    assert flamegraph.folded_stacks(tl) == ["host:main;a:b 1"]


def _check_balanced(profile, n_frames):
    open_frames = []
    last_at = profile["startValue"]
    for ev in profile["events"]:
        assert 0 <= ev["frame"] < n_frames
        assert ev["at"] >= last_at
        last_at = ev["at"]
        if ev["type"] == "O":
            open_frames.append(ev["frame"])
        else:
            assert ev["type"] == "C"
            assert open_frames and open_frames.pop() == ev["frame"]
    assert open_frames == []
    assert last_at == profile["endValue"]


def test_speedscope_structure():
    doc = flamegraph.to_speedscope(flame_timeline(), name="flame")
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    assert doc["name"] == "flame"
    frames = [f["name"] for f in doc["shared"]["frames"]]
    assert len(frames) == len(set(frames))
    assert {"step", "forward", "block (forward)", "conv (forward)", "gemm"} == set(frames)
    assert [p["name"] for p in doc["profiles"]] == ["device:0", "host:main"]
    for p in doc["profiles"]:
        assert p["type"] == "evented" and p["unit"] == "nanoseconds"
        _check_balanced(p, len(frames))
    host = doc["profiles"][1]
    assert (host["startValue"], host["endValue"]) == (0, 200 * US)
    # Touching steps: step 0 closes before step 1 opens at the same instant.
    step = frames.index("step")
    at_100 = [(e["type"], e["frame"]) for e in host["events"] if e["at"] == 100 * US]
    assert at_100 == [("C", step), ("O", step)]
    assert len(host["events"]) == 16
    json.dumps(doc)


# ----------------------------------------------------------------------------- report

def good_report():
    tl = layer_timeline()
    sections = rep.from_phase_breakdown(phases.phase_breakdown(tl))
    return rep.build_report(
        framework="chainer", framework_version="7.8.1", device={"name": "cpu", "kind": "cpu"},
        model="deeppose", mode="eager", batch_size=8, impls={"conv": "ours", "loss": "ours"},
        workers=2,
        seed=0, sync=False, iters=2, warmup=1,
        layers=rep.from_layer_breakdown(phases.layer_breakdown(tl)),
        instrumentation={"instrumented_step_ms_median": 100.0,
                         "uninstrumented_step_ms_median": 98.0, "overhead_pct": 2.04},
        notes=["times are host wall time"], **sections)


def test_good_report_passes_and_round_trips():
    doc = good_report()
    rep.validate_report(doc)
    assert doc["schema_version"] == rep.SCHEMA_VERSION and doc["tool"] == "deepprof"
    assert doc["layers"][0]["type"] == "Block" and "layer_type" not in doc["layers"][0]
    assert doc["step_ms"]["n"] == 2
    rep.validate_report(json.loads(json.dumps(doc)))


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.pop("seed"), "report.seed: missing"),
    (lambda d: d.update(batch_size="8"), "report.batch_size: expected an int"),
    (lambda d: d.update(sync=1), "report.sync: expected a bool"),
    (lambda d: d["device"].update(kind="tpu"), "report.device.kind"),
    (lambda d: d["phases_ms"]["forward"].pop("median"), "report.phases_ms.forward.median"),
    (lambda d: d["layers"][1].update(forward_ms="3"), "report.layers[1].forward_ms"),
    (lambda d: d["phases_ms"]["forward"].update(mean=99.0), "report.phases_ms: the phases"),
    (lambda d: d.update(extra=1), "unknown keys"),
    (lambda d: d.pop("layers"), "report.layers: missing"),
    (lambda d: d["instrumentation"].update(overhead_pct="2%"),
     "report.instrumentation.overhead_pct"),
    (lambda d: d["step_ms"]["samples"].append(float("nan")), "report.step_ms.samples[2]"),
    (lambda d: d.update(threads={"requested": 0, "ignored": []}), "report.threads.requested"),
    (lambda d: d.update(threads={"requested": 2, "ignored": "blas"}),
     "report.threads.ignored"),
    (lambda d: d.update(threads=[2]), "report.threads: expected an object"),
    (lambda d: d.update(mode="jit"), "report.mode: expected one of ['eager', 'graph']"),
    (lambda d: d.pop("mode"), "report.mode: missing"),
    (lambda d: d["phases_ms"].pop("backward"), "report.phases_ms.backward: missing"),
    (lambda d: d.update(phases_absent={"backward": "inside"}),
     "report.phases_ms.backward: present although phases_absent lists it"),
    (lambda d: d.update(phases_absent={"other": "x"}), "report.phases_absent.other"),
    (lambda d: d.update(compilation={"compiles_in_warmup": 1}),
     "report.compilation.compiles_measured: missing"),
])
def test_bad_reports_fail_naming_the_key(mutate, fragment):
    doc = good_report()
    mutate(doc)
    with pytest.raises(ValueError) as err:
        rep.validate_report(doc)
    assert fragment in str(err.value)


def test_a_graph_mode_report_lists_its_absent_phases_instead_of_zeros():
    """A one-call compiled step: its phases are data_wait, h2d, compiled_step and other; the
    others are listed with why, and the phases still add up to the step."""
    doc = good_report()
    phases_ms = doc["phases_ms"]
    inner = ("forward", "loss_forward", "loss_backward", "backward", "optimizer")
    phases_ms["compiled_step"] = {k: sum(phases_ms[p][k] for p in inner)
                                  for k in ("mean", "median", "iqr")}
    for phase in inner:
        del phases_ms[phase]
    doc.update(mode="graph", phases_absent={p: "inside the compiled step" for p in inner},
               compilation={"compiles_in_warmup": 1, "compiles_measured": 0}, layers=[])
    rep.validate_report(doc)
    assert rep.phases_of(doc["phases_ms"]) == ("data_wait", "h2d", "compiled_step", "other")


def test_threads_section_is_optional_and_checked_when_present():
    doc = good_report()
    doc["threads"] = {"requested": 2, "intra_op": 2, "inter_op": 2, "blas": {"libopenblas.so": 2},
                      "openmp": {}, "ours": {"ops._C": 2}, "ignored": []}
    rep.validate_report(doc)


def test_failed_run_report_may_lack_measurements():
    doc = good_report()
    for key in ("step_ms", "phases_ms", "layers", "instrumentation"):
        doc.pop(key)
    doc["errors"] = ["CUDA out of memory in step 3"]
    rep.validate_report(doc)


def test_build_report_refuses_unknown_keys():
    with pytest.raises(ValueError, match="framwork"):
        rep.build_report(framwork="torch")


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    rep.write_json_atomic(path, {"version": 1})
    assert json.loads(path.read_text()) == {"version": 1}

    def half_dump(obj, f, **kw):
        f.write('{"version": ')   # half a document, then the crash
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(json, "dump", half_dump)
    with pytest.raises(RuntimeError, match="disk on fire"):
        rep.write_json_atomic(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 1}
    assert os.listdir(tmp_path) == ["report.json"]

    monkeypatch.undo()
    rep.write_json_atomic(str(path), {"version": 3})
    assert json.loads(path.read_text()) == {"version": 3}
    assert os.listdir(tmp_path) == ["report.json"]


def test_write_json_atomic_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        rep.write_json_atomic(tmp_path / "r.json", {"x": float("nan")})
    assert os.listdir(tmp_path) == []


def test_render_table_single_and_merged():
    console = Console(record=True, width=160)
    doc = good_report()
    rep.render_table(doc, console, top_n=2)
    text = console.export_text()
    for phase in PHASES:
        assert phase in text
    assert "block1" in text and "2 more layer(s) not shown" in text

    console = Console(record=True, width=160)
    other = good_report()
    other["framework"] = "torch"
    failed = {k: v for k, v in good_report().items() if k not in ("step_ms", "phases_ms",
                                                                  "layers", "instrumentation")}
    failed["framework"], failed["errors"] = "mxnet", ["import failed"]
    rep.render_table([doc, other, failed], console)
    text = console.export_text()
    assert "chainer" in text and "torch" in text and "error: import failed" in text
    for phase in PHASES:
        assert phase in text


def test_render_comparison_prints_the_lines():
    console = Console(record=True, width=160)
    line = stats.describe_diff("loss backward", "explicit", "autograd", -3.1, -4.0, -2.2)
    rep.render_comparison([line], console)
    assert line in console.export_text()


# ----------------------------------------------------------------------------- overhead

def test_paired_ratios_cancel_the_load_pairs_share():
    """Steps drifting by +-30% together, the instrumented one of each pair 3% slower: the
    median of the pairs' ratios finds 3% with a narrow interval; the ratio of the medians of
    the same samples (pairs resampled jointly too) is less sure."""
    rng = np.random.default_rng(3)
    plain = 100.0 * np.exp(rng.normal(0.0, 0.3, 60))
    instrumented = plain * 1.03 * np.exp(rng.normal(0.0, 0.005, 60))
    est, low, high = stats.paired_ratio_ci(plain, instrumented, n_resamples=2000)
    assert est == pytest.approx(3.0, abs=0.3) and low <= 3.0 <= high and high - low < 1.0
    _, wide_low, wide_high = stats.bootstrap_diff_ci(plain, instrumented, n_resamples=2000)
    assert wide_high - wide_low > 2 * (high - low)
    summary = stats.overhead_summary(list(instrumented), list(plain), goal_pct=5.0)
    assert summary["overhead_verdict"] == "within the goal"
    assert summary["overhead_pct"] == pytest.approx(est)
    with pytest.raises(ValueError, match="same number"):
        stats.paired_ratio_ci([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="positive"):
        stats.paired_ratio_ci([1.0, 0.0], [1.0, 2.0])


def test_overhead_verdicts_on_known_samples():
    from profiler.analysis.stats import describe_overhead, overhead_summary
    plain = [100.0, 101.0, 99.0, 100.5, 99.5, 100.0]
    # 2% slower, tight: the interval lies below a 5% goal.
    within = overhead_summary([p * 1.02 for p in plain], plain, goal_pct=5.0)
    assert within["overhead_verdict"] == "within the goal"
    assert within["overhead_pct"] == pytest.approx(2.0)
    low, high = within["overhead_ci_pct"]
    assert low - 1e-9 <= 2.0 <= high + 1e-9 and high < 5.0
    # 12% slower, tight: over the goal.
    assert overhead_summary([p * 1.12 for p in plain], plain,
                            goal_pct=5.0)["overhead_verdict"] == "over the goal"
    # Steps varying by +-30%: the interval is wider than the goal, nothing can be said.
    noisy = [70.0, 130.0, 100.0, 72.0, 128.0, 101.0]
    assert overhead_summary(noisy, plain, goal_pct=5.0)["overhead_verdict"] == "not measurable"
    # A wide interval that lies wholly above the goal still says so.
    slow_noisy = [p * f for p, f in zip(plain, (1.10, 1.30, 1.12, 1.28, 1.11, 1.29))]
    wide = overhead_summary(slow_noisy, plain, goal_pct=5.0)
    assert wide["overhead_ci_pct"][1] - wide["overhead_ci_pct"][0] > 5.0
    assert wide["overhead_verdict"] == "over the goal"
    # Straddling the goal with a narrow interval.
    straddle = [p * f for p, f in zip(plain, (1.03, 1.07, 1.05, 1.04, 1.06, 1.05))]
    assert overhead_summary(straddle, plain, goal_pct=5.0)["overhead_verdict"] == "inconclusive"
    none = overhead_summary([1.0], [], goal_pct=3.0)
    assert none["overhead_verdict"] == "not measured" and none["overhead_pct"] is None
    assert "not measured" in describe_overhead(none)
    assert describe_overhead(within).startswith("instrumentation overhead: +2.0% [")
