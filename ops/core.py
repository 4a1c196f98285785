"""The one door from Python to the hand-written kernels in ``ops._C``.

Every array argument is anything that exports DLPack (``__dlpack__``: NumPy, PyTorch, CuPy,
TensorFlow and MXNet arrays) or a DLPack capsule. Nothing here allocates: outputs are arrays the
caller made (of the right shape and dtype, C-contiguous, on the inputs' device), so each framework
adapter uses its own allocator. All arrays of one call share one dtype (float32 or float64) and
one device. GPU work is enqueued on ``stream`` (a ``cudaStream_t`` as an int; None or 0 is the
legacy default stream) and never synchronised with the host. An input may be read-only where
its producer exports versioned DLPack, which can say so (NumPy >= 2); NumPy 1 cannot export a
read-only array at all, and the error says to pass a writable one. Outputs must be writable.

Bad arguments raise one exception naming the function, the argument, what was expected and what
came: TypeError (not an array, wrong dtype), ValueError (shape, layout, device, parameter values,
aliasing), NotImplementedError (groups > 1), RuntimeError (GPU arrays without a usable GPU).
Output arguments are named ``*_out`` here and in the messages.

CPU kernel settings (process-wide, for ``ops._C``'s copy of the kernels): :func:`gemm_path`,
:func:`gemm_paths`, :func:`set_gemm_path` pick the GEMM compilation (environment variable
``OPS_CPU_GEMM``), :func:`cpu_threads` / :func:`set_cpu_threads` the thread count, and
:func:`cpu_info` reports both.

This module must stay thin: argument normalisation here, checks and math in ``ops._C``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

from . import _C

IntOrPair = Union[int, Sequence[int]]

#: loss = S / C: the masked mean; equals ``F.mse_loss(x, t)`` when there is no mask.
MSE_COUNT_FACTOR = 1.0
#: loss = S / (C / 2): the DeepPose normalisation (per visible joint, two coordinates each).
DEEPPOSE_COUNT_FACTOR = 0.5


# ---- masked squared-error loss ------------------------------------------------------------------

def sq_error_loss_forward(x, t, v, loss_out, count_out, *, count_factor: float,
                          stream: Optional[int] = None) -> None:
    """Masked squared-error loss, forward, in one pass.

    Computes S = sum(((x - t) * v)**2) and C = sum(v) (numel(x) when ``v`` is None) and writes
    ``loss_out = S / (C * count_factor)`` (0 when C == 0) and ``count_out = C``; both outputs are
    one-element arrays of x's dtype on x's device. Keep ``count_out`` for the backward pass.

    ``v`` is a visibility mask of x's shape and dtype (0/1; fractional weights also work) or
    None. ``count_factor`` is :data:`MSE_COUNT_FACTOR` or :data:`DEEPPOSE_COUNT_FACTOR`.
    """
    fn = "sq_error_loss_forward"
    _C.sq_error_loss_forward(x, t, v, loss_out, count_out, _count_factor(fn, count_factor),
                             _stream(fn, stream))


def sq_error_loss_backward(x, t, v, count, grad_loss, gx_out, gt_out=None, *,
                           count_factor: float, stream: Optional[int] = None) -> None:
    """Masked squared-error loss, backward.

    Writes ``gx_out = grad_loss * 2 * (x - t) * v**2 / (count * count_factor)`` (v**2 == v for a
    0/1 mask) and, when ``gt_out`` is given, ``gt_out = -gx_out``. ``count`` is the forward
    pass's ``count_out`` and ``grad_loss`` the upstream gradient, both one-element arrays on x's
    device (read there: nothing comes back to the host). count == 0 gives zero gradients.
    """
    fn = "sq_error_loss_backward"
    _C.sq_error_loss_backward(x, t, v, count, grad_loss, gx_out, gt_out,
                              _count_factor(fn, count_factor), _stream(fn, stream))


def sq_error_loss_fused(x, t, v, loss_out, count_out, gx_out, gt_out=None, *,
                        count_factor: float, grad_loss=None,
                        stream: Optional[int] = None) -> None:
    """Masked squared-error loss, forward and backward in one call (one kernel launch on a GPU).

    Writes what :func:`sq_error_loss_forward` and then :func:`sq_error_loss_backward` would:
    ``loss_out``, ``count_out``, ``gx_out`` and, when given, ``gt_out``. ``grad_loss`` is the
    upstream gradient as a one-element array on x's device, or None for 1 (a loss is the root
    of backward, so training passes None). For training steps, where the gradient is always
    wanted: it saves the second launch and the second read of the count. GPU speed not yet
    measured on a GPU (issue 13: ``make gpu-check``).
    """
    fn = "sq_error_loss_fused"
    _C.sq_error_loss_fused(x, t, v, loss_out, count_out, gx_out, gt_out, grad_loss,
                           _count_factor(fn, count_factor), _stream(fn, stream))


# ---- conv2d -------------------------------------------------------------------------------------

def conv2d_output_shape(x_shape: Sequence[int], w_shape: Sequence[int], *,
                        stride: IntOrPair = 1, padding: IntOrPair = 0,
                        dilation: IntOrPair = 1, groups: int = 1) -> Tuple[int, int, int, int]:
    """(B, Cout, OH, OW) of ``conv2d_forward`` for an NCHW input and a (Cout, Cin, kh, kw) weight.

    Raises the same errors the kernels would for shapes that cannot be convolved, so adapters
    can call it before allocating the output.
    """
    return conv2d_geometry("conv2d_output_shape", x_shape, w_shape, stride=stride,
                           padding=padding, dilation=dilation, groups=groups,
                           names=("x_shape", "w_shape")).output_shape


class Conv2dGeometry(NamedTuple):
    """A checked conv: the output shape and the parameters as (height, width) pairs."""
    output_shape: Tuple[int, int, int, int]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]


def conv2d_geometry(function: str, x_shape: Sequence[int], w_shape: Sequence[int], *,
                    stride: IntOrPair = 1, padding: IntOrPair = 0, dilation: IntOrPair = 1,
                    groups: int = 1, bias_shape: Optional[Sequence[int]] = None,
                    names: Tuple[str, str] = ("x", "w")) -> Conv2dGeometry:
    """Every shape and parameter check of a conv2d call, with errors naming ``function`` and
    the arguments ``names`` (and "b" for ``bias_shape``): what framework adapters call at their
    boundary, so bad input is refused there in the same words everywhere."""
    stride, padding, dilation = _conv_params(function, stride, padding, dilation, groups)
    x_name, w_name = names
    x_shape, w_shape = _shape(function, x_name, x_shape), _shape(function, w_name, w_shape)
    if w_shape[1] != x_shape[1]:
        raise ValueError(f"{function}: {w_name}: expected (Cout, {x_shape[1]}, kh, kw) to match "
                         f"the {x_shape[1]} input channels of {x_name}, got {w_shape}")
    if bias_shape is not None and tuple(bias_shape) != (w_shape[0],):
        raise ValueError(f"{function}: b: expected shape ({w_shape[0]},) to match the "
                         f"{w_shape[0]} output channels of {w_name}, got {tuple(bias_shape)}")
    out = []
    for axis, i in (("height", 2), ("width", 3)):
        extent = dilation[i - 2] * (w_shape[i] - 1) + 1
        padded = x_shape[i] + 2 * padding[i - 2]
        if extent > padded:
            raise ValueError(f"{function}: {w_name}: kernel {axis} extent {extent} (size "
                             f"{w_shape[i]}, dilation {dilation[i - 2]}) is larger than the "
                             f"padded input {axis} {padded} ({x_shape[i]} + 2*{padding[i - 2]})")
        out.append((padded - extent) // stride[i - 2] + 1)
    return Conv2dGeometry((x_shape[0], w_shape[0], out[0], out[1]), stride, padding, dilation)


def conv2d_forward(x, w, b, y_out, *, stride: IntOrPair = 1, padding: IntOrPair = 0,
                   dilation: IntOrPair = 1, groups: int = 1,
                   stream: Optional[int] = None) -> None:
    """y_out = conv2d(x, w) + b: x (B, Cin, H, W), w (Cout, Cin, kh, kw), b (Cout,) or None,
    y_out of :func:`conv2d_output_shape`. Cross-correlation, as in every DL framework."""
    s, p, d = _conv_params("conv2d_forward", stride, padding, dilation, groups)
    _C.conv2d_forward(x, w, b, y_out, s, p, d, _stream("conv2d_forward", stream))


def conv2d_backward_data(gy, w, gx_out, *, stride: IntOrPair = 1, padding: IntOrPair = 0,
                         dilation: IntOrPair = 1, groups: int = 1,
                         stream: Optional[int] = None) -> None:
    """gx_out = dL/dx from gy = dL/dy. gx_out has x's shape, which fixes the geometry (several
    input sizes can give one output size when stride > 1)."""
    s, p, d = _conv_params("conv2d_backward_data", stride, padding, dilation, groups)
    _C.conv2d_backward_data(gy, w, gx_out, s, p, d, _stream("conv2d_backward_data", stream))


def conv2d_backward_weight(x, gy, gw_out, *, stride: IntOrPair = 1, padding: IntOrPair = 0,
                           dilation: IntOrPair = 1, groups: int = 1,
                           stream: Optional[int] = None) -> None:
    """gw_out = dL/dw (Cout, Cin, kh, kw), summed over the batch; overwrites gw_out."""
    s, p, d = _conv_params("conv2d_backward_weight", stride, padding, dilation, groups)
    _C.conv2d_backward_weight(x, gy, gw_out, s, p, d,
                              _stream("conv2d_backward_weight", stream))


def conv2d_backward_bias(gy, gb_out, *, stream: Optional[int] = None) -> None:
    """gb_out = dL/db (Cout,): gy summed over batch and pixels; overwrites gb_out."""
    _C.conv2d_backward_bias(gy, gb_out, _stream("conv2d_backward_bias", stream))


# ---- CPU kernel settings ------------------------------------------------------------------------

#: Every GEMM path name there is, best first; :func:`gemm_paths` says which of them this CPU runs.
GEMM_PATHS = ("avx512", "avx2", "baseline")


def gemm_path() -> str:
    """The GEMM path our CPU conv kernels run: "avx512" (AVX-512F), "avx2" (AVX2 + FMA) or
    "baseline" (plain x86-64).

    Chosen once, at the first use of the kernels (``import ops`` does that), from the
    environment variable ``OPS_CPU_GEMM``: "auto" (or unset) picks the best path this CPU runs,
    "avx512", "avx2" or "baseline" forces one. An unknown value, or a path this CPU cannot run
    ("avx512" without AVX-512F, "avx2" without AVX2/FMA), is a ValueError naming OPS_CPU_GEMM
    (raised by ``import ops``). Every front end reads the same variable: ``ops._C`` and the
    torch / TensorFlow / MXNet operator libraries.
    """
    return _C.cpu_gemm_path()


def gemm_paths() -> Tuple[str, ...]:
    """The GEMM paths this CPU (and this build) can run, best first: ("avx512", "avx2",
    "baseline") on an x86-64 CPU with AVX-512F, ("avx2", "baseline") with AVX2 and FMA only,
    ("baseline",) elsewhere."""
    return tuple(_C.cpu_gemm_paths())


def set_gemm_path(name: str) -> None:
    """Run GEMM path ``name`` (one of :func:`gemm_paths`) from now on, for tests and benchmarks.

    Affects ``ops._C``'s copy of the kernels only (``ops.core``, ``ops.numpy``, the adapters'
    "kernel" impls); the framework operator libraries (the "native" impls) link their own copy
    and keep the path OPS_CPU_GEMM chose for them. ValueError for a path this CPU cannot run.
    """
    if not isinstance(name, str):
        raise TypeError(f"set_gemm_path: name: expected a str, one of {gemm_paths()}, "
                        f"got {name!r}")
    _C.set_cpu_gemm_path(name)


def cpu_threads() -> int:
    """The number of threads each parallel region of our CPU kernels (conv and loss) uses.

    One process-wide count (not OpenMP's per-thread setting), so it also holds for kernels a
    framework calls from its own threads. Default: ``OPS_CPU_THREADS`` where set (read by every
    copy of the kernels at its first use, so also by op libraries loaded later:
    ``ops.threads.set_cpu_threads`` sets it), else OpenMP's thread count at the first use, which
    honours OMP_NUM_THREADS (an earlier ``import torch`` resets that count to at most the
    cores). Like :func:`set_gemm_path`, it is ``ops._C``'s copy only: the framework operator
    libraries have their own, with the same default (their ``deepprof_set_cpu_threads``, through
    ctypes, sets it).
    """
    return _C.cpu_threads()


def set_cpu_threads(n: int) -> None:
    """Use ``n`` >= 1 threads in our CPU kernels from now on, whichever thread calls them.

    Results are correct for any count, more than the cores included (backward-weight sums its
    per-thread partials in thread order, so its float rounding depends on the count).
    """
    if not _is_int(n):
        raise TypeError(f"set_cpu_threads: n: expected an int >= 1, got {n!r}")
    if not 1 <= n <= _INT32_MAX:
        raise ValueError(f"set_cpu_threads: n: expected an int in [1, 2**31 - 1], got {n}")
    _C.set_cpu_threads(int(n))


def cpu_info() -> dict:
    """This process's CPU kernel settings for ``ops._C``: ``gemm_path`` (in use), ``gemm_paths``
    (what this CPU runs, best first) and ``threads``. (``ops.build_info()["cpu_gemm_paths"]``
    lists the paths compiled in.)"""
    return {"gemm_path": gemm_path(), "gemm_paths": gemm_paths(), "threads": cpu_threads()}


# ---- argument normalisation: each names the public function it serves ---------------------------

_INT32_MAX = 2 ** 31 - 1  # conv parameters stay in 32 bits (the GPU indexes in 32 bits)
_STREAM_LIMIT = 2 ** 63  # a cudaStream_t travels as a signed 64-bit int


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _pair(fn: str, name: str, value: IntOrPair, low: int) -> Tuple[int, int]:
    if _is_int(value):
        pair = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_int, value)):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{fn}: {name}: expected an int or a pair of ints (height, width), "
                        f"got {value!r}")
    if not all(low <= v <= _INT32_MAX for v in pair):
        raise ValueError(f"{fn}: {name}: expected values in [{low}, 2**31 - 1], got {pair}")
    return pair


def _conv_params(fn: str, stride, padding, dilation, groups):
    if not _is_int(groups):
        raise TypeError(f"{fn}: groups: expected an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"{fn}: groups: expected an int >= 1, got {groups}")
    if groups != 1:
        raise NotImplementedError(f"{fn}: groups: only groups=1 is implemented, got {groups}")
    return (_pair(fn, "stride", stride, 1), _pair(fn, "padding", padding, 0),
            _pair(fn, "dilation", dilation, 1))


def _shape(fn: str, name: str, shape) -> Tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not all(map(_is_int, shape)):
        raise TypeError(f"{fn}: {name}: expected a shape (a tuple or list of ints), "
                        f"got {shape!r}")
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{fn}: {name}: expected 4 positive sizes, got {tuple(shape)}")
    return tuple(int(v) for v in shape)


def _stream(fn: str, stream: Optional[int]) -> Optional[int]:
    if stream is None:
        return None
    if not _is_int(stream):
        raise TypeError(f"{fn}: stream: expected None or a cudaStream_t handle as an int, "
                        f"got {stream!r}")
    if not 0 <= stream < _STREAM_LIMIT:
        raise ValueError(f"{fn}: stream: expected None or a cudaStream_t handle as an int in "
                         f"[0, 2**63), got {stream!r}")
    return int(stream)


def _count_factor(fn: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{fn}: count_factor: expected a number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: count_factor: expected a finite number > 0, got {value!r}")
    return float(value)
