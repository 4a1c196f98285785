"""The masked squared-error loss for MXNet: ``mse_loss`` and ``deeppose_loss``, four impls each.

loss = S / (C * k), S = sum(((x - t) * v)**2), C = sum(v) (x.size without a mask), k the count
factor (``ops.core.MSE_COUNT_FACTOR`` or ``ops.core.DEEPPOSE_COUNT_FACTOR``); C == 0 gives loss 0
and zero gradients. ``v`` is a constant mask (no gradient); ``t`` gets -gx when it needs one.
The loss is an array of shape (1,), as MXNet's own reductions return (legacy MXNet has no 0-d
arrays).

Imperatively (NDArrays) the explicit and kernel impls are ``loader.Function`` subclasses; in a
hybridized block (Symbols) they are ``mx.operator.CustomOp``s (``F.Custom``), since Functions
cannot be part of a graph. Both run the same NDArray code (explicit) or the same kernel calls
(kernel). The native impl is the ``deepprof_sq_error_loss`` operator of libdeepprof_mxnet.so.

This module validates inputs and chooses an impl; it calls our kernels only through ops.core.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np

from .. import core
from ..impls import LOSS_IMPLS, check_float, check_impl, check_loss_shapes
from . import loader

_CUSTOM_OPS = {"explicit": "deepprof_sq_error_loss_explicit",
               "kernel": "deepprof_sq_error_loss_kernel"}


def _denominator(F, count, count_factor: float):
    # C == 0 means every term of S is 0 too; dividing by 1 then keeps loss and gradients at 0
    # (dividing by 0 would give NaN, also through the backward of the division).
    return F.where(count > 0, count * count_factor, F.ones_like(count))


def _autograd(F, x, t, v, count_factor: float):
    """Composed from MXNet operators; MXNet's autograd (or the graph's backward) differentiates
    it. Works on NDArrays and Symbols alike."""
    d = x - t
    if v is None:  # C is the size, never 0 (x is not empty)
        return F.mean(F.square(d)) / count_factor
    v = F.BlockGrad(v)  # a constant, as in every other impl
    return F.sum(F.square(d * v)) / _denominator(F, F.sum(v), count_factor)


# ---- explicit: forward and a hand-written backward in NDArray operations ----------------------

def _explicit_forward(x, t, v, count_factor: float):
    """(loss, count, denominator) in NDArray operations."""
    d = x - t
    if v is None:
        count = mx.nd.full((1,), x.size, ctx=x.context, dtype=x.dtype)
    else:
        d = d * v
        count = v.sum()
    denominator = _denominator(mx.nd, count, count_factor)
    return (d * d).sum() / denominator, count, denominator


def _explicit_grad(x, t, v, grad_loss, denominator):
    """gx = grad_loss * 2 (x - t) v^2 / denominator (NDArray broadcasting of the (1,) arrays)."""
    gx = (x - t) * (2 * grad_loss / denominator)
    return gx if v is None else gx * (v * v)


class SqErrorLossExplicit(loader.Function):
    """The loss with a hand-written backward in NDArray operations, imperatively. ``v`` (or
    None) is a constant NDArray."""

    def __init__(self, v, count_factor: float):
        super().__init__()
        self.v = v
        self.count_factor = count_factor

    def forward(self, x, t):
        loss, _, denominator = _explicit_forward(x, t, self.v, self.count_factor)
        self.save_for_backward(x, t, denominator)
        return loss

    def backward(self, grad_loss):
        x, t, denominator = self.saved_tensors
        want_x, want_t = self.needs_input_grad
        if not (want_x or want_t):
            return None, None
        gx = _explicit_grad(x, t, self.v, grad_loss, denominator)
        return (gx if want_x else None), (-gx if want_t else None)


# ---- kernel: our kernels through DLPack ------------------------------------------------------

class SqErrorLossKernel(loader.Function):
    """The loss, forward and backward in our kernels through ops.core, imperatively. ``v`` (or
    None) is a constant NDArray. The forward waits for the arrays it reads (see
    ``loader.dlpack_read``) and keeps them; the backward reads those without waiting again
    (``loader``, defect 4: t or v may be a trained parameter). Each kernel call runs
    synchronously."""

    def __init__(self, v, count_factor: float):
        super().__init__()
        self.v = v
        self.count_factor = count_factor

    def forward(self, x, t):
        loss = mx.nd.empty((1,), ctx=x.context, dtype=x.dtype)
        count = mx.nd.empty((1,), ctx=x.context, dtype=x.dtype)
        (x_in, x), (t_in, t) = loader.dlpack_read(x), loader.dlpack_read(t)
        v_in, self.v = loader.dlpack_read(self.v) if self.v is not None else (None, None)
        core.sq_error_loss_forward(x_in, t_in, v_in, loader.dlpack_out(loss),
                                   loader.dlpack_out(count), count_factor=self.count_factor)
        self.save_for_backward(x, t, count)
        return loss

    def backward(self, grad_loss):
        x, t, count = self.saved_tensors
        want_x, want_t = self.needs_input_grad
        if not (want_x or want_t):
            return None, None
        gx = mx.nd.empty(x.shape, ctx=x.context, dtype=x.dtype)  # the kernel always writes gx
        gt = mx.nd.empty(x.shape, ctx=x.context, dtype=x.dtype) if want_t else None
        core.sq_error_loss_backward(
            loader.dlpack_saved(x), loader.dlpack_saved(t), loader.dlpack_saved(self.v),
            loader.dlpack_saved(count), loader.dlpack_in(grad_loss), loader.dlpack_out(gx),
            None if gt is None else loader.dlpack_out(gt), count_factor=self.count_factor)
        return (gx if want_x else None), gt


# ---- the same two as CustomOps, for graphs (hybridized blocks) ----------------------------------
# Inputs x, t[, v]; outputs loss and count (sum(v)), so the backward reads C instead of
# recomputing it. Attributes come as strings: count_factor, masked, function (the public
# function, for messages).

class _SqErrorLossProp(mx.operator.CustomOpProp):
    impl = ""

    def __init__(self, count_factor, masked="False", function="ops.mxnet.sq_error_loss"):
        super().__init__(need_top_grad=True)
        self.count_factor = float(count_factor)
        self.masked = masked == "True"
        self.function = function

    def list_arguments(self):
        return ["x", "t", "v"] if self.masked else ["x", "t"]

    def list_outputs(self):
        return ["loss", "count"]

    def infer_shape(self, in_shape):
        x_shape = list(in_shape[0])
        if not x_shape or min(x_shape) < 0:
            raise ValueError(f"{self.function}: x: shape unknown {tuple(x_shape)}; give the "
                             f"input shapes")
        known = [s if s and min(s) >= 0 else x_shape for s in in_shape]  # fill unknown ones
        check_loss_shapes(self.function, x_shape, known[1], known[2] if self.masked else None)
        return known, [[1], [1]], []

    def infer_type(self, in_type):
        dtype = next((t for t in in_type if t is not None), None)
        for name, t in zip(self.list_arguments(), in_type):
            if t is not None:
                check_float(self.function, self.impl, name, np.dtype(t).name)
                if t != dtype:
                    raise TypeError(f"{self.function}: {name}: expected "
                                    f"{np.dtype(dtype).name} like x, got {np.dtype(t).name}")
        return [dtype] * len(in_type), [dtype, dtype], []


class _SqErrorLossExplicitOp(mx.operator.CustomOp):
    def __init__(self, count_factor: float, masked: bool):
        super().__init__()
        self.count_factor, self.masked = count_factor, masked

    def forward(self, is_train, req, in_data, out_data, aux):
        v = in_data[2] if self.masked else None
        loss, count, _ = _explicit_forward(in_data[0], in_data[1], v, self.count_factor)
        self.assign(out_data[0], req[0], loss)
        self.assign(out_data[1], req[1], count)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        x, t = in_data[:2]
        v = in_data[2] if self.masked else None
        gx = _explicit_grad(x, t, v, out_grad[0],
                            _denominator(mx.nd, out_data[1], self.count_factor))
        self.assign(in_grad[0], req[0], gx)
        self.assign(in_grad[1], req[1], -gx)
        if self.masked:
            self.assign(in_grad[2], req[2], 0)


class _SqErrorLossKernelOp(mx.operator.CustomOp):
    def __init__(self, count_factor: float, masked: bool, function: str):
        super().__init__()
        self.count_factor, self.masked, self.function = count_factor, masked, function

    def forward(self, is_train, req, in_data, out_data, aux):
        loader.refuse_gpu_kernel(self.function, in_data[0])
        v = in_data[2] if self.masked else None
        loss, count = (loader.kernel_target(o, r) for o, r in zip(out_data, req))
        core.sq_error_loss_forward(loader.dlpack_in(in_data[0]), loader.dlpack_in(in_data[1]),
                                   loader.dlpack_in(v), loader.dlpack_out(loss),
                                   loader.dlpack_out(count), count_factor=self.count_factor)
        loader.assign_from(out_data[0], req[0], loss)
        loader.assign_from(out_data[1], req[1], count)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        x, t = in_data[:2]
        v = in_data[2] if self.masked else None
        if self.masked:
            self.assign(in_grad[2], req[2], 0)
        if req[0] == "null" and req[1] == "null":
            return
        gx = loader.kernel_target(in_grad[0], req[0])
        gt = None if req[1] == "null" else loader.kernel_target(in_grad[1], req[1])
        core.sq_error_loss_backward(
            loader.dlpack_in(x), loader.dlpack_in(t), loader.dlpack_in(v),
            loader.dlpack_in(out_data[1]), loader.dlpack_in(out_grad[0]), loader.dlpack_out(gx),
            None if gt is None else loader.dlpack_out(gt), count_factor=self.count_factor)
        loader.assign_from(in_grad[0], req[0], gx)
        if gt is not None:
            loader.assign_from(in_grad[1], req[1], gt)


@mx.operator.register(_CUSTOM_OPS["explicit"])
class _SqErrorLossExplicitProp(_SqErrorLossProp):
    impl = "explicit"

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _SqErrorLossExplicitOp(self.count_factor, self.masked)


@mx.operator.register(_CUSTOM_OPS["kernel"])
class _SqErrorLossKernelProp(_SqErrorLossProp):
    impl = "kernel"

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _SqErrorLossKernelOp(self.count_factor, self.masked, self.function)


# ---- the public functions -----------------------------------------------------------------------

def sq_error_loss(function: str, x, t, v, count_factor: float, impl: str):
    """The checked entry behind mse_loss and deeppose_loss."""
    arrays = {"x": x, "t": t, "v": v}
    F = loader.check_types(function, arrays)
    check_impl(function, impl, LOSS_IMPLS, loader.unavailable_impls("loss", loader.context_of(x)))
    if F is mx.nd:
        check_loss_shapes(function, x.shape, t.shape, None if v is None else v.shape)
    loader.check_like_x(function, impl, arrays)
    if impl == "autograd":
        return _autograd(F, x, t, v, count_factor)
    inputs = (x, t) if v is None else (x, t, v)
    if impl == "native":
        op = loader.native_op(F, "deepprof_sq_error_loss")
        return op(*inputs, count_factor=count_factor, masked=v is not None)[0]
    if F is mx.sym:
        return loader.custom_op(F, _CUSTOM_OPS[impl], inputs, count_factor=count_factor,
                                masked=v is not None, function=function)
    function_class = SqErrorLossExplicit if impl == "explicit" else SqErrorLossKernel
    return function_class(v, count_factor)(x, t)


def mse_loss(x, t, v=None, *, impl: str = "autograd"):
    """Masked mean squared error: sum(((x - t) * v)**2) / sum(v), an NDArray of shape (1,).

    Without ``v`` this is ``mx.nd.mean(mx.nd.square(x - t))``. ``x`` and ``t`` are NDArrays of
    one shape, dtype and context (Symbols inside a hybridized block); ``v`` an optional
    constant mask like them (no gradient flows to it). sum(v) == 0 gives 0 and zero gradients.

    ``impl``: ``"autograd"`` (MXNet operators, MXNet's autograd), ``"explicit"`` (an
    ``mx.autograd.Function`` with a hand-written backward in NDArray operations; a CustomOp in
    graphs), ``"kernel"`` (the same calling our C++ kernels through DLPack; CPU only),
    ``"native"`` (our ``deepprof_sq_error_loss`` operator, forward and backward in C++).
    ``kernel``/``native`` take float32/float64. ``native`` writes its gradients and never
    accumulates them: grad_req='add' on x or t is not supported there (lib_api passes MXNet's
    OpReqType to no external operator).

    Raises ValueError (unknown impl, shapes, contexts), TypeError (types, dtypes) and
    ``ops.impls.UnsupportedImplError`` (an impl this build or context cannot run).
    """
    return sq_error_loss("ops.mxnet.mse_loss", x, t, v, core.MSE_COUNT_FACTOR, impl)


def deeppose_loss(x, t, v=None, *, impl: str = "autograd"):
    """DeepPose loss: sum(((x - t) * v)**2) / (sum(v) / 2), an NDArray of shape (1,).

    The squared error per visible joint (two coordinates per joint, ``v`` the visibility of
    each coordinate). Arguments, impls and errors as in :func:`mse_loss`.
    """
    return sq_error_loss("ops.mxnet.deeppose_loss", x, t, v, core.DEEPPOSE_COUNT_FACTOR, impl)


__all__ = ["mse_loss", "deeppose_loss", "SqErrorLossExplicit", "SqErrorLossKernel"]
