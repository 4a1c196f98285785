"""Masked squared-error loss kernels (CPU) against the NumPy float64 reference,
torch.nn.functional.mse_loss and finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from ops import core, reference
from tests.kernel_calls import sq_error_loss_all

FACTORS = {"mse": core.MSE_COUNT_FACTOR, "deeppose": core.DEEPPOSE_COUNT_FACTOR}
SHAPES = [(1, 28), (7, 28), (256, 28), (3, 5, 7), (100_003,), (1,)]


def make(shape, dtype, seed, mask):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    t = rng.standard_normal(shape).astype(dtype)
    v = (rng.random(shape) < 0.7).astype(dtype) if mask else None
    return x, t, v


@pytest.mark.parametrize("factor", FACTORS, ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_matches_reference(dtype, shape, mask, factor):
    x, t, v = make(shape, dtype, 0, mask)
    g = 0.37
    loss, count, gx, gt = sq_error_loss_all(x, t, v, count_factor=FACTORS[factor], grad_loss=g)
    ref_loss, ref_count = reference.sq_error_loss(x, t, v, FACTORS[factor])
    ref_gx, ref_gt = reference.sq_error_loss_grad(x, t, v, FACTORS[factor], grad_loss=g)
    # The sum is accumulated in double in both precisions: only the final rounding differs.
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert count == ref_count
    assert loss == pytest.approx(ref_loss, rel=rtol)
    np.testing.assert_allclose(gx, ref_gx, rtol=rtol * 4, atol=0)
    np.testing.assert_allclose(gt, ref_gt, rtol=rtol * 4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mse_without_mask_equals_torch_mse_loss(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 28, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(64, 28, generator=g, dtype=dtype)
    expected = F.mse_loss(x, t)
    expected.backward()
    loss, _, gx, _ = sq_error_loss_all(x.detach().numpy(), t.numpy(),
                                       count_factor=core.MSE_COUNT_FACTOR)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=0)
    np.testing.assert_allclose(loss, expected.item(), **tol)
    np.testing.assert_allclose(gx, x.grad.numpy(), **tol)


def test_deeppose_is_twice_the_masked_mean():
    """DeepPose divides by the visible joints (C/2), the masked mean by the coordinates (C)."""
    x, t, v = make((16, 28), np.float64, 2, mask=True)
    mse, _, gx_mse, _ = sq_error_loss_all(x, t, v, count_factor=core.MSE_COUNT_FACTOR)
    pose, _, gx_pose, _ = sq_error_loss_all(x, t, v, count_factor=core.DEEPPOSE_COUNT_FACTOR)
    assert pose == pytest.approx(2 * mse, rel=1e-14)
    np.testing.assert_allclose(gx_pose, 2 * gx_mse, rtol=1e-14)
    masked = (v != 0)
    assert mse == pytest.approx(((x - t)[masked] ** 2).mean(), rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_masked_gives_zero_loss_and_zero_gradients(dtype):
    x, t, _ = make((4, 28), dtype, 3, mask=False)
    v = np.zeros_like(x)
    loss, count, gx, gt = sq_error_loss_all(x, t, v, count_factor=core.DEEPPOSE_COUNT_FACTOR)
    assert (loss, count) == (0.0, 0.0)
    assert not np.any(gx) and not np.any(gt)
    assert np.isfinite(gx).all()


def test_gt_is_optional():
    x, t, v = make((5, 28), np.float64, 4, mask=True)
    _, _, gx, gt = sq_error_loss_all(x, t, v, count_factor=1.0, with_gt=False)
    assert gt is None
    np.testing.assert_allclose(gx, reference.sq_error_loss_grad(x, t, v, 1.0)[0], rtol=1e-13)


@pytest.mark.parametrize("mask", ["binary", "fractional", None])
def test_finite_differences_float64(mask):
    """gx and gt against central differences of the forward kernel, every coordinate;
    fractional weights too, where the v^2 in the gradient matters."""
    rng = np.random.default_rng(5)
    x, t = rng.standard_normal((3, 6)), rng.standard_normal((3, 6))
    v = {"binary": (rng.random((3, 6)) < 0.6) * 1.0, "fractional": rng.random((3, 6)),
         None: None}[mask]
    factor = core.DEEPPOSE_COUNT_FACTOR
    _, _, gx, gt = sq_error_loss_all(x, t, v, count_factor=factor)

    def loss_at(xv, tv):
        return sq_error_loss_all(xv, tv, v, count_factor=factor)[0]

    h = 1e-6
    for arr, grad, which in ((x, gx, "x"), (t, gt, "t")):
        numeric = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += h
            minus[i] -= h
            args_plus = (plus, t) if which == "x" else (x, plus)
            args_minus = (minus, t) if which == "x" else (x, minus)
            numeric[i] = (loss_at(*args_plus) - loss_at(*args_minus)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9, err_msg=which)


def test_large_float32_sum_is_accurate():
    """16M elements in float32: the double accumulator keeps the loss at float32 accuracy."""
    n = 1 << 24
    x = np.full(n, 1.5, np.float32)
    t = np.zeros(n, np.float32)
    x[::7] = 0.25
    loss, count, _, _ = sq_error_loss_all(x, t, count_factor=1.0, with_gt=False)
    expected = (np.float64(0.25) ** 2 * len(x[::7]) + 2.25 * (n - len(x[::7]))) / n
    assert count == n
    assert loss == pytest.approx(expected, rel=2 ** -23)


def test_grad_loss_scales_the_gradient():
    x, t, v = make((8, 28), np.float64, 6, mask=True)
    _, _, gx1, _ = sq_error_loss_all(x, t, v, count_factor=1.0, grad_loss=1.0)
    _, _, gx3, _ = sq_error_loss_all(x, t, v, count_factor=1.0, grad_loss=-3.0)
    np.testing.assert_allclose(gx3, -3.0 * gx1, rtol=1e-14)


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       mask=st.booleans(), factor=st.sampled_from([1.0, 0.5, 2.0]),
       seed=st.integers(0, 2 ** 16))
def test_shape_sweep_float64(shape, mask, factor, seed):
    x, t, v = make(tuple(shape), np.float64, seed, mask)
    loss, count, gx, gt = sq_error_loss_all(x, t, v, count_factor=factor)
    ref_loss, ref_count = reference.sq_error_loss(x, t, v, factor)
    ref_gx, _ = reference.sq_error_loss_grad(x, t, v, factor)
    assert count == ref_count
    assert loss == pytest.approx(ref_loss, rel=1e-12, abs=0)
    np.testing.assert_allclose(gx, ref_gx, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(gt, -gx)


# ---- fused forward + backward (sq_error_loss_fused) ----------------------------------------------

def fused_all(x, t, v=None, *, count_factor, grad_loss=None, with_gt=True):
    """(loss, count, gx, gt) from the fused call on NumPy arrays."""
    loss, count = np.empty((), x.dtype), np.empty((), x.dtype)
    gx = np.empty_like(x)
    gt = np.empty_like(x) if with_gt else None
    g = None if grad_loss is None else np.array(grad_loss, x.dtype)
    core.sq_error_loss_fused(x, t, v, loss, count, gx, gt, count_factor=count_factor,
                             grad_loss=g)
    return float(loss), float(count), gx, gt


@pytest.mark.parametrize("factor", FACTORS, ids=str)
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_fused_matches_reference_and_the_unfused_pair(dtype, shape, mask, factor):
    x, t, v = make(shape, dtype, 11, mask)
    k = FACTORS[factor]
    loss, count, gx, gt = fused_all(x, t, v, count_factor=k, grad_loss=0.37)
    ref_loss, ref_count = reference.sq_error_loss(x, t, v, k)
    ref_gx, ref_gt = reference.sq_error_loss_grad(x, t, v, k, grad_loss=0.37)
    rtol = 1e-6 if dtype == np.float32 else 1e-12
    assert count == ref_count
    assert loss == pytest.approx(ref_loss, rel=rtol)
    np.testing.assert_allclose(gx, ref_gx, rtol=rtol * 4, atol=0)
    np.testing.assert_allclose(gt, ref_gt, rtol=rtol * 4, atol=0)
    # The CPU fused call is the forward and backward kernels back to back: bit for bit the same.
    unfused = sq_error_loss_all(x, t, v, count_factor=k, grad_loss=0.37)
    assert (loss, count) == unfused[:2]
    np.testing.assert_array_equal(gx, unfused[2])
    np.testing.assert_array_equal(gt, unfused[3])


def test_fused_without_grad_loss_is_an_upstream_gradient_of_one():
    x, t, v = make((32, 28), np.float64, 12, mask=True)
    _, _, gx, gt = fused_all(x, t, v, count_factor=core.DEEPPOSE_COUNT_FACTOR, with_gt=False)
    assert gt is None
    np.testing.assert_allclose(gx, reference.sq_error_loss_grad(
        x, t, v, core.DEEPPOSE_COUNT_FACTOR)[0], rtol=1e-13)


def test_fused_all_masked_gives_zeros():
    x, t, _ = make((4, 28), np.float32, 13, mask=False)
    loss, count, gx, gt = fused_all(x, t, np.zeros_like(x), count_factor=0.5)
    assert (loss, count) == (0.0, 0.0)
    assert not np.any(gx) and not np.any(gt)


def test_fused_refuses_bad_input_naming_the_argument():
    x, t, v = make((4, 28), np.float32, 14, mask=True)
    loss, count, gx = np.empty((), np.float32), np.empty((), np.float32), np.empty_like(x)

    def call(grad_loss=None, **changes):
        args = dict(x=x, t=t, v=v, loss_out=loss, count_out=count, gx_out=gx, gt_out=None)
        args.update(changes)
        core.sq_error_loss_fused(*args.values(), count_factor=0.5, grad_loss=grad_loss)

    with pytest.raises(ValueError, match=r"sq_error_loss_fused: gx_out: expected shape \(4, 28\)"):
        call(gx_out=np.empty((4, 27), np.float32))
    with pytest.raises(ValueError, match=r"sq_error_loss_fused: gx_out: overlaps x"):
        call(gx_out=x)
    with pytest.raises(ValueError, match=r"sq_error_loss_fused: gx_out: overlaps gt_out"):
        call(gt_out=gx)
    with pytest.raises(TypeError, match=r"sq_error_loss_fused: grad_loss: expected float32 like x"):
        call(grad_loss=np.ones((), np.float64))
    with pytest.raises(ValueError, match=r"sq_error_loss_fused: grad_loss: expected a one-element"):
        call(grad_loss=np.ones(2, np.float32))
    with pytest.raises(TypeError, match=r"sq_error_loss_fused: x: expected an array, got None"):
        call(x=None)
    with pytest.raises(ValueError, match=r"sq_error_loss_fused: count_factor: expected a finite"):
        core.sq_error_loss_fused(x, t, v, loss, count, gx, count_factor=-1.0)


def test_fused_through_ops_numpy():
    from ops import numpy as onp
    x, t, v = make((8, 28), np.float64, 15, mask=True)
    loss, count, gx, gt = onp.sq_error_loss_fused(x, t, v, count_factor=0.5, with_gt=True)
    assert float(loss) == pytest.approx(reference.sq_error_loss(x, t, v, 0.5)[0], rel=1e-12)
    np.testing.assert_array_equal(gt, -gx)
