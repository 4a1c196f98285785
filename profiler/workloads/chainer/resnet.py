"""Pre-activation ResNet-20/32/44/56 for CIFAR-10 in Chainer (spec.parameter_shapes): every
convolution an ``ops.chainer.Convolution2D`` so ``set_impls(conv=...)`` swaps them all;
softmax cross-entropy loss."""

from __future__ import annotations

from collections import OrderedDict

from .. import spec
from .common import ChainerWorkload, batch_norm, chainer, convolution, linear

F = chainer.functions


def conv(cin: int, cout: int, kernel: int, stride: int):
    return convolution(cin, cout, kernel, stride=stride, pad=kernel // 2, bias=False)


class PreActBlock(chainer.Chain):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input (or, where the block changes shape,
    a 1x1 strided convolution of the pre-activated input)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        with self.init_scope():
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


class Stage(chainer.Chain):
    """Blocks applied in order under the canonical names block0, block1, ... (a
    chainer.Sequential would name its children 0, 1, ...)."""

    def __init__(self, blocks: "OrderedDict[str, PreActBlock]"):
        super().__init__()
        self.block_names = list(blocks)
        with self.init_scope():
            for name, block in blocks.items():
                setattr(self, name, block)

    def forward(self, x):
        for name in self.block_names:
            x = getattr(self, name)(x)
        return x


class ResNet(chainer.Chain):
    def __init__(self, model: str):
        super().__init__()
        stages = OrderedDict()
        for stage, block, cin, cout, stride in spec.resnet_blocks(model):
            stages.setdefault(f"stage{stage}", OrderedDict())[f"block{block}"] = \
                PreActBlock(cin, cout, stride)
        self.stage_names = list(stages)
        with self.init_scope():
            self.conv0 = conv(3, spec.RESNET_STAGE_CHANNELS[0], 3, 1)
            for name, blocks in stages.items():
                setattr(self, name, Stage(blocks))
            self.bn_final = batch_norm(spec.RESNET_STAGE_CHANNELS[-1])
            self.fc = linear(spec.RESNET_STAGE_CHANNELS[-1], spec.CIFAR_CLASSES)

    def forward(self, x):
        h = self.conv0(x)
        for name in self.stage_names:
            h = getattr(self, name)(h)
        h = F.relu(self.bn_final(h))
        return self.fc(F.mean(h, axis=(2, 3)))


class Workload(ChainerWorkload):
    """ResNet on CIFAR-10 in Chainer (the workload interface: profiler.workloads.base)."""

    def build_network(self):
        return ResNet(self.model_name)

    def loss_forward(self, output, batch):
        # Mean over the batch: normalize=True divides by the count of labels not equal to
        # ignore_label (-1), which CIFAR labels never are.
        return F.softmax_cross_entropy(output, batch[1])
