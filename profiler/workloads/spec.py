"""The two seed networks, framework-free: canonical parameter names and shapes, the shared
initial weights, and the training hyper-parameters every framework must use alike.

Canonical layout (what every workload's ``export_weights`` returns and ``import_weights``
takes, float32 NumPy arrays):

| layer | names | shapes |
| --- | --- | --- |
| convolution | ``<layer>.weight`` [, ``<layer>.bias``] | (Cout, Cin, kh, kw), (Cout,) |
| dense | ``<layer>.weight``, ``<layer>.bias`` | (out, in), (out,); a dense layer after a
  flatten takes its input in NCHW order (C, H, W) |
| batch norm | ``<layer>.gamma``, ``.beta``, ``.running_mean``, ``.running_var`` | (C,) each |

Frameworks differ in their defaults (batch-norm epsilon 1e-5 / 2e-5 / 1e-3, running-average
momentum conventions, He vs Glorot initialisers, weight layouts), so every workload sets the
values below explicitly and starts from :func:`initial_weights`, drawn here once in NumPy:
the same seed gives the same starting network in every framework.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Tuple

import numpy as np

RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}   # n: 6n+2 layers
MODELS = tuple(RESNET_DEPTHS) + ("deeppose",)
RESNET_STAGE_CHANNELS = (16, 32, 64)
CIFAR_CLASSES = 10

# DeepPose's AlexNet trunk (Krizhevsky et al. channel widths), no LRN: LRN's parameters mean
# different things in each framework and modern AlexNets drop it. 220x220 input:
# conv1 11x11/4 pad 2 -> 54, pool 3/2 -> 26, conv2 5x5 pad 2 -> 26, pool -> 12,
# conv3..5 3x3 pad 1 -> 12, pool -> 5: fc6 takes 256 * 5 * 5.
ALEXNET_CONVS = (  # name, Cout, kernel, stride, padding, max-pool 3/2 after
    ("conv1", 96, 11, 4, 2, True),
    ("conv2", 256, 5, 1, 2, True),
    ("conv3", 384, 3, 1, 1, False),
    ("conv4", 384, 3, 1, 1, False),
    ("conv5", 256, 3, 1, 1, True),
)
ALEXNET_FLAT = 256 * 5 * 5
ALEXNET_HIDDEN = 4096
POSE_JOINTS = 14


# Training hyper-parameters, identical in every framework.
LEARNING_RATE = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
LR_DROPS = (0.5, 0.75)        # lr / 10 at 50% and at 75% of the training steps
BN_EPSILON = 1e-5
# Running statistics: running = BN_DECAY * running + (1 - BN_DECAY) * batch (Chainer's
# decay, Keras' and MXNet's momentum; PyTorch's momentum is 1 - BN_DECAY).
BN_DECAY = 0.9
DROPOUT = 0.5                 # DeepPose's fc6 and fc7

WEIGHT_DECAY_RULE = (
    "coupled L2 in the optimizer: g <- g + weight_decay * w before the momentum update, on "
    "convolution and dense weights only (not biases, not batch-norm parameters). PyTorch: SGD "
    "weight_decay in a parameter group of those weights; Chainer: a WeightDecay hook on their "
    "update rules; MXNet: Trainer wd with wd_mult 0 on the others; Keras: added to those "
    "gradients before SGD.apply_gradients (Keras' kernel_regularizer would put wd*|w|^2 in the "
    "loss instead, a gradient of 2*wd*w, and Keras 3's SGD(weight_decay) decays decoupled from "
    "the gradient: neither is the same update)")


def resnet_blocks(model: str):
    """(stage, block, in_channels, out_channels, stride) of every residual block."""
    if model not in RESNET_DEPTHS:
        raise ValueError(f"resnet_blocks: model: expected one of {sorted(RESNET_DEPTHS)}, got "
                         f"{model!r}")
    n = RESNET_DEPTHS[model]
    blocks, cin = [], RESNET_STAGE_CHANNELS[0]
    for s, cout in enumerate(RESNET_STAGE_CHANNELS, start=1):
        for b in range(n):
            stride = 2 if (b == 0 and s > 1) else 1
            blocks.append((s, b, cin, cout, stride))
            cin = cout
    return blocks


def block_name(stage: int, block: int) -> str:
    return f"stage{stage}.block{block}"


def _bn(shapes, name, c):
    for suffix in ("gamma", "beta", "running_mean", "running_var"):
        shapes[f"{name}.{suffix}"] = (c,)


def parameter_shapes(model: str) -> "OrderedDict[str, Tuple[int, ...]]":
    """Canonical name -> shape of every weight, batch-norm statistics included, in forward
    order.

    ResNet (pre-activation, He et al. 2016): conv0 3x3 16; per block BN-ReLU-conv3x3-BN-ReLU-
    conv3x3 with a 1x1 stride-2 "shortcut" convolution where a stage halves the resolution
    (taking the block's pre-activated input); then BN-ReLU, global average pooling and fc.
    Convolutions have no bias (a batch norm follows each)."""
    shapes: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()
    if model == "deeppose":
        cin = 3
        for name, cout, k, _, _, _ in ALEXNET_CONVS:
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)
            cin = cout
        for name, fin, fout in (("fc6", ALEXNET_FLAT, ALEXNET_HIDDEN),
                                ("fc7", ALEXNET_HIDDEN, ALEXNET_HIDDEN),
                                ("fc8", ALEXNET_HIDDEN, 2 * POSE_JOINTS)):
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (fout, fin), (fout,)
        return shapes
    shapes["conv0.weight"] = (RESNET_STAGE_CHANNELS[0], 3, 3, 3)
    for stage, block, cin, cout, stride in resnet_blocks(model):
        name = block_name(stage, block)
        _bn(shapes, f"{name}.bn1", cin)
        shapes[f"{name}.conv1.weight"] = (cout, cin, 3, 3)
        _bn(shapes, f"{name}.bn2", cout)
        shapes[f"{name}.conv2.weight"] = (cout, cout, 3, 3)
        if stride != 1 or cin != cout:
            shapes[f"{name}.shortcut.weight"] = (cout, cin, 1, 1)
    _bn(shapes, "bn_final", RESNET_STAGE_CHANNELS[-1])
    shapes["fc.weight"] = (CIFAR_CLASSES, RESNET_STAGE_CHANNELS[-1])
    shapes["fc.bias"] = (CIFAR_CLASSES,)
    return shapes


def is_statistic(name: str) -> bool:
    """Batch-norm running statistics: state, not trainable parameters."""
    return name.endswith(".running_mean") or name.endswith(".running_var")


def is_decayed(name: str) -> bool:
    """Weight decay applies to convolution and dense weights only (see WEIGHT_DECAY_RULE)."""
    return name.endswith(".weight")


def parameter_count(model: str) -> int:
    """Trainable parameters (running statistics excluded)."""
    return int(sum(np.prod(s) for n, s in parameter_shapes(model).items()
                   if not is_statistic(n)))


def initial_weights(model: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """The shared starting point: He-normal weights (std sqrt(2 / fan_in)), zero biases,
    batch norm gamma 1, beta 0, mean 0, var 1; float32, deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 0x5EED])
    weights = {}
    for name, shape in parameter_shapes(model).items():
        if name.endswith(".weight"):
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        elif name.endswith((".gamma", ".running_var")):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        weights[name] = value.astype(np.float32)
    return weights


def check_weights(function: str, model: str, weights: Mapping[str, np.ndarray]) -> None:
    """``weights`` must hold exactly the model's canonical names with their shapes."""
    shapes = parameter_shapes(model)
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise ValueError(f"{function}: weights: expected the {len(shapes)} canonical names of "
                         f"{model}; missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for name, shape in shapes.items():
        got = np.shape(weights[name])
        if tuple(got) != tuple(shape):
            raise ValueError(f"{function}: weights[{name!r}]: expected shape {shape}, got "
                             f"{tuple(got)}")


def learning_rate(step: int, total_steps: int, initial: float = LEARNING_RATE) -> float:
    """The step's learning rate: ``initial``, / 10 from 50% of ``total_steps``, / 100 from
    75%."""
    drops = sum(step >= int(f * total_steps) for f in LR_DROPS)
    return initial * 0.1 ** drops

# Name scopes a compiled training step puts its loss and its update in (TensorFlow's graph
# step): the ops' names carry them, so a trace of the step can tell the loss's and the
# optimizer's ops from the model's (profiler.instrument.tensorflow_trace). They cost nothing.
STEP_SCOPES = {"loss": "deepprof.loss", "optimizer": "deepprof.optimizer"}
