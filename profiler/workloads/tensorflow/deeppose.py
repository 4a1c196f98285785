"""DeepPose's AlexNet in Keras (spec.ALEXNET_CONVS), channels last: five
``ops.tensorflow.Conv2D`` (each after an explicit symmetric zero padding) with ReLU and
max-pooling, fc6/fc7 (4096, ReLU, dropout), fc8 (2 x 14 joint coordinates); trained with
``ops.tensorflow.deeppose_loss``, whose impl ``set_impls(loss=...)`` picks."""

from __future__ import annotations

import math

import keras

import ops.tensorflow as ops_tf

from .. import data, spec
from .common import TensorFlowWorkload, dense, padded_conv


class AlexNet(keras.Model):
    """DeepPose's AlexNet (NHWC in, joint coordinates out); layers carry the canonical names."""

    # fc6 takes the flattened conv5 pool: canonical input order (C, H, W), Keras' (H, W, C).
    flatten_inputs = {"fc6": (spec.ALEXNET_CONVS[-1][1],)
                      + (math.isqrt(spec.ALEXNET_FLAT // spec.ALEXNET_CONVS[-1][1]),) * 2}

    def __init__(self, dropout: float):
        super().__init__(name="deeppose")
        self.conv_names = []
        for name, cout, k, stride, pad, pool in spec.ALEXNET_CONVS:
            padding, conv = padded_conv(name, cout, k, stride=stride, padding=pad)
            setattr(self, f"{name}_pad", padding)
            setattr(self, name, conv)
            # Max pool 3/2, "valid": PyTorch's floor mode without padding.
            setattr(self, f"{name}_pool", keras.layers.MaxPooling2D(
                3, strides=2, padding="valid", name=f"{name}.pool") if pool else None)
            self.conv_names.append(name)
        self.flatten = keras.layers.Flatten(name="flatten")
        self.fc6 = dense("fc6", spec.ALEXNET_HIDDEN)
        self.fc6_dropout = keras.layers.Dropout(dropout, name="fc6.dropout")
        self.fc7 = dense("fc7", spec.ALEXNET_HIDDEN)
        self.fc7_dropout = keras.layers.Dropout(dropout, name="fc7.dropout")
        self.fc8 = dense("fc8", 2 * spec.POSE_JOINTS)

    def call(self, x, training=None):
        h = x
        for name in self.conv_names:
            padding, pool = getattr(self, f"{name}_pad"), getattr(self, f"{name}_pool")
            h = keras.ops.relu(getattr(self, name)(h if padding is None else padding(h)))
            if pool is not None:
                h = pool(h)
        h = self.flatten(h)
        h = self.fc6_dropout(keras.ops.relu(self.fc6(h)), training=training)
        h = self.fc7_dropout(keras.ops.relu(self.fc7(h)), training=training)
        return self.fc8(h)

    def named_layers(self):
        """(canonical name, layer) of every layer with weights, in forward order."""
        return ([(name, getattr(self, name)) for name in self.conv_names]
                + [("fc6", self.fc6), ("fc7", self.fc7), ("fc8", self.fc8)])


class Workload(TensorFlowWorkload):
    """DeepPose on LSP in TensorFlow/Keras (the workload interface: profiler.workloads.base)."""

    input_shape = (data.POSE_IMAGE_SIZE, data.POSE_IMAGE_SIZE, 3)    # NHWC sample

    def build_network(self):
        return AlexNet(self.config.dropout)

    def compute_loss(self, output, batch):
        return ops_tf.deeppose_loss(output, batch[1], batch[2], impl=self.loss_impl)
