"""The one workload interface every (model, framework) pair offers, and the framework-free half
of it (configuration checks, data, seeding, the step's composition).

A workload is built by :func:`profiler.workloads.build_workload`. Its methods, in the order a
training step calls them (the profiler times each):

| method | does |
| --- | --- |
| ``make_loader(split, epochs=1)`` | the framework's loader over the shared sample plan: host |
| | batches (tuples of the framework's arrays) |
| ``to_device(batch)`` | host batch -> device batch (no-op on the CPU) |
| ``forward(batch)`` | the network's output (training mode) |
| ``loss_forward(output, batch)`` | the scalar loss |
| ``backward(loss)`` | fresh gradients of every parameter (old ones cleared first) |
| ``optimizer_step()`` | SGD with momentum and weight decay (spec.WEIGHT_DECAY_RULE) |
| ``train_step(batch)`` | the five above; returns the loss as a float |

and besides: ``predict(images)`` (eval mode, NCHW float32 NumPy in, NumPy out),
``export_weights()`` / ``import_weights(weights)`` (canonical names and layout, spec.py),
``parameter_count()``, ``named_layers()`` (canonical name -> the framework's layer object for
every layer with parameters, forward order), ``set_impls(conv=..., loss=...)``,
``set_learning_rate(lr)``, ``synchronize()`` (wait until queued device or engine work is done:
MXNet and TensorFlow return before their work has run), ``batch_to_numpy(batch)`` (a loader's
batch as NumPy arrays in the canonical layout, images NCHW: what the tests compare) and
``bn_running_var_unbiased`` (whether batch norm's running variance takes the unbiased batch
variance, as PyTorch's and Chainer's do, or the biased one).

Modes (``config.mode``, :data:`MODES`): "eager" runs the step op by op, as the framework runs
Python; "graph" is the framework's compiled mode, as its users train:

- TensorFlow: the whole step (forward, loss, gradients, weight decay, the optimizer's update)
  in one ``tf.function``; ``config.xla`` adds ``jit_compile=True``. A step is one call.
- MXNet: the network hybridized (``static_alloc``, ``static_shape``); the loss, the backward
  call and the Trainer as in eager.
- PyTorch: the network through ``torch.compile`` (Inductor); the loss, the backward call and
  the optimizer eager.
- Chainer: none; graph mode is refused with the reason.

``step_calls`` names the calls a step is made of in this mode (:data:`STEP_CALLS` in eager:
forward, loss_forward, backward, optimizer_step; ``("train_step",)`` where the compiled step is
one call), ``compile_count()`` how many graphs the framework has traced or compiled so far (a
step that raises it compiled; one that raises it after the warm-up retraced). The same
workload in both modes is the same model: same weights, batches and update
(tests/test_workloads.py runs the identical-workload tests in both). Our ``kernel`` impls
(Python glue between the framework and our kernels) cannot run inside a compiled graph and are
refused in graph mode; ``native`` ops are the framework's own ops and run there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple

import numpy as np

from ops import frameworks
from ops.impls import CONV_IMPLS, LOSS_IMPLS, check_impl

from . import data, spec

DEVICES = ("cpu", "cuda")
MODES = ("eager", "graph")
# A step's separate calls in eager mode (and in graph mode where the network alone is compiled).
STEP_CALLS = ("forward", "loss_forward", "backward", "optimizer_step")


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that defines a workload run; the same config means the same run in every
    framework."""
    model: str = "resnet20"
    device: str = "cpu"
    batch_size: int = 32
    seed: int = 0
    conv_impl: str = "framework"
    # deeppose_loss's impl; ResNet's softmax cross-entropy is always the framework's own.
    loss_impl: str = "autograd"
    workers: int = 0
    data: str = "synthetic"
    mode: str = "eager"            # MODES: the framework's eager or compiled (graph) mode
    xla: bool = False              # TensorFlow's graph mode only: tf.function(jit_compile=True)
    augment: bool = True           # CIFAR: pad 4 + random crop + flip (no effect on pose data)
    standardize: bool = False      # per-channel mean/std of the training set
    dropout: float = spec.DROPOUT  # DeepPose fc6/fc7
    train_size: Optional[int] = None   # synthetic data sizes; None: the real dataset's
    test_size: Optional[int] = None
    extra: Dict[str, object] = field(default_factory=dict, compare=False)

    def with_(self, **changes) -> "WorkloadConfig":
        return replace(self, **changes)


def check_config(function: str, config: WorkloadConfig) -> None:
    """Every field checked at the boundary, one error naming it."""
    if not isinstance(config, WorkloadConfig):
        raise TypeError(f"{function}: config: expected a WorkloadConfig, got "
                        f"{type(config).__name__}")
    checks = (
        ("model", config.model in spec.MODELS, f"one of {list(spec.MODELS)}"),
        ("device", config.device in DEVICES, f"one of {list(DEVICES)}"),
        ("conv_impl", config.conv_impl in CONV_IMPLS, f"one of {list(CONV_IMPLS)}"),
        ("loss_impl", config.loss_impl in LOSS_IMPLS, f"one of {list(LOSS_IMPLS)}"),
        ("mode", config.mode in MODES, f"one of {list(MODES)}"),
        ("xla", isinstance(config.xla, bool), "True or False"),
        ("batch_size", _positive_int(config.batch_size), "a positive int"),
        ("workers", isinstance(config.workers, int) and not isinstance(config.workers, bool)
         and config.workers >= 0, "an int >= 0"),
        ("seed", isinstance(config.seed, int) and not isinstance(config.seed, bool)
         and config.seed >= 0, "an int >= 0"),
        ("dropout", isinstance(config.dropout, (int, float)) and 0 <= config.dropout < 1,
         "a float in [0, 1)"),
        ("train_size", config.train_size is None or _positive_int(config.train_size),
         "None or a positive int"),
        ("test_size", config.test_size is None or _positive_int(config.test_size),
         "None or a positive int"),
    )
    for name, ok, expected in checks:
        if not ok:
            raise ValueError(f"{function}: {name}: expected {expected}, got "
                             f"{getattr(config, name)!r}")
    if config.xla and config.mode != "graph":
        raise ValueError(f"{function}: xla: XLA compiles TensorFlow's graph-mode step; "
                         f"expected mode 'graph' with xla=True, got mode {config.mode!r}")
    if config.model != "deeppose" and config.loss_impl != "autograd":
        raise ValueError(f"{function}: loss_impl: {config.model} trains with the framework's "
                         f"softmax cross-entropy; loss impls apply to deeppose only, got "
                         f"{config.loss_impl!r}")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def seed_python_and_numpy(seed: int) -> None:
    """The framework-free half of ``--seed`` (each framework base seeds its own RNGs too)."""
    random.seed(seed)
    np.random.seed(seed)


_DATASETS: Dict[tuple, Tuple[object, object]] = {}


def dataset_for(config: WorkloadConfig):
    """(train, test) for the config's model and data, cached in this process (synthetic CIFAR
    takes about a second to generate)."""
    kind = "pose" if config.model == "deeppose" else "classification"
    key = (kind, str(config.data), config.seed, config.train_size, config.test_size)
    if key not in _DATASETS:
        _DATASETS[key] = data.load_dataset(kind, config.data, seed=config.seed,
                                           train_size=config.train_size,
                                           test_size=config.test_size)
    return _DATASETS[key]


class WorkloadBase:
    """What every workload shares; the framework bases (``<framework>_base.py``) add the
    framework's loader, device handling, optimizer and weight mapping, the model files the
    network and its loss."""

    framework = ""

    # What this framework's workloads do in graph mode: None if they have one, else why not;
    # and whether they take config.xla.
    no_graph_mode: Optional[str] = None
    takes_xla = False

    def __init__(self, config: WorkloadConfig):
        function = type(self).__name__
        check_config(function, config)
        if config.mode == "graph" and self.no_graph_mode:
            raise ValueError(f"{function}: mode: 'graph' is not available for "
                             f"{self.framework}: {self.no_graph_mode}")
        if config.xla and not self.takes_xla:
            raise ValueError(f"{function}: xla: XLA compiles TensorFlow's step only, got "
                             f"xla=True for {self.framework}")
        self.config = config
        self.model_name = config.model
        self.is_pose = config.model == "deeppose"
        seed_python_and_numpy(config.seed)
        self.train_data, self.test_data = dataset_for(config)
        self.mean = self.std = None
        if config.standardize:
            if self.is_pose:
                raise ValueError(f"{type(self).__name__}: standardize: supported for the "
                                 f"CIFAR models only")
            self.mean, self.std = data.channel_stats(self.train_data.images)

    def sample_stream(self, split: str = "train", *, epochs: int = 1,
                      shuffle: Optional[bool] = None) -> data.SampleStream:
        """The shared plan over ``split``: shuffled and (CIFAR, if configured) augmented for
        training, in order and plain for test."""
        if split not in data.SPLITS:
            raise ValueError(f"{type(self).__name__}.sample_stream: split: expected one of "
                             f"{list(data.SPLITS)}, got {split!r}")
        dataset = self.train_data if split == "train" else self.test_data
        train = split == "train"
        plan = data.make_plan(len(dataset), self.config.batch_size, seed=self.config.seed,
                              epochs=epochs, shuffle=train if shuffle is None else shuffle,
                              augment=train and self.config.augment and not self.is_pose)
        return data.SampleStream(dataset, plan, self.mean, self.std)

    def parameter_count(self) -> int:
        return sum(int(np.prod(v.shape)) for n, v in self.export_weights().items()
                   if not spec.is_statistic(n))

    def train_step(self, batch) -> float:
        output = self.forward(batch)
        loss = self.loss_forward(output, batch)
        self.backward(loss)
        self.optimizer_step()
        return self.loss_value(loss)

    def set_impls(self, *, conv=None, loss=None) -> None:
        """Swaps every convolution to ``conv`` and the DeepPose loss to ``loss`` (None: keep);
        an impl that cannot run here (on this device, in this mode) is refused before anything
        changes."""
        function = f"{type(self).__name__}.set_impls"
        if conv is not None:
            check_impl(function, conv, CONV_IMPLS, self.refused_impls("conv"))
        if loss is not None:
            if not self.is_pose and loss != "autograd":
                raise ValueError(f"{function}: loss: {self.model_name} trains with the "
                                 f"framework's softmax cross-entropy; loss impls apply to "
                                 f"deeppose only, got {loss!r}")
            check_impl(function, loss, LOSS_IMPLS, self.refused_impls("loss"))
        if conv is not None:
            for layer in self.conv_layers():
                layer.impl = conv
            self.conv_impl = conv
            self.impls_changed()
        if loss is not None:
            self.loss_impl = loss

    def refused_impls(self, kind: str) -> Dict[str, str]:
        """impl -> why not, for the ``kind`` impls that cannot run here: on this device
        (unavailable_impls) and in this mode (the kernel impls in graph mode)."""
        refused = dict(self.unavailable_impls(kind))
        if self.config.mode == "graph":
            refused.setdefault("kernel", "the kernel impl is Python glue between the framework "
                                         "and our kernels, which a compiled graph cannot run; "
                                         "in graph mode use 'native' (our kernels as the "
                                         "framework's own op)")
        return refused

    def impls_changed(self) -> None:
        """Called after the conv impl changed (e.g. to drop a compiled graph)."""

    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def step_calls(self) -> Tuple[str, ...]:
        """The calls a step is made of in this mode (module docstring)."""
        return STEP_CALLS

    def compile_count(self) -> int:
        """Graphs the framework has traced or compiled for this workload so far (0 in eager
        mode)."""
        return 0

    def weight_decay_rule(self) -> str:
        return spec.WEIGHT_DECAY_RULE

    # What the profiler asks of any model it profiles (profiler.instrument.base.Subject).
    def batch_size_of(self, output) -> int:
        return self.config.batch_size

    def version(self) -> str:
        return frameworks.version(self.framework)

    def device_kind(self) -> str:
        return self.config.device

    def device_name(self) -> str:
        """The processor, or the GPU where a framework base names it."""
        return frameworks.cpu_name()

    # Framework bases implement these.
    def unavailable_impls(self, kind: str) -> Dict[str, str]:
        """impl -> reason, for the ``kind`` ("conv", "loss") impls that cannot run here."""
        raise NotImplementedError

    def conv_layers(self):
        """Every convolution layer of the network (the adapter's layer class)."""
        raise NotImplementedError

    def make_loader(self, split: str = "train", *, epochs: int = 1, shuffle=None):
        raise NotImplementedError

    def export_weights(self) -> Dict[str, np.ndarray]:
        raise NotImplementedError
