"""The MXNet/Gluon instrument (profiler.instrument.mxnet) on its own: it changes nothing the
network computes, remove() leaves nothing behind, layer ranges are engine times that tile the
forward and backward passes in program order, a first layer (input without gradient) gets its
weight-gradient work in its backward range, a backward() that waits for the engine is not held
up, and MXNet's backward bulking is measured. The framework-independent checks (coverage,
phases, NVTX, nesting) are in test_profiler_layerwise.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")
pim = pytest.importorskip("profiler.instrument.mxnet")

from mxnet import autograd, gluon  # noqa: E402

from profiler.analysis.nesting import check_nesting  # noqa: E402
from profiler.recorder import Recorder  # noqa: E402
from profiler.engine import Session  # noqa: E402
from profiler.targets import WorkloadTarget  # noqa: E402
from profiler.timeline import Range, Timeline  # noqa: E402
from profiler.workloads import build_workload  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(batch_size=4, train_size=16, test_size=4)
SLEEP_S = 0.05


def _step(workload, batch, instrument=None):
    """One training step as the driver runs it (the instrument's calls where it makes them).
    Returns the model output as NumPy."""
    output = workload.forward(batch)
    if instrument is not None:
        output = instrument.mark_output(output)
    loss = workload.loss_forward(output, batch)
    workload.backward(loss)
    if instrument is not None:
        instrument.finish_backward()
    workload.optimizer_step()
    workload.synchronize()
    return output.asnumpy()


def _gradients(workload):
    return {name: p.grad().asnumpy() for name, p in workload._tensors.items()
            if p.grad_req != "null"}


@pytest.mark.parametrize("model", ["resnet20", "deeppose"])
def test_instrument_changes_no_output_gradient_or_weight(model):
    """Two identical workloads, one instrumented: outputs, gradients and updated weights are
    bit-identical step after step (the boundaries write nothing; the output marker is a view
    in the forward and a copy of the same gradient in the backward)."""
    plain = build_workload("mxnet", model=model, dropout=0.0, **TINY)
    marked = build_workload("mxnet", model=model, dropout=0.0, **TINY)
    instrument = pim.Instrument(marked, Recorder())
    instrument.install()
    for plain_batch, marked_batch, _ in zip(plain.make_loader(), marked.make_loader(), range(2)):
        np.testing.assert_array_equal(_step(plain, plain_batch),
                                      _step(marked, marked_batch, instrument))
        expected, got = _gradients(plain), _gradients(marked)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    instrument.remove()
    weights, marked_weights = plain.export_weights(), marked.export_weights()
    for name in weights:
        np.testing.assert_array_equal(marked_weights[name], weights[name], err_msg=name)


def test_remove_leaves_no_hook_or_range():
    workload = build_workload("mxnet", model="resnet20", **TINY)
    recorder = Recorder()
    instrument = pim.Instrument(workload, recorder)
    blocks = [block for _, block in workload.named_layers()] + [workload.net]
    instrument.install()
    instrument.install()  # idempotent: one set of hooks
    assert all(len(b._forward_pre_hooks) == 1 for b in blocks[:-1])
    assert all(len(b._forward_hooks) == 1 for b in blocks)
    assert mx.nd.NDArray.backward is not pim._NDARRAY_BACKWARD
    instrument.remove()
    instrument.remove()
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in blocks)
    assert not any("forward" in b.__dict__ or "hybrid_forward" in b.__dict__ for b in blocks)
    assert mx.nd.NDArray.backward is pim._NDARRAY_BACKWARD
    # The model still trains, and nothing reaches the recorder any more.
    batch = next(iter(workload.make_loader()))
    assert np.isfinite(_step(workload, batch, instrument)).all()
    assert recorder.timeline.ranges == []


def test_hybridized_network_is_refused():
    workload = build_workload("mxnet", model="resnet20", **TINY)
    workload.net.hybridize()
    with pytest.raises(ValueError, match="hybridized"):
        pim.Instrument(workload, Recorder()).install()


@pytest.mark.parametrize("bulk", ["0", "1"])
def test_backward_bulking_is_measured(bulk):
    """MXNet fixes bulking at its first operator; the probe finds the mode it is really in."""
    env = dict(os.environ, MXNET_EXEC_BULK_EXEC_TRAIN=bulk)
    done = subprocess.run([sys.executable, "-c", "import profiler.instrument.mxnet as m; "
                           "print(m.backward_is_bulked())"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == str(bulk == "1")


def test_notes_warn_when_backward_bulking_hides_layers(monkeypatch):
    workload = build_workload("mxnet", model="resnet20", **TINY)
    monkeypatch.setattr(pim, "backward_is_bulked", lambda: True)
    assert any(n.startswith("WARNING") for n in pim.Instrument(workload, Recorder()).notes)
    monkeypatch.setattr(pim, "backward_is_bulked", lambda: False)
    assert not any(n.startswith("WARNING") for n in pim.Instrument(workload, Recorder()).notes)


def test_backward_of_the_kernel_conv_impl_is_not_held():
    """With the kernel conv impl, whose backward runs our kernels from Python on MXNet's
    threads, the layer boundaries are still queued when loss.backward() returns, the output
    marker's hold ends then, and every layer gets its backward range, the first last."""
    workload = build_workload("mxnet", model="resnet20", conv_impl="kernel", **TINY)
    session = Session(WorkloadTarget(workload), steps_needed=2)
    began = time.perf_counter()
    session.step()
    assert time.perf_counter() - began < pim.HOLD_TIMEOUT_S
    session.close()
    assert not session.profiler.instrument._hold_dropped
    backward = [r for r in session.profiler.timeline.on_track(pim.ENGINE_TRACK)
                if r.direction == "backward"]
    names = [name for name, _ in workload.named_layers()]
    assert sorted(r.name for r in backward) == sorted(names)
    assert backward[-1].name == names[0]


@pytest.mark.skipif(not __import__("ops.nvtx").nvtx.built(),
                    reason="ops._C built without the NVTX C API")
def test_engine_marks_start_each_layers_nvtx_range_in_the_predicted_order():
    """The C marks on the engine start one NVTX range per layer and direction: forward ranges
    in the order the timeline has them; backward ranges in reverse layer order on the first
    pass, then in the order the timeline observed in the previous pass."""
    from profiler import recorder as recorder_module
    assert recorder_module.NVTX.backend == "c-api"
    workload = build_workload("mxnet", model="resnet20", **TINY)
    session = Session(WorkloadTarget(workload), steps_needed=3)
    names = [name for name, _ in workload.named_layers()]
    names_with_params = [name for name, block in workload.named_layers()
                         if pim._first_trainable(block) is not None]
    for step in range(3):
        session.step()
        started = session.profiler.instrument.engine_nvtx_ranges
        ranges = sorted((r for r in session.profiler.timeline.on_track(pim.ENGINE_TRACK)
                         if r.step == step), key=lambda r: r.start_ns)
        observed = [r.name for r in ranges if r.direction == "backward"]
        assert sorted(r.name for r in ranges if r.direction == "forward") == sorted(names)
        assert [m for m in started if m.endswith("(forward)")] == [
            f"{r.name} (forward)" for r in ranges if r.direction == "forward"]
        nvtx_backward = [m[:-len(" (backward)")] for m in started if m.endswith("(backward)")]
        assert sorted(nvtx_backward) == sorted(names)
        # Independent branches (a block's conv2 and shortcut) may swap from pass to pass.
        assert nvtx_backward == (previous if step > 0 else names_with_params[::-1])
        previous = observed
    session.close()


def test_engine_marks_share_the_recorders_clock():
    """A C mark's time is on time.perf_counter_ns's time line (both CLOCK_MONOTONIC)."""
    from ops import _C
    slot = _C.engine_mark_slot(_C.engine_mark_track(), -1)
    _C.engine_marks_take()
    before = time.perf_counter_ns()
    _C.engine_mark(slot)
    after = time.perf_counter_ns()
    (mark,) = [m for m in _C.engine_marks_take() if m[0] == slot]
    assert before <= mark[1] <= after and mark[2] == -1


_TILE_SCRIPT = """
import json
from profiler.engine import profile
from profiler.targets import WorkloadTarget
from profiler.workloads import build_workload
workload = build_workload("mxnet", model="resnet20", batch_size=4, train_size=16, test_size=4)
called = []
for name, block in workload.named_layers():
    block.register_forward_pre_hook(lambda *_, name=name: called.append(name))
result = profile(WorkloadTarget(workload), warmup=1, steps=2, overhead_steps=1)
print(json.dumps({"errors": result["errors"], "called": called[:len(workload.named_layers())],
                  "ranges": [r.__dict__ for r in result.timeline.ranges]}))
"""


def test_ranges_tile_each_pass_in_order():
    """Forward ranges follow the order the layers were called in, each starting where the
    previous ended; the backward ranges run from the model output's gradient to the first
    layer's weight gradient with no gap, the first layer last. In a fresh process with MXNet's
    backward bulking off (it is read at MXNet's first operator), as the profiler runs it."""
    env = dict(os.environ, MXNET_EXEC_BULK_EXEC_TRAIN="0")
    done = subprocess.run([sys.executable, "-c", _TILE_SCRIPT], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["errors"] == []
    timeline = Timeline([Range(**r) for r in run["ranges"]])
    check_nesting(timeline)
    names = run["called"]
    assert len(set(names)) == len(names) == 41
    engine = [r for r in timeline.on_track(pim.ENGINE_TRACK) if r.step >= 0]
    assert {r.kind for r in engine} == {"layer"}
    for step in (0, 1):
        forward = [r for r in engine if r.step == step and r.direction == "forward"]
        backward = [r for r in engine if r.step == step and r.direction == "backward"]
        assert [r.name for r in forward] == names
        assert sorted(r.name for r in backward) == sorted(names)
        for ranges in (forward, backward):
            assert all(a.end_ns == b.start_ns for a, b in zip(ranges, ranges[1:]))
        assert backward[-1].name == names[0]
        phases = {r.name: r for r in timeline.ranges if r.kind == "phase" and r.step == step}
        # Backward ranges start once the loss backward has ended (the output's gradient) and
        # end inside the backward phase; forward ranges lie inside the forward phase.
        assert phases["loss_backward"].end_ns <= backward[0].start_ns
        assert backward[-1].end_ns <= phases["backward"].end_ns
        assert phases["forward"].start_ns <= forward[0].start_ns
        assert forward[-1].end_ns <= phases["forward"].end_ns


class _SleepOp(mx.operator.CustomOp):
    """Identity whose forward and backward each take SLEEP_S on MXNet's custom-op thread:
    work the engine runs after Python has queued it."""

    def forward(self, is_train, req, in_data, out_data, aux):
        time.sleep(SLEEP_S)
        self.assign(out_data[0], req[0], in_data[0])

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        time.sleep(SLEEP_S)
        self.assign(in_grad[0], req[0], out_grad[0])


@mx.operator.register("deepprof_test_sleep")
class _SleepProp(mx.operator.CustomOpProp):
    def __init__(self):
        super().__init__(need_top_grad=True)

    def infer_shape(self, in_shape):
        return in_shape, [in_shape[0]], []

    def create_operator(self, ctx, shapes, dtypes):
        return _SleepOp()


class _Slow(gluon.HybridBlock):
    """A layer with one parameter whose forward and backward are slow on the engine."""

    def __init__(self):
        super().__init__(prefix="slow_")
        self.scale = self.params.get("scale", shape=(1,), init=mx.init.One())

    def hybrid_forward(self, F, x, scale):
        return F.Custom(F.broadcast_mul(x, scale), op_type="deepprof_test_sleep")


class _Net(gluon.HybridBlock):
    def __init__(self):
        super().__init__(prefix="net_")
        with self.name_scope():
            self.slow = _Slow()
            self.fc = gluon.nn.Dense(2, in_units=3)

    def hybrid_forward(self, F, x):
        return self.fc(self.slow(x))


class _TinyWorkload:
    """What the instrument uses of a workload: the network, its layers, its context."""
    framework = "mxnet"

    def __init__(self):
        self.net = _Net()
        self.net.initialize(ctx=mx.cpu())
        self.ctx = mx.cpu()

    def named_layers(self):
        return [("slow", self.net.slow), ("fc", self.net.fc)]


def test_first_layer_ranges_are_engine_time_and_cover_its_weight_gradient():
    """The first layer (its input needs no gradient) is slow on the engine only: its forward
    range holds its forward although Python queued it in far less, and its backward range
    holds its backward, up to its weight gradient."""
    workload = _TinyWorkload()
    net = workload.net
    recorder = Recorder()
    instrument = pim.Instrument(workload, recorder)
    outputs_seen = []
    instrument.on_output_grad = lambda: outputs_seen.append(recorder.now_ns())
    instrument.install()
    recorder.start_step(0)
    x = mx.nd.ones((4, 3))
    with autograd.record():
        queued = time.perf_counter()
        y = net(x)
        queued = time.perf_counter() - queued
        loss = instrument.mark_output(y).sum()
    loss.backward()
    instrument.finish_backward()
    instrument.remove()
    ranges = {(r.name, r.direction): r for r in recorder.timeline.ranges}
    assert set(ranges) == {("slow", "forward"), ("fc", "forward"), ("slow", "backward"),
                           ("fc", "backward")}
    assert all(r.track == pim.ENGINE_TRACK and r.kind == "layer" for r in ranges.values())
    assert ranges["slow", "forward"].duration_ns >= 0.9 * SLEEP_S * 1e9 > queued * 1e9
    assert ranges["slow", "backward"].duration_ns >= 0.9 * SLEEP_S * 1e9
    assert ranges["slow", "backward"].layer_type == "_Slow"
    assert len(outputs_seen) == 1
    assert outputs_seen[0] <= ranges["fc", "backward"].start_ns
    assert ranges["fc", "backward"].end_ns == ranges["slow", "backward"].start_ns
    np.testing.assert_allclose(net.slow.scale.grad().asnumpy(),
                               [4 * net.fc.weight.data().sum().asscalar()], rtol=1e-5)
