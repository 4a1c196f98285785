"""The implementation names every framework adapter offers, and the checks shared by all.

Every adapter (``ops.torch``, ``ops.chainer``, ...) exposes ``mse_loss``, ``deeppose_loss`` and
``conv2d`` with an ``impl`` argument:

loss (``LOSS_IMPLS``)
    ``autograd``  composed from the framework's own primitives, backward by its autodiff
    ``explicit``  the framework's Function class, backward hand-written with its array ops
    ``kernel``    the framework's Function class calling our C++/CUDA kernels (Python glue)
    ``native``    our kernels registered as the framework's own op (no Python in between);
                  in Chainer, which has no op registry below its Python FunctionNode, the
                  same Function as ``kernel``
conv (``CONV_IMPLS``)
    ``framework`` the framework's conv (oneDNN / cuDNN / im2col)
    ``kernel``    a Function class calling our kernels
    ``native``    our kernels as a framework op

This module knows no framework: it holds names, messages and the float-input check.
"""

from __future__ import annotations

from typing import Iterable, Mapping

LOSS_IMPLS = ("autograd", "explicit", "kernel", "native")
CONV_IMPLS = ("framework", "kernel", "native")
#: impls whose math runs in our kernels, which take float32 and float64 only
KERNEL_IMPLS = ("kernel", "native")


class UnsupportedImplError(RuntimeError):
    """An impl that exists but that this build or machine cannot run (e.g. no native library)."""


def check_impl(function: str, impl: str, known: Iterable[str],
               unavailable: Mapping[str, str]) -> None:
    """Raises ValueError for an unknown impl, UnsupportedImplError (with the reason) for one
    this build/machine lacks. ``unavailable`` maps impl -> reason."""
    known = tuple(known)
    if not isinstance(impl, str) or impl not in known:
        raise ValueError(f"{function}: impl: expected one of {', '.join(map(repr, known))}, "
                         f"got {impl!r}")
    if impl in unavailable:
        raise UnsupportedImplError(f"{function}: impl={impl!r} is not available here: "
                                   f"{unavailable[impl]}")


def check_float(function: str, impl: str, name: str, dtype_name: str) -> None:
    """Our kernels take float32/float64; say so at the adapter, not deep in a kernel."""
    if impl in KERNEL_IMPLS and dtype_name not in ("float32", "float64"):
        raise TypeError(f"{function}: {name}: impl={impl!r} runs our kernels, which take "
                        f"float32 or float64, got {dtype_name}")


def check_loss_shapes(function: str, x_shape, t_shape, v_shape=None) -> None:
    """t (and v) must have x's shape exactly: a framework would broadcast a mismatch silently."""
    x_shape = tuple(x_shape)
    for name, shape in (("t", t_shape), ("v", v_shape)):
        if shape is not None and tuple(shape) != x_shape:
            raise ValueError(f"{function}: {name}: expected shape {x_shape} (same as x), "
                             f"got {tuple(shape)}")
    if 0 in x_shape:
        raise ValueError(f"{function}: x: expected a non-empty array, got shape {x_shape}")
