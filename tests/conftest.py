"""Process-wide settings the tests need before any framework starts.

MXNet reads its backward-bulking setting once, at its first operator; the profiler's MXNet
instrument turns bulking off when it is imported, which in a test session may come after
another test file already ran MXNet operators (then every MXNet layer-coverage test would
measure bulked backward passes). The instrument's own switch is tested in a fresh process
(tests/test_instrument_mxnet.py)."""

import os

os.environ.setdefault("MXNET_EXEC_BULK_EXEC_TRAIN", "0")


# PyTorch 2.13 under NumPy 2 (the `make test-numpy2` run) was seen to crash in the interpreter's
# last garbage collection, after every test had passed and the summary was printed (3 of about
# 10 runs: a torch.fx node freeing a tensor calls a null AutogradMeta hook). The verdict is in
# by then; with DEEPPROF_PYTEST_HARD_EXIT=1 the run ends with pytest's own exit status instead
# of running that finalisation. Only that Makefile target sets it.
_exit_status = None


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    if os.environ.get("DEEPPROF_PYTEST_HARD_EXIT") == "1" and _exit_status is not None:
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)


# A crash (a native abort or segfault) ends pytest before its summary, and CI keeps only the
# output's tail, where the fatal-error dump's test frames may be cut off. With
# DEEPPROF_LAST_TEST=FILE (the Makefile's test targets set it), each test's id is written there
# as it starts, and the Makefile prints it when pytest fails.
def pytest_runtest_logstart(nodeid, location):
    path = os.environ.get("DEEPPROF_LAST_TEST")
    if path:
        with open(path, "w") as out:
            out.write(nodeid + "\n")
