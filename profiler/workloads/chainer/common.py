"""What both Chainer workloads share: device, seeding, the iterator over the shared sample
plan, MomentumSGD with WeightDecay hooks, and the canonical weight mapping.

Weight mapping: link paths are the canonical layer names (``/stage1/block0/conv1`` is
``stage1.block0.conv1``); Chainer's layouts are the canonical ones (Convolution2D's W is
(Cout, Cin, kh, kw), Linear's W is (out, in), and Linear flattens NCHW input in C, H, W
order as torch.flatten does); only the names differ: W/b are weight/bias, batch norm's
avg_mean/avg_var are running_mean/running_var.

Chainer is imported only through ``ops.chainer.loader.load_chainer`` (see there why).
"""

from __future__ import annotations

import numbers
import os
from collections import OrderedDict
from typing import Dict, Iterator, List, Tuple

import numpy as np

import ops.chainer as ops_chainer
from ops.chainer.loader import load_chainer, unavailable_impls

from .. import spec
from ..base import WorkloadBase

chainer = load_chainer()

# Chainer attribute -> canonical suffix, for the links that hold weights.
_CANONICAL_SUFFIX = {"W": "weight", "b": "bias", "gamma": "gamma", "beta": "beta",
                     "avg_mean": "running_mean", "avg_var": "running_var"}
_BN_STATISTICS = ("avg_mean", "avg_var")   # persistent arrays, not Parameters


def batch_norm(channels: int):
    """L.BatchNormalization with the shared epsilon and running-average decay (Chainer's own
    defaults are eps 2e-5 and decay 0.9). Its running variance gets the unbiased m / (m - 1)
    correction, as PyTorch's does.

    Not the same as PyTorch, and not ours to change: on the CPU Chainer takes the batch mean
    and variance in float32 (NumPy's x.mean / x.var), PyTorch's CPU kernel accumulates them in
    double. The math is the same (float64 runs agree to 1e-15), but in float32 Chainer's
    gradients differ from PyTorch's by ~1e-5 relative, much more where an input's mean is
    large against its spread (conv0's weight gradient with raw [0, 1] pixels: 0.5 x the sum of
    a BN input gradient that is 0 in exact arithmetic)."""
    return chainer.links.BatchNormalization(channels, decay=spec.BN_DECAY, eps=spec.BN_EPSILON)


def linear(in_size: int, out_size: int):
    """L.Linear created with zeros: every weight is overwritten by spec.initial_weights, and
    Chainer's default LeCunNormal would draw from NumPy's global RNG (which also drives
    Chainer's CPU dropout) for nothing."""
    return chainer.links.Linear(in_size, out_size, initialW=0, initial_bias=0)


def convolution(cin: int, cout: int, kernel: int, *, stride: int, pad: int, bias: bool):
    """ops.chainer.Convolution2D (a L.Convolution2D whose ``impl`` set_impls reassigns),
    symmetric padding ``pad``, created with zeros (see :func:`linear`)."""
    return ops_chainer.Convolution2D(cin, cout, kernel, stride=stride, pad=pad, nobias=not bias,
                                     initialW=0, initial_bias=0 if bias else None)


class ChainerLoader:
    """The shared sample plan through Chainer's own iterators: ``SerialIterator`` without
    workers, ``MultiprocessIterator(n_processes=workers)`` with them; ``repeat=False``,
    ``shuffle=False`` (the plan already ordered the samples) and ``concat_examples`` into
    tuples of NumPy arrays. Every ``iter()`` starts a fresh iterator (and, with workers, a
    fresh process pool, finalized when the iteration ends or is abandoned), as a PyTorch
    DataLoader without persistent workers does."""

    # Ready batches the MultiprocessIterator keeps queued ahead of the step, as
    # DataLoader(prefetch_factor=2) does. Chainer's workers share each batch (map_async over
    # its samples) rather than each taking whole batches as PyTorch's do.
    PREFETCH_BATCHES = 2

    def __init__(self, stream, batch_size: int, workers: int):
        self.stream, self.batch_size, self.workers = stream, batch_size, workers
        self._sample_bytes = None

    def __len__(self) -> int:
        return len(self.stream) // self.batch_size

    def _chainer_iterator(self):
        if self.workers == 0:
            return chainer.iterators.SerialIterator(self.stream, self.batch_size, repeat=False,
                                                    shuffle=False)
        if self._sample_bytes is None:
            # Sized up front: with shared_mem=None Chainer measures by loading the first batch
            # in the main process before starting its workers, so that batch would be loaded
            # serially; with the size given, the workers load every batch.
            self._sample_bytes = max(1, sum(a.nbytes for a in self.stream[0]
                                            if isinstance(a, np.ndarray)))
        return chainer.iterators.MultiprocessIterator(
            self.stream, self.batch_size, repeat=False, shuffle=False,
            n_processes=self.workers, n_prefetch=self.PREFETCH_BATCHES,
            shared_mem=self._sample_bytes)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, ...]]:
        iterator = self._chainer_iterator()
        try:
            for examples in iterator:
                if len(examples) < self.batch_size:   # drop_last (the plan has whole batches)
                    break
                yield tuple(chainer.dataset.concat_examples(examples))
        finally:
            # MultiprocessIterator's pool and prefetch thread outlive the loop unless
            # finalized (SerialIterator's finalize is a no-op).
            iterator.finalize()


class ChainerWorkload(WorkloadBase):
    """The Chainer half of the workload interface (see profiler.workloads.base); the model
    file supplies ``build_network()`` and ``loss_forward``."""

    framework = "chainer"
    # Chainer's running variance takes the unbiased batch variance (m / (m - 1)), as PyTorch's.
    bn_running_var_unbiased = True
    no_graph_mode = "Chainer runs define-by-run Python only; it has no graph compiler"

    def __init__(self, config):
        super().__init__(config)
        if config.device == "cuda":
            if not chainer.backends.cuda.available:
                raise RuntimeError(f"{type(self).__name__}: device: 'cuda' requested but this "
                                   f"Chainer ({chainer.__version__}) has no CuPy/CUDA")
            cupy = chainer.backends.cuda.cupy
            self.device = chainer.get_device(f"@cupy:{cupy.cuda.Device().id}")
        else:
            self.device = chainer.get_device("@numpy")
        self._seed_framework(config.seed)
        self.net = self.build_network()
        self.net.to_device(self.device)
        self._slots = self._canonical_slots()
        self.import_weights(spec.initial_weights(config.model, config.seed))
        self.set_impls(conv=config.conv_impl, loss=config.loss_impl)
        self.optimizer = chainer.optimizers.MomentumSGD(lr=spec.LEARNING_RATE,
                                                        momentum=spec.MOMENTUM)
        self.optimizer.setup(self.net)
        # Coupled L2 (spec.WEIGHT_DECAY_RULE): WeightDecay runs before the update rule
        # ('pre' timing) and adds rate * w to the gradient; hooked on the decayed parameters'
        # own update rules, so biases and batch norm are not decayed.
        decay = chainer.optimizer_hooks.WeightDecay(spec.WEIGHT_DECAY)
        for name, (link, attr) in self._slots.items():
            if spec.is_decayed(name):
                getattr(link, attr).update_rule.add_hook(decay)

    def _seed_framework(self, seed: int) -> None:
        # On the CPU Chainer's only randomness here (dropout masks) comes from NumPy's global
        # RNG, which the base already seeded. On the GPU: CuPy's RNG (non-cuDNN dropout) and
        # cuDNN's dropout states, which Chainer seeds from CHAINER_SEED when it first creates
        # them (once per process and device: later workloads in the process share them).
        if self.on_gpu:
            chainer.backends.cuda.cupy.random.seed(seed)
            os.environ.setdefault("CHAINER_SEED", str(seed))

    @property
    def on_gpu(self) -> bool:
        return self.device.xp is not np

    # -- network ---------------------------------------------------------------------------
    def build_network(self):
        raise NotImplementedError

    def _canonical_slots(self) -> "OrderedDict[str, Tuple[object, str]]":
        """canonical name -> (link, attribute), in spec.parameter_shapes order; checked once
        against the spec so a network that drifts from it fails at construction."""
        found = {}
        for path, link in self.net.namedlinks(skipself=True):
            if isinstance(link, chainer.Chain):   # containers: their leaves hold the weights
                continue
            layer = path[1:].replace("/", ".")
            attrs = [name[1:] for name, _ in link.namedparams()]
            if isinstance(link, chainer.links.BatchNormalization):
                attrs += list(_BN_STATISTICS)
            for attr in attrs:
                found[f"{layer}.{_CANONICAL_SUFFIX[attr]}"] = (link, attr)
        shapes = spec.parameter_shapes(self.model_name)
        if set(found) != set(shapes):
            raise RuntimeError(f"{type(self).__name__}: the network's weights "
                               f"{sorted(set(found) ^ set(shapes))} differ from "
                               f"spec.parameter_shapes({self.model_name!r})")
        return OrderedDict((name, found[name]) for name in shapes)

    def named_layers(self) -> List[Tuple[str, object]]:
        layers = OrderedDict()
        for name, (link, _) in self._slots.items():
            layers.setdefault(name.rpartition(".")[0], link)
        return list(layers.items())

    def unavailable_impls(self, kind: str):
        return unavailable_impls(kind, self.device)

    def conv_layers(self):
        return [link for link in self.net.links()
                if isinstance(link, ops_chainer.Convolution2D)]

    # -- weights ---------------------------------------------------------------------------
    @staticmethod
    def _array(link, attr: str):
        value = getattr(link, attr)
        return value.array if isinstance(value, chainer.Variable) else value

    def export_weights(self) -> Dict[str, np.ndarray]:
        cpu = chainer.backend.CpuDevice()
        return {name: np.array(cpu.send(self._array(link, attr)), copy=True)
                for name, (link, attr) in self._slots.items()}

    def import_weights(self, weights) -> None:
        """Loads canonical weights in place (and clears the optimizer's momentum, if any)."""
        spec.check_weights(f"{type(self).__name__}.import_weights", self.model_name, weights)
        for name, (link, attr) in self._slots.items():
            self._array(link, attr)[...] = self.device.send(
                np.ascontiguousarray(weights[name], dtype=np.float32))
        if hasattr(self, "optimizer"):
            # MomentumSGD's only state is its velocity, created as zeros: zeroing it is a
            # fresh optimizer, as PyTorch's cleared state is.
            for param in self.net.params():
                state = param.update_rule.state
                if state is not None:
                    state["v"].fill(0)

    # -- data ------------------------------------------------------------------------------
    def make_loader(self, split: str = "train", *, epochs: int = 1, shuffle=None):
        """Chainer's SerialIterator / MultiprocessIterator over the shared plan (see
        :class:`ChainerLoader`); batches are tuples of NumPy arrays."""
        stream = self.sample_stream(split, epochs=epochs, shuffle=shuffle)
        return ChainerLoader(stream, self.config.batch_size, self.config.workers)

    def to_device(self, batch):
        """NumPy -> CuPy on the GPU (Chainer's ``Device.send``: a synchronous copy from
        pageable memory; Chainer has no pinned-memory loader); a no-op on the CPU."""
        if not self.on_gpu:
            return batch
        return tuple(self.device.send(a) for a in batch)

    def batch_to_numpy(self, batch):
        cpu = chainer.backend.CpuDevice()
        return tuple(np.asarray(cpu.send(a)) for a in batch)

    # -- the step --------------------------------------------------------------------------
    def forward(self, batch):
        return self.net(batch[0])

    def backward(self, loss) -> None:
        # Chainer accumulates into existing gradients: clear them so these are fresh.
        self.net.cleargrads()
        loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.update()
        # Drop the used gradients here, so freeing them counts as optimizer bookkeeping (it
        # would otherwise land in the next step's loss backward); backward's cleargrads is
        # then free.
        self.net.cleargrads()

    def loss_value(self, loss) -> float:
        return float(loss.array)

    def set_learning_rate(self, lr: float) -> None:
        """Sets the learning rate of every parameter. Chainer's momentum keeps the velocity
        in step units (v = m v - lr g; w += v) where PyTorch keeps it in gradient units
        (b = m b + g; w -= lr b), so v == -lr b: the velocity is rescaled by new / old so the
        next updates are PyTorch's exactly (unscaled, a new rate would phase in over the
        momentum's horizon). Hence ``lr`` must be positive."""
        if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not 0 < lr < np.inf:
            raise ValueError(f"{type(self).__name__}.set_learning_rate: lr: expected a "
                             f"positive finite number, got {lr!r}")
        ratio = lr / self.optimizer.lr
        if ratio != 1:
            for param in self.net.params():
                state = param.update_rule.state
                if state is not None:
                    state["v"] *= state["v"].dtype.type(ratio)
        self.optimizer.lr = lr

    def synchronize(self) -> None:
        # Chainer on NumPy is synchronous; on CuPy kernels queue on the device.
        if self.on_gpu:
            self.device.device.synchronize()

    def device_name(self) -> str:
        if self.on_gpu:
            cupy = chainer.backends.cuda.cupy
            name = cupy.cuda.runtime.getDeviceProperties(self.device.device.id)["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        return super().device_name()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode output for NCHW float32 ``images`` (batch norm's running statistics, no
        dropout, no graph)."""
        x = self.device.send(np.ascontiguousarray(images, np.float32))
        with chainer.using_config("train", False), chainer.no_backprop_mode():
            y = self.net(x)
        return np.asarray(chainer.backend.CpuDevice().send(y.array))
