"""Process-wide settings the tests need before any framework starts.

MXNet reads its backward-bulking setting once, at its first operator; the profiler's MXNet
instrument turns bulking off when it is imported, which in a test session may come after
another test file already ran MXNet operators (then every MXNet layer-coverage test would
measure bulked backward passes). The instrument's own switch is tested in a fresh process
(tests/test_instrument_mxnet.py)."""

import os

os.environ.setdefault("MXNET_EXEC_BULK_EXEC_TRAIN", "0")
