"""The seed workloads, the same in every framework: ResNet-20/32/44/56 on CIFAR-10 and
DeepPose's AlexNet on LSP, with their data pipelines, behind one interface (base.py).

Layout: ``spec.py`` (canonical weights, shared initial values, hyper-parameters), ``data.py``
(datasets, readers, the shared sample plan), ``base.py`` (the interface and its framework-free
half), then one package per framework with the same files: ``common.py`` (loader, device,
optimizer, weight mapping), ``resnet.py``, ``deeppose.py``. Nothing here knows about the
profiler.
"""

from __future__ import annotations

import importlib

from ops.frameworks import FRAMEWORKS, check_name

from .base import DEVICES, MODES, STEP_CALLS, WorkloadConfig, check_config
from .spec import MODELS


def build_workload(framework: str, config: WorkloadConfig = None, **fields):
    """The workload for ``framework`` (one of ops.frameworks.FRAMEWORKS) and
    ``config`` (default: WorkloadConfig(); keyword ``fields`` override it)."""
    check_name("build_workload", framework)
    config = (config or WorkloadConfig()).with_(**fields) if fields else (config
                                                                          or WorkloadConfig())
    check_config("build_workload", config)
    kind = "deeppose" if config.model == "deeppose" else "resnet"
    module = importlib.import_module(f"profiler.workloads.{framework}.{kind}")
    return module.Workload(config)


__all__ = ["build_workload", "WorkloadConfig", "FRAMEWORKS", "MODELS", "DEVICES", "MODES",
           "STEP_CALLS"]
