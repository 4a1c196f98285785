"""A user's own PyTorch model for `python -m profiler.layerwise --model
tests/user_models/torch_cnn.py:factory` (docs/your-own-model.md): not a seed workload."""

import torch


class SmallCNN(torch.nn.Module):
    """Two convolutions in a Sequential, global pooling, a linear classifier."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1))
        self.classifier = torch.nn.Linear(32, classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


# conv= values: torch.nn.Conv2d's own convolution, or ops.torch.Conv2d's impls.
CONVS = {"torch": None, "kernel": "kernel", "native": "native"}


def factory(samples: int = 256, batch_size: int = 32, conv: str = "torch"):
    """What profile_training takes: the model, a DataLoader of random CIFAR-sized images, the
    loss and an optimizer. ``conv``: "torch" (the model as written), or "kernel" / "native"
    (its Conv2d layers swapped for ours, same weights), for ``--compare conv=torch,kernel``."""
    if conv not in CONVS:
        raise ValueError(f"torch_cnn.factory: conv: expected one of {list(CONVS)}, got "
                         f"{conv!r}")
    torch.manual_seed(0)
    model = SmallCNN()
    if CONVS[conv]:
        from ops.torch import swap_conv2d
        model = swap_conv2d(model, impl=CONVS[conv])
    data = torch.utils.data.TensorDataset(torch.randn(samples, 3, 32, 32),
                                          torch.randint(0, 10, (samples,)))
    return dict(model=model, name="SmallCNN",
                loader=torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True),
                loss_fn=torch.nn.functional.cross_entropy,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))


def not_a_factory():
    return [1, 2, 3]
