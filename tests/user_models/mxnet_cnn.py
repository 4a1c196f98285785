"""A user's own MXNet/Gluon model for `python -m profiler.layerwise --framework mxnet --model
tests/user_models/mxnet_cnn.py:factory` (docs/your-own-model.md): not a seed workload.

MXNet fixes its backward bulking at its first operator; the profiler wants it off (per-layer
backward ranges, profiler/instrument/mxnet.py), so a script that profiles MXNet imports
profiler.instrument.mxnet (or sets MXNET_EXEC_BULK_EXEC_TRAIN=0) before building its model."""

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn


class SmallCNN(gluon.HybridBlock):
    """Two convolutions in a HybridSequential (layers "features.0", "features.3"), global
    average pooling, a dense classifier: the PyTorch example's network (torch_cnn.py). Run
    imperatively (not hybridized) so the profiler sees each layer."""

    def __init__(self, classes: int = 10, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.features = nn.HybridSequential()
            self.features.add(nn.Conv2D(16, 3, padding=1, in_channels=3),
                              nn.Activation("relu"), nn.MaxPool2D(2),
                              nn.Conv2D(32, 3, padding=1, in_channels=16),
                              nn.Activation("relu"), nn.GlobalAvgPool2D())
            self.classifier = nn.Dense(classes, in_units=32)

    def hybrid_forward(self, F, x):
        return self.classifier(self.features(x))


def factory(samples: int = 256, batch_size: int = 32):
    """What profile_training takes: the model, a Gluon DataLoader of random CIFAR-sized
    images, Gluon's softmax cross-entropy and a Trainer over the model's parameters."""
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    model = SmallCNN()
    model.initialize(mx.init.Xavier(), ctx=mx.cpu())
    data = gluon.data.ArrayDataset(
        rng.standard_normal((samples, 3, 32, 32), dtype=np.float32),
        rng.integers(0, 10, samples).astype(np.float32))
    return dict(model=model, name="SmallCNN", framework="mxnet",
                loader=gluon.data.DataLoader(data, batch_size=batch_size, shuffle=True),
                loss_fn=gluon.loss.SoftmaxCrossEntropyLoss(),
                optimizer=gluon.Trainer(model.collect_params(), "sgd",
                                        {"learning_rate": 0.01, "momentum": 0.9}))
