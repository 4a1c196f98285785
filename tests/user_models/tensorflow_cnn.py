"""A user's own Keras model for `python -m profiler.layerwise --framework tensorflow --model
tests/user_models/tensorflow_cnn.py:factory` (docs/your-own-model.md): not a seed workload.
Subclassed, with blocks of its own, so its layers are named by their nesting
("block1/conv")."""

import keras
import numpy as np
import tensorflow as tf


class ConvBlock(keras.layers.Layer):
    """Convolution, batch norm, ReLU (channels_last, Keras' default)."""

    def __init__(self, filters: int, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name="conv")
        self.bn = keras.layers.BatchNormalization(name="bn")

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


class SmallCNN(keras.Model):
    """Two conv blocks with max-pooling between, global pooling, a dense classifier."""

    def __init__(self, classes: int = 10):
        super().__init__(name="small_cnn")
        self.block1 = ConvBlock(16, name="block1")
        self.pool = keras.layers.MaxPooling2D(2, name="pool")
        self.block2 = ConvBlock(32, name="block2")
        self.gap = keras.layers.GlobalAveragePooling2D(name="gap")
        self.classifier = keras.layers.Dense(classes, name="classifier")

    def call(self, x, training=None):
        h = self.block2(self.pool(self.block1(x, training=training)), training=training)
        return self.classifier(self.gap(h))


def factory(samples: int = 256, batch_size: int = 32):
    """What profile_training takes: the model (built: Keras makes weights at the first call),
    a tf.data pipeline of random CIFAR-sized NHWC images, the loss and an optimizer."""
    keras.utils.set_random_seed(0)
    model = SmallCNN()
    model(tf.zeros((1, 32, 32, 3)))
    rng = np.random.default_rng(0)
    images = rng.standard_normal((samples, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, samples)
    loader = (tf.data.Dataset.from_tensor_slices((images, labels))
              .shuffle(samples, seed=0).batch(batch_size, drop_remainder=True))
    return dict(model=model, name="SmallCNN", framework="tensorflow", loader=loader,
                loss_fn=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9))


def not_a_factory():
    return [1, 2, 3]
