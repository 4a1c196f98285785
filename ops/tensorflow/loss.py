"""The masked squared-error loss in TensorFlow, four ways (ops.impls): ``mse_loss`` and
``deeppose_loss`` with ``impl`` = "autograd" | "explicit" | "kernel" | "native".

loss = S / (C * k), S = sum(((x - t) * v)^2), C = sum(v) (numel without v); k = 1 for the masked
mean (equal to ``tf.reduce_mean(tf.square(x - t))`` without a mask), 1/2 for DeepPose. C == 0
gives 0 and zero gradients. v is a constant mask: it never gets a gradient.

This module validates inputs and chooses an impl; it calls our kernels only through ops.core
(impl="kernel") or the loaded op library (impl="native").
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from .. import core
from ..impls import check_loss_shapes
from . import loader


def _safe_denominator(count: tf.Tensor, count_factor: float) -> tf.Tensor:
    # C == 0 means every term of S is 0 too; dividing by 1 then keeps loss and gradients at 0
    # (dividing by 0 would give NaN through the backward of the division).
    return tf.where(count > 0, count * count_factor, tf.ones_like(count))


def _count(x: tf.Tensor, v: Optional[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_sum(v) if v is not None else tf.cast(tf.size(x), x.dtype)


def autograd_sq_error_loss(x, t, v, count_factor: float) -> tf.Tensor:
    """Composed from TensorFlow ops; backward by TensorFlow's autodiff."""
    d = x - t
    if v is not None:
        v = tf.stop_gradient(v)
        d = d * v
    return tf.reduce_sum(d * d) / _safe_denominator(_count(x, v), count_factor)


def explicit_sq_error_loss(x, t, v, count_factor: float) -> tf.Tensor:
    """Forward and a hand-written backward, both in TensorFlow ops (tf.custom_gradient). Works
    eagerly and inside tf.function; the backward being TensorFlow ops, TensorFlow can
    differentiate it again."""

    @tf.custom_gradient
    def loss(x, t):
        d = x - t
        if v is not None:
            d = d * v
        denominator = _safe_denominator(_count(x, v), count_factor)

        def backward(grad_loss):
            gx = (x - t) * (2 * grad_loss / denominator)
            if v is not None:
                gx = gx * (v * v)
            return gx, -gx
        return tf.reduce_sum(d * d) / denominator, backward

    return loss(x, t)


def kernel_sq_error_loss(x, t, v, count_factor: float) -> tf.Tensor:
    """Forward and backward in our kernels through ops.core (tf.custom_gradient, Python glue,
    native math; eager CPU tensors only, first-order only). Inputs reach the kernels as DLPack
    views; outputs are NumPy arrays the kernels write, adopted by TensorFlow without a copy."""

    @tf.custom_gradient
    def loss(x, t):
        loss_out, count_out = loader.empty((), x.dtype), loader.empty((), x.dtype)
        core.sq_error_loss_forward(loader.dlpack(x), loader.dlpack(t), loader.dlpack(v),
                                   loss_out, count_out, count_factor=count_factor)

        def backward(grad_loss):
            gx, gt = loader.empty(x.shape, x.dtype), loader.empty(x.shape, x.dtype)
            core.sq_error_loss_backward(loader.dlpack(x), loader.dlpack(t), loader.dlpack(v),
                                        count_out, loader.dlpack(grad_loss), gx, gt,
                                        count_factor=count_factor)
            return loader.first_order_only([loader.adopt(gx), loader.adopt(gt)],
                                           (x, t, grad_loss))
        return loader.adopt(loss_out), backward

    return loss(x, t)


def native_sq_error_loss(x, t, v, count_factor: float) -> tf.Tensor:
    """Our DeepprofSqErrorLoss op; its registered gradient runs DeepprofSqErrorLossBackward."""
    masks = [] if v is None else [v]
    return loader.native_ops().deepprof_sq_error_loss(x, t, masks,
                                                      count_factor=count_factor).loss


_IMPL_FUNCTIONS = {"autograd": autograd_sq_error_loss, "explicit": explicit_sq_error_loss,
                   "kernel": kernel_sq_error_loss, "native": native_sq_error_loss}


def _check_shapes(function: str, tensors) -> None:
    """t and v must have x's shape exactly; sizes unknown in a graph must be compatible (the
    ops check the rest when they run)."""
    shapes = {name: loader.static_shape(value) for name, value in tensors.items()
              if value is not None}
    if all(s is not None and None not in s for s in shapes.values()):
        check_loss_shapes(function, shapes["x"], shapes["t"], shapes.get("v"))
        return
    x = tensors["x"]
    for name in ("t", "v"):
        value = tensors[name]
        if value is not None and not value.shape.is_compatible_with(x.shape):
            raise ValueError(f"{function}: {name}: expected shape {shapes['x']} (same as x), "
                             f"got {shapes[name]}")


def sq_error_loss(function: str, x, t, v, count_factor: float, impl: str) -> tf.Tensor:
    """The checked entry behind mse_loss and deeppose_loss."""
    tensors = loader.as_tensors(function, {"x": x, "t": t, "v": v})
    loader.check_impl_runs(function, impl, "loss", tensors["x"])
    _check_shapes(function, tensors)
    loader.check_like_x(function, impl, tensors)
    return _IMPL_FUNCTIONS[impl](tensors["x"], tensors["t"], tensors["v"], count_factor)


def mse_loss(x, t, v=None, *, impl: str = "autograd") -> tf.Tensor:
    """Masked mean squared error S / C (``tf.reduce_mean(tf.square(x - t))`` when v is None).

    x, t: tensors (or variables) of one shape, dtype and device; v: optional 0/1 mask of that
    shape (a constant: no gradient flows to it). sum(v) == 0 gives 0 and zero gradients.

    impl: "autograd" (default, TensorFlow ops and autodiff), "explicit" (tf.custom_gradient
    with a hand-written backward in TensorFlow ops), "kernel" (tf.custom_gradient calling our
    kernels through DLPack; eager only), "native" (our DeepprofSqErrorLoss op with its
    registered gradient; eager, tf.function and Keras). kernel/native take float32/float64
    and are first-order only (a second derivative raises LookupError). Returns a 0-d tensor.

    Raises ValueError (unknown impl, shapes, devices), TypeError (types, dtypes) and
    ``ops.impls.UnsupportedImplError`` (e.g. impl="kernel" inside tf.function).
    """
    return sq_error_loss("ops.tensorflow.mse_loss", x, t, v, core.MSE_COUNT_FACTOR, impl)


def deeppose_loss(x, t, v=None, *, impl: str = "autograd") -> tf.Tensor:
    """DeepPose's loss S / (C / 2): squared error per visible joint (x and y coordinate each).

    Same arguments, impls and errors as :func:`mse_loss`; x and t are typically (B, 2J) joint
    coordinates and v the per-coordinate visibility.
    """
    return sq_error_loss("ops.tensorflow.deeppose_loss", x, t, v, core.DEEPPOSE_COUNT_FACTOR,
                         impl)


__all__ = ["mse_loss", "deeppose_loss"]
