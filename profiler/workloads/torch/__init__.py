"""The seed workloads in PyTorch (common.py: loader, optimizer, weights; resnet.py;
deeppose.py)."""
