"""What both PyTorch workloads share: device, seeding, the DataLoader over the shared sample
plan, SGD with momentum and weight decay, the canonical weight mapping, and graph mode.

Weight mapping: module names are the canonical layer names (spec.py); PyTorch's layouts are
the canonical ones; batch norm's weight/bias are gamma/beta.

Graph mode (``config.mode == "graph"``), as PyTorch users compile: the network goes through
``torch.compile`` (Inductor, default mode). Compiled are the network's forward and, through
AOTAutograd, its backward (``loss.backward()`` runs the compiled backward); the loss, the
backward call and the SGD step stay eager, so a step is still the four calls of
base.STEP_CALLS. ``predict``, the weights and the layers are the plain module's (``self.net``,
eager): the compiled wrapper shares its parameters and buffers, and canonical names never get
the wrapper's ``_orig_mod.`` prefix. On a GPU the same code compiles Triton kernels (written,
unverified there).

Not the whole step: ``torch.compile`` of one function with forward, loss, ``zero_grad``,
``loss.backward()`` and ``optimizer.step()`` (tried once, torch 2.13 CPU, ResNet-20, batch 32,
2 shared cores, 2026-12-05) breaks into 4 graphs: dynamo skips ``zero_grad``, breaks at
``Tensor.backward()`` and at the two ``graph_break()`` calls ``Optimizer.step`` makes on
purpose (pytorch#104053), and a 4th graph compiled in the 2nd step (6 s). Its first step took
56 s (cold caches; the network alone: 37 to 45 s, other jobs' load varying), for nothing fused
across the breaks; ``fullgraph=True`` refuses it at ``zero_grad``. ``trace_autograd_ops=True``
(experimental) made 2 graphs, but the weights never changed: the step was silently wrong.

Same model as eager: Inductor runs with ``fallback_random`` (random ops through ATen's kernels
and the default generator, so DeepPose's dropout masks are eager's; Inductor's own RNG draws
others), passed as ``config_patches`` to ``compile_fx``: Inductor's config is patched for our
compiles only (the backward's included), never for other code in the process. Not the same:
Inductor's float32 batch norm takes its statistics in float32 (eager's CPU kernel in double),
~3x eager's rounding, enough to put a ReLU input that is within rounding of 0 on the other
side (one such flip moves ResNet-20's first-stage gradients by ~2%); compared in float64, the
graph step is eager's within float64 rounding.

Compile counts: every workload has its own backend (:class:`CountingInductor`), so
``compile_count()`` counts the graphs dynamo handed this workload (graph breaks would show as
several). ``isolate_recompiles=True``: one class's ``forward`` code object holds the compiled
entries of every workload, which by default share one recompile limit (8: the 9th workload
in a process would silently run eagerly). ``dynamic=False``: dynamo's automatic dynamic shapes
remember what changed on that code object across workloads (and, in its profile cache, may
across processes: a batch size, DeepPose's dropout rate) and would compile the next workload
differently (seen: DeepPose traced twice in one step after one with another dropout rate).
Still shared: dynamo's ``accumulated_recompile_limit`` (256 entries per code object in a
process) and Inductor's on-disk caches (a repeated compile is faster, and still counts).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

import ops.torch as ops_torch
from ops.torch.loader import unavailable_impls

from .. import spec
from ..base import WorkloadBase

_BN_NAMES = {"weight": "gamma", "bias": "beta", "running_mean": "running_mean",
             "running_var": "running_var"}


# Inductor's config for our compiles only (module docstring): random ops as eager draws them.
INDUCTOR_PATCHES = {"fallback_random": True}


class CountingInductor:
    """A ``torch.compile`` backend: Inductor, as ``backend="inductor"`` (default mode) calls
    it, with :data:`INDUCTOR_PATCHES`, counting the graphs it is handed. Holds no reference to
    the workload (dynamo's cache entries keep their backend alive)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        self.graphs += 1
        return compile_fx(graph_module, example_inputs, config_patches=dict(INDUCTOR_PATCHES))


def batch_norm(channels: int) -> torch.nn.BatchNorm2d:
    """BatchNorm2d with the shared epsilon and running-average decay."""
    return torch.nn.BatchNorm2d(channels, eps=spec.BN_EPSILON, momentum=1 - spec.BN_DECAY)


class TorchWorkload(WorkloadBase):
    """The PyTorch half of the workload interface (see profiler.workloads.base); the model
    file supplies ``build_network()`` and ``loss_forward``."""

    framework = "torch"
    bn_running_var_unbiased = True    # PyTorch's running_var takes the unbiased batch variance

    def __init__(self, config):
        super().__init__(config)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{type(self).__name__}: device: 'cuda' requested but this "
                               f"PyTorch ({torch.__version__}) sees no GPU")
        torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        self.net = self.build_network().to(self.device)
        self.import_weights(spec.initial_weights(config.model, config.seed))
        self.set_impls(conv=config.conv_impl, loss=config.loss_impl)
        # Graph mode's compiled network (module docstring); compiled at its first call.
        self._compiler = self._compiled_net = None
        if config.mode == "graph":
            self._compiler = CountingInductor()
            self._compiled_net = torch.compile(self.net, backend=self._compiler,
                                               isolate_recompiles=True, dynamic=False)
        decayed = [p for n, p in self._canonical_parameters() if spec.is_decayed(n)]
        others = [p for n, p in self._canonical_parameters() if not spec.is_decayed(n)]
        self.optimizer = torch.optim.SGD(
            [{"params": decayed, "weight_decay": spec.WEIGHT_DECAY},
             {"params": others, "weight_decay": 0.0}],
            lr=spec.LEARNING_RATE, momentum=spec.MOMENTUM)

    # -- network ---------------------------------------------------------------------------
    def build_network(self) -> torch.nn.Module:
        raise NotImplementedError

    def named_layers(self) -> List[Tuple[str, torch.nn.Module]]:
        return [(name, m) for name, m in self.net.named_modules()
                if name and any(True for _ in m.parameters(recurse=False))]

    def unavailable_impls(self, kind: str):
        return unavailable_impls(kind, self.device)

    def conv_layers(self):
        return [m for m in self.net.modules() if isinstance(m, ops_torch.Conv2d)]

    def compile_count(self) -> int:
        """Graphs this workload's compiler was handed so far (0 in eager mode and before the
        first graph-mode step)."""
        return self._compiler.graphs if self._compiler is not None else 0

    # impls_changed needs nothing in graph mode: dynamo guards every Conv2d's ``impl``, so the
    # next forward recompiles for the new one (compile_count shows it), and switching back
    # reuses the graph already compiled for the old one.

    # -- weights ---------------------------------------------------------------------------
    def _canonical_tensors(self) -> Dict[str, torch.Tensor]:
        out = {}
        for module_name, module in self.net.named_modules():
            is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            tensors = list(module.named_parameters(recurse=False)) + [
                (n, b) for n, b in module.named_buffers(recurse=False)
                if n != "num_batches_tracked"]
            for name, tensor in tensors:
                out[f"{module_name}.{_BN_NAMES[name] if is_bn else name}"] = tensor
        return out

    def _canonical_parameters(self):
        return [(n, t) for n, t in self._canonical_tensors().items()
                if isinstance(t, torch.nn.Parameter)]

    def export_weights(self) -> Dict[str, np.ndarray]:
        return {n: t.detach().cpu().numpy().copy() for n, t in self._canonical_tensors().items()}

    def import_weights(self, weights) -> None:
        """Loads canonical weights (and clears the optimizer's momentum, if any)."""
        spec.check_weights(f"{type(self).__name__}.import_weights", self.model_name, weights)
        with torch.no_grad():
            for name, tensor in self._canonical_tensors().items():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(weights[name],
                                                                   dtype=np.float32)))
        if hasattr(self, "optimizer"):
            self.optimizer.state.clear()

    # -- data ------------------------------------------------------------------------------
    def make_loader(self, split: str = "train", *, epochs: int = 1, shuffle=None):
        """torch.utils.data.DataLoader over the shared plan: ``config.workers`` worker
        processes, pinned memory on the GPU; batches are tuples of CPU tensors."""
        stream = self.sample_stream(split, epochs=epochs, shuffle=shuffle)
        workers = self.config.workers
        return torch.utils.data.DataLoader(
            stream, batch_size=self.config.batch_size, shuffle=False, drop_last=True,
            num_workers=workers, pin_memory=self.device.type == "cuda",
            persistent_workers=False, prefetch_factor=2 if workers else None)

    def to_device(self, batch):
        if self.device.type == "cpu":
            return batch
        return tuple(t.to(self.device, non_blocking=True) for t in batch)

    def batch_to_numpy(self, batch):
        return tuple(t.cpu().numpy() for t in batch)

    # -- the step --------------------------------------------------------------------------
    def forward(self, batch):
        net = self._compiled_net if self._compiled_net is not None else self.net
        return net(batch[0])

    def backward(self, loss) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        # Drop the used gradients here: freeing them (187 MB for DeepPose, ~30 ms on this CPU)
        # is optimizer bookkeeping and would otherwise land in the next loss backward;
        # backward's zero_grad then finds nothing to free.
        self.optimizer.zero_grad(set_to_none=True)

    def loss_value(self, loss) -> float:
        return float(loss.detach())

    def set_learning_rate(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return super().device_name()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode output for NCHW float32 ``images``; eager in both modes (the compiled
        network is the training step's)."""
        self.net.eval()
        try:
            with torch.no_grad():
                x = torch.from_numpy(np.ascontiguousarray(images, np.float32)).to(self.device)
                return self.net(x).cpu().numpy()
        finally:
            self.net.train()
