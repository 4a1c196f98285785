"""conv2d in PyTorch, three ways (ops.impls): ``conv2d`` with ``impl`` = "framework" |
"kernel" | "native", ``Conv2d``, a drop-in ``torch.nn.Conv2d`` with an ``impl`` argument, and
``swap_conv2d``, which puts ``Conv2d`` in place of the ``torch.nn.Conv2d`` layers of a model.

NCHW input, (Cout, Cin, kh, kw) weights, stride/padding/dilation an int or a pair, groups = 1
for our kernels.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import core
from ..impls import CONV_IMPLS, check_float, check_impl
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
        limit = _kernel_limit(self, impl)
        if limit:
            raise NotImplementedError(f"ops.torch.Conv2d: {limit}")
        self._kernel_padding = self._symmetric_padding()
        self._impl = impl

    def _symmetric_padding(self):
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0, 0)
        # 'same' (the framework impl pads an even extent itself, asymmetrically).
        return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.impl == "framework":
            return super().forward(input)
        return conv2d(input, self.weight, self.bias, stride=self.stride,
                      padding=self._kernel_padding, dilation=self.dilation, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl!r}"


def _kernel_limit(layer: torch.nn.Conv2d, impl: str) -> Optional[str]:
    """Why ``impl`` cannot run ``layer``'s convolution ("argument: reason"), or None. Our
    kernels take one group, zero padding, and the same padding on both sides."""
    if impl == "framework":
        return None
    if layer.groups != 1:
        return f"groups: impl={impl!r} supports groups=1 only, got {layer.groups}"
    if layer.padding_mode != "zeros":
        return (f"padding_mode: impl={impl!r} supports 'zeros' only, got "
                f"{layer.padding_mode!r}")
    if layer.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(layer.dilation,
                                                                       layer.kernel_size)):
        return (f"padding: 'same' with an even dilated kernel extent pads asymmetrically, "
                f"which impl={impl!r} does not support")
    return None


def swap_conv2d(module: torch.nn.Module, impl: str = "kernel") -> torch.nn.Module:
    """Puts :class:`Conv2d` running ``impl`` in place of every plain ``torch.nn.Conv2d`` in
    ``module`` (``module`` itself included) and returns the module, or the replacement when
    ``module`` is itself a Conv2d.

    Each replacement holds the original's Parameter objects (an optimizer already built over
    the model keeps training them) and its geometry, padding mode and train/eval mode. Hooks
    registered on a replaced layer do not carry over. Subclasses of ``torch.nn.Conv2d``, ours
    included, are left as they are: their forward need not be the plain convolution.

    Every layer is checked before any is replaced, so a refusal leaves ``module`` unchanged:
    a layer our kernels cannot run (groups > 1, a padding mode other than zeros, an
    asymmetric 'same' padding: NotImplementedError; weights other than float32/float64:
    TypeError; ``impl`` unavailable on the layer's device: ops.impls.UnsupportedImplError)
    is refused naming its path in the module.
    """
    function = "ops.torch.swap_conv2d"
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{function}: module: expected a torch.nn.Module, got "
                        f"{type(module).__name__}")
    check_impl(function, impl, CONV_IMPLS, {})
    twins = {}                     # id(original) -> replacement
    for path, layer in module.named_modules():
        if type(layer) is not torch.nn.Conv2d or id(layer) in twins:
            continue
        where = f"{function}: layer {path or '(the module itself)'}"
        check_impl(where, impl, CONV_IMPLS, unavailable_impls("conv", layer.weight.device))
        check_float(where, impl, "weight", str(layer.weight.dtype).replace("torch.", ""))
        limit = _kernel_limit(layer, impl)
        if limit:
            raise NotImplementedError(f"{where}: {limit}")
        twins[id(layer)] = _twin(layer, impl)
    if id(module) in twins:
        return twins[id(module)]
    for parent in list(module.modules()):
        # _modules, not named_children(): a layer registered twice keeps both places.
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in twins:
                setattr(parent, name, twins[id(child)])
    return module


def _twin(layer: torch.nn.Conv2d, impl: str) -> Conv2d:
    """A Conv2d running ``impl`` that shares ``layer``'s parameters."""
    # Built on the meta device: its own weights would be thrown away at once.
    twin = Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                  stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                  groups=layer.groups, bias=layer.bias is not None,
                  padding_mode=layer.padding_mode, device="meta", impl=impl)
    twin.weight, twin.bias = layer.weight, layer.bias
    return twin.train(layer.training)
