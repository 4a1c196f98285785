"""The shared part of the trace-based instruments (profiler.instrument.attribution) and the
cross-check's analysis (profiler.analysis.cross_check), on hand-made events with known answers:
no framework needed."""

import pytest

from profiler.analysis.cross_check import cross_check, fit_host_cost
from profiler.analysis.phases import layer_breakdown, phase_breakdown
from profiler.instrument import attribution
from profiler.instrument.attribution import OpEvent, attribute, layer_match, record_step
from profiler.recorder import Recorder
from profiler.timeline import Range, Timeline


def _ev(start, end, phase="forward", layer=None, direction=None, region=None, name="op"):
    return OpEvent(start, end, name, phase, layer, direction, region)


def test_sequential_ops_keep_their_times_and_gaps_are_nobodys():
    events = [_ev(10, 40, layer="a", direction="forward"),
              _ev(50, 60, layer="b", direction="forward"),
              _ev(60, 90, phase="backward", layer="b", direction="backward")]
    found = attribute(events, (0, 100))
    assert found.busy_ns == 30 + 10 + 30
    assert found.coverage == pytest.approx(0.7)
    assert [(p.start_ns, p.end_ns, p.key[1]) for p in found.pieces] == [
        (10, 40, "a"), (50, 60, "b"), (60, 90, "b")]
    assert found.op_counts == {("a", "forward"): 1, ("b", "forward"): 1, ("b", "backward"): 1}


def test_ops_running_together_share_the_time_and_never_exceed_the_window():
    # Two layers' ops overlap for 20 ns: each gets 10 of those; the busy time is 60, not 80.
    events = [_ev(0, 40, layer="a", direction="forward"),
              _ev(20, 60, layer="b", direction="forward")]
    found = attribute(events, (0, 60))
    per_key = {}
    for p in found.pieces:
        per_key[p.key[1]] = per_key.get(p.key[1], 0) + p.end_ns - p.start_ns
    assert per_key == {"a": 30, "b": 30}
    assert sum(per_key.values()) == found.busy_ns == 60
    # Pieces do not overlap and keep the order work started in.
    ends = [(p.start_ns, p.end_ns) for p in found.pieces]
    assert all(e1[1] <= e2[0] for e1, e2 in zip(ends, ends[1:]))


def test_two_ops_of_one_layer_at_once_count_once():
    events = [_ev(0, 50, layer="a", direction="backward", phase="backward"),
              _ev(10, 30, layer="a", direction="backward", phase="backward")]
    found = attribute(events, (0, 100))
    assert found.busy_ns == 50
    assert found.op_counts[("a", "backward")] == 2


def test_events_are_clipped_to_the_window_and_outsiders_counted():
    events = [_ev(-20, 10, layer="a", direction="forward"), _ev(200, 300),
              _ev(90, 120, layer="b", direction="forward")]
    found = attribute(events, (0, 100))
    assert found.busy_ns == 10 + 10
    assert found.outside == 1 and found.events == 2


def test_record_step_lays_phases_around_layers_and_the_breakdowns_add_up():
    timeline = Timeline()
    rec = Recorder(timeline)
    rec.record("step", "step", 0, 1000, track="host:main", step=0)
    events = [_ev(0, 300, layer="conv", direction="forward"),
              _ev(300, 350, name="pad"),                              # forward, no layer
              _ev(400, 450, phase="loss_forward"),
              _ev(450, 460, phase="loss_backward"),
              _ev(460, 800, phase="backward", layer="conv", direction="backward"),
              _ev(800, 900, phase="optimizer")]
    found = attribute(events, (0, 1000))
    record_step(rec, 0, found, track="trace:x", layer_types={"conv": "Conv2D"}, phases=True)
    phases = phase_breakdown(timeline)
    assert phases["warnings"] == []
    ms = {p: v["mean"] * 1e6 for p, v in phases["phases_ms"].items()}
    assert ms["forward"] == pytest.approx(350)
    assert ms["loss_forward"] == pytest.approx(50)
    assert ms["backward"] == pytest.approx(340)
    assert ms["optimizer"] == pytest.approx(100)
    assert ms["other"] == pytest.approx(1000 - 350 - 50 - 10 - 340 - 100)
    (row,) = layer_breakdown(timeline)
    assert row["name"] == "conv" and row["layer_type"] == "Conv2D"
    assert row["forward_ms"] * 1e6 == pytest.approx(300)
    assert row["backward_ms"] * 1e6 == pytest.approx(340)


def test_a_fused_region_is_a_mark_of_its_own_never_a_layer():
    timeline = Timeline()
    rec = Recorder(timeline)
    found = attribute([_ev(0, 100, region="cpp_fused_add_relu_0")], (0, 100))
    record_step(rec, 0, found, track="trace:x", layer_types={}, phases=False)
    (r,) = timeline.ranges
    assert (r.kind, r.name) == ("mark", "cpp_fused_add_relu_0")
    assert found.op_counts == {("region", "cpp_fused_add_relu_0"): 1}


def test_op_event_checks_its_fields():
    with pytest.raises(ValueError, match="phase: expected one of"):
        OpEvent(0, 1, "x", "data_wait")
    with pytest.raises(ValueError, match="layer and direction come together"):
        OpEvent(0, 1, "x", "forward", "a", None)
    with pytest.raises(ValueError, match="ends .* before it starts"):
        OpEvent(5, 1, "x", None)
    with pytest.raises(ValueError, match="a layer or to a fused region"):
        OpEvent(0, 1, "x", "forward", "a", "forward", "fused")


def test_layer_match_takes_the_deepest_layer_and_keras_uniquifiers():
    names = {"stage1.block0": "stage1.block0", "stage1.block0.conv1": "stage1.block0.conv1",
             "conv_1": "conv_1"}
    assert layer_match(["resnet20_1", "stage1.block0_1", "stage1.block0.conv1_1",
                        "convolution"], names) == "stage1.block0.conv1"
    assert layer_match(["resnet20_1", "stage1.block0_1", "stage1.block0.conv1.pad_1"],
                       names) == "stage1.block0"
    assert layer_match(["net", "conv_1"], names) == "conv_1"        # a name ending in _1
    assert layer_match(["net", "other"], names) is None


# --------------------------------------------------------------------------- the cross-check

def test_fit_host_cost_recovers_a_line():
    rows = [(2, 0.5 + 2 * 0.07), (25, 0.5 + 25 * 0.07), (42, 0.5 + 42 * 0.07)]
    per_call, per_op = fit_host_cost(rows)
    assert per_call == pytest.approx(0.5) and per_op == pytest.approx(0.07)
    assert fit_host_cost([(3, 1.0), (3, 2.0), (3, 3.0)]) == (2.0, 0.0)


def _timelines(shift_ms_of, ops_of, steps=3):
    """A hooks timeline and a trace timeline (layers by name) where each layer's hook time is
    its trace time + 0.4 ms + 0.05 ms per op, except where ``shift_ms_of`` moves it."""
    hooks, trace = Timeline(), Timeline()
    t = 0
    for step in range(steps):
        hooks.add(Range("step", "step", t, t + 10**9, step=step))
        trace.add(Range("step", "step", t, t + 10**9, step=step))
        at = t
        for name, ops in ops_of.items():
            trace_ns = int(2e6 + 1e5 * ops)
            hook_ns = trace_ns + int(4e5 + 5e4 * ops + shift_ms_of.get(name, 0) * 1e6)
            for direction in ("forward", "backward"):
                hooks.add(Range(name, "layer", at, at + hook_ns, step=step,
                                direction=direction, layer_type="Conv2D"))
                trace.add(Range(name, "layer", at, at + trace_ns, track="trace:x", step=step,
                                direction=direction, layer_type="Conv2D"))
                at += hook_ns + 1000
        t += 10**9
    return hooks, trace


def test_the_cross_check_passes_a_consistent_run_and_flags_a_layer_that_holds_more():
    ops_of = {f"l{i}": ops for i, ops in enumerate([2, 3, 25, 42, 2, 3, 25, 42, 4])}
    hooks, trace = _timelines({}, ops_of)
    counts = {(name, d): ops for name, ops in ops_of.items() for d in ("forward", "backward")}
    doc = cross_check(hooks, trace, op_counts=counts)
    assert doc["layers_judged"] == 18 and doc["layers_agreeing"] == 18
    fitted = doc["host_cost"]["forward"]
    assert fitted["per_call_ms"] == pytest.approx(0.4, abs=1e-3)
    assert fitted["per_op_ms"] == pytest.approx(0.05, abs=1e-4)
    # A range that held 1.5 ms of another layer's work is out of line by more than 0.2 ms.
    hooks, trace = _timelines({"l4": 1.5}, ops_of)
    doc = cross_check(hooks, trace, op_counts=counts)
    assert "l4 (forward)" in doc["disagreeing"] and "l4 (backward)" in doc["disagreeing"]
    assert doc["layers_agreeing"] < doc["layers_judged"]


def test_the_cross_check_sums_unnamed_trace_ops_inside_hook_ranges():
    hooks, trace = Timeline(), Timeline()
    hooks.add(Range("step", "step", 0, 10**8, step=0))
    hooks.add(Range("conv", "layer", 0, 3_000_000, step=0, direction="forward",
                    layer_type="Conv2D"))
    hooks.add(Range("bn", "layer", 3_000_000, 6_000_000, step=0, direction="forward",
                    layer_type="BatchNormalization"))
    trace.add(Range("op:Conv2D", "mark", 100_000, 2_100_000, track="trace:x", step=0))
    trace.add(Range("op:Mean", "mark", 3_100_000, 3_600_000, track="trace:x", step=0))
    trace.add(Range("op:Mul", "mark", 3_500_000, 4_000_000, track="trace:x", step=0))
    trace.add(Range("op:Conv2D", "mark", 7_000_000, 8_000_000, track="trace:x", step=0))
    doc = cross_check(hooks, trace)
    rows = {r["layer"]: r for r in doc["rows"]}
    assert rows["conv"]["trace_ms"] == pytest.approx(2.0)
    assert rows["bn"]["trace_ms"] == pytest.approx(0.9)          # overlapping ops once
    assert rows["bn"]["ops"] == 2 and rows["bn"]["op_types"] == ["Mean", "Mul"]
    assert doc["conv_ops_outside_conv_layers_per_step"] == 1     # the one at 7 ms
