"""Pre-activation ResNet-20/32/44/56 for CIFAR-10 in MXNet/Gluon (spec.parameter_shapes): every
convolution an ``ops.mxnet.Conv2D`` so ``set_impls(conv=...)`` swaps them all; Gluon's softmax
cross-entropy loss."""

from __future__ import annotations

from mxnet import gluon

import ops.mxnet as ops_mxnet

from .. import spec
from .common import MXNetWorkload, batch_norm


def conv(cin: int, cout: int, kernel: int, stride: int, prefix: str) -> ops_mxnet.Conv2D:
    return ops_mxnet.Conv2D(cout, kernel, strides=stride, padding=kernel // 2, use_bias=False,
                            in_channels=cin, prefix=prefix)


class PreActBlock(gluon.HybridBlock):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input (or, where the block changes shape,
    a 1x1 strided convolution of the pre-activated input)."""

    def __init__(self, cin: int, cout: int, stride: int, prefix: str):
        super().__init__(prefix=prefix)
        with self.name_scope():
            # Registered in PyTorch's order (named_layers and the canonical names follow it).
            self.bn1 = batch_norm(cin, "bn1_")
            self.conv1 = conv(cin, cout, 3, stride, "conv1_")
            self.bn2 = batch_norm(cout, "bn2_")
            self.conv2 = conv(cout, cout, 3, 1, "conv2_")
            self.shortcut = (conv(cin, cout, 1, stride, "shortcut_")
                             if (stride != 1 or cin != cout) else None)

    def hybrid_forward(self, F, x):
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class ResNet(gluon.HybridBlock):
    def __init__(self, model: str):
        super().__init__(prefix=f"{model}_")
        with self.name_scope():
            self.conv0 = conv(3, spec.RESNET_STAGE_CHANNELS[0], 3, 1, "conv0_")
            stages = {}
            for stage, block, cin, cout, stride in spec.resnet_blocks(model):
                if stage not in stages:
                    stages[stage] = gluon.nn.HybridSequential(prefix=f"stage{stage}_")
                    setattr(self, f"stage{stage}", stages[stage])
                with stages[stage].name_scope():
                    # register_child with a name: "block0", as PyTorch's Sequential(OrderedDict)
                    stages[stage].register_child(
                        PreActBlock(cin, cout, stride, f"block{block}_"), f"block{block}")
            self.bn_final = batch_norm(spec.RESNET_STAGE_CHANNELS[-1], "bn_final_")
            self.fc = gluon.nn.Dense(spec.CIFAR_CLASSES, in_units=spec.RESNET_STAGE_CHANNELS[-1],
                                     prefix="fc_")

    def hybrid_forward(self, F, x):
        h = self.conv0(x)
        h = self.stage3(self.stage2(self.stage1(h)))
        h = F.relu(self.bn_final(h))
        return self.fc(F.mean(h, axis=(2, 3)))  # global average pooling


class Workload(MXNetWorkload):
    """ResNet on CIFAR-10 in MXNet/Gluon (the workload interface: profiler.workloads.base)."""

    def build_network(self):
        self.criterion = gluon.loss.SoftmaxCrossEntropyLoss(sparse_label=True)
        return ResNet(self.model_name)

    def compute_loss(self, output, batch):
        # Per-sample losses -> their batch mean (the loss the Trainer's step(1) expects). The
        # int64 labels are used as they come: pick takes any index dtype.
        return self.criterion(output, batch[1]).mean()
