"""Hand-written C++/CUDA kernels and the framework adapters built on them.

`ops.core` is the only way the rest of the project calls the kernels; `ops._C` is the compiled
module behind it. This package's top level only answers what this build and machine can do.

Importing it settles the CPU GEMM path (``OPS_CPU_GEMM``, see ``ops.core.gemm_path``) and checks
``OPS_CPU_THREADS`` (see ``ops.core.cpu_threads``): a value that is unknown or that this CPU
cannot run fails here, as a ValueError, rather than at some later kernel call.
"""

import os

from . import _C

_C.cpu_gemm_path()


def _check_cpu_threads_env() -> None:
    # The kernel libraries read OPS_CPU_THREADS themselves and fall back to OpenMP's count on
    # a value they cannot use; here such a value is an error instead of being ignored.
    text = os.environ.get("OPS_CPU_THREADS", "")
    if text and not (text.isdigit() and 1 <= int(text) <= 2 ** 31 - 1):
        raise ValueError(f"OPS_CPU_THREADS: expected a whole number of threads >= 1 (or "
                         f"unset), got {text!r}")


_check_cpu_threads_env()


def cuda_available() -> bool:
    """True when this build has the CUDA kernels and a CUDA device is usable.

    False, never an exception, on a machine without a driver or a GPU.
    """
    return bool(_C.cuda_built()) and _C.cuda_device_count() > 0


def build_info() -> dict:
    """How ops._C was built: CUDA kernels present, CUDA architectures, compiler, build type, and
    the CPU GEMM paths compiled in (``cpu_gemm_paths``; ``ops.core.cpu_info()`` says which one
    runs)."""
    return dict(_C.build_info())


__all__ = ["cuda_available", "build_info"]
