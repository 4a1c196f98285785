"""Which native library a sampled frame belongs to, from its module path (and, for code that
frameworks link statically, its symbol).

Pure string rules; nothing here reads a capture.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

from profiler.nsys.reader import Frame

# The categories a layer's CPU time splits into, in the order tables show them.
LIBRARIES = ("onednn", "mkl", "openblas", "numpy", "ours", "framework", "python", "jit",
             "openmp", "system", "kernel", "other")

# Libraries that do no work of their own for a layer: a sample whose leaf is in one of them
# (memcpy in libc, an OpenMP barrier, a page fault) is charged to the first caller outside
# them, the library that asked for it.
_RUNTIME = frozenset({"openmp", "system", "kernel", "other"})

# Code generated at run time lives in anonymous executable memory, which nsys names "//anon"
# (or "[anon]"): oneDNN's xbyak kernels, XLA's. Such a sample is charged to the first caller
# that is not generated code (oneDNN's primitive that ran its kernel); nsys often cannot
# unwind out of generated code, and then the sample stays "jit" rather than guessed. In a
# CPU capture of PyTorch's ResNet-20 here, a fifth of all samples were generated code, three
# quarters of those without a caller.
_GENERATED = re.compile(r"^(//anon|\[anon[^\]]*\])$")
_RULES = (
    # Ours first: torch's own extension is also called "_C", ours lives in the ops package.
    ("ours", re.compile(r"(^|/)ops/_C[^/]*\.so|libdeepprof_|(^|/)_deepprof")),
    ("onednn", re.compile(r"dnnl|mkldnn|onednn", re.I)),
    ("mkl", re.compile(r"libmkl", re.I)),
    # Before numpy and the frameworks: their wheels bundle their own OpenMP runtime.
    ("openmp", re.compile(r"libgomp|libiomp|libomp")),
    ("openblas", re.compile(r"openblas", re.I)),
    ("numpy", re.compile(r"(^|/)numpy(\.libs)?/|_multiarray_umath|_umath_linalg")),
    ("framework", re.compile(r"libtorch|libc10|(^|/)torch/|libtensorflow|_pywrap_tensorflow|"
                             r"(^|/)tensorflow/|libmxnet|(^|/)mxnet/|(^|/)cupy|(^|/)chainer",
                             re.I)),
    ("python", re.compile(r"libpython|(^|/)python3?(\.\d+)?$")),
    ("system", re.compile(r"(^|/)(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libstdc\+\+|"
                          r"libgcc_s|libz)[.-]", re.I)),
    ("kernel", re.compile(r"^\[?(kernel|vmlinux|\[kernel\.kallsyms\])", re.I)),
)

# Code that frameworks link statically shows the framework's module but its own symbols.
_SYMBOL_RULES = (
    ("onednn", re.compile(r"^(dnnl|mkldnn|zendnn)[_:]|\b(dnnl|mkldnn)::|jit_avx|jit_sse|"
                          r"jit_uni")),
    ("mkl", re.compile(r"^mkl_|^MKL_")),
    ("openblas", re.compile(r"^(cblas_|sgemm_kernel|dgemm_kernel|sgemm_|dgemm_)")),
    ("python", re.compile(r"^(_?Py|PyEval|_PyEval)")),
)


@functools.lru_cache(maxsize=1 << 16)   # a capture repeats the same frames many times
def library_of(frame: Frame) -> str:
    """The library (one of LIBRARIES) a single frame belongs to."""
    for name, pattern in _SYMBOL_RULES:
        if pattern.search(frame.symbol) and name != "python":
            return name
    module = frame.module or ""
    if _GENERATED.match(module):
        return "jit"
    for name, pattern in _RULES:
        if pattern.search(module):
            return name
    if _SYMBOL_RULES[-1][1].search(frame.symbol):
        return "python"       # the interpreter statically linked into the python binary
    return "other"


def sample_library(frames: Sequence[Frame]) -> str:
    """The library a sample's time is charged to: its leaf's, unless the leaf is runtime code
    (libc, OpenMP, the kernel, unknown) or generated code, then the innermost caller's that
    is neither (generated code: the caller that ran it)."""
    if not frames:
        return "other"
    leaf = library_of(frames[0])
    if leaf not in _RUNTIME and leaf != "jit":
        return leaf
    skip = _RUNTIME | {"jit"}
    for frame in frames[1:]:
        lib = library_of(frame)
        if lib not in skip:
            return lib
    # Only runtime and generated frames: generated code called through the runtime (a JIT
    # kernel run by an OpenMP worker) is still the generated code's time.
    libs = [library_of(f) for f in frames]
    return "jit" if "jit" in libs else leaf


@functools.lru_cache(maxsize=1 << 16)
def frame_label(frame: Frame) -> str:
    """A frame as the flame graph shows it: the symbol, or the module's file name when the
    symbol is unresolved."""
    symbol = frame.symbol
    if not symbol or symbol.startswith("[") or symbol.startswith("0x"):
        base = (frame.module or "").rsplit("/", 1)[-1]
        return f"[{base or 'unknown'}]" if not symbol or symbol.startswith("[") else \
            f"{symbol} [{base}]"
    return symbol
