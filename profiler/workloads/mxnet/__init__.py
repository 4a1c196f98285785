"""The seed workloads in MXNet/Gluon (common.py: loader, optimizer, weights; resnet.py;
deeppose.py)."""
