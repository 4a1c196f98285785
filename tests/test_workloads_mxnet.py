"""What is MXNet-specific in the MXNet/Gluon workloads (profiler.workloads.mxnet): the same
training as PyTorch exactly, shown in float64 where float32 rounding cannot hide a difference
(MXNet's batch norm sums its statistics in float32, PyTorch's in double: in float32 a
pre-activation within rounding of 0 can take the other side of a ReLU); the Trainer's momentum
across learning-rate changes and weight imports; weight decay on the weights only; batch norm's
biased running variance, updated in the backward pass; the recording scope from forward to
loss_forward; hybridization, and graph mode's (what it counts as a compile, the native impls
inside its graph); the DataLoader's worker batches in shared memory; and that the
MXNet 1.9.1 hazards the adapter handles (oneDNN's in-place weight reorder in inference, the
kernel conv impl's backward and the optimizer's queued update, queued Python work at exit: see
ops/mxnet/loader.py and tests/test_mxnet_hazards.py) stay handled in the workloads, which keep
no workaround of their own."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd

from profiler.workloads import build_workload, spec

SMALL = dict(batch_size=4, train_size=16, test_size=8, dropout=0.0)
ROOT = Path(__file__).resolve().parent.parent


def perturbed_weights(model: str, seed: int = 1):
    """Initial weights with non-trivial batch-norm parameters, statistics and biases."""
    rng = np.random.default_rng(seed)
    weights = spec.initial_weights(model, seed)
    for name, value in weights.items():
        if name.endswith((".gamma", ".running_var")):
            weights[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
        elif name.endswith((".beta", ".running_mean", ".bias")):
            weights[name] = rng.normal(0, 0.1, value.shape).astype(np.float32)
    return weights


def rel_diff(actual, expected) -> float:
    """max |actual - expected| relative to max |expected| (a scaled absolute tolerance)."""
    return float(np.max(np.abs(actual - expected)) / max(float(np.max(np.abs(expected))), 1e-30))


def bn_count(bn: str, batch_size: int) -> int:
    """Values per channel a ResNet batch norm averages over: batch x its input's H x W."""
    if bn == "bn_final":
        return batch_size * 8 * 8
    stage, block, which = bn.split(".")
    stage, block = int(stage[len("stage"):]), int(block[len("block"):])
    # bn1 of a stage's first block still sees the previous stage's resolution.
    level = stage - 1 if (which == "bn1" and block == 0 and stage > 1) else stage
    return batch_size * (32 >> (level - 1)) ** 2


def biased_running_var(start, torch_after, steps: int, count: int):
    """PyTorch's running variance after ``steps`` updates from ``start``, as a batch norm that
    takes the biased batch variance has it: every update's batch term is (count - 1) / count
    of PyTorch's, and the terms enter linearly."""
    decay = spec.BN_DECAY ** steps
    return decay * start + (torch_after - decay * start) * (count - 1) / count


def float64_pair(model: str, **config):
    """(MXNet, PyTorch) workloads of ``model`` computing in float64, from the same weights."""
    config = {**SMALL, **config}
    mx_workload = build_workload("mxnet", model=model, **config)
    torch_workload = build_workload("torch", model=model, **config)
    mx_workload.net.cast("float64")
    torch_workload.net.double()
    weights = perturbed_weights(model)
    for workload in (mx_workload, torch_workload):
        workload.import_weights(weights)
    return mx_workload, torch_workload, weights


@pytest.mark.parametrize("model, steps", [("resnet20", 4), ("deeppose", 2)])
def test_float64_training_equals_torch(model, steps):
    """In float64 the MXNet and PyTorch steps agree to MXNet's float32 hyper-parameters (its
    operators take lr, momentum and decays as C floats: ~3e-7 of an update): the same network,
    loss, momentum update, weight decay and batch-norm statistics (the running variance
    converted for MXNet's biased one). ResNet also changes the learning rate before step 3
    (the momentum is rescaled) and re-imports the weights before step 4 (momentum cleared in
    both)."""
    mx_workload, torch_workload, weights = float64_pair(model)
    loader = zip(mx_workload.make_loader(epochs=2), torch_workload.make_loader(epochs=2))
    batches = [next(loader) for _ in range(steps)]
    start, since_import = weights, 0
    for step, (mx_batch, torch_batch) in enumerate(batches):
        if step == 2:
            for workload in (mx_workload, torch_workload):
                workload.set_learning_rate(spec.LEARNING_RATE / 10)
        if step == 3:
            start, since_import = perturbed_weights(model, seed=2), 0
            for workload in (mx_workload, torch_workload):
                workload.import_weights(start)
        mx_batch = tuple(a.astype("float64") if a.dtype == np.float32 else a for a in mx_batch)
        torch_batch = tuple(t.double() if t.is_floating_point() else t for t in torch_batch)
        mx_loss = mx_workload.train_step(mx_batch)
        torch_loss = torch_workload.train_step(torch_batch)
        since_import += 1
        assert mx_loss == pytest.approx(torch_loss, rel=1e-6), f"step {step + 1}"
        mx_after, torch_after = mx_workload.export_weights(), torch_workload.export_weights()
        for name, expected in torch_after.items():
            if name.endswith(".running_var"):
                count = bn_count(name.rsplit(".", 1)[0], SMALL["batch_size"])
                expected = biased_running_var(start[name], expected, since_import, count)
            update = mx_after[name] - start[name]
            assert rel_diff(update, expected - start[name]) < 2e-6, f"step {step + 1} {name}"


def test_set_learning_rate_rescales_the_momentum():
    """MXNet's momentum state is lr x PyTorch's buffer; a new rate rescales it by new / old, so
    the next step moves as PyTorch's would (unscaled, the old rate would linger)."""
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    batch = workload.to_device(next(iter(workload.make_loader())))
    workload.train_step(batch)
    states = workload.trainer._updaters[0].states
    before = {i: s.asnumpy() for i, s in states.items()}
    workload.set_learning_rate(spec.LEARNING_RATE / 4)
    assert workload.trainer.learning_rate == pytest.approx(spec.LEARNING_RATE / 4)
    for i, state in states.items():
        np.testing.assert_allclose(state.asnumpy(), before[i] / 4, rtol=1e-6)
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match="lr: expected a finite float >= 0"):
            workload.set_learning_rate(bad)


def test_import_weights_clears_the_momentum():
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    batch = workload.to_device(next(iter(workload.make_loader())))
    workload.train_step(batch)
    assert workload.trainer._updaters[0].states
    workload.set_learning_rate(0.005)
    workload.import_weights(spec.initial_weights("resnet20"))
    assert not workload.trainer._updaters[0].states
    assert workload.trainer.learning_rate == pytest.approx(0.005)


def test_weight_decay_on_convolution_and_dense_weights_only():
    """Gluon decays every parameter by default (wd_mult 1): the workload gives the others 0,
    and running statistics are not the Trainer's at all."""
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    trained = {id(p) for p in workload.trainer._params}
    assert workload.trainer.optimizer.wd == spec.WEIGHT_DECAY
    assert workload.trainer.optimizer.momentum == spec.MOMENTUM
    for name, param in workload._tensors.items():
        if spec.is_statistic(name):
            assert id(param) not in trained and param.grad_req == "null", name
        else:
            assert id(param) in trained and param.grad_req == "write", name
            assert param.wd_mult == (1.0 if spec.is_decayed(name) else 0.0), name


def test_batch_norm_running_variance_is_biased_and_updated_in_backward():
    """MXNet's CPU batch norm: running_var takes the biased batch variance (hence
    bn_running_var_unbiased is False), and both statistics change in the backward pass."""
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    assert workload.bn_running_var_unbiased is False
    bn = dict(workload.named_layers())["stage1.block0.bn1"]
    inputs = []
    bn.register_forward_hook(lambda block, args, output: inputs.append(args[0].asnumpy()))
    start = workload.export_weights()
    batch = workload.to_device(next(iter(workload.make_loader())))
    output = workload.forward(batch)
    loss = workload.loss_forward(output, batch)
    workload.synchronize()
    after_forward = workload.export_weights()
    for suffix in ("running_mean", "running_var"):
        name = f"stage1.block0.bn1.{suffix}"
        np.testing.assert_array_equal(after_forward[name], start[name])
    workload.backward(loss)
    workload.synchronize()
    after = workload.export_weights()
    x = inputs[0].astype(np.float64)
    decay = spec.BN_DECAY
    np.testing.assert_allclose(after["stage1.block0.bn1.running_mean"],
                               decay * start["stage1.block0.bn1.running_mean"]
                               + (1 - decay) * x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(after["stage1.block0.bn1.running_var"],
                               decay * start["stage1.block0.bn1.running_var"]
                               + (1 - decay) * x.var(axis=(0, 2, 3)), rtol=1e-5)


def test_recording_spans_forward_to_loss_forward():
    """forward opens autograd.record(), loss_forward closes it (the profiler times them
    apart); a forward whose loss never came, or one that failed, leaves no scope open."""
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    batch = workload.to_device(next(iter(workload.make_loader())))
    output = workload.forward(batch)
    assert autograd.is_recording() and autograd.is_training()
    workload.forward(batch)                # no loss for the first: its scope is closed
    loss = workload.loss_forward(output, batch)
    assert not autograd.is_recording() and not autograd.is_training()
    assert loss.shape == (1,)
    with pytest.raises(Exception):
        workload.forward((mx.nd.zeros((4, 5, 32, 32)),) + batch[1:])  # wrong channel count
    assert not autograd.is_recording()


def test_hybridized_network_matches_imperative():
    """The workload runs imperatively (per-block hooks fire); hybridized, the same weights give
    the same outputs and the same training step."""
    imperative = build_workload("mxnet", model="resnet20", **SMALL)
    hybrid = build_workload("mxnet", model="resnet20", **SMALL)
    assert not getattr(imperative.net, "_active", False)
    hybrid.net.hybridize()
    x = np.random.default_rng(0).random((4, 3, 32, 32), np.float32)
    np.testing.assert_allclose(hybrid.predict(x), imperative.predict(x), rtol=1e-5, atol=1e-6)
    batch = imperative.to_device(next(iter(imperative.make_loader())))
    assert hybrid.train_step(batch) == pytest.approx(imperative.train_step(batch), rel=1e-6)
    hybrid_after, imperative_after = hybrid.export_weights(), imperative.export_weights()
    for name, value in imperative_after.items():
        assert rel_diff(hybrid_after[name], value) < 1e-5, name


def test_graph_mode_counts_each_new_input_shape_as_a_compile():
    """Graph mode builds the network's cached graph at the first step and reuses it; a predict
    on another batch size makes MXNet infer the graph's shapes and plan its memory again
    (static_shape), and so does the next training step, back at its own size: each is counted,
    so a retrace is visible. Inference at the training size is not a new shape. The outputs
    are eager's, and set_impls and a cast drop the graph (rebuilt, counted), the flags
    kept."""
    graph = build_workload("mxnet", model="resnet20", mode="graph", **SMALL)
    eager = build_workload("mxnet", model="resnet20", **SMALL)
    assert graph.net._active and not eager.net._active
    assert graph.compile_count() == 0 and eager.compile_count() == 0
    batches = [eager.to_device(b) for b, _ in zip(eager.make_loader(), range(2))]
    x2, x4 = (np.random.default_rng(n).random((n, 3, 32, 32), np.float32) for n in (2, 4))
    counts = []

    def note(what, value=None):
        counts.append((what, graph.compile_count()))
        return value

    expected_x2 = eager.predict(x2)
    note("step 1", graph.train_step(batches[0]))
    note("step 2", graph.train_step(batches[1]))
    note("predict 2", graph.predict(x2))
    note("predict 2 again", graph.predict(x2))
    note("step 3", graph.train_step(batches[0]))
    note("predict 4", graph.predict(x4))
    graph.import_weights(spec.initial_weights("resnet20"))
    assert rel_diff(note("predict 2, eager's weights", graph.predict(x2)), expected_x2) < 1e-5
    graph.set_impls(conv="framework")
    assert graph.net._active and dict(graph.net._flags)["static_shape"]
    note("set_impls, predict 2", graph.predict(x2))
    graph.net.cast("float64")
    note("cast, step 4", graph.train_step((batches[1][0].astype("float64"), batches[1][1])))
    assert counts == [("step 1", 1), ("step 2", 1), ("predict 2", 2), ("predict 2 again", 2),
                      ("step 3", 3), ("predict 4", 3), ("predict 2, eager's weights", 4),
                      ("set_impls, predict 2", 5), ("cast, step 4", 6)], counts
    assert eager.compile_count() == 0


@pytest.mark.parametrize("model", ["resnet20", "deeppose"])
def test_graph_mode_native_impls_train_as_the_framework_conv(model):
    """In graph mode the native conv is an operator inside the cached graph (the native loss
    runs after it, as every loss): from the same weights, in float64, two steps of the graph
    with native convolutions (and DeepPose's native loss) are those of the graph with MXNet's,
    to the float64 tolerances above. The native workload switches after its float32 graph was
    built and used, so the switch re-hybridizes and the cast rebuilds the graph in float64."""
    framework = build_workload("mxnet", model=model, mode="graph", **SMALL)
    native = build_workload("mxnet", model=model, mode="graph", **SMALL)
    x = np.random.default_rng(5).random(
        (2, 3) + ((220, 220) if model == "deeppose" else (32, 32)), np.float32)
    native.predict(x)                                  # the framework conv's graph, float32
    native.set_impls(conv="native", loss="native" if model == "deeppose" else None)
    weights = perturbed_weights(model)
    for workload in (framework, native):
        workload.net.cast("float64")
        workload.import_weights(weights)
    batches = [tuple(a.astype("float64") if a.dtype == np.float32 else a for a in batch)
               for batch, _ in zip(framework.make_loader(), range(2))]
    for step, batch in enumerate(batches):
        expected = framework.train_step(framework.to_device(batch))
        assert native.train_step(native.to_device(batch)) == pytest.approx(expected, rel=1e-6)
        after, expected_after = native.export_weights(), framework.export_weights()
        for name, value in expected_after.items():
            assert rel_diff(after[name] - weights[name], value - weights[name]) < 2e-6, \
                f"step {step + 1} {name}"
    graph_json = native.net._cached_graph[1].tojson()
    assert "deepprof_conv2d" in graph_json and "Convolution" not in graph_json
    assert native.compile_count() == 2 and framework.compile_count() == 1


def test_predict_leaves_the_weights_in_the_plain_layout():
    """oneDNN's inference pass reorders conv weights in place into its blocked layout; the
    adapter's Conv2D puts them back, so after predict (imperative) they are plain: NumPy can be
    imported into them. A hybridized predict leaves them blocked (the graph runs the
    convolutions without calling the layers); switching to the kernel impl puts them back, so
    that impl in the graph (a CustomOp, which would read the blocked data as plain) is
    right."""
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    x = np.random.default_rng(1).random((2, 3, 32, 32), np.float32)
    expected = workload.predict(x)
    for name, param in workload._tensors.items():
        param.data().to_dlpack_for_read()  # raises for an array in oneDNN's layout
    workload.import_weights(workload.export_weights())
    workload.net.hybridize()
    workload.predict(x)                    # the framework conv, hybridized
    workload.set_impls(conv="kernel")
    assert rel_diff(workload.predict(x), expected) < 1e-5


def test_worker_batches_are_moved_out_of_shared_memory():
    """Gluon's worker processes hand batches over in shared memory (cpu_shared), which our conv
    impls do not take next to cpu parameters: to_device copies them to cpu(0); the
    in-process loader's batches are already there and pass unchanged."""
    workload = build_workload("mxnet", model="resnet20", workers=2, **SMALL)
    stream = workload.sample_stream("train")
    for b, batch in enumerate(workload.make_loader()):
        assert all(a.context.device_type == "cpu_shared" for a in batch)
        moved = workload.to_device(batch)
        assert all(a.context == mx.cpu(0) for a in moved)
        for got, expected in zip(workload.batch_to_numpy(moved), stream.batch(b)):
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    for conv in ("kernel", "native"):
        workload.set_impls(conv=conv)
        assert np.isfinite(workload.train_step(moved))
    in_process = build_workload("mxnet", model="resnet20", **SMALL)
    batch = next(iter(in_process.make_loader()))
    assert all(a is b for a, b in zip(in_process.to_device(batch), batch))


_KERNEL_STEPS = """
    from profiler.workloads import build_workload
    workload = build_workload("mxnet", model="resnet20", batch_size=4, train_size=16,
                              test_size=8, conv_impl="kernel")
    if {hybridize}:
        workload.net.hybridize()
    for step, batch in zip(range(3), workload.make_loader()):
        print(workload.train_step(workload.to_device(batch)), flush=True)
    # no synchronize: the last backward and update may still be queued at exit
"""


@pytest.mark.parametrize("hybridize", [False, True])
def test_kernel_conv_training_neither_deadlocks_nor_hangs_at_exit(hybridize):
    """The workload's training steps never wait for MXNet's engine, and the kernel conv impl's
    backward does not wait for the weights the optimizer's queued update writes (the adapter
    reads what its forward read); at exit, ops.mxnet drains the queued Python work before
    MXNet's own shutdown waits on it. In a child process, so a hang fails the test instead of
    stalling it."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_KERNEL_STEPS).format(
        hybridize=hybridize)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(line) for line in result.stdout.split()]
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_dropout_is_seeded_and_off_in_predict():
    """Dropout masks come from MXNet's generator, seeded from config.seed; predict runs
    without dropout (the same output as a dropout-free network)."""
    config = dict(model="deeppose", batch_size=2, train_size=4, test_size=2)
    outputs = []
    for _ in range(2):   # each build seeds MXNet's (global) generator, as PyTorch's
        workload = build_workload("mxnet", dropout=0.5, **config)
        batch = workload.to_device(next(iter(workload.make_loader())))
        outputs.append(workload.forward(batch).asnumpy())
        workload.loss_forward(mx.nd.array(outputs[-1]), batch)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    plain = build_workload("mxnet", dropout=0.0, **config)
    plain_output = plain.forward(batch).asnumpy()
    plain.loss_forward(mx.nd.array(plain_output), batch)
    assert not np.allclose(outputs[0], plain_output)
    x = np.random.default_rng(2).random((2, 3, 220, 220), np.float32)
    np.testing.assert_array_equal(workload.predict(x), plain.predict(x))


@pytest.mark.skipif(mx.context.num_gpus() > 0, reason="a GPU is present here")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(RuntimeError, match="'cuda' requested but this MXNet"):
        build_workload("mxnet", model="resnet20", device="cuda", **SMALL)


def test_named_layers_are_gluon_blocks_with_canonical_prefixes():
    """named_layers gives PyTorch's names; MXNet's own parameter names read alike."""
    workload = build_workload("mxnet", model="resnet20", **SMALL)
    layers = dict(workload.named_layers())
    torch_layers = [name for name, _ in build_workload("torch", model="resnet20",
                                                       **SMALL).named_layers()]
    assert list(layers) == torch_layers
    assert layers["stage2.block0.shortcut"].weight.name == \
        "resnet20_stage2_block0_shortcut_weight"
    assert isinstance(layers["fc"], mx.gluon.nn.Dense)
