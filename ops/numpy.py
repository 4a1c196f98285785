"""Our kernels on NumPy arrays, no autograd: forward and backward entry points that allocate
their outputs with NumPy. See ops._raw.RawOps for the functions."""

import numpy as _np

from ._raw import RawOps

_ops = RawOps(_np, stream=lambda: None, name="numpy")

sq_error_loss_forward = _ops.sq_error_loss_forward
sq_error_loss_backward = _ops.sq_error_loss_backward
sq_error_loss_fused = _ops.sq_error_loss_fused
mse_loss_forward = _ops.mse_loss_forward
mse_loss_backward = _ops.mse_loss_backward
deeppose_loss_forward = _ops.deeppose_loss_forward
deeppose_loss_backward = _ops.deeppose_loss_backward
conv2d_forward = _ops.conv2d_forward
conv2d_backward = _ops.conv2d_backward
