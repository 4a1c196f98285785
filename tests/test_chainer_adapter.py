"""The Chainer adapter (ops.chainer): every impl of the losses and of conv2d against the NumPy
float64 reference and against each other, Chainer's gradient check, the drop-in link, bad input
at the adapter, the import loader, and the same on CuPy arrays where there is a GPU (skipped with
a reason elsewhere)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import ops
import ops.chainer as oc
from ops import core
from ops.chainer import loader
from ops.impls import CONV_IMPLS, LOSS_IMPLS, UnsupportedImplError
from tests.kernel_calls import (
    ADAPTER_CONV_CASES as CONV_CASES, conv_case_id as case_id,
    conv_case_inputs as conv_inputs, loss_reference, pairs, MASKS, loss_inputs,
    assert_conv_results_agree, assert_conv2d_matches_reference)

chainer = loader.load_chainer()
gradient_check = loader.load_gradient_check()

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]
# The tolerances for the loss: elementwise, against the float64 reference.
LOSS_TOL = {np.float32: dict(rtol=1e-5, atol=0), np.float64: dict(rtol=1e-10, atol=0)}
LOSSES = {"mse": (oc.mse_loss, core.MSE_COUNT_FACTOR),
          "deeppose": (oc.deeppose_loss, core.DEEPPOSE_COUNT_FACTOR)}


# ---- helpers ------------------------------------------------------------------------------------

def run_loss(function, impl, x, t, v, grad_loss=0.7, xp=np):
    """(loss, gx, gt) as NumPy arrays, through Chainer's backward with upstream grad_loss."""
    xv, tv = chainer.Variable(xp.array(x)), chainer.Variable(xp.array(t))
    loss = function(xv, tv, None if v is None else xp.array(v), impl=impl)
    assert loss.shape == () and loss.dtype == x.dtype
    loss.grad = xp.array(grad_loss, dtype=x.dtype)
    loss.backward()
    return tuple(chainer.backend.CpuDevice().send(a) for a in (loss.array, xv.grad, tv.grad))





def run_conv(impl, x, w, b, gy, params, xp=np):
    """(y, gx, gw, gb) as NumPy arrays (gb None without a bias)."""
    xv, wv = chainer.Variable(xp.array(x)), chainer.Variable(xp.array(w))
    bv = None if b is None else chainer.Variable(xp.array(b))
    y = oc.conv2d(xv, wv, bv, impl=impl, **params)
    assert y.dtype == x.dtype
    y.grad = xp.array(gy)
    y.backward()
    cpu = chainer.backend.CpuDevice()
    return tuple(None if a is None else cpu.send(a)
                 for a in (y.array, xv.grad, wv.grad, None if bv is None else bv.grad))


# ---- losses: reference, each other, Chainer, gradient check --------------------------------------

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


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_impls_agree(loss_name, dtype, mask):
    function, _ = LOSSES[loss_name]
    x, t, v = loss_inputs(dtype, mask, seed=1)
    first, *others = [run_loss(function, impl, x, t, v) for impl in LOSS_IMPLS]
    for impl, result in zip(LOSS_IMPLS[1:], others):
        for name, got, want in zip(("loss", "gx", "gt"), result, first):
            np.testing.assert_allclose(got, want, err_msg=f"{impl} vs {LOSS_IMPLS[0]}: {name}",
                                       **LOSS_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_mse_without_mask_is_chainer_mean_squared_error(impl, dtype):
    x, t, _ = loss_inputs(dtype, "nomask", seed=2)
    ours = run_loss(oc.mse_loss, impl, x, t, None, grad_loss=1.0)
    xv, tv = chainer.Variable(x.copy()), chainer.Variable(t.copy())
    theirs = chainer.functions.mean_squared_error(xv, tv)
    theirs.backward()
    for name, got, want in zip(("loss", "gx", "gt"), ours, (theirs.array, xv.grad, tv.grad)):
        np.testing.assert_allclose(got, want, err_msg=name, **LOSS_TOL[dtype])


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_target_gets_a_gradient_only_when_it_needs_one(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=3)
    for target in (t, chainer.Variable(t, requires_grad=False)):
        xv = chainer.Variable(x.copy())
        oc.deeppose_loss(xv, target, v, impl=impl).backward()
        np.testing.assert_allclose(xv.grad, loss_reference(x, t, v, 0.5, 1.0)[1], rtol=1e-10)
    assert target.grad is None


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_mask_is_a_constant_even_as_a_variable(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=8)
    xv, mask = chainer.Variable(x.copy()), chainer.Variable(v.copy())
    oc.mse_loss(xv, t, mask, impl=impl).backward()
    assert mask.grad is None
    np.testing.assert_allclose(xv.grad, loss_reference(x, t, v, 1.0, 1.0)[1], rtol=1e-10)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_takes_non_contiguous_arrays(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=4, shape=(2, 17, 4))
    x, t, v = x.transpose(2, 1, 0), t[:, :, ::-1].transpose(2, 1, 0), v.transpose(2, 1, 0)
    got = run_loss(oc.mse_loss, impl, x, t, v)
    for name, g, w in zip(("loss", "gx", "gt"), got, loss_reference(x, t, v, 1.0)):
        np.testing.assert_allclose(g, w, rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("mask", ["nomask", "binary", "fractional"])
@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_check_backward(loss_name, impl, mask):
    """Chainer's own gradient check (finite differences along a random direction), float64."""
    function, _ = LOSSES[loss_name]
    x, t, v = loss_inputs(np.float64, mask, seed=5, shape=(3, 5, 2))
    gradient_check.check_backward(lambda x, t: function(x, t, v, impl=impl), (x, t),
                                  np.array(0.7), eps=1e-3, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_double_backprop_only_where_chainer_differentiates(impl):
    x, t, v = loss_inputs(np.float64, "binary", seed=6)
    loss = oc.mse_loss(chainer.Variable(x), t, v, impl=impl)
    if impl == "autograd":
        loss.backward(enable_double_backprop=True)
    else:
        with pytest.raises(NotImplementedError, match="first-order only"):
            loss.backward(enable_double_backprop=True)


@pytest.mark.parametrize("impl", ["autograd", "explicit"])
def test_loss_framework_impls_take_float16(impl):
    x, t, v = loss_inputs(np.float16, "binary", seed=7)
    got = run_loss(oc.mse_loss, impl, x, t, v)
    for name, g, w in zip(("loss", "gx", "gt"), got, loss_reference(x, t, v, 1.0)):
        assert g.dtype == np.float16
        np.testing.assert_allclose(g, w, rtol=1e-2, atol=1e-3, err_msg=name)


# ---- conv2d: reference, each other, gradient check -----------------------------------------------

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
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
def test_conv2d_impls_agree(case, dtype):
    x, w, b, gy, params = conv_inputs(case, dtype, seed=1)
    first, *others = [run_conv(impl, x, w, b, gy, params) for impl in CONV_IMPLS]
    for result in others:
        assert_conv_results_agree(result, first, x, w, b, gy, params)


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3], CONV_CASES[4]], ids=case_id)
def test_conv2d_check_backward(case, impl):
    x, w, b, gy, params = conv_inputs(case, np.float64, seed=2)
    inputs = (x, w) if b is None else (x, w, b)
    gradient_check.check_backward(lambda *a: oc.conv2d(*a, impl=impl, **params), inputs, gy,
                                  eps=1e-3, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("impl", ["kernel", "native"])
def test_conv2d_kernel_takes_non_contiguous_arrays_and_is_first_order(impl):
    x, w, b, gy, params = conv_inputs(CONV_CASES[1], np.float64, seed=3)
    x_view = np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)
    w_view = np.ascontiguousarray(w[:, ::-1])[:, ::-1]
    assert not x_view.flags.c_contiguous and not w_view.flags.c_contiguous
    ours = run_conv(impl, x_view, w_view, b, gy, params)
    assert_conv2d_matches_reference(ours, x, w, b, gy, pairs(params))
    y = oc.conv2d(chainer.Variable(x), w, b, impl=impl, **params)
    y.grad = gy
    with pytest.raises(NotImplementedError, match="first-order only"):
        y.backward(enable_double_backprop=True)


# ---- the link -----------------------------------------------------------------------------------

LINK_ARGS = dict(in_channels=3, out_channels=5, ksize=(3, 2), stride=(2, 1), pad=1,
                 dilate=(1, 2))


def link_inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 3, 9, 8))


def link_results(link, x, gy):
    """(y, gx, gW, gb) through the link, gradients cleared first."""
    link.cleargrads()
    xv = chainer.Variable(x.copy())
    y = link(xv)
    y.grad = gy
    y.backward()
    return y.array, xv.grad, link.W.grad, None if link.b is None else link.b.grad


def assert_results_close(got, want, rtol=1e-10):
    for name, g, w in zip(("y", "gx", "gW", "gb"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-11, err_msg=name)


@pytest.mark.parametrize("nobias", [False, True], ids=["bias", "nobias"])
@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_link_with_chainer_links_params_matches_it(impl, nobias):
    with chainer.using_config("dtype", np.float64):
        theirs = chainer.links.Convolution2D(**LINK_ARGS, nobias=nobias,
                                             initial_bias=None if nobias else 0.5)
        ours = oc.Convolution2D(**LINK_ARGS, nobias=nobias, impl=impl)
    ours.copyparams(theirs)
    x = link_inputs()
    gy = np.random.default_rng(1).standard_normal(theirs(x).shape)
    assert_results_close(link_results(ours, x, gy), link_results(theirs, x, gy))


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_link_lazy_in_channels_and_serializers_round_trip(impl, tmp_path):
    """npz saved from chainer.links.Convolution2D loads into ours, initialised or lazy."""
    with chainer.using_config("dtype", np.float64):
        theirs = chainer.links.Convolution2D(**LINK_ARGS, initial_bias=0.25)
        eager = oc.Convolution2D(**LINK_ARGS, impl=impl)
        lazy = oc.Convolution2D(None, 5, (3, 2), stride=(2, 1), pad=1, dilate=(1, 2), impl=impl)
        assert lazy.W.array is None
        path = str(tmp_path / "conv.npz")
        chainer.serializers.save_npz(path, theirs)
        chainer.serializers.load_npz(path, eager)
        chainer.serializers.load_npz(path, lazy)  # a lazy W takes its dtype from the config
    x = link_inputs(seed=2)
    gy = np.random.default_rng(3).standard_normal(theirs(x).shape)
    want = link_results(theirs, x, gy)
    for link in (eager, lazy):
        np.testing.assert_array_equal(link.W.array, theirs.W.array)
        np.testing.assert_array_equal(link.b.array, theirs.b.array)
        assert_results_close(link_results(link, x, gy), want)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_link_lazy_init_on_first_call(impl):
    link = oc.Convolution2D(4, 3, impl=impl)  # Chainer's shorthand: (out_channels, ksize)
    y = link(np.ones((1, 2, 5, 5), np.float32))
    assert link.W.shape == (4, 2, 3, 3) and y.shape == (1, 4, 3, 3)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_link_from_params(impl):
    with chainer.using_config("dtype", np.float64):
        theirs = chainer.links.Convolution2D(**LINK_ARGS, initial_bias=0.1)
        ours = oc.Convolution2D.from_params(theirs.W, theirs.b, stride=(2, 1), pad=1,
                                            dilate=(1, 2), impl=impl)
    assert ours.impl == impl and f"impl={impl})" in str(ours)
    x = link_inputs(seed=4)
    gy = np.random.default_rng(5).standard_normal(theirs(x).shape)
    assert_results_close(link_results(ours, x, gy), link_results(theirs, x, gy))


def test_link_groups_need_the_framework_impl():
    for impl in ("kernel", "native"):
        with pytest.raises(NotImplementedError, match=r"Convolution2D: groups: .*groups=1"):
            oc.Convolution2D(4, 6, 3, groups=2, impl=impl)
    link = oc.Convolution2D(4, 6, 3, groups=2)
    with pytest.raises(NotImplementedError, match="groups"):
        link.impl = "kernel"
    assert link.impl == "framework" and link(np.ones((1, 4, 5, 5), np.float32)).shape == (
        1, 6, 3, 3)


def test_link_unknown_impl():
    with pytest.raises(ValueError, match=r"ops.chainer.Convolution2D: impl: .*'cudnn'"):
        oc.Convolution2D(3, 4, 3, impl="cudnn")


# ---- bad input at the adapter -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.float16], ids=["int32", "float16"])
@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_kernel_impls_refuse_non_float32_64(loss_name, impl, dtype):
    x = np.ones((2, 3), dtype)
    with pytest.raises(TypeError, match=rf"ops.chainer.{loss_name}_loss: x: .*"
                                        rf"{np.dtype(dtype).name}"):
        LOSSES[loss_name][0](x, x, impl=impl)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_bad_input_names_function_and_argument(impl):
    f32 = np.ones((2, 3), np.float32)
    cases = [
        (TypeError, r"mse_loss: x: .*int32", (np.ones((2, 3), np.int32), f32)),
        (ValueError, r"mse_loss: t: expected shape \(2, 3\) \(same as x\), got \(3, 2\)",
         (f32, np.ones((3, 2), np.float32))),
        (ValueError, r"mse_loss: v: expected shape \(2, 3\) \(same as x\), got \(2, 3, 1\)",
         (f32, f32, np.ones((2, 3, 1), np.float32))),
        (ValueError, r"mse_loss: x: expected a non-empty array", (f32[:0], f32[:0])),
        (TypeError, r"mse_loss: t: expected float32 like x, got float64",
         (f32, np.ones((2, 3)))),
        (TypeError, r"mse_loss: v: .*bool", (f32, f32, np.ones((2, 3), bool))),
        (TypeError, r"mse_loss: x: expected a chainer.Variable or a NumPy/CuPy array, "
                    r"got list", ([[1.0]], f32)),
    ]
    for error, message, args in cases:
        with pytest.raises(error, match="ops.chainer." + message):
            oc.mse_loss(*args, impl=impl)


def test_unknown_impl_is_a_value_error_naming_the_choices():
    f32 = np.ones((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"ops.chainer.deeppose_loss: impl: .*'autograd'"):
        oc.deeppose_loss(f32, f32, impl="cudnn")
    with pytest.raises(ValueError, match=r"ops.chainer.conv2d: impl: .*'framework'"):
        oc.conv2d(f32, f32, impl="autograd")


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv2d_bad_input_names_function_and_argument(impl):
    x = np.ones((2, 3, 6, 6), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    cases = [
        (TypeError, r"x: .*int32", (x.astype(np.int32), w.astype(np.int32)), {}),
        (TypeError, r"w: expected float32 like x, got float64", (x, w.astype(np.float64)), {}),
        (ValueError, r"x: expected a 4-d array", (x[0], w), {}),
        (ValueError, r"w: expected \(Cout, 3, kh, kw\)", (x, w[:, :2]), {}),
        (ValueError, r"b: expected shape \(4,\) .*got \(3,\)",
         (x, w, np.ones(3, np.float32)), {}),
        (ValueError, r"stride: expected values in \[1", (x, w), dict(stride=0)),
        (TypeError, r"padding: expected an int or a pair", (x, w), dict(padding=1.5)),
        (ValueError, r"w: kernel height extent 7 .* larger than the padded input",
         (x, w), dict(dilation=3)),
    ]
    for error, message, args, params in cases:
        with pytest.raises(error, match="ops.chainer.conv2d: " + message):
            oc.conv2d(*args, impl=impl, **params)


@pytest.mark.parametrize("dtype", [np.int32, np.float16], ids=["int32", "float16"])
@pytest.mark.parametrize("impl", ["kernel", "native"])
def test_conv2d_kernel_impls_refuse_non_float32_64(impl, dtype):
    x, w = np.ones((1, 2, 4, 4), dtype), np.ones((3, 2, 3, 3), dtype)
    with pytest.raises(TypeError, match=rf"ops.chainer.conv2d: x: impl='{impl}' runs our "
                                        rf"kernels.*{np.dtype(dtype).name}"):
        oc.conv2d(x, w, impl=impl)


def test_framework_conv_takes_float16():
    x, w, b, gy, params = conv_inputs(CONV_CASES[1], np.float16)
    y = oc.conv2d(x, w, b, impl="framework", **params)
    assert y.dtype == np.float16 and y.shape == gy.shape


def test_kernel_impls_where_this_machine_cannot_run_them_are_unsupported():
    if ops.cuda_available():
        pytest.skip("this machine runs our kernels on CuPy arrays")
    reason = oc.impl_support("loss", "cuda")["kernel"]
    assert reason is not None and set(oc.available_impls("conv", "@cupy:0")) <= {"framework"}
    with pytest.raises(UnsupportedImplError, match=r"ops.chainer.mse_loss: impl='kernel' is "
                                                   r"not available here: "):
        ops.impls.check_impl("ops.chainer.mse_loss", "kernel", LOSS_IMPLS,
                             loader.unavailable_impls("loss", "cuda:0"))


# ---- impl_support and the loader ----------------------------------------------------------------

def test_impl_support_and_available_impls():
    for kind, names in (("loss", LOSS_IMPLS), ("conv", CONV_IMPLS)):
        for device in ("cpu", "@numpy", chainer.backend.CpuDevice()):
            support = oc.impl_support(kind, device)
            assert tuple(support) == names and all(r is None for r in support.values())
            assert oc.available_impls(kind, device) == names
        assert tuple(oc.impl_support(kind, "cuda")) == names
        on_gpu = oc.available_impls(kind, "cuda")
        assert ("kernel" in on_gpu) == ("native" in on_gpu) == (cupy is not None)
    with pytest.raises(ValueError, match="impl_support: kind: expected 'loss' or 'conv'"):
        oc.available_impls("pool")
    with pytest.raises(ValueError, match="impl_support: device: expected 'cpu'"):
        oc.impl_support("loss", "tpu")


def test_loader_imports_chainer_cleanly_in_a_fresh_process():
    """Without SETUPTOOLS_USE_DISTUTILS, ``import chainer`` alone fails here; through the loader
    it works, says so in one log line, and leaves the root logger as it was (trying
    numpy.distutils under setuptools' distutils would re-class it and reset its level)."""
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s|%(message)s')\n"
        "import ops.chainer\n"
        "import chainer\n"
        "assert chainer.__version__, 'no chainer'\n"
        "print(type(logging.root).__name__, logging.root.level,\n"
        "      'numpy.distutils' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "SETUPTOOLS_USE_DISTUTILS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RootLogger", "20", "False"]
    lines = [line for line in done.stderr.splitlines() if line.startswith("ops.chainer.loader|")]
    assert len(lines) == 1 and "environment check" in lines[0], done.stderr


# ---- CuPy arrays (GPU) --------------------------------------------------------------------------

def _cupy_or_reason():
    if not ops.cuda_available():
        return None, "no usable CUDA device (or ops._C built without CUDA)"
    try:
        import cupy
    except ImportError as error:
        return None, f"CuPy is not installed: {error}"
    if not chainer.backends.cuda.available:
        return None, "Chainer does not see CuPy / a CUDA device"
    return cupy, ""


cupy, NO_GPU_REASON = _cupy_or_reason()


def gpu_only(test):
    return pytest.mark.cuda(pytest.mark.skipif(cupy is None, reason=NO_GPU_REASON)(test))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", LOSS_IMPLS)
@pytest.mark.parametrize("loss_name", LOSSES)
@gpu_only
def test_gpu_loss_matches_reference(loss_name, impl, dtype, mask):
    function, count_factor = LOSSES[loss_name]
    x, t, v = loss_inputs(dtype, mask, seed=10)
    got = run_loss(function, impl, x, t, v, xp=cupy)
    for name, g, w in zip(("loss", "gx", "gt"), got, loss_reference(x, t, v, count_factor)):
        assert g.dtype == dtype and np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g, w, err_msg=name, **LOSS_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=case_id)
@gpu_only
def test_gpu_conv2d_matches_reference_and_cpu(case, impl, dtype):
    x, w, b, gy, params = conv_inputs(case, dtype, seed=11)
    ours = run_conv(impl, x, w, b, gy, params, xp=cupy)
    assert_conv2d_matches_reference(ours, x, w, b, gy, pairs(params))
    assert_conv_results_agree(ours, run_conv("kernel", x, w, b, gy, params), x, w, b, gy,
                              params)


@pytest.mark.parametrize("impl", CONV_IMPLS)
@gpu_only
def test_gpu_link_matches_chainer_link(impl):
    with chainer.using_config("dtype", np.float64):
        theirs = chainer.links.Convolution2D(**LINK_ARGS, initial_bias=0.5)
        ours = oc.Convolution2D(**LINK_ARGS, impl=impl)
    ours.copyparams(theirs)
    want = link_results(theirs, link_inputs(), np.ones((2, 5, 5, 8)))
    ours.to_gpu()
    x, gy = cupy.array(link_inputs()), cupy.ones((2, 5, 5, 8))
    got = [None if a is None else cupy.asnumpy(a) for a in link_results(ours, x, gy)]
    assert_results_close(got, want)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
@gpu_only
def test_gpu_loss_refuses_mixed_devices(impl):
    x = cupy.ones((2, 3), cupy.float32)
    with pytest.raises(ValueError, match=r"ops.chainer.mse_loss: t: is on .*CpuDevice.* but x "
                                         r"is on .*GpuDevice"):
        oc.mse_loss(x, np.ones((2, 3), np.float32), impl=impl)
