"""The trace-based MXNet instrument (profiler.instrument.mxnet_trace) on the seed ResNet-20 in
graph mode (hybridized, static_alloc): every layer gets one forward and one backward range per
step, inside the step, in the graph's order, mapped in every step by the same plan (the same
event counts each step); the 1x1 shortcut convolutions land where the plan puts them (they
are the cheap ones); MXNet's clock is aligned within the bound the instrument states; an
imperative network and a bulked one get no layer range, with the reason; remove() leaves
nothing behind. The pieces that need no MXNet run (parsing a dump, the plan) on made-up
input. There is no cross-check against the hook instrument: the trace attributes layers in
graph mode only, where the hook instrument cannot run."""

import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
mt = pytest.importorskip("profiler.instrument.mxnet_trace")

from profiler.recorder import Recorder  # noqa: E402
from profiler.workloads import build_workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
SEED = dict(model="resnet20", batch_size=8)


def _step(workload, batch, instrument, step):
    """One training step as the engine runs it under a trace instrument: installed, the output
    marked, MXNet's engine waited for at each phase boundary (phase_sync), collect_step after
    the step with its window. Returns the window."""
    instrument.install()
    instrument.recorder.start_step(step)
    start = time.perf_counter_ns()
    output = instrument.mark_output(workload.forward(batch))
    workload.synchronize()
    loss = workload.loss_forward(output, batch)
    workload.synchronize()
    workload.backward(loss)
    workload.synchronize()
    workload.optimizer_step()
    workload.synchronize()
    window = (start, time.perf_counter_ns())
    instrument.collect_step(step, window)
    return window


@pytest.fixture(scope="module")
def graph_run():
    """A warm-up step (the graph's probe) and STEPS measured steps of the seed ResNet-20 in
    graph mode, then one window around a lone operator (the clock check); removed at the
    end, so every test reads results."""
    workload = build_workload("mxnet", mode="graph", **SEED)
    recorder = Recorder()
    instrument = mt.TraceInstrument(workload, recorder, mode="graph")
    grads = []
    instrument.on_output_grad = lambda: grads.append(time.perf_counter_ns())
    windows, attributions, mapped_names = {}, {}, {}
    loader = iter(workload.make_loader(epochs=10))
    for step in range(-1, STEPS):
        windows[step] = _step(workload, next(loader), instrument, step)
        attributions[step] = instrument.last_attribution
        mapped_names[step] = [o.name for o in instrument.last_ops
                              if o.name in instrument.plan.mapped_types]
    # A lone operator between two clock readings: its events must convert into them.
    mx.nd.waitall()
    before = time.perf_counter_ns()
    (mx.nd.ones((512, 512)) * 3).wait_to_read()
    after = time.perf_counter_ns()
    instrument.collect_step(99, (before, after))
    lone = (before, after, list(instrument.last_ops), instrument.clock_offset_ns,
            instrument.clock_error_ns, instrument.last_attribution)
    instrument.step_problems.pop(99, None)
    instrument.remove()
    yield dict(workload=workload, recorder=recorder, instrument=instrument, grads=grads,
               windows=windows, attributions=attributions, mapped_names=mapped_names,
               lone=lone)


def _layer_ranges(recorder, step):
    return [r for r in recorder.timeline.ranges
            if r.step == step and r.track == mt.TRACK and r.kind == "layer"]


def test_every_layer_has_one_forward_and_one_backward_range_inside_its_step(graph_run):
    """ResNet-20's layers (convolutions, batch norms, the dense layer) are one operator each
    way: one range per direction, on the trace track, inside the step's window."""
    instrument, recorder = graph_run["instrument"], graph_run["recorder"]
    names = [name for name, _ in graph_run["workload"].named_layers()]
    for step in range(STEPS):
        ranges = _layer_ranges(recorder, step)
        start, end = graph_run["windows"][step]
        assert Counter((r.name, r.direction) for r in ranges) == Counter(
            (n, d) for n in names for d in ("forward", "backward")), step
        for r in ranges:
            assert start <= r.start_ns < r.end_ns <= end, r
            assert r.layer_type == instrument.layer_types[r.name]


def test_every_step_is_mapped_by_the_same_plan(graph_run):
    """The plan expects, per step, one event per convolution and batch norm each way, and an
    ImperativeBulk for each node the static CachedOp runs imperatively (the first
    convolution, which reads the input, and the dense layer, which writes the output, each
    way); every step shows exactly that sequence, and the same counts."""
    instrument = graph_run["instrument"]
    plan = instrument.plan
    assert instrument.step_problems == {}
    assert instrument.steps_attributed == list(range(-1, STEPS))
    types = Counter(type(block).__name__ for _, block in graph_run["workload"].named_layers())
    expected = Counter(plan.expected())
    in_bulks = [op.layer for op in plan.ops if op.name == mt.IMPERATIVE_BULK]
    assert sorted(in_bulks) == ["conv0", "conv0", "fc", "fc"]
    assert expected == {"Convolution": types["Conv2D"] - 1,
                        "_backward_Convolution": types["Conv2D"] - 1,
                        "BatchNorm": types["BatchNorm"], "_backward_BatchNorm": types["BatchNorm"],
                        mt.IMPERATIVE_BULK: 4}
    counts = {step: dict(a.op_counts) for step, a in graph_run["attributions"].items()}
    for step in range(STEPS):
        assert graph_run["mapped_names"][step] == plan.expected()
        assert counts[step] == counts[0]
        assert graph_run["attributions"][step].outside == 0


def test_forward_ranges_follow_the_graph_order_and_end_before_backward(graph_run):
    instrument, recorder = graph_run["instrument"], graph_run["recorder"]
    plan_forward = [op.layer for op in instrument.plan.ops
                    if op.direction == "forward" and op.layer]
    plan_backward = [op.layer for op in instrument.plan.ops
                     if op.direction == "backward" and op.layer]
    for step in range(STEPS):
        ranges = sorted(_layer_ranges(recorder, step), key=lambda r: r.start_ns)
        forward = [r for r in ranges if r.direction == "forward"]
        backward = [r for r in ranges if r.direction == "backward"]
        assert [r.name for r in forward] == plan_forward
        assert [r.name for r in backward] == plan_backward
        assert forward[-1].end_ns <= backward[0].start_ns
        for a, b in zip(ranges, ranges[1:]):       # one engine worker: no two at once
            assert a.end_ns <= b.start_ns


def test_shortcut_convolutions_land_where_the_plan_puts_them(graph_run):
    """Events are mapped to nodes by position: the 1x1 shortcut convolution of a block that
    changes shape does a ninth of the work of the 3x3 convolution beside it, so the range
    the plan calls the shortcut must be the shorter one (median over the steps), forward and
    backward."""
    recorder = graph_run["recorder"]
    durations = {}
    for step in range(STEPS):
        for r in _layer_ranges(recorder, step):
            durations.setdefault((r.name, r.direction), []).append(r.duration_ns)
    for block in ("stage2.block0", "stage3.block0"):
        for direction in ("forward", "backward"):
            shortcut = statistics.median(durations[(f"{block}.shortcut", direction)])
            conv1 = statistics.median(durations[(f"{block}.conv1", direction)])
            assert shortcut < conv1 / 2, (block, direction, shortcut, conv1)


def test_mxnet_clock_is_aligned_within_the_stated_error(graph_run):
    """A lone operator run between two perf_counter_ns readings converts into them, within
    the instrument's clock_error_ns (a few microseconds: the markers' bracket and MXNet's
    whole-microsecond stamps); MXNet's clock here is the system clock."""
    before, after, ops, offset, error, attribution = graph_run["lone"]
    assert 0 < error < 50_000
    ours = [o for o in ops if o.name not in mt.HOUSEKEEPING]
    assert ours, [o.name for o in ops]
    for o in ours:
        assert before - error <= o.start_us * 1000 - offset
        assert o.end_us * 1000 - offset <= after + error
    assert attribution.outside == 0
    system_offset = time.time_ns() - time.perf_counter_ns()
    assert abs(offset - system_offset) < error + 1_000_000   # NTP may slew, not jump


def test_output_gradient_is_reported_once_per_step(graph_run):
    grads, windows = graph_run["grads"], graph_run["windows"]
    steps = sorted(windows)
    assert len(grads) == len(steps)
    for step, at in zip(steps, grads):
        start, end = windows[step]
        assert start < at < end


def test_notes_say_what_the_trace_does_not_attribute(graph_run):
    notes = " ".join(graph_run["instrument"].notes)
    for words in ("op type", "no layer", "Imperative (eager) networks", "clock_error_ns",
                  "output's gradient", "configuration"):
        assert words in notes, words


def test_an_imperative_network_gets_phases_only_with_the_reason(graph_run):
    """Eager: MXNet's events carry no node name and there is no graph: no layer range; the
    step's ops still get phases (forward, backward, optimizer) and the reason is kept."""
    workload = build_workload("mxnet", mode="eager", **SEED)
    recorder = Recorder()
    instrument = mt.TraceInstrument(workload, recorder, mode="eager")
    try:
        for step, batch in zip(range(2), workload.make_loader()):
            _step(workload, batch, instrument, step)
    finally:
        instrument.remove()
    assert set(instrument.step_problems) == {0, 1}
    assert "imperatively" in instrument.step_problems[1]
    assert not [r for r in recorder.timeline.ranges if r.track == mt.TRACK]
    a = instrument.last_attribution
    assert not a.op_counts
    phases = {piece.key[0] for piece in a.pieces}
    assert {"forward", "backward", "optimizer"} <= phases
    assert all(piece.key[1] is None and piece.key[3] is None for piece in a.pieces)


def test_tracing_changes_no_output_or_weight():
    """Two identical graph-mode workloads, one traced (the graph probed after its first step,
    the output marked): outputs and updated weights are bit-identical."""
    plain = build_workload("mxnet", mode="graph", **SEED)
    traced = build_workload("mxnet", mode="graph", **SEED)
    instrument = mt.TraceInstrument(traced, Recorder(), mode="graph")
    outputs = []
    try:
        for step, a, b in zip(range(-1, 2), plain.make_loader(), traced.make_loader()):
            expected = plain.forward(a)
            plain.backward(plain.loss_forward(expected, a))
            plain.optimizer_step()
            # MXNet's profiler records every operator of the process: the other workload's
            # run outside the traced step's window (inside, they would break the mapping).
            plain.synchronize()
            instrument.on_output_grad = lambda: None
            instrument.install()
            start = time.perf_counter_ns()
            output = instrument.mark_output(traced.forward(b))
            traced.backward(traced.loss_forward(output, b))
            traced.optimizer_step()
            traced.synchronize()
            instrument.collect_step(step, (start, time.perf_counter_ns()))
            outputs.append((expected.asnumpy(), output.asnumpy()))
    finally:
        instrument.remove()
    assert instrument.steps_attributed == [-1, 0, 1], instrument.step_problems
    for expected, got in outputs:
        np.testing.assert_array_equal(got, expected)
    weights, traced_weights = plain.export_weights(), traced.export_weights()
    for name in weights:
        np.testing.assert_array_equal(traced_weights[name], weights[name], err_msg=name)


def test_install_and_remove_are_idempotent_and_leave_nothing(graph_run):
    workload = graph_run["workload"]
    assert mt._ACTIVE is None
    assert not workload.net._forward_pre_hooks
    instrument = mt.TraceInstrument(workload, Recorder(), mode="graph")
    instrument.install()
    directory = instrument._session.directory
    instrument.install()
    assert instrument._session.directory == directory and os.path.isdir(directory)
    assert len(workload.net._forward_pre_hooks) == 1
    other = mt.TraceInstrument(workload, Recorder(), mode="graph")
    with pytest.raises(RuntimeError, match="another TraceInstrument"):
        other.install()
    instrument.remove()
    instrument.remove()
    assert not os.path.exists(directory)
    assert mt._ACTIVE is None and not workload.net._forward_pre_hooks
    # Unprofiled, the model still trains and the output is left alone.
    batch = next(iter(workload.make_loader()))
    output = workload.net(batch[0])
    assert instrument.mark_output(output) is output
    assert np.isfinite(workload.train_step(batch))


def test_bulked_backward_gives_regions_and_an_unremoved_instrument_leaves_no_file():
    """MXNET_EXEC_BULK_EXEC_TRAIN=1 (set before MXNet's first operator, in a fresh process):
    steps get phases only, with the reason, and the bulks become regions; a process that
    never calls remove() leaves no trace file (the instrument stops MXNet's profiler at
    exit)."""
    script = (
        "import json, sys, time\n"
        "import profiler.instrument.mxnet_trace as mt\n"
        "from profiler.recorder import Recorder\n"
        "from profiler.workloads import build_workload\n"
        "w = build_workload('mxnet', model='resnet20', batch_size=2, mode='graph')\n"
        "inst = mt.TraceInstrument(w, Recorder(), mode='graph')\n"
        "for step, batch in zip(range(2), w.make_loader()):\n"
        "    inst.install()\n"
        "    start = time.perf_counter_ns()\n"
        "    w.train_step(batch); w.synchronize()\n"
        "    inst.collect_step(step, (start, time.perf_counter_ns()))\n"
        "regions = sorted({p.key[3] for p in inst.last_attribution.pieces if p.key[3]})\n"
        "print(json.dumps({'problems': inst.step_problems, 'regions': regions,\n"
        "                  'dir': inst._session.directory, 'notes': inst.notes}))\n")
    env = dict(os.environ, MXNET_EXEC_BULK_EXEC_TRAIN="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["problems"]) == {"0", "1"}
    assert "MXNET_EXEC_BULK_EXEC_TRAIN=1" in result["problems"]["1"]
    assert "forward bulk 0" in result["regions"] and "backward bulk 0" in result["regions"]
    assert any(n.startswith("WARNING") for n in result["notes"])
    assert not os.path.exists(result["dir"])


# --------------------------------------------------------------------------- no MXNet run

def test_a_later_dump_parses_and_async_copies_are_skipped():
    """MXNet names its devices in its first dump only; a later one starts its event list
    with a comma. Each operator is also written as an async (b/e) event: skipped."""
    later = ('{\n    "traceEvents": [\n,\n\n    {"name": "Convolution", "cat": "operator", '
             '"ph": "B", "ts": 10, "pid": 0, "tid": 7}\n,\n    {"name": "Convolution", '
             '"cat": "operator", "ph": "E", "ts": 25, "pid": 0, "tid": 7}\n,\n    {"name": '
             '"Convolution", "cat": "operator", "ph": "b", "ts": 10, "id": 7, "pid": 99, '
             '"tid": 7}\n,\n    {"name": "deepprof-align-0", "cat": "deepprof,instant_marker", '
             '"ph": "n", "ts": 30, "s": "p", "pid": 98, "tid": 7}\n\n\n    ],\n'
             '    "displayTimeUnit": "ms"\n}\n')
    ops, markers = mt.parse_dump(later)
    assert ops == [mt.TraceOp("Convolution", 10, 25, 7)]
    assert markers == {"deepprof-align-0": 30}


def test_node_names_come_from_the_op_hooks_output_names():
    pushed = [("net_conv0_fwd_output", "Convolution"), ("net_bn_fwd_output", "BatchNorm"),
              ("net_bn_fwd_mean", "BatchNorm"), ("net_bn_fwd_var", "BatchNorm"),
              ("net_relu0_0", "relu"), ("net_conv0_fwd_backward_0", "_backward_Convolution"),
              ("net_conv0_fwd_backward_1", "_backward_Convolution"), ("sum_grad_0", "add_n"),
              ("sum_grad_0", "add_n")]
    assert mt._node_outputs(pushed) == [
        ("net_conv0_fwd", "Convolution"), ("net_bn_fwd", "BatchNorm"), ("net_relu0", "relu"),
        ("net_conv0_fwd_backward", "_backward_Convolution"), ("sum_grad", "add_n"),
        ("sum_grad", "add_n")]


def test_plan_groups_imperative_nodes_into_bulks_layers_or_regions():
    """Consecutive imperative-path nodes make one ImperativeBulk (at most the bulk size): one
    layer's nodes alone are that layer's; several layers' (or with ops of no layer) a region."""
    prefixes = {"net_a_": "a", "net_b_": "b"}
    forward = [("net_a_fwd", "Convolution"), ("net_relu0", "relu"), ("net_b_fwd", "Dense")]
    backward = [("net_b_fwd_backward", "_backward_Dense"), ("net_relu0_backward",
                                                           "_backward_relu"),
                ("net_a_fwd_backward", "_backward_Convolution")]
    plan = mt.build_plan(forward, backward, {"net_a_fwd", "net_b_fwd_backward",
                                             "net_relu0_backward"}, prefixes, (15, 15))
    assert [(o.name, o.layer, o.region) for o in plan.ops] == [
        (mt.IMPERATIVE_BULK, "a", None), ("relu", None, None), ("Dense", "b", None),
        (mt.IMPERATIVE_BULK, None, "backward bulk 0: b .. b"),
        ("_backward_Convolution", "a", None)]
    assert plan.expected() == [mt.IMPERATIVE_BULK, "Dense", mt.IMPERATIVE_BULK,
                               "_backward_Convolution"]
    chunked = mt.build_plan(forward, [], {n for n, _ in forward}, prefixes, (2, 2))
    assert [(o.nodes, o.region) for o in chunked.ops] == [
        (("net_a_fwd", "net_relu0"), "forward bulk 0: a .. a"),
        (("net_b_fwd",), None)]
