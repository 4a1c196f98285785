"""PyTorch adapter: our kernels in PyTorch, each function in every implementation of ops.impls.

    from ops import torch as ops_torch
    loss = ops_torch.deeppose_loss(x, t, v, impl="native")
    y = ops_torch.conv2d(x, w, b, padding=1, impl="kernel")
    layer = ops_torch.Conv2d(16, 32, 3, padding=1, impl="native")   # a torch.nn.Conv2d
    model = ops_torch.swap_conv2d(model, impl="kernel")   # its torch.nn.Conv2d layers, ours

Loss impls: "autograd" (torch primitives), "explicit" (autograd.Function, hand-written backward
in torch ops), "kernel" (autograd.Function calling our kernels through DLPack), "native" (our
kernels as the torch.ops.deepprof operators, with autograd in C++ and Meta kernels for
torch.compile). Conv impls: "framework" (F.conv2d), "kernel", "native". ``impl_support`` and
``available_impls`` tell what runs on a device here; an unknown impl is a ValueError, an
unavailable one an ops.impls.UnsupportedImplError. Kernels run on PyTorch's current CUDA stream
and never synchronise the host.
"""

from .conv import Conv2d, conv2d, swap_conv2d
from .loader import available_impls, impl_support
from .loss import deeppose_loss, mse_loss

__all__ = ["mse_loss", "deeppose_loss", "conv2d", "Conv2d", "swap_conv2d", "impl_support",
           "available_impls"]
