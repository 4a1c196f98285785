"""One CPU thread count for every framework, BLAS, OpenMP and our kernels, and what each one
then reports.

A comparison between frameworks on a many-core machine otherwise measures each framework's
default thread policy (PyTorch's intra-op pool, TensorFlow's pools, MXNet's OpenMP, NumPy's
BLAS under Chainer, OpenMP's default for our kernels) instead of the frameworks. So the
profiler, the benchmarks and the experiments call :func:`set_cpu_threads` with one count before
the framework runs anything, and record :func:`thread_report` next to their results.

What "threads" sets (intra-op parallelism: the threads one operation may use):

==============  ==============================================================================
PyTorch         ``torch.set_num_threads``
TensorFlow      ``tf.config.threading.set_intra_op_parallelism_threads`` (only before its
                runtime starts: set it before the first TensorFlow operation)
MXNet           ``MXSetNumOMPThreads`` (its operators' OpenMP threads)
Chainer/NumPy   the BLAS NumPy loaded (threadpoolctl)
every process   OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS for libraries loaded
                later and for child processes (data-loader workers, ``--framework all``), the
                BLAS and OpenMP libraries already loaded (threadpoolctl), and our kernels
                (``ops.core.set_cpu_threads``, the op libraries loaded, and OPS_CPU_THREADS
                for those loaded later)
==============  ==============================================================================

Inter-op pools (independent operations run at the same time; eager execution runs one at a
time) are left at the frameworks' defaults and reported. This module imports a framework only
when asked about that framework.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
import warnings
from typing import Dict, List, Optional, Sequence

import threadpoolctl

from . import core
from .frameworks import FRAMEWORKS
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OPS_CPU_THREADS")


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads of one core count once): the CPUs
    in its affinity mask, grouped by the core topology Linux reports; the CPU count where the
    topology cannot be read."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in allowed:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, \
                    open(f"{topology}/core_id") as core_id:
                cores.add((package.read().strip(), core_id.read().strip()))
        except OSError:
            return len(allowed)
    return max(len(cores), 1)


def check_thread_count(function: str, threads) -> int:
    """``threads`` as an int >= 1, else a ValueError/TypeError naming ``function``."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"{function}: threads: expected a positive int, got "
                        f"{type(threads).__name__} {threads!r}")
    if threads < 1:
        raise ValueError(f"{function}: threads: expected a positive int, got {threads}")
    return threads


def set_cpu_threads(threads: int, frameworks: Optional[Sequence[str]] = None) -> List[str]:
    """Sets ``threads`` as the intra-op thread count of each of ``frameworks`` (names from
    FRAMEWORKS, imported if needed, skipped if not installed; default: those already
    imported), of every BLAS/OpenMP library loaded, of our kernels, and in the environment
    for what loads later. Call it before the frameworks run their first operation. Returns
    warnings (also issued as RuntimeWarning) for any setting a framework refused, e.g.
    TensorFlow's once its runtime has started."""
    function = "ops.threads.set_cpu_threads"
    threads = check_thread_count(function, threads)
    if frameworks is None:
        frameworks = [f for f in FRAMEWORKS if f in sys.modules]
    if isinstance(frameworks, str):
        raise TypeError(f"{function}: frameworks: expected a sequence of names, got the "
                        f"string {frameworks!r}")
    unknown = [f for f in frameworks if f not in FRAMEWORKS]
    if unknown:
        raise ValueError(f"{function}: frameworks: expected names from {FRAMEWORKS}, "
                         f"got {unknown}")
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    problems: List[str] = []
    for framework in frameworks:
        module = _import(framework)
        if module is None:
            continue
        problem = _SETTERS[framework](module, threads)
        if problem:
            problems.append(f"{framework}: {problem}")
    threadpoolctl.threadpool_limits(limits=threads)
    core.set_cpu_threads(threads)
    for library in _loaded_op_libraries().values():
        library.deepprof_set_cpu_threads(threads)
    for problem in problems:
        warnings.warn(problem, RuntimeWarning, stacklevel=2)
    return problems


def thread_report(framework: str, requested: Optional[int] = None) -> Dict[str, object]:
    """What ``framework`` (one of FRAMEWORKS) and the libraries under it report now:
    ``intra_op`` and ``inter_op`` (None where the framework has no such setting), ``blas`` and
    ``openmp`` (library file -> threads, from threadpoolctl), ``ours`` (our kernels: ops._C and
    each op library loaded -> threads), and, with
    ``requested``, that count and ``ignored``: which of them differ from it."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"ops.threads.thread_report: framework: expected one of "
                         f"{FRAMEWORKS}, got {framework!r}")
    module = _import(framework)
    intra, inter = _GETTERS[framework](module) if module is not None else (None, None)
    pools: Dict[str, Dict[str, int]] = {"blas": {}, "openmp": {}}
    for info in threadpoolctl.threadpool_info():
        kind = "openmp" if info["user_api"] == "openmp" else "blas"
        pools[kind][os.path.basename(info["filepath"])] = int(info["num_threads"])
    ours = {"ops._C": core.cpu_threads(),
            **{name: int(library.deepprof_cpu_threads())
               for name, library in _loaded_op_libraries().items()}}
    report: Dict[str, object] = {"intra_op": intra, "inter_op": inter, **pools, "ours": ours}
    if requested is not None:
        counts = {"intra_op": intra, **{f"ours:{k}": v for k, v in ours.items()},
                  **{f"blas:{k}": v for k, v in pools["blas"].items()},
                  **{f"openmp:{k}": v for k, v in pools["openmp"].items()}}
        report["requested"] = requested
        report["ignored"] = sorted(name for name, count in counts.items()
                                   if count is not None and count != requested)
    return report


def _loaded_op_libraries() -> Dict[str, ctypes.CDLL]:
    """Our framework op libraries (ops/libdeepprof_*.so) this process has loaded, by file name:
    each holds its own copy of the kernels' thread count (ops.core's reaches ops._C only).
    Libraries not loaded are left alone: loading one outside its framework would fail."""
    folder = os.path.dirname(os.path.abspath(__file__))
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.split()[-1] for line in maps if "libdeepprof_" in line}
    except OSError:  # pragma: no cover - not Linux
        return {}
    libraries = {}
    for path in sorted(mapped):
        if os.path.dirname(path) == folder:
            library = ctypes.CDLL(path)  # already loaded: the same handle, nothing runs
            library.deepprof_cpu_threads.restype = ctypes.c_int
            library.deepprof_set_cpu_threads.argtypes = [ctypes.c_int]
            libraries[os.path.basename(path)] = library
    return libraries


def _import(framework: str):
    if framework == "chainer":
        # Chainer runs on NumPy here; its BLAS is NumPy's (threadpoolctl), nothing to import.
        return sys.modules.get("numpy") or importlib.import_module("numpy")
    try:
        return importlib.import_module(framework)
    except ImportError:
        return None


def _set_torch(torch, threads: int) -> Optional[str]:
    torch.set_num_threads(threads)
    return None


def _set_tensorflow(tf, threads: int) -> Optional[str]:
    if tf.config.threading.get_intra_op_parallelism_threads() == threads:
        return None
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError as error:  # its runtime has started: the pools are fixed
        return (f"TensorFlow's intra-op threads stay "
                f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}: "
                f"{error}")
    return None


def _set_mxnet(mx, threads: int) -> Optional[str]:
    setter = getattr(mx.base._LIB, "MXSetNumOMPThreads", None)
    if setter is None:  # pragma: no cover - every MXNet 1.x has it
        return "this MXNet has no MXSetNumOMPThreads; OMP_NUM_THREADS applies from the next start"
    mx.base.check_call(setter(ctypes.c_int(threads)))
    return None


def _set_numpy(numpy, threads: int) -> Optional[str]:
    return None  # NumPy's BLAS is limited with every loaded library (threadpoolctl)


def _get_torch(torch):
    return torch.get_num_threads(), torch.get_num_interop_threads()


def _get_tensorflow(tf):
    # 0 means "TensorFlow's default": the number of cores it sees.
    intra = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    inter = tf.config.threading.get_inter_op_parallelism_threads() or os.cpu_count()
    return intra, inter


def _get_mxnet(mx):
    # MXNet's operators run on its OpenMP threads (reported under "openmp"); its engine's
    # worker threads are MXNET_CPU_WORKER_NTHREADS (default 1).
    return None, int(os.environ.get("MXNET_CPU_WORKER_NTHREADS", "1"))


def _get_numpy(numpy):
    return None, None


_SETTERS = {"torch": _set_torch, "tensorflow": _set_tensorflow, "mxnet": _set_mxnet,
            "chainer": _set_numpy}
_GETTERS = {"torch": _get_torch, "tensorflow": _get_tensorflow, "mxnet": _get_mxnet,
            "chainer": _get_numpy}
