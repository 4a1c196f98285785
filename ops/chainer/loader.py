"""The one place that imports Chainer; what it can run here; our kernels for its arrays.

Every module of ``ops.chainer`` (and its tests) gets Chainer from :func:`load_chainer`, never
from a bare ``import chainer``: Chainer 7.8.1 runs ``chainer._environment_check.check()`` on
import, a module that imports ``numpy.distutils`` and ``pkg_resources`` at its top only to
*warn* (about macOS Accelerate and optional-dependency versions). On this project's machines
that breaks:

- Python 3.11 + numpy 1.23.5: ``numpy.distutils`` needs ``distutils.msvccompiler``, missing
  from setuptools' distutils, so ``import chainer`` fails (unless SETUPTOOLS_USE_DISTUTILS=stdlib);
  worse, the attempt re-classes the root logger and resets its level (numpy.distutils.log
  patches setuptools' distutils log, which *is* the root logger), so even trying it is harmful.
- Python 3.12 + numpy 1.26 (the GPU machine): ``numpy.distutils`` and ``pkg_resources`` do not
  exist.

So :func:`load_chainer` never imports those two itself: unless both are already imported (then
Chainer's check runs as usual, at no cost), it puts a stand-in ``chainer._environment_check``
with a no-op ``check()`` into ``sys.modules`` before importing Chainer, and logs one INFO line
saying so. Nothing else of Chainer is touched.

:func:`load_gradient_check` does the same for ``chainer.gradient_check``, which imports
``chainer.testing``, whose helpers import ``pkg_resources`` at their top (used only by
Chainer's own test decorators, which we never call).

It also tells what this Chainer can run (:func:`impl_support`, as ``ops.torch.loader`` does for
PyTorch) and hands the Functions our kernels for an array (:func:`kernel_ops`: ``ops.numpy``, or
``ops.cupy``, imported only when a CuPy array comes).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import types
import warnings
from typing import Dict, Optional, Tuple

import numpy

from .. import cuda_available
from .. import numpy as ops_numpy
from ..impls import CONV_IMPLS, KERNEL_IMPLS, LOSS_IMPLS, check_float

_log = logging.getLogger(__name__)

_CHECK_MODULE = "chainer._environment_check"
# What chainer/_environment_check.py imports at its top, besides the stdlib and chainer.
_CHECK_IMPORTS = ("numpy.distutils.system_info", "pkg_resources")


def load_chainer() -> types.ModuleType:
    """Imports and returns the ``chainer`` module (idempotent).

    Unless Chainer's import-time environment check can run for free (its imports are already
    loaded), a no-op stand-in replaces it (it only warns) and one INFO line on the
    ``ops.chainer.loader`` logger says so.
    """
    if "chainer" not in sys.modules and _CHECK_MODULE not in sys.modules:
        missing = [name for name in _CHECK_IMPORTS if name not in sys.modules]
        if missing:
            stand_in = types.ModuleType(_CHECK_MODULE, "ops.chainer.loader's no-op stand-in for "
                                        "Chainer's import-time environment check")
            stand_in.check = lambda: None
            sys.modules[_CHECK_MODULE] = stand_in
            _log.info("chainer: import-time environment check replaced by a no-op (it only "
                      "warns; importing %s for it fails or reconfigures logging on this "
                      "project's toolchains)", ", ".join(missing))
    return importlib.import_module("chainer")


def load_gradient_check() -> types.ModuleType:
    """Imports and returns ``chainer.gradient_check`` (for tests). Where ``pkg_resources`` is
    not installed, a bare stand-in sits in ``sys.modules`` only while ``chainer.testing``
    imports, then is removed, so no other library mistakes it for the real one."""
    load_chainer()
    if "chainer.testing" in sys.modules or importlib.util.find_spec("pkg_resources"):
        return _import_quietly("chainer.gradient_check")
    sys.modules["pkg_resources"] = types.ModuleType(
        "pkg_resources", "ops.chainer.loader's empty stand-in, present only while "
        "chainer.testing imports")
    try:
        module = _import_quietly("chainer.gradient_check")
    finally:
        del sys.modules["pkg_resources"]
    _log.info("chainer.testing imported without pkg_resources (not installed); its "
              "with_requires/without_requires decorators will not work")
    return module


def _import_quietly(name: str) -> types.ModuleType:
    with warnings.catch_warnings():
        # chainer.testing's import-time noise, not ours: setuptools' "pkg_resources is
        # deprecated", and pytest's "Unknown pytest.mark.gpu" for the mark it makes.
        warnings.filterwarnings("ignore", "pkg_resources is deprecated")
        warnings.filterwarnings("ignore", r"Unknown pytest\.mark\.")
        return importlib.import_module(name)


def impl_support(kind: str, device="cpu") -> Dict[str, Optional[str]]:
    """Every impl of ``kind`` ("loss" or "conv") mapped to None when it runs here on ``device``,
    or to the reason it does not. ``device``: "cpu" or "@numpy" (NumPy arrays), "cuda",
    "cuda:N", "@cupy" or "@cupy:N" (CuPy arrays), or a ``chainer.backend.Device``."""
    if kind not in _IMPLS:
        raise ValueError(f"ops.chainer.impl_support: kind: expected 'loss' or 'conv', "
                         f"got {kind!r}")
    support: Dict[str, Optional[str]] = {impl: None for impl in _IMPLS[kind]}
    support.update(_cupy_unavailable(kind) if _is_cupy(device) else _other_unavailable(device))
    return support


def available_impls(kind: str, device="cpu") -> Tuple[str, ...]:
    """The impls of ``kind`` that run here on ``device`` (see :func:`impl_support`)."""
    return tuple(impl for impl, reason in impl_support(kind, device).items() if reason is None)


def unavailable_impls(kind: str, device) -> Dict[str, str]:
    """impl -> reason for those of ``kind`` that do not run on ``device`` (a Chainer Device,
    as ``chainer.backend.get_device_from_array`` gives): the ``unavailable`` argument of
    ``ops.impls.check_impl``. Cheap on the CPU path, cached on the GPU path."""
    if _is_cupy(device):
        return _cupy_unavailable(kind)
    return _other_unavailable(device)


def first_order_only(function_name: str) -> None:
    """Called at the top of our Functions' backward: Chainer enables backprop inside backward()
    only for double backprop, and our backward passes run on raw arrays, so a second-order
    graph would silently be cut; refuse it instead."""
    if load_chainer().config.enable_backprop:
        raise NotImplementedError(f"{function_name}: backward is first-order only (it runs on "
                                  "raw arrays); enable_double_backprop is not supported")


def kernel_ops(array) -> types.ModuleType:
    """``ops.numpy`` or ``ops.cupy`` (imported on first use): our kernels for ``array``, whose
    device :func:`unavailable_impls` has already accepted for a kernel impl."""
    if isinstance(array, numpy.ndarray):
        return ops_numpy
    return importlib.import_module("ops.cupy")


_IMPLS = {"loss": LOSS_IMPLS, "conv": CONV_IMPLS}
_CUPY_STRINGS = ("cuda", "@cupy")


def _is_cupy(device) -> bool:
    if isinstance(device, str):
        return device.split(":")[0] in _CUPY_STRINGS
    return type(device).__name__ == "GpuDevice"  # by name: no chainer.backend lookup per call


def _other_unavailable(device) -> Dict[str, str]:
    if isinstance(device, str):
        if device in ("cpu", "@numpy"):
            return {}
        raise ValueError(f"ops.chainer.impl_support: device: expected 'cpu', '@numpy', 'cuda', "
                         f"'cuda:N', '@cupy', '@cupy:N' or a chainer Device, got {device!r}")
    if type(device).__name__ == "CpuDevice":
        return {}
    reason = f"our kernels take NumPy or CuPy arrays, not those of {device}"
    return {impl: reason for impl in KERNEL_IMPLS}


@functools.lru_cache(maxsize=None)
def _cupy_unavailable(kind: str) -> Dict[str, str]:
    chainer = load_chainer()
    if not chainer.backends.cuda.available:
        reason = "Chainer has no CuPy/CUDA here (chainer.backends.cuda.available is False)"
        return {impl: reason for impl in _IMPLS[kind]}
    if not cuda_available():
        reason = "ops._C has no usable CUDA device (built without CUDA, or no driver/GPU here)"
    else:
        try:
            importlib.import_module("ops.cupy")
            return {}
        except ImportError as error:
            reason = f"ops.cupy cannot be imported: {error}"
    return {impl: reason for impl in KERNEL_IMPLS}


def check_types(function: str, values: Dict[str, object]) -> Dict[str, object]:
    """Every argument (None where optional and absent) is a chainer.Variable or a NumPy/CuPy
    array; returns name -> raw array for those present."""
    chainer = load_chainer()
    array_types = (chainer.Variable, *chainer.get_array_types())
    for name, value in values.items():
        if value is not None and not isinstance(value, array_types):
            raise TypeError(f"{function}: {name}: expected a chainer.Variable or a NumPy/CuPy "
                            f"array, got {type(value).__name__}")
    return {name: chainer.as_array(value) for name, value in values.items() if value is not None}


def check_like_x(function: str, impl: str, arrays: Dict[str, object]) -> None:
    """Every array on x's device with x's dtype, a float one (float32/float64 for our kernels):
    the same rule for every impl, so impls stay interchangeable."""
    backend = load_chainer().backend
    x = arrays["x"]
    device = backend.get_device_from_array(x)
    for name, array in arrays.items():
        where = backend.get_device_from_array(array)
        if where != device:
            raise ValueError(f"{function}: {name}: is on {where} but x is on {device}")
        check_float(function, impl, name, array.dtype.name)
        if array.dtype.kind != "f":
            raise TypeError(f"{function}: {name}: expected a floating-point array, "
                            f"got {array.dtype.name}")
        if array.dtype != x.dtype:
            raise TypeError(f"{function}: {name}: expected {x.dtype.name} like x, "
                            f"got {array.dtype.name}")
