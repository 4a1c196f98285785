"""The same inputs through every framework adapter, every impl of each: the same losses,
outputs and gradients. This is what lets a speed difference between the frameworks be read as
overhead."""

import itertools

import mxnet as mx
import numpy as np
import pytest
import tensorflow as tf
import torch

from ops import chainer as oc
from ops import mxnet as omx
from ops import tensorflow as otf
from ops import torch as ot
from ops.chainer.loader import load_chainer
from ops.impls import CONV_IMPLS, LOSS_IMPLS

chainer = load_chainer()
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}


def torch_loss(impl, fn, x, t, v):
    xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)
    loss = getattr(ot, fn)(xt, tt, None if v is None else torch.tensor(v), impl=impl)
    loss.backward()
    return [loss.detach().numpy(), xt.grad.numpy(), tt.grad.numpy()]


def chainer_loss(impl, fn, x, t, v):
    xv, tv = chainer.Variable(x.copy()), chainer.Variable(t.copy())
    loss = getattr(oc, fn)(xv, tv, v, impl=impl)
    loss.backward()
    return [np.asarray(loss.array), xv.grad, tv.grad]


def tensorflow_loss(impl, fn, x, t, v):
    xt, tt = tf.constant(x), tf.constant(t)
    with tf.GradientTape() as tape:
        tape.watch([xt, tt])
        loss = getattr(otf, fn)(xt, tt, None if v is None else tf.constant(v), impl=impl)
    gx, gt = tape.gradient(loss, [xt, tt])
    return [loss.numpy(), gx.numpy(), gt.numpy()]


def mxnet_loss(impl, fn, x, t, v):
    xa, ta = mx.nd.array(x, dtype=x.dtype), mx.nd.array(t, dtype=t.dtype)
    xa.attach_grad()
    ta.attach_grad()
    with mx.autograd.record():
        loss = getattr(omx, fn)(xa, ta, None if v is None else mx.nd.array(v, dtype=v.dtype),
                                impl=impl)
    loss.backward()
    # MXNet has no 0-d arrays: its losses have shape (1,).
    return [loss.asnumpy().reshape(()), xa.grad.asnumpy(), ta.grad.asnumpy()]


LOSS_RUNNERS = {"torch": torch_loss, "chainer": chainer_loss, "tensorflow": tensorflow_loss,
                "mxnet": mxnet_loss}


@pytest.mark.parametrize("mask", ["none", "binary", "all_masked"])
@pytest.mark.parametrize("fn", ["mse_loss", "deeppose_loss"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_losses_agree_across_frameworks_and_impls(dtype, fn, mask):
    rng = np.random.default_rng(0)
    x, t = (rng.standard_normal((16, 28)).astype(dtype) for _ in range(2))
    v = {"none": None, "binary": (rng.random((16, 28)) < 0.7).astype(dtype),
         "all_masked": np.zeros((16, 28), dtype)}[mask]
    results = {(framework, impl): run(impl, fn, x, t, v)
               for framework, run in LOSS_RUNNERS.items() for impl in LOSS_IMPLS}
    (base_key, base), *others = results.items()
    for key, values in others:
        for name, got, want in zip(("loss", "gx", "gt"), values, base):
            np.testing.assert_allclose(got, want, rtol=TOLERANCE[dtype], atol=1e-30,
                                       err_msg=f"{key} vs {base_key}: {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_conv_agrees_across_frameworks_and_impls(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 11, 9)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 5)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    params = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    results = {}
    for impl in CONV_IMPLS:
        xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        y = ot.conv2d(xt, wt, bt, impl=impl, **params)
        gy = np.cos(np.arange(y.numel(), dtype=dtype)).reshape(tuple(y.shape))
        y.backward(torch.tensor(gy))
        results[("torch", impl)] = [y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(),
                                    bt.grad.numpy()]
        xv, wv, bv = (chainer.Variable(a.copy()) for a in (x, w, b))
        yv = oc.conv2d(xv, wv, bv, impl=impl, **params)
        yv.grad = gy
        yv.backward()
        results[("chainer", impl)] = [yv.array, xv.grad, wv.grad, bv.grad]
        xf, wf, bf = (tf.constant(a) for a in (x, w, b))
        with tf.GradientTape() as tape:
            tape.watch([xf, wf, bf])
            yf = otf.conv2d(xf, wf, bf, impl=impl, **params)
        grads = tape.gradient(yf, [xf, wf, bf], output_gradients=tf.constant(gy))
        results[("tensorflow", impl)] = [yf.numpy()] + [g.numpy() for g in grads]
        xm, wm, bm = (mx.nd.array(a, dtype=a.dtype) for a in (x, w, b))
        for array in (xm, wm, bm):
            array.attach_grad()
        with mx.autograd.record():
            ym = omx.conv2d(xm, wm, bm, impl=impl, **params)
        ym.backward(mx.nd.array(gy, dtype=gy.dtype))
        results[("mxnet", impl)] = [ym.asnumpy()] + [a.grad.asnumpy() for a in (xm, wm, bm)]
    # Sums of many float32 products: compare against each output's scale, not elementwise.
    for (key_a, a), (key_b, b_) in itertools.combinations(results.items(), 2):
        for name, got, want in zip(("y", "gx", "gw", "gb"), a, b_):
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= TOLERANCE[dtype] * scale, \
                f"{key_a} vs {key_b}: {name}"
