"""TensorFlow's trace-based instrument (profiler.instrument.tensorflow_trace): the graph-mode
step's layers and phases from TensorFlow's own XSpace, through the engine as users run it, and
the eager cross-check against the hook-based instrument on the same steps."""

import pytest

tf = pytest.importorskip("tensorflow")

from profiler import instrument as instruments  # noqa: E402
from profiler.engine import profile  # noqa: E402
from profiler.targets import WorkloadTarget  # noqa: E402
from profiler.workloads import spec  # noqa: E402

trace = pytest.importorskip("profiler.instrument.tensorflow_trace")

SMALL = dict(model="resnet20", batch_size=8, train_size=64, test_size=8)


@pytest.fixture(scope="module")
def graph_report():
    target = WorkloadTarget.build("tensorflow", mode="graph", **SMALL)
    target.instrument = instruments.choose("tensorflow", "graph")
    return profile(target, steps=3, warmup=2, overhead_steps=3).doc


def test_auto_picks_the_trace_in_graph_mode_and_the_hooks_in_eager():
    assert instruments.choose("tensorflow", "graph") == "trace"
    assert instruments.choose("tensorflow", "eager") == "hooks"
    assert instruments.choose("chainer", "eager") == "hooks"
    with pytest.raises(ValueError, match="no trace-based instrument for chainer"):
        instruments.load_trace("chainer")


def test_graph_mode_times_every_layer_with_parameters_forward_and_backward(graph_report):
    doc = graph_report
    assert doc["errors"] == []
    assert doc["instrument_kind"] == "trace" and doc["mode"] == "graph"
    from profiler.workloads import build_workload
    names = [name for name, _ in build_workload("tensorflow", **SMALL).named_layers()]
    rows = {row["name"]: row for row in doc["layers"]}
    assert list(rows) == names                  # forward order, every layer, conv0 included
    for name, row in rows.items():
        assert row["forward_ms"] > 0 and row["backward_ms"] > 0, name
        assert row["calls"] >= 1, name          # forward ops per step
    # A convolution's backward (two kernels) outweighs its forward (one) in every step.
    convs = [r for n, r in rows.items() if r["type"] == "Conv2D"]
    assert sum(r["backward_ms"] for r in convs) > sum(r["forward_ms"] for r in convs)


def test_graph_mode_phases_come_from_the_trace_and_add_up_to_the_step(graph_report):
    doc = graph_report
    phases = doc["phases_ms"]
    assert "compiled_step" not in phases          # replaced by the trace's phases
    for phase in ("forward", "backward", "optimizer", "loss_forward", "loss_backward"):
        assert phases[phase]["mean"] > 0, phase
    total = sum(v["mean"] for v in phases.values())
    assert total == pytest.approx(doc["step_ms"]["mean"], rel=1e-6)
    # The ops cover most of the compiled call: what is left ("other") is the executor between
    # ops and the call's own overhead, a few percent on this model.
    coverage = doc["trace"]["coverage_of_step"]
    assert len(coverage) == 3 and all(0.5 < c <= 1.0 for c in coverage)
    assert phases["other"]["mean"] < 0.5 * doc["step_ms"]["mean"]
    layers_fwd = sum(r["forward_ms"] for r in doc["layers"])
    layers_bwd = sum(r["backward_ms"] for r in doc["layers"])
    assert layers_fwd <= phases["forward"]["mean"] * (1 + 1e-9)
    assert layers_bwd <= phases["backward"]["mean"] * (1 + 1e-9)


def test_classify_reads_scopes_gradients_loss_and_optimizer():
    names = {"stage1.block0.conv1": "stage1.block0.conv1", "fc": "fc"}
    c = trace.classify("resnet20_1/stage1.block0_1/stage1.block0.conv1_1/convolution:"
                       "_MklNativeConv2D", names)
    assert (c.phase, c.layer, c.direction) == ("forward", "stage1.block0.conv1", "forward")
    c = trace.classify("gradient_tape/resnet20_1/stage1.block0_1/stage1.block0.conv1_1/"
                       "convolution/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter", names)
    assert (c.phase, c.layer, c.direction) == ("backward", "stage1.block0.conv1", "backward")
    loss, optimizer = spec.STEP_SCOPES["loss"], spec.STEP_SCOPES["optimizer"]
    assert trace.classify(f"{loss}/sparse_categorical_crossentropy/Sum:Sum", names).phase \
        == "loss_forward"
    assert trace.classify(f"gradient_tape/{loss}/x/mul:Mul", names).phase == "loss_backward"
    assert trace.classify(f"{optimizer}/sgd/Mul_3:Mul", names).phase == "optimizer"
    c = trace.classify("AddN_12:AddN", names)
    assert (c.phase, c.layer) == ("backward", None)
    c = trace.classify("resnet20_1/stage1.block0_1/stage1.block0.conv1.pad_1/Pad:Pad", names,
                       "resnet20")
    assert (c.phase, c.layer) == ("forward", None)
    # A user's own step: its optimizer's ops are outside the model's scope, of no phase.
    assert trace.classify("SGD/Mul_3:Mul", names, "resnet20").phase is None
    assert trace.classify("gradient_tape/resnet20_1/add/AddN:AddN", names,
                          "resnet20").phase == "backward"


def test_eager_trace_refuses_to_time_layers_and_says_why():
    target = WorkloadTarget.build("tensorflow", mode="eager", **SMALL)
    target.instrument = "trace"
    with pytest.raises(ValueError, match="does not tell layers apart in eager mode"):
        profile(target, steps=1, warmup=0, overhead_steps=0)


def test_eager_cross_check_agrees_with_the_hooks():
    """The hooks and TensorFlow's own op events on the same eager steps (TensorFlow names
    eager ops by type only, so its ops are summed inside the hooks' ranges: the check is of
    the ranges' timing and content). Every convolution kernel lies in a convolution layer's
    range; the host time the hooks hold beyond the ops is a per-call plus per-op cost, the
    same for every layer within max(0.2 ms, 10% of hook, 25% of the fit)
    (profiler.analysis.cross_check) in at least 90% of the layer directions over 1 ms: a range
    that missed its layer's ops or held another's would fall out of line."""
    target = WorkloadTarget.build("tensorflow", mode="eager", **{**SMALL, "batch_size": 16})
    target.cross_check = True
    doc = profile(target, steps=8, warmup=2, overhead_steps=0).doc
    assert doc["errors"] == []
    check = doc["cross_check"]
    assert check["mechanism"] == "trace ops inside the hooks' layer ranges"
    assert check["conv_ops_outside_conv_layers_per_step"] == 0
    rows = {(r["layer"], r["direction"]): r for r in check["rows"]}
    conv = rows[("stage1.block0.conv1", "backward")]
    assert {"Conv2DBackpropInput", "Conv2DBackpropFilter"} <= set(conv["op_types"])
    assert "Conv2D" in rows[("stage1.block0.conv1", "forward")]["op_types"]
    assert all(r["trace_ms"] <= r["hook_ms"] * (1 + 1e-9) for r in check["rows"])
    for direction, cost in check["host_cost"].items():
        assert 0 <= cost["per_op_ms"] < 1.0, (direction, cost)
    assert check["layers_judged"] >= 20
    assert check["layers_agreeing"] >= 0.9 * check["layers_judged"], check["disagreeing"]
