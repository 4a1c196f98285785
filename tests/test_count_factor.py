"""count_factor (loss = S / (C * count_factor)) is refused unless it is a finite number > 0, at
every door to the loss kernels: ops.core and ops._C (NumPy), the PyTorch native ops
(torch.ops.deepprof.*), the TensorFlow native ops and the MXNet native operator.

The rule is written once, kernels::valid_count_factor in csrc/kernels.h; each binding reports a
refusal in its own error type, naming the op, count_factor, what was expected and what came.
The adapters' public losses fix count_factor (1 or 0.5), so the native ops are called directly.

TensorFlow and MXNet run in a child process each: MXNet 1.9.1 crashes the interpreter when it is
imported after TensorFlow (defect 8 in ops/mxnet/loader.py), and a child cannot inherit either.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from typing import Dict, List

import numpy as np
import pytest

from ops import _C, core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = "count_factor: expected a finite number > 0, got "

# label -> (value, how it reads in a message: Python's repr, C++'s ostream, TF's StrCat, or
# MXNet's attribute string, which is str(value)). 0 and -0.5 are controls: refused before too.
BAD = {
    "inf": (math.inf, r"inf"),
    "nan": (math.nan, r"-?nan"),
    "neg_inf": (-math.inf, r"-inf"),
    "zero": (0.0, r"0(\.0)?"),
    "negative": (-0.5, r"-0\.5"),
}
LABELS = list(BAD)


def assert_refused(error: BaseException, raises: type, op: str, label: str) -> None:
    """The exception is exactly ``raises`` and its message is "<op>: count_factor: expected a
    finite number > 0, got <value>"."""
    assert type(error) is raises, (type(error), error)
    _, got = BAD[label]
    pattern = re.escape(f"{op}: {EXPECTED}") + f"'?{got}'?(?![\\w.])"
    assert re.search(pattern, str(error)), (pattern, str(error))


# ---- ops.core and ops._C (NumPy arrays) ---------------------------------------------------------

def _arrays():
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 3)).astype(
        np.float32)
    nan = lambda shape: np.full(shape, np.nan, np.float32)  # an output never written stays NaN
    return dict(x=x, t=t, count=np.array([6.0], np.float32), grad_loss=np.ones(1, np.float32),
                loss_out=nan(1), count_out=nan(1), gx_out=nan((2, 3)), gt_out=nan((2, 3)))


def _core_calls(a, value):
    return {
        "sq_error_loss_forward": lambda: core.sq_error_loss_forward(
            a["x"], a["t"], None, a["loss_out"], a["count_out"], count_factor=value),
        "sq_error_loss_backward": lambda: core.sq_error_loss_backward(
            a["x"], a["t"], None, a["count"], a["grad_loss"], a["gx_out"], a["gt_out"],
            count_factor=value),
        "sq_error_loss_fused": lambda: core.sq_error_loss_fused(
            a["x"], a["t"], None, a["loss_out"], a["count_out"], a["gx_out"], a["gt_out"],
            count_factor=value),
    }


def _c_calls(a, value):
    """ops._C itself: ops.core checks count_factor first, so this is the binding's own check."""
    return {
        "sq_error_loss_forward": lambda: _C.sq_error_loss_forward(
            a["x"], a["t"], None, a["loss_out"], a["count_out"], value),
        "sq_error_loss_backward": lambda: _C.sq_error_loss_backward(
            a["x"], a["t"], None, a["count"], a["grad_loss"], a["gx_out"], a["gt_out"], value),
        "sq_error_loss_fused": lambda: _C.sq_error_loss_fused(
            a["x"], a["t"], None, a["loss_out"], a["count_out"], a["gx_out"], a["gt_out"],
            a["grad_loss"], value),
    }


@pytest.mark.parametrize("door", ["core", "_C"])
@pytest.mark.parametrize("label", LABELS)
def test_numpy_refuses(door, label):
    a = _arrays()
    calls = (_core_calls if door == "core" else _c_calls)(a, BAD[label][0])
    for function, call in calls.items():
        with pytest.raises(ValueError) as caught:
            call()
        assert_refused(caught.value, ValueError, function, label)
    for name in ("loss_out", "count_out", "gx_out", "gt_out"):
        assert np.isnan(a[name]).all(), f"{name} was written: a kernel ran"


@pytest.mark.parametrize("door", ["core", "_C"])
def test_numpy_accepts_a_positive_factor(door):
    a = _arrays()
    for call in (_core_calls if door == "core" else _c_calls)(a, 0.5).values():
        call()
    want = float(((a["x"] - a["t"]).astype(np.float64) ** 2).sum() / (6 * 0.5))
    np.testing.assert_allclose(a["loss_out"][0], want, rtol=1e-5)


# ---- PyTorch: torch.ops.deepprof.* --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch_native():
    """torch.ops.deepprof, or skips with why not."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("PyTorch is not installed")
    from ops.torch import loader
    reason = loader.native_unavailable_reason()
    if reason is not None:
        pytest.skip(f"no PyTorch native ops: {reason}")
    return loader.native_ops()


def _torch_calls(value):
    """(op named in the message, call) for every loss op, through the autograd op and direct."""
    import torch
    deepprof = _torch_native()
    x, t = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    xg = x.clone().requires_grad_()
    g, count = torch.ones((), dtype=x.dtype), torch.full((), 6.0, dtype=x.dtype)
    return [
        ("deepprof::sq_error_loss_forward", lambda: deepprof.sq_error_loss(x, t, None, value)),
        # With a gradient wanted the autograd op runs the fused kernel.
        ("deepprof::sq_error_loss_fused", lambda: deepprof.sq_error_loss(xg, t, None, value)),
        ("deepprof::sq_error_loss_forward",
         lambda: deepprof.sq_error_loss_forward(x, t, None, value)),
        ("deepprof::sq_error_loss_backward",
         lambda: deepprof.sq_error_loss_backward(g, x, t, None, count, value, True)),
        ("deepprof::sq_error_loss_fused",
         lambda: deepprof.sq_error_loss_fused(x, t, None, value, True)),
    ]


@pytest.mark.parametrize("label", LABELS)
def test_torch_native_refuses(label):
    for op, call in _torch_calls(BAD[label][0]):
        with pytest.raises(ValueError) as caught:
            call()
        assert_refused(caught.value, ValueError, op, label)


def test_torch_native_accepts_a_positive_factor():
    for _, call in _torch_calls(0.5):
        call()


# ---- TensorFlow and MXNet: one child process each -----------------------------------------------

# Each child prints one JSON line per call: {"case", "op", "type", "message"} for an exception,
# {"case", "op", "accepted": true} for a result, or a single {"skip": why}.
_CHILD_HEAD = """
    import json, math
    def report(case, op, call):
        try:
            call()
            print(json.dumps({"case": case, "op": op, "accepted": True}))
        except Exception as error:
            print(json.dumps({"case": case, "op": op, "type": type(error).__name__,
                              "message": str(error)}))
    VALUES = {"inf": math.inf, "nan": math.nan, "neg_inf": -math.inf, "zero": 0.0,
              "negative": -0.5, "ok": 0.5}
"""

TF_CHILD = _CHILD_HEAD + """
    try:
        import tensorflow as tf
        from ops.tensorflow import loader
    except ImportError as error:
        print(json.dumps({"skip": f"TensorFlow does not import: {error}"}))
        raise SystemExit(0)
    if loader.native_unavailable_reason() is not None:
        print(json.dumps({"skip": f"no TensorFlow native ops: "
                                  f"{loader.native_unavailable_reason()}"}))
        raise SystemExit(0)
    lib = loader.native_ops()
    x = tf.ones((2, 3))
    for case, value in VALUES.items():
        loss = lambda v=value: lib.deepprof_sq_error_loss(x, 2 * x, [], count_factor=v)
        report(case, "DeepprofSqErrorLoss", loss)
        report(case, "DeepprofSqErrorLossBackward",
               lambda v=value: lib.deepprof_sq_error_loss_backward(
                   tf.ones(()), x, 2 * x, [], tf.ones(()), count_factor=v))
        # In a graph the shape function refuses it, while the graph is built.
        report(case, "graph:DeepprofSqErrorLoss", lambda: tf.function(loss)())
"""

MXNET_CHILD = _CHILD_HEAD + """
    try:
        import mxnet as mx
        from ops.mxnet import loader
    except ImportError as error:
        print(json.dumps({"skip": f"MXNet does not import: {error}"}))
        raise SystemExit(0)
    if loader.native_unavailable_reason() is not None:
        print(json.dumps({"skip": f"no MXNet native ops: {loader.native_unavailable_reason()}"}))
        raise SystemExit(0)
    x = mx.nd.ones((2, 3))
    for case, value in VALUES.items():
        report(case, "deepprof_sq_error_loss", lambda v=value: [
            r.wait_to_read() for r in mx.nd.deepprof_sq_error_loss(x, 2 * x, count_factor=v)])
        report(case, "sym:deepprof_sq_error_loss", lambda v=value: mx.sym.deepprof_sq_error_loss(
            mx.sym.var("x"), mx.sym.var("t"), count_factor=v).infer_shape(x=(2, 3), t=(2, 3)))
"""


@functools.lru_cache(maxsize=None)
def _child_results(framework: str) -> Dict[str, List[dict]]:
    """case label -> the child's reports for it; skips when the child says why it cannot run."""
    script = {"tensorflow": TF_CHILD, "mxnet": MXNET_CHILD}[framework]
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, f"{framework} child failed:\n{done.stderr[-3000:]}"
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if reports and "skip" in reports[0]:
        pytest.skip(reports[0]["skip"])
    results: Dict[str, List[dict]] = {}
    for r in reports:
        results.setdefault(r["case"], []).append(r)
    return results


def _assert_child_refused(report: dict, raises: str, label: str) -> None:
    assert report.get("type") == raises, report
    op = report["op"].split(":")[-1]
    _, got = BAD[label]
    pattern = re.escape(f"{op}: {EXPECTED}") + f"'?{got}'?(?![\\w.])"
    assert re.search(pattern, report["message"]), (pattern, report["message"])


@pytest.mark.parametrize("label", LABELS)
def test_tensorflow_native_refuses(label):
    reports = _child_results("tensorflow")[label]
    assert len(reports) == 3, reports
    for report in reports:
        # TensorFlow turns an op's InvalidArgument into ValueError while it builds a graph.
        raises = "ValueError" if report["op"].startswith("graph:") else "InvalidArgumentError"
        _assert_child_refused(report, raises, label)


def test_tensorflow_native_accepts_a_positive_factor():
    reports = _child_results("tensorflow")["ok"]
    assert len(reports) == 3 and all(r.get("accepted") for r in reports), reports


@pytest.mark.parametrize("label", LABELS)
def test_mxnet_native_refuses(label):
    reports = _child_results("mxnet")[label]
    assert len(reports) == 2, reports
    for report in reports:
        _assert_child_refused(report, "MXNetError", label)


def test_mxnet_native_accepts_a_positive_factor():
    reports = _child_results("mxnet")["ok"]
    assert len(reports) == 2 and all(r.get("accepted") for r in reports), reports
