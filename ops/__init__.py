"""Hand-written C++/CUDA kernels and the framework adapters built on them.

`ops.core` is the only way the rest of the project calls the kernels; `ops._C` is the compiled
module behind it. This package's top level only answers what this build and machine can do.
"""

from . import _C


def cuda_available() -> bool:
    """True when this build has the CUDA kernels and a CUDA device is usable.

    False, never an exception, on a machine without a driver or a GPU.
    """
    return bool(_C.cuda_built()) and _C.cuda_device_count() > 0


def build_info() -> dict:
    """How ops._C was built: CUDA kernels present, CUDA architectures, compiler, build type."""
    return dict(_C.build_info())


__all__ = ["cuda_available", "build_info"]
