"""TensorFlow adapter: our kernels in TensorFlow/Keras, each function in every implementation of
ops.impls.

    from ops import tensorflow as ops_tf
    loss = ops_tf.deeppose_loss(x, t, v, impl="native")
    y = ops_tf.conv2d(x, w, b, padding=1, impl="kernel")              # NCHW, w (Cout, Cin, kh, kw)
    layer = ops_tf.Conv2D(32, 3, padding="same", impl="native")       # a keras.layers.Conv2D

Loss impls: "autograd" (TensorFlow ops and autodiff), "explicit" (tf.custom_gradient with a
hand-written backward in TensorFlow ops), "kernel" (tf.custom_gradient calling our kernels
through DLPack: eager CPU tensors only; inside tf.function it is refused, pointing to "native"),
"native" (our kernels as TensorFlow ops from libdeepprof_tf.so, gradients registered with
tf.RegisterGradient: eager, tf.function and Keras fit). Conv impls: "framework" (tf.nn.conv2d in
NCHW where TensorFlow's CPU conv trains in it on this machine, else in NHWC between named
transposes: ``cpu_conv_layout`` says which), "kernel", "native".
``impl_support`` and ``available_impls`` tell what runs on a device here, in the current mode;
an unknown impl is a ValueError, an unavailable one an ops.impls.UnsupportedImplError.
"""

from .conv import Conv2D, conv2d
from .loader import (available_impls, conv_layout_note, cpu_conv_layout, impl_support,
                     onednn_enabled)
from .loss import deeppose_loss, mse_loss

__all__ = ["mse_loss", "deeppose_loss", "conv2d", "Conv2D", "impl_support", "available_impls",
           "cpu_conv_layout", "onednn_enabled", "conv_layout_note"]
