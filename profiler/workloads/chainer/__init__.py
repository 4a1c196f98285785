"""The seed workloads in Chainer (common.py: loader, optimizer, weights; resnet.py; deeppose.py)."""
