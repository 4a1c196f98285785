"""The MXNet adapter (ops.mxnet): every impl of the losses and of conv2d against the NumPy float64
reference, against each other and against the PyTorch adapter; MXNet's numeric gradient check on
the native and Custom operators; hybridized blocks against imperative calls; the Conv2D block
against mx.gluon.nn.Conv2D; training with the native operators; MXNet's asynchronous engine;
bad input at the adapter and at the native operators (in a subprocess, so a crash would show as
one); and the same on a GPU where MXNet has one (skipped with a reason elsewhere)."""

import os
import re
import subprocess
import sys
import textwrap

import mxnet as mx
import numpy as np
import pytest
import torch

import ops.mxnet as om
from ops import core, reference
from ops import torch as ot
from ops.impls import CONV_IMPLS, LOSS_IMPLS, UnsupportedImplError, check_impl
from ops.mxnet import loader
from tests.kernel_calls import (
    ADAPTER_CONV_CASES as CONV_CASES, conv_case_id as case_id,
    conv_case_inputs as conv_inputs, loss_reference, pairs, MASKS, loss_inputs,
    assert_conv_results_agree, assert_conv2d_matches_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = om.impl_support("loss")["native"]
needs_native = pytest.mark.skipif(NATIVE is not None, reason=f"no native ops: {NATIVE}")
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
# The tolerances for the loss: elementwise, against the float64 reference.
LOSS_TOL = {np.float32: dict(rtol=1e-5, atol=0), np.float64: dict(rtol=1e-10, atol=0)}
LOSSES = {"mse": (om.mse_loss, ot.mse_loss, core.MSE_COUNT_FACTOR),
          "deeppose": (om.deeppose_loss, ot.deeppose_loss, core.DEEPPOSE_COUNT_FACTOR)}


# ---- helpers ------------------------------------------------------------------------------------

def nd(array, grad=None):
    """An NDArray copy of a NumPy array (None stays None), with a gradient buffer when
    ``grad`` is a grad_req."""
    if array is None:
        return None
    out = mx.nd.array(array, dtype=array.dtype)
    if grad:
        out.attach_grad(grad_req=grad)
    return out


def run_loss(function, impl, x, t, v, grad_loss=0.7, block=None):
    """(loss, gx, gt) as NumPy arrays through MXNet's autograd, with upstream grad_loss; through
    ``block`` (a HybridBlock taking x, t, v) when given."""
    xa, ta, va = nd(x, "write"), nd(t, "write"), nd(v)
    with mx.autograd.record():
        loss = block(xa, ta, va) if block else function(xa, ta, va, impl=impl)
    assert loss.shape == (1,) and loss.dtype == x.dtype
    loss.backward(mx.nd.full((1,), grad_loss, dtype=x.dtype))
    return loss.asnumpy()[0], xa.grad.asnumpy(), ta.grad.asnumpy()



def torch_loss(function, impl, x, t, v, grad_loss=0.7):
    xt, tt = torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)
    loss = function(xt, tt, None if v is None else torch.tensor(v), impl=impl)
    loss.backward(torch.tensor(grad_loss, dtype=loss.dtype))
    return loss.item(), xt.grad.numpy(), tt.grad.numpy()


class LossBlock(mx.gluon.HybridBlock):
    """A hybridizable block around one loss and impl (Symbols once hybridized)."""

    def __init__(self, function, impl):
        super().__init__()
        self.function, self.impl = function, impl

    def hybrid_forward(self, F, x, t, v=None):
        return self.function(x, t, v, impl=self.impl)




def run_conv(impl, x, w, b, gy, params, block=None):
    """(y, gx, gw, gb) as NumPy arrays (gb None without a bias); through ``block`` (a
    HybridBlock taking x, w, b) when given."""
    xa, wa, ba = nd(x, "write"), nd(w, "write"), nd(b, "write")
    with mx.autograd.record():
        y = block(xa, wa, ba) if block else om.conv2d(xa, wa, ba, impl=impl, **params)
    assert y.dtype == x.dtype and y.shape == gy.shape
    y.backward(nd(gy))
    return tuple(None if a is None else a.asnumpy()
                 for a in (y, xa.grad, wa.grad, None if ba is None else ba.grad))


class ConvFunctionBlock(mx.gluon.HybridBlock):
    """conv2d on its three inputs, hybridizable (the kernel and native impls)."""

    def __init__(self, impl, params):
        super().__init__()
        self.impl, self.conv_params = impl, params

    def hybrid_forward(self, F, x, w, b=None):
        return om.conv2d(x, w, b, impl=self.impl, **self.conv_params)


ULP32 = 2.0 ** -23  # float32's spacing at 1: one rounding of a result, with margin


def assert_conv_outputs_agree(got, want, x, w, b, params, err_msg=""):
    """Two float32 conv2d outputs of the same (x, w, b): each is within
    reference.conv2d_error_bound (plus one rounding) of the exact value, so they differ by at
    most twice that, whichever summation order each used (MXNet's own convolution sums in
    oneDNN's order where oneDNN is active, in its im2col GEMM's order where not)."""
    bound = reference.conv2d_error_bound(x, w, b, **pairs(params))[0]
    exact = reference.conv2d(x, w, b, **pairs(params))
    excess = np.abs(got.astype(np.float64) - want) - 2 * (bound + ULP32 * np.abs(exact))
    assert excess.max() <= 0, f"{err_msg}: beyond the rounding bound by {excess.max():.3g}"


# ---- losses: reference, each other, PyTorch --------------------------------------------------

@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_matches_reference(loss_name, impl, dtype, mask):
    function, _, count_factor = LOSSES[loss_name]
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
def test_loss_impls_agree_with_each_other_and_pytorch(loss_name, dtype, mask):
    """Same inputs through every MXNet impl and every PyTorch impl: same loss and gradients."""
    function, torch_function, _ = LOSSES[loss_name]
    x, t, v = loss_inputs(dtype, mask, seed=1)
    results = {("mxnet", impl): run_loss(function, impl, x, t, v) for impl in LOSS_IMPLS}
    results.update({("torch", impl): torch_loss(torch_function, impl, x, t, v)
                    for impl in ot.available_impls("loss")})
    (base_key, base), *others = results.items()
    for key, values in others:
        for name, got, want in zip(("loss", "gx", "gt"), values, base):
            np.testing.assert_allclose(got, want, rtol=LOSS_TOL[dtype]["rtol"], atol=1e-30,
                                       err_msg=f"{key} vs {base_key}: {name}")


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_mse_without_mask_is_mxnet_mean_of_squares(impl):
    x, t, _ = loss_inputs(np.float64, "nomask", seed=2)
    ours = run_loss(om.mse_loss, impl, x, t, None, grad_loss=1.0)
    xa, ta = nd(x, "write"), nd(t, "write")
    with mx.autograd.record():
        theirs = mx.nd.mean(mx.nd.square(xa - ta))
    theirs.backward()
    for name, got, want in zip(("loss", "gx", "gt"), ours,
                               (theirs.asnumpy()[0], xa.grad.asnumpy(), ta.grad.asnumpy())):
        np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=name)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_gradient_reaches_whichever_input_needs_one(impl):
    """Only t, or only x, records a gradient: it gets the right one (MXNet 1.9.1's own
    autograd.Function would drop t's when x needs none; loader.Function fixes that)."""
    x, t, v = loss_inputs(np.float64, "binary", seed=3)
    _, gx, gt = loss_reference(x, t, v, 0.5, 1.0)
    for grads in (("write", None), (None, "write")):
        xa, ta = nd(x, grads[0]), nd(t, grads[1])
        with mx.autograd.record():
            loss = om.deeppose_loss(xa, ta, nd(v), impl=impl)
        loss.backward()
        needing = xa if grads[0] else ta
        np.testing.assert_allclose(needing.grad.asnumpy(), gx if grads[0] else gt, rtol=1e-10)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_mask_is_a_constant(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=8)
    xa, va = nd(x, "write"), nd(v, "write")
    with mx.autograd.record():
        loss = om.mse_loss(xa, nd(t), va, impl=impl)
    loss.backward()
    assert not va.grad.asnumpy().any()
    np.testing.assert_allclose(xa.grad.asnumpy(), loss_reference(x, t, v, 1.0, 1.0)[1],
                               rtol=1e-10)


@pytest.mark.parametrize("impl", ["autograd", "explicit", "kernel"])
def test_loss_gradients_accumulate_with_grad_req_add(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=9)
    xa, ta = nd(x, "add"), nd(t, "add")
    for _ in range(2):
        with mx.autograd.record():
            loss = om.deeppose_loss(xa, ta, nd(v), impl=impl)
        loss.backward()
    _, gx, gt = loss_reference(x, t, v, 0.5, 1.0)
    np.testing.assert_allclose(xa.grad.asnumpy(), 2 * gx, rtol=1e-10)
    np.testing.assert_allclose(ta.grad.asnumpy(), 2 * gt, rtol=1e-10)


@pytest.mark.parametrize("impl", ["autograd", "explicit"])
def test_loss_framework_impls_take_float16(impl):
    x, t, v = loss_inputs(np.float16, "binary", seed=7)
    got = run_loss(om.mse_loss, impl, x, t, v)
    for name, g, w in zip(("loss", "gx", "gt"), got, loss_reference(x, t, v, 1.0)):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-3, err_msg=name)


# ---- losses in graphs: hybridized blocks, MXNet's numeric gradient check ----------------------

@pytest.mark.parametrize("mask", ["nomask", "binary", "allmasked"])
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_hybridized_matches_imperative(impl, mask):
    x, t, v = loss_inputs(np.float32, mask, seed=10)
    imperative = run_loss(om.deeppose_loss, impl, x, t, v)
    block = LossBlock(om.deeppose_loss, impl)
    block.hybridize()
    for _ in range(2):  # the second call runs the cached graph
        hybridized = run_loss(None, impl, x, t, v, block=block)
        for name, got, want in zip(("loss", "gx", "gt"), hybridized, imperative):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("mask", ["nomask", "binary", "fractional"])
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_symbol_numeric_gradient(impl, mask):
    """mx.test_utils.check_numeric_gradient on the loss as a Symbol (native op, CustomOps,
    composed operators), float64, with respect to x and t."""
    x, t, v = loss_inputs(np.float64, mask, seed=11, shape=(3, 4, 2))
    xs, ts = mx.sym.var("x"), mx.sym.var("t")
    vs = None if v is None else mx.sym.var("v")
    loss = om.deeppose_loss(xs, ts, vs, impl=impl)
    location = {"x": x, "t": t} if v is None else {"x": x, "t": t, "v": v}
    mx.test_utils.check_numeric_gradient(loss, location, grad_nodes=["x", "t"],
                                         numeric_eps=1e-4, rtol=1e-6, atol=1e-9,
                                         dtype=np.float64)


@needs_native
def test_native_loss_symbol_has_both_outputs():
    """The native op's second output is C = sum(v): what its backward reads."""
    x, t, v = loss_inputs(np.float64, "binary", seed=12)
    loss, count = mx.nd.deepprof_sq_error_loss(nd(x), nd(t), nd(v), count_factor=0.5,
                                               masked=True)
    assert count.asnumpy()[0] == v.sum()
    assert loss.asnumpy()[0] == pytest.approx(loss_reference(x, t, v, 0.5)[0], rel=1e-12)


# ---- conv2d: reference, each other, PyTorch, gradient checks -------------------------------------

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
def test_conv2d_impls_agree_with_each_other_and_pytorch(case, dtype):
    x, w, b, gy, params = conv_inputs(case, dtype, seed=1)
    results = [run_conv(impl, x, w, b, gy, params) for impl in CONV_IMPLS]
    for impl in ot.available_impls("conv"):
        xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        y = ot.conv2d(xt, wt, bt, impl=impl, **pairs(params))
        y.backward(torch.tensor(gy))
        results.append(tuple(a.detach().numpy() for a in (y, xt.grad, wt.grad, bt.grad)))
    for result in results[1:]:
        assert_conv_results_agree(result, results[0], x, w, b, gy, params)


@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4]], ids=case_id)
def test_conv2d_symbol_numeric_gradient(case, impl):
    x, w, b, _, params = conv_inputs(case, np.float64, seed=2)
    names = ["x", "w"] if b is None else ["x", "w", "b"]
    symbols = [mx.sym.var(name) for name in names] + ([None] if b is None else [])
    y = om.conv2d(*symbols, impl=impl, **params)
    location = dict(zip(names, (x, w, b)))
    mx.test_utils.check_numeric_gradient(y, location, numeric_eps=1e-4, rtol=1e-6, atol=1e-8,
                                         dtype=np.float64)


@pytest.mark.parametrize("impl", ["kernel", "native"])
def test_conv2d_central_differences_imperatively(impl):
    """d(sum(y * gy))/dw by central differences in float64 against the impl's gw."""
    x, w, b, gy, params = conv_inputs(CONV_CASES[3], np.float64, seed=3)
    gw = run_conv(impl, x, w, b, gy, params)[2]
    rng = np.random.default_rng(4)
    for index in [tuple(rng.integers(0, n) for n in w.shape) for _ in range(5)]:
        step = np.zeros_like(w)
        step[index] = 1e-5
        plus, minus = (om.conv2d(nd(x), nd(w + s), nd(b), impl=impl, **params).asnumpy()
                       for s in (step, -step))
        numeric = ((plus - minus) * gy).sum() / 2e-5
        assert numeric == pytest.approx(gw[index], rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("case", [CONV_CASES[2], CONV_CASES[4]], ids=case_id)
def test_conv2d_hybridized_matches_imperative(case, impl):
    x, w, b, gy, params = conv_inputs(case, np.float32, seed=5)
    imperative = run_conv(impl, x, w, b, gy, params)
    block = ConvFunctionBlock(impl, params)
    block.hybridize()
    for _ in range(2):
        hybridized = run_conv(impl, x, w, b, gy, params, block=block)
        for name, got, want in zip(("y", "gx", "gw", "gb"), hybridized, imperative):
            if want is not None:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_weight_gets_its_gradient_when_x_needs_none(impl):
    """The usual first layer: data without a gradient buffer, weights with one."""
    x, w, b, gy, params = conv_inputs(CONV_CASES[1], np.float64, seed=6)
    wa, ba = nd(w, "write"), nd(b, "write")
    with mx.autograd.record():
        y = om.conv2d(nd(x), wa, ba, impl=impl, **params)
    y.backward(nd(gy))
    _, gw, gb = reference.conv2d_grads(x, w, gy, **pairs(params))
    np.testing.assert_allclose(wa.grad.asnumpy(), gw, rtol=1e-10)
    np.testing.assert_allclose(ba.grad.asnumpy(), gb, rtol=1e-10)


# ---- the Conv2D block ---------------------------------------------------------------------------

BLOCK_ARGS = [dict(padding=1), dict(strides=2, use_bias=False),
              dict(strides=(2, 1), padding=(1, 2), dilation=(1, 2), activation="relu")]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("kwargs", BLOCK_ARGS, ids=str)
@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_block_loads_gluon_weights_and_matches(impl, kwargs, hybridize, tmp_path):
    theirs = mx.gluon.nn.Conv2D(5, (3, 2), in_channels=3, **kwargs)
    theirs.initialize(mx.init.Normal(0.5))
    theirs.cast("float64")
    if "use_bias" not in kwargs:
        theirs.bias.set_data(mx.nd.array(np.linspace(-1, 1, 5), dtype=np.float64))
    path = str(tmp_path / "conv.params")
    theirs.save_parameters(path)
    ours = om.Conv2D(5, (3, 2), impl=impl, **kwargs)  # in_channels from the saved weights
    ours.cast("float64")
    ours.load_parameters(path)
    assert sorted(ours._collect_params_with_prefix()) == sorted(
        theirs._collect_params_with_prefix())
    if hybridize:
        ours.hybridize()
        theirs.hybridize()
    x = np.random.default_rng(7).standard_normal((2, 3, 9, 8))
    for _ in range(2 if hybridize else 1):
        got, want = [], []
        for block, out in ((ours, got), (theirs, want)):
            block.collect_params().zero_grad()
            xa = nd(x, "write")
            with mx.autograd.record():
                y = block(xa)
                (y * y).sum().backward()
            out += [y.asnumpy(), xa.grad.asnumpy(), block.weight.grad().asnumpy()]
            if block.bias is not None:
                out.append(block.bias.grad().asnumpy())
        for name, g, w in zip(("y", "gx", "gw", "gb"), got, want):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=name)
    assert f"impl={impl!r}" in repr(ours)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_block_set_data_and_lazy_in_channels(impl):
    theirs = mx.gluon.nn.Conv2D(4, 3, padding=1, in_channels=2)
    theirs.initialize(mx.init.Uniform())
    ours = om.Conv2D(4, 3, padding=1, impl=impl)
    ours.initialize()
    x = mx.nd.array(np.random.default_rng(8).standard_normal((1, 2, 6, 6)))
    ours(x)  # infers in_channels=2
    assert ours.weight.shape == (4, 2, 3, 3)
    ours.weight.set_data(theirs.weight.data())
    ours.bias.set_data(theirs.bias.data())
    assert_conv_outputs_agree(ours(x).asnumpy(), theirs(x).asnumpy(), x.asnumpy(),
                              theirs.weight.data().asnumpy(), theirs.bias.data().asnumpy(),
                              dict(padding=1), impl)


def test_conv2d_block_impl_can_change_and_rebuilds_its_graph():
    block = om.Conv2D(3, 3, in_channels=2, impl="kernel")
    block.initialize()
    block.hybridize()
    x = mx.nd.array(np.random.default_rng(9).standard_normal((2, 2, 5, 5)))
    results = {}
    for impl in CONV_IMPLS:
        block.impl = impl
        results[impl] = block(x).asnumpy()
    for impl in CONV_IMPLS:
        assert_conv_outputs_agree(results[impl], results["framework"], x.asnumpy(),
                                  block.weight.data().asnumpy(), block.bias.data().asnumpy(),
                                  {}, impl)


def test_conv2d_block_refuses_what_our_kernels_cannot_do():
    for impl in ("kernel", "native"):
        with pytest.raises(NotImplementedError, match=r"Conv2D: groups: .*groups=1 only, got 2"):
            om.Conv2D(4, 3, groups=2, in_channels=4, impl=impl)
        with pytest.raises(NotImplementedError, match=r"Conv2D: layout: .*NCHW only, got 'NHWC'"):
            om.Conv2D(4, 3, layout="NHWC", impl=impl)
    block = om.Conv2D(4, 3, groups=2, in_channels=4)  # the framework impl does it all
    with pytest.raises(NotImplementedError, match="groups"):
        block.impl = "kernel"
    assert block.impl == "framework"
    with pytest.raises(ValueError, match=r"ops.mxnet.Conv2D: impl: .*'cudnn'"):
        om.Conv2D(4, 3, impl="cudnn")


@needs_native
def test_conv2d_block_native_refuses_grad_req_add():
    block = om.Conv2D(2, 3, in_channels=1, impl="native")
    block.initialize()
    block.collect_params().setattr("grad_req", "add")
    with pytest.raises(NotImplementedError, match="cannot accumulate them"):
        block(mx.nd.ones((1, 1, 4, 4)))
    block.impl = "kernel"  # accumulates
    x = mx.nd.ones((1, 1, 4, 4))
    for _ in range(2):
        with mx.autograd.record():
            block(x).sum().backward()
    np.testing.assert_allclose(block.weight.grad().asnumpy(), 2 * 4, rtol=1e-6)


# ---- training with the native operators ---------------------------------------------------------

@needs_native
def test_gluon_model_trains_with_native_ops():
    """Predicting the (row, column) centroid of a bright blob: conv (native) -> relu -> dense,
    DeepPose loss (native), hybridized. The loss falls, and the same net with MXNet's own
    impls takes the same steps."""
    rng = np.random.default_rng(10)
    images = rng.random((16, 1, 8, 8)).astype(np.float32) * 0.1
    targets = rng.integers(1, 7, size=(16, 2))
    for image, (row, col) in zip(images, targets):
        image[0, row - 1:row + 2, col - 1:col + 2] += 1.0
    x, t = mx.nd.array(images), mx.nd.array(targets / 8.0)
    v = mx.nd.ones_like(t)

    def train(conv_impl, loss_impl):
        mx.random.seed(0)
        net = mx.gluon.nn.HybridSequential()
        net.add(om.Conv2D(4, 3, padding=1, activation="relu", impl=conv_impl),
                mx.gluon.nn.Dense(2))
        net.initialize(mx.init.Xavier())
        net.hybridize()
        trainer = mx.gluon.Trainer(net.collect_params(), "adam", {"learning_rate": 0.01})
        losses = []
        for _ in range(40):
            with mx.autograd.record():
                loss = om.deeppose_loss(net(x), t, v, impl=loss_impl)
            loss.backward()
            trainer.step(1)
            losses.append(loss.asscalar())
        return losses

    native = train("native", "native")
    assert native[-1] < 0.5 * native[0], native
    np.testing.assert_allclose(native, train("framework", "autograd"), rtol=1e-3)


# ---- MXNet's asynchronous engine ----------------------------------------------------------------

def _pending(array, rounds=6):
    """``array`` again, as the last of a chain of slow queued operations (the engine has
    likely not run them when this returns): array + (big @ big ... ) * 0."""
    big = mx.nd.random.uniform(shape=(400, 400), dtype=array.dtype)
    for _ in range(rounds):
        big = mx.nd.dot(big, big) / 400
    return array + mx.nd.sum(big).reshape((1,) * array.ndim) * 0


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
def test_kernel_impls_wait_for_queued_inputs(hybridize):
    """Inputs, weights and upstream gradients fresh out of queued operations: the kernel impl
    reads them only once MXNet has written them (to_dlpack_for_read), so results are right."""
    x, t, v = loss_inputs(np.float32, "binary", seed=11)
    block = LossBlock(om.deeppose_loss, "kernel")
    if hybridize:
        block.hybridize()
    xa = nd(x, "write")
    with mx.autograd.record():
        loss = block(_pending(xa), _pending(nd(t)), _pending(nd(v)))
    loss.backward(_pending(mx.nd.full((1,), 0.7)))
    for name, got, want in zip(("loss", "gx"), (loss.asnumpy()[0], xa.grad.asnumpy()),
                               loss_reference(x, t, v, 0.5)):
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)

    cx, cw, cb, gy, params = conv_inputs(CONV_CASES[2], np.float32, seed=12)
    conv = ConvFunctionBlock("kernel", params)
    if hybridize:
        conv.hybridize()
    wa = nd(cw, "write")
    with mx.autograd.record():
        y = conv(_pending(nd(cx)), _pending(wa * 2), _pending(nd(cb)))
    y.backward(_pending(nd(gy)))
    # The conv saw the weight 2 * cw (exact in float32); w's gradient is twice its own.
    y_ref = reference.conv2d(cx, 2 * cw, cb, **pairs(params))
    gw_ref = 2 * reference.conv2d_grads(cx, 2 * cw, gy, **pairs(params))[1]
    y_bound, _, gw_bound = reference.conv2d_error_bound(cx, 2 * cw, cb, gy, **pairs(params))
    for name, got, want, bound in (("y", y.asnumpy(), y_ref, y_bound),
                                   ("gw", wa.grad.asnumpy(), gw_ref, 2 * gw_bound)):
        excess = np.abs(got - want) - (bound + ULP32 * np.abs(want))
        assert excess.max() <= 0, f"{name}: beyond the rounding bound by {excess.max():.3g}"


def test_kernel_output_feeds_queued_operations():
    """What a kernel wrote is final before any later MXNet operation on it can be queued."""
    x, w, b, _, params = conv_inputs(CONV_CASES[1], np.float32, seed=13)
    y = om.conv2d(nd(x), nd(w), nd(b), impl="kernel", **params)
    z = mx.nd.relu(y) * 3 - y
    y_ref = reference.conv2d(x, w, b, **pairs(params))
    z_ref = np.maximum(y_ref, 0) * 3 - y_ref
    # y's rounding bound, times at most 4 (|d z / d y| <= 3 + 1), plus the two roundings of
    # the multiplication and the subtraction.
    y_bound = reference.conv2d_error_bound(x, w, b, **pairs(params))[0] + ULP32 * np.abs(y_ref)
    z_bound = 4 * y_bound + ULP32 * (3 * np.abs(y_ref) + np.abs(z_ref))
    assert np.all(np.abs(z.asnumpy() - z_ref) <= z_bound)


class OneDNNPipeline(mx.gluon.HybridBlock):
    """MXNet's own conv, ours, MXNet's own again, then our loss. Where MXNet computes with
    oneDNN, the outputs of its convolutions (forward) and their input gradients (backward) stay
    in oneDNN's blocked layout, which MXNet cannot export through DLPack and which MXNet 1.9.1
    hands CustomOps unconverted."""

    def __init__(self, conv_impl, loss_impl):
        super().__init__()
        self.loss_impl = loss_impl
        with self.name_scope():
            self.first = mx.gluon.nn.Conv2D(16, 3, padding=1, in_channels=16)
            self.second = om.Conv2D(16, 3, padding=1, in_channels=16, impl=conv_impl)
            self.third = mx.gluon.nn.Conv2D(16, 3, padding=1, in_channels=16)

    def hybrid_forward(self, F, x, t):
        y = self.third(self.second(self.first(x)))
        return om.mse_loss(y, t, impl=self.loss_impl)


def exact_conv_chain(x, t, layers, padding=(1, 1)):
    """The loss and weight gradients of convolutions ``layers`` ((w, b) each, applied in order)
    followed by the mean squared error against ``t``, in float64, for integer x, t, w and b,
    after checking that float32 computes every one of them *exactly*, in any summation order:
    every value is then an integer (forward, and the loss's sum of squares) or an integer
    multiple of 2 / t.size, a power of two (the gradients), and every partial sum of any order
    is bounded by the same sums over absolute values, which stay below 2**24 units, where
    float32 holds every integer. Any correct float32 computation must give these values to the
    last bit; a wrong read (an array taken in oneDNN's layout as plain, a stale or
    unconverted buffer) cannot hide in a tolerance. Returns (loss, [gw, ...])."""
    conv, limit, n = dict(padding=padding), 2.0 ** 24, t.size
    assert n & (n - 1) == 0, "the mean must divide by a power of two"
    hs, abs_hs = [np.float64(x)], [np.abs(np.float64(x))]
    for w, b in layers:
        hs.append(reference.conv2d(hs[-1], w, b, **conv))
        abs_hs.append(reference.conv2d(abs_hs[-1], np.abs(w), np.abs(b), **conv))
    d = hs.pop() - t
    worst = {"forward": max(a.max() for a in abs_hs[1:]) + np.abs(t).max(),
             "sum of squares": (d * d).sum()}  # nonnegative terms: partial sums <= the sum
    unit = 2.0 / n
    g, abs_g, grads = 2 * d / n, 2 * np.abs(d) / n, []
    for k, ((w, _), h, abs_h) in reversed(list(enumerate(zip(layers, hs, abs_hs)))):
        gx, gw, _ = reference.conv2d_grads(h, w, g, **conv)
        worst_gx, worst_gw, _ = reference.conv2d_grads(abs_h, np.abs(w), abs_g, **conv)
        worst[f"gx{k}"], worst[f"gw{k}"] = worst_gx.max() / unit, worst_gw.max() / unit
        grads.append(gw)
        g, abs_g = gx, worst_gx
    beyond = {name: value for name, value in worst.items() if not value < limit}
    assert not beyond, f"inputs too large for exact float32 sums: {beyond}"
    return float((d * d).sum() / n), grads[::-1]


@pytest.mark.parametrize("hybridize", [False, True], ids=["imperative", "hybridized"])
@pytest.mark.parametrize("impls", [("kernel", "kernel"), ("kernel", "explicit"),
                                   ("native", "native")], ids="-".join)
def test_inputs_and_gradients_in_onednn_layout(impls, hybridize):
    """Our impls between MXNet's own convolutions read MXNet's arrays right, whether or not
    oneDNN is active (when it is, MXNet's convolution outputs and input gradients are in its
    blocked layout: loader defects 2 and 3). Small integer data make every float32 result
    exact (exact_conv_chain), so both pipelines, ours and MXNet's own, must give the exact loss
    and weight gradients, bit for bit."""
    rng = np.random.default_rng(16)
    x = rng.integers(-1, 2, (2, 16, 8, 8)).astype(np.float32)
    t = rng.integers(-3, 4, (2, 16, 8, 8)).astype(np.float32)
    y = mx.nd.Convolution(mx.nd.array(x), mx.nd.ones((16, 16, 3, 3)), kernel=(3, 3),
                          num_filter=16, no_bias=True)
    if loader.onednn_active():
        with pytest.raises(mx.base.MXNetError, match="MKLDNN"):  # what the adapter works around
            y.to_dlpack_for_read()
    else:
        y.to_dlpack_for_read()  # oneDNN off (MXNET_MKLDNN_ENABLED=0): nothing is blocked
    # Sparse weights in {-1, 0, 1} and biases in {-1, 0, 1} keep every sum small.
    layers = [(rng.choice([-1.0, 0.0, 1.0], size=(16, 16, 3, 3), p=[0.05, 0.9, 0.05]),
               rng.integers(-1, 2, 16).astype(np.float64)) for _ in range(3)]
    loss_exact, gw_exact = exact_conv_chain(x, t, layers)
    for conv_impl, loss_impl in (("framework", "autograd"), impls):
        net = OneDNNPipeline(conv_impl, loss_impl)
        net.initialize()
        blocks = (net.first, net.second, net.third)
        for block, (w, b) in zip(blocks, layers):
            block.weight.set_data(mx.nd.array(w))
            block.bias.set_data(mx.nd.array(b))
        if hybridize:
            net.hybridize()
        for _ in range(3):  # the race this guards against does not show every time
            with mx.autograd.record():
                loss = net(mx.nd.array(x), mx.nd.array(t))
            loss.backward()
            impl = f"{conv_impl}/{loss_impl}"
            assert loss.asnumpy()[0] == loss_exact, impl
            for name, block, want in zip(("first", "ours", "third"), blocks, gw_exact):
                np.testing.assert_array_equal(block.weight.grad().asnumpy(), want,
                                              err_msg=f"{impl}: gw {name}")


# ---- bad input at the adapter -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.float16], ids=["int32", "float16"])
@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_kernel_impls_refuse_non_float32_64(loss_name, impl, dtype):
    x = mx.nd.ones((2, 3), dtype=dtype)
    with pytest.raises(TypeError, match=rf"ops.mxnet.{loss_name}_loss: x: impl='{impl}' runs "
                                        rf"our kernels.*{np.dtype(dtype).name}"):
        LOSSES[loss_name][0](x, x, impl=impl)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_bad_input_names_function_and_argument(impl):
    f32 = mx.nd.ones((2, 3))
    cases = [
        (TypeError, r"mse_loss: x: .*int32", (mx.nd.ones((2, 3), dtype="int32"), f32)),
        (ValueError, r"mse_loss: t: expected shape \(2, 3\) \(same as x\), got \(3, 2\)",
         (f32, mx.nd.ones((3, 2)))),
        (ValueError, r"mse_loss: v: expected shape \(2, 3\) \(same as x\), got \(2, 3, 1\)",
         (f32, f32, mx.nd.ones((2, 3, 1)))),
        (ValueError, r"mse_loss: t: expected shape \(2, 3\) .*got \(3,\)",
         (f32, mx.nd.ones((3,)))),
        (TypeError, r"mse_loss: t: expected float32 like x, got float64",
         (f32, mx.nd.ones((2, 3), dtype="float64"))),
        (ValueError, r"mse_loss: t: is on cpu\(1\) but x is on cpu\(0\)",
         (f32, mx.nd.ones((2, 3), ctx=mx.cpu(1)))),
        (TypeError, r"mse_loss: t: expected a dense NDArray, got storage type 'row_sparse'",
         (f32, f32.tostype("row_sparse"))),
        (TypeError, r"mse_loss: t: expected an mx.nd.NDArray like x, got ndarray",
         (f32, np.ones((2, 3), np.float32))),
        (TypeError, r"mse_loss: x: expected an mx.nd.NDArray \(or an mx.sym.Symbol in a "
                    r"hybridized block\), got list", ([[1.0]], f32)),
        (TypeError, r"mse_loss: t: expected an mx.sym.Symbol like x, got NDArray",
         (mx.sym.var("x"), f32)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match="ops.mxnet." + message):
            om.mse_loss(*args, impl=impl)


def test_unknown_impl_is_a_value_error_naming_the_choices():
    f32 = mx.nd.ones((1, 1, 3, 3))
    with pytest.raises(ValueError, match=r"ops.mxnet.deeppose_loss: impl: expected one of "
                                         r"'autograd', 'explicit', 'kernel', 'native', got 'fast'"):
        om.deeppose_loss(f32, f32, impl="fast")
    with pytest.raises(ValueError, match=r"ops.mxnet.conv2d: impl: .*'framework'.*got 'autograd'"):
        om.conv2d(f32, f32, impl="autograd")


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_bad_input_names_function_and_argument(impl):
    x, w = mx.nd.ones((2, 3, 6, 6)), mx.nd.ones((4, 3, 3, 3))
    cases = [
        (TypeError, r"x: .*int32", (x.astype("int32"), w.astype("int32")), {}),
        (TypeError, r"w: expected float32 like x, got float64", (x, w.astype("float64")), {}),
        (ValueError, r"x: expected a 4-d array", (x[0], w), {}),
        (ValueError, r"w: expected \(Cout, 3, kh, kw\)", (x, mx.nd.ones((4, 2, 3, 3))), {}),
        (ValueError, r"b: expected shape \(4,\) .*got \(3,\)", (x, w, mx.nd.ones(3)), {}),
        (ValueError, r"stride: expected values in \[1", (x, w), dict(stride=0)),
        (TypeError, r"padding: expected an int or a pair", (x, w), dict(padding=1.5)),
        (ValueError, r"w: kernel height extent 7 .* larger than the padded input",
         (x, w), dict(dilation=3)),
        (ValueError, r"w: is on cpu\(1\) but x is on cpu\(0\)",
         (x, mx.nd.ones((4, 3, 3, 3), ctx=mx.cpu(1))), {}),
    ]
    for error, message, args, params in cases:
        with pytest.raises(error, match="ops.mxnet.conv2d: " + message):
            om.conv2d(*args, impl=impl, **params)


@pytest.mark.parametrize("dtype", [np.int32, np.float16], ids=["int32", "float16"])
@pytest.mark.parametrize("impl", ["kernel", "native"])
def test_conv2d_kernel_impls_refuse_non_float32_64(impl, dtype):
    x, w = mx.nd.ones((1, 2, 4, 4), dtype=dtype), mx.nd.ones((3, 2, 3, 3), dtype=dtype)
    with pytest.raises(TypeError, match=rf"ops.mxnet.conv2d: x: impl='{impl}' runs our "
                                        rf"kernels.*{np.dtype(dtype).name}"):
        om.conv2d(x, w, impl=impl)


def test_conv2d_on_symbols_checks_parameters_and_needs_the_block_for_framework():
    with pytest.raises(TypeError, match=r"ops.mxnet.conv2d: impl='framework' takes NDArrays "
                                        r"only.*use ops.mxnet.Conv2D"):
        om.conv2d(mx.sym.var("x"), mx.sym.var("w"), impl="framework")
    with pytest.raises(ValueError, match=r"ops.mxnet.conv2d: stride: expected values in \[1"):
        om.conv2d(mx.sym.var("x"), mx.sym.var("w"), stride=(1, 0), impl="kernel")


@pytest.mark.parametrize("impl", ["explicit", "kernel", "native"])
def test_bad_shapes_in_a_hybridized_block_are_an_mxnet_error_naming_the_argument(impl, capsys):
    """In a graph the shapes come with the first call: MXNet's shape inference refuses them,
    with our message (native: in the MXNetError; CustomOps: MXNet prints it, then raises)."""
    block = LossBlock(om.mse_loss, impl)
    block.hybridize()
    with pytest.raises(mx.base.MXNetError) as error:
        block(mx.nd.ones((2, 3)), mx.nd.ones((3, 2)))
    shown = str(error.value) + capsys.readouterr().out
    assert re.search(r"t: expected shape \(2, 3\) \(same as x\), got \(3, 2\)", shown), shown


# ---- bad input at the native operators (in a subprocess: a crash must show as one) -------------

NATIVE_BAD_INPUT_SCRIPT = textwrap.dedent(r"""
    import re
    import mxnet as mx
    from ops.mxnet import loader
    assert loader.native_unavailable_reason() is None
    x, f64 = mx.nd.ones((2, 3)), mx.nd.ones((2, 3), dtype="float64")
    xc, w = mx.nd.ones((1, 2, 4, 4)), mx.nd.ones((3, 2, 3, 3))
    loss, conv = mx.nd.deepprof_sq_error_loss, mx.nd.deepprof_conv2d
    cases = [
        (lambda: loss(x, mx.nd.ones((3,)), count_factor=1),
         r"deepprof_sq_error_loss: t: expected shape \(2, 3\) \(same as x\), got \(3,\)"),
        (lambda: loss(x, x, mx.nd.ones((2, 1)), count_factor=1, masked=True),
         r"deepprof_sq_error_loss: v: expected shape \(2, 3\)"),
        (lambda: loss(x, x), r"count_factor: required"),
        (lambda: loss(x, x, count_factor="nan"), r"count_factor: expected a finite number > 0"),
        (lambda: loss(x, x, count_factor=-1), r"count_factor: expected a finite number > 0"),
        (lambda: loss(x, x, count_factor=1, masked="maybe"), r"masked: expected 0, 1, true"),
        (lambda: loss(x, x, count_factor=1, mask=True), r"unknown attribute 'mask'"),
        (lambda: loss(x, x, x, count_factor=1), r"expects 2 inputs, but got 3"),
        (lambda: loss(x.astype("int32"), x.astype("int32"), count_factor=1),
         r"deepprof_sq_error_loss: x: expected float32 or float64, got int32"),
        (lambda: loss(x.astype("float16"), x.astype("float16"), count_factor=1),
         r"x: expected float32 or float64, got float16"),
        (lambda: loss(x, f64, count_factor=1), r"t: expected float32 like x, got float64"),
        (lambda: conv(xc, mx.nd.ones((3, 2, 5, 5)), no_bias=True),
         r"deepprof_conv2d: w: kernel height extent 5 \(size 5, dilation 1\) is larger than "
         r"the padded input height 4 \(4 \+ 2\*0\)"),
        (lambda: conv(xc, w, no_bias=True, stride="(0, 1)"),
         r"deepprof_conv2d: stride: expected values in \[1, 2\*\*31 - 1\], got '\(0, 1\)'"),
        (lambda: conv(xc, w, no_bias=True, padding="(1, 2, 3)"),
         r"padding: expected an int or a pair of ints"),
        (lambda: conv(xc, w, no_bias=True, dilation="two"), r"dilation: expected an int"),
        (lambda: conv(xc, w, no_bias=True, padding=2**31), r"padding: expected values in"),
        (lambda: conv(xc, w, no_bias=True, strides=2), r"unknown attribute 'strides'"),
        (lambda: conv(xc, w), r"expects 3 inputs, but got 2"),
        (lambda: conv(xc, w, mx.nd.ones((2,))),
         r"deepprof_conv2d: b: expected shape \(3,\) to match the 3 output channels of w, "
         r"got \(2,\)"),
        (lambda: conv(xc, mx.nd.ones((3, 1, 3, 3)), no_bias=True),
         r"deepprof_conv2d: w: expected \(Cout, 2, kh, kw\) to match the 2 input channels"),
        (lambda: conv(xc[0], w, no_bias=True), r"x: expected a 4-d array \(B, Cin, H, W\)"),
        (lambda: conv(xc, mx.nd.ones((3, 2, 3)), no_bias=True), r"w: expected 4 positive sizes"),
        (lambda: conv(xc.astype("float64"), w, no_bias=True),
         r"w: expected float64 like x, got float32"),
        (lambda: conv(xc.astype("int64"), w.astype("int64"), no_bias=True),
         r"x: expected float32 or float64, got int64"),
        (lambda: mx.sym.deepprof_conv2d(mx.sym.var("x"), mx.sym.var("w"), no_bias=True)
                 .infer_shape(w=(3, 2, 3, 3)), r"x: shape unknown"),
    ]
    for call, pattern in cases:
        try:
            result = call()
            for r in result if isinstance(result, (list, tuple)) else [result]:
                if isinstance(r, mx.nd.NDArray):
                    r.wait_to_read()
        except mx.base.MXNetError as error:
            assert re.search(pattern, str(error)), (pattern, str(error))
            assert str(error).count("Extension Traceback") <= 1, str(error)
        else:
            raise AssertionError(f"no MXNetError for {pattern}")
    # A gradient of the wrong shape through autograd: MXNet's own check, still no crash.
    xg = mx.nd.ones((1, 2, 4, 4))
    xg.attach_grad()
    with mx.autograd.record():
        y = conv(xg, w, no_bias=True)
    try:
        y.backward(mx.nd.ones((1, 3, 3, 3)))
        xg.grad.wait_to_read()
    except mx.base.MXNetError:
        pass
    # Still usable afterwards, and only this call's message is reported.
    try:
        loss(x, mx.nd.ones((4,)), count_factor=1)
    except mx.base.MXNetError as error:
        assert "got (4,)" in str(error) and "got (3,)" not in str(error), str(error)
    print(float(loss(x, x * 3, count_factor=1)[0].asscalar()))
""")


@needs_native
def test_native_ops_called_directly_refuse_bad_input_without_crashing():
    done = subprocess.run([sys.executable, "-c", NATIVE_BAD_INPUT_SCRIPT], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "4.0"


# ---- impl_support and the loader ----------------------------------------------------------------

def test_impl_support_and_available_impls():
    for kind, names in (("loss", LOSS_IMPLS), ("conv", CONV_IMPLS)):
        for device in ("cpu", "cpu:0", mx.cpu(), mx.cpu_pinned()):
            support = om.impl_support(kind, device)
            assert tuple(support) == names
            assert om.available_impls(kind, device) == tuple(
                impl for impl in names if impl != "native" or NATIVE is None)
        assert tuple(om.impl_support(kind, "gpu")) == names
        assert om.impl_support(kind, "cuda:0") == om.impl_support(kind, mx.gpu(0))
        if mx.context.num_gpus() == 0:
            assert om.available_impls(kind, "gpu:0") == ()
        else:
            assert "kernel" not in om.available_impls(kind, mx.gpu())
    with pytest.raises(ValueError, match="impl_support: kind: expected 'loss' or 'conv'"):
        om.available_impls("pool")
    with pytest.raises(ValueError, match="impl_support: device: expected 'cpu', 'gpu'"):
        om.impl_support("loss", "tpu")


def test_unavailable_impls_raise_unsupported_with_the_reason():
    reason = om.impl_support("loss", "gpu")["kernel"]
    assert reason
    with pytest.raises(UnsupportedImplError, match=r"ops.mxnet.mse_loss: impl='kernel' is not "
                                                   r"available here: "):
        check_impl("ops.mxnet.mse_loss", "kernel", LOSS_IMPLS,
                   loader.unavailable_impls("loss", mx.gpu()))


def test_function_refuses_a_second_call():
    f = om.loss.SqErrorLossExplicit(None, 1.0)
    f(mx.nd.ones((2,)), mx.nd.zeros((2,)))
    with pytest.raises(RuntimeError, match="can only be called once"):
        f(mx.nd.ones((2,)), mx.nd.zeros((2,)))


# ---- GPU contexts -------------------------------------------------------------------------------

NO_GPU = ("this MXNet has no GPU (mx.context.num_gpus() is 0)"
          if mx.context.num_gpus() == 0 else "")
gpu_only = pytest.mark.skipif(bool(NO_GPU), reason=NO_GPU)


@gpu_only
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_gpu_loss_matches_reference(impl):
    if impl not in om.available_impls("loss", mx.gpu()):
        pytest.skip(om.impl_support("loss", mx.gpu())[impl])
    x, t, v = loss_inputs(np.float32, "binary", seed=14)
    xa, ta = mx.nd.array(x, ctx=mx.gpu()), mx.nd.array(t, ctx=mx.gpu())
    xa.attach_grad()
    with mx.autograd.record():
        loss = om.deeppose_loss(xa, ta, mx.nd.array(v, ctx=mx.gpu()), impl=impl)
    loss.backward()
    for got, want in zip((loss.asnumpy()[0], xa.grad.asnumpy()),
                         loss_reference(x, t, v, 0.5, 1.0)):
        np.testing.assert_allclose(got, want, rtol=1e-5)


@gpu_only
@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_gpu_conv2d_matches_reference(impl):
    if impl not in om.available_impls("conv", mx.gpu()):
        pytest.skip(om.impl_support("conv", mx.gpu())[impl])
    x, w, b, gy, params = conv_inputs(CONV_CASES[3], np.float64, seed=15)
    xa, wa, ba = (mx.nd.array(a, ctx=mx.gpu(), dtype=np.float64) for a in (x, w, b))
    wa.attach_grad()
    with mx.autograd.record():
        y = om.conv2d(xa, wa, ba, impl=impl, **params)
    y.backward(mx.nd.array(gy, ctx=mx.gpu(), dtype=np.float64))
    np.testing.assert_allclose(y.asnumpy(), reference.conv2d(x, w, b, **pairs(params)),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(wa.grad.asnumpy(),
                               reference.conv2d_grads(x, w, gy, **pairs(params))[1],
                               rtol=1e-10, atol=1e-10)


@gpu_only
def test_gpu_kernel_impl_is_refused_with_the_reason():
    x = mx.nd.ones((2, 3), ctx=mx.gpu())
    with pytest.raises(UnsupportedImplError, match="non-blocking CUDA streams"):
        om.mse_loss(x, x, impl="kernel")
