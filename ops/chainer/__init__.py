"""Chainer adapter: the loss and conv2d with our kernels swapped in, next to Chainer's own.

Same public functions as every adapter (``ops.torch``, ...), each with an ``impl`` argument:

loss (``mse_loss``, ``deeppose_loss``; ``ops.impls.LOSS_IMPLS``)
    ``autograd``  composed from ``chainer.functions`` primitives; Chainer's autodiff
    ``explicit``  a ``chainer.FunctionNode`` with a hand-written backward in NumPy/CuPy array
                  ops: the experiment of the classic "DeepPose in PyTorch vs Chainer" comparison
    ``kernel``    a ``chainer.FunctionNode`` whose forward and backward call our C++/CUDA kernels
                  through ``ops.numpy`` (NumPy arrays) or ``ops.cupy`` (CuPy arrays)
    ``native``    the same FunctionNode as ``kernel``
conv (``conv2d``, the link ``Convolution2D``; ``ops.impls.CONV_IMPLS``)
    ``framework`` ``chainer.functions.convolution_2d`` (im2col + GEMM; cuDNN where present)
    ``kernel``    a ``chainer.FunctionNode`` calling our kernels
    ``native``    the same FunctionNode as ``kernel``

Why ``native`` == ``kernel`` here: elsewhere ``native`` means our kernels registered as the
framework's own op, with no Python between the framework and the kernel. Chainer has no C++ op
registry: its every op, its own included, is a Python ``FunctionNode`` calling array code, so a
FunctionNode calling our kernels already *is* a Chainer op. ``native`` is accepted, so that one
benchmark loop runs unchanged across frameworks, and runs the kernel Function.

    import ops.chainer as ops_chainer
    loss = ops_chainer.deeppose_loss(x, t, v, impl="kernel")
    y = ops_chainer.conv2d(x, w, b, padding=1, impl="kernel")
    layer = ops_chainer.Convolution2D(16, 32, 3, pad=1, impl="kernel")  # a L.Convolution2D

The ``explicit``, ``kernel`` and ``native`` backward passes run on raw arrays: first-order only
(double backprop raises NotImplementedError). Kernel impls take float32/float64, NumPy arrays
anywhere and CuPy arrays where ``ops.cuda_available()`` (on CuPy's current stream, through
``ops.cupy``). ``impl_support`` and ``available_impls`` tell what runs on a device
here; an unknown impl is a ValueError, an unavailable one an ``ops.impls.UnsupportedImplError``.
Chainer itself is imported through ``ops.chainer.loader`` (see there why).
"""

from .conv import Convolution2D, conv2d
from .loader import available_impls, impl_support
from .loss import deeppose_loss, mse_loss

__all__ = ["mse_loss", "deeppose_loss", "conv2d", "Convolution2D", "impl_support",
           "available_impls"]
