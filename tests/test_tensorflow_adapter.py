"""The TensorFlow adapter (ops.tensorflow): every impl of the losses and of conv2d against the
NumPy float64 reference, against each other and against the PyTorch adapter; TensorFlow's
gradient checker; the native ops in eager mode, inside tf.function and in a Keras model; the
kernel impl's clear refusal inside tf.function; the drop-in Keras layer against
keras.layers.Conv2D; bad input at the adapter and at the native ops (in a subprocess: a crash
there fails one test instead of killing the run); GPU checks where TensorFlow sees a GPU
(skipped with a reason elsewhere)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras
import tensorflow as tf
import torch

from ops import core
from ops import tensorflow as otf
from ops import torch as ot
from ops.impls import CONV_IMPLS, LOSS_IMPLS, UnsupportedImplError
from ops.tensorflow import loader
from tests.kernel_calls import (
    ADAPTER_CONV_CASES as CONV_CASES, conv_case_id as case_id,
    conv_case_inputs as conv_inputs, loss_reference, pairs, MASKS, loss_inputs,
    assert_conv_results_agree, assert_conv2d_matches_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = loader.native_unavailable_reason()
needs_native = pytest.mark.skipif(NATIVE is not None, reason=f"no native ops: {NATIVE}")
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
# The tolerances for the loss: elementwise, against the float64 reference.
LOSS_TOL = {np.float32: dict(rtol=1e-5, atol=0), np.float64: dict(rtol=1e-10, atol=0)}
LOSSES = {"mse": (otf.mse_loss, core.MSE_COUNT_FACTOR),
          "deeppose": (otf.deeppose_loss, core.DEEPPOSE_COUNT_FACTOR)}


# ---- helpers ------------------------------------------------------------------------------------

def run_loss(function, impl, x, t, v, grad_loss=0.7):
    """(loss, gx, gt) as NumPy arrays, through a GradientTape with upstream grad_loss."""
    xt, tt = tf.constant(x), tf.constant(t)
    with tf.GradientTape() as tape:
        tape.watch([xt, tt])
        loss = function(xt, tt, None if v is None else tf.constant(v), impl=impl)
    assert loss.shape == () and loss.dtype == x.dtype
    gx, gt = tape.gradient(loss, [xt, tt], output_gradients=tf.constant(grad_loss, x.dtype))
    return loss.numpy(), gx.numpy(), gt.numpy()


def torch_loss(function_name, impl, x, t, v, grad_loss=0.7):
    xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)
    loss = getattr(ot, function_name)(xt, tt, None if v is None else torch.tensor(v), impl=impl)
    loss.backward(torch.tensor(grad_loss, dtype=loss.dtype))
    return loss.detach().numpy(), xt.grad.numpy(), tt.grad.numpy()





def run_conv(impl, x, w, b, gy, params):
    """(y, gx, gw, gb) as NumPy arrays (gb None without a bias)."""
    inputs = [tf.constant(a) for a in (x, w) + (() if b is None else (b,))]
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        y = otf.conv2d(*inputs, impl=impl, **params)
    assert y.dtype == x.dtype
    grads = tape.gradient(y, inputs, output_gradients=tf.constant(gy))
    return tuple(a.numpy() for a in [y] + grads) + ((None,) if b is None else ())


def torch_conv(impl, x, w, b, gy, params):
    inputs = [torch.tensor(a, requires_grad=True) for a in (x, w) + (() if b is None else (b,))]
    y = ot.conv2d(*inputs, impl=impl, **params)
    y.backward(torch.tensor(gy))
    return tuple(a.detach().numpy() for a in [y] + [i.grad for i in inputs]) + (
        (None,) if b is None else ())


# ---- losses: reference, each other, PyTorch, gradient check -------------------------------------

@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_matches_reference(loss_name, impl, dtype, mask):
    function, count_factor = LOSSES[loss_name]
    x, t, v = loss_inputs(dtype, mask)
    got = run_loss(function, impl, x, t, v)
    want = loss_reference(x, t, v, count_factor)
    for name, g, w in zip(("loss", "gx", "gt"), got, want):
        assert g.dtype == dtype and np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, err_msg=name, **LOSS_TOL[dtype])
    if mask == "allmasked":  # C == 0: loss 0 and zero gradients, never NaN
        assert got[0] == 0 and not got[1].any() and not got[2].any()


@pytest.mark.parametrize("mask", ["nomask", "binary", "allmasked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_impls_agree_with_each_other_and_with_pytorch(loss_name, dtype, mask):
    function, _ = LOSSES[loss_name]
    x, t, v = loss_inputs(dtype, mask, seed=1)
    results = {("tf", impl): run_loss(function, impl, x, t, v) for impl in LOSS_IMPLS}
    results.update({("torch", impl): torch_loss(f"{loss_name}_loss", impl, x, t, v)
                    for impl in LOSS_IMPLS})
    (base_key, base), *others = results.items()
    for key, values in others:
        for name, got, want in zip(("loss", "gx", "gt"), values, base):
            np.testing.assert_allclose(got, want, err_msg=f"{key} vs {base_key}: {name}",
                                       **LOSS_TOL[dtype])


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_mse_without_mask_is_tensorflows_mean_squared_error(impl):
    x, t, _ = loss_inputs(np.float64, "nomask", seed=2)
    ours = run_loss(otf.mse_loss, impl, x, t, None, grad_loss=1.0)
    xt, tt = tf.constant(x), tf.constant(t)
    with tf.GradientTape() as tape:
        tape.watch([xt, tt])
        theirs = tf.reduce_mean(tf.square(xt - tt))
    want = [theirs.numpy()] + [g.numpy() for g in tape.gradient(theirs, [xt, tt])]
    for name, got, w in zip(("loss", "gx", "gt"), ours, want):
        np.testing.assert_allclose(got, w, rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_gradients_reach_variables_and_not_the_mask(impl):
    """Variables are read (the tape sees it), t unwatched gets None, the mask never a gradient."""
    x, t, v = loss_inputs(np.float64, "binary", seed=3)
    xv, mask = tf.Variable(x), tf.Variable(v)
    with tf.GradientTape() as tape:
        loss = otf.deeppose_loss(xv, tf.constant(t), mask, impl=impl)
    gx, gv = tape.gradient(loss, [xv, mask])
    assert gv is None
    np.testing.assert_allclose(gx.numpy(), loss_reference(x, t, v, 0.5, 1.0)[1], rtol=1e-10)


@pytest.mark.parametrize("mask", ["nomask", "binary", "fractional"])
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_compute_gradient(impl, mask):
    """TensorFlow's gradient checker (finite differences of the whole Jacobian), float64."""
    x, t, v = loss_inputs(np.float64, mask, seed=4, shape=(3, 5, 2))
    vt = None if v is None else tf.constant(v)
    theoretical, numerical = tf.test.compute_gradient(
        lambda a, b: otf.deeppose_loss(a, b, vt, impl=impl), [tf.constant(x), tf.constant(t)])
    for got, want in zip(theoretical, numerical):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


def _second_derivative(function, x):
    """d/dx sum((d function / dx)^2) through nested tapes."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            value = function(x)
        grad = inner.gradient(value, x)
        objective = tf.reduce_sum(grad * grad)
    return outer.gradient(objective, x)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_second_derivative_exact_or_refused(impl):
    """autograd and explicit (TensorFlow ops both ways) differentiate twice; kernel and native
    are first-order only: LookupError, never TensorFlow's silent None."""
    x, t, v = loss_inputs(np.float64, "fractional", seed=5)

    def loss(a):
        return otf.mse_loss(a, tf.constant(t), tf.constant(v), impl=impl)

    if impl in ("kernel", "native"):
        if NATIVE and impl == "native":
            pytest.skip(NATIVE)
        with pytest.raises(LookupError, match="DeepprofSqErrorLossBackward|first-order only"):
            _second_derivative(loss, tf.constant(x))
        return
    want = 8 * (x - t) * v ** 4 / v.sum() ** 2  # d/dx sum((2 (x - t) v^2 / C)^2)
    np.testing.assert_allclose(_second_derivative(loss, tf.constant(x)).numpy(), want,
                               rtol=1e-10)


@pytest.mark.parametrize("impl", ["kernel", "native"])
def test_conv2d_kernel_impls_are_first_order_only(impl):
    if NATIVE and impl == "native":
        pytest.skip(NATIVE)
    x, w, b, _, params = conv_inputs(CONV_CASES[1], np.float64)

    def conv(a):
        return otf.conv2d(a, tf.constant(w), tf.constant(b), impl=impl, **params)

    with pytest.raises(LookupError, match="DeepprofConv2dBackward|first-order only"):
        _second_derivative(conv, tf.constant(x))


# ---- conv2d: reference, each other, PyTorch, gradient check -------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_matches_reference(case, impl, dtype):
    """float64 at rtol 1e-10; float32 within reference.conv2d_error_bound (see kernel_calls)."""
    x, w, b, gy, params = conv_inputs(case, dtype)
    ours = run_conv(impl, x, w, b, gy, params)
    assert all(a is None or a.dtype == dtype for a in ours)
    assert_conv2d_matches_reference(ours, x, w, b, gy, pairs(params))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CONV_CASES[1:4], ids=case_id)
def test_conv2d_impls_agree_with_each_other_and_with_pytorch(case, dtype):
    x, w, b, gy, params = conv_inputs(case, dtype, seed=1)
    first = run_conv(CONV_IMPLS[0], x, w, b, gy, params)
    others = [run_conv(impl, x, w, b, gy, params) for impl in CONV_IMPLS[1:]]
    others += [torch_conv(impl, x, w, b, gy, params) for impl in CONV_IMPLS]
    for result in others:
        assert_conv_results_agree(result, first, x, w, b, gy, params)


@needs_native
@pytest.mark.parametrize("case", CONV_CASES[1:4], ids=case_id)
def test_conv2d_kernel_native_and_pytorch_native_agree_exactly(case):
    """All three call the same kernels in the same order: bit-identical results."""
    x, w, b, gy, params = conv_inputs(case, np.float32, seed=3)
    kernel = run_conv("kernel", x, w, b, gy, params)
    for other in (run_conv("native", x, w, b, gy, params),
                  torch_conv("native", x, w, b, gy, params)):
        for k, n in zip(kernel, other):
            if k is not None:
                np.testing.assert_array_equal(k, n)


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4]], ids=case_id)
def test_conv2d_compute_gradient(case, impl):
    x, w, b, _, params = conv_inputs(case, np.float64, seed=2)
    x = x[:1, :, :7, :7]  # small Jacobians: the checker differentiates every element
    inputs = [tf.constant(a) for a in (x, w) + (() if b is None else (b,))]
    theoretical, numerical = tf.test.compute_gradient(
        lambda *a: otf.conv2d(*a, impl=impl, **params), inputs)
    for got, want in zip(theoretical, numerical):
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)


def test_conv2d_kernel_outputs_are_fresh_memory():
    """impl='kernel' adopts NumPy memory the kernel wrote: a later call never changes an earlier
    result (nothing is written into memory TensorFlow shares or caches)."""
    x, w, b, _, params = conv_inputs(CONV_CASES[1], np.float32, seed=6)
    first = otf.conv2d(tf.constant(x), tf.constant(w), tf.constant(b), impl="kernel", **params)
    kept = first.numpy().copy()
    otf.conv2d(tf.constant(-x), tf.constant(w), tf.constant(b), impl="kernel", **params)
    np.testing.assert_array_equal(first.numpy(), kept)


def _graph_scopes(function, *args):
    """Every name scope of the ops in the graph of function(*args)."""
    graph = tf.function(function).get_concrete_function(*args).graph
    return {scope for op in graph.get_operations() for scope in op.name.split("/")[:-1]}


# padding for a 3x3 kernel at stride 1 -> the TensorFlow padding form that pads the same
PADDING_FORMS = {0: "VALID", 1: "SAME", 2: "EXPLICIT"}


@pytest.mark.parametrize("padding", sorted(PADDING_FORMS))
@pytest.mark.parametrize("dilation", [1, 2])
def test_framework_conv2d_transposes_are_named_ops(dilation, padding):
    """Activations are transposed exactly where TensorFlow's CPU conv cannot train in NCHW
    here with that padding form (probed) or the conv is dilated; the weight always becomes
    (kh, kw, Cin, Cout)."""
    x, w, b, _, _ = conv_inputs(CONV_CASES[1], np.float32)
    scopes = _graph_scopes(lambda *a: otf.conv2d(*a, padding=padding, dilation=dilation,
                                                 impl="framework"),
                           tf.constant(x), tf.constant(w), tf.constant(b))
    assert "weight_to_hwio" in scopes, scopes
    transposes = (otf.cpu_conv_layout(PADDING_FORMS[padding], "float32") == "NHWC"
                  or dilation > 1)
    assert ({"to_nhwc", "to_nchw"} <= scopes) == transposes, scopes
    assert transposes or not ({"to_nhwc", "to_nchw"} & scopes), scopes


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", loader.PADDING_MODES)
def test_cpu_conv_layout_probe_agrees_with_tensorflow(mode, dtype):
    """The probe's answer is what TensorFlow does in this process, on another shape: where it
    says NCHW trains with a padding form, an NCHW conv and both gradients run; where not,
    TensorFlow refuses NCHW in the forward or the backward. The note says oneDNN's state."""
    x = tf.constant(np.random.default_rng(1).standard_normal((1, 2, 7, 7)), dtype)
    w = tf.ones((3, 3, 2, 2), dtype)
    padding = [[0, 0], [0, 0], [1, 1], [1, 1]] if mode == "EXPLICIT" else mode
    try:
        with tf.device("/device:CPU:0"), tf.GradientTape() as tape:
            tape.watch([x, w])
            y = tf.nn.conv2d(x, w, 1, padding, data_format="NCHW")
        runs = all(g is not None for g in tape.gradient(y, [x, w]))
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        runs = False
    reason = loader.cpu_conv_nchw_reason(mode, dtype)
    assert runs == (reason is None), reason
    assert otf.cpu_conv_layout(mode, dtype) == ("NCHW" if runs else "NHWC")
    note = otf.conv_layout_note(dtype)
    assert f"oneDNN ops {'on' if otf.onednn_enabled() else 'off'}" in note, note


def test_cpu_conv_layout_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"padding_mode: expected one of .*got 'same'"):
        otf.cpu_conv_layout("same")
    with pytest.raises(ValueError, match=r"dtype: expected a float dtype name .*got 'int32'"):
        otf.cpu_conv_layout("VALID", "int32")


# ---- the native ops in graphs and in Keras; the kernel impl refused there -----------------------

@needs_native
def test_native_ops_inside_tf_function_match_eager_with_dynamic_shapes():
    """A whole step (conv -> loss -> gradients) as one graph, batch and image size unknown at
    trace time: same values as eager."""
    rng = np.random.default_rng(7)
    x = tf.constant(rng.standard_normal((2, 3, 6, 6)).astype(np.float32))
    w = tf.Variable(rng.standard_normal((2, 3, 3, 3)).astype(np.float32))
    b = tf.Variable(rng.standard_normal(2).astype(np.float32))
    t = tf.constant(rng.standard_normal((2, 72)).astype(np.float32))
    v = tf.constant((rng.random((2, 72)) < 0.5).astype(np.float32))

    def step(x, t, v):
        with tf.GradientTape() as tape:
            y = otf.conv2d(x, w, b, padding=1, impl="native")
            loss = otf.deeppose_loss(tf.reshape(y, [tf.shape(y)[0], -1]), t, v, impl="native")
        return [loss] + tape.gradient(loss, [w, b])

    spec = [tf.TensorSpec([None, 3, None, None], tf.float32),
            tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.float32)]
    graph = tf.function(step, input_signature=spec)
    for got, want in zip(graph(x, t, v), step(x, t, v)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


@pytest.mark.parametrize("impl", ["autograd", "explicit", "native"])
def test_graph_capable_loss_impls_inside_tf_function(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=8)

    @tf.function
    def loss_and_grad(x, t, v):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = otf.mse_loss(x, t, v, impl=impl)
        return loss, tape.gradient(loss, x)

    loss, gx = loss_and_grad(tf.constant(x), tf.constant(t), tf.constant(v))
    want = loss_reference(x, t, v, 1.0, 1.0)
    np.testing.assert_allclose(loss.numpy(), want[0], rtol=1e-10)
    np.testing.assert_allclose(gx.numpy(), want[1], rtol=1e-10)


def test_kernel_impl_inside_tf_function_is_one_clear_error():
    x = tf.ones((2, 1, 4, 4))
    for call, name in ((lambda: otf.mse_loss(x, x, impl="kernel"), "mse_loss"),
                       (lambda: otf.conv2d(x, tf.ones((1, 1, 3, 3)), impl="kernel"), "conv2d")):
        with pytest.raises(UnsupportedImplError,
                           match=rf"ops.tensorflow.{name}: impl='kernel' is not available here: "
                                 rf"inside tf.function .*use impl='native'"):
            tf.function(call)()
    assert otf.available_impls("loss") == LOSS_IMPLS  # eager again: available


def _teacher_task(seed=9):
    """A task one 3x3 conv can learn exactly: y = conv(x, teacher), channels_last."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 8, 8, 1)).astype(np.float32)
    teacher = rng.standard_normal((3, 3, 1, 2)).astype(np.float32)
    return x, tf.nn.conv2d(x, teacher, 1, "SAME").numpy()


def _fit(impl, run_eagerly=False, epochs=4):
    x, y = _teacher_task()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)),
                              otf.Conv2D(2, 3, padding="same", impl=impl)])
    loss_impl = {"framework": "autograd"}.get(impl, impl)
    model.compile(optimizer=keras.optimizers.SGD(0.1), run_eagerly=run_eagerly,
                  loss=lambda y_true, y_pred: otf.mse_loss(y_pred, y_true, impl=loss_impl))
    return model.fit(x, y, batch_size=16, epochs=epochs, verbose=0).history["loss"]


@needs_native
def test_native_ops_train_a_keras_model():
    """compile + fit (a tf.function per step): the loss goes down, as with Keras' own conv."""
    ours, theirs = _fit("native"), _fit("framework")
    assert ours[-1] < 0.3 * ours[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_kernel_impl_in_keras_fit_needs_run_eagerly():
    with pytest.raises(UnsupportedImplError, match="run_eagerly=True"):
        _fit("kernel", epochs=1)
    losses = _fit("kernel", run_eagerly=True, epochs=2)
    assert losses[-1] < losses[0]


# ---- the Keras layer ----------------------------------------------------------------------------

LAYER_KWARGS = [dict(padding="same"), dict(strides=2, use_bias=False),
                dict(padding="same", dilation_rate=2, activation="relu"),
                dict(padding="valid", kernel_size=(3, 2), strides=(2, 1)),
                dict(padding="same", strides=2)]  # 11x11 input: symmetric "same" at stride 2


def _layer_results(layer, x):
    """(y, gx, gkernel, gbias) of sum(y^2) through the layer, as NumPy arrays."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
        objective = tf.reduce_sum(tf.square(y))
    grads = tape.gradient(objective, [xt] + layer.trainable_weights)
    return [y.numpy()] + [g.numpy() for g in grads]


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("kwargs", LAYER_KWARGS, ids=str)
def test_layer_loads_keras_weights_and_matches_it(impl, kwargs):
    """channels_last (Keras' default): same variables, outputs and gradients, float64."""
    kwargs = {"kernel_size": 3, **kwargs}
    keras.utils.set_random_seed(10)
    theirs = keras.layers.Conv2D(5, dtype="float64", bias_initializer="glorot_uniform", **kwargs)
    ours = otf.Conv2D(5, dtype="float64", impl=impl, **kwargs)
    x = np.random.default_rng(11).standard_normal((2, 11, 11, 3))
    theirs.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(theirs.get_weights())
    assert [w.shape for w in ours.weights] == [w.shape for w in theirs.weights]
    for got, want in zip(_layer_results(ours, x), _layer_results(theirs, x)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("kwargs", LAYER_KWARGS[:3], ids=str)
def test_layer_channels_first_matches_keras_on_transposed_data(impl, kwargs):
    """Our kernels take channels_first without the activation transposes; Keras' own conv
    cannot on a CPU (TensorFlow's CPU conv is NHWC only), so it runs on NHWC copies."""
    kwargs = {"kernel_size": 3, **kwargs}
    keras.utils.set_random_seed(12)
    theirs = keras.layers.Conv2D(5, dtype="float64", bias_initializer="glorot_uniform", **kwargs)
    ours = otf.Conv2D(5, dtype="float64", data_format="channels_first", impl=impl, **kwargs)
    x = np.random.default_rng(13).standard_normal((2, 3, 11, 11))
    theirs.build((2, 11, 11, 3))
    ours.build(x.shape)
    ours.set_weights(theirs.get_weights())
    to_nhwc, to_nchw = (0, 2, 3, 1), (0, 3, 1, 2)
    want = _layer_results(theirs, x.transpose(to_nhwc))
    want[0], want[1] = want[0].transpose(to_nchw), want[1].transpose(to_nchw)
    for got, w in zip(_layer_results(ours, x), want):
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-10)
    if impl == "native":  # the graph shows the layout work: the kernel's transpose only
        scopes = _graph_scopes(ours, tf.constant(x))
        assert "kernel_to_oihw" in scopes and not {"to_nchw", "to_nhwc"} & scopes


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")),
                    reason="TensorFlow's GPU conv takes NCHW; this checks the CPU's behaviour")
def test_layer_framework_impl_is_keras_own_also_where_keras_fails():
    """impl='framework' runs Keras' call unchanged: channels_first on the CPU trains in both
    where TensorFlow's CPU conv takes NCHW here (the probe), and fails in both elsewhere."""
    x = tf.constant(np.random.default_rng(14).standard_normal((1, 3, 6, 6)), tf.float32)
    theirs = keras.layers.Conv2D(2, 3, data_format="channels_first")
    ours = otf.Conv2D(2, 3, data_format="channels_first")
    theirs.build(x.shape)
    ours.build(x.shape)
    ours.set_weights(theirs.get_weights())
    if otf.cpu_conv_layout("VALID") == "NHWC":
        for layer in (theirs, ours):
            with pytest.raises((tf.errors.UnimplementedError, tf.errors.InvalidArgumentError)):
                _layer_results(layer, x.numpy())
        return
    for got, want in zip(_layer_results(ours, x.numpy()), _layer_results(theirs, x.numpy())):
        np.testing.assert_array_equal(got, want)


@needs_native
def test_layer_kernel_impls_transpose_in_named_ops():
    """(The kernel impl runs the same transposes eagerly, where there is no graph to read.)"""
    scopes = _graph_scopes(otf.Conv2D(2, 3, impl="native"), tf.ones((1, 6, 6, 3)))
    assert {"to_nchw", "kernel_to_oihw", "to_nhwc"} <= scopes, scopes


def test_layer_builds_functional_models_and_round_trips_its_config():
    inputs = keras.Input((8, 8, 3))
    layer = otf.Conv2D(4, 3, padding="same", impl="kernel")
    model = keras.Model(inputs, layer(inputs))  # symbolic build: never calls our kernels
    assert model.output_shape == (None, 8, 8, 4)
    clone = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(clone) is otf.Conv2D and clone.impl == "kernel"
    assert clone.get_config() == layer.get_config()
    layer.impl = "native"
    assert layer.get_config()["impl"] == "native"


def test_layer_refuses_what_our_kernels_cannot_do():
    with pytest.raises(NotImplementedError, match="groups: impl='kernel' supports groups=1"):
        otf.Conv2D(4, 3, groups=2, impl="kernel")
    with pytest.raises(NotImplementedError, match="'same' with an even dilated kernel extent"):
        otf.Conv2D(4, 2, padding="same", impl="native")
    layer = otf.Conv2D(4, 3, padding="same", strides=2, impl="kernel")
    with pytest.raises(NotImplementedError, match=r"'same' at stride 2 on input height 10 pads "
                                                  r"0 before and 1 after"):
        layer(tf.ones((1, 10, 11, 2)))
    with pytest.raises(ValueError, match=r"ops.tensorflow.Conv2D: impl: expected one of"):
        otf.Conv2D(4, 3, impl="cudnn")
    framework = otf.Conv2D(4, 2, padding="same", groups=2)  # Keras' own does it all
    assert framework(tf.ones((1, 6, 6, 4))).shape == (1, 6, 6, 4)
    with pytest.raises(NotImplementedError, match="groups"):
        framework.impl = "native"
    assert framework.impl == "framework"


# ---- bad input at the adapter -------------------------------------------------------------------

def test_unknown_and_unavailable_impls():
    x = tf.ones((2, 3))
    with pytest.raises(ValueError, match=r"ops.tensorflow.mse_loss: impl: expected one of "
                                         r"'autograd', 'explicit', 'kernel', 'native', "
                                         r"got 'fast'"):
        otf.mse_loss(x, x, impl="fast")
    with pytest.raises(ValueError, match=r"ops.tensorflow.conv2d: impl: .*got 'autograd'"):
        otf.conv2d(tf.ones((1, 1, 3, 3)), tf.ones((1, 1, 3, 3)), impl="autograd")


@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("dtype", [tf.int32, tf.float16, tf.bfloat16], ids=str)
def test_kernel_impls_refuse_non_float32_64(impl, dtype):
    x = tf.ones((2, 3), dtype)
    with pytest.raises(TypeError, match=rf"ops.tensorflow.deeppose_loss: x: impl={impl!r} runs "
                                        rf"our kernels, which take float32 or float64, got "
                                        rf"{dtype.name}"):
        otf.deeppose_loss(x, x, impl=impl)
    with pytest.raises(TypeError, match=r"ops.tensorflow.conv2d: w: .*float32 or float64"):
        otf.conv2d(tf.ones((1, 1, 3, 3)), tf.ones((1, 1, 3, 3), dtype), impl=impl)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_bad_input_names_function_and_argument(impl):
    f32 = tf.ones((2, 3))
    cases = [
        (TypeError, r"x: .*int32", (tf.ones((2, 3), tf.int32), f32)),
        (ValueError, r"t: expected shape \(2, 3\) \(same as x\), got \(3,\)", (f32, f32[0])),
        (ValueError, r"v: expected shape \(2, 3\) \(same as x\), got \(2, 3, 1\)",
         (f32, f32, tf.ones((2, 3, 1)))),
        (ValueError, r"x: expected a non-empty array", (f32[:0], f32[:0])),
        (TypeError, r"t: expected float32 like x, got float64", (f32, tf.ones((2, 3), tf.float64))),
        (TypeError, r"v: .*bool", (f32, f32, tf.ones((2, 3), tf.bool))),
        (TypeError, r"t: expected a tf.Tensor or a variable, got ndarray",
         (f32, np.ones((2, 3), np.float32))),
        (TypeError, r"x: expected a tf.Tensor or a variable, got SparseTensor",
         (tf.sparse.from_dense(f32), f32)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match="ops.tensorflow.mse_loss: " + message):
            otf.mse_loss(*args, impl=impl)


def test_loss_shapes_in_graphs_are_checked_as_far_as_known():
    @tf.function(input_signature=[tf.TensorSpec([None, 28]), tf.TensorSpec([None, 27])])
    def mismatched(x, t):
        return otf.mse_loss(x, t)

    with pytest.raises(ValueError, match=r"mse_loss: t: expected shape \(None, 28\) \(same as "
                                         r"x\), got \(None, 27\)"):
        mismatched.get_concrete_function()


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_bad_input_names_function_and_argument(impl):
    x, w = tf.ones((2, 3, 6, 6)), tf.ones((4, 3, 3, 3))
    cases = [
        (TypeError, r"x: .*int32", (tf.ones((2, 3, 6, 6), tf.int32),
                                    tf.ones((4, 3, 3, 3), tf.int32)), {}),
        (TypeError, r"w: expected float32 like x, got float64", (x, tf.cast(w, tf.float64)), {}),
        (ValueError, r"x: expected a 4-d tensor", (x[0], w), {}),
        (ValueError, r"w: expected \(Cout, 3, kh, kw\)", (x, w[:, :2]), {}),
        (ValueError, r"b: expected shape \(4,\) .*got \(3,\)", (x, w, tf.ones(3)), {}),
        (ValueError, r"stride: expected values in \[1", (x, w), dict(stride=0)),
        (TypeError, r"padding: expected an int or a pair", (x, w), dict(padding=1.5)),
        (ValueError, r"w: kernel height extent 7 .* larger than the padded input",
         (x, w), dict(dilation=3)),
        (TypeError, r"w: expected a tf.Tensor or a variable, got list", (x, [[1.0]]), {}),
    ]
    for error, message, args, params in cases:
        with pytest.raises(error, match="ops.tensorflow.conv2d: " + message):
            otf.conv2d(*args, impl=impl, **params)


def _run_script(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def test_mixed_devices_are_refused_by_every_impl():
    """Two logical CPUs (set before TensorFlow starts, hence a fresh process)."""
    done = _run_script("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        two = [tf.config.LogicalDeviceConfiguration()] * 2
        tf.config.set_logical_device_configuration(cpu, two)
        import ops.tensorflow as otf
        from ops.impls import CONV_IMPLS, LOSS_IMPLS
        x = tf.ones((1, 1, 4, 4))
        with tf.device("/CPU:1"):
            other = tf.identity(x)
        calls = [(i, lambda i=i: otf.mse_loss(x, other, impl=i)) for i in LOSS_IMPLS]
        calls += [(i, lambda i=i: otf.conv2d(x, other, impl=i)) for i in CONV_IMPLS]
        for impl, call in calls:
            try:
                call()
                print(impl, "accepted")
            except ValueError as error:
                print(impl, "refused:", error)
    """)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(LOSS_IMPLS) + len(CONV_IMPLS), done.stdout
    for line in lines:
        assert "refused:" in line and "is on /job:localhost/replica:0/task:0/device:CPU:1 but x " \
                                      "is on /job:localhost/replica:0/task:0/device:CPU:0" in line


# ---- bad input at the native ops, called directly -----------------------------------------------

@needs_native
def test_native_ops_called_directly_refuse_bad_input_without_crashing():
    """Users may call the loaded ops without the adapter: still one InvalidArgumentError naming
    the op and the argument (TensorFlow's own words where it refuses a dtype before the op
    runs), and the process survives every case."""
    done = _run_script("""
        import numpy as np
        import tensorflow as tf
        from ops.tensorflow import loader
        lib = loader.native_ops()
        f32, f64 = tf.ones((2, 3)), tf.ones((2, 3), tf.float64)
        x, w, gy = tf.ones((1, 2, 4, 4)), tf.ones((3, 2, 3, 3)), tf.ones((1, 3, 2, 2))
        loss = lambda *a, **k: lib.deepprof_sq_error_loss(*a, **{"count_factor": 1.0, **k})
        back = lib.deepprof_sq_error_loss_backward
        conv = lib.deepprof_conv2d
        data, weight = lib.deepprof_conv2d_backward_data, lib.deepprof_conv2d_backward_weight
        cases = {
            "loss_half": lambda: loss(tf.ones(3, tf.float16), tf.ones(3, tf.float16), []),
            "loss_int": lambda: loss(tf.ones(3, tf.int32), tf.ones(3, tf.int32), []),
            "loss_mixed": lambda: loss(f32, f64, []),
            "loss_t_shape": lambda: loss(f32, tf.ones(3), []),
            "loss_v_shape": lambda: loss(f32, f32, [tf.ones((3, 2))]),
            "loss_two_masks": lambda: loss(f32, f32, [f32, f32]),
            "loss_empty": lambda: loss(tf.ones((0, 3)), tf.ones((0, 3)), []),
            "loss_factor": lambda: loss(f32, f32, [], count_factor=0.0),
            "loss_factor_nan": lambda: loss(f32, f32, [], count_factor=float("nan")),
            "back_grad_loss": lambda: back(tf.ones(2), f32, f32, [], tf.ones(()), count_factor=1.0),
            "back_count": lambda: back(tf.ones(()), f32, f32, [], tf.ones(3), count_factor=1.0),
            "back_t_shape": lambda: back(tf.ones(()), f32, tf.ones((3, 2)), [], tf.ones(()),
                                         count_factor=1.0),
            "conv_x_rank": lambda: conv(tf.ones((2, 4, 4)), w, []),
            "conv_channels": lambda: conv(x, tf.ones((3, 1, 3, 3)), []),
            "conv_extent": lambda: conv(x, tf.ones((3, 2, 5, 5)), []),
            "conv_zero_size": lambda: conv(tf.ones((0, 2, 4, 4)), w, []),
            "conv_stride": lambda: conv(x, w, [], stride=[0, 1]),
            "conv_padding": lambda: conv(x, w, [], padding=[-1, 0]),
            "conv_dilation": lambda: conv(x, w, [], dilation=[1, 0]),
            "conv_attr_length": lambda: conv(x, w, [], stride=[1, 1, 1]),
            "conv_huge_dilation": lambda: conv(x, w, [], dilation=[2**31 - 1, 1]),
            "conv_bias": lambda: conv(x, w, [tf.ones(2)]),
            "conv_two_biases": lambda: conv(x, w, [tf.ones(3), tf.ones(3)]),
            "conv_mixed": lambda: conv(x, tf.cast(w, tf.float64), []),
            "data_grad_y": lambda: data(tf.ones((1, 3, 3, 3)), w, x),
            "data_x_rank": lambda: data(gy, w, tf.ones((2, 4, 4))),
            "weight_grad_y": lambda: weight(x, tf.ones((1, 2, 2, 2)), w),
            "weight_w": lambda: weight(x, gy, tf.ones((3, 1, 3, 3))),
            "bias_rank": lambda: lib.deepprof_conv2d_backward_bias(tf.ones((3, 2, 2))),
            "bias_empty": lambda: lib.deepprof_conv2d_backward_bias(tf.ones((1, 0, 2, 2))),
        }
        for name, call in cases.items():
            try:
                call()
                print(name, "|accepted")
            except Exception as error:
                print(name, "|" + type(error).__name__, "|" + str(error).splitlines()[0])
        print("survived")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "survived", done.stdout
    results = {line.split(" |")[0]: line.split(" |")[1:] for line in lines[:-1]}
    expected = {  # name -> a fragment of the message (our op's own words where it decides)
        "loss_half": "not in the list of allowed values",
        "loss_int": "not in the list of allowed values",
        "loss_mixed": "",
        "loss_t_shape": "DeepprofSqErrorLoss: t: expected shape [2,3] (same as x), got [3]",
        "loss_v_shape": "DeepprofSqErrorLoss: v: expected shape [2,3] (same as x), got [3,2]",
        "loss_two_masks": "DeepprofSqErrorLoss: v: expected a list of zero or one tensor, got 2",
        "loss_empty": "DeepprofSqErrorLoss: x: expected a non-empty tensor",
        "loss_factor": "DeepprofSqErrorLoss: count_factor: expected a finite number > 0, got 0",
        "loss_factor_nan": "count_factor: expected a finite number > 0, got nan",
        "back_grad_loss": "DeepprofSqErrorLossBackward: grad_loss: expected one element",
        "back_count": "DeepprofSqErrorLossBackward: count: expected one element",
        "back_t_shape": "DeepprofSqErrorLossBackward: t: expected shape [2,3]",
        "conv_x_rank": "DeepprofConv2d: x: expected a 4-d tensor",
        "conv_channels": "DeepprofConv2d: w: expected shape (Cout, 2, kh, kw)",
        "conv_extent": "DeepprofConv2d: w: kernel height extent 5 (size 5, dilation 1) is larger "
                       "than the padded input height 4",
        "conv_zero_size": "DeepprofConv2d: x: expected positive sizes",
        "conv_stride": "DeepprofConv2d: stride: expected values in [1, 2**31 - 1], got [0, 1]",
        "conv_padding": "DeepprofConv2d: padding: expected values in [0, 2**31 - 1]",
        "conv_dilation": "DeepprofConv2d: dilation: expected values in [1, 2**31 - 1]",
        "conv_attr_length": "DeepprofConv2d: stride: expected two values (height, width), got 3",
        "conv_huge_dilation": "DeepprofConv2d: w: kernel height extent 4294967295",
        "conv_bias": "DeepprofConv2d: b: expected shape [3]",
        "conv_two_biases": "DeepprofConv2d: b: expected a list of zero or one tensor, got 2",
        "conv_mixed": "",
        "data_grad_y": "DeepprofConv2dBackwardData: grad_y: expected shape [1,3,2,2]",
        "data_x_rank": "DeepprofConv2dBackwardData: x: expected a 4-d tensor",
        "weight_grad_y": "DeepprofConv2dBackwardWeight: grad_y: expected shape [1,3,2,2]",
        "weight_w": "DeepprofConv2dBackwardWeight: w: expected shape (Cout, 2, kh, kw)",
        "bias_rank": "DeepprofConv2dBackwardBias: grad_y: expected a 4-d tensor",
        "bias_empty": "DeepprofConv2dBackwardBias: grad_y: expected positive sizes",
    }
    assert set(results) == set(expected), done.stdout
    for name, fragment in expected.items():
        kind, message = results[name] + [""] * (2 - len(results[name]))
        assert kind == "InvalidArgumentError", (name, results[name])
        assert fragment in message, (name, results[name])


@needs_native
def test_native_ops_in_a_graph_refuse_static_bad_shapes_when_traced():
    """Shape functions apply the same checks at graph construction (a ValueError there)."""
    lib = loader.native_ops()

    @tf.function
    def bad_conv():
        return lib.deepprof_conv2d(tf.ones((1, 2, 4, 4)), tf.ones((3, 2, 5, 5)), [])

    @tf.function
    def bad_loss():
        return lib.deepprof_sq_error_loss(tf.ones((2, 3)), tf.ones(3), [], count_factor=1.0)

    with pytest.raises(ValueError, match="DeepprofConv2d: w: kernel height extent 5"):
        bad_conv.get_concrete_function()
    with pytest.raises(ValueError, match=r"DeepprofSqErrorLoss: t: expected shape \[2,3\]"):
        bad_loss.get_concrete_function()


# ---- impl_support and the loader ----------------------------------------------------------------

def test_impl_support_and_available_impls():
    for kind, names in (("loss", LOSS_IMPLS), ("conv", CONV_IMPLS)):
        for device in ("cpu", "CPU:0", "/device:CPU:0", tf.DeviceSpec(device_type="CPU")):
            support = otf.impl_support(kind, device)
            assert tuple(support) == names
            assert support["native"] == NATIVE
            assert all(r is None for i, r in support.items() if i != "native")
        assert tuple(otf.impl_support(kind, "gpu:0")) == names
        tpu = otf.impl_support(kind, "tpu")
        assert "not TPU" in tpu["kernel"] and "not TPU" in tpu["native"]
        assert otf.available_impls(kind, "tpu") == names[:-2]
    if not tf.config.list_physical_devices("GPU"):
        assert "TensorFlow sees no GPU" in otf.impl_support("conv", "gpu")["native"]
    with pytest.raises(ValueError, match="impl_support: kind: expected 'loss' or 'conv'"):
        otf.available_impls("pool")
    with pytest.raises(ValueError, match="impl_support: device: expected a TensorFlow device"):
        otf.impl_support("loss", "nonsense")

    @tf.function
    def in_a_graph():
        return otf.impl_support("loss")["kernel"]
    assert "inside tf.function" in in_a_graph().numpy().decode()


def test_loader_explains_a_missing_library(tmp_path):
    done = _run_script(f"""
        from pathlib import Path
        from ops.tensorflow import loader
        loader.LIBRARY = Path({str(tmp_path / 'libdeepprof_tf.so')!r})
        import ops.tensorflow as otf, tensorflow as tf
        print(otf.impl_support("conv")["native"])
        try:
            otf.conv2d(tf.ones((1, 1, 3, 3)), tf.ones((1, 1, 3, 3)), impl="native")
        except Exception as error:
            print(type(error).__name__, error)
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.strip().splitlines()
    assert first.startswith("libdeepprof_tf.so was not built")
    assert second.startswith("UnsupportedImplError ops.tensorflow.conv2d: impl='native' is not "
                             "available here: libdeepprof_tf.so was not built")


# ---- GPU (where TensorFlow sees one) ------------------------------------------------------------

def _gpu_reason():
    if not tf.config.list_physical_devices("GPU"):
        return "TensorFlow sees no GPU (tensorflow-cpu, or no driver/GPU)"
    return otf.impl_support("conv", "gpu")["native"] or ""


GPU_REASON = _gpu_reason()
gpu_only = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON)


@pytest.mark.cuda
@gpu_only
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_native_ops_match_reference(dtype):
    x, t, v = loss_inputs(dtype, "binary", seed=14)
    with tf.device("/GPU:0"):
        got = run_loss(otf.deeppose_loss, "native", x, t, v)
    for name, g, w in zip(("loss", "gx", "gt"), got, loss_reference(x, t, v, 0.5)):
        np.testing.assert_allclose(g, w, err_msg=name, **LOSS_TOL[dtype])
    for case in CONV_CASES:
        xc, w, b, gy, params = conv_inputs(case, dtype, seed=15)
        with tf.device("/GPU:0"):
            ours = run_conv("native", xc, w, b, gy, params)
        assert_conv2d_matches_reference(ours, xc, w, b, gy, pairs(params))


@pytest.mark.cuda
@pytest.mark.skipif(not tf.config.list_physical_devices("GPU"), reason="TensorFlow sees no GPU")
def test_gpu_kernel_impl_is_refused_with_the_reason():
    with tf.device("/GPU:0"):
        x = tf.ones((2, 3))
    assert x.device.endswith("GPU:0")
    with pytest.raises(UnsupportedImplError, match="CUDA stream"):
        otf.mse_loss(x, x, impl="kernel")

