"""What this TensorFlow can run: loads the Deepprof* op library (impl="native") once and
registers its gradients, tells which impls are usable on which device and in which mode, holds
the argument checks every ops.tensorflow entry point shares, and hands our kernels TensorFlow
tensors through DLPack (impl="kernel").

The library (``ops/libdeepprof_tf.so``, from csrc/tf_ops.cc) is built against the TensorFlow
that was importable at build time and loaded here with ``tf.load_op_library``. Where it was not
built, or does not load into this TensorFlow, impl="native" is unavailable and
:func:`native_unavailable_reason` says why.

impl="kernel" calls ``ops.core`` from Python, which needs eager tensors: inside ``tf.function``
(graph mode; Keras ``fit`` unless ``run_eagerly=True``) it is unavailable with a reason that
points to impl="native", rather than falling back to ``tf.py_function`` silently.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

try:  # TensorFlow's own test for "is any tape active"; where it moves, always guard
    from tensorflow.python.eager.record import could_possibly_record as _tape_is_recording
except ImportError:  # pragma: no cover
    def _tape_is_recording() -> bool:
        return True

from .. import cuda_available
from ..impls import (CONV_IMPLS, KERNEL_IMPLS, LOSS_IMPLS, UnsupportedImplError,
                     check_float, check_impl)

LIBRARY = Path(__file__).resolve().parent.parent / "libdeepprof_tf.so"
_IMPLS = {"loss": LOSS_IMPLS, "conv": CONV_IMPLS}
# TensorFlow's CPU kernels map tensors as Eigen-aligned (EIGEN_MAX_ALIGN_BYTES in
# tf.sysconfig.get_compile_flags()); memory we hand it must be aligned as much.
_ALIGN_BYTES = 64
GRAPH_MODE_REASON = ("inside tf.function (graph mode) tensors cannot be handed to Python "
                     "through DLPack; use impl='native' (our kernels as a TensorFlow op, which "
                     "runs in graphs), or run eagerly (Keras: compile(run_eagerly=True))")


# ---- the native op library -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) once the library is loaded and its gradients registered, else (None, why)."""
    if not LIBRARY.exists():
        return None, (f"{LIBRARY.name} was not built (TensorFlow was not importable when ops "
                      f"was built, or OPS_TF=0); rebuild with `pip install "
                      f"--no-build-isolation -e .`")
    try:
        library = tf.load_op_library(str(LIBRARY))
    except (tf.errors.NotFoundError, OSError) as error:  # e.g. built against another TF
        return None, f"{LIBRARY.name} does not load into TensorFlow {tf.__version__}: {error}"
    _register_gradients(library)
    return library, None


def native_unavailable_reason() -> Optional[str]:
    """None when the Deepprof* ops are loaded and usable, else why not (loads them once)."""
    return _load()[1]


def native_ops():
    """The loaded op library (``deepprof_sq_error_loss``, ``deepprof_conv2d``, ... and their
    backward ops); UnsupportedImplError when it is missing."""
    library, reason = _load()
    if library is None:
        raise UnsupportedImplError(f"impl='native' is not available here: {reason}")
    return library


@functools.lru_cache(maxsize=None)
def native_has_gpu_kernels() -> bool:
    """Whether the loaded library registered GPU kernels (built with GOOGLE_CUDA)."""
    from tensorflow.python.framework import kernels  # TF's kernel registry, read-only
    registered = kernels.get_registered_kernels_for_op("DeepprofConv2d").kernel
    return any(k.device_type == "GPU" for k in registered)


def _skipped(op) -> Tuple[int, ...]:
    # Eager gradients know which inputs nobody watches; graph gradients do not (None).
    return tuple(getattr(op, "skip_input_indices", None) or ())


def _register_gradients(library) -> None:
    """The native ops' backward: our backward ops, first-order only (the backward ops have no
    gradient, so differentiating twice raises LookupError instead of giving zeros)."""

    @tf.RegisterGradient("DeepprofSqErrorLoss")
    def _sq_error_loss_grad(op, grad_loss, _grad_count):
        x, t, masks = op.inputs[0], op.inputs[1], list(op.inputs[2:])
        with_grad_t = 1 not in _skipped(op)
        gx, gt = library.deepprof_sq_error_loss_backward(
            grad_loss, x, t, masks, op.outputs[1], count_factor=op.get_attr("count_factor"),
            with_grad_t=with_grad_t)
        return [gx, gt if with_grad_t else None] + [None] * len(masks)

    @tf.RegisterGradient("DeepprofConv2d")
    def _conv2d_grad(op, grad_y):
        x, w = op.inputs[0], op.inputs[1]
        params = {name: op.get_attr(name) for name in ("stride", "padding", "dilation")}
        skipped = _skipped(op)
        grads = [None if 0 in skipped else
                 library.deepprof_conv2d_backward_data(grad_y, w, x, **params),
                 None if 1 in skipped else
                 library.deepprof_conv2d_backward_weight(x, grad_y, w, **params)]
        if len(op.inputs) == 3:
            grads.append(None if 2 in skipped else
                         library.deepprof_conv2d_backward_bias(grad_y))
        return grads


# ---- what runs where -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def _device_type(device: str) -> str:
    """"CPU", "GPU", ... from "cpu", "GPU:0", "/device:GPU:0", "/job:.../device:CPU:0"."""
    try:
        device_type = tf.DeviceSpec.from_string(device).device_type
    except ValueError:
        device_type = None
    if not device_type:
        raise ValueError(f"ops.tensorflow.impl_support: device: expected a TensorFlow device "
                         f"such as 'cpu', 'gpu:0' or '/device:GPU:0', got {device!r}")
    return device_type.upper()


@functools.lru_cache(maxsize=None)
def _gpu_reasons() -> Dict[str, str]:
    if not tf.config.list_physical_devices("GPU"):
        reason = "TensorFlow sees no GPU here (tensorflow-cpu, or no driver/GPU)"
        return {impl: reason for impl in KERNEL_IMPLS}
    reasons = {"kernel": "TensorFlow does not give Python its CUDA stream, so impl='kernel' "
                         "cannot order our kernels with TensorFlow's GPU work; use "
                         "impl='native'"}
    if not cuda_available():
        reasons["native"] = ("ops._C has no usable CUDA device (built without CUDA, or no "
                             "driver/GPU here)")
    elif native_unavailable_reason() is None and not native_has_gpu_kernels():
        reasons["native"] = (f"{LIBRARY.name} has no GPU kernels (built without GOOGLE_CUDA "
                             f"against a CUDA TensorFlow)")
    return reasons


def _device_reasons(device_type: Optional[str]) -> Dict[str, str]:
    if device_type is None or device_type == "CPU":  # None: a graph tensor, placed later
        return {}
    if device_type == "GPU":
        return _gpu_reasons()
    reason = f"our kernels run on CPU and GPU tensors, not {device_type}"
    return {impl: reason for impl in KERNEL_IMPLS}


def _support(kind: str, device_type: Optional[str]) -> Dict[str, Optional[str]]:
    support: Dict[str, Optional[str]] = {impl: None for impl in _IMPLS[kind]}
    support.update(_device_reasons(device_type))
    if support["kernel"] is None and not tf.executing_eagerly():
        support["kernel"] = GRAPH_MODE_REASON
    if support["native"] is None:
        support["native"] = native_unavailable_reason()
    return support


@functools.lru_cache(maxsize=64)
def _unavailable(kind: str, device_type: Optional[str], eager: bool) -> Dict[str, str]:
    # Every adapter call asks; per kind, device type and mode the answer never changes.
    del eager  # only part of the cache key: _support reads the mode itself
    return {impl: reason for impl, reason in _support(kind, device_type).items() if reason}


def impl_support(kind: str, device="cpu") -> Dict[str, Optional[str]]:
    """Every impl of ``kind`` ("loss" or "conv") mapped to None when it runs here on ``device``
    (a device string such as "cpu", "gpu:0", "/device:GPU:0", or a tf.DeviceSpec) in the
    current mode (eager, or graph inside tf.function), or to the reason it does not."""
    if kind not in _IMPLS:
        raise ValueError(f"ops.tensorflow.impl_support: kind: expected 'loss' or 'conv', "
                         f"got {kind!r}")
    text = device.to_string() if isinstance(device, tf.DeviceSpec) else device
    if not isinstance(text, str):
        raise TypeError(f"ops.tensorflow.impl_support: device: expected a device string or "
                        f"a tf.DeviceSpec, got {device!r}")
    return _support(kind, _device_type(text))


def available_impls(kind: str, device="cpu") -> Tuple[str, ...]:
    """The impls of ``kind`` that run here on ``device`` (see :func:`impl_support`)."""
    return tuple(impl for impl, reason in impl_support(kind, device).items() if reason is None)


def unavailable_impls(kind: str, x: tf.Tensor) -> Dict[str, str]:
    """impl -> reason for those that cannot take ``x`` here and now: the ``unavailable``
    argument of ``ops.impls.check_impl``."""
    eager = tf.executing_eagerly()
    device_type = _device_type(x.device) if eager and x.device else None
    return _unavailable(kind, device_type, eager)


def check_impl_runs(function: str, impl: str, kind: str, x: tf.Tensor) -> None:
    """ops.impls.check_impl for ``x`` here and now.

    An UnsupportedImplError (e.g. impl="kernel" inside tf.function) is raised afresh with
    TensorFlow's ``ag_pass_through`` marker (as TF's own UnliftableError has), so autograph,
    which converts the code a tf.function calls, passes it on as it is instead of turning an
    exception type it does not know into a StagingError.
    """
    try:
        check_impl(function, impl, _IMPLS[kind], unavailable_impls(kind, x))
    except UnsupportedImplError as error:
        unchanged = UnsupportedImplError(*error.args)
        unchanged.ag_pass_through = True
        raise unchanged from None


# ---- what TensorFlow's own conv does here ----------------------------------------------------------

def onednn_enabled() -> Optional[bool]:
    """Whether TensorFlow's oneDNN CPU ops are on in this process (TF_ENABLE_ONEDNN_OPTS, or
    TensorFlow's default for this CPU: on where it has AVX-512 VNNI/BF16 or AMX), None where
    this TensorFlow does not say."""
    try:  # TensorFlow's own query, private; where it moves, report "unknown"
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover
        return None


# TensorFlow's padding forms: "VALID", "SAME", or explicit per-side amounts.
PADDING_MODES = ("VALID", "SAME", "EXPLICIT")


@functools.lru_cache(maxsize=None)
def cpu_conv_nchw_reason(padding_mode: str = "VALID", dtype: str = "float32") -> Optional[str]:
    """None where TensorFlow's own CPU convolution trains in NCHW in this process with
    ``padding_mode`` (one of PADDING_MODES) and ``dtype`` (a float dtype name): forward, input
    and filter gradients run and equal the NHWC results; else why not (TensorFlow's error, or
    the mismatch).

    Probed once per process and case, because it depends on the machine, oneDNN, the padding
    form and the dtype: TensorFlow 2.17 with oneDNN off refuses NCHW in its forward; with
    oneDNN on (its default on CPUs with AVX-512 VNNI/BF16) float32 NCHW trains with "VALID" and
    "SAME" padding, but an explicitly padded NCHW conv's backward, and any float64 conv, fall
    back to the Eigen kernels, which refuse NCHW; another machine was seen running the forward
    and refusing the gradient.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"ops.tensorflow.cpu_conv_nchw_reason: padding_mode: expected one of "
                         f"{PADDING_MODES}, got {padding_mode!r}")
    try:
        tf_dtype = tf.as_dtype(dtype)
    except TypeError:
        tf_dtype = None
    if tf_dtype is None or not tf_dtype.is_floating:
        raise ValueError(f"ops.tensorflow.cpu_conv_nchw_reason: dtype: expected a float dtype "
                         f"name such as 'float32', got {dtype!r}")
    outcome: List = []

    def probe():
        try:
            outcome.append(_probe_nchw(padding_mode, tf_dtype))
        except BaseException as error:  # handed to the caller's thread below
            outcome.append(error)

    # In a thread of its own: eager whatever the caller is doing (tracing a tf.function, or
    # recording on a tape, which tf.init_scope would pause for the probe's own tape too).
    worker = threading.Thread(target=probe, name="deepprof-nchw-probe")
    worker.start()
    worker.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _probe_nchw(mode: str, dtype: tf.DType) -> Optional[str]:
    rng = np.random.default_rng(0)
    x_nchw = rng.standard_normal((2, 3, 6, 6))
    w_hwio = rng.standard_normal((3, 3, 3, 4))
    y_size = 2 if mode == "VALID" else 3
    g_nchw = rng.standard_normal((2, 4, y_size, y_size))

    def nhwc(a):
        return a.transpose(0, 2, 3, 1)

    def run(data_format: str):
        to_format = (lambda a: a) if data_format == "NCHW" else nhwc
        x, g = (tf.constant(to_format(a), dtype) for a in (x_nchw, g_nchw))
        w = tf.constant(w_hwio, dtype)
        spatial = [[1, 1], [1, 1]]  # at stride 2 on 6 pixels, what "SAME" pads too (0 and 1)
        explicit = ([[0, 0], [0, 0]] + spatial if data_format == "NCHW"
                    else [[0, 0]] + spatial + [[0, 0]])
        strides = [1, 1, 2, 2] if data_format == "NCHW" else [1, 2, 2, 1]
        with tf.GradientTape() as tape:
            tape.watch([x, w])
            y = tf.nn.conv2d(x, w, strides, explicit if mode == "EXPLICIT" else mode,
                             data_format=data_format)
        gx, gw = tape.gradient(y, [x, w], output_gradients=g)
        results = [a.numpy().astype(np.float64) for a in (y, gx, gw)]
        if data_format == "NCHW":
            results[0], results[1] = nhwc(results[0]), nhwc(results[1])
        return results

    with tf.device("/device:CPU:0"):
        try:
            got = run("NCHW")
        except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError,
                tf.errors.NotFoundError) as error:
            return _short_message(error)
        want = run("NHWC")
    # Sums of at most 3*3*3*2*3*3 terms of size ~1: 1e-4 relative to the largest is far above
    # float32 rounding and far below a wrong layout's differences (order 1); 2% for the
    # half-precision types.
    tolerance = 1e-4 if dtype.size >= 4 else 2e-2
    for name, a, b in zip(("output", "input gradient", "filter gradient"), got, want):
        if np.max(np.abs(a - b)) > tolerance * np.max(np.abs(b)):
            return f"NCHW conv ran but its {name} differs from NHWC's"
    return None


def _short_message(error: tf.errors.OpError) -> str:
    """TensorFlow's error text without its function-node prefix and op suffix."""
    text = error.message.strip().splitlines()[0]
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)


def cpu_conv_layout(padding_mode: str = "VALID", dtype: str = "float32") -> str:
    """The layout TensorFlow's own conv trains in on the CPU here with ``padding_mode`` (one
    of PADDING_MODES) and ``dtype``: "NCHW" where it does (:func:`cpu_conv_nchw_reason`), else
    "NHWC" (which trains everywhere)."""
    return "NCHW" if cpu_conv_nchw_reason(padding_mode, dtype) is None else "NHWC"


def conv_layout_note(dtype: str = "float32") -> str:
    """One sentence for reports: oneDNN on or off, and the padding forms with which
    TensorFlow's CPU conv trains in NCHW here in ``dtype`` (and why not with the others)."""
    onednn = {True: "on", False: "off", None: "unknown"}[onednn_enabled()]
    support = {mode: cpu_conv_nchw_reason(mode, dtype) for mode in PADDING_MODES}
    trains = [mode for mode, reason in support.items() if reason is None]
    refused = {mode: reason for mode, reason in support.items() if reason is not None}
    if not refused:
        layout = "trains in NCHW and NHWC"
    elif not trains:
        layout = f"trains in NHWC only (NCHW: {next(iter(refused.values()))})"
    else:
        layout = (f"trains in NCHW with {'/'.join(trains)} padding, in NHWC only with "
                  f"{'/'.join(refused)} padding (NCHW: {next(iter(refused.values()))})")
    return (f"TensorFlow {tf.__version__}, oneDNN ops {onednn} "
            f"(TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}): "
            f"its CPU conv in {dtype} {layout}.")


# ---- argument checks shared by every entry point -------------------------------------------------

def as_tensors(function: str, values: Dict[str, object]) -> Dict[str, Optional[tf.Tensor]]:
    """Every argument (None where optional and absent) as a dense tf.Tensor: tensors as they
    are, variables (tf.Variable, Keras variables) read, which the tape records, so gradients
    reach the variable. Anything else is a TypeError naming the argument."""
    tensors: Dict[str, Optional[tf.Tensor]] = {}
    for name, value in values.items():
        if value is None or isinstance(value, tf.Tensor):
            tensors[name] = value
        elif isinstance(value, tf.Variable) or (
                tf.is_tensor(value)  # a Keras variable, not a sparse or ragged tensor
                and not isinstance(value, tf.__internal__.CompositeTensor)):
            tensors[name] = tf.convert_to_tensor(value)
        else:
            raise TypeError(f"{function}: {name}: expected a tf.Tensor or a variable, "
                            f"got {type(value).__name__}")
    return tensors


def check_like_x(function: str, impl: str, tensors: Dict[str, Optional[tf.Tensor]]) -> None:
    """Every tensor on x's device (eager mode; a graph places ops itself) with x's dtype, a
    float one (float32/float64 for our kernels): the same rule for every impl."""
    x = tensors["x"]
    x_dtype = x.dtype
    x_device = x.device if tf.executing_eagerly() else None
    accepted = _KERNEL_DTYPES if impl in KERNEL_IMPLS else _FLOAT_DTYPES
    for name, value in tensors.items():
        if value is None:
            continue
        if x_device is not None and value.device != x_device:
            raise ValueError(f"{function}: {name}: is on {value.device} but x is on {x_device}")
        dtype = value.dtype
        if dtype is x_dtype and dtype in accepted:  # DTypes are interned: the common case, fast
            continue
        check_float(function, impl, name, dtype.name)
        if not dtype.is_floating:
            raise TypeError(f"{function}: {name}: expected a floating-point tensor, "
                            f"got {dtype.name}")
        raise TypeError(f"{function}: {name}: expected {x_dtype.name} like x, got {dtype.name}")


_KERNEL_DTYPES = frozenset([tf.float32, tf.float64])
_FLOAT_DTYPES = frozenset([tf.float16, tf.bfloat16, tf.float32, tf.float64])


def static_shape(tensor: tf.Tensor) -> Optional[Tuple[Optional[int], ...]]:
    """The static shape as a tuple (None for unknown sizes), or None for an unknown rank."""
    return None if tensor.shape.rank is None else tuple(tensor.shape.as_list())


# ---- our kernels on TensorFlow tensors (impl="kernel"; eager CPU tensors only) -------------------

def dlpack(tensor: Optional[tf.Tensor]):
    """A DLPack capsule viewing ``tensor`` (no copy) for ops.core, or None."""
    return None if tensor is None else tf.experimental.dlpack.to_dlpack(tensor)


def empty(shape, dtype: tf.DType) -> np.ndarray:
    """A fresh, 64-byte-aligned NumPy array for a kernel to write: outputs are ours until
    :func:`adopt` hands them to TensorFlow, never memory TensorFlow may share or cache."""
    dtype = np.dtype(dtype.as_numpy_dtype)
    shape = tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN_BYTES, np.uint8)
    start = -raw.ctypes.data % _ALIGN_BYTES
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def first_order_only(grads, inputs):
    """The kernel impl's gradients, guarded against a second derivative. They come from NumPy
    memory, not from ops, so TensorFlow would report a second derivative as None (no
    dependence); while a tape records, they are instead recorded as one op of ``inputs`` (the
    backward's own inputs) whose gradient raises LookupError, as the native ops' backward
    does. Without a recording tape (the usual first-order step), nothing is added."""
    if not _tape_is_recording():
        return grads

    @tf.custom_gradient
    def guarded(*inputs):
        def refuse(*_):
            raise LookupError(_SECOND_ORDER)
        return list(grads), refuse

    return guarded(*inputs)


_SECOND_ORDER = ("impl='kernel' is first-order only: its backward runs our kernels outside "
                 "TensorFlow's autodiff; use impl='explicit' or 'autograd' for higher "
                 "derivatives")


def adopt(array: np.ndarray) -> tf.Tensor:
    """The kernel's output as an eager tf.Tensor on the same memory (DLPack, no copy)."""
    return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
