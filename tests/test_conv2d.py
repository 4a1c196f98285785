"""conv2d kernels (CPU) against the NumPy float64 reference, torch.nn.functional and finite
differences, plus the host emulation of the CUDA kernels' index maps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from ops import _C
from tests.kernel_calls import (assert_conv2d_matches_reference, conv2d_all, conv_case_id,
                                conv_case_inputs, pairs)

# (batch, Cin, H, W, Cout, (kh, kw), stride, padding, dilation, bias): the grid of
# batch 1, odd sizes, non-square kernels 1x1..11x11, stride 1..4, padding 0..3, dilation 1..2.
CASES = [
    (1, 1, 5, 5, 1, (1, 1), 1, 0, 1, False),
    (1, 3, 7, 9, 4, (3, 3), 1, 1, 1, True),
    (2, 3, 11, 13, 5, (5, 5), 2, 2, 1, True),
    (1, 2, 15, 17, 3, (11, 11), 4, 3, 1, False),
    (3, 4, 9, 8, 6, (3, 5), 3, (1, 2), (2, 1), True),
    (2, 5, 12, 12, 7, (1, 1), 2, 0, 1, True),     # ResNet stride-2 shortcut
    (4, 3, 8, 8, 8, (3, 3), 1, 1, 1, True),       # batch >= threads: per-image split
    (1, 16, 8, 8, 16, (3, 3), 1, 1, 2, False),
    (2, 2, 6, 7, 3, (2, 3), (4, 1), 3, 1, True),  # padding as large as the kernel
    (1, 3, 10, 10, 2, (5, 1), (1, 3), (0, 2), (2, 2), True),
    (5, 7, 13, 11, 9, (3, 3), 2, 1, 1, False),
    (2, 24, 9, 9, 20, (3, 3), 1, 1, 1, True),     # Cout and K span several GEMM tiles
]


case_id = conv_case_id


def make_inputs(case, dtype, seed=0):
    """(x, w, b, gy, params) with params as (height, width) pairs."""
    x, w, b, gy, params = conv_case_inputs(case, dtype, seed)
    return x, w, b, gy, pairs(params)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case, dtype):
    x, w, b, gy, params = make_inputs(case, dtype)
    assert_conv2d_matches_reference(conv2d_all(x, w, b, gy, **params), x, w, b, gy, params)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch_functional(case):
    """The same conv through torch (oneDNN on CPU) and its autograd, in float64."""
    x, w, b, gy, params = make_inputs(case, np.float64, seed=1)
    y, gx, gw, gb = conv2d_all(x, w, b, gy, **params)
    xt = torch.from_numpy(x).requires_grad_()
    wt = torch.from_numpy(w).requires_grad_()
    bt = torch.from_numpy(b).requires_grad_() if b is not None else None
    yt = F.conv2d(xt, wt, bt, **params)
    yt.backward(torch.from_numpy(gy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-10, atol=1e-11)
    if b is not None:
        np.testing.assert_allclose(gb, bt.grad.numpy(), rtol=1e-10, atol=1e-11)


def test_finite_differences_float64():
    """Gradients of L = sum(y * gy) against central differences, every coordinate."""
    case = (2, 2, 6, 5, 3, (3, 2), (2, 1), (1, 0), (1, 2), True)
    x, w, b, gy, params = make_inputs(case, np.float64, seed=2)
    _, gx, gw, gb = conv2d_all(x, w, b, gy, **params)

    def objective(args):
        return float((conv2d_all(args["x"], args["w"], args["b"], **params)[0] * gy).sum())

    h = 1e-6
    inputs = {"x": x, "w": w, "b": b}
    for name, grad in (("x", gx), ("w", gw), ("b", gb)):
        numeric = np.empty_like(inputs[name])
        for i in np.ndindex(numeric.shape):
            plus, minus = inputs[name].copy(), inputs[name].copy()
            plus[i] += h
            minus[i] -= h
            numeric[i] = (objective({**inputs, name: plus}) -
                          objective({**inputs, name: minus})) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7, err_msg=name)


def test_accepts_torch_tensors_and_writes_in_place():
    """DLPack from torch in and out: the kernel writes the caller's torch tensor."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    y = torch.full((2, 4, 8, 8), float("nan"))
    from ops import core
    core.conv2d_forward(x, w, b, y, padding=1)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)


def test_output_fully_overwritten():
    """Outputs start as garbage (NaN) and must come back without a trace of it."""
    case = (3, 3, 9, 7, 5, (3, 3), 2, 1, 1, True)
    x, w, b, gy, params = make_inputs(case, np.float32, seed=4)
    from ops import core
    y = np.full(gy.shape, np.nan, np.float32)
    gx, gw, gb = (np.full_like(a, np.nan) for a in (x, w, b))
    core.conv2d_forward(x, w, b, y, **params)
    core.conv2d_backward_data(gy, w, gx, **params)
    core.conv2d_backward_weight(x, gy, gw, **params)
    core.conv2d_backward_bias(gy, gb)
    for out in (y, gx, gw, gb):
        assert np.isfinite(out).all()


@pytest.mark.parametrize("case", CASES[:8], ids=case_id)
@pytest.mark.parametrize("multiprocessors", [1, 132])
def test_cuda_index_maps_emulated_on_host(case, multiprocessors):
    """The CUDA kernels' A/B/store index maps and split-K, looped on the host, against the
    reference: checks the GPU path's index math on a machine without a GPU (the tiling itself
    runs only on the device). 132 SMs gives backward-weight several K splits."""
    if not _C.cuda_built():
        pytest.skip("ops._C was built without CUDA: no CUDA index maps to emulate")
    x, w, b, gy, params = make_inputs(case, np.float64, seed=5)
    args = (params["stride"], params["padding"], params["dilation"], multiprocessors)
    y = np.empty(gy.shape)
    _C.conv2d_cuda_emulated("forward", x, w, b, y, *args)
    gx, gw = np.empty_like(x), np.empty_like(w)
    _C.conv2d_cuda_emulated("backward_data", gy, w, None, gx, *args)
    _C.conv2d_cuda_emulated("backward_weight", x, gy, None, gw, *args)
    assert_conv2d_matches_reference((y, gx, gw, None), x, w, b, gy, params)


@st.composite
def conv_problems(draw):
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    # Input at least as large as the dilated kernel minus padding, so the conv is valid.
    h = draw(st.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 14))
    w = draw(st.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 14))
    return (draw(st.integers(1, 3)), draw(st.integers(1, 6)), h, w, draw(st.integers(1, 7)),
            (kh, kw), (draw(st.integers(1, 4)), draw(st.integers(1, 4))), (ph, pw), (dh, dw),
            draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(case=conv_problems(), seed=st.integers(0, 2 ** 16))
def test_shape_sweep_float64(case, seed):
    x, w, b, gy, params = make_inputs(case, np.float64, seed=seed)
    assert_conv2d_matches_reference(conv2d_all(x, w, b, gy, **params), x, w, b, gy, params)
