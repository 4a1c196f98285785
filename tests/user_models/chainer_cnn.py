"""A user's own Chainer model for `python -m profiler.layerwise --framework chainer --model
tests/user_models/chainer_cnn.py:factory` (docs/your-own-model.md): not a seed workload.

Chainer comes from ops.chainer.loader.load_chainer: on this project's machines a bare
``import chainer`` fails in Chainer's import-time environment check (ops/chainer/loader.py says
why); elsewhere ``import chainer`` is the same thing."""

import numpy as np

from ops.chainer.loader import load_chainer

chainer = load_chainer()
F, L = chainer.functions, chainer.links


class SmallCNN(chainer.Chain):
    """Two convolutions in a ChainList (layers "features.0", "features.1"), global average
    pooling, a linear classifier: the PyTorch example's network (torch_cnn.py)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        with self.init_scope():
            self.features = chainer.ChainList(L.Convolution2D(3, 16, 3, pad=1),
                                              L.Convolution2D(16, 32, 3, pad=1))
            self.classifier = L.Linear(32, classes)

    def forward(self, x):
        conv1, conv2 = self.features
        h = F.max_pooling_2d(F.relu(conv1(x)), 2)
        h = F.average(F.relu(conv2(h)), axis=(2, 3))
        return self.classifier(h)


def factory(samples: int = 256, batch_size: int = 32):
    """What profile_training takes: the model, Chainer's SerialIterator over random
    CIFAR-sized images (lists of examples, as Chainer's iterators give them), the loss and a
    MomentumSGD set up on the model."""
    rng = np.random.default_rng(0)
    model = SmallCNN()
    data = chainer.datasets.TupleDataset(
        rng.standard_normal((samples, 3, 32, 32), dtype=np.float32),
        rng.integers(0, 10, samples).astype(np.int32))
    optimizer = chainer.optimizers.MomentumSGD(lr=0.01, momentum=0.9)
    optimizer.setup(model)
    return dict(model=model, name="SmallCNN", framework="chainer",
                loader=chainer.iterators.SerialIterator(data, batch_size, shuffle=True),
                loss_fn=F.softmax_cross_entropy, optimizer=optimizer)
