"""Our kernels on CuPy arrays, no autograd: forward and backward entry points that allocate
their outputs with CuPy and run on CuPy's current stream. See ops._raw.RawOps for the functions.

Importing this module imports CuPy (ImportError where it is not installed).
"""

import cupy as _cupy

from ._raw import RawOps


def _current_stream() -> int:
    return _cupy.cuda.get_current_stream().ptr


_ops = RawOps(_cupy, stream=_current_stream, name="cupy")

sq_error_loss_forward = _ops.sq_error_loss_forward
sq_error_loss_backward = _ops.sq_error_loss_backward
sq_error_loss_fused = _ops.sq_error_loss_fused
mse_loss_forward = _ops.mse_loss_forward
mse_loss_backward = _ops.mse_loss_backward
deeppose_loss_forward = _ops.deeppose_loss_forward
deeppose_loss_backward = _ops.deeppose_loss_backward
conv2d_forward = _ops.conv2d_forward
conv2d_backward = _ops.conv2d_backward
