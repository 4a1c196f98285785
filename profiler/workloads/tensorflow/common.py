"""What both TensorFlow/Keras workloads share: device placement, seeding, the tf.data loader
over the shared sample plan, the eager step on a GradientTape, Keras' SGD with momentum and
coupled weight decay, and the canonical weight mapping. Nothing here knows about the profiler.

Where TensorFlow/Keras differs from the canonical (PyTorch) run, and what is done about it:

- Layout: the Keras models run channels_last (NHWC) on every machine. NHWC is the one layout
  TensorFlow's CPU convolution trains in everywhere (NCHW trains only with oneDNN on, in
  float32, and not with explicit padding: ``ops.tensorflow.cpu_conv_layout``), and Keras'
  default; choosing by machine would make the TensorFlow model compared with the other
  frameworks differ from one machine to the next. The loaders deliver NHWC images, so with conv
  impl "framework" a step transposes nothing; the kernel impls transpose each conv's input to
  NCHW and back in named ops (``ops.tensorflow.Conv2D``). ``predict`` takes NCHW and transposes.
- Padding: Keras' "same" pads asymmetrically at stride 2 (PyTorch pads 1 and 1), so every
  padded convolution is a ``keras.layers.ZeroPadding2D`` then an ``ops.tensorflow.Conv2D``
  with padding "valid" (:func:`padded_conv`).
- Weights: conv kernels are (kh, kw, Cin, Cout) <- canonical (Cout, Cin, kh, kw); dense
  kernels (in, out) = canonical weight.T; a dense layer after a Flatten of NHWC takes its input
  in (H, W, C) order, so its canonical (C, H, W)-ordered input axis is permuted on import and
  back on export (the network's ``flatten_inputs`` names those layers). Keras layers carry the
  canonical names (Keras accepts dots).
- Step, mode "eager": ``forward`` opens a GradientTape, ``loss_forward`` closes it and
  ``backward`` asks it for the gradients, so forward, loss and backward run (and are timed)
  apart, as in PyTorch.
- Step, mode "graph": ``train_step`` is one ``tf.function`` holding the whole step (forward in
  training mode on a GradientTape, the loss, the gradients, the weight decay, Keras SGD's
  update; ``config.xla``: ``jit_compile=True``), traced at the first step for that batch's
  shapes and dtypes (its ``input_signature``: later batches never retrace, and one of other
  shapes is refused). The whole step, not the network alone, because that is how TensorFlow
  users train (``model.fit`` and hand-written loops compile the step) and because eager
  dispatch, which a compiled network alone would still leave around the loss and the
  optimizer's per-variable ops, was about 80% of an eager ResNet-20 step on a CPU (issue 20).
  The step is one call, so forward, loss and backward are not timed apart; ``forward`` and
  the other separate calls refuse, naming ``train_step``. The learning rate is a variable of
  Keras' optimizer, so ``set_learning_rate`` does not retrace; a new conv or loss impl does
  (``set_impls`` drops the traced step). Our ``native`` ops run inside the graph; having no
  XLA kernels, they are refused with ``xla=True``.
- Optimizer: ``keras.optimizers.SGD``, whose momentum update (m <- momentum*m - lr*g;
  w <- w + m) equals PyTorch's (buf <- momentum*buf + g; w <- w - lr*buf) while lr stays
  constant (m = -lr*buf); see :meth:`TensorFlowWorkload.set_learning_rate` for a change of lr.
  Weight decay is added to the decayed variables' gradients by hand (spec.WEIGHT_DECAY_RULE).
- Batch norm: see :func:`batch_norm` (the moving variance is not bias-corrected).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

import ops.tensorflow as ops_tf

from .. import data, spec
from ..base import WorkloadBase


def batch_norm(name: str) -> keras.layers.BatchNormalization:
    """BatchNormalization over the channels (NHWC) with the shared epsilon and decay.

    Not the same as PyTorch, and not made so: Keras averages the biased batch variance into
    ``moving_variance`` where PyTorch averages the unbiased one (n / (n - 1) times larger, n =
    batch x height x width), so each step adds (1 - BN_DECAY) * var / (n - 1) less, and a
    long run's running_var settles 1 / (n - 1) lower relative (5e-4 at ResNet's last stage,
    batch 32). Training-mode outputs (batch statistics, biased, as PyTorch) and eval outputs
    for the same statistics agree; ``export_weights`` returns what Keras holds and
    ``bn_running_var_unbiased`` is False."""
    return keras.layers.BatchNormalization(axis=-1, momentum=spec.BN_DECAY,
                                           epsilon=spec.BN_EPSILON, name=name)


def padded_conv(name: str, filters: int, kernel: int, *, stride: int = 1, padding: int = 0,
                use_bias: bool = True) -> Tuple[Optional[keras.layers.Layer], ops_tf.Conv2D]:
    """(ZeroPadding2D of ``padding`` or None, ``ops.tensorflow.Conv2D`` "valid"): PyTorch's
    symmetric padding, which Keras' "same" is not at stride 2. Zero initialisers: the workload
    imports spec.initial_weights over them, so drawing random ones would be wasted work."""
    pad = keras.layers.ZeroPadding2D(padding, name=f"{name}.pad") if padding else None
    conv = ops_tf.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=use_bias,
                         kernel_initializer="zeros", name=name)
    return pad, conv


def dense(name: str, units: int) -> keras.layers.Dense:
    """keras.layers.Dense without activation (ReLU is applied outside, as in PyTorch, so a
    layer's time is the affine map only)."""
    return keras.layers.Dense(units, kernel_initializer="zeros", name=name)


def unavailable_impls(kind: str, device: str, *, xla: bool = False) -> Dict[str, str]:
    """impl -> reason for those of ``kind`` that do not run eagerly on ``device`` ("cpu" or
    "cuda"), or, with ``xla``, in an XLA-compiled step there."""
    support = ops_tf.impl_support(kind, "gpu:0" if device == "cuda" else "cpu")
    refused = {impl: reason for impl, reason in support.items() if reason}
    if xla:
        refused.setdefault("native", _XLA_NATIVE_REASON)
    return refused


_XLA_NATIVE_REASON = ("XLA compiles only ops it has XLA kernels for, and our native ops "
                      "(Deepprof*) have none (XLA_CPU_JIT: 'No registered OpKernel'); with "
                      "xla=True use conv 'framework' and loss 'autograd' or 'explicit', or "
                      "xla=False to run 'native' in the graph")


@functools.lru_cache(maxsize=None)
def xla_unavailable_reason(device: str) -> Optional[str]:
    """None when this TensorFlow compiles a small training step (a conv and its gradient) with
    XLA on ``device`` ("cpu" or "cuda"), else why not: probed once per process and device, so
    a build without XLA's JIT fails at the workload's construction, not deep in its first
    step."""
    tf_device = "/GPU:0" if device == "cuda" else "/CPU:0"
    try:
        with tf.device(tf_device):
            kernel = tf.Variable(tf.ones((3, 3, 2, 2)))

            @tf.function(jit_compile=True, autograph=False)
            def probe(x):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "VALID"))
                return tape.gradient(loss, kernel)

            probe(tf.ones((1, 4, 4, 2))).numpy()
    except (tf.errors.OpError, ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"TensorFlow {tf.__version__} cannot XLA-compile on {tf_device}: {first_line}"
    return None


# ---- canonical <-> Keras layouts ---------------------------------------------------------------

def _conv_to_keras(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)          # (Cout, Cin, kh, kw) -> (kh, kw, Cin, Cout)


def _conv_to_canonical(k: np.ndarray) -> np.ndarray:
    return k.transpose(3, 2, 0, 1)


def _dense_to_keras(w: np.ndarray) -> np.ndarray:
    return w.T                              # (out, in) -> (in, out)


def _dense_to_canonical(k: np.ndarray) -> np.ndarray:
    return k.T


def flattened_dense_layouts(chw: Tuple[int, int, int]):
    """(to Keras, to canonical) for a dense layer after a Flatten: canonical input features in
    (C, H, W) order, Keras' in the (H, W, C) order of a flattened NHWC tensor."""
    c, h, w = chw

    def to_keras(weight: np.ndarray) -> np.ndarray:
        out = weight.shape[0]
        return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)

    def to_canonical(kernel: np.ndarray) -> np.ndarray:
        out = kernel.shape[1]
        return kernel.reshape(h, w, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w)
    return to_keras, to_canonical


def _identity(x: np.ndarray) -> np.ndarray:
    return x


# (canonical name, Keras variable, canonical -> Keras layout, Keras -> canonical layout)
WeightSlot = Tuple[str, object, Callable[[np.ndarray], np.ndarray],
                   Callable[[np.ndarray], np.ndarray]]


def weight_slots(named_layers, flatten_inputs: Dict[str, Tuple[int, int, int]]
                 ) -> List[WeightSlot]:
    """Every canonical weight of ``named_layers`` with its Keras variable and layout maps, in
    the canonical order (spec.parameter_shapes)."""
    slots: List[WeightSlot] = []
    for name, layer in named_layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            for suffix, variable in (("gamma", layer.gamma), ("beta", layer.beta),
                                     ("running_mean", layer.moving_mean),
                                     ("running_var", layer.moving_variance)):
                slots.append((f"{name}.{suffix}", variable, _identity, _identity))
            continue
        if isinstance(layer, keras.layers.Conv2D):
            to_keras, to_canonical = _conv_to_keras, _conv_to_canonical
        elif isinstance(layer, keras.layers.Dense):
            to_keras, to_canonical = (flattened_dense_layouts(flatten_inputs[name])
                                      if name in flatten_inputs
                                      else (_dense_to_keras, _dense_to_canonical))
        else:
            raise TypeError(f"weight_slots: {name}: no canonical mapping for "
                            f"{type(layer).__name__}")
        slots.append((f"{name}.weight", layer.kernel, to_keras, to_canonical))
        if layer.use_bias:
            slots.append((f"{name}.bias", layer.bias, _identity, _identity))
    return slots


# ---- the workload --------------------------------------------------------------------------------

_LAYOUT_NOTE = ("The Keras workload runs channels_last (NHWC) on every machine (the one layout "
                "TensorFlow's CPU conv trains in everywhere, and Keras' default; see "
                "profiler/workloads/tensorflow/common.py). With conv impl 'framework' a step "
                "transposes nothing; with 'kernel' or 'native' every conv transposes its input "
                "to NCHW ('to_nchw'), its output back ('to_nhwc') and its kernel to (Cout, Cin, "
                "kh, kw) ('kernel_to_oihw'), each a named op counted in that layer's time.")


class TensorFlowWorkload(WorkloadBase):
    """The TensorFlow/Keras half of the workload interface (see profiler.workloads.base); the
    model file supplies ``build_network()`` (a keras.Model with ``named_layers()`` and
    ``flatten_inputs``), ``input_shape`` (one NHWC sample) and ``compute_loss``.

    Graph mode (``config.mode == "graph"``): ``train_step`` runs the compiled step (module
    docstring), placed as eager steps are (``tf_device``); on a GPU (device "cuda") that path
    is written but unverified (no GPU TensorFlow where it was written)."""

    framework = "tensorflow"
    takes_xla = True
    layout_note = _LAYOUT_NOTE   # for reports: the layout choice and what it transposes
    bn_running_var_unbiased = False   # Keras' moving_variance takes the biased one (batch_norm)
    input_shape: Tuple[int, int, int] = ()

    def __init__(self, config):
        super().__init__(config)
        if config.device == "cuda" and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError(f"{type(self).__name__}: device: 'cuda' requested but this "
                               f"TensorFlow ({tf.__version__}) sees no GPU")
        if config.xla:
            reason = xla_unavailable_reason(config.device)
            if reason:
                raise RuntimeError(f"{type(self).__name__}: xla: {reason}")
        # Seeds TensorFlow's global seed and Keras' seed generator (Dropout masks) as well
        # as Python and NumPy again (with the same seed as the base).
        keras.utils.set_random_seed(config.seed)
        self.device = config.device
        self.tf_device = "/GPU:0" if config.device == "cuda" else "/CPU:0"
        self._tape: Optional[tf.GradientTape] = None
        self._recording = False
        self._grads = None
        self._host_images: Dict[int, tf.Tensor] = {}
        # Graph mode: the traced step, the batch it was traced for, and the traces of the step
        # functions set_impls threw away (compile_count counts every trace since built).
        self._step_function = None
        self._batch_specs: Optional[Tuple[tf.TensorSpec, ...]] = None
        self._retired_traces = 0
        with tf.device(self.tf_device):
            self.net = self.build_network()
            # Build every variable (eval mode: batch-norm statistics untouched).
            self.net(tf.zeros((1,) + tuple(self.input_shape), tf.float32), training=False)
            self._slots = weight_slots(self.named_layers(), self.net.flatten_inputs)
            self._trainable = [(n, v) for n, v, _, _ in self._slots if not spec.is_statistic(n)]
            self._variables = [v for _, v in self._trainable]
            self._decayed = [spec.is_decayed(n) for n, _ in self._trainable]
            self.optimizer = keras.optimizers.SGD(learning_rate=spec.LEARNING_RATE,
                                                  momentum=spec.MOMENTUM)
            self.optimizer.build(self._variables)
        self.import_weights(spec.initial_weights(config.model, config.seed))
        self.set_impls(conv=config.conv_impl, loss=config.loss_impl)

    # -- network ---------------------------------------------------------------------------
    def build_network(self) -> keras.Model:
        raise NotImplementedError

    def named_layers(self) -> List[Tuple[str, keras.layers.Layer]]:
        return self.net.named_layers()

    def unavailable_impls(self, kind: str):
        return unavailable_impls(kind, self.device, xla=self.config.xla)

    def conv_layers(self):
        return [layer for _, layer in self.named_layers() if isinstance(layer, ops_tf.Conv2D)]

    # -- weights ---------------------------------------------------------------------------
    def export_weights(self) -> Dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(to_canonical(variable.numpy()), np.float32)
                for name, variable, _, to_canonical in self._slots}

    def import_weights(self, weights) -> None:
        """Loads canonical weights (and clears the optimizer's momentum)."""
        spec.check_weights(f"{type(self).__name__}.import_weights", self.model_name, weights)
        for name, variable, to_keras, _ in self._slots:
            variable.assign(np.ascontiguousarray(
                to_keras(np.asarray(weights[name], np.float32))))
        for momentum in self.optimizer.momentums:
            momentum.assign(tf.zeros_like(momentum))

    # -- data ------------------------------------------------------------------------------
    def make_loader(self, split: str = "train", *, epochs: int = 1, shuffle=None):
        """A tf.data.Dataset over the shared plan: batches are tuples of host tf.Tensors,
        NHWC float32 images first, in the plan's order (the loader does not shuffle), the
        last partial batch dropped.

        CIFAR: the plan's arrays (index, crop, flip) go through a map written in TensorFlow
        ops (zero pad, crop, flip, * float32(1/255), standardise), bit-identical to
        data.SampleStream, so tf.data's C++ threads do the work without the GIL. DeepPose: a
        tf.numpy_function over ``SampleStream.__getitem__`` (rendering / Pillow decoding are
        Python), so its parallel map holds the GIL for most of each sample.

        ``config.workers`` > 0: the map runs ``workers`` calls at once on a private pool of
        ``workers`` threads (threads, not PyTorch's processes) and 2 * workers batches are
        prefetched (PyTorch's prefetch_factor 2 per worker). 0: no parallel map, no fusion
        and no prefetch, so each batch is made when asked for, as PyTorch's workers=0."""
        stream = self.sample_stream(split, epochs=epochs, shuffle=shuffle)
        workers = self.config.workers
        samples, sample = (self._pose_samples(stream) if self.is_pose
                           else self._cifar_samples(stream))
        options = tf.data.Options()
        options.deterministic = True
        if workers:
            samples = samples.map(sample, num_parallel_calls=workers, deterministic=True)
            options.threading.private_threadpool_size = workers
        else:
            samples = samples.map(sample)
            # tf.data's default rewrites would make this map parallel, fuse it with the
            # batching into an asynchronous op, or add a prefetch: none of that here.
            options.experimental_optimization.map_parallelization = False
            options.experimental_optimization.map_and_batch_fusion = False
            options.experimental_optimization.inject_prefetch = False
        batches = samples.batch(self.config.batch_size, drop_remainder=True)
        if workers:
            batches = batches.prefetch(2 * workers)
        return batches.with_options(options)

    def _images_nhwc(self, dataset: data.ClassificationData) -> tf.Tensor:
        """The dataset's images as one host NHWC uint8 tensor, made once per dataset."""
        key = id(dataset.images)
        if key not in self._host_images:
            with tf.device("/CPU:0"):
                self._host_images[key] = tf.constant(
                    np.ascontiguousarray(dataset.images.transpose(0, 2, 3, 1)))
        return self._host_images[key]

    def _cifar_samples(self, stream: data.SampleStream):
        """(dataset of the plan's rows, the per-sample map in TensorFlow ops)."""
        plan = stream.plan
        with tf.device("/CPU:0"):
            images = self._images_nhwc(stream.dataset)
            labels = tf.constant(stream.dataset.labels)
            scale = tf.constant(np.float32(1 / 255))     # the constant SampleStream uses
            mean = None if stream.mean is None else tf.constant(stream.mean, tf.float32)
            std = None if stream.std is None else tf.constant(stream.std, tf.float32)
        _, height, width, channels = images.shape
        pad, augment = plan.pad, plan.augment

        def sample(index, crop_y, crop_x, flip):
            image = tf.gather(images, index)
            if augment:
                image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
                image = tf.slice(image, tf.stack([crop_y, crop_x, tf.constant(0, tf.int64)]),
                                 [height, width, channels])
                image = tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)
            x = tf.cast(image, tf.float32) * scale
            if mean is not None:
                x = (x - mean) / std
            return x, tf.gather(labels, index)

        rows = tf.data.Dataset.from_tensor_slices((plan.index, plan.crop_y, plan.crop_x,
                                                   plan.flip))
        return rows, sample

    def _pose_samples(self, stream: data.SampleStream):
        """(dataset of sample numbers, the per-sample map: SampleStream in Python, then NHWC)."""
        size, coordinates = data.POSE_IMAGE_SIZE, 2 * data.POSE_JOINTS

        def load(k):
            return stream[int(k)]

        def sample(k):
            image, joints, visible = tf.numpy_function(load, [k], (tf.float32,) * 3,
                                                       stateful=False)
            image = tf.ensure_shape(image, (3, size, size))
            joints = tf.ensure_shape(joints, (coordinates,))
            visible = tf.ensure_shape(visible, (coordinates,))
            return tf.transpose(image, [1, 2, 0]), joints, visible

        return tf.data.Dataset.range(len(stream)), sample

    def to_device(self, batch):
        if self.device == "cpu":
            return batch
        with tf.device(self.tf_device):
            return tuple(tf.identity(t) for t in batch)

    def batch_to_numpy(self, batch):
        """A loader's batch as NumPy arrays in the canonical layout (images back to NCHW)."""
        images, *targets = (t.numpy() for t in batch)
        return (np.ascontiguousarray(images.transpose(0, 3, 1, 2)), *targets)

    # -- the step --------------------------------------------------------------------------
    def _stop_recording(self) -> None:
        if self._recording:
            self._recording = False
            self._tape.__exit__(None, None, None)

    def forward(self, batch):
        """Training-mode output, recorded on a fresh GradientTape (a tape left open by a
        forward without loss_forward is closed and dropped)."""
        self._refuse_in_graph_mode("forward")
        self._stop_recording()
        self._tape = tf.GradientTape()
        self._tape.__enter__()
        self._recording = True
        try:
            with tf.device(self.tf_device):
                return self.net(batch[0], training=True)
        except BaseException:
            self._stop_recording()
            self._tape = None
            raise

    def loss_forward(self, output, batch):
        """The scalar loss, still recorded; the tape stops recording afterwards."""
        self._refuse_in_graph_mode("loss_forward")
        try:
            with tf.device(self.tf_device):
                return self.compute_loss(output, batch)
        finally:
            self._stop_recording()

    def compute_loss(self, output, batch):
        raise NotImplementedError

    def backward(self, loss) -> None:
        self._refuse_in_graph_mode("backward")
        self._grads = None
        self._stop_recording()
        tape, self._tape = self._tape, None
        if tape is None:
            raise RuntimeError(f"{type(self).__name__}.backward: no recorded forward: call "
                               f"forward and loss_forward first")
        with tf.device(self.tf_device):
            self._grads = tape.gradient(loss, self._variables)

    def optimizer_step(self) -> None:
        """Keras SGD on the gradients, weight decay added first (spec.WEIGHT_DECAY_RULE)."""
        self._refuse_in_graph_mode("optimizer_step")
        if self._grads is None:
            raise RuntimeError(f"{type(self).__name__}.optimizer_step: no gradients: call "
                               f"backward first")
        with tf.device(self.tf_device):
            self._apply_update(self._grads)

    def _apply_update(self, grads) -> None:
        """The update both modes run (eagerly, or traced into the graph step): weight decay
        added to the decayed variables' gradients, then Keras SGD."""
        grads = [g + spec.WEIGHT_DECAY * v if decayed else g
                 for g, v, decayed in zip(grads, self._variables, self._decayed)]
        self.optimizer.apply_gradients(zip(grads, self._variables))

    def loss_value(self, loss) -> float:
        return float(loss)

    # -- graph mode ------------------------------------------------------------------------
    def _refuse_in_graph_mode(self, method: str) -> None:
        if self.mode == "graph":
            raise RuntimeError(
                f"{type(self).__name__}.{method}: mode 'graph' runs the whole step (forward, "
                f"loss, gradients, update) as one compiled call, which has no separate "
                f"{method}; call train_step(batch) instead (or build the workload with "
                f"mode='eager' to call forward, loss_forward, backward, optimizer_step apart)")

    @property
    def step_calls(self) -> Tuple[str, ...]:
        return ("train_step",) if self.mode == "graph" else super().step_calls

    def train_step(self, batch) -> float:
        """One training step; returns the loss as a float. Eager: the five calls; graph: one
        call of the compiled step (traced, and with XLA compiled, at the first)."""
        if self.mode != "graph":
            return super().train_step(batch)
        batch = self._graph_batch(batch)
        with tf.device(self.tf_device):
            return float(self._compiled_step()(batch))

    def _graph_batch(self, batch) -> Tuple[tf.Tensor, ...]:
        """``batch`` as tensors, checked against the shapes and dtypes the step is traced for
        (the first batch's): one signature, so same-shape batches never retrace."""
        tensors = tuple(t if isinstance(t, tf.Tensor) else tf.convert_to_tensor(t)
                        for t in batch)
        if self._batch_specs is None:
            self._batch_specs = tuple(tf.TensorSpec(t.shape, t.dtype) for t in tensors)
        elif len(tensors) != len(self._batch_specs) or not all(
                s.is_compatible_with(t) for s, t in zip(self._batch_specs, tensors)):
            expected = [(tuple(s.shape), s.dtype.name) for s in self._batch_specs]
            got = [(tuple(t.shape), t.dtype.name) for t in tensors]
            raise ValueError(f"{type(self).__name__}.train_step: batch: the graph-mode step "
                             f"takes the (shape, dtype)s of the first batch, {expected}; got "
                             f"{got} (the loaders give config.batch_size every step)")
        return tensors

    def _compiled_step(self):
        """The tf.function of the whole step, made (not yet traced) when there is none."""
        if self._step_function is None:
            def train_step(batch):
                with tf.device(self.tf_device):
                    with tf.GradientTape() as tape:
                        out = self.net(batch[0], training=True)
                        with tf.name_scope(spec.STEP_SCOPES["loss"]):
                            loss = self.compute_loss(out, batch)
                    grads = tape.gradient(loss, self._variables)
                    with tf.name_scope(spec.STEP_SCOPES["optimizer"]):
                        self._apply_update(grads)
                return loss

            # No autograph: the step has no tensor-dependent Python control flow to convert
            # (Keras' own fit step turns it off too).
            self._step_function = tf.function(train_step, input_signature=[self._batch_specs],
                                              jit_compile=self.config.xla, autograph=False)
        return self._step_function

    def compile_count(self) -> int:
        """Traces of the graph-mode step since this workload was built, summed over every step
        function it made (``set_impls`` replaces it); with XLA, each trace is compiled once, at
        its first call. 0 in eager mode and before the first graph step."""
        current = (self._step_function.experimental_get_tracing_count()
                   if self._step_function is not None else 0)
        return self._retired_traces + current

    def set_impls(self, *, conv=None, loss=None) -> None:
        """As the base's; a changed impl also drops the traced graph-mode step, which holds
        the impls it was traced with, so the next step traces it anew with the new ones."""
        before = (getattr(self, "conv_impl", None), getattr(self, "loss_impl", None))
        super().set_impls(conv=conv, loss=loss)
        if (self.conv_impl, self.loss_impl) != before and self._step_function is not None:
            self._retired_traces += self._step_function.experimental_get_tracing_count()
            self._step_function = None

    def set_learning_rate(self, lr: float) -> None:
        """Sets Keras SGD's lr, rescaling its momentum by lr / old lr: Keras' momentum holds
        -lr * PyTorch's buffer, and PyTorch applies a new lr to the whole buffer, Keras only
        to new gradients; rescaling gives PyTorch's update. (From lr 0 there is nothing to
        rescale by; Keras' momentum then stays as it is.)"""
        old = float(self.optimizer.learning_rate)
        if old != 0 and lr != old:
            factor = tf.constant(lr / old, tf.float32)
            for momentum in self.optimizer.momentums:
                momentum.assign(momentum * factor)
        self.optimizer.learning_rate = lr

    def synchronize(self) -> None:
        """Blocks until every device has run the work queued on it (GPU streams; eager ops
        when TensorFlow's asynchronous execution is on); on the CPU, synchronous eager ops
        have already run."""
        tf.test.experimental.sync_devices()

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Eval-mode output for NCHW float32 ``images`` (transposed to the model's NHWC)."""
        x = np.asarray(images, np.float32)
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__}.predict: images: expected NCHW (4-d), "
                             f"got shape {x.shape}")
        with tf.device(self.tf_device):
            return self.net(tf.transpose(tf.constant(x), [0, 2, 3, 1]), training=False).numpy()
