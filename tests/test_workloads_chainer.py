"""What is Chainer-specific in the Chainer workloads (profiler.workloads.chainer): the same
training as PyTorch exactly, shown in float64 where float32 rounding cannot hide a difference;
MomentumSGD's velocity across learning-rate changes and weight imports; WeightDecay on the
weights only; batch norm's unbiased running variance; dropout from the seeded NumPy RNG; and
the MultiprocessIterator loader (every batch from the workers, workers shut down)."""

import multiprocessing
import os

import numpy as np
import pytest
import torch

from ops.chainer.loader import load_chainer
from profiler.workloads import build_workload, spec
from profiler.workloads.chainer.common import ChainerLoader

chainer = load_chainer()

SMALL = dict(batch_size=4, train_size=16, test_size=8, dropout=0.0)


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


def float64_pair(model: str, **config):
    """(Chainer, PyTorch) workloads of ``model`` computing in float64, from the same weights."""
    config = {**SMALL, **config}
    with chainer.using_config("dtype", np.float64):   # every link's parameters in float64
        chainer_workload = build_workload("chainer", model=model, **config)
    torch_workload = build_workload("torch", model=model, **config)
    torch_workload.net.double()
    weights = perturbed_weights(model)
    for workload in (chainer_workload, torch_workload):
        workload.import_weights(weights)
    return chainer_workload, torch_workload


def as_float64(batch):
    return tuple(a.astype(np.float64) if a.dtype.kind == "f" else a for a in batch)


@pytest.mark.parametrize("model, steps", [("resnet20", 4), ("deeppose", 2)])
def test_float64_training_equals_torch(model, steps):
    """In float64 the Chainer and PyTorch steps agree to rounding: the same network, loss,
    momentum update, weight decay and batch-norm statistics (the unbiased running variance
    included). ResNet also changes the learning rate before step 3 (Chainer's velocity is
    rescaled) and re-imports the weights before step 4 (momentum cleared in both)."""
    chainer_workload, torch_workload = float64_pair(model)
    batches = [as_float64(b) for b in chainer_workload.make_loader(epochs=2)][:steps]
    for step, batch in enumerate(batches):
        if step == 2:
            for workload in (chainer_workload, torch_workload):
                workload.set_learning_rate(spec.LEARNING_RATE / 10)
        if step == 3:
            weights = torch_workload.export_weights()
            for workload in (chainer_workload, torch_workload):
                workload.import_weights(weights)
        chainer_loss = chainer_workload.train_step(batch)
        torch_loss = torch_workload.train_step(tuple(torch.from_numpy(a) for a in batch))
        np.testing.assert_allclose(chainer_loss, torch_loss, rtol=1e-12)
        expected = torch_workload.export_weights()
        for name, value in chainer_workload.export_weights().items():
            assert value.dtype == np.float64
            np.testing.assert_allclose(value, expected[name], rtol=1e-11, atol=1e-13,
                                       err_msg=f"{model} step {step + 1} {name}")


def test_set_learning_rate_rescales_the_velocity():
    workload = build_workload("chainer", model="resnet20", **SMALL)
    workload.train_step(next(iter(workload.make_loader())))
    params = list(workload.net.params())
    before = [p.update_rule.state["v"].copy() for p in params]
    workload.set_learning_rate(spec.LEARNING_RATE / 10)
    assert workload.optimizer.lr == spec.LEARNING_RATE / 10
    for p, v in zip(params, before):
        np.testing.assert_allclose(p.update_rule.state["v"], v / 10, rtol=1e-6)
        assert p.update_rule.hyperparam.lr == spec.LEARNING_RATE / 10
    for bad in (0, -0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="set_learning_rate: lr: expected a positive"):
            workload.set_learning_rate(bad)


def test_import_weights_clears_the_momentum():
    workload = build_workload("chainer", model="resnet20", **SMALL)
    workload.train_step(next(iter(workload.make_loader())))
    assert any(np.any(p.update_rule.state["v"]) for p in workload.net.params())
    workload.import_weights(spec.initial_weights("resnet20"))
    assert not any(np.any(p.update_rule.state["v"]) for p in workload.net.params())


def test_weight_decay_on_convolution_and_dense_weights_only():
    """With zero gradients and no momentum yet, a step is the decay alone: w -= lr * wd * w on
    conv and dense weights, nothing on biases and batch norm (spec.WEIGHT_DECAY_RULE). A large
    learning rate makes lr * wd = 0.1, well above float32 rounding."""
    workload = build_workload("chainer", model="resnet20", **SMALL)
    weights = perturbed_weights("resnet20")
    workload.import_weights(weights)
    lr = 0.1 / spec.WEIGHT_DECAY
    workload.set_learning_rate(lr)
    for param in workload.net.params():
        param.grad = np.zeros_like(param.array)
    workload.optimizer_step()
    for name, value in workload.export_weights().items():
        expected = weights[name] * (1 - lr * spec.WEIGHT_DECAY) if spec.is_decayed(name) \
            else weights[name]
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=0, err_msg=name)


def test_batch_norm_running_variance_is_unbiased():
    """Chainer's running variance takes the batch variance times m / (m - 1), as PyTorch's."""
    workload = build_workload("chainer", model="resnet20", **SMALL)
    bn = dict(workload.named_layers())["bn_final"]
    x = np.random.default_rng(0).normal(1.0, 2.0, (4, 64, 8, 8)).astype(np.float32)
    bn(x)
    m = 4 * 8 * 8
    decay = spec.BN_DECAY
    np.testing.assert_allclose(bn.avg_mean, (1 - decay) * x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(bn.avg_var, decay + (1 - decay) * x.var(axis=(0, 2, 3))
                               * m / (m - 1), rtol=1e-5)


def test_dropout_is_seeded_and_off_in_predict():
    """Chainer's CPU dropout draws from NumPy's global RNG, which the workload seeds: the same
    seed gives the same masks (so the same loss), another seed others; predict has none."""
    config = dict(SMALL, model="deeppose", batch_size=2, dropout=0.5)

    def first_loss(seed):
        workload = build_workload("chainer", seed=seed, **config)
        batch = next(iter(workload.make_loader()))
        return workload, workload.loss_value(workload.loss_forward(workload.forward(batch),
                                                                   batch))

    workload, loss = first_loss(0)
    assert first_loss(0)[1] == loss
    assert first_loss(1)[1] != loss
    x = np.random.default_rng(5).random((2, 3, 220, 220), np.float32)
    np.testing.assert_array_equal(workload.predict(x), workload.predict(x))


class PidStream:
    """A stand-in sample stream whose samples say which process loaded them."""

    def __len__(self):
        return 12

    def __getitem__(self, k):
        return (np.full((3, 4, 4), k, np.float32), np.int64(os.getpid()))


def test_multiprocess_loader_loads_every_batch_in_workers():
    """The shared memory is sized up front, so Chainer does not load the first batch in the
    main process to measure it: every batch comes from a worker."""
    loader = ChainerLoader(PidStream(), batch_size=4, workers=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for b, (images, pids) in enumerate(batches):
        np.testing.assert_array_equal(images[:, 0, 0, 0], np.arange(4 * b, 4 * b + 4))
        assert os.getpid() not in pids


def test_multiprocess_loader_shuts_its_workers_down():
    """A finished or abandoned iteration finalizes the MultiprocessIterator: no worker
    process outlives it."""
    before = set(multiprocessing.active_children())
    loader = ChainerLoader(PidStream(), batch_size=4, workers=2)
    list(loader)
    assert set(multiprocessing.active_children()) == before
    iterator = iter(loader)
    next(iterator)
    iterator.close()
    assert set(multiprocessing.active_children()) == before


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_is_reiterable(workers):
    workload = build_workload("chainer", model="resnet20", workers=workers, **SMALL)
    loader = workload.make_loader()
    first, second = list(loader), list(loader)
    assert len(first) == len(loader) == 4
    for a, b in zip(first, second):
        assert all(isinstance(x, np.ndarray) for x in a)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.skipif(chainer.backends.cuda.available, reason="CuPy/CUDA present here")
def test_cuda_without_cupy_is_refused():
    with pytest.raises(RuntimeError, match="device: 'cuda' requested but this Chainer"):
        build_workload("chainer", model="resnet20", device="cuda", **SMALL)
