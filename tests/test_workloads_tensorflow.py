"""What the TensorFlow/Keras workloads handle that the other frameworks do not: NHWC batches
from tf.data (standardised CIFAR bit-identical to the NumPy plan), the flattened-dense weight
permutation, Keras' momentum convention across a learning-rate change, the GradientTape split
over forward / loss_forward / backward, symmetric padding everywhere, seeded dropout."""

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import ops.tensorflow as ops_tf  # noqa: E402
from profiler.workloads import build_workload, spec  # noqa: E402
from profiler.workloads.tensorflow.common import flattened_dense_layouts  # noqa: E402

SMALL = dict(batch_size=4, train_size=16, test_size=8, dropout=0.0)


@pytest.fixture(scope="module")
def resnet():
    return build_workload("tensorflow", model="resnet20", **SMALL)


@pytest.mark.parametrize("workers", [0, 2])
def test_standardised_cifar_batches_are_the_plan_in_nhwc(workers):
    """The TensorFlow-ops augmentation + standardisation equals SampleStream's NumPy bit for
    bit, over two epochs, for the train and the test split; batches are host tf.Tensors with
    NHWC images."""
    workload = build_workload("tensorflow", model="resnet20", standardize=True,
                              workers=workers, **SMALL)
    for split in ("train", "test"):
        stream = workload.sample_stream(split, epochs=2)
        batches = list(workload.make_loader(split, epochs=2))
        assert len(batches) == stream.plan.batches
        for b, batch in enumerate(batches):
            assert all(isinstance(t, tf.Tensor) for t in batch)
            assert tuple(batch[0].shape) == (4, 32, 32, 3)
            images, labels = stream.batch(b)
            np.testing.assert_array_equal(batch[0].numpy().transpose(0, 3, 1, 2), images)
            np.testing.assert_array_equal(batch[1].numpy(), labels)
            assert batch[1].dtype == tf.int64


def test_flattened_dense_layout_matches_nchw_flatten():
    """A canonical dense weight on NCHW-flattened input gives what its Keras kernel gives on
    NHWC-flattened input, and the layout maps invert each other."""
    rng = np.random.default_rng(0)
    c, h, w, out = 3, 2, 4, 5
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((out, c * h * w)).astype(np.float32)
    to_keras, to_canonical = flattened_dense_layouts((c, h, w))
    kernel = to_keras(weight)
    nhwc_flat = x.transpose(0, 2, 3, 1).reshape(2, -1)
    np.testing.assert_allclose(nhwc_flat @ kernel, x.reshape(2, -1) @ weight.T, rtol=1e-5)
    np.testing.assert_array_equal(to_canonical(kernel), weight)


def test_every_conv_is_the_adapter_layer_with_explicit_padding(resnet):
    """Keras' "same" pads stride-2 convolutions asymmetrically: every conv must be an
    ops.tensorflow.Conv2D with "valid" padding (a ZeroPadding2D before it where needed)."""
    convs = [layer for _, layer in resnet.named_layers()
             if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 19 + 2          # 6n + 1 3x3 convs and two shortcuts (n = 3)
    assert all(isinstance(c, ops_tf.Conv2D) and c.padding == "valid" for c in convs)
    resnet.set_impls(conv="native")
    assert {c.impl for c in convs} == {"native"}
    resnet.set_impls(conv="framework")


def test_learning_rate_change_updates_like_torch():
    """Keras keeps m = -lr * PyTorch's momentum buffer; a step after set_learning_rate must
    still equal PyTorch's (which applies the new lr to the whole buffer)."""
    runs = {}
    for framework in ("torch", "tensorflow"):
        workload = build_workload(framework, model="resnet20", **SMALL)
        batches = list(workload.make_loader())[:2]
        workload.train_step(batches[0])
        workload.set_learning_rate(spec.LEARNING_RATE / 10)
        before = workload.export_weights()
        workload.train_step(batches[1])
        runs[framework] = {n: v - before[n] for n, v in workload.export_weights().items()
                           if spec.is_decayed(n)}
    # Updates are differences of float32 weights 100-1000 times larger, so they carry the
    # weights' rounding (~1e-3 of an update here); without the rescaling the momentum term
    # alone would be off by 9 times its size.
    for name, expected in runs["torch"].items():
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(runs["tensorflow"][name], expected, rtol=0,
                                   atol=1e-2 * scale, err_msg=name)


def test_tape_spans_forward_and_loss_forward(resnet):
    """A forward left without its loss is dropped by the next forward; backward needs a
    recorded forward, optimizer_step needs gradients; the step still works afterwards."""
    batch = next(iter(resnet.make_loader()))
    fresh = build_workload("tensorflow", model="resnet20", **SMALL)
    with pytest.raises(RuntimeError, match="optimizer_step: no gradients"):
        fresh.optimizer_step()
    with pytest.raises(RuntimeError, match="backward: no recorded forward"):
        fresh.backward(tf.constant(0.0))
    resnet.forward(batch)                     # abandoned
    output = resnet.forward(batch)
    loss = resnet.loss_forward(output, batch)
    resnet.backward(loss)
    assert all(g is not None for g in resnet._grads)
    resnet.optimizer_step()
    resnet.synchronize()
    assert np.isfinite(resnet.loss_value(loss))


def test_predict_takes_nchw_and_rejects_other_ranks(resnet):
    x = np.random.default_rng(1).random((2, 3, 32, 32), np.float32)
    assert resnet.predict(x).shape == (2, spec.CIFAR_CLASSES)
    with pytest.raises(ValueError, match="predict: images: expected NCHW"):
        resnet.predict(x[0])


def test_dropout_is_seeded_and_off_in_predict():
    """Same seed: the same dropout masks in training; predict (eval) has no dropout, so it
    equals PyTorch's from the same weights."""
    config = dict(model="deeppose", batch_size=2, train_size=4, test_size=2, dropout=0.5)
    a, b = (build_workload("tensorflow", **config) for _ in range(2))
    batch = next(iter(a.make_loader()))
    out_a, out_b = a.forward(batch).numpy(), b.forward(batch).numpy()
    np.testing.assert_array_equal(out_a, out_b)
    assert not np.allclose(a.forward(batch).numpy(), out_a)      # a fresh mask
    x = np.random.default_rng(2).random((2, 3, 220, 220), np.float32)
    expected = build_workload("torch", **config).predict(x)
    np.testing.assert_allclose(a.predict(x), expected, rtol=1e-4,
                               atol=1e-4 * float(np.max(np.abs(expected))))
