"""conv2d for Chainer: Chainer's own convolution or our kernels, and a drop-in link.

``conv2d`` is NCHW with weight (Cout, Cin, kh, kw) and an optional bias (Cout,); stride, padding
and dilation are an int or a pair. ``Convolution2D`` is ``chainer.links.Convolution2D`` with an
``impl`` keyword: same constructor, same parameters W and b, same serialized state.

The Function class is the mechanism, ``conv2d`` the documented entry. This module validates
inputs and chooses an impl; it calls our kernels only through ``ops.numpy`` / ``ops.cupy``.
"""

from __future__ import annotations

from .. import core
from ..impls import CONV_IMPLS, KERNEL_IMPLS, check_impl

from . import loader

chainer = loader.load_chainer()


class Conv2DKernel(chainer.FunctionNode):
    """conv2d, forward and backward in our kernels through ``ops.numpy`` / ``ops.cupy``
    (``raw``). Inputs (x, W) or (x, W, b). First-order only."""

    def __init__(self, raw, geometry: core.Conv2dGeometry):
        self.raw = raw
        self.params = dict(stride=geometry.stride, padding=geometry.padding,
                           dilation=geometry.dilation)

    def forward(self, inputs):
        self.retain_inputs((0, 1))
        xp = chainer.backend.get_array_module(inputs[0])
        x, w = xp.ascontiguousarray(inputs[0]), xp.ascontiguousarray(inputs[1])
        b = xp.ascontiguousarray(inputs[2]) if len(inputs) == 3 else None
        return self.raw.conv2d_forward(x, w, b, **self.params),

    def backward(self, indexes, grad_outputs):
        loader.first_order_only("Conv2DKernel")
        x, w = (var.array for var in self.get_retained_inputs())
        xp = chainer.backend.get_array_module(x)
        gy = xp.ascontiguousarray(grad_outputs[0].array)
        need = tuple(i in indexes for i in range(3))
        grads = self.raw.conv2d_backward(xp.ascontiguousarray(x), xp.ascontiguousarray(w), gy,
                                         need=need, **self.params)
        return tuple(None if g is None else chainer.Variable(g)
                     for g in grads[:len(self.inputs)])


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1, impl: str = "framework"):
    """2-D convolution (cross-correlation), NCHW, as a ``chainer.Variable``.

    ``x`` (B, Cin, H, W), ``w`` (Cout, Cin, kh, kw) and the optional ``b`` (Cout,) are
    Variables or NumPy/CuPy arrays of one dtype and device; ``stride``, ``padding`` and
    ``dilation`` are an int or a pair (height, width).

    ``impl``: ``"framework"`` (``chainer.functions.convolution_2d``: im2col + GEMM, cuDNN where
    present), ``"kernel"`` (a FunctionNode calling our C++/CUDA kernels; first-order only,
    float32/float64), ``"native"`` (the same FunctionNode as ``"kernel"``: Chainer has no op
    registry below its Python FunctionNode, so there is no other way to make our kernels a
    Chainer op). Every impl checks its arguments the same way first.

    Raises ValueError (unknown impl, shapes, geometry, devices), TypeError (types, dtypes)
    and ``ops.impls.UnsupportedImplError`` (e.g. kernel impls on CuPy arrays without CUDA
    kernels).
    """
    function = "ops.chainer.conv2d"
    arrays = loader.check_types(function, {"x": x, "w": w, "b": b})
    x_array = arrays["x"]
    device = chainer.backend.get_device_from_array(x_array)
    check_impl(function, impl, CONV_IMPLS, loader.unavailable_impls("conv", device))
    if x_array.ndim != 4:
        raise ValueError(f"{function}: x: expected a 4-d array (B, Cin, H, W), "
                         f"got shape {x_array.shape}")
    geometry = core.conv2d_geometry(function, x_array.shape, arrays["w"].shape, stride=stride,
                                    padding=padding, dilation=dilation,
                                    bias_shape=None if b is None else arrays["b"].shape)
    loader.check_like_x(function, impl, arrays)
    if impl == "framework":
        return chainer.functions.convolution_2d(x, w, b, stride=geometry.stride,
                                                pad=geometry.padding, dilate=geometry.dilation)
    inputs = (x, w) if b is None else (x, w, b)
    return Conv2DKernel(loader.kernel_ops(x_array), geometry).apply(inputs)[0]


class Convolution2D(chainer.links.Convolution2D):
    """``chainer.links.Convolution2D`` with an ``impl`` keyword (see :func:`conv2d`).

    The constructor, the lazy ``in_channels=None`` initialisation, the parameters ``W`` and
    ``b`` and the serialized state are Chainer's own, so parameters copy and load across
    (``copyparams``, ``chainer.serializers``). ``impl="framework"`` runs Chainer's forward
    unchanged; ``"kernel"``/``"native"`` run our kernels, which support ``groups=1`` and the
    channel-first layout only (NotImplementedError otherwise). ``impl`` may be reassigned.
    """

    def __init__(self, in_channels, out_channels, ksize=None, stride=1, pad=0, nobias=False,
                 initialW=None, initial_bias=None, *, dilate=1, groups=1,
                 impl: str = "framework"):
        super().__init__(in_channels, out_channels, ksize, stride, pad, nobias, initialW,
                         initial_bias, dilate=dilate, groups=groups)
        self.impl = impl

    @property
    def impl(self) -> str:
        """Which conv2d impl ``forward`` runs; checked when set, not on every call."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        function = "ops.chainer.Convolution2D"
        check_impl(function, impl, CONV_IMPLS, {})
        if impl in KERNEL_IMPLS and self.groups != 1:
            raise NotImplementedError(f"{function}: groups: impl={impl!r} runs our kernels, "
                                      f"which support groups=1 only, got {self.groups}")
        if impl in KERNEL_IMPLS and self.cudnn_fast:
            raise NotImplementedError(f"{function}: impl={impl!r} runs our kernels, which take "
                                      "NCHW only, but compute_mode 'cudnn_fast' makes this "
                                      "link channel-last")
        self._impl = impl

    @classmethod
    def from_params(cls, W, b=None, stride=1, pad=0, nobias=False, *, dilate=1, groups=1,
                    impl: str = "framework"):
        """A link holding copies of ``W`` (Cout, Cin/groups, kh, kw) and ``b``, as
        ``chainer.links.Convolution2D.from_params``, plus ``impl``."""
        out_channels, in_per_group, kh, kw = W.shape
        if b is not None and b.size != out_channels:
            raise ValueError(f"ops.chainer.Convolution2D.from_params: b: expected "
                             f"{out_channels} values (W's Cout), got {b.size}")
        return cls(in_per_group * groups, out_channels, (kh, kw), stride, pad, nobias,
                   initialW=chainer.as_array(W),
                   initial_bias=None if b is None else chainer.as_array(b),
                   dilate=dilate, groups=groups, impl=impl)

    @property
    def printable_specs(self):
        yield from super().printable_specs
        yield "impl", self.impl

    def forward(self, x):
        """Applies the convolution with ``self.impl``."""
        if self.impl == "framework":
            return super().forward(x)
        if self.W.array is None:
            self._initialize_params(x.shape[1])
        return conv2d(x, self.W, self.b, stride=self.stride, padding=self.pad,
                      dilation=self.dilate, impl=self.impl)


__all__ = ["conv2d", "Convolution2D", "Conv2DKernel"]
