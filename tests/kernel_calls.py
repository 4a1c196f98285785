"""Test helpers: call the kernels through ops.core on NumPy arrays, allocating outputs the way an
adapter would, and return NumPy results."""

from __future__ import annotations

import numpy as np

from ops import core, reference


def conv2d_all(x, w, b=None, gy=None, *, stride=1, padding=0, dilation=1):
    """(y, gx, gw, gb) from our kernels; the gradients are None when gy is None."""
    y = np.empty(core.conv2d_output_shape(x.shape, w.shape, stride=stride, padding=padding,
                                          dilation=dilation), x.dtype)
    params = dict(stride=stride, padding=padding, dilation=dilation)
    core.conv2d_forward(x, w, b, y, **params)
    if gy is None:
        return y, None, None, None
    gx, gw = np.empty_like(x), np.empty_like(w)
    core.conv2d_backward_data(gy, w, gx, **params)
    core.conv2d_backward_weight(x, gy, gw, **params)
    gb = np.empty((w.shape[0],), x.dtype)
    core.conv2d_backward_bias(gy, gb)
    return y, gx, gw, gb


def sq_error_loss_all(x, t, v=None, *, count_factor, grad_loss=1.0, with_gt=True):
    """(loss, count, gx, gt) from our kernels as float64 scalars / NumPy arrays."""
    loss, count = np.empty((), x.dtype), np.empty((), x.dtype)
    core.sq_error_loss_forward(x, t, v, loss, count, count_factor=count_factor)
    gx = np.empty_like(x)
    gt = np.empty_like(x) if with_gt else None
    g = np.array(grad_loss, x.dtype)
    core.sq_error_loss_backward(x, t, v, count, g, gx, gt, count_factor=count_factor)
    return float(loss), float(count), gx, gt


def pair(value):
    return value if isinstance(value, tuple) else (value, value)


def assert_conv2d_matches_reference(ours, x, w, b, gy, params):
    """ours = (y, gx, gw, gb) from any conv2d implementation (gb may be None), against the
    float64 reference: rtol 1e-10 for float64 inputs; for float32, within the rounding-error
    bound of reference.conv2d_error_bound plus one ulp of the final rounding."""
    y, gx, gw, gb = ours
    y_ref = reference.conv2d(x, w, b, **params)
    gx_ref, gw_ref, gb_ref = reference.conv2d_grads(x, w, gy, **params)
    pairs = (("y", y, y_ref), ("gx", gx, gx_ref), ("gw", gw, gw_ref))
    if x.dtype == np.float64:
        for name, got, want in pairs:
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11, err_msg=name)
        tolerance = dict(rtol=1e-10, atol=1e-11)
    else:
        bounds = reference.conv2d_error_bound(x, w, b, gy, **params)
        ulp = 2.0 ** -23
        for (name, got, want), bound in zip(pairs, bounds):
            excess = np.abs(got - want) - (bound + ulp * np.abs(want))
            assert np.all(excess <= 0), f"{name}: beyond the rounding bound by {excess.max():.3g}"
        tolerance = dict(rtol=1e-6, atol=1e-6)
    if gb is not None:
        np.testing.assert_allclose(gb, gb_ref, err_msg="gb", **tolerance)


# (batch, Cin, H, W, Cout, (kh, kw), stride, padding, dilation, bias): the conv cases the
# adapter tests share, a subset of tests/test_conv2d.py's grid small enough for every impl and
# dtype of every framework.
ADAPTER_CONV_CASES = [
    (1, 1, 5, 5, 1, (1, 1), 1, 0, 1, False),
    (1, 3, 7, 9, 4, (3, 3), 1, 1, 1, True),
    (2, 3, 11, 13, 5, (5, 5), 2, 2, 1, True),
    (3, 4, 9, 8, 6, (3, 5), 3, (1, 2), (2, 1), True),
    (2, 2, 6, 7, 3, (2, 3), (4, 1), 3, 1, False),
    (1, 3, 10, 10, 2, (5, 1), (1, 3), (0, 2), (2, 2), True),
]


def conv_case_id(case):
    b, cin, h, w, cout, k, s, p, d, bias = case
    with_bias = "bias" if bias else "nobias"
    return f"b{b}c{cin}x{h}x{w}-o{cout}-k{k[0]}x{k[1]}-s{s}-p{p}-d{d}-{with_bias}"


def conv_case_inputs(case, dtype, seed=0):
    """(x, w, b, gy, params) for a case tuple; params as the case wrote them (int or pair)."""
    n, cin, h, wd, cout, k, stride, padding, dilation, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, wd)).astype(dtype)
    w = rng.standard_normal((cout, cin, *k)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if bias else None
    params = dict(stride=stride, padding=padding, dilation=dilation)
    gy = rng.standard_normal(core.conv2d_output_shape(x.shape, w.shape, **params)).astype(dtype)
    return x, w, b, gy, params


def pairs(params):
    """stride/padding/dilation as (height, width) pairs."""
    return {name: pair(value) for name, value in params.items()}


def loss_reference(x, t, v, count_factor, grad_loss=0.7):
    """(loss, gx, gt) from the float64 reference."""
    loss, _ = reference.sq_error_loss(x, t, v, count_factor)
    gx, gt = reference.sq_error_loss_grad(x, t, v, count_factor, grad_loss)
    return loss, gx, gt


MASKS = ["nomask", "binary", "fractional", "allmasked"]


def loss_inputs(dtype, mask, seed=0, shape=(4, 17, 2)):
    """(x, t, v) for a mask kind of MASKS; shape (batch, joints, (x, y)) as in DeepPose."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    v = {"nomask": None,
         "binary": (rng.random(shape) > 0.3).astype(dtype),
         "fractional": rng.random(shape).astype(dtype),
         "allmasked": np.zeros(shape, dtype)}[mask]
    return x, t, v


def assert_conv_results_agree(a, b, x, w, bias, gy, params):
    """Two impls' (y, gx, gw, gb) agree: rtol 1e-10 in float64. In float32 an elementwise rtol
    fails on outputs that are sums of many terms cancelling to near zero, so each difference is
    held to twice reference.conv2d_error_bound (each impl is within one bound of the exact
    value) plus an ulp of the magnitude, and the bias gradient to rtol 1e-6."""
    names = ("y", "gx", "gw", "gb")
    if x.dtype == np.float64:
        for name, got, want in zip(names, a, b):
            if got is not None:
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11, err_msg=name)
        return
    bounds = reference.conv2d_error_bound(x, w, bias, gy, **pairs(params))
    for name, got, want, bound in zip(names, a, b, bounds):
        excess = np.abs(got.astype(np.float64) - want) - 2 * (bound + 2.0 ** -23 * np.abs(want))
        assert np.all(excess <= 0), f"{name}: impls differ beyond the rounding bound"
    if a[3] is not None:
        np.testing.assert_allclose(a[3], b[3], rtol=1e-6, atol=1e-6, err_msg="gb")
