"""DeepPose's AlexNet in Chainer (spec.ALEXNET_CONVS): five ``ops.chainer.Convolution2D`` with
ReLU and max-pooling, fc6/fc7 (4096, ReLU, dropout), fc8 (2 x 14 joint coordinates); trained
with ``ops.chainer.deeppose_loss``, whose impl ``set_impls(loss=...)`` picks."""

from __future__ import annotations

import ops.chainer as ops_chainer

from .. import spec
from .common import ChainerWorkload, chainer, convolution, linear

F = chainer.functions


class AlexNet(chainer.Chain):
    def __init__(self, dropout: float):
        super().__init__()
        cin, self.pool_after = 3, {}
        with self.init_scope():
            for name, cout, k, stride, pad, pool in spec.ALEXNET_CONVS:
                setattr(self, name, convolution(cin, cout, k, stride=stride, pad=pad,
                                                bias=True))
                self.pool_after[name] = pool
                cin = cout
            self.fc6 = linear(spec.ALEXNET_FLAT, spec.ALEXNET_HIDDEN)
            self.fc7 = linear(spec.ALEXNET_HIDDEN, spec.ALEXNET_HIDDEN)
            self.fc8 = linear(spec.ALEXNET_HIDDEN, 2 * spec.POSE_JOINTS)
        self.dropout = dropout

    def forward(self, x):
        h = x
        for name, pool in self.pool_after.items():
            h = F.relu(getattr(self, name)(h))
            if pool:
                # cover_all=False: Chainer's default (True) rounds the output size up (a
                # ceil-mode pool), 54 -> 27 instead of PyTorch's 26.
                h = F.max_pooling_2d(h, 3, stride=2, cover_all=False)
        # fc6 (L.Linear) flattens (B, 256, 5, 5) in C, H, W order, as torch.flatten does.
        # F.dropout is active only under chainer.config.train.
        h = F.dropout(F.relu(self.fc6(h)), self.dropout)
        h = F.dropout(F.relu(self.fc7(h)), self.dropout)
        return self.fc8(h)


class Workload(ChainerWorkload):
    """DeepPose on LSP in Chainer (the workload interface: profiler.workloads.base)."""

    def build_network(self):
        return AlexNet(self.config.dropout)

    def loss_forward(self, output, batch):
        return ops_chainer.deeppose_loss(output, batch[1], batch[2], impl=self.loss_impl)
