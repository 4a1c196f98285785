"""Masked squared-error losses for Chainer: ``mse_loss`` and ``deeppose_loss``, four impls each.

loss = S / (C * k), S = sum(((x - t) * v)**2), C = sum(v) (x.size without a mask), k the count
factor (``ops.core.MSE_COUNT_FACTOR`` or ``ops.core.DEEPPOSE_COUNT_FACTOR``); C == 0 gives loss 0
and zero gradients. ``v`` is a constant mask (no gradient); ``t`` gets -gx when it needs one.

The two Function classes are the mechanism, the public functions at the bottom the documented
entry. This module validates inputs and chooses an impl; it holds no math of the kernels and
calls them only through ``ops.numpy`` / ``ops.cupy``.
"""

from __future__ import annotations

from .. import core
from ..impls import LOSS_IMPLS, check_impl, check_loss_shapes

from . import loader

chainer = loader.load_chainer()


class SqErrorLossExplicit(chainer.FunctionNode):
    """The loss with a hand-written backward in NumPy/CuPy array ops, as in the classic
    DeepPose Chainer code. First-order only. ``v`` (or None) is a constant raw array."""

    def __init__(self, v, count_factor: float):
        self.v = v
        self.count_factor = count_factor

    def forward(self, inputs):
        self.retain_inputs((0, 1))
        x, t = inputs
        xp = chainer.backend.get_array_module(x)
        # inverse = 1 / (C k), or 0 when C == 0; kept for backward. Without a mask C is the
        # size, known on the host; with one it stays on the array's device.
        if self.v is None:
            d = x - t
            self.inverse = x.dtype.type(1.0 / (x.size * self.count_factor))
        else:
            d = (x - t) * self.v
            denom = self.v.sum() * x.dtype.type(self.count_factor)
            nonzero = denom != 0
            self.inverse = xp.where(nonzero, 1 / xp.where(nonzero, denom, 1), 0).astype(x.dtype)
        return xp.asarray((d * d).sum() * self.inverse, dtype=x.dtype),

    def backward(self, indexes, grad_outputs):
        loader.first_order_only("SqErrorLossExplicit")
        x, t = (var.array for var in self.get_retained_inputs())
        grad_loss = 1 if grad_outputs[0] is None else grad_outputs[0].array
        d = x - t
        weight = d.dtype.type(1) if self.v is None else self.v * self.v
        gx = (d * weight * (2 * grad_loss * self.inverse)).astype(x.dtype, copy=False)
        return chainer.Variable(gx), (chainer.Variable(-gx) if 1 in indexes else None)


class SqErrorLossKernel(chainer.FunctionNode):
    """The loss, forward and backward in our kernels through ``ops.numpy`` / ``ops.cupy``
    (``raw``). First-order only. ``v`` (or None) is a constant, C-contiguous raw array."""

    def __init__(self, v, count_factor: float, raw):
        self.v = v
        self.count_factor = count_factor
        self.raw = raw

    def forward(self, inputs):
        self.retain_inputs((0, 1))
        xp = chainer.backend.get_array_module(inputs[0])
        x, t = (xp.ascontiguousarray(a) for a in inputs)
        loss, self.count = self.raw.sq_error_loss_forward(x, t, self.v,
                                                          count_factor=self.count_factor)
        return loss,

    def backward(self, indexes, grad_outputs):
        loader.first_order_only("SqErrorLossKernel")
        x, t = (var.array for var in self.get_retained_inputs())
        xp = chainer.backend.get_array_module(x)
        grad_loss = None if grad_outputs[0] is None else grad_outputs[0].array
        gx, gt = self.raw.sq_error_loss_backward(
            xp.ascontiguousarray(x), xp.ascontiguousarray(t), self.v, self.count, grad_loss,
            count_factor=self.count_factor, with_gt=1 in indexes)
        return chainer.Variable(gx), (None if gt is None else chainer.Variable(gt))


def _autograd(x, t, v, count_factor: float):
    """The loss from Chainer primitives (sub, mul, sum, div); Chainer differentiates it."""
    x, t = chainer.as_variable(x), chainer.as_variable(t)
    if v is None:  # C is the size, known on the host, and never 0 (x is not empty)
        d = x - t
        return chainer.functions.sum(d * d) / x.dtype.type(x.size * count_factor)
    xp = chainer.backend.get_array_module(x)
    d = (x - t) * v
    denom = v.sum() * x.dtype.type(count_factor)
    # Divide by 1 where C == 0 (then S == 0): loss 0, gradients 0, no NaN; the divisor comes
    # from the constant mask, so it carries no gradient, and it never leaves the device.
    safe = xp.where(denom != 0, denom, 1).astype(x.dtype)
    return chainer.functions.sum(d * d) / safe


def sq_error_loss(function: str, x, t, v, count_factor: float, impl: str):
    """The checked entry behind mse_loss and deeppose_loss."""
    arrays = loader.check_types(function, {"x": x, "t": t, "v": v})
    device = chainer.backend.get_device_from_array(arrays["x"])
    check_impl(function, impl, LOSS_IMPLS, loader.unavailable_impls("loss", device))
    check_loss_shapes(function, arrays["x"].shape, arrays["t"].shape,
                      None if v is None else arrays["v"].shape)
    loader.check_like_x(function, impl, arrays)
    x_array = arrays["x"]
    mask = arrays.get("v")
    if impl == "autograd":
        return _autograd(x, t, mask, count_factor)
    if impl == "explicit":
        return SqErrorLossExplicit(mask, count_factor).apply((x, t))[0]
    if mask is not None:  # a constant, so made contiguous once here rather than per kernel call
        mask = chainer.backend.get_array_module(mask).ascontiguousarray(mask)
    return SqErrorLossKernel(mask, count_factor, loader.kernel_ops(x_array)).apply((x, t))[0]


def mse_loss(x, t, v=None, *, impl: str = "autograd"):
    """Masked mean squared error: sum(((x - t) * v)**2) / sum(v), a 0-d ``chainer.Variable``.

    Without ``v`` this is ``chainer.functions.mean_squared_error(x, t)``. ``x`` and ``t`` are
    Variables or NumPy/CuPy arrays of one shape, dtype and device; ``v`` an optional constant
    mask like them (no gradient flows to it). sum(v) == 0 gives 0 and zero gradients.

    ``impl``: ``"autograd"`` (Chainer primitives, Chainer's autodiff), ``"explicit"`` (a
    FunctionNode with a hand-written backward in NumPy/CuPy), ``"kernel"`` (a FunctionNode
    calling our C++/CUDA kernels), ``"native"`` (the same FunctionNode as ``"kernel"``:
    Chainer has no op registry below its Python FunctionNode, so there is no other way to
    make our kernels a Chainer op). ``explicit``, ``kernel`` and ``native`` are first-order
    only; ``kernel``/``native`` take float32/float64.

    Raises ValueError (unknown impl, shapes, devices), TypeError (types, dtypes) and
    ``ops.impls.UnsupportedImplError`` (e.g. kernel impls on CuPy arrays without CUDA kernels).
    """
    return sq_error_loss("ops.chainer.mse_loss", x, t, v, core.MSE_COUNT_FACTOR, impl)


def deeppose_loss(x, t, v=None, *, impl: str = "autograd"):
    """DeepPose loss: sum(((x - t) * v)**2) / (sum(v) / 2), a 0-d ``chainer.Variable``.

    The squared error per visible joint (two coordinates per joint, ``v`` the visibility of
    each coordinate). Arguments, impls and errors as in :func:`mse_loss`.
    """
    return sq_error_loss("ops.chainer.deeppose_loss", x, t, v, core.DEEPPOSE_COUNT_FACTOR,
                          impl)


__all__ = ["mse_loss", "deeppose_loss", "SqErrorLossExplicit", "SqErrorLossKernel"]
