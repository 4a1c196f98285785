"""MXNet adapter: the loss and conv2d with our kernels swapped in, next to MXNet's own.

Same public functions as every adapter (``ops.torch``, ``ops.chainer``), each with an ``impl``
argument, on ``mx.nd.NDArray`` inputs (and on ``mx.sym.Symbol`` inputs inside a hybridized Gluon
block):

loss (``mse_loss``, ``deeppose_loss``; ``ops.impls.LOSS_IMPLS``)
    ``autograd``  composed from MXNet operators; MXNet's autograd
    ``explicit``  an ``mx.autograd.Function`` with a hand-written backward in NDArray
                  operations; in graphs the same as an ``mx.operator.CustomOp``
    ``kernel``    the same Function / CustomOp calling our C++ kernels through DLPack
    ``native``    ``deepprof_sq_error_loss``, our kernels as an MXNet operator (the external
                  operator library libdeepprof_mxnet.so, lib_api.h): forward and backward in
                  C++, no Python between MXNet's engine and the kernel
conv (``conv2d``, the block ``Conv2D``; ``ops.impls.CONV_IMPLS``)
    ``framework`` ``mx.nd.Convolution`` (oneDNN on CPU, cuDNN on GPU)
    ``kernel``    a Function / CustomOp calling our kernels
    ``native``    ``deepprof_conv2d`` from libdeepprof_mxnet.so

    import ops.mxnet as om
    loss = om.deeppose_loss(x, t, v, impl="native")             # an NDArray of shape (1,)
    y = om.conv2d(x, w, b, padding=1, impl="kernel")
    layer = om.Conv2D(32, 3, padding=1, impl="native")           # an mx.gluon.nn.Conv2D

MXNet is asynchronous: an operator call only queues work on its engine. The native operators
are queued like any other, with their read and write dependencies declared to the engine. The
kernel impl instead calls our kernels from Python, synchronously: each call first waits for the
arrays it reads (``to_dlpack_for_read`` waits for pending writes) and for the outputs it writes
(``to_dlpack_for_write`` waits for pending reads and writes; our outputs are fresh arrays, or
the ones MXNet hands a CustomOp), so results are right, but every kernel call is a point where
Python waits for MXNet's queue to drain up to its inputs: the asynchrony (overlap of Python with
queued work) is lost there. That is part of what ``kernel`` measures against ``native``.

Six MXNet 1.9.1 defects are worked around in this adapter, each documented in ``loader``'s
docstring: ``mx.autograd.Function`` drops gradients (``loader.Function`` corrects it); arrays
its oneDNN operators leave in oneDNN's blocked layout cannot be exported through DLPack (the
kernel impl exports a copy of those); a CustomOp fed straight from a oneDNN operator reads
unconverted data (in graphs the explicit and kernel impls get their data through an
out-of-place copy, ``loader.custom_op``); the kernel impl's backward, had it waited for the
weight, would deadlock with an optimizer update queued before it ran (it reads what its forward
read without waiting again, so training loops need no wait of their own); MXNet's inference-mode
convolution reorders its weight in place into oneDNN's layout (``Conv2D`` puts it back); and
Python work still queued at exit would hang the interpreter (importing ops.mxnet registers a
drain of MXNet's queue with ``atexit``). One is not: the native operators cannot accumulate
gradients (lib_api gives external operators no OpReqType), so grad_req='add' on their inputs is
not supported, and ``Conv2D`` refuses it.

Kernel impls take float32/float64 and run on CPU arrays; on a GPU only ``native``
runs our kernels (on the CUDA stream MXNet hands the operator; not yet run on a GPU).
``impl_support`` and ``available_impls`` tell what runs on a context here; an unknown impl is a
ValueError, an unavailable one an ``ops.impls.UnsupportedImplError``.
"""

# The loader first: it refuses, before mxnet is imported, what would crash the interpreter.
from .loader import available_impls, impl_support  # noqa: I001
from .conv import Conv2D, conv2d
from .loss import deeppose_loss, mse_loss

__all__ = ["mse_loss", "deeppose_loss", "conv2d", "Conv2D", "impl_support", "available_impls"]
