"""Pre-activation ResNet-20/32/44/56 for CIFAR-10 in PyTorch (spec.parameter_shapes): every
convolution an ``ops.torch.Conv2d`` so ``set_impls(conv=...)`` swaps them all; softmax
cross-entropy loss."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

import ops.torch as ops_torch

from .. import spec
from .common import TorchWorkload, batch_norm


def conv(cin: int, cout: int, kernel: int, stride: int) -> ops_torch.Conv2d:
    return ops_torch.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


class PreActBlock(torch.nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input (or, where the block changes shape,
    a 1x1 strided convolution of the pre-activated input)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = batch_norm(cin)
        self.conv1 = conv(cin, cout, 3, stride)
        self.bn2 = batch_norm(cout)
        self.conv2 = conv(cout, cout, 3, 1)
        self.shortcut = conv(cin, cout, 1, stride) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(torch.nn.Module):
    def __init__(self, model: str):
        super().__init__()
        self.conv0 = conv(3, spec.RESNET_STAGE_CHANNELS[0], 3, 1)
        stages = OrderedDict()
        for stage, block, cin, cout, stride in spec.resnet_blocks(model):
            stages.setdefault(f"stage{stage}", OrderedDict())[f"block{block}"] = \
                PreActBlock(cin, cout, stride)
        for name, blocks in stages.items():
            self.add_module(name, torch.nn.Sequential(blocks))
        self.bn_final = batch_norm(spec.RESNET_STAGE_CHANNELS[-1])
        self.fc = torch.nn.Linear(spec.RESNET_STAGE_CHANNELS[-1], spec.CIFAR_CLASSES)

    def forward(self, x):
        h = self.conv0(x)
        h = self.stage3(self.stage2(self.stage1(h)))
        h = F.relu(self.bn_final(h))
        return self.fc(h.mean(dim=(2, 3)))


class Workload(TorchWorkload):
    """ResNet on CIFAR-10 in PyTorch (the workload interface: profiler.workloads.base)."""

    def build_network(self):
        return ResNet(self.model_name)

    def loss_forward(self, output, batch):
        return F.cross_entropy(output, batch[1])
