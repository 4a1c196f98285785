"""profiler.api on a user's own Gluon model and loop: docs/your-own-model.md's example as
written, phases split at the right boundaries (MXNet's backward calls and the Trainer's step,
with the engine drained at each), the layer table against the step, and bad input.

MXNet's backward bulking is off for this session (tests/conftest.py), as the profiler wants."""

from __future__ import annotations

import ctypes
import json
import os
import time

import numpy as np
import pytest
import threadpoolctl

mx = pytest.importorskip("mxnet")

from mxnet import autograd, gluon  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

import profiler.instrument.mxnet as instrument_mxnet  # noqa: E402
from profiler.api import LayerProfiler, profile_training  # noqa: E402
from profiler.report import validate_report  # noqa: E402
from tests.user_model_checks import check_layers_nest_in_phases, profile_factory_cli  # noqa: E402

ORIGINAL = (mx.nd.NDArray.backward, autograd.backward, gluon.Trainer.step, gluon.Trainer.update)


class TinyNet(gluon.HybridBlock):
    """Not a seed workload: conv -> batch norm -> a HybridSequential head (which has no
    parameters of its own, so its Dense is the layer, named "head.0")."""

    def __init__(self, forward_sleep_s: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.forward_sleep_s = forward_sleep_s
        with self.name_scope():
            self.conv = nn.Conv2D(8, 3, padding=1, in_channels=3)
            self.bn = nn.BatchNorm(in_channels=8)
            self.head = nn.HybridSequential()
            self.head.add(nn.Dense(10, in_units=8 * 8 * 8))

    def hybrid_forward(self, F, x):
        if self.forward_sleep_s:
            time.sleep(self.forward_sleep_s)
        return self.head(F.relu(self.bn(self.conv(x))))


def tiny_net(**kwargs) -> TinyNet:
    net = TinyNet(**kwargs)
    net.initialize(mx.init.Xavier(), ctx=mx.cpu())
    return net


def batches(n=4, batch=4):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, 3, 8, 8), dtype=np.float32),
             rng.integers(0, 10, batch).astype(np.float32)) for _ in range(n)]


def sgd(net, trainer=gluon.Trainer) -> gluon.Trainer:
    return trainer(net.collect_params(), "sgd", {"learning_rate": 0.01})


def hooks_removed() -> bool:
    return ((mx.nd.NDArray.backward, autograd.backward, gluon.Trainer.step,
             gluon.Trainer.update) == ORIGINAL and SleepyTrainer.step is SLEEPY_STEP)


def test_readme_example_runs_as_written(tmp_path):
    model = tiny_net()
    trainer = gluon.Trainer(model.collect_params(), "sgd",
                            {"learning_rate": 0.01, "momentum": 0.9})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    ctx = mx.cpu()
    prof = LayerProfiler(model, framework="mxnet", warmup=1)
    for x, t in batches(5):
        with prof.step():
            with prof.phase("data"):
                x, t = mx.nd.array(x, ctx=ctx), mx.nd.array(t, ctx=ctx)
            with autograd.record():
                out = prof.mark_output(model(x))
                loss = loss_fn(out, t)
            loss.backward()
            trainer.step(x.shape[0])
    written = prof.report().save(tmp_path / "mine")
    report = json.loads(written["report"].read_text())
    validate_report(report)
    assert report["framework"] == "mxnet" and report["model"] == "TinyNet"
    assert report["iters"] == 4 and report["warmup"] == 1 and report["batch_size"] == 4
    assert [layer["name"] for layer in report["layers"]] == ["conv", "bn", "head.0"]
    check_layers_nest_in_phases(report)
    phases = report["phases_ms"]
    for phase in ("data_wait", "forward", "loss_forward", "loss_backward", "backward",
                  "optimizer"):
        assert phases[phase]["mean"] > 0, phase
    assert not any("WARNING" in note for note in report["notes"])   # bulking is off
    for name in ("trace", "folded", "speedscope"):
        assert written[name].stat().st_size > 0
    prof.close()
    assert hooks_removed()


class SleepyMSE(autograd.Function):
    """A mean squared error whose forward and backward each sleep a known time (the backward
    on MXNet's custom-function thread, before the model output's gradient exists)."""

    def forward(self, out, target):
        time.sleep(SLEEP["loss_forward"])
        self.save_for_backward(out, target)
        diff = out - target
        return (diff * diff).mean()

    def backward(self, grad):
        time.sleep(SLEEP["loss_backward"])
        out, target = self.saved_tensors
        return grad * 2 * (out - target) / out.size, mx.nd.zeros_like(target)


class SleepyTrainer(gluon.Trainer):
    """A Trainer subclass with a step of its own: its work is the optimizer's too."""

    def step(self, batch_size, ignore_stale_grad=False):
        time.sleep(SLEEP["optimizer"])
        return super().step(batch_size, ignore_stale_grad)


SLEEPY_STEP = SleepyTrainer.step
SLEEP = {"forward": 0.4, "loss_forward": 0.1, "loss_backward": 0.2, "optimizer": 0.05}


@pytest.fixture
def one_thread():
    """On a loaded machine every OpenMP region of the tiny model's operators may wait for a
    second core; one thread keeps the compute around the sleeps at a few milliseconds (as
    test_api_torch's fixture does for PyTorch). MXNet keeps its own OpenMP count
    (MXSetNumOMPThreads, no getter): restored to its default, OMP_NUM_THREADS or the CPUs."""
    setter = mx.base._LIB.MXSetNumOMPThreads
    mx.base.check_call(setter(ctypes.c_int(1)))
    try:
        with threadpoolctl.threadpool_limits(limits=1):
            yield
    finally:
        default = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        mx.base.check_call(setter(ctypes.c_int(default)))


def test_phases_split_at_the_boundaries(one_thread):
    # Each phase holds one sleep of a distinct length: a phase that took a neighbour's sleep
    # (a boundary in the wrong place, or an engine not drained at one) would be at least 50 ms
    # off; the compute around the sleeps takes a few milliseconds, so 45 ms leaves room for a
    # loaded machine.
    model = tiny_net(forward_sleep_s=SLEEP["forward"])
    trainer = sgd(model, SleepyTrainer)
    prof = LayerProfiler(model, framework="mxnet", warmup=1)
    for x, _ in batches(4):
        with prof.step():
            x = mx.nd.array(x)
            with autograd.record():
                out = prof.mark_output(model(x))
                loss = SleepyMSE()(out, mx.nd.zeros_like(out))
            loss.backward()
            trainer.step(1)
    prof.close()
    report = prof.report()
    validate_report(report.doc)
    phases = report["phases_ms"]
    for phase, sleep_s in SLEEP.items():
        got_ms = phases[phase]["median"]
        assert sleep_s * 1e3 <= got_ms < sleep_s * 1e3 + 45.0, (phase, got_ms)
    check_layers_nest_in_phases(report.doc)


def test_autograd_backward_is_a_boundary_too(one_thread):
    # mx.autograd.backward does not go through NDArray.backward: wrapped on its own, once. A
    # second PhaseEvents, installed first and removed first, hears the same calls, and MXNet's
    # own functions are back afterwards.
    model = tiny_net()
    trainer = sgd(model)
    seen = []
    events = instrument_mxnet.PhaseEvents(seen.append)
    prof = LayerProfiler(model, framework="mxnet", warmup=1)
    events.install()
    try:
        for x, t in batches(3):
            with prof.step():
                x, t = mx.nd.array(x), mx.nd.array(t)
                with autograd.record():
                    loss = gluon.loss.L2Loss()(prof.mark_output(model(x)), mx.nd.zeros((4, 10)))
                autograd.backward([loss])
                trainer.step(4)
    finally:
        events.remove()
        prof.close()
    assert seen == ["backward_start", "backward_end", "optimizer_start", "optimizer_end"] * 3
    report = prof.report()
    validate_report(report.doc)
    assert report["phases_ms"]["loss_backward"]["mean"] > 0
    check_layers_nest_in_phases(report.doc)
    assert hooks_removed()


def test_profile_training_measures_overhead_and_keeps_a_failed_run():
    model = tiny_net()
    trainer = sgd(model)
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    report = profile_training(model, batches(3), loss_fn, trainer, framework="mxnet", steps=4,
                              warmup=1, overhead_steps=4)
    assert report["iters"] == 4 and report["errors"] == []
    assert len(report["instrumentation"]["uninstrumented_step_ms"]) == 4
    assert report["instrumentation"]["overhead_pct"] is not None
    check_layers_nest_in_phases(report.doc)
    assert report["phases_ms"]["h2d"]["mean"] > 0

    calls = []

    def failing_loss(out, t):
        calls.append(1)
        if len(calls) == 5:
            raise FloatingPointError("loss became nan")
        return loss_fn(out, t)

    report = profile_training(model, batches(3), failing_loss, trainer, framework="mxnet",
                              steps=6, warmup=1)
    assert report["iters"] >= 1
    assert any("FloatingPointError: loss became nan" in e for e in report["errors"])
    assert hooks_removed()
    assert not autograd.is_recording()   # the failed step's record scope was closed


def test_profile_training_in_graph_mode_hybridizes_the_block():
    """mode="graph", instrument="hooks": the block runs hybridized (static_alloc,
    static_shape); no layer hook is installed (the instrument refuses hybridized blocks), the
    step's calls remain phases, the loss backward is listed as absent (no marker on the
    output without the instrument)."""
    model = tiny_net()
    report = profile_training(model, batches(3), gluon.loss.SoftmaxCrossEntropyLoss(),
                              sgd(model), framework="mxnet", steps=2, warmup=1,
                              overhead_steps=1, mode="graph", instrument="hooks")
    validate_report(report.doc)
    assert model._active and report["mode"] == "graph" and report["errors"] == []
    assert report["layers"] == [] and set(report["phases_absent"]) == {"loss_backward"}
    for phase in ("forward", "loss_forward", "backward", "optimizer"):
        assert report["phases_ms"][phase]["mean"] > 0, phase
    assert hooks_removed()


def test_profile_training_in_graph_mode_times_layers_from_the_trace():
    """mode="graph" (instrument "auto": MXNet's trace): the hybridized block's layers get
    forward and backward times from MXNet's operator events mapped to the cached graph's
    nodes, in every measured step."""
    model = tiny_net()
    report = profile_training(model, batches(3), gluon.loss.SoftmaxCrossEntropyLoss(),
                              sgd(model), framework="mxnet", steps=2, warmup=1,
                              overhead_steps=1, mode="graph")
    validate_report(report.doc)
    assert model._active and report["errors"] == [] and report["instrument_kind"] == "trace"
    assert report["trace"]["steps_with_layers"] == [0, 1], report["trace"]
    assert {row["name"] for row in report["layers"]} == {"conv", "bn", "head.0"}
    assert all(row["forward_ms"] > 0 and row["backward_ms"] > 0 for row in report["layers"])
    for phase in ("forward", "loss_forward", "backward", "optimizer"):
        assert report["phases_ms"][phase]["mean"] > 0, phase
    assert hooks_removed()


def test_layer_filter_by_names_and_callable():
    model = tiny_net()
    prof = LayerProfiler(model, framework="mxnet", layers=["conv", "head.0"])
    assert [n for n, _ in prof.target.named_layers()] == ["conv", "head.0"]
    prof = LayerProfiler(model, framework="mxnet",
                         layers=lambda name, block: isinstance(block, nn.Conv2D))
    assert [n for n, _ in prof.target.named_layers()] == ["conv"]
    with pytest.raises(ValueError, match=r"layers: no layer .* \['conv', 'bn', 'head.0'\]"):
        LayerProfiler(model, framework="mxnet", layers=lambda name, block: False)
    with pytest.raises(ValueError, match=r"layers: \['nope'\] not in the TinyNet"):
        LayerProfiler(model, framework="mxnet", layers=["conv", "nope"])


def test_bad_input_is_one_clear_error_each():
    with pytest.raises(TypeError, match="model: expected a mxnet.gluon.Block .* got "
                                        "builtins.dict"):
        LayerProfiler({}, framework="mxnet")
    with pytest.raises(ValueError, match="model: expected a model whose parameters are "
                                         "initialized"):
        LayerProfiler(TinyNet(), framework="mxnet")
    hybrid = tiny_net()
    hybrid.hybridize()
    with pytest.raises(ValueError, match=r"model: expected an imperative .*"
                                         r"hybridize\(active=False\)"):
        LayerProfiler(hybrid, framework="mxnet")
    model = tiny_net()
    prof = LayerProfiler(model, framework="mxnet", warmup=0)
    with pytest.raises(RuntimeError, match="no measured step yet"):
        prof.report()
    x, t = (mx.nd.array(a) for a in batches(1)[0])
    with pytest.raises(RuntimeError, match="steps do not nest"):
        with prof.step():
            with prof.step():
                pass
    with pytest.raises(RuntimeError, match="without mark_output"):
        with prof.step():
            with autograd.record():
                loss = model(x).sum()
            loss.backward()
    with pytest.raises(RuntimeError, match="outside a step"):
        prof.mark_output(model(x))
    prof.close()
    trainer, loss_fn = sgd(model), gluon.loss.SoftmaxCrossEntropyLoss()
    with pytest.raises(ValueError, match="loader: expected an iterable that yields batches"):
        profile_training(model, [], loss_fn, trainer, framework="mxnet", steps=2)
    with pytest.raises(TypeError, match="optimizer: expected a mxnet.gluon.Trainer"):
        profile_training(model, batches(1), loss_fn, "sgd", framework="mxnet", steps=2)
    with pytest.raises(ValueError, match="optimizer: expected a gluon.Trainer over the "
                                         "model's parameters"):
        profile_training(model, batches(1), loss_fn, sgd(tiny_net()), framework="mxnet",
                         steps=2)
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        profile_training(model, batches(1), "mse", trainer, framework="mxnet", steps=2)
    with pytest.raises(TypeError, match="loss_fn: expected it to return an NDArray"):
        profile_training(model, batches(1), lambda out, t: 0.5, trainer, framework="mxnet",
                         steps=2)
    with pytest.raises(ValueError, match=r"loader: expected batches \(inputs, targets\)"):
        profile_training(model, [x], loss_fn, trainer, framework="mxnet", steps=2)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda"):
        profile_training(model, batches(1), loss_fn, trainer, framework="mxnet", steps=2,
                         device="tpu")
    with pytest.raises(ValueError, match=r"device: gpu\(0\) is not the model's context"):
        profile_training(model, batches(1), loss_fn, trainer, framework="mxnet", steps=2,
                         device="cuda")
    assert hooks_removed()


# ----------------------------------------------------------------------------- the CLI

FACTORY = "tests/user_models/mxnet_cnn.py"


def test_cli_profiles_a_factory_from_a_file(tmp_path):
    report = profile_factory_cli("mxnet", f"{FACTORY}:factory", tmp_path)
    assert report["model"] == "SmallCNN" and report["batch_size"] == 32
    assert [layer["name"] for layer in report["layers"]] == ["features.0", "features.3",
                                                             "classifier"]
    check_layers_nest_in_phases(report)
    assert not any("WARNING" in note for note in report["notes"])   # bulking is off
