"""Pre-activation ResNet-20/32/44/56 for CIFAR-10 in Keras (spec.parameter_shapes), channels
last: every convolution an ``ops.tensorflow.Conv2D`` (after an explicit symmetric zero padding)
so ``set_impls(conv=...)`` swaps them all; Keras' softmax cross-entropy loss."""

from __future__ import annotations

import keras

from .. import data, spec
from .common import TensorFlowWorkload, batch_norm, dense, padded_conv


class PreActBlock(keras.layers.Layer):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input (or, where the block changes shape,
    a 1x1 strided convolution of the pre-activated input)."""

    def __init__(self, name: str, cin: int, cout: int, stride: int):
        super().__init__(name=name)
        self.bn1 = batch_norm(f"{name}.bn1")
        self.pad1, self.conv1 = padded_conv(f"{name}.conv1", cout, 3, stride=stride,
                                            padding=1, use_bias=False)
        self.bn2 = batch_norm(f"{name}.bn2")
        self.pad2, self.conv2 = padded_conv(f"{name}.conv2", cout, 3, padding=1,
                                            use_bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            _, self.shortcut = padded_conv(f"{name}.shortcut", cout, 1, stride=stride,
                                           use_bias=False)

    def call(self, x, training=None):
        pre = keras.ops.relu(self.bn1(x, training=training))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(self.pad1(pre))
        out = self.conv2(self.pad2(keras.ops.relu(self.bn2(out, training=training))))
        return out + skip

    def named_layers(self):
        """(canonical name, layer) of the block's layers with weights, in forward order."""
        layers = [(self.bn1.name, self.bn1), (self.conv1.name, self.conv1),
                  (self.bn2.name, self.bn2), (self.conv2.name, self.conv2)]
        if self.shortcut is not None:
            layers.append((self.shortcut.name, self.shortcut))
        return layers


class ResNet(keras.Model):
    """The pre-activation ResNet (NHWC in, logits out); layers carry the canonical names."""

    flatten_inputs = {}      # fc follows global average pooling: no flattened input

    def __init__(self, model: str):
        super().__init__(name=model)
        self.pad0, self.conv0 = padded_conv("conv0", spec.RESNET_STAGE_CHANNELS[0], 3,
                                            padding=1, use_bias=False)
        self.blocks = [PreActBlock(spec.block_name(stage, block), cin, cout, stride)
                       for stage, block, cin, cout, stride in spec.resnet_blocks(model)]
        self.bn_final = batch_norm("bn_final")
        self.pool = keras.layers.GlobalAveragePooling2D(name="pool")
        self.fc = dense("fc", spec.CIFAR_CLASSES)

    def call(self, x, training=None):
        h = self.conv0(self.pad0(x))
        for block in self.blocks:
            h = block(h, training=training)
        h = keras.ops.relu(self.bn_final(h, training=training))
        return self.fc(self.pool(h))

    def named_layers(self):
        """(canonical name, layer) of every layer with weights, in forward order."""
        layers = [("conv0", self.conv0)]
        for block in self.blocks:
            layers += block.named_layers()
        return layers + [("bn_final", self.bn_final), ("fc", self.fc)]


class Workload(TensorFlowWorkload):
    """ResNet on CIFAR-10 in TensorFlow/Keras (the workload interface:
    profiler.workloads.base)."""

    input_shape = data.CIFAR_IMAGE_SHAPE[1:] + data.CIFAR_IMAGE_SHAPE[:1]   # NHWC sample

    def build_network(self):
        self._cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        return ResNet(self.model_name)

    def compute_loss(self, output, batch):
        """Keras' softmax cross-entropy on the logits, mean over the batch."""
        return self._cross_entropy(batch[1], output)
