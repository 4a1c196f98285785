"""The masked squared-error loss in PyTorch, four ways (ops.impls): ``mse_loss`` and
``deeppose_loss`` with ``impl`` = "autograd" | "explicit" | "kernel" | "native".

loss = S / (C * k), S = sum(((x - t) * v)^2), C = sum(v) (numel without v); k = 1 for the masked
mean (equal to F.mse_loss without a mask), 1/2 for DeepPose. C == 0 gives 0 and zero gradients.
v is a constant mask: it never gets a gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import core
from ..impls import LOSS_IMPLS, check_impl, check_loss_shapes
from .loader import check_like_x, check_types, cuda_stream, native_ops, unavailable_impls


def _safe_denominator(count: torch.Tensor, count_factor: float) -> torch.Tensor:
    # C == 0 means every term of S is 0 too; dividing by 1 then keeps loss and gradients at 0
    # (dividing by 0 would give NaN through the backward of the division).
    return torch.where(count > 0, count * count_factor, torch.ones_like(count))


def _count(x: torch.Tensor, v: Optional[torch.Tensor]) -> torch.Tensor:
    return v.sum() if v is not None else torch.full((), x.numel(), dtype=x.dtype,
                                                     device=x.device)


def autograd_sq_error_loss(x, t, v, count_factor: float) -> torch.Tensor:
    """Composed from torch primitives; backward by autograd."""
    d = x - t
    if v is not None:
        d = d * v
    return (d * d).sum() / _safe_denominator(_count(x, v), count_factor)


class ExplicitSqErrorLoss(torch.autograd.Function):
    """Forward and a hand-written backward, both in torch ops (first-order only)."""

    @staticmethod
    def forward(ctx, x, t, v, count_factor: float):
        d = x - t
        if v is not None:
            d = d * v
        denominator = _safe_denominator(_count(x, v), count_factor)
        ctx.save_for_backward(x, t, v, denominator)
        return (d * d).sum() / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        x, t, v, denominator = ctx.saved_tensors
        gx = (x - t) * (2 * grad_loss / denominator)
        if v is not None:
            gx = gx * (v * v)
        want_x, want_t = ctx.needs_input_grad[:2]
        return (gx if want_x else None), (-gx if want_t else None), None, None


class KernelSqErrorLoss(torch.autograd.Function):
    """Forward and backward in our kernels through ops.core (Python glue, native math)."""

    @staticmethod
    def forward(ctx, x, t, v, count_factor: float):
        # Detached views: torch refuses to export tensors that require grad through DLPack.
        x, t = x.detach().contiguous(), t.detach().contiguous()
        v = v.detach().contiguous() if v is not None else None
        loss, count = x.new_empty(()), x.new_empty(())
        core.sq_error_loss_forward(x, t, v, loss, count, count_factor=count_factor,
                                   stream=cuda_stream(x))
        ctx.save_for_backward(x, t, v, count)
        ctx.count_factor = count_factor
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, t, v, count = ctx.saved_tensors
        want_x, want_t = ctx.needs_input_grad[:2]
        gx = torch.empty_like(x)
        gt = torch.empty_like(x) if want_t else None
        core.sq_error_loss_backward(x, t, v, count, grad_loss.detach().contiguous(), gx, gt,
                                    count_factor=ctx.count_factor, stream=cuda_stream(x))
        return (gx if want_x else None), gt, None, None


def sq_error_loss(function: str, x, t, v, count_factor: float, impl: str) -> torch.Tensor:
    """The checked entry behind mse_loss and deeppose_loss."""
    tensors = {"x": x, "t": t, "v": v}
    check_types(function, tensors)
    check_impl(function, impl, LOSS_IMPLS, unavailable_impls("loss", x.device))
    check_loss_shapes(function, x.shape, t.shape, None if v is None else v.shape)
    check_like_x(function, impl, tensors)
    if impl == "autograd":
        return autograd_sq_error_loss(x, t, v, count_factor)
    if impl == "explicit":
        return ExplicitSqErrorLoss.apply(x, t, v, count_factor)
    if impl == "kernel":
        return KernelSqErrorLoss.apply(x, t, v, count_factor)
    return native_ops().sq_error_loss(x, t, v, count_factor)


def mse_loss(x: torch.Tensor, t: torch.Tensor, v: Optional[torch.Tensor] = None, *,
             impl: str = "autograd") -> torch.Tensor:
    """Masked mean squared error S / C (equal to ``F.mse_loss(x, t)`` when v is None).

    x, t: tensors of one shape; v: optional 0/1 mask of that shape (a constant).
    impl: "autograd" (default, torch primitives), "explicit" (autograd.Function with a
    hand-written backward), "kernel" (Function calling our kernels), "native" (our
    deepprof::sq_error_loss op with its C++ backward). Returns a 0-d tensor.
    """
    return sq_error_loss("ops.torch.mse_loss", x, t, v, core.MSE_COUNT_FACTOR, impl)


def deeppose_loss(x: torch.Tensor, t: torch.Tensor, v: Optional[torch.Tensor] = None, *,
                  impl: str = "autograd") -> torch.Tensor:
    """DeepPose's loss S / (C / 2): squared error per visible joint (x and y coordinate each).

    Same arguments as :func:`mse_loss`; x and t are typically (B, 2J) joint coordinates and v
    the per-coordinate visibility.
    """
    return sq_error_loss("ops.torch.deeppose_loss", x, t, v, core.DEEPPOSE_COUNT_FACTOR, impl)
