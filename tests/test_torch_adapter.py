"""ops.torch: every impl of every function against the NumPy float64 reference and against each
other, PyTorch's own checkers (gradcheck, opcheck, torch.compile), the Conv2d layer against
torch.nn.Conv2d (swap_conv2d putting it in a model's place), and bad input refused at the
adapter."""

import numpy as np
import pytest
import torch

import ops
from ops import reference
from ops import torch as ot
from ops.impls import CONV_IMPLS, LOSS_IMPLS, UnsupportedImplError
from tests.kernel_calls import assert_conv2d_matches_reference, assert_conv_results_agree

NATIVE = ot.impl_support("loss")["native"]
needs_native = pytest.mark.skipif(NATIVE is not None, reason=f"no native ops: {NATIVE}")
LOSSES = {"mse": (ot.mse_loss, 1.0), "deeppose": (ot.deeppose_loss, 0.5)}
DEVICES = ["cpu"] + (["cuda"] if ops.cuda_available() and torch.cuda.is_available() else [])


def loss_inputs(shape, dtype, mask, seed=0, all_masked=False):
    rng = np.random.default_rng(seed)
    x, t = rng.standard_normal(shape), rng.standard_normal(shape)
    v = None
    if mask:
        v = np.zeros(shape) if all_masked else (rng.random(shape) < 0.7) * 1.0
    return [None if a is None else a.astype(dtype) for a in (x, t, v)]


def run_loss(fn, impl, x, t, v, device="cpu"):
    """(loss, gx, gt) as float64 NumPy, with x and t both requiring grad."""
    xt = torch.tensor(x, device=device, requires_grad=True)
    tt = torch.tensor(t, device=device, requires_grad=True)
    vt = None if v is None else torch.tensor(v, device=device)
    loss = fn(xt, tt, vt, impl=impl)
    assert loss.shape == ()
    loss.backward()
    return loss.item(), xt.grad.cpu().numpy(), tt.grad.cpu().numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["nomask", "mask", "all_masked"])
@pytest.mark.parametrize("which", LOSSES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_loss_impls_match_reference_and_each_other(dtype, which, case, device):
    fn, factor = LOSSES[which]
    x, t, v = loss_inputs((32, 28), dtype, case != "nomask", all_masked=case == "all_masked")
    ref_loss, _ = reference.sq_error_loss(x, t, v, factor)
    ref_gx, ref_gt = reference.sq_error_loss_grad(x, t, v, factor)
    rtol = 1e-5 if dtype == np.float32 else 1e-10
    results = {impl: run_loss(fn, impl, x, t, v, device) for impl in LOSS_IMPLS}
    for impl, (loss, gx, gt) in results.items():
        assert loss == pytest.approx(ref_loss, rel=rtol, abs=1e-30), impl
        np.testing.assert_allclose(gx, ref_gx, rtol=rtol, atol=1e-30, err_msg=impl)
        np.testing.assert_allclose(gt, ref_gt, rtol=rtol, atol=1e-30, err_msg=impl)
        assert np.isfinite(gx).all() and np.isfinite(gt).all()
    base = results["autograd"]
    for impl, (loss, gx, _) in results.items():
        assert loss == pytest.approx(base[0], rel=rtol, abs=1e-30), impl
        np.testing.assert_allclose(gx, base[1], rtol=rtol, atol=1e-30, err_msg=impl)


def test_mse_without_mask_equals_torch_mse_loss():
    x, t, _ = loss_inputs((16, 28), np.float64, False, seed=1)
    expected = torch.nn.functional.mse_loss(torch.tensor(x), torch.tensor(t)).item()
    for impl in LOSS_IMPLS:
        loss = ot.mse_loss(torch.tensor(x), torch.tensor(t), impl=impl).item()
        assert loss == pytest.approx(expected, rel=1e-12), impl


CONV_CASES = [  # (x shape, w shape, bias, stride, padding, dilation)
    ((2, 3, 9, 9), (4, 3, 3, 3), True, 1, 1, 1),
    ((1, 2, 11, 7), (3, 2, 5, 3), False, (2, 1), (2, 0), (1, 2)),
    ((3, 4, 8, 8), (6, 4, 1, 1), True, 2, 0, 1),
]


def conv_inputs(case, dtype, seed=0):
    x_shape, w_shape, bias, stride, padding, dilation = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    params = dict(stride=pair(stride), padding=pair(padding), dilation=pair(dilation))
    gy = rng.standard_normal(ops.core.conv2d_output_shape(x.shape, w.shape, **params))
    return x, w, b, gy.astype(dtype), params


def run_conv(impl, x, w, b, gy, params, device="cpu"):
    xt = torch.tensor(x, device=device, requires_grad=True)
    wt = torch.tensor(w, device=device, requires_grad=True)
    bt = None if b is None else torch.tensor(b, device=device, requires_grad=True)
    y = ot.conv2d(xt, wt, bt, impl=impl, **params)
    y.backward(torch.tensor(gy, device=device))
    grads = [xt.grad, wt.grad, None if bt is None else bt.grad]
    return [None if g is None else g.detach().cpu().numpy() for g in [y] + grads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_conv_impls_match_reference(dtype, case, impl, device):
    if impl == "framework" and dtype == np.float32 and device == "cuda":
        pytest.skip("cuDNN may use TF32 or other float32 algorithms outside the rounding bound")
    x, w, b, gy, params = conv_inputs(case, dtype)
    assert_conv2d_matches_reference(run_conv(impl, x, w, b, gy, params, device), x, w, b, gy,
                                    params)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_kernel_and_native_agree_exactly(case):
    """Both call the same kernels in the same order: bit-identical results."""
    x, w, b, gy, params = conv_inputs(case, np.float32, seed=3)
    kernel = run_conv("kernel", x, w, b, gy, params)
    native = run_conv("native", x, w, b, gy, params) if NATIVE is None else kernel
    for k, n in zip(kernel, native):
        if k is not None:
            np.testing.assert_array_equal(k, n)


# ---- PyTorch's own checkers ---------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["explicit", "kernel", "native"])
@pytest.mark.parametrize("mask", [False, True])
def test_loss_gradcheck(impl, mask):
    if impl == "native" and NATIVE:
        pytest.skip(NATIVE)
    x, t, v = loss_inputs((3, 4), np.float64, mask, seed=4)
    vt = None if v is None else torch.tensor(v)
    assert torch.autograd.gradcheck(
        lambda a, b: ot.deeppose_loss(a, b, vt, impl=impl),
        (torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)))


@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_gradcheck(impl, case):
    if impl == "native" and NATIVE:
        pytest.skip(NATIVE)
    x, w, b, _, params = conv_inputs(case, np.float64, seed=5)
    args = [torch.tensor(a, requires_grad=True) for a in (x, w) + ((b,) if b is not None else ())]
    if b is None:
        args.append(None)
    assert torch.autograd.gradcheck(lambda a, c, d: ot.conv2d(a, c, d, impl=impl, **params),
                                    tuple(args))


@needs_native
def test_native_ops_pass_opcheck():
    """Schema, autograd registration, fake (Meta) kernels and AOT dispatch with dynamic shapes."""
    from torch.library import opcheck
    deepprof = torch.ops.deepprof
    x, t, v = (torch.tensor(a) for a in loss_inputs((4, 6), np.float64, True, seed=6))
    count = torch.tensor(float(v.sum()), dtype=torch.float64)
    g = torch.tensor(1.0, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    cx, cw, cb, cgy, params = (torch.tensor(a) if isinstance(a, np.ndarray) else a
                               for a in conv_inputs(CONV_CASES[1], np.float64, seed=7))
    cb = torch.randn(cw.shape[0], dtype=torch.float64)
    conv_args = [list(params["stride"]), list(params["padding"]), list(params["dilation"])]
    checks = [
        (deepprof.sq_error_loss.default, (xg, t, v, 0.5)),
        (deepprof.sq_error_loss.default, (xg, t, None, 1.0)),
        (deepprof.sq_error_loss_forward.default, (x, t, v, 0.5)),
        (deepprof.sq_error_loss_backward.default, (g, x, t, v, count, 0.5, True)),
        (deepprof.sq_error_loss_backward.default, (g, x, t, None, count, 1.0, False)),
        (deepprof.conv2d.default, (cx.requires_grad_(), cw.requires_grad_(),
                                   cb.requires_grad_(), *conv_args)),
        (deepprof.conv2d.default, (cx, cw, None, *conv_args)),
        (deepprof.conv2d_forward.default, (cx.detach(), cw.detach(), None, *conv_args)),
        (deepprof.conv2d_backward.default, (cgy, cx.detach(), cw.detach(), *conv_args,
                                            [True, True, True])),
        (deepprof.conv2d_backward.default, (cgy, cx.detach(), cw.detach(), *conv_args,
                                            [False, True, False])),
    ]
    for op, args in checks:
        results = opcheck(op, args)
        assert all(r == "SUCCESS" for r in results.values()), (op, results)


@needs_native
@pytest.mark.parametrize("dynamic", [False, True])
def test_native_ops_trace_under_torch_compile(dynamic):
    """A whole step (conv -> loss -> backward) captured in one graph, fullgraph: no breaks."""
    torch._dynamo.reset()

    def step(x, w, b, t, v):
        y = ot.conv2d(x, w, b, padding=1, impl="native")
        return ot.deeppose_loss(y.flatten(1), t, v, impl="native")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 6, 6, generator=g)
    w = torch.randn(2, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(2, generator=g, requires_grad=True)
    t = torch.randn(2, 72, generator=g)
    v = (torch.rand(2, 72, generator=g) < 0.5).float()
    eager = step(x, w, b, t, v)
    eager.backward()
    gw, gb = w.grad.clone(), b.grad.clone()
    w.grad = b.grad = None
    traced = compiled(x, w, b, t, v)
    traced.backward()
    torch.testing.assert_close(traced, eager)
    torch.testing.assert_close(w.grad, gw)
    torch.testing.assert_close(b.grad, gb)


# ---- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("kwargs", [dict(padding=1), dict(stride=2, bias=False),
                                    dict(padding="same", dilation=2), dict(padding="valid")],
                         ids=str)
def test_conv2d_layer_loads_torch_weights_and_matches(impl, kwargs):
    torch.manual_seed(9)
    theirs = torch.nn.Conv2d(3, 5, 3, **kwargs).double()
    ours = ot.Conv2d(3, 5, 3, impl=impl, **kwargs).double()
    ours.load_state_dict(theirs.state_dict())
    assert set(ours.state_dict()) == set(theirs.state_dict())
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64, requires_grad=True)
    y_theirs, y_ours = theirs(x), ours(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-10, atol=1e-10)
    y_theirs.square().sum().backward()
    y_ours.square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-10, atol=1e-9)
    if theirs.bias is not None:
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-10, atol=1e-9)
    x_ours = x.detach().clone().requires_grad_()
    ours(x_ours).square().sum().backward()
    x.grad = None
    theirs(x).square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x.grad, rtol=1e-10, atol=1e-10)
    assert f"impl={impl!r}" in repr(ours)


def test_conv2d_layer_refuses_what_our_kernels_cannot_do():
    with pytest.raises(NotImplementedError, match="groups: impl='kernel' supports groups=1"):
        ot.Conv2d(4, 4, 3, groups=2, impl="kernel")
    with pytest.raises(NotImplementedError, match="padding_mode: impl='native'"):
        ot.Conv2d(4, 4, 3, padding_mode="reflect", impl="native")
    with pytest.raises(NotImplementedError, match="'same' with an even dilated kernel extent"):
        ot.Conv2d(4, 4, 2, padding="same", impl="kernel")
    with pytest.raises(ValueError, match="impl: expected one of"):
        ot.Conv2d(4, 4, 3, impl="cudnn")
    ot.Conv2d(4, 4, 3, groups=2, padding_mode="reflect")  # the framework impl does it all


def run_layer(layer, x, gy):
    """(y, gx, gw, gb) of ``layer`` on float32 NumPy x with output gradient gy, as NumPy."""
    layer.zero_grad(set_to_none=True)
    xt = torch.tensor(x, requires_grad=True)
    y = layer(xt)
    y.backward(torch.tensor(gy))
    grads = [xt.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]
    return [None if g is None else g.detach().numpy() for g in [y] + grads]


@pytest.mark.parametrize("impl", ["kernel", "native"])
def test_swap_conv2d_puts_our_layer_in_place_with_the_same_results(impl):
    if impl == "native" and ot.impl_support("conv")["native"]:
        pytest.skip(ot.impl_support("conv")["native"])
    torch.manual_seed(10)
    ours_already = ot.Conv2d(4, 4, 1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(5, 4, (3, 2), stride=2, dilation=(1, 2),
                                            bias=False)),
        ours_already).eval()
    originals = {name: layer for name, layer in model.named_modules()
                 if type(layer) is torch.nn.Conv2d}
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)   # built before the swap
    assert ot.swap_conv2d(model, impl=impl) is model
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model[3] is ours_already and ours_already.impl == "framework"
    rng = np.random.default_rng(11)
    for name, original in originals.items():
        twin = model.get_submodule(name)
        assert type(twin) is ot.Conv2d and twin.impl == impl and not twin.training
        assert twin.weight is original.weight and twin.bias is original.bias
        # Each layer alone, in float32: its results and the original's within the rounding
        # bound of each other (reference.conv2d_error_bound, as the impls are compared).
        x = rng.standard_normal((2, original.in_channels, 9, 10)).astype(np.float32)
        gy = rng.standard_normal(tuple(original(torch.tensor(x)).shape)).astype(np.float32)
        w = original.weight.detach().numpy()
        b = None if original.bias is None else original.bias.detach().numpy()
        geometry = dict(stride=original.stride, padding=original.padding,
                        dilation=original.dilation)
        ours, theirs = run_layer(twin, x, gy), run_layer(original, x, gy)
        assert_conv_results_agree(ours[:3] + [None], theirs[:3] + [None], x, w, b, gy,
                                  geometry)
        if b is not None:
            # gb sums gy over batch and pixels: the same bound, n terms in float32 each way.
            terms = gy.shape[0] * gy.shape[2] * gy.shape[3]
            bound = np.abs(gy.astype(np.float64)).sum(axis=(0, 2, 3)) * (terms + 2) * 2.0 ** -23
            assert np.all(np.abs(ours[3] - theirs[3].astype(np.float64)) <= 2 * bound), name
    # The optimizer built before the swap still trains the swapped model's weights.
    before = model[0].weight.detach().clone()
    model(torch.randn(1, 3, 8, 8)).square().sum().backward()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)
    # A Conv2d on its own is replaced, and returned.
    alone = torch.nn.Conv2d(2, 2, 3)
    swapped = ot.swap_conv2d(alone, impl=impl)
    assert type(swapped) is ot.Conv2d and swapped.weight is alone.weight


def test_swap_conv2d_refuses_what_our_kernels_cannot_do_naming_the_layer():
    def model(**inner):
        return torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3),
                                   torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, **inner)))

    grouped = model(groups=2)
    with pytest.raises(NotImplementedError, match=r"ops.torch.swap_conv2d: layer 1.0: groups: "
                                                  r"impl='kernel' supports groups=1 only, got 2"):
        ot.swap_conv2d(grouped)
    assert type(grouped[0]) is torch.nn.Conv2d       # checked before anything is replaced
    with pytest.raises(NotImplementedError, match=r"layer 1.0: padding_mode: impl='native'"):
        ot.swap_conv2d(model(padding_mode="reflect"), impl="native")
    with pytest.raises(NotImplementedError, match=r"layer 0.0: padding: 'same' with an even"):
        ot.swap_conv2d(torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Conv2d(4, 4, 2, padding="same"))))
    with pytest.raises(TypeError, match=r"layer \(the module itself\): weight: impl='kernel' "
                                        r"runs our kernels, which take float32 or float64, got "
                                        r"float16"):
        ot.swap_conv2d(torch.nn.Conv2d(4, 4, 3).half())
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module, got Tensor"):
        ot.swap_conv2d(torch.ones(1))
    with pytest.raises(ValueError, match="ops.torch.swap_conv2d: impl: expected one of"):
        ot.swap_conv2d(model(), impl="cudnn")
    framework = ot.swap_conv2d(model(groups=2), impl="framework")  # PyTorch's conv does it all
    assert framework[1][0].impl == "framework" and framework[1][0].groups == 2


# ---- bad input at the adapter -------------------------------------------------------------------

def test_unknown_and_unavailable_impls():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"ops.torch.mse_loss: impl: expected one of "
                                         r"'autograd', 'explicit', 'kernel', 'native', got 'fast'"):
        ot.mse_loss(x, x, impl="fast")
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: impl: .*got 'autograd'"):
        ot.conv2d(torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), impl="autograd")
    meta = torch.empty(2, 3, device="meta")
    assert ot.impl_support("loss", "meta")["kernel"] is not None
    assert ot.available_impls("loss", "meta") == ("autograd", "explicit")
    with pytest.raises(UnsupportedImplError, match=r"impl='kernel' is not available here: our "
                                                   r"kernels run on CPU and CUDA tensors"):
        ot.deeppose_loss(meta, meta, impl="kernel")
    with pytest.raises(ValueError, match="kind: expected 'loss' or 'conv'"):
        ot.impl_support("layers")


@pytest.mark.parametrize("impl", ["kernel", "native"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.bfloat16])
def test_kernel_impls_refuse_non_float_inputs(impl, dtype):
    x = torch.ones(2, 3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"ops.torch.deeppose_loss: x: impl={impl!r} runs our "
                                        rf"kernels, which take float32 or float64, got "
                                        rf"{str(dtype).replace('torch.', '')}"):
        ot.deeppose_loss(x, x, impl=impl)
    with pytest.raises(TypeError, match=r"ops.torch.conv2d: w: .*float32 or float64"):
        ot.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3, dtype=dtype), impl=impl)


@pytest.mark.parametrize("impl", LOSS_IMPLS)
def test_loss_refuses_shapes_torch_would_broadcast(impl):
    x = torch.randn(4, 28)
    with pytest.raises(ValueError, match=r"ops.torch.mse_loss: t: expected shape \(4, 28\) "
                                         r"\(same as x\), got \(28,\)"):
        ot.mse_loss(x, torch.randn(28), impl=impl)
    with pytest.raises(ValueError, match=r"ops.torch.mse_loss: v: expected shape \(4, 28\)"):
        ot.mse_loss(x, x.clone(), torch.ones(4, 1), impl=impl)
    with pytest.raises(TypeError, match=r"ops.torch.mse_loss: t: expected a torch.Tensor, "
                                        r"got ndarray"):
        ot.mse_loss(x, np.zeros((4, 28)), impl=impl)


@pytest.mark.parametrize("impl", CONV_IMPLS)
def test_conv_refuses_bad_shapes_and_devices(impl):
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: w: expected \(Cout, 3, kh, kw\)"):
        ot.conv2d(x, torch.randn(4, 2, 3, 3), impl=impl)
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: b: expected shape \(4,\)"):
        ot.conv2d(x, w, torch.randn(5), impl=impl)
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: x: expected a 4-d tensor"):
        ot.conv2d(x[0], w, impl=impl)
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: w: kernel height extent 9"):
        ot.conv2d(x, w, dilation=4, impl=impl)
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: stride: expected values in \[1,"):
        ot.conv2d(x, w, stride=0, impl=impl)
    with pytest.raises(ValueError, match=r"ops.torch.conv2d: w: is on meta but x is on cpu"):
        ot.conv2d(x, w.to("meta"), impl=impl)


@needs_native
def test_native_ops_called_directly_refuse_bad_input():
    """Users may call torch.ops.deepprof.* without the adapter: still one clear error."""
    deepprof = torch.ops.deepprof
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="deepprof::sq_error_loss_forward: x: expected float32 or "
                                        "float64, got Long"):
        deepprof.sq_error_loss(x.long(), x.long(), None, 1.0)
    with pytest.raises(ValueError, match=r"deepprof::sq_error_loss_forward: t: expected shape "
                                         r"\[2, 3\]"):
        deepprof.sq_error_loss(x, torch.randn(3), None, 1.0)
    with pytest.raises(ValueError, match="count_factor: expected a finite number > 0, got 0"):
        deepprof.sq_error_loss(x, x, None, 0.0)
    xc, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 5, 5)
    with pytest.raises(ValueError, match="deepprof::conv2d_forward: w: kernel height extent 5 is "
                                         "larger than the padded input height 4"):
        deepprof.conv2d(xc, w, None, [1, 1], [0, 0], [1, 1])
    with pytest.raises(ValueError, match=r"deepprof::conv2d_forward: stride: expected values"):
        deepprof.conv2d(xc, w, None, [0, 1], [2, 2], [1, 1])
    with pytest.raises(ValueError, match=r"deepprof::conv2d_forward: w: expected shape \(Cout, 2"):
        deepprof.conv2d(xc, torch.randn(3, 1, 3, 3), None, [1, 1], [1, 1], [1, 1])
