"""profiler.api on a user's own Chainer model and loop: docs/your-own-model.md's example as
written, phases split at the right boundaries (Chainer's backward calls and optimizer hooks),
the layer table against the step, and bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import threadpoolctl

from ops.chainer.loader import load_chainer
from profiler.api import LayerProfiler, profile_training
from profiler.report import validate_report
from tests.user_model_checks import check_layers_nest_in_phases, profile_factory_cli

chainer = load_chainer()
F, L = chainer.functions, chainer.links

ORIGINAL_BACKWARD = chainer.Variable.backward
ORIGINAL_CALL_HOOKS = chainer.Optimizer.call_hooks


class TinyNet(chainer.Chain):
    """Not a seed workload: conv -> batch norm -> a ChainList head (which has no parameters of
    its own, so its Linear is the layer, named "head.0")."""

    def __init__(self, forward_sleep_s: float = 0.0):
        super().__init__()
        self.forward_sleep_s = forward_sleep_s
        with self.init_scope():
            self.conv = L.Convolution2D(3, 8, 3, pad=1)
            self.bn = L.BatchNormalization(8)
            self.head = chainer.ChainList(L.Linear(8 * 8 * 8, 10))

    def forward(self, x):
        if self.forward_sleep_s:
            time.sleep(self.forward_sleep_s)
        return self.head[0](F.relu(self.bn(self.conv(x))))


def batches(n=4, batch=4):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((batch, 3, 8, 8), dtype=np.float32),
             rng.integers(0, 10, batch).astype(np.int32)) for _ in range(n)]


def sgd(model, lr=0.01):
    opt = chainer.optimizers.MomentumSGD(lr=lr)
    opt.setup(model)
    return opt


def hooks_removed() -> bool:
    return (chainer.Variable.backward is ORIGINAL_BACKWARD
            and chainer.Optimizer.call_hooks is ORIGINAL_CALL_HOOKS)


def test_readme_example_runs_as_written(tmp_path):
    model = TinyNet()
    opt = chainer.optimizers.MomentumSGD(lr=0.01)
    opt.setup(model)
    loss_fn = F.softmax_cross_entropy
    device = model.device
    prof = LayerProfiler(model, framework="chainer", warmup=1)
    for x, t in batches(5):
        with prof.step():
            with prof.phase("data"):
                x, t = device.send(x), device.send(t)
            out = prof.mark_output(model(x))
            loss = loss_fn(out, t)
            model.cleargrads()
            loss.backward()
            opt.update()
    written = prof.report().save(tmp_path / "mine")
    report = json.loads(written["report"].read_text())
    validate_report(report)
    assert report["framework"] == "chainer" and report["model"] == "TinyNet"
    assert report["iters"] == 4 and report["warmup"] == 1 and report["batch_size"] == 4
    assert [layer["name"] for layer in report["layers"]] == ["conv", "bn", "head.0"]
    check_layers_nest_in_phases(report)
    phases = report["phases_ms"]
    for phase in ("data_wait", "forward", "loss_forward", "loss_backward", "backward",
                  "optimizer"):
        assert phases[phase]["mean"] > 0, phase
    for name in ("trace", "folded", "speedscope"):
        assert written[name].stat().st_size > 0
    prof.close()
    assert hooks_removed()


class SleepyMSE(chainer.FunctionNode):
    """A mean squared error whose forward and backward each sleep a known time."""

    def forward(self, inputs):
        time.sleep(SLEEP["loss_forward"])
        out, target = inputs
        self.retain_inputs((0, 1))
        diff = out - target
        return np.asarray((diff * diff).mean(), dtype=out.dtype),

    def backward(self, indexes, grad_outputs):
        time.sleep(SLEEP["loss_backward"])
        out, target = self.get_retained_inputs()
        grad = F.broadcast_to(grad_outputs[0], out.shape)
        return grad * 2 * (out - target) / out.size, None


def sleepy_hook(optimizer):
    """An optimizer 'pre' hook (as WeightDecay is): part of the optimizer phase."""
    time.sleep(SLEEP["optimizer"])


sleepy_hook.name, sleepy_hook.timing = "sleepy", "pre"

SLEEP = {"forward": 0.4, "loss_forward": 0.1, "loss_backward": 0.2, "optimizer": 0.05}


@pytest.fixture
def one_thread():
    """On a loaded machine every BLAS call of the tiny model (Chainer's convolutions and
    linear layers are NumPy GEMMs) may wait for a second core; one thread keeps the compute
    around the sleeps at a few milliseconds (as test_api_torch's fixture does for PyTorch)."""
    with threadpoolctl.threadpool_limits(limits=1):
        yield


def test_phases_split_at_the_boundaries(one_thread):
    # Each phase holds one sleep of a distinct length: a phase that took a neighbour's sleep
    # (a boundary in the wrong place) would be at least 50 ms off; the compute around the
    # sleeps takes a few milliseconds, so 45 ms leaves room for a loaded machine.
    model = TinyNet(forward_sleep_s=SLEEP["forward"])
    opt = sgd(model)
    opt.add_hook(sleepy_hook)
    prof = LayerProfiler(model, framework="chainer", warmup=1)
    for x, _ in batches(4):
        with prof.step():
            out = prof.mark_output(model(x))
            loss = SleepyMSE().apply((out, np.zeros(out.shape, np.float32)))[0]
            model.cleargrads()
            loss.backward()
            opt.update()
    prof.close()
    phases = prof.report()["phases_ms"]
    for phase, sleep_s in SLEEP.items():
        got_ms = phases[phase]["median"]
        assert sleep_s * 1e3 <= got_ms < sleep_s * 1e3 + 45.0, (phase, got_ms)


def test_update_with_a_loss_function_splits_too(one_thread):
    # optimizer.update(lossfun) runs forward, cleargrads and backward itself before updating
    # (StandardUpdater's way): the optimizer phase starts at its 'pre' hooks, not at the call.
    model = TinyNet()
    opt = sgd(model)
    opt.add_hook(sleepy_hook)
    prof = LayerProfiler(model, framework="chainer", warmup=1)

    def lossfun(x, t):
        return F.softmax_cross_entropy(prof.mark_output(model(x)), t)

    for x, t in batches(3):
        with prof.step():
            opt.update(lossfun, x, t)
    prof.close()
    report = prof.report()
    validate_report(report.doc)
    phases = report["phases_ms"]
    assert phases["loss_backward"]["mean"] > 0 and phases["backward"]["mean"] > 0
    got_ms = phases["optimizer"]["median"]
    assert SLEEP["optimizer"] * 1e3 <= got_ms < SLEEP["optimizer"] * 1e3 + 45.0
    check_layers_nest_in_phases(report.doc)


def test_profile_training_measures_overhead_and_keeps_a_failed_run():
    model = TinyNet()
    opt = sgd(model)
    report = profile_training(model, batches(3), F.softmax_cross_entropy, opt,
                              framework="chainer", steps=4, warmup=1, overhead_steps=4)
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
        return F.softmax_cross_entropy(out, t)

    report = profile_training(model, batches(3), failing_loss, opt, framework="chainer",
                              steps=6, warmup=1)
    assert report["iters"] >= 1
    assert any("FloatingPointError: loss became nan" in e for e in report["errors"])
    assert hooks_removed()


def test_profile_training_takes_chainer_iterators():
    # A SerialIterator yields lists of examples: concatenated as StandardUpdater does.
    model = TinyNet()
    x, t = batches(1, batch=12)[0]
    iterator = chainer.iterators.SerialIterator(chainer.datasets.TupleDataset(x, t), 4)
    report = profile_training(model, iterator, F.softmax_cross_entropy, sgd(model),
                              framework="chainer", steps=2, warmup=1, overhead_steps=1)
    assert report["errors"] == [] and report["batch_size"] == 4


def test_layer_filter_by_names_and_callable():
    model = TinyNet()
    prof = LayerProfiler(model, framework="chainer", layers=["conv", "head.0"])
    assert [n for n, _ in prof.target.named_layers()] == ["conv", "head.0"]
    prof = LayerProfiler(model, framework="chainer",
                         layers=lambda name, link: isinstance(link, L.Convolution2D))
    assert [n for n, _ in prof.target.named_layers()] == ["conv"]
    # Chainer keeps a Chain's children by name, not in registration order (namedlinks).
    with pytest.raises(ValueError, match=r"layers: no layer .* \['bn', 'conv', 'head.0'\]"):
        LayerProfiler(model, framework="chainer", layers=lambda name, link: False)
    with pytest.raises(ValueError, match=r"layers: \['nope'\] not in the TinyNet"):
        LayerProfiler(model, framework="chainer", layers=["conv", "nope"])
    # A container without parameters of its own is a valid name but not a layer.
    with pytest.raises(ValueError, match="layers: no layer"):
        LayerProfiler(model, framework="chainer", layers=["head"])


def test_bad_input_is_one_clear_error_each():
    with pytest.raises(TypeError, match="model: expected a chainer.Link .* got builtins.dict"):
        LayerProfiler({}, framework="chainer")
    model = TinyNet()
    prof = LayerProfiler(model, framework="chainer", warmup=0)
    with pytest.raises(RuntimeError, match="no measured step yet"):
        prof.report()
    x, t = batches(1)[0]
    with pytest.raises(RuntimeError, match="steps do not nest"):
        with prof.step():
            with prof.step():
                pass
    with pytest.raises(RuntimeError, match="without mark_output"):
        with prof.step():
            F.sum(model(x)).backward()
    with pytest.raises(RuntimeError, match="outside a step"):
        prof.mark_output(model(x))
    prof.close()
    opt = sgd(model)
    loss_fn = F.softmax_cross_entropy
    with pytest.raises(ValueError, match="loader: expected an iterable that yields batches"):
        profile_training(model, [], loss_fn, opt, framework="chainer", steps=2)
    with pytest.raises(TypeError, match="optimizer: expected a chainer.Optimizer"):
        profile_training(model, batches(1), loss_fn, "sgd", framework="chainer", steps=2)
    with pytest.raises(ValueError, match=r"optimizer: expected one set up on the model"):
        profile_training(model, batches(1), loss_fn, sgd(TinyNet()), framework="chainer",
                         steps=2)
    with pytest.raises(TypeError, match="loss_fn: expected a callable"):
        profile_training(model, batches(1), "mse", opt, framework="chainer", steps=2)
    with pytest.raises(TypeError, match="loss_fn: expected it to return a chainer.Variable"):
        profile_training(model, batches(1), lambda out, t: 0.5, opt, framework="chainer",
                         steps=2)
    with pytest.raises(ValueError, match=r"loader: expected batches \(inputs, targets\)"):
        profile_training(model, [x], loss_fn, opt, framework="chainer", steps=2)
    with pytest.raises(ValueError, match="device: expected 'cpu', 'cuda"):
        profile_training(model, batches(1), loss_fn, opt, framework="chainer", steps=2,
                         device="tpu")
    assert hooks_removed()


# ----------------------------------------------------------------------------- the CLI

FACTORY = "tests/user_models/chainer_cnn.py"


def test_cli_profiles_a_factory_from_a_file(tmp_path):
    report = profile_factory_cli("chainer", f"{FACTORY}:factory", tmp_path)
    assert report["model"] == "SmallCNN" and report["batch_size"] == 32
    assert [layer["name"] for layer in report["layers"]] == ["features.0", "features.1",
                                                             "classifier"]
    check_layers_nest_in_phases(report)
