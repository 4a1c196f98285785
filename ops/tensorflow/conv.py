"""conv2d in TensorFlow, three ways (ops.impls): ``conv2d`` with ``impl`` = "framework" |
"kernel" | "native", and ``Conv2D``, a drop-in ``keras.layers.Conv2D`` with an ``impl`` argument.

``conv2d`` takes the project's layout whatever TensorFlow's default: NCHW input, (Cout, Cin, kh,
kw) weights, stride/padding/dilation an int or a pair, groups = 1. Whether TensorFlow's own CPU
conv trains in NCHW depends on the machine (oneDNN on: yes; off: its forward or its backward
refuses NCHW; with oneDNN, explicitly padded NCHW convs cannot train but "VALID"/"SAME" ones
can), so impl="framework" asks once per process (``loader.cpu_conv_nchw_reason``) and passes
TensorFlow the padding form that equals ours: where NCHW trains with it (and on a GPU) it runs
``tf.nn.conv2d`` in NCHW directly; elsewhere, and for dilated convolutions (TensorFlow's CPU
Conv2D has no dilated backward), it transposes to NHWC and back. The weight always becomes TensorFlow's (kh, kw, Cin, Cout). Every transpose is its own
named op ("to_nhwc", "weight_to_hwio", "to_nchw"; in the layer "to_nchw", "kernel_to_oihw",
"to_nhwc"), so a profile shows the layout cost as its own range instead of hiding it in the
conv.

This module validates inputs and chooses an impl; it calls our kernels only through ops.core
(impl="kernel") or the loaded op library (impl="native").
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .. import core
from ..impls import CONV_IMPLS, KERNEL_IMPLS, check_impl
from . import loader

# Stands in for spatial sizes unknown until a graph runs, so the static checks still cover
# everything else; the ops check the real sizes when they run.
_UNKNOWN_SIZE = 2 ** 30


def _transpose(x: tf.Tensor, perm, name: str) -> tf.Tensor:
    with tf.name_scope(name):
        return tf.transpose(x, perm, name=name)


def _padding_mode(x: tf.Tensor, w: tf.Tensor, geometry: core.Conv2dGeometry) -> str:
    """The TensorFlow padding form that pads as symmetric ``geometry.padding`` does: "VALID"
    for none, "SAME" where TensorFlow's "same" rule gives the same amounts on both sides (it
    pads the odd one after, and at stride > 1 by the input size, which must be static), else
    "EXPLICIT". The form matters: with oneDNN, float32 NCHW trains with VALID/SAME, not EXPLICIT."""
    if geometry.padding == (0, 0):
        return "VALID"
    sizes, kernel = loader.static_shape(x)[2:], loader.static_shape(w)[2:]
    for size, k, s, d, p in zip(sizes, kernel, geometry.stride, geometry.dilation,
                                geometry.padding):
        extent = d * (k - 1) + 1
        if s == 1:
            total = extent - 1
        elif size is None:
            return "EXPLICIT"
        else:
            total = max((-(-size // s) - 1) * s + extent - size, 0)
        if total != 2 * p:
            return "EXPLICIT"
    return "SAME"


def _nchw_trains(x: tf.Tensor, padding_mode: str) -> bool:
    """Whether TensorFlow's conv trains in NCHW where ``x`` lives: on a GPU (cuDNN's own layout;
    unverified here, no GPU TensorFlow), and on the CPU where the probe says so for this padding
    form and dtype. A graph tensor may be placed on either, so it gets NCHW only where the CPU
    takes it."""
    if tf.executing_eagerly() and "GPU" in x.device.upper():
        return True
    return loader.cpu_conv_layout(padding_mode, x.dtype.name) == "NCHW"


def framework_conv2d(x, w, b, geometry: core.Conv2dGeometry) -> tf.Tensor:
    """TensorFlow's own conv (oneDNN/Eigen on the CPU, cuDNN on the GPU), in NCHW where it
    trains so here, else in NHWC between named transposes; bias by tf.nn.bias_add."""
    wh = _transpose(w, [2, 3, 1, 0], "weight_to_hwio")
    (ph, pw), (sh, sw), (dh, dw) = geometry.padding, geometry.stride, geometry.dilation
    mode = _padding_mode(x, w, geometry)
    if (dh, dw) == (1, 1) and _nchw_trains(x, mode):
        padding = mode if mode != "EXPLICIT" else [[0, 0], [0, 0], [ph, ph], [pw, pw]]
        y = tf.nn.conv2d(x, wh, strides=[1, 1, sh, sw], padding=padding, data_format="NCHW")
        return y if b is None else tf.nn.bias_add(y, b, data_format="NCHW")
    xh = _transpose(x, [0, 2, 3, 1], "to_nhwc")
    if (dh, dw) == (1, 1):
        y = tf.nn.conv2d(xh, wh, strides=[1, sh, sw, 1],
                         padding=[[0, 0], [ph, ph], [pw, pw], [0, 0]])
    else:
        # TensorFlow's CPU Conv2D has no dilated backward; its own route for dilation is
        # tf.nn.convolution (space-to-batch), which takes neither explicit padding nor a
        # stride together with dilation: pad first, stride by slicing after, each named.
        if ph or pw:
            with tf.name_scope("pad"):
                xh = tf.pad(xh, [[0, 0], [ph, ph], [pw, pw], [0, 0]])
        y = tf.nn.convolution(xh, wh, strides=1, padding="VALID", dilations=[dh, dw])
        if (sh, sw) != (1, 1):
            with tf.name_scope("stride_by_slicing"):
                y = y[:, ::sh, ::sw, :]
    if b is not None:
        y = tf.nn.bias_add(y, b)
    return _transpose(y, [0, 3, 1, 2], "to_nchw")


def kernel_conv2d(x, w, b, geometry: core.Conv2dGeometry) -> tf.Tensor:
    """Forward and backward in our kernels through ops.core (tf.custom_gradient, Python glue,
    native math; eager CPU tensors only, first-order only)."""
    params = dict(stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation)

    @tf.custom_gradient
    def conv(*inputs):
        x, w = inputs[:2]
        b = inputs[2] if len(inputs) == 3 else None
        y = loader.empty(geometry.output_shape, x.dtype)
        core.conv2d_forward(loader.dlpack(x), loader.dlpack(w), loader.dlpack(b), y, **params)

        def backward(gy):
            gx, gw = loader.empty(x.shape, x.dtype), loader.empty(w.shape, x.dtype)
            core.conv2d_backward_data(loader.dlpack(gy), loader.dlpack(w), gx, **params)
            core.conv2d_backward_weight(loader.dlpack(x), loader.dlpack(gy), gw, **params)
            grads = [loader.adopt(gx), loader.adopt(gw)]
            if b is not None:
                gb = loader.empty(b.shape, x.dtype)
                core.conv2d_backward_bias(loader.dlpack(gy), gb)
                grads.append(loader.adopt(gb))
            return loader.first_order_only(grads, (gy,) + inputs)
        return loader.adopt(y), backward

    return conv(x, w) if b is None else conv(x, w, b)


def native_conv2d(x, w, b, geometry: core.Conv2dGeometry) -> tf.Tensor:
    """Our DeepprofConv2d op; its registered gradient runs the DeepprofConv2dBackward* ops."""
    return loader.native_ops().deepprof_conv2d(
        x, w, [] if b is None else [b], stride=list(geometry.stride),
        padding=list(geometry.padding), dilation=list(geometry.dilation))


_IMPL_FUNCTIONS = {"framework": framework_conv2d, "kernel": kernel_conv2d,
                   "native": native_conv2d}


def _geometry(function: str, x, w, b, stride, padding, dilation) -> core.Conv2dGeometry:
    """core.conv2d_geometry on the static shapes; sizes unknown in a graph stand in as
    compatible ones (the output shape then is not meaningful, and only the kernel impl, which
    is eager, uses it)."""
    x_shape, w_shape = loader.static_shape(x), loader.static_shape(w)
    if x_shape is not None and len(x_shape) != 4:
        raise ValueError(f"{function}: x: expected a 4-d tensor (B, Cin, H, W), "
                         f"got shape {x_shape}")
    if w_shape is not None and len(w_shape) != 4:
        raise ValueError(f"{function}: w: expected a 4-d tensor (Cout, Cin, kh, kw), "
                         f"got shape {w_shape}")
    x_shape, w_shape = x_shape or (None,) * 4, w_shape or (None,) * 4

    def known(size, stand_in):
        return stand_in if size is None else size
    channels = known(x_shape[1], known(w_shape[1], 1))
    w_known = (known(w_shape[0], 1), known(w_shape[1], channels), known(w_shape[2], 1),
               known(w_shape[3], 1))
    x_known = (known(x_shape[0], 1), channels, known(x_shape[2], _UNKNOWN_SIZE),
               known(x_shape[3], _UNKNOWN_SIZE))
    bias_shape = None
    if b is not None:
        bias_shape = loader.static_shape(b)
        if bias_shape is not None and len(bias_shape) == 1 and bias_shape[0] is None:
            bias_shape = (w_known[0],)
    return core.conv2d_geometry(function, x_known, w_known, stride=stride, padding=padding,
                                dilation=dilation, bias_shape=bias_shape)


def conv2d(x, w, b=None, *, stride=1, padding=0, dilation=1,
           impl: str = "framework") -> tf.Tensor:
    """2-d convolution (cross-correlation) of x (B, Cin, H, W) with w (Cout, Cin, kh, kw) and
    the optional bias b (Cout,): tensors or variables of one dtype and device. stride, padding
    (symmetric, zeros) and dilation are an int or a pair (height, width).

    impl: "framework" (default: ``tf.nn.conv2d``, in NCHW where TensorFlow trains in it here,
    else in NHWC between named transposes; see the module docstring), "kernel" (tf.custom_gradient calling our kernels through DLPack; eager
    only), "native" (our DeepprofConv2d op with its registered gradient; eager, tf.function
    and Keras). kernel/native take float32/float64 and are first-order only. Every impl checks
    its arguments the same way first.

    Raises ValueError (unknown impl, shapes, geometry, devices), TypeError (types, dtypes)
    and ``ops.impls.UnsupportedImplError`` (e.g. impl="kernel" inside tf.function).
    """
    function = "ops.tensorflow.conv2d"
    tensors = loader.as_tensors(function, {"x": x, "w": w, "b": b})
    loader.check_impl_runs(function, impl, "conv", tensors["x"])
    geometry = _geometry(function, tensors["x"], tensors["w"], tensors["b"], stride, padding,
                         dilation)
    loader.check_like_x(function, impl, tensors)
    return _IMPL_FUNCTIONS[impl](tensors["x"], tensors["w"], tensors["b"], geometry)


@keras.saving.register_keras_serializable(package="deepprof")
class Conv2D(keras.layers.Conv2D):
    """``keras.layers.Conv2D`` whose convolution is chosen by ``impl`` (see :func:`conv2d`).

    Same constructor arguments, variables (kernel (kh, kw, Cin, Cout), bias (Cout,)) and
    config as ``keras.layers.Conv2D``, plus ``impl``, so weights move both ways with
    ``get_weights``/``set_weights`` and saved models load. ``impl="framework"`` runs Keras'
    own call unchanged: ``data_format="channels_first"`` then works on the CPU exactly where
    it does in Keras, i.e. where TensorFlow's CPU conv trains in NCHW
    (``ops.tensorflow.cpu_conv_layout(padding_mode, dtype)``), and fails as Keras' does elsewhere.

    The kernel impls ("kernel", "native") run our NCHW kernels: with ``channels_last`` (Keras'
    default) each call transposes the input to NCHW ("to_nchw") and the output back
    ("to_nhwc"), two extra passes over the activations, and with either layout the kernel to
    (Cout, Cin, kh, kw) ("kernel_to_oihw"), each a named op of its own in profiles.
    ``data_format="channels_first"`` avoids the activation transposes. They need groups=1,
    and padding="same" only where TensorFlow's "same" padding is symmetric: an odd dilated
    kernel extent at stride 1, and at stride > 1 an input size where the padding total is
    even (NotImplementedError otherwise, at construction or at the call that shows it).
    ``impl`` may be reassigned.
    """

    def __init__(self, filters, kernel_size, *args, impl: str = "framework", **kwargs):
        super().__init__(filters, kernel_size, *args, **kwargs)
        self.impl = impl

    @property
    def impl(self) -> str:
        """Which conv2d impl ``call`` runs; checked when set, not on every call."""
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        function = "ops.tensorflow.Conv2D"
        check_impl(function, impl, CONV_IMPLS, {})
        if impl in KERNEL_IMPLS:
            if self.groups != 1:
                raise NotImplementedError(f"{function}: groups: impl={impl!r} supports "
                                          f"groups=1 only, got {self.groups}")
            extents = [d * (k - 1) for d, k in zip(self.dilation_rate, self.kernel_size)]
            if self.padding == "same" and any(
                    e % 2 and s == 1 for e, s in zip(extents, self.strides)):
                raise NotImplementedError(f"{function}: padding: 'same' with an even dilated "
                                          f"kernel extent pads asymmetrically, which "
                                          f"impl={impl!r} does not support")
        self._impl = impl

    def _kernel_padding(self, x_nchw: tf.Tensor):
        """TensorFlow's "same" padding as our symmetric (height, width) padding."""
        if self.padding == "valid":
            return (0, 0)
        pads = []
        for axis, size, k, s, d in zip(("height", "width"), x_nchw.shape[2:], self.kernel_size,
                                       self.strides, self.dilation_rate):
            extent = d * (k - 1) + 1
            if size is None and s != 1:
                raise NotImplementedError(
                    f"ops.tensorflow.Conv2D: padding: 'same' at stride {s} pads according to "
                    f"the input {axis}, which is unknown here; impl={self.impl!r} needs it "
                    f"static")
            total = extent - 1 if size is None else max((-(-size // s) - 1) * s + extent - size,
                                                        0)
            if total % 2:
                raise NotImplementedError(
                    f"ops.tensorflow.Conv2D: padding: 'same' at stride {s} on input {axis} "
                    f"{size} pads {total // 2} before and {total - total // 2} after "
                    f"(TensorFlow's rule), which impl={self.impl!r} does not support; use "
                    f"keras.layers.ZeroPadding2D and padding='valid', or another input size")
            pads.append(total // 2)
        return tuple(pads)

    def call(self, inputs):
        if self.impl == "framework":
            return super().call(inputs)
        channels_last = self.data_format == "channels_last"
        x = _transpose(inputs, [0, 3, 1, 2], "to_nchw") if channels_last else inputs
        w = _transpose(self.kernel, [3, 2, 0, 1], "kernel_to_oihw")
        y = conv2d(x, w, self.bias if self.use_bias else None, stride=self.strides,
                   padding=self._kernel_padding(x), dilation=self.dilation_rate,
                   impl=self.impl)
        if channels_last:
            y = _transpose(y, [0, 2, 3, 1], "to_nhwc")
        return y if self.activation is None else self.activation(y)

    def get_config(self):
        return {**super().get_config(), "impl": self.impl}


__all__ = ["conv2d", "Conv2D"]
