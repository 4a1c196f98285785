"""The frameworks this project supports, defined once: their names, how each is imported, the
import-order rule between them, and the probes every layer above asks (version, GPU, device
name). Every list of frameworks in the project comes from :data:`FRAMEWORKS`; a fifth
framework starts with an entry here (docs/adding-a-framework.md lists the rest).

Nothing here imports a framework until a probe asks about that framework, and nothing here
knows the profiler.
"""

from __future__ import annotations

import importlib
import platform
from dataclasses import dataclass
from types import ModuleType
from typing import Dict, Tuple


@dataclass(frozen=True)
class Framework:
    """One supported framework.

    name: the project's key for it (``--framework``, ``ops.<name>``, ``profiler.workloads.
    <name>``, ``profiler.instrument.<name>``). package: the Python package it is. title: how
    people write it. cuda_here: whether its GPU path can run on this project's GPU machine
    (TensorFlow's and MXNet's CUDA builds cannot reach it: shared/ENVIRONMENT.md).
    import_before: frameworks that must not be imported before this one in a process.
    """
    name: str
    package: str
    title: str
    cuda_here: bool
    import_before: Tuple[str, ...] = ()


_REGISTRY: Dict[str, Framework] = {f.name: f for f in (
    Framework("torch", "torch", "PyTorch", cuda_here=True),
    Framework("chainer", "chainer", "Chainer", cuda_here=True),
    Framework("tensorflow", "tensorflow", "TensorFlow", cuda_here=False),
    # MXNet 1.9.1 imported after TensorFlow crashes the interpreter (defect 8 in
    # ops/mxnet/loader.py, which refuses that order with an ImportError).
    Framework("mxnet", "mxnet", "MXNet", cuda_here=False, import_before=("tensorflow",)),
)}

#: Every supported framework, in the order reports and tables list them.
FRAMEWORKS: Tuple[str, ...] = tuple(_REGISTRY)
#: Those whose GPU path runs on this project's GPU machine.
CUDA_FRAMEWORKS: Tuple[str, ...] = tuple(n for n, f in _REGISTRY.items() if f.cuda_here)


def get(name: str, function: str = "ops.frameworks.get") -> Framework:
    """The registry entry of ``name``; a ValueError naming ``function`` for any other value."""
    check_name(function, name)
    return _REGISTRY[name]


def check_name(function: str, name, argument: str = "framework") -> str:
    """``name`` if it is a supported framework, else a ValueError naming ``function``,
    ``argument``, the supported names and what came."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"{function}: {argument}: expected one of {list(FRAMEWORKS)}, got "
                         f"{name!r}")
    return name


def import_order(names) -> Tuple[str, ...]:
    """``names`` reordered so every framework comes before those it must precede (MXNet
    before TensorFlow), otherwise in registry order: the order to import them in one
    process (the test suite collects its files in this order too)."""
    wanted = [check_name("ops.frameworks.import_order", n) for n in names]
    first = [n for n in wanted if any(other in _REGISTRY[n].import_before for other in wanted)]
    return tuple(first + [n for n in FRAMEWORKS if n in wanted and n not in first])


def load(name: str) -> ModuleType:
    """Imports and returns the framework's package. Chainer comes through
    ``ops.chainer.loader.load_chainer`` (past its import-time environment check); MXNet
    through ``ops.mxnet.loader``, which refuses to follow TensorFlow with a clear ImportError
    instead of a crashed interpreter."""
    get(name, "ops.frameworks.load")
    if name == "chainer":
        from ops.chainer.loader import load_chainer
        return load_chainer()
    if name == "mxnet":
        importlib.import_module("ops.mxnet.loader")
    return importlib.import_module(_REGISTRY[name].package)


def version(name: str) -> str:
    """The framework's own version string (imports it)."""
    return str(load(name).__version__)


def version_or_unknown(name: str) -> str:
    """version(name), or "unknown (<the error's type>)" where the framework does not import
    (a report of a failed run still says what it could)."""
    try:
        return version(name)
    except Exception as e:
        return f"unknown ({type(e).__name__})"


def sees_gpu(name: str) -> bool:
    """Whether the framework sees a usable GPU here; False, never an error, where a probe
    fails (no driver, a CPU-only build)."""
    try:
        module = load(name)
        if name == "torch":
            return bool(module.cuda.is_available())
        if name == "chainer":
            return bool(module.backends.cuda.available)
        if name == "tensorflow":
            return bool(module.config.list_physical_devices("GPU"))
        if name == "mxnet":
            return module.context.num_gpus() > 0
    except Exception:          # a probe that fails means no usable GPU
        return False
    raise AssertionError(f"ops.frameworks.sees_gpu: no GPU probe for {name!r}")


def resolve_device(name: str, device: str) -> str:
    """``device`` as "cpu" or "cuda": "auto" is "cuda" where the framework sees a GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"ops.frameworks.resolve_device: device: expected 'auto', 'cpu' or "
                         f"'cuda', got {device!r}")
    if device != "auto":
        return device
    return "cuda" if sees_gpu(name) else "cpu"


def cpu_name() -> str:
    """This machine's processor as the platform names it (the machine type where it says
    nothing)."""
    return platform.processor() or platform.machine()


__all__ = ["Framework", "FRAMEWORKS", "CUDA_FRAMEWORKS", "get", "check_name", "import_order",
           "load", "version", "version_or_unknown", "sees_gpu", "resolve_device", "cpu_name"]
