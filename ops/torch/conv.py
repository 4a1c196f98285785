"""conv2d in PyTorch, three ways (ops.impls): ``conv2d`` with ``impl`` = "framework" |
"kernel" | "native", and ``Conv2d``, a drop-in ``torch.nn.Conv2d`` with an ``impl`` argument.

NCHW input, (Cout, Cin, kh, kw) weights, stride/padding/dilation an int or a pair, groups = 1
for our kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import core
from ..impls import CONV_IMPLS, check_impl
from .loader import check_like_x, check_types, cuda_stream, native_ops, unavailable_impls


class KernelConv2d(torch.autograd.Function):
    """Forward and backward in our kernels through ops.core (Python glue, native math)."""

    @staticmethod
    def forward(ctx, x, w, b, geometry: core.Conv2dGeometry):
        # Detached views: torch refuses to export tensors that require grad through DLPack.
        x, w = x.detach().contiguous(), w.detach().contiguous()
        b = b.detach().contiguous() if b is not None else None
        y = x.new_empty(geometry.output_shape)
        params = dict(stride=geometry.stride, padding=geometry.padding,
                      dilation=geometry.dilation, stream=cuda_stream(x))
        core.conv2d_forward(x, w, b, y, **params)
        ctx.save_for_backward(x, w)
        ctx.params = params
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        gy = gy.detach().contiguous()
        gx = gw = gb = None
        if want_x:
            gx = torch.empty_like(x)
            core.conv2d_backward_data(gy, w, gx, **ctx.params)
        if want_w:
            gw = torch.empty_like(w)
            core.conv2d_backward_weight(x, gy, gw, **ctx.params)
        if want_b:
            gb = x.new_empty((w.shape[0],))
            core.conv2d_backward_bias(gy, gb, stream=ctx.params["stream"])
        return gx, gw, gb, None


def conv2d(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None, *,
           stride=1, padding=0, dilation=1, impl: str = "framework") -> torch.Tensor:
    """2-d convolution (cross-correlation) of x (B, Cin, H, W) with w (Cout, Cin, kh, kw).

    impl: "framework" (default: ``F.conv2d``, oneDNN on CPU and cuDNN on GPU), "kernel" (an
    autograd.Function calling our kernels), "native" (our deepprof::conv2d op with its C++
    backward). Every impl checks its arguments the same way first.
    """
    function = "ops.torch.conv2d"
    tensors = {"x": x, "w": w, "b": b}
    check_types(function, tensors)
    check_impl(function, impl, CONV_IMPLS, unavailable_impls("conv", x.device))
    if x.dim() != 4:
        raise ValueError(f"{function}: x: expected a 4-d tensor (B, Cin, H, W), "
                         f"got shape {tuple(x.shape)}")
    geometry = core.conv2d_geometry(function, tuple(x.shape), tuple(w.shape), stride=stride,
                                    padding=padding, dilation=dilation,
                                    bias_shape=None if b is None else tuple(b.shape))
    check_like_x(function, impl, tensors)
    if impl == "framework":
        return F.conv2d(x, w, b, stride=geometry.stride, padding=geometry.padding,
                        dilation=geometry.dilation)
    if impl == "kernel":
        return KernelConv2d.apply(x, w, b, geometry)
    return native_ops().conv2d(x, w, b, list(geometry.stride), list(geometry.padding),
                               list(geometry.dilation))


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` whose convolution is chosen by ``impl`` (see :func:`conv2d`).

    Same constructor arguments, parameters and state dict as ``torch.nn.Conv2d``, plus
    ``impl``, which may be reassigned. Our kernels ("kernel", "native") need groups=1 and
    padding_mode="zeros"; padding="same" works where it is symmetric (odd dilated kernel
    extent).
    """

    def __init__(self, *args, impl: str = "framework", **kwargs):
        super().__init__(*args, **kwargs)
        self.impl = impl

    @property
    def impl(self) -> str:
        """Which conv2d impl ``forward`` runs; checked when set, not on every call."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        check_impl("ops.torch.Conv2d", impl, CONV_IMPLS, {})
        if impl != "framework":
            if self.groups != 1:
                raise NotImplementedError(f"ops.torch.Conv2d: groups: impl={impl!r} supports "
                                          f"groups=1 only, got {self.groups}")
            if self.padding_mode != "zeros":
                raise NotImplementedError(f"ops.torch.Conv2d: padding_mode: impl={impl!r} "
                                          f"supports 'zeros' only, got {self.padding_mode!r}")
        self._kernel_padding = self._symmetric_padding(impl)
        self._impl = impl

    def _symmetric_padding(self, impl: str):
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0, 0)
        extents = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
        if impl != "framework" and any(e % 2 for e in extents):
            raise NotImplementedError(f"ops.torch.Conv2d: padding: 'same' with an even dilated "
                                      f"kernel extent pads asymmetrically, which "
                                      f"impl={impl!r} does not support")
        return tuple(e // 2 for e in extents)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.impl == "framework":
            return super().forward(input)
        return conv2d(input, self.weight, self.bias, stride=self.stride,
                      padding=self._kernel_padding, dilation=self.dilation, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}"
