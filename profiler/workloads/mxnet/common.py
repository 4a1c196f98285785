"""What both MXNet/Gluon workloads share: context, seeding, Gluon's DataLoader over the shared
sample plan, the Trainer's SGD with momentum and weight decay, the autograd recording scope of a
step, the canonical weight mapping, and the two modes.

Modes (base.py):

- Eager (``config.mode == "eager"``): the network runs imperatively, block by block, every
  operator dispatched from Python; Gluon calls each block's forward hooks, which the profiler's
  layer ranges need.
- Graph (``"graph"``), as Gluon and Keras-MXNet users train: the network is hybridized with
  :data:`HYBRIDIZE_FLAGS` (``static_alloc``, ``static_shape``). At its first call Gluon traces
  ``hybrid_forward`` with Symbols into one graph and makes a CachedOp of it, which MXNet runs,
  and whose gradient graph the backward runs, with memory planned and operator executors made
  once per input shape. Only the network is compiled: the loss, the ``backward`` call and the
  Trainer stay as in eager, so a step is still the four calls of base.STEP_CALLS. No block's
  hook fires inside the graph (the profiler's MXNet instrument refuses a hybridized network;
  its engine installs no layer hooks in graph mode). Our ``native`` conv is an MXNet operator
  and runs in the graph (the ``native`` loss is outside it, as every loss); the ``kernel``
  impls are refused (base). ``set_impls`` clears the cached graphs and hybridizes again with
  the same flags. ``predict`` runs the same hybridized network in inference mode.
  ``compile_count()`` counts the graphs Gluon built (the first call; again after ``set_impls``
  or ``net.cast``, which drop them) and the calls whose input shapes or dtypes differ from the
  previous call's (MXNet then infers the graph's shapes and types again and plans its memory
  anew: a retrace, visible). On a GPU the same code runs the graph on ``mx.gpu(0)``: written,
  unverified there.

Weight mapping: a layer's canonical name is the path of attribute names from the network to
its block, joined by "." (as PyTorch's module names), a parameter's the layer name plus the
parameter's attribute name (weight, bias, gamma, beta, running_mean, running_var: Gluon's
names are the canonical ones). Gluon's layouts are the canonical ones too: Conv2D weight
(Cout, Cin, kh, kw), Dense weight (units, in_units), and Dense(flatten=True) flattens NCHW
input in (C, H, W) order. Blocks also get explicit prefixes, so MXNet's own parameter names
read like the canonical ones (``resnet20_stage1_block0_conv1_weight``).

Where MXNet is not PyTorch and cannot be made so (on CPU; the GPU path, cuDNN's batch norm,
is unverified): batch norm updates its running variance with the *biased* batch variance
(PyTorch: the unbiased one, N / (N - 1) larger, N = batch x height x width), and updates both
running statistics in its backward pass, not in the forward (a training-mode forward without a
backward leaves them alone; the profiler sees that work under backward). Correcting the
variance would add operators to every step of the workload whose overhead is being measured,
so it is left as MXNet does it. Its batch statistics are also summed in float32 (PyTorch's CPU
kernels accumulate in double): about ten times PyTorch's rounding error, enough for a
pre-activation within float32 rounding of 0 to land on the other side of a ReLU now and then,
which changes the gradients upstream of it by up to a few percent (in float64 the two
frameworks' steps agree to 3e-7: tests/test_workloads_mxnet.py).

MXNet 1.9.1's hazards (the kernel conv impl's backward and the optimizer's update waiting on
each other, oneDNN's in-place reorder of convolution weights in inference, queued Python work
at interpreter exit) are handled by the adapter, ops.mxnet (documented in ops/mxnet/loader.py),
for this workload as for any other user of it. A graph-mode ``predict`` leaves the convolution
weights in oneDNN's layout (the graph runs MXNet's convolution without calling the layer that
would put them back) until the next training step's convolution reorders them; nothing here
needs them plain meanwhile: ``set_data`` takes an NDArray source (``import_weights``),
``asnumpy`` converts (``export_weights``), and a switch to ``native`` puts them back (the
adapter's Conv2D).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Dict, Iterator, List, Tuple

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

import ops.mxnet as ops_mxnet
from ops.mxnet.loader import unavailable_impls

from .. import spec
from ..base import WorkloadBase

# Graph mode's hybridization, as Gluon users train (and profiler.api's graph mode hybridizes a
# user's own model): memory and operator executors planned once per input shape, not per call.
HYBRIDIZE_FLAGS = dict(static_alloc=True, static_shape=True)


def batch_norm(channels: int, prefix: str) -> gluon.nn.BatchNorm:
    """Gluon BatchNorm with the shared epsilon and running-average decay (MXNet's momentum is
    spec.BN_DECAY itself: running = momentum * running + (1 - momentum) * batch)."""
    return gluon.nn.BatchNorm(momentum=spec.BN_DECAY, epsilon=spec.BN_EPSILON,
                              in_channels=channels, prefix=prefix)


def named_blocks(block: gluon.Block, name: str = "") -> Iterator[Tuple[str, gluon.Block]]:
    """(dotted attribute path, block) of ``block`` and every block under it, parents first,
    children in registration order (PyTorch's ``named_modules``). Gluon 1.x has no public
    accessor for a child's attribute name; ``_children`` maps it to the child."""
    yield name, block
    for child_name, child in block._children.items():
        yield from named_blocks(child, f"{name}.{child_name}" if name else child_name)


class CompileCounter:
    """Counts the compiles of one hybridized block (the network): each cached graph Gluon
    builds (``HybridBlock._build_cache``, which traces ``hybrid_forward`` and makes the
    CachedOp: MXNet 1.9.1's gluon/block.py), and each call whose inputs' shapes or dtypes differ
    from the previous call's, for which the CachedOp infers shapes and types again and plans
    its memory anew (MXNet's CachedOp::SetForwardGraph). Installed on the block instance,
    wrapping its two methods; the block's class and other instances are untouched."""

    def __init__(self, block: gluon.HybridBlock):
        self.count = 0
        self._signature = None   # the inputs of the last call of the cached graph
        build_cache, call_cached_op = block._build_cache, block._call_cached_op

        def counting_build_cache(*args):
            self.count += 1
            self._signature = _input_signature(args)
            return build_cache(*args)

        def counting_call_cached_op(*args):
            signature = _input_signature(args)
            # No graph yet: the build counts itself (call_cached_op builds it).
            if block._cached_op is not None and signature != self._signature:
                self.count += 1
            self._signature = signature
            return call_cached_op(*args)

        block._build_cache = counting_build_cache
        block._call_cached_op = counting_call_cached_op


def _input_signature(args) -> tuple:
    """What of a call's inputs the CachedOp's shape and type inference see."""
    return tuple((a.shape, np.dtype(a.dtype).name) if isinstance(a, mx.nd.NDArray) else None
                 for a in args)


class MXNetWorkload(WorkloadBase):
    """The MXNet/Gluon half of the workload interface (see profiler.workloads.base); the model
    file supplies ``build_network()`` and ``compute_loss``.

    Eager mode runs the network imperatively, so Gluon's per-block forward hooks fire; graph
    mode hybridizes it (module docstring). In eager mode ``self.net.hybridize()`` still works
    (``set_impls`` rebuilds the cached graphs)."""

    framework = "mxnet"
    # MXNet's CPU batch norm (and its own CUDA kernel) updates running_var with the biased
    # batch variance: see the module docstring. Its cuDNN path, the GPU default, is unverified.
    bn_running_var_unbiased = False

    def __init__(self, config):
        super().__init__(config)
        if config.device == "cuda" and mx.context.num_gpus() == 0:
            raise RuntimeError(f"{type(self).__name__}: device: 'cuda' requested but this "
                               f"MXNet ({mx.__version__}) sees no GPU")
        mx.random.seed(config.seed)  # dropout masks (every context's generator)
        self.ctx = mx.gpu(0) if config.device == "cuda" else mx.cpu(0)
        self._record = None  # the open autograd.record() scope, from forward to loss_forward
        self.net = self.build_network()
        # Zeros: every value is overwritten by import_weights below, and drawing random
        # initial values would only advance MXNet's generator (the dropout masks).
        self.net.initialize(mx.init.Zero(), ctx=self.ctx)
        self._tensors = self._canonical_tensors()
        self.import_weights(spec.initial_weights(config.model, config.seed))
        # Before set_impls, which (through impls_changed) hybridizes in graph mode; nothing is
        # built until the first call.
        self._compiles = CompileCounter(self.net) if config.mode == "graph" else None
        self.set_impls(conv=config.conv_impl, loss=config.loss_impl)
        self.trainer = self._make_trainer(spec.LEARNING_RATE)

    # -- network ---------------------------------------------------------------------------
    def build_network(self) -> gluon.HybridBlock:
        raise NotImplementedError

    def named_layers(self) -> List[Tuple[str, gluon.Block]]:
        return [(name, block) for name, block in named_blocks(self.net)
                if name and block._reg_params]

    def unavailable_impls(self, kind: str):
        return unavailable_impls(kind, self.ctx)

    def conv_layers(self):
        return [block for _, block in named_blocks(self.net)
                if isinstance(block, ops_mxnet.Conv2D)]

    def impls_changed(self) -> None:
        # A Conv2D clears its own cached graph when its impl changes; a hybridized parent
        # would keep running the old one.
        for _, block in named_blocks(self.net):
            if isinstance(block, gluon.HybridBlock):
                block._clear_cached_op()
        if self.mode == "graph":
            # The first call builds the graph anew, with the new convolutions, under the same
            # flags: hybridize sets them on every block (and clears again, harmlessly).
            self.net.hybridize(True, **HYBRIDIZE_FLAGS)

    def compile_count(self) -> int:
        """Graph mode: cached graphs Gluon built for the network since the workload was
        built, plus calls with new input shapes or dtypes (:class:`CompileCounter`); 0 before
        the first step, and in eager mode."""
        return self._compiles.count if self._compiles is not None else 0

    # -- weights ---------------------------------------------------------------------------
    def _canonical_tensors(self) -> "OrderedDict[str, gluon.Parameter]":
        """Canonical name -> Gluon Parameter, in spec.parameter_shapes order."""
        found = {f"{layer}.{local}": param for layer, block in named_blocks(self.net) if layer
                 for local, param in block._reg_params.items()}
        names = list(spec.parameter_shapes(self.model_name))
        if set(found) != set(names):
            raise RuntimeError(f"{type(self).__name__}: the network's parameters "
                               f"{sorted(set(found) - set(names))[:5]} / canonical names "
                               f"{sorted(set(names) - set(found))[:5]} do not match")
        return OrderedDict((name, found[name]) for name in names)

    def _make_trainer(self, lr: float) -> gluon.Trainer:
        """Gluon's SGD: state = momentum * state + lr * (g + wd * w); w -= state. With a
        constant lr that is PyTorch's update (state = lr * PyTorch's buffer). Gluon decays
        every parameter by default (wd_mult 1), so the others get wd_mult 0
        (spec.WEIGHT_DECAY_RULE). kvstore=None: one context needs no gradient reduction."""
        trainable = []
        for name, param in self._tensors.items():
            if spec.is_statistic(name):
                continue
            param.wd_mult = 1.0 if spec.is_decayed(name) else 0.0
            trainable.append(param)
        return gluon.Trainer(trainable, "sgd", {"learning_rate": lr, "momentum": spec.MOMENTUM,
                                                "wd": spec.WEIGHT_DECAY}, kvstore=None)

    def export_weights(self) -> Dict[str, np.ndarray]:
        return {name: param.data(self.ctx).asnumpy() for name, param in self._tensors.items()}

    def import_weights(self, weights) -> None:
        """Loads canonical weights (and clears the optimizer's momentum, if any)."""
        spec.check_weights(f"{type(self).__name__}.import_weights", self.model_name, weights)
        for name, param in self._tensors.items():
            # An NDArray source (set_data from NumPy fails on an array in oneDNN's layout), in
            # the parameter's dtype (float32, unless the network was cast).
            param.set_data(mx.nd.array(np.ascontiguousarray(weights[name]), ctx=self.ctx,
                                       dtype=param.dtype))
        if hasattr(self, "trainer"):
            # A fresh Trainer is the public way to drop the momentum states.
            self.trainer = self._make_trainer(self.trainer.learning_rate)

    # -- data ------------------------------------------------------------------------------
    def make_loader(self, split: str = "train", *, epochs: int = 1, shuffle=None):
        """gluon.data.DataLoader over the shared plan (no shuffling of its own, the last
        partial batch dropped): ``config.workers`` worker processes, pinned memory on the GPU;
        batches are tuples of NDArrays (image float32, then label int64, or joints and
        visibility float32). Worker batches arrive in shared memory (context cpu_shared), see
        ``to_device``."""
        stream = self.sample_stream(split, epochs=epochs, shuffle=shuffle)
        workers = self.config.workers
        return gluon.data.DataLoader(
            stream, batch_size=self.config.batch_size, shuffle=False, last_batch="discard",
            num_workers=workers, pin_memory=self.ctx.device_type == "gpu",
            prefetch=2 * workers, thread_pool=False)

    def to_device(self, batch):
        """Host batch -> arrays on the workload's context. On the CPU this is a no-op for the
        in-process loader; worker batches live in cpu_shared memory, which our conv and loss
        impls (and hybridized graphs) do not take alongside cpu parameters, so they are
        copied to cpu(0) here."""
        return tuple(a if a.context == self.ctx else a.as_in_context(self.ctx) for a in batch)

    def batch_to_numpy(self, batch):
        """A loader's batch as NumPy arrays (Gluon's layouts are the canonical ones)."""
        return tuple(a.asnumpy() for a in batch)

    # -- the step --------------------------------------------------------------------------
    def _end_record(self) -> None:
        if self._record is not None:
            record, self._record = self._record, None
            record.__exit__(None, None, None)

    def forward(self, batch):
        """Training-mode output. Opens autograd.record(), which ``loss_forward`` closes, so
        the profiler can time the network and the loss separately."""
        self._end_record()  # a forward whose loss was never computed
        record = autograd.record(train_mode=True)
        record.__enter__()
        self._record = record
        try:
            return self.net(batch[0])
        except BaseException:
            self._end_record()
            raise

    def loss_forward(self, output, batch):
        """The scalar loss (an NDArray of shape (1,)), still recorded; then ends recording."""
        try:
            return self.compute_loss(output, batch)
        finally:
            self._end_record()

    def compute_loss(self, output, batch):
        raise NotImplementedError

    def backward(self, loss) -> None:
        """Every parameter's gradient, overwritten (grad_req 'write', which our native conv
        also requires), so old gradients need no clearing. Only queued, as MXNet does it."""
        self._end_record()
        loss.backward()

    def optimizer_step(self) -> None:
        # step(1): the loss is already the batch mean; step(batch_size) would divide again.
        self.trainer.step(1)

    def loss_value(self, loss) -> float:
        return float(loss.asscalar())  # waits for the loss to be computed

    def set_learning_rate(self, lr: float) -> None:
        """Sets the lr, and rescales the momentum states by new / old so the next updates are
        PyTorch's: MXNet's state holds lr * PyTorch's buffer with the lr it was built with.
        (From lr 0 nothing can be rescaled: PyTorch's buffer kept growing, MXNet's did not.)"""
        if not isinstance(lr, numbers.Real) or isinstance(lr, bool) or not math.isfinite(lr) \
                or lr < 0:
            raise ValueError(f"{type(self).__name__}.set_learning_rate: lr: expected a finite "
                             f"float >= 0, got {lr!r}")
        old = self.trainer.learning_rate
        if old > 0 and lr != old:
            # Gluon keeps the states in its (private) per-context updaters: index -> NDArray.
            for updater in self.trainer._updaters:
                for state in updater.states.values():
                    if state is not None:
                        state *= lr / old
        self.trainer.set_learning_rate(float(lr))

    def synchronize(self) -> None:
        # MXNet queues every operator on its engine and returns: wait for all of them.
        mx.nd.waitall()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode output (batch norm's running statistics, no dropout) for NCHW float32
        ``images``; in graph mode through the hybridized network."""
        self._end_record()
        x = mx.nd.array(np.ascontiguousarray(images, np.float32), ctx=self.ctx,
                        dtype=np.float32)
        # Graph mode predicts through the training step's graph, as a Gluon user of a
        # hybridized network does: the compiled network is what graph mode measures, and
        # running the blocks imperatively instead would mean hybridize(False) and back, which
        # either drops the training graph (a rebuild per predict) or flips Gluon's flags on
        # every block. The price, under static_shape: another batch size than training's
        # replans the graph, and so does the next training step (compile_count shows both).
        with autograd.pause(train_mode=False):
            return self.net(x).asnumpy()
