"""DeepPose's AlexNet in MXNet/Gluon (spec.ALEXNET_CONVS): five ``ops.mxnet.Conv2D`` with ReLU
and max-pooling, fc6/fc7 (4096, ReLU, dropout), fc8 (2 x 14 joint coordinates); trained with
``ops.mxnet.deeppose_loss``, whose impl ``set_impls(loss=...)`` picks."""

from __future__ import annotations

from mxnet import gluon

import ops.mxnet as ops_mxnet

from .. import spec
from .common import MXNetWorkload


class AlexNet(gluon.HybridBlock):
    def __init__(self, dropout: float):
        super().__init__(prefix="deeppose_")
        cin, self.pool_after = 3, {}
        with self.name_scope():
            for name, cout, k, stride, pad, pool in spec.ALEXNET_CONVS:
                setattr(self, name, ops_mxnet.Conv2D(cout, k, strides=stride, padding=pad,
                                                     in_channels=cin, prefix=f"{name}_"))
                self.pool_after[name] = pool
                cin = cout
            # flatten=True flattens NCHW in (C, H, W) order: the canonical fc6 layout.
            self.fc6 = gluon.nn.Dense(spec.ALEXNET_HIDDEN, in_units=spec.ALEXNET_FLAT,
                                      flatten=True, prefix="fc6_")
            self.fc7 = gluon.nn.Dense(spec.ALEXNET_HIDDEN, in_units=spec.ALEXNET_HIDDEN,
                                      prefix="fc7_")
            self.fc8 = gluon.nn.Dense(2 * spec.POSE_JOINTS, in_units=spec.ALEXNET_HIDDEN,
                                      prefix="fc8_")
        self.dropout = dropout

    def hybrid_forward(self, F, x):
        h = x
        for name, pool in self.pool_after.items():
            h = F.relu(getattr(self, name)(h))
            if pool:
                # 'valid': floor((n - 3) / 2) + 1, PyTorch's max_pool2d (no padding, no ceil)
                h = F.Pooling(h, kernel=(3, 3), stride=(2, 2), pool_type="max",
                              pooling_convention="valid")
        # Dropout is active only in training mode (autograd.record), as in PyTorch's
        # F.dropout(training=self.training).
        h = F.Dropout(F.relu(self.fc6(h)), p=self.dropout)
        h = F.Dropout(F.relu(self.fc7(h)), p=self.dropout)
        return self.fc8(h)


class Workload(MXNetWorkload):
    """DeepPose on LSP in MXNet/Gluon (the workload interface: profiler.workloads.base)."""

    def build_network(self):
        return AlexNet(self.config.dropout)

    def compute_loss(self, output, batch):
        return ops_mxnet.deeppose_loss(output, batch[1], batch[2], impl=self.loss_impl)
