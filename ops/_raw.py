"""Forward and backward entry points on raw arrays (no autograd), for one array module.

``ops.numpy`` and ``ops.cupy`` are instances of :class:`RawOps`: the same functions, with
NumPy or CuPy allocating the outputs and, for CuPy, CuPy's current stream passed to the kernels.
Useful for kernel benchmarks and as the body of the Chainer adapter's Functions.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from . import core


class RawOps:
    """The kernels as functions that allocate their outputs with ``xp`` and return them."""

    def __init__(self, xp, stream: Callable[[], Optional[int]], name: str):
        self.xp = xp
        self._stream = stream
        self.name = name

    # ---- loss -----------------------------------------------------------------------------------

    def sq_error_loss_forward(self, x, t, v=None, *, count_factor: float):
        """(loss, count) as 0-d arrays of x's dtype; see ops.core.sq_error_loss_forward."""
        loss = self.xp.empty((), dtype=x.dtype)
        count = self.xp.empty((), dtype=x.dtype)
        core.sq_error_loss_forward(x, t, v, loss, count, count_factor=count_factor,
                                   stream=self._stream())
        return loss, count

    def sq_error_loss_backward(self, x, t, v, count, grad_loss=None, *, count_factor: float,
                               with_gt: bool = False):
        """(gx, gt) with gt None unless with_gt; grad_loss None means 1."""
        if grad_loss is None:
            grad_loss = self.xp.ones((), dtype=x.dtype)
        gx = self.xp.empty_like(x)
        gt = self.xp.empty_like(x) if with_gt else None
        core.sq_error_loss_backward(x, t, v, count, grad_loss, gx, gt,
                                    count_factor=count_factor, stream=self._stream())
        return gx, gt

    def sq_error_loss_fused(self, x, t, v=None, *, count_factor: float, with_gt: bool = False):
        """(loss, count, gx, gt) in one call for an upstream gradient of 1; gt None unless
        with_gt. See ops.core.sq_error_loss_fused."""
        loss = self.xp.empty((), dtype=x.dtype)
        count = self.xp.empty((), dtype=x.dtype)
        gx = self.xp.empty_like(x)
        gt = self.xp.empty_like(x) if with_gt else None
        core.sq_error_loss_fused(x, t, v, loss, count, gx, gt, count_factor=count_factor,
                                 stream=self._stream())
        return loss, count, gx, gt

    def mse_loss_forward(self, x, t, v=None):
        return self.sq_error_loss_forward(x, t, v, count_factor=core.MSE_COUNT_FACTOR)

    def mse_loss_backward(self, x, t, v, count, grad_loss=None, *, with_gt: bool = False):
        return self.sq_error_loss_backward(x, t, v, count, grad_loss, with_gt=with_gt,
                                           count_factor=core.MSE_COUNT_FACTOR)

    def deeppose_loss_forward(self, x, t, v=None):
        return self.sq_error_loss_forward(x, t, v, count_factor=core.DEEPPOSE_COUNT_FACTOR)

    def deeppose_loss_backward(self, x, t, v, count, grad_loss=None, *, with_gt: bool = False):
        return self.sq_error_loss_backward(x, t, v, count, grad_loss, with_gt=with_gt,
                                           count_factor=core.DEEPPOSE_COUNT_FACTOR)

    # ---- conv2d ---------------------------------------------------------------------------------

    def conv2d_forward(self, x, w, b=None, *, stride=1, padding=0, dilation=1):
        """y = conv2d(x, w) + b, NCHW, weight (Cout, Cin, kh, kw)."""
        params = dict(stride=stride, padding=padding, dilation=dilation)
        y = self.xp.empty(core.conv2d_output_shape(x.shape, w.shape, **params), dtype=x.dtype)
        core.conv2d_forward(x, w, b, y, stream=self._stream(), **params)
        return y

    def conv2d_backward(self, x, w, gy, *, stride=1, padding=0, dilation=1,
                        need: Tuple[bool, bool, bool] = (True, True, True)):
        """(gx, gw, gb) for upstream gradient gy; an entry is None where ``need`` says so."""
        params = dict(stride=stride, padding=padding, dilation=dilation, stream=self._stream())
        gx = gw = gb = None
        if need[0]:
            gx = self.xp.empty_like(x)
            core.conv2d_backward_data(gy, w, gx, **params)
        if need[1]:
            gw = self.xp.empty_like(w)
            core.conv2d_backward_weight(x, gy, gw, **params)
        if need[2]:
            gb = self.xp.empty((w.shape[0],), dtype=x.dtype)
            core.conv2d_backward_bias(gy, gb, stream=params["stream"])
        return gx, gw, gb
