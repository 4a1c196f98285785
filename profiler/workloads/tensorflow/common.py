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
- Step: eager. ``forward`` opens a GradientTape, ``loss_forward`` closes it and ``backward``
  asks it for the gradients, so forward, loss and backward run (and are timed) apart, as in
  PyTorch.
- Optimizer: ``keras.optimizers.SGD``, whose momentum update (m <- momentum*m - lr*g;
  w <- w + m) equals PyTorch's (buf <- momentum*buf + g; w <- w - lr*buf) while lr stays
  constant (m = -lr*buf); see :meth:`TensorFlowWorkload.set_learning_rate` for a change of lr.
  Weight decay is added to the decayed variables' gradients by hand (spec.WEIGHT_DECAY_RULE).
- Batch norm: see :func:`batch_norm` (the moving variance is not bias-corrected).
"""

from __future__ import annotations

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


def unavailable_impls(kind: str, device: str) -> Dict[str, str]:
    """impl -> reason for those of ``kind`` that do not run eagerly on ``device`` ("cpu" or
    "cuda")."""
    support = ops_tf.impl_support(kind, "gpu:0" if device == "cuda" else "cpu")
    return {impl: reason for impl, reason in support.items() if reason}


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
    ``flatten_inputs``), ``input_shape`` (one NHWC sample) and ``compute_loss``."""

    framework = "tensorflow"
    layout_note = _LAYOUT_NOTE   # for reports: the layout choice and what it transposes
    bn_running_var_unbiased = False   # Keras' moving_variance takes the biased one (batch_norm)
    input_shape: Tuple[int, int, int] = ()

    def __init__(self, config):
        super().__init__(config)
        if config.device == "cuda" and not tf.config.list_physical_devices("GPU"):
            raise RuntimeError(f"{type(self).__name__}: device: 'cuda' requested but this "
                               f"TensorFlow ({tf.__version__}) sees no GPU")
        # Seeds TensorFlow's global seed and Keras' seed generator (Dropout masks) as well
        # as Python and NumPy again (with the same seed as the base).
        keras.utils.set_random_seed(config.seed)
        self.device = config.device
        self.tf_device = "/GPU:0" if config.device == "cuda" else "/CPU:0"
        self._tape: Optional[tf.GradientTape] = None
        self._recording = False
        self._grads = None
        self._host_images: Dict[int, tf.Tensor] = {}
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
        return unavailable_impls(kind, self.device)

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
        try:
            with tf.device(self.tf_device):
                return self.compute_loss(output, batch)
        finally:
            self._stop_recording()

    def compute_loss(self, output, batch):
        raise NotImplementedError

    def backward(self, loss) -> None:
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
        if self._grads is None:
            raise RuntimeError(f"{type(self).__name__}.optimizer_step: no gradients: call "
                               f"backward first")
        with tf.device(self.tf_device):
            grads = [g + spec.WEIGHT_DECAY * v if decayed else g
                     for g, v, decayed in zip(self._grads, self._variables, self._decayed)]
            self.optimizer.apply_gradients(zip(grads, self._variables))

    def loss_value(self, loss) -> float:
        return float(loss)

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
