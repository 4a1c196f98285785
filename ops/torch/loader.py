"""What this PyTorch can run: loads the deepprof:: operator library (impl="native") into
torch, once, tells which impls are usable on which device, and holds the argument checks every
torch entry point shares.

The library (``ops/libdeepprof_torch.so``) is built by setup.py against the torch that was
importable at build time; here it is loaded with ``torch.ops.load_library``. Where it was not
built, or was built against another torch and fails to load, impl="native" is unavailable and
:func:`native_unavailable_reason` says why.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .. import cuda_available
from ..impls import CONV_IMPLS, KERNEL_IMPLS, LOSS_IMPLS, UnsupportedImplError, check_float

LIBRARY = Path(__file__).resolve().parent.parent / "libdeepprof_torch.so"


@functools.lru_cache(maxsize=None)
def native_unavailable_reason() -> Optional[str]:
    """None when torch.ops.deepprof is loaded and usable, else why not (loads it on first call)."""
    if not LIBRARY.exists():
        return (f"{LIBRARY.name} was not built (torch was not importable when ops was built, "
                f"or OPS_TORCH=0); rebuild with `pip install --no-build-isolation -e .`")
    try:
        torch.ops.load_library(str(LIBRARY))
    except OSError as error:  # e.g. built against another torch: undefined symbols
        return f"{LIBRARY.name} does not load into torch {torch.__version__}: {error}"
    return None


def native_ops():
    """The ``torch.ops.deepprof`` namespace; UnsupportedImplError when the library is missing."""
    if torch.compiler.is_compiling():  # loaded by the eager run; see unavailable_impls
        return torch.ops.deepprof
    reason = native_unavailable_reason()
    if reason is not None:
        raise UnsupportedImplError(f"impl='native' is not available here: {reason}")
    return torch.ops.deepprof


def impl_support(kind: str, device="cpu") -> Dict[str, Optional[str]]:
    """Every impl of ``kind`` ("loss" or "conv") mapped to None when it runs here on ``device``
    (a torch.device or string), or to the reason it does not."""
    if kind not in ("loss", "conv"):
        raise ValueError(f"ops.torch.impl_support: kind: expected 'loss' or 'conv', got {kind!r}")
    device = torch.device(device)
    impls = LOSS_IMPLS if kind == "loss" else CONV_IMPLS
    support: Dict[str, Optional[str]] = {impl: None for impl in impls}
    if device.type not in ("cpu", "cuda"):
        for impl in KERNEL_IMPLS:
            support[impl] = f"our kernels run on CPU and CUDA tensors, not {device.type}"
    elif device.type == "cuda" and not cuda_available():
        for impl in KERNEL_IMPLS:
            support[impl] = ("ops._C has no usable CUDA device (built without CUDA, or no "
                             "driver/GPU here)")
    if support["native"] is None:
        support["native"] = native_unavailable_reason()
    return support


def unavailable_impls(kind: str, device) -> Dict[str, str]:
    """impl -> reason for those that do not run on ``device``; empty while torch.compile traces
    (availability was settled by the eager run, and asking the driver or the file system
    would break the graph)."""
    if torch.compiler.is_compiling():
        return {}
    return {impl: reason for impl, reason in impl_support(kind, device).items() if reason}


def available_impls(kind: str, device="cpu") -> Tuple[str, ...]:
    """The impls of ``kind`` that run here on ``device``."""
    return tuple(impl for impl, reason in impl_support(kind, device).items() if reason is None)


def cuda_stream(x: torch.Tensor) -> Optional[int]:
    """PyTorch's current stream on x's GPU, for our kernels; None for CPU tensors."""
    return torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None


def check_types(function: str, tensors: Dict[str, Optional[torch.Tensor]]) -> None:
    """Every argument (None where optional and absent) is a torch.Tensor."""
    for name, value in tensors.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{function}: {name}: expected a torch.Tensor, "
                            f"got {type(value).__name__}")


def check_like_x(function: str, impl: str, tensors: Dict[str, Optional[torch.Tensor]]) -> None:
    """Every tensor on x's device with x's dtype, a float one (float32/float64 for our kernels):
    the same rule for every impl, so impls stay interchangeable."""
    x = tensors["x"]
    for name, value in tensors.items():
        if value is None:
            continue
        if value.device != x.device:
            raise ValueError(f"{function}: {name}: is on {value.device} but x is on {x.device}")
        dtype = str(value.dtype).replace("torch.", "")
        check_float(function, impl, name, dtype)
        if not value.dtype.is_floating_point:
            raise TypeError(f"{function}: {name}: expected a floating-point tensor, got {dtype}")
        if value.dtype != x.dtype:
            raise TypeError(f"{function}: {name}: expected {x.dtype} like x, got {value.dtype}")
