"""DeepPose's AlexNet in PyTorch (spec.ALEXNET_CONVS): five ``ops.torch.Conv2d`` with ReLU
and max-pooling, fc6/fc7 (4096, ReLU, dropout), fc8 (2 x 14 joint coordinates); trained with
``ops.torch.deeppose_loss``, whose impl ``set_impls(loss=...)`` picks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ops.torch as ops_torch

from .. import spec
from .common import TorchWorkload


class AlexNet(torch.nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        cin, self.pool_after = 3, {}
        for name, cout, k, stride, pad, pool in spec.ALEXNET_CONVS:
            self.add_module(name, ops_torch.Conv2d(cin, cout, k, stride=stride, padding=pad))
            self.pool_after[name] = pool
            cin = cout
        self.fc6 = torch.nn.Linear(spec.ALEXNET_FLAT, spec.ALEXNET_HIDDEN)
        self.fc7 = torch.nn.Linear(spec.ALEXNET_HIDDEN, spec.ALEXNET_HIDDEN)
        self.fc8 = torch.nn.Linear(spec.ALEXNET_HIDDEN, 2 * spec.POSE_JOINTS)
        self.dropout = dropout

    def forward(self, x):
        h = x
        for name, pool in self.pool_after.items():
            h = F.relu(getattr(self, name)(h))
            if pool:
                h = F.max_pool2d(h, 3, stride=2)
        h = torch.flatten(h, 1)
        h = F.dropout(F.relu(self.fc6(h)), self.dropout, self.training)
        h = F.dropout(F.relu(self.fc7(h)), self.dropout, self.training)
        return self.fc8(h)


class Workload(TorchWorkload):
    """DeepPose on LSP in PyTorch (the workload interface: profiler.workloads.base)."""

    def build_network(self):
        return AlexNet(self.config.dropout)

    def loss_forward(self, output, batch):
        return ops_torch.deeppose_loss(output, batch[1], batch[2], impl=self.loss_impl)
