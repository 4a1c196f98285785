"""conv2d for MXNet: MXNet's own convolution or our kernels, and a drop-in Gluon block.

``conv2d`` is NCHW with weight (Cout, Cin, kh, kw) and an optional bias (Cout,); stride, padding
and dilation are an int or a pair. ``Conv2D`` is ``mx.gluon.nn.Conv2D`` with an ``impl``
keyword: same constructor, same parameters ``weight`` and ``bias``, same saved parameters.

Imperatively (NDArrays) the kernel impl is a ``loader.Function``; in a hybridized block
(Symbols) it is an ``mx.operator.CustomOp`` (``F.Custom``) making the same kernel calls. The
native impl is the ``deepprof_conv2d`` operator of libdeepprof_mxnet.so.

This module validates inputs and chooses an impl; it calls our kernels only through ops.core.
"""

from __future__ import annotations

import ast

import mxnet as mx
import numpy as np

from .. import core
from ..impls import CONV_IMPLS, KERNEL_IMPLS, check_float, check_impl
from . import loader

_CUSTOM_OP = "deepprof_conv2d_kernel"
# A 1x1 kernel on a 1x1 input fits every stride, padding and dilation: geometry checks on these
# shapes check the parameters alone (for Symbols, whose shapes come later).
_ANY_SHAPE = (1, 1, 1, 1)


class Conv2DKernel(loader.Function):
    """conv2d, forward and backward in our kernels through ops.core, imperatively. Inputs
    (x, w) or (x, w, b). The forward waits for the arrays it reads (see ``loader.dlpack_read``)
    and keeps them; the backward reads those without waiting again, which would deadlock with
    an optimizer update of w queued before the backward ran (``loader``, defect 4). Each kernel
    call runs synchronously."""

    def __init__(self, geometry: core.Conv2dGeometry):
        super().__init__()
        self.geometry = geometry
        self.params = dict(stride=geometry.stride, padding=geometry.padding,
                           dilation=geometry.dilation)

    def forward(self, x, w, b=None):
        y = mx.nd.empty(self.geometry.output_shape, ctx=x.context, dtype=x.dtype)
        (x_in, x), (w_in, w) = loader.dlpack_read(x), loader.dlpack_read(w)
        core.conv2d_forward(x_in, w_in, loader.dlpack_in(b), loader.dlpack_out(y),
                            **self.params)
        self.save_for_backward(x, w)
        return y

    def backward(self, gy):
        x, w = self.saved_tensors
        return _conv_grads(x, w, gy, self.needs_input_grad, self.params,
                           read_saved=loader.dlpack_saved)


def _conv_grads(x, w, gy, needs, params, targets=None, read_saved=loader.dlpack_in):
    """(gx, gw[, gb]) from our kernels, None where ``needs`` is False; each written into
    ``targets[i]`` when given (a CustomOp's outputs), else into a new array. ``read_saved``
    exports x and w: ``loader.dlpack_saved`` for what a Function's forward kept."""
    shapes = (x.shape, w.shape, (w.shape[0],))
    grads = []
    for i, want in enumerate(needs):
        if not want:
            grads.append(None)
        elif targets is not None:
            grads.append(targets[i])
        else:
            grads.append(mx.nd.empty(shapes[i], ctx=x.context, dtype=x.dtype))
    gy_in = loader.dlpack_in(gy)
    if grads[0] is not None:
        core.conv2d_backward_data(gy_in, read_saved(w), loader.dlpack_out(grads[0]), **params)
    if grads[1] is not None:
        core.conv2d_backward_weight(read_saved(x), gy_in, loader.dlpack_out(grads[1]),
                                    **params)
    if len(grads) == 3 and grads[2] is not None:
        core.conv2d_backward_bias(gy_in, loader.dlpack_out(grads[2]))
    return tuple(grads)


# ---- the kernel impl as a CustomOp, for graphs (hybridized blocks) ------------------------------
# Attributes come as strings: stride, padding, dilation ("(1, 1)"), no_bias, function.

class _Conv2DKernelOp(mx.operator.CustomOp):
    def __init__(self, params, has_bias: bool, function: str):
        super().__init__()
        self.params, self.has_bias, self.function = params, has_bias, function

    def forward(self, is_train, req, in_data, out_data, aux):
        loader.refuse_gpu_kernel(self.function, in_data[0])
        b = in_data[2] if self.has_bias else None
        y = loader.kernel_target(out_data[0], req[0])
        core.conv2d_forward(loader.dlpack_in(in_data[0]), loader.dlpack_in(in_data[1]),
                            loader.dlpack_in(b), loader.dlpack_out(y), **self.params)
        loader.assign_from(out_data[0], req[0], y)

    def backward(self, req, out_grad, in_data, out_data, in_grad, aux):
        targets = [None if r == "null" else loader.kernel_target(g, r)
                   for g, r in zip(in_grad, req)]
        _conv_grads(in_data[0], in_data[1], out_grad[0], [r != "null" for r in req],
                    self.params, targets)
        for grad, r, target in zip(in_grad, req, targets):
            loader.assign_from(grad, r, target)


@mx.operator.register(_CUSTOM_OP)
class _Conv2DKernelProp(mx.operator.CustomOpProp):
    def __init__(self, stride="(1, 1)", padding="(0, 0)", dilation="(1, 1)", no_bias="False",
                 function="ops.mxnet.conv2d"):
        super().__init__(need_top_grad=True)
        self.function = function
        self.has_bias = no_bias != "True"
        self.params = dict(stride=ast.literal_eval(stride), padding=ast.literal_eval(padding),
                           dilation=ast.literal_eval(dilation))

    def list_arguments(self):
        return ["x", "w", "b"] if self.has_bias else ["x", "w"]

    def infer_shape(self, in_shape):
        x_shape, w_shape = list(in_shape[0]), list(in_shape[1])
        if not x_shape or min(x_shape) < 0:
            raise ValueError(f"{self.function}: x: shape unknown {tuple(x_shape)}; give the "
                             f"input shapes")
        if len(w_shape) == 4 and len(x_shape) == 4 and w_shape[1] <= 0:  # Gluon's in_channels=0
            w_shape[1] = x_shape[1]
        shapes = [x_shape, w_shape]
        if self.has_bias:
            b_shape = list(in_shape[2])
            shapes.append(b_shape if b_shape and min(b_shape) > 0 else [w_shape[0]])
        if len(x_shape) != 4:
            raise ValueError(f"{self.function}: x: expected a 4-d array (B, Cin, H, W), "
                             f"got shape {tuple(x_shape)}")
        geometry = core.conv2d_geometry(self.function, x_shape, w_shape, **self.params,
                                        bias_shape=shapes[2] if self.has_bias else None)
        return shapes, [list(geometry.output_shape)], []

    def infer_type(self, in_type):
        dtype = next((t for t in in_type if t is not None), None)
        for name, t in zip(self.list_arguments(), in_type):
            if t is not None:
                check_float(self.function, "kernel", name, np.dtype(t).name)
                if t != dtype:
                    raise TypeError(f"{self.function}: {name}: expected "
                                    f"{np.dtype(dtype).name} like x, got {np.dtype(t).name}")
        return [dtype] * len(in_type), [dtype], []

    def create_operator(self, ctx, in_shapes, in_dtypes):
        return _Conv2DKernelOp(self.params, self.has_bias, self.function)


# ---- the public function and the block ----------------------------------------------------------

def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, impl: str = "framework"):
    """2-D convolution (cross-correlation), NCHW, of x (B, Cin, H, W) with w (Cout, Cin, kh, kw)
    and the optional bias b (Cout,): NDArrays of one dtype and context (Symbols inside a
    hybridized block); ``stride``, ``padding`` and ``dilation`` an int or a pair (height,
    width).

    ``impl``: ``"framework"`` (default: ``mx.nd.Convolution``, oneDNN on CPU, cuDNN on GPU;
    NDArrays only, since MXNet's op needs the kernel size and channel count, which a Symbol does
    not carry: in graphs use :class:`Conv2D`), ``"kernel"`` (an ``mx.autograd.Function``
    calling our C++ kernels through DLPack; a CustomOp in graphs; CPU only), ``"native"`` (our
    ``deepprof_conv2d`` operator, forward and backward in C++). ``kernel``/``native`` take
    float32/float64. ``native`` writes its gradients and never accumulates them:
    grad_req='add' is not supported there (lib_api passes MXNet's OpReqType to no external
    operator). Every impl checks its arguments the same way first.

    Raises ValueError (unknown impl, shapes, geometry, contexts), TypeError (types, dtypes,
    a Symbol with impl="framework") and ``ops.impls.UnsupportedImplError``.
    """
    function = "ops.mxnet.conv2d"
    arrays = {"x": x, "w": w, "b": b}
    F = loader.check_types(function, arrays)
    check_impl(function, impl, CONV_IMPLS, loader.unavailable_impls("conv", loader.context_of(x)))
    if F is mx.nd:
        if x.ndim != 4:
            raise ValueError(f"{function}: x: expected a 4-d array (B, Cin, H, W), "
                             f"got shape {x.shape}")
        geometry = core.conv2d_geometry(function, x.shape, w.shape, stride=stride,
                                        padding=padding, dilation=dilation,
                                        bias_shape=None if b is None else b.shape)
    else:
        geometry = core.conv2d_geometry(function, _ANY_SHAPE, _ANY_SHAPE, stride=stride,
                                        padding=padding, dilation=dilation)
    loader.check_like_x(function, impl, arrays)
    params = dict(stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation)
    inputs = (x, w) if b is None else (x, w, b)
    if impl == "native":
        return loader.native_op(F, "deepprof_conv2d")(*inputs, **params, no_bias=b is None)
    if F is mx.sym:
        if impl == "framework":
            raise TypeError(f"{function}: impl='framework' takes NDArrays only: MXNet's "
                            f"Convolution needs the kernel size and channel count, which a "
                            f"Symbol does not carry; in graphs use ops.mxnet.Conv2D")
        return loader.custom_op(F, _CUSTOM_OP, inputs, data_inputs=(0,), **params,
                                no_bias=b is None, function=function)
    if impl == "framework":
        return mx.nd.Convolution(*inputs, kernel=w.shape[2:], stride=geometry.stride,
                                 pad=geometry.padding, dilate=geometry.dilation,
                                 num_filter=w.shape[0], no_bias=b is None)
    return Conv2DKernel(geometry)(*inputs)


class Conv2D(mx.gluon.nn.Conv2D):
    """``mx.gluon.nn.Conv2D`` whose convolution is chosen by ``impl`` (see :func:`conv2d`).

    Same constructor, parameters (``weight`` (channels, in_channels, kh, kw), ``bias``) and
    saved parameters as ``mx.gluon.nn.Conv2D``, so weights load across (``save_parameters`` /
    ``load_parameters``, ``set_data``), plus ``impl``. ``in_channels=0`` infers the input
    channels from the first input, for every impl. ``impl="framework"`` runs Gluon's forward
    unchanged; ``"kernel"``/``"native"`` run our kernels, which support groups=1 and
    layout="NCHW" only (NotImplementedError otherwise), and ``"native"`` refuses parameters
    with grad_req='add' (see :func:`conv2d`). ``impl`` may be reassigned; a hybridized block
    then rebuilds its graph.

    Where MXNet computes with oneDNN, its inference-mode convolution reorders the weight in
    place into oneDNN's layout; the layer puts it back after each such call, and when its impl
    changes to one of our kernels (``loader``, defect 5), so the weight stays a plain array
    that NumPy can be copied into and our kernels read correctly.
    """

    def __init__(self, channels, kernel_size, strides=(1, 1), padding=(0, 0), dilation=(1, 1),
                 groups=1, layout="NCHW", activation=None, use_bias=True,
                 weight_initializer=None, bias_initializer="zeros", in_channels=0, *,
                 impl: str = "framework", **kwargs):
        super().__init__(channels, kernel_size, strides=strides, padding=padding,
                         dilation=dilation, groups=groups, layout=layout,
                         activation=activation, use_bias=use_bias,
                         weight_initializer=weight_initializer,
                         bias_initializer=bias_initializer, in_channels=in_channels, **kwargs)
        self.impl = impl

    @property
    def impl(self) -> str:
        """Which conv2d impl ``forward`` runs; checked when set, not on every call."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        function = "ops.mxnet.Conv2D"
        check_impl(function, impl, CONV_IMPLS, {})
        if impl in KERNEL_IMPLS and self._kwargs["num_group"] != 1:
            raise NotImplementedError(f"{function}: groups: impl={impl!r} runs our kernels, "
                                      f"which support groups=1 only, got "
                                      f"{self._kwargs['num_group']}")
        if impl in KERNEL_IMPLS and self._kwargs["layout"] != "NCHW":
            raise NotImplementedError(f"{function}: layout: impl={impl!r} runs our kernels, "
                                      f"which take NCHW only, got {self._kwargs['layout']!r}")
        self._impl = impl
        self._clear_cached_op()
        if impl in KERNEL_IMPLS:
            # A hybridized parent's graph may have run MXNet's convolution in inference mode
            # without calling this layer (``loader``, defect 5): our kernels take the weight
            # plain.
            for array in self._weight_arrays():
                loader.restore_plain_layout(array)

    def _weight_arrays(self):
        """The weight's arrays, one per context; none before it is initialized."""
        try:
            return self.weight.list_data()
        except (RuntimeError, mx.gluon.parameter.DeferredInitializationError):
            return []

    def forward(self, x, *args):
        if self._impl == "native":
            for param in (self.weight, self.bias):
                if param is not None and param.grad_req == "add":
                    raise NotImplementedError(
                        f"ops.mxnet.Conv2D: {param.name}: impl='native' writes gradients and "
                        f"cannot accumulate them (grad_req='add'): lib_api passes MXNet's "
                        f"OpReqType to no external operator; use impl='kernel'")
        y = super().forward(x, *args)
        if (self._impl == "framework" and isinstance(x, mx.nd.NDArray)
                and not mx.autograd.is_training()):
            # MXNet's convolution in inference mode reordered the weight in place into
            # oneDNN's layout (``loader``, defect 5); put it back (waits for this convolution).
            loader.restore_plain_layout(self.weight.data(x.context))
        return y

    def hybrid_forward(self, F, x, weight, bias=None):
        if self._impl == "framework":
            return super().hybrid_forward(F, x, weight, bias)
        y = conv2d(x, weight, bias, stride=self._kwargs["stride"], padding=self._kwargs["pad"],
                   dilation=self._kwargs["dilate"], impl=self._impl)
        return self.act(y) if self.act is not None else y

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, impl={self._impl!r})"


__all__ = ["conv2d", "Conv2D", "Conv2DKernel"]
