"""Bad input to every public function of ``ops.core`` gets one clear Python exception.

The standard: bad input raises one exception that names the function, the argument, what was
expected and what came; never a segfault, a CUDA abort, a hang or a silently wrong answer.

A crash must fail a test, not end pytest, so every case runs in a child Python process
(``python tests/test_bad_input.py --child RESULTS``, case ids on stdin). The child writes a JSON
line when a case starts and one with its outcome (exception type and message, or the returned
value) when it ends. A child that dies leaves a case started but not ended: the parent records
that case as crashed (or hung: a per-case faulthandler watchdog ends a child stuck in a case) and
starts a new child for the cases left. One child usually runs every case, in a few seconds.

Three kinds of case: ``refused`` (must raise the given type with every message fragment),
``accepted`` (positive controls: a valid call through the same runner returns the right value)
and ``harness`` (a deliberate segfault and hang, proving the runner reports them). A case that
shows a known defect of ops.core / ops._C is an xfail(strict) with the defect as its reason.

This module must not make the checks it tests: it only calls ``ops.core`` (and ``ops._C`` for the
checks ``ops.core`` makes first) and compares what comes back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytest

try:
    from . import dlpack_fakes as fakes  # tests/ imported as a package
except ImportError:
    import dlpack_fakes as fakes

import ops
from ops import _C, core

REPO_ROOT = Path(__file__).resolve().parent.parent
#: A child that runs longer than this in all is killed; its running case counts as hung.
CHILD_TIMEOUT_S = 120
#: Per-case watchdog (faulthandler ends the child): a refusal takes microseconds.
CASE_TIMEOUT_S = 10.0

Fragment = Union[str, Tuple[str, ...]]  # a tuple: any one of these


@dataclasses.dataclass(frozen=True)
class Case:
    """One call and what must come of it."""

    id: str
    call: Callable[[], Any]  # runs in the child
    kind: str  # "refused" | "accepted" | "harness"
    raises: Optional[type] = None  # refused: the exact exception type
    fragments: Tuple[Fragment, ...] = ()  # refused: every one must be in the message
    outcome: Optional[str] = None  # harness: "crashed" | "hung"
    defect: Optional[str] = None  # a known defect: the test is xfail(strict=True)
    needs: Tuple[str, ...] = ()  # "torch"; "no_gpu": bogus device pointers, never on a GPU
    timeout_s: float = CASE_TIMEOUT_S

    def skip_reason(self) -> Optional[str]:
        if "torch" in self.needs and importlib.util.find_spec("torch") is None:
            return "needs PyTorch"
        if "no_gpu" in self.needs and ops.cuda_available():
            return ("fakes CUDA arrays at unmapped addresses; only safe where no CUDA device "
                    "is usable, since a usable one would run the kernel on them")
        return None


CASES: List[Case] = []


def refused(case_id: str, call: Callable[[], Any], raises: type, *fragments: Fragment,
            defect: Optional[str] = None, needs: Sequence[str] = ()) -> None:
    CASES.append(Case(case_id, call, "refused", raises=raises, fragments=tuple(fragments),
                      defect=defect, needs=tuple(needs)))


def accepted(case_id: str, call: Callable[[], Dict[str, Any]], needs: Sequence[str] = ()) -> None:
    """``call`` returns {"got": ..., "want": ...}, compared with np.allclose in the parent."""
    CASES.append(Case(case_id, call, "accepted", needs=tuple(needs)))


# ---- valid arguments, and calls with some of them replaced --------------------------------------

F32, F64 = np.float32, np.float64

# Short case-id prefix -> (function of ops.core, fresh valid keyword arguments).
FUNCTIONS: Dict[str, Tuple[str, Callable[[], Dict[str, Any]]]] = {}


def _data(shape, seed: int, dtype=F32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _out(shape, dtype=F32) -> np.ndarray:
    return np.full(shape, np.nan, dtype)  # NaN: an output never written shows


def _valid_loss_forward():
    return dict(x=_data((2, 3), 1), t=_data((2, 3), 2), v=None, loss_out=_out((1,)),
                count_out=_out((1,)), count_factor=1.0)


def _valid_loss_backward():
    return dict(x=_data((2, 3), 1), t=_data((2, 3), 2), v=None, count=np.array([6.0], F32),
                grad_loss=np.array([1.0], F32), gx_out=_out((2, 3)), gt_out=None,
                count_factor=1.0)


FUNCTIONS["loss_fwd"] = ("sq_error_loss_forward", _valid_loss_forward)
FUNCTIONS["loss_bwd"] = ("sq_error_loss_backward", _valid_loss_backward)
FUNCTIONS["conv_fwd"] = ("conv2d_forward", lambda: dict(
    x=_data((1, 2, 5, 5), 3), w=_data((3, 2, 3, 3), 4), b=_data((3,), 5),
    y_out=_out((1, 3, 3, 3))))
FUNCTIONS["conv_bwd_data"] = ("conv2d_backward_data", lambda: dict(
    gy=_data((1, 3, 3, 3), 6), w=_data((3, 2, 3, 3), 4), gx_out=_out((1, 2, 5, 5))))
FUNCTIONS["conv_bwd_weight"] = ("conv2d_backward_weight", lambda: dict(
    x=_data((1, 2, 5, 5), 3), gy=_data((1, 3, 3, 3), 6), gw_out=_out((3, 2, 3, 3))))
FUNCTIONS["conv_bwd_bias"] = ("conv2d_backward_bias", lambda: dict(
    gy=_data((1, 3, 3, 3), 6), gb_out=_out((3,))))
FUNCTIONS["conv_shape"] = ("conv2d_output_shape", lambda: dict(
    x_shape=(1, 2, 5, 5), w_shape=(3, 2, 3, 3)))

#: Array arguments of each function; the optional ones may be None.
ARRAY_ARGS = {
    "loss_fwd": ("x", "t", "v", "loss_out", "count_out"),
    "loss_bwd": ("x", "t", "v", "count", "grad_loss", "gx_out", "gt_out"),
    "conv_fwd": ("x", "w", "b", "y_out"),
    "conv_bwd_data": ("gy", "w", "gx_out"),
    "conv_bwd_weight": ("x", "gy", "gw_out"),
    "conv_bwd_bias": ("gy", "gb_out"),
}
OPTIONAL_ARGS = {"v", "b", "gt_out"}


def call(key: str, **replace) -> Callable[[], Any]:
    """A call of FUNCTIONS[key] with fresh valid arguments, some replaced.

    A replacement that is callable is called with the argument dict (so it can build on the
    valid arrays, e.g. ``gx_out=lambda a: a["x"]``); anything else is passed as it is.
    Keys starting with "_" are scratch space shared between replacements (a buffer two
    arguments are views of) and are not passed on.
    """
    function_name, valid = FUNCTIONS[key]

    def run():
        args = valid()
        for name, value in replace.items():
            args[name] = value(args) if callable(value) else value
        args = {name: value for name, value in args.items() if not name.startswith("_")}
        return getattr(core, function_name)(**args)

    return run


def at(key: str, arg: str) -> str:
    """The head of every message: "<function>: <argument>:"."""
    return f"{FUNCTIONS[key][0]}: {arg}:"


def astype(arg: str, dtype) -> Callable[[Dict[str, Any]], np.ndarray]:
    return lambda a: a[arg].astype(dtype)


def reshaped(arg: str, shape, fill=None) -> Callable[[Dict[str, Any]], np.ndarray]:
    """An array of ``arg``'s dtype in another shape."""
    def make(a):
        like = a[arg]
        return _out(shape, like.dtype) if fill is None else np.full(shape, fill, like.dtype)
    return make


def torch_tensor(arg: str, transform=lambda t: t) -> Callable[[Dict[str, Any]], Any]:
    def make(a):
        import torch
        return transform(torch.from_numpy(np.ascontiguousarray(a[arg])))
    return make


_BOGUS_BASE = 0xFFFF_F000_0000_0000  # kernel half of the address space: never user memory
_bogus_next = [0]


def bogus_address() -> int:
    """A distinct address no user process can read: a fake GPU pointer that must not be touched."""
    _bogus_next[0] += 1
    return _BOGUS_BASE + 0x10000 * _bogus_next[0]


def on_cuda(arg: str, device_id: int = 0, protocol: bool = False):
    """``arg`` as a fake CUDA array at a bogus address: a capsule, or an object with
    ``__dlpack__``/``__dlpack_device__`` when ``protocol``."""
    def make(a):
        if a[arg] is None:
            return None  # an optional argument left out stays out
        fields = dict(device=(fakes.KDL_CUDA, device_id), data=bogus_address())
        if protocol:
            return fakes.FakeArray(a[arg], **fields)
        return fakes.make_capsule(a[arg], **fields)
    return make


def capsule(arg: str, **fields):
    return lambda a: fakes.make_capsule(a[arg], **fields)


def all_on_cuda(key: str, device_id: int = 0, **replace) -> Callable[[], Any]:
    array_args = ARRAY_ARGS[key]
    over = {name: on_cuda(name, device_id, protocol=(i % 2 == 1))
            for i, name in enumerate(array_args)}
    over.update(replace)
    return call(key, **over)


def direct(function_name: str, *args) -> Callable[[], Any]:
    """A call of ops._C itself, for the checks that ops.core makes before it."""
    def run():
        built = [a() if callable(a) else a for a in args]
        return getattr(_C, function_name)(*built)
    return run


# ---- not an array -------------------------------------------------------------------------------

NOT_ARRAYS = (  # (id, value, the "got" fragment)
    ("list", [1.0, 2.0], "got list"),
    ("None", None, "got None"),
    ("str", "x", "got str"),
    ("float", 1.5, "got float"),
)
for key, names in ARRAY_ARGS.items():
    for name in names:
        for label, value, got in NOT_ARRAYS:
            if value is None and name in OPTIONAL_ARGS:
                continue  # None is the documented "no mask / no bias / no gt"
            refused(f"{key}-{name}-{label}", call(key, **{name: value}), TypeError,
                    at(key, name), "expected an array", got)
refused("loss_bwd-grad_loss-numpy_scalar", call("loss_bwd", grad_loss=np.float32(1.0)),
        TypeError, at("loss_bwd", "grad_loss"), "expected an array", "got float32")
refused("loss_fwd-x-dict", call("loss_fwd", x={"data": [1.0]}), TypeError,
        at("loss_fwd", "x"), "expected an array", "got dict")
refused("conv_shape-x_shape-None", call("conv_shape", x_shape=None), TypeError,
        "conv2d_output_shape: x_shape:", "expected a shape", "got None")
refused("conv_shape-w_shape-float", call("conv_shape", w_shape=3.0), TypeError,
        "conv2d_output_shape: w_shape:", "expected a shape", "got 3.0")
refused("conv_shape-x_shape-str", call("conv_shape", x_shape="1255"), TypeError,
        "conv2d_output_shape: x_shape:", "expected a shape", "'1255'")
refused("conv_shape-x_shape-fractional", call("conv_shape", x_shape=(1, 2, 5.5, 5)), TypeError,
        "conv2d_output_shape: x_shape:", "expected a shape", "5.5")

# ---- wrong dtype --------------------------------------------------------------------------------

NEEDS_TORCH = ("torch",)
WRONG_DTYPES = [  # (case id, call, argument, "got" dtype, needs)
    ("loss_fwd-x-int64", call("loss_fwd", x=astype("x", np.int64)), "x", "int64", ()),
    ("loss_fwd-v-float16", call("loss_fwd", v=astype("x", np.float16)), "v", "float16", ()),
    ("loss_fwd-x-complex64", call("loss_fwd", x=astype("x", np.complex64)), "x", "complex64", ()),
    ("loss_fwd-x-torch_bfloat16",
     call("loss_fwd", x=torch_tensor("x", lambda t: t.bfloat16())), "x", "bfloat16", NEEDS_TORCH),
    ("loss_fwd-count_out-torch_bool",
     call("loss_fwd", count_out=torch_tensor("count_out", lambda t: t.bool())), "count_out",
     "bool", NEEDS_TORCH),
    ("loss_fwd-x-fake_float32x4", call("loss_fwd", x=capsule("x", dtype="float32x4")), "x",
     "float32x4", ()),
    ("loss_fwd-t-fake_bool", call("loss_fwd", t=capsule("t", dtype="bool")), "t", "bool", ()),
    ("loss_bwd-count-int64", call("loss_bwd", count=astype("count", np.int64)), "count",
     "int64", ()),
    ("loss_bwd-grad_loss-float16", call("loss_bwd", grad_loss=astype("grad_loss", np.float16)),
     "grad_loss", "float16", ()),
    ("loss_bwd-gt_out-fake_bfloat16",
     call("loss_bwd", gt_out=lambda a: fakes.make_capsule(_out((2, 3)), dtype="bfloat16")),
     "gt_out", "bfloat16", ()),
    ("conv_fwd-x-int32", call("conv_fwd", x=astype("x", np.int32)), "x", "int32", ()),
    ("conv_fwd-w-torch_float16",
     call("conv_fwd", w=torch_tensor("w", lambda t: t.half())), "w", "float16", NEEDS_TORCH),
    ("conv_bwd_data-gy-int64", call("conv_bwd_data", gy=astype("gy", np.int64)), "gy",
     "int64", ()),
    ("conv_bwd_weight-x-uint8", call("conv_bwd_weight", x=astype("x", np.uint8)), "x",
     "uint8", ()),
    ("conv_bwd_bias-gy-torch_bool",
     call("conv_bwd_bias", gy=torch_tensor("gy", lambda t: t.bool())), "gy", "bool",
     NEEDS_TORCH),
    ("conv_bwd_bias-gb_out-fake_int64", call("conv_bwd_bias", gb_out=capsule("gb_out",
                                                                              dtype="int64")),
     "gb_out", "int64", ()),
]
for case_id, run, name, got, needs in WRONG_DTYPES:
    key = case_id.split("-")[0]
    refused(case_id, run, TypeError, at(key, name), "expected float32 or float64", f"got {got}",
            needs=needs)
refused("loss_fwd-x-numpy_bool", call("loss_fwd", x=astype("x", bool)), TypeError,
        at("loss_fwd", "x"), "expected float32 or float64", "bool")
refused("loss_fwd-x-numpy_big_endian", call("loss_fwd", x=astype("x", ">f4")), ValueError,
        at("loss_fwd", "x"), "could not export it through DLPack", "byte")

MIXED_DTYPES = [  # (case id, call, argument, the first array's name, its dtype, the other)
    ("loss_fwd-t-float64", call("loss_fwd", t=astype("t", F64)), "t", "x", "float32", "float64"),
    ("loss_fwd-loss_out-float64", call("loss_fwd", loss_out=astype("loss_out", F64)),
     "loss_out", "x", "float32", "float64"),
    ("loss_bwd-t-float32_x_float64", call("loss_bwd", x=astype("x", F64)), "t", "x", "float64",
     "float32"),
    ("loss_bwd-gx_out-float64", call("loss_bwd", gx_out=astype("gx_out", F64)), "gx_out", "x",
     "float32", "float64"),
    ("conv_fwd-w-float64", call("conv_fwd", w=astype("w", F64)), "w", "x", "float32", "float64"),
    ("conv_fwd-b-float64", call("conv_fwd", b=astype("b", F64)), "b", "x", "float32", "float64"),
    ("conv_fwd-y_out-float64", call("conv_fwd", y_out=astype("y_out", F64)), "y_out", "x",
     "float32", "float64"),
    ("conv_bwd_data-w-float64", call("conv_bwd_data", w=astype("w", F64)), "w", "gy", "float32",
     "float64"),
    ("conv_bwd_data-gx_out-float64", call("conv_bwd_data", gx_out=astype("gx_out", F64)),
     "gx_out", "gy", "float32", "float64"),
    ("conv_bwd_weight-gy-float64", call("conv_bwd_weight", gy=astype("gy", F64)), "gy", "x",
     "float32", "float64"),
    ("conv_bwd_weight-gw_out-float64", call("conv_bwd_weight", gw_out=astype("gw_out", F64)),
     "gw_out", "x", "float32", "float64"),
    ("conv_bwd_bias-gb_out-float64", call("conv_bwd_bias", gb_out=astype("gb_out", F64)),
     "gb_out", "gy", "float32", "float64"),
]
for case_id, run, name, first, want, got in MIXED_DTYPES:
    key = case_id.split("-")[0]
    refused(case_id, run, TypeError, at(key, name), f"expected {want} like {first}",
            f"got {got}")

# ---- mismatched shapes, one-element arrays, wrong rank ------------------------------------------

SHAPES = [  # (case id, call, argument, expected-shape fragment, got fragment)
    ("loss_fwd-t-transposed_shape", call("loss_fwd", t=reshaped("t", (3, 2), 0)), "t",
     "expected shape (2, 3) (same as x)", "got (3, 2)"),
    ("loss_fwd-v-extra_axis", call("loss_fwd", v=reshaped("x", (2, 3, 1), 1)), "v",
     "expected shape (2, 3) (same as x)", "got (2, 3, 1)"),
    ("loss_bwd-t-wider", call("loss_bwd", t=reshaped("t", (2, 4), 0)), "t",
     "expected shape (2, 3) (same as x)", "got (2, 4)"),
    ("loss_bwd-v-flat", call("loss_bwd", v=reshaped("x", (6,), 1)), "v",
     "expected shape (2, 3) (same as x)", "got (6,)"),
    ("loss_bwd-gx_out-transposed_shape", call("loss_bwd", gx_out=reshaped("gx_out", (3, 2))),
     "gx_out", "expected shape (2, 3) (same as x)", "got (3, 2)"),
    ("loss_bwd-gt_out-extra_axis", call("loss_bwd", gt_out=reshaped("x", (2, 3, 1))), "gt_out",
     "expected shape (2, 3) (same as x)", "got (2, 3, 1)"),
    ("conv_fwd-w-channels", call("conv_fwd", w=reshaped("w", (3, 4, 3, 3), 1)), "w",
     "expected shape (Cout, 2, kh, kw)", "got (3, 4, 3, 3)"),
    ("conv_fwd-b-length", call("conv_fwd", b=reshaped("b", (4,), 0)), "b",
     "expected shape (3,) (Cout)", "got (4,)"),
    ("conv_fwd-b-2d", call("conv_fwd", b=reshaped("b", (1, 3), 0)), "b",
     "expected shape (3,) (Cout)", "got (1, 3)"),
    ("conv_fwd-y_out-spatial", call("conv_fwd", y_out=reshaped("y_out", (1, 3, 4, 4))), "y_out",
     "expected shape (1, 3, 3, 3)", "got (1, 3, 4, 4)"),
    ("conv_fwd-y_out-channels", call("conv_fwd", y_out=reshaped("y_out", (1, 2, 3, 3))),
     "y_out", "expected shape (1, 3, 3, 3)", "got (1, 2, 3, 3)"),
    ("conv_bwd_data-w-channels", call("conv_bwd_data", w=reshaped("w", (3, 4, 3, 3), 1)), "w",
     "expected shape (Cout, 2, kh, kw) to match the 2 input channels of gx", "got (3, 4, 3, 3)"),
    ("conv_bwd_data-gy-spatial", call("conv_bwd_data", gy=reshaped("gy", (1, 3, 4, 4), 1)), "gy",
     "expected shape (1, 3, 3, 3)", "got (1, 3, 4, 4)"),
    ("conv_bwd_data-gy-channels", call("conv_bwd_data", gy=reshaped("gy", (1, 4, 3, 3), 1)),
     "gy", "expected shape (1, 3, 3, 3)", "got (1, 4, 3, 3)"),
    ("conv_bwd_weight-gw_out-channels",
     call("conv_bwd_weight", gw_out=reshaped("gw_out", (3, 4, 3, 3))), "gw_out",
     "expected shape (Cout, 2, kh, kw) to match the 2 input channels of x", "got (3, 4, 3, 3)"),
    ("conv_bwd_weight-gy-batch", call("conv_bwd_weight", gy=reshaped("gy", (2, 3, 3, 3), 1)),
     "gy", "expected shape (1, 3, 3, 3)", "got (2, 3, 3, 3)"),
    ("conv_bwd_bias-gb_out-length", call("conv_bwd_bias", gb_out=reshaped("gb_out", (4,))),
     "gb_out", "expected shape (3,) (Cout of gy)", "got (4,)"),
    ("conv_bwd_bias-gb_out-2d", call("conv_bwd_bias", gb_out=reshaped("gb_out", (3, 1))),
     "gb_out", "expected shape (3,) (Cout of gy)", "got (3, 1)"),
    # One-element outputs and inputs of the loss.
    ("loss_fwd-loss_out-two_elements", call("loss_fwd", loss_out=reshaped("loss_out", (2,))),
     "loss_out", "expected a one-element array", "got shape (2,)"),
    ("loss_fwd-count_out-two_elements",
     call("loss_fwd", count_out=reshaped("count_out", (1, 2))), "count_out",
     "expected a one-element array", "got shape (1, 2)"),
    ("loss_bwd-count-two_elements", call("loss_bwd", count=reshaped("count", (2,), 6)), "count",
     "expected a one-element array", "got shape (2,)"),
    ("loss_bwd-grad_loss-like_x", call("loss_bwd", grad_loss=reshaped("x", (2, 3), 1)),
     "grad_loss", "expected a one-element array", "got shape (2, 3)"),
    # Rank.
    ("conv_fwd-x-3d", call("conv_fwd", x=reshaped("x", (2, 5, 5), 1)), "x",
     "expected a 4-d array (B, Cin, H, W)", "got shape (2, 5, 5)"),
    ("conv_fwd-w-3d", call("conv_fwd", w=reshaped("w", (3, 2, 9), 1)), "w",
     "expected a 4-d array (Cout, Cin, kh, kw)", "got shape (3, 2, 9)"),
    ("conv_bwd_data-gx_out-3d", call("conv_bwd_data", gx_out=reshaped("gx_out", (2, 5, 5))),
     "gx_out", "expected a 4-d array (B, Cin, H, W)", "got shape (2, 5, 5)"),
    ("conv_bwd_data-gy-5d", call("conv_bwd_data", gy=reshaped("gy", (1, 1, 3, 3, 3), 1)), "gy",
     "expected shape (1, 3, 3, 3)", "got (1, 1, 3, 3, 3)"),
    ("conv_bwd_weight-x-5d", call("conv_bwd_weight", x=reshaped("x", (1, 2, 5, 5, 1), 1)), "x",
     "expected a 4-d array (B, Cin, H, W)", "got shape (1, 2, 5, 5, 1)"),
    ("conv_bwd_weight-gw_out-3d", call("conv_bwd_weight", gw_out=reshaped("gw_out", (3, 2, 9))),
     "gw_out", "expected a 4-d array (Cout, Cin, kh, kw)", "got shape (3, 2, 9)"),
    ("conv_bwd_bias-gy-3d", call("conv_bwd_bias", gy=reshaped("gy", (3, 3, 3), 1)), "gy",
     "expected a 4-d array (B, Cout, OH, OW)", "got shape (3, 3, 3)"),
]
for case_id, run, name, want, got in SHAPES:
    refused(case_id, run, ValueError, at(case_id.split("-")[0], name), want, got)
refused("conv_shape-w_shape-channels", call("conv_shape", w_shape=(3, 4, 3, 3)), ValueError,
        "conv2d_output_shape: w_shape:", "expected (Cout, 2, kh, kw)", "got (3, 4, 3, 3)")
refused("conv_shape-x_shape-3d", call("conv_shape", x_shape=(2, 5, 5)), ValueError,
        "conv2d_output_shape: x_shape:", "expected 4 positive sizes", "got (2, 5, 5)")
refused("conv_shape-w_shape-5d", call("conv_shape", w_shape=(3, 2, 3, 3, 1)), ValueError,
        "conv2d_output_shape: w_shape:", "expected 4 positive sizes",
        "got (3, 2, 3, 3, 1)")

# ---- non-contiguous -----------------------------------------------------------------------------

NOT_CONTIGUOUS = "expected a C-contiguous array"
LAYOUTS = [  # (case id, call, argument, strides fragment, needs)
    ("loss_fwd-x-numpy_step", call("loss_fwd", x=lambda a: _data((2, 6), 1)[:, ::2]), "x",
     "element strides (6, 2)", ()),
    ("loss_fwd-t-torch_transposed",
     call("loss_fwd", t=lambda a: __import__("torch").zeros(3, 2).T), "t",
     "element strides (1, 2)", NEEDS_TORCH),
    ("loss_bwd-gx_out-numpy_transposed", call("loss_bwd", gx_out=lambda a: _out((3, 2)).T),
     "gx_out", "element strides (1, 2)", ()),
    ("loss_bwd-v-fake_strides", call("loss_bwd", v=lambda a: fakes.make_capsule(
        np.ones((3, 2), F32), shape=(2, 3), strides=(1, 2))), "v", "element strides (1, 2)", ()),
    ("conv_fwd-x-numpy_step",
     call("conv_fwd", x=lambda a: _data((1, 2, 5, 10), 3)[..., ::2]), "x",
     "element strides (100, 50, 10, 2)", ()),
    ("conv_fwd-w-torch_permuted",
     call("conv_fwd", w=torch_tensor("w", lambda t: t.permute(0, 1, 3, 2))), "w",
     "element strides (18, 9, 1, 3)", NEEDS_TORCH),
    ("conv_fwd-y_out-fortran_order",
     call("conv_fwd", y_out=lambda a: np.asfortranarray(a["y_out"])), "y_out",
     "element strides (1, 1, 3, 9)", ()),
    ("conv_bwd_data-gy-negative_stride", call("conv_bwd_data", gy=lambda a: a["gy"][..., ::-1]),
     "gy", "element strides (27, 9, 3, -1)", ()),
    ("conv_bwd_weight-x-fake_strides", call("conv_bwd_weight", x=lambda a: fakes.make_capsule(
        a["x"], strides=(50, 1, 10, 2))), "x", "element strides (50, 1, 10, 2)", ()),
    ("conv_bwd_weight-gw_out-stride0", call("conv_bwd_weight", gw_out=lambda a: (
        np.lib.stride_tricks.as_strided(_out((9,)), (3, 2, 3, 3), (0, 0, 12, 4)))), "gw_out",
     "element strides (0, 0, 3, 1)", ()),
    ("conv_bwd_bias-gy-fortran_order",
     call("conv_bwd_bias", gy=lambda a: np.asfortranarray(a["gy"])), "gy",
     "element strides (1, 1, 3, 9)", ()),
]
for case_id, run, name, strides, needs in LAYOUTS:
    refused(case_id, run, ValueError, at(case_id.split("-")[0], name), NOT_CONTIGUOUS, strides,
            "make it contiguous", needs=needs)

# ---- empty arrays -------------------------------------------------------------------------------

NON_EMPTY = "expected a non-empty array"
refused("loss_fwd-x-empty", call("loss_fwd", x=np.ones((0, 3), F32), t=np.ones((0, 3), F32)),
        ValueError, at("loss_fwd", "x"), NON_EMPTY, "got shape (0, 3)")
refused("loss_fwd-x-torch_empty", call("loss_fwd", x=lambda a: __import__("torch").ones(0, 3)),
        ValueError, at("loss_fwd", "x"), NON_EMPTY, "got shape (0, 3)", needs=NEEDS_TORCH)
refused("loss_fwd-loss_out-empty", call("loss_fwd", loss_out=_out((0,))), ValueError,
        at("loss_fwd", "loss_out"), NON_EMPTY, "got shape (0,)")
refused("loss_bwd-gx_out-empty", call("loss_bwd", gx_out=_out((2, 0))), ValueError,
        at("loss_bwd", "gx_out"), NON_EMPTY, "got shape (2, 0)")
refused("conv_fwd-x-empty_batch",
        call("conv_fwd", x=np.ones((0, 2, 5, 5), F32), y_out=_out((0, 3, 3, 3))), ValueError,
        at("conv_fwd", "x"), NON_EMPTY, "got shape (0, 2, 5, 5)")
refused("conv_bwd_data-gx_out-no_channels",
        call("conv_bwd_data", gx_out=_out((1, 0, 5, 5))), ValueError,
        at("conv_bwd_data", "gx_out"), NON_EMPTY, "got shape (1, 0, 5, 5)")
refused("conv_bwd_weight-gy-empty", call("conv_bwd_weight", gy=np.ones((1, 3, 0, 0), F32)),
        ValueError, at("conv_bwd_weight", "gy"), NON_EMPTY, "got shape (1, 3, 0, 0)")
refused("conv_bwd_bias-gy-no_channels",
        call("conv_bwd_bias", gy=np.ones((1, 0, 3, 3), F32), gb_out=_out((0,))), ValueError,
        at("conv_bwd_bias", "gy"), NON_EMPTY, "got shape (1, 0, 3, 3)")
refused("conv_shape-x_shape-zero", call("conv_shape", x_shape=(0, 2, 5, 5)), ValueError,
        "conv2d_output_shape: x_shape:", "positive sizes", "got (0, 2, 5, 5)")

# ---- devices ------------------------------------------------------------------------------------

ONE_DEVICE = "all arrays of one call must be on one device"
DEVICES = [  # (case id, call, argument, its device, the first array's name and device)
    ("loss_fwd-t-cuda_beside_cpu", call("loss_fwd", t=on_cuda("t")), "t", "cuda:0", "x is on cpu"),
    ("loss_bwd-grad_loss-cuda_object_beside_cpu",
     call("loss_bwd", grad_loss=on_cuda("grad_loss", protocol=True)), "grad_loss", "cuda:0",
     "x is on cpu"),
    ("conv_fwd-y_out-cuda_beside_cpu", call("conv_fwd", y_out=on_cuda("y_out")), "y_out",
     "cuda:0", "x is on cpu"),
    ("conv_bwd_data-w-cpu_beside_cuda", call("conv_bwd_data", gy=on_cuda("gy", protocol=True)),
     "w", "cpu", "gy is on cuda:0"),
    ("conv_bwd_weight-gw_out-cuda1_beside_cuda0",
     all_on_cuda("conv_bwd_weight", gw_out=on_cuda("gw_out", device_id=1)), "gw_out", "cuda:1",
     "x is on cuda:0"),
    ("conv_bwd_bias-gb_out-cpu_beside_cuda", call("conv_bwd_bias", gy=on_cuda("gy")), "gb_out",
     "cpu", "gy is on cuda:0"),
]
for case_id, run, name, device, first in DEVICES:
    refused(case_id, run, ValueError, at(case_id.split("-")[0], name), f"is on {device}", first,
            ONE_DEVICE)
for case_id, run, name, device_type in [
        ("conv_bwd_bias-gb_out-rocm", call("conv_bwd_bias", gb_out=capsule(
            "gb_out", device=(fakes.KDL_ROCM, 0))), "gb_out", 10),
        ("loss_fwd-x-cuda_managed", call("loss_fwd", x=capsule(
            "x", device=(fakes.KDL_CUDA_MANAGED, 0), data=bogus_address())), "x", 13),
        ("conv_fwd-w-opencl", call("conv_fwd", w=capsule("w", device=(fakes.KDL_OPENCL, 0))),
         "w", 4)]:
    refused(case_id, run, ValueError, at(case_id.split("-")[0], name),
            f"unsupported device type {device_type}", "expected CPU or CUDA memory")

# Every array on a (fake) GPU of a machine with none: refused before any pointer is read.
NO_GPU = (("usable here", "no CUDA support"),)
for key in ARRAY_ARGS:
    refused(f"{key}-all-cuda_without_gpu", all_on_cuda(key), RuntimeError,
            f"{FUNCTIONS[key][0]}: got arrays on cuda:0", *NO_GPU, needs=("no_gpu",))
refused("loss_fwd-all-cuda1_without_gpu", all_on_cuda("loss_fwd", device_id=1), RuntimeError,
        "sq_error_loss_forward: got arrays on cuda:1", *NO_GPU, needs=("no_gpu",))
refused("loss_fwd-all-cuda_negative_id", all_on_cuda("loss_fwd", device_id=-1), ValueError,
        at("loss_fwd", "x"), "-1", needs=("no_gpu",))

# ---- conv parameters ----------------------------------------------------------------------------

PARAMS = [  # (case id, call, type, fragments; "conv2d: " stands for the function called)
    ("conv_fwd-stride-zero", call("conv_fwd", stride=0), ValueError,
     ("conv2d: stride:", "expected values in [1, 2**31 - 1]", "got (0, 0)")),
    ("conv_fwd-stride-negative", call("conv_fwd", stride=(1, -1)), ValueError,
     ("conv2d: stride:", "expected values in [1, 2**31 - 1]", "got (1, -1)")),
    ("conv_fwd-stride-float", call("conv_fwd", stride=1.5), TypeError,
     ("conv2d: stride:", "expected an int or a pair of ints", "got 1.5")),
    ("conv_fwd-stride-bool", call("conv_fwd", stride=True), TypeError,
     ("conv2d: stride:", "expected an int or a pair of ints", "got True")),
    ("conv_fwd-stride-triple", call("conv_fwd", stride=(1, 2, 3)), TypeError,
     ("conv2d: stride:", "expected an int or a pair of ints", "got (1, 2, 3)")),
    ("conv_fwd-stride-str", call("conv_fwd", stride="2"), TypeError,
     ("conv2d: stride:", "expected an int or a pair of ints", "got '2'")),
    ("conv_fwd-padding-None", call("conv_fwd", padding=None), TypeError,
     ("conv2d: padding:", "expected an int or a pair of ints", "got None")),
    ("conv_fwd-groups-2", call("conv_fwd", groups=2), NotImplementedError,
     ("conv2d: groups:", "only groups=1 is implemented", "got 2")),
    ("conv_fwd-groups-float", call("conv_fwd", groups=1.0), TypeError,
     ("conv2d: groups:", "expected an int", "got 1.0")),
    ("conv_bwd_data-padding-negative", call("conv_bwd_data", padding=-1), ValueError,
     ("conv2d: padding:", "expected values in [0, 2**31 - 1]", "got (-1, -1)")),
    ("conv_bwd_data-padding-negative_width", call("conv_bwd_data", padding=(0, -2)), ValueError,
     ("conv2d: padding:", "expected values in [0, 2**31 - 1]", "got (0, -2)")),
    ("conv_bwd_data-stride-zero", call("conv_bwd_data", stride=(0, 1)), ValueError,
     ("conv2d: stride:", "expected values in [1, 2**31 - 1]", "got (0, 1)")),
    ("conv_bwd_weight-dilation-zero", call("conv_bwd_weight", dilation=0), ValueError,
     ("conv2d: dilation:", "expected values in [1, 2**31 - 1]", "got (0, 0)")),
    ("conv_bwd_weight-dilation-negative", call("conv_bwd_weight", dilation=(1, -1)), ValueError,
     ("conv2d: dilation:", "expected values in [1, 2**31 - 1]", "got (1, -1)")),
    ("conv_bwd_weight-groups-3", call("conv_bwd_weight", groups=3), NotImplementedError,
     ("conv2d: groups:", "only groups=1 is implemented", "got 3")),
    ("conv_shape-stride-zero", call("conv_shape", stride=0), ValueError,
     ("conv2d: stride:", "expected values in [1, 2**31 - 1]", "got (0, 0)")),
    ("conv_shape-padding-negative", call("conv_shape", padding=(-1, 0)), ValueError,
     ("conv2d: padding:", "expected values in [0, 2**31 - 1]", "got (-1, 0)")),
    ("conv_shape-dilation-zero", call("conv_shape", dilation=(1, 0)), ValueError,
     ("conv2d: dilation:", "expected values in [1, 2**31 - 1]", "got (1, 0)")),
    ("conv_shape-stride-single", call("conv_shape", stride=(2,)), TypeError,
     ("conv2d: stride:", "expected an int or a pair of ints", "got (2,)")),
    ("conv_shape-groups-2", call("conv_shape", groups=2), NotImplementedError,
     ("conv2d: groups:", "only groups=1 is implemented", "got 2")),
    # ops._C's own checks, which ops.core never lets a bad value reach.
    ("C-conv2d_forward-stride-zero", direct(
        "conv2d_forward", _data((1, 2, 5, 5), 3), _data((3, 2, 3, 3), 4), None,
        _out((1, 3, 3, 3)), (0, 1), (0, 0), (1, 1)), ValueError,
     ("conv2d_forward: stride:", "expected values in [1, 2**31 - 1]", "got (0, 1)")),
    ("C-conv2d_backward_data-padding-negative", direct(
        "conv2d_backward_data", _data((1, 3, 3, 3), 6), _data((3, 2, 3, 3), 4),
        _out((1, 2, 5, 5)), (1, 1), (-1, 0), (1, 1)), ValueError,
     ("conv2d_backward_data: padding:", "expected values in [0, 2**31 - 1]", "got (-1, 0)")),
    ("C-conv2d_backward_weight-dilation-zero", direct(
        "conv2d_backward_weight", _data((1, 2, 5, 5), 3), _data((1, 3, 3, 3), 6),
        _out((3, 2, 3, 3)), (1, 1), (0, 0), (1, 0)), ValueError,
     ("conv2d_backward_weight: dilation:", "expected values in [1, 2**31 - 1]", "got (1, 0)")),
]
for case_id, run, raises, fragments in PARAMS:
    key = case_id.split("-")[0]
    if key in FUNCTIONS:  # ops.core's checks name the public function
        fragments = tuple(f.replace("conv2d: ", f"{FUNCTIONS[key][0]}: ") for f in fragments)
    refused(case_id, run, raises, *fragments)
refused("conv_fwd-groups-0", call("conv_fwd", groups=0), ValueError,
        "conv2d_forward: groups:", "expected an int >= 1", "got 0")
refused("conv_bwd_data-stride-names_function", call("conv_bwd_data", stride=0), ValueError,
        "conv2d_backward_data: stride:")
refused("conv_shape-padding-names_function", call("conv_shape", padding=-1), ValueError,
        "conv2d_output_shape: padding:")

# ---- kernel larger than the padded input --------------------------------------------------------

LARGER = "is larger than the padded input"
refused("conv_fwd-w-taller_than_input",
        call("conv_fwd", x=_data((1, 2, 2, 5), 3), y_out=_out((1, 3, 1, 3))), ValueError,
        at("conv_fwd", "w"), "kernel height extent 3", LARGER, "height 2 (2 + 2*0)")
refused("conv_fwd-w-wider_than_input",
        call("conv_fwd", x=_data((1, 2, 5, 2), 3), y_out=_out((1, 3, 3, 1))), ValueError,
        at("conv_fwd", "w"), "kernel width extent 3", LARGER, "width 2 (2 + 2*0)")
refused("conv_fwd-w-dilated_beyond_input", call("conv_fwd", dilation=3), ValueError,
        at("conv_fwd", "w"), "kernel height extent 7 (size 3, dilation 3)", LARGER,
        "height 5 (5 + 2*0)")
refused("conv_bwd_data-w-larger_than_gx",
        call("conv_bwd_data", gx_out=_out((1, 2, 2, 2)), gy=_data((1, 3, 1, 1), 6)), ValueError,
        at("conv_bwd_data", "w"), "kernel height extent 3", LARGER, "height 2 (2 + 2*0)")
refused("conv_bwd_weight-gw_out-larger_than_x",
        call("conv_bwd_weight", x=_data((1, 2, 2, 2), 3), gy=_data((1, 3, 1, 1), 6)),
        ValueError, at("conv_bwd_weight", "gw_out"), "kernel height extent 3", LARGER,
        "height 2 (2 + 2*0)")
refused("conv_shape-w-larger_than_x", call("conv_shape", x_shape=(1, 2, 2, 2)), ValueError,
        "conv2d_output_shape: w_shape:", "kernel height extent 3", LARGER, "height 2 (2 + 2*0)")
refused("conv_shape-w-larger_with_dilation", call("conv_shape", dilation=(1, 3)), ValueError,
        "conv2d_output_shape: w_shape:", "kernel width extent 7 (size 3, dilation 3)", LARGER,
        "width 5")
# Parameters and sizes whose geometry would overflow 64-bit arithmetic are refused: ops.core
# bounds the parameters to 32 bits, ops._C does too, and computes the geometry in 128 bits for
# shapes a DLPack producer may claim.
PARAM_RANGE = "expected values in [1, 2**31 - 1]"
refused("conv_fwd-dilation-beyond_int32",
        call("conv_fwd", w=_data((3, 2, 5, 5), 4), y_out=_out((1, 3, 5, 5)), dilation=2**62),
        ValueError, at("conv_fwd", "dilation"), PARAM_RANGE, "got (4611686018427387904, ")
refused("conv_bwd_weight-dilation-beyond_int32",
        call("conv_bwd_weight", gy=_data((1, 3, 5, 5), 6), gw_out=_out((3, 2, 5, 5)),
             dilation=2**62), ValueError, at("conv_bwd_weight", "dilation"), PARAM_RANGE)
refused("conv_bwd_data-padding-beyond_int32",
        call("conv_bwd_data", w=_data((3, 2, 1, 1), 4), padding=2**63 - 1), ValueError,
        at("conv_bwd_data", "padding"), "expected values in [0, 2**31 - 1]")
refused("C-conv2d_forward-dilation-beyond_int32", direct(
    "conv2d_forward", _data((1, 2, 5, 5), 3), _data((3, 2, 5, 5), 4), None, _out((1, 3, 5, 5)),
    (1, 1), (0, 0), (2**62, 2**62)), ValueError, "conv2d_forward: dilation:", PARAM_RANGE)
refused("C-conv2d_forward-w-extent_beyond_int64", lambda: _C.conv2d_forward(
    _data((1, 1, 5, 5), 3), fakes.make_capsule(_data((1, 1, 1, 1), 4), shape=(1, 1, 2**60, 1)),
    None, _out((1, 1, 5, 5)), (1, 1), (0, 0), (2**31 - 1, 1)), ValueError,
        "conv2d_forward: w:", "kernel height extent > 2**63", LARGER)
refused("C-conv2d_forward-x-elements_beyond_int64", lambda: _C.conv2d_forward(
    fakes.make_capsule(_data((1, 1, 1, 1), 3), shape=(2**40, 2**40, 1, 1)),
    _data((1, 1, 1, 1), 4), None, _out((1, 1, 1, 1)), (1, 1), (0, 0), (1, 1)), ValueError,
        "conv2d_forward: x:", "malformed DLPack tensor", "more elements than fit in 64 bits")

# ---- outputs aliasing other arguments -----------------------------------------------------------

ALIASES = [  # (case id, call, output, the argument it overlaps)
    ("loss_bwd-gx_out-is_x", call("loss_bwd", gx_out=lambda a: a["x"]), "gx_out", "x"),
    ("loss_bwd-gx_out-view_of_t", call("loss_bwd", gx_out=lambda a: a["t"][:]), "gx_out", "t"),
    ("loss_bwd-gt_out-is_gx_out", call("loss_bwd", gt_out=lambda a: a["gx_out"]), "gx_out",
     "gt"),
    ("loss_bwd-gx_out-overlaps_count", call("loss_bwd", **{
        "count": lambda a: a.setdefault("_buf", _out((7,)))[:1],
        "gx_out": lambda a: a["_buf"][:6].reshape(2, 3)}), "gx_out", "count"),
    ("loss_fwd-loss_out-is_count_out", call("loss_fwd", loss_out=lambda a: a["count_out"]),
     "loss_out", "count"),
    ("loss_fwd-count_out-view_of_x", call("loss_fwd", count_out=lambda a: a["x"].reshape(-1)[2:3]),
     "count_out", "x"),
    ("conv_fwd-y_out-view_of_x",
     call("conv_fwd", y_out=lambda a: a["x"].reshape(-1)[:27].reshape(1, 3, 3, 3)), "y_out",
     "x"),
    ("conv_fwd-y_out-holds_b", call("conv_fwd", b=lambda a: a["y_out"].reshape(-1)[24:]),
     "y_out", "b"),
    ("conv_bwd_data-gx_out-view_of_w",
     call("conv_bwd_data", gx_out=lambda a: a["w"].reshape(-1)[:50].reshape(1, 2, 5, 5)),
     "gx_out", "w"),
    ("conv_bwd_weight-gw_out-overlaps_x", call("conv_bwd_weight", **{
        "x": lambda a: a.setdefault("_buf", _data((60,), 3))[:50].reshape(1, 2, 5, 5),
        "gw_out": lambda a: a["_buf"][6:].reshape(3, 2, 3, 3)}), "gw_out", "x"),
    ("conv_bwd_bias-gb_out-view_of_gy",
     call("conv_bwd_bias", gb_out=lambda a: a["gy"].reshape(-1)[5:8]), "gb_out", "gy"),
]
for case_id, run, name, other in ALIASES:
    refused(case_id, run, ValueError, at(case_id.split("-")[0], name), f"overlaps {other}",
            "outputs must not alias")


# ---- read-only arrays ----------------------------------------------------------------------------
# A read-only input is fine where its producer exports versioned DLPack (NumPy >= 2), which marks
# it read-only; a legacy producer (NumPy 1) cannot export it at all, and the message says what to
# do. The installed NumPy is probed, not assumed from its version; the fakes play both kinds of
# producer whatever NumPy is installed. A read-only output is refused by either route.

#: Whether this NumPy exports a read-only array (versioned DLPack with the read-only flag).
NUMPY_EXPORTS_READ_ONLY = fakes.numpy_exports_read_only()
READ_ONLY_INPUT_HINT = ("could not export it through DLPack", "cannot mark an array read-only",
                        "pass a writable array", "NumPy >= 2")


def _read_only(arg: str):
    def make(a):
        a[arg].setflags(write=False)
        return a[arg]
    return make


def protocol(arg: str, legacy: bool = False, **fields):
    """``arg`` behind a fake producer: a DLPack >= 1.0 one, or a legacy one without
    ``max_version`` (see dlpack_fakes.FakeArray / LegacyFakeArray)."""
    producer = fakes.LegacyFakeArray if legacy else fakes.FakeArray
    return lambda a: producer(a[arg], **fields)


READ_ONLY_OUTPUTS = [  # (case id, call, argument, extra fragments)
    ("conv_fwd-y_out-numpy_read_only",
     call("conv_fwd", y_out=lambda a: np.broadcast_to(a["y_out"], a["y_out"].shape)), "y_out", ()),
    ("loss_bwd-gx_out-numpy_read_only", call("loss_bwd", gx_out=_read_only("gx_out")), "gx_out",
     ()),
    ("loss_fwd-loss_out-versioned_read_only",
     call("loss_fwd", loss_out=capsule("loss_out", versioned=True, read_only=True)), "loss_out",
     ()),
    ("loss_fwd-count_out-protocol_read_only",
     call("loss_fwd", count_out=protocol("count_out", read_only=True)), "count_out", ()),
    ("conv_bwd_bias-gb_out-legacy_read_only",
     call("conv_bwd_bias", gb_out=protocol("gb_out", legacy=True, read_only=True)), "gb_out",
     ("TypeError: NumPy currently only supports dlpack for writeable arrays",)),
]
for case_id, run, name, fragments in READ_ONLY_OUTPUTS:
    refused(case_id, run, ValueError, at(case_id.split("-")[0], name),
            "output array is read-only", "expected a writable array", *fragments)
refused("conv_fwd-y_out-versioned_copied",
        call("conv_fwd", y_out=capsule("y_out", versioned=True, copied=True)), ValueError,
        at("conv_fwd", "y_out"), "exported a copy", "would never reach it")
refused("loss_fwd-x-legacy_read_only", call("loss_fwd", x=protocol("x", legacy=True,
                                                                   read_only=True)),
        ValueError, at("loss_fwd", "x"),
        "TypeError: NumPy currently only supports dlpack for writeable arrays",
        *READ_ONLY_INPUT_HINT)
if not NUMPY_EXPORTS_READ_ONLY:
    refused("loss_fwd-x-numpy_read_only", call("loss_fwd", x=_read_only("x")), ValueError,
            at("loss_fwd", "x"), *READ_ONLY_INPUT_HINT)
    refused("conv_bwd_data-w-numpy_read_only", call("conv_bwd_data", w=_read_only("w")),
            ValueError, at("conv_bwd_data", "w"), *READ_ONLY_INPUT_HINT)


def _loss_and_conv(wrap) -> List[float]:
    """A loss forward and a conv forward with every input passed through ``wrap``."""
    x, t = _data((2, 3), 1), _data((2, 3), 2)
    loss, count = _out((1,)), _out((1,))
    core.sq_error_loss_forward(wrap(x), wrap(t), None, loss, count, count_factor=1.0)
    cx, w, b = _data((1, 2, 5, 5), 3), _data((3, 2, 3, 3), 4), _data((3,), 5)
    y = _out((1, 3, 3, 3))
    core.conv2d_forward(wrap(cx), wrap(w), wrap(b), y)
    return [float(loss[0]), float(count[0])] + y.ravel().tolist()


def _read_only_copy(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flags.writeable = False
    return array


def _read_only_same_as_writable(wrap):
    return lambda: {"got": _loss_and_conv(wrap), "want": _loss_and_conv(lambda a: a)}


accepted("fake-valid_versioned_read_only_protocol_inputs",
         _read_only_same_as_writable(lambda a: fakes.FakeArray(a, read_only=True)))
if NUMPY_EXPORTS_READ_ONLY:
    accepted("numpy-valid_read_only_inputs", _read_only_same_as_writable(_read_only_copy))

refused("conv_fwd-x-torch_requires_grad", call("conv_fwd", x=torch_tensor(
    "x", lambda t: t.requires_grad_())), ValueError, at("conv_fwd", "x"),
        "could not export it through DLPack", "require gradient", needs=NEEDS_TORCH)
refused("loss_bwd-gx_out-torch_requires_grad", call("loss_bwd", gx_out=torch_tensor(
    "gx_out", lambda t: t.requires_grad_())), ValueError, at("loss_bwd", "gx_out"),
        "could not export it through DLPack", "require gradient", needs=NEEDS_TORCH)

# ---- count_factor and stream --------------------------------------------------------------------

for key in ("loss_fwd", "loss_bwd"):
    for label, value, got in (("zero", 0.0, "got 0"), ("negative", -0.5, "got -0.5"),
                              ("nan", float("nan"), "got nan"), ("inf", float("inf"), "got inf")):
        refused(f"{key}-count_factor-{label}", call(key, count_factor=value), ValueError,
                at(key, "count_factor"), "expected a finite number > 0", got)
refused("loss_fwd-count_factor-None", call("loss_fwd", count_factor=None), TypeError,
        at("loss_fwd", "count_factor"), "None")
refused("C-sq_error_loss_backward-count_factor-negative", direct(
    "sq_error_loss_backward", _data((2, 3), 1), _data((2, 3), 2), None, np.ones(1, F32),
    np.ones(1, F32), _out((2, 3)), None, -1.0), ValueError,
        "sq_error_loss_backward: count_factor:", "expected a finite number > 0", "got -1")

STREAM = "stream: expected None or a cudaStream_t handle as an int"
for case_id, run, raises, got in [
        ("loss_fwd-stream-negative", call("loss_fwd", stream=-1), ValueError, "got -1"),
        ("conv_bwd_bias-stream-negative", call("conv_bwd_bias", stream=-5), ValueError, "got -5"),
        ("conv_fwd-stream-str", call("conv_fwd", stream="0"), TypeError, "got '0'"),
        ("loss_bwd-stream-float", call("loss_bwd", stream=1.5), TypeError, "got 1.5")]:
    refused(case_id, run, raises, at(case_id.split("-")[0], "stream"), STREAM, got)
refused("C-conv2d_backward_bias-stream-negative", direct(
    "conv2d_backward_bias", _data((1, 3, 3, 3), 6), _out((3,)), -1), ValueError,
        "conv2d_backward_bias: stream:", "expected None or a CUDA stream handle >= 0", "got -1")
refused("loss_fwd-stream-names_function", call("loss_fwd", stream=-1), ValueError,
        "sq_error_loss_forward: stream:")
refused("loss_fwd-stream-beyond_int64", call("loss_fwd", stream=2**64), ValueError,
        "stream:", "got 18446744073709551616")

# ---- DLPack capsules and producers --------------------------------------------------------------

CAPSULES = [  # (case id, call, argument, type, fragments)
    ("loss_fwd-x-used_capsule", call("loss_fwd", x=lambda a: fakes.used_capsule(a["x"])), "x",
     ValueError, ("already consumed by another library", "export the array again")),
    ("conv_fwd-w-used_capsule", call("conv_fwd", w=lambda a: fakes.used_capsule(a["w"])), "w",
     ValueError, ("already consumed by another library",)),
    ("loss_fwd-x-foreign_capsule", call("loss_fwd", x=lambda a: fakes.foreign_capsule(a["x"])),
     "x", TypeError, ("expected a DLPack capsule named 'dltensor'",
                      "got a capsule named 'not_a_dltensor'")),
    ("conv_bwd_bias-gb_out-unnamed_capsule",
     call("conv_bwd_bias", gb_out=capsule("gb_out", name=None)), "gb_out", TypeError,
     ("expected a DLPack capsule named 'dltensor'", "got a capsule named ''")),
    ("loss_fwd-x-null_data", call("loss_fwd", x=capsule("x", data=None)), "x", ValueError,
     ("null data pointer",)),
    ("conv_fwd-y_out-null_data", call("conv_fwd", y_out=capsule("y_out", data=None)), "y_out",
     ValueError, ("null data pointer",)),
    ("loss_fwd-x-negative_ndim", call("loss_fwd", x=capsule("x", ndim=-1)), "x", ValueError,
     ("malformed DLPack tensor", "ndim -1")),
    ("loss_fwd-x-huge_ndim", call("loss_fwd", x=capsule("x", ndim=40)), "x", ValueError,
     ("malformed DLPack tensor", "ndim 40")),
    ("loss_fwd-t-null_shape", call("loss_fwd", t=capsule("t", shape=(), ndim=2)), "t",
     ValueError, ("malformed DLPack tensor", "ndim 2")),
    ("loss_fwd-t-negative_dimension", call("loss_fwd", t=capsule("t", shape=(2, -3))), "t",
     ValueError, ("malformed DLPack tensor", "negative dimension")),
    ("loss_fwd-x-dlpack_version_2", call("loss_fwd", x=capsule(
        "x", name=b"dltensor_versioned", versioned=True, version=(2, 0))), "x", ValueError,
     ("unsupported DLPack version 2.0", "expected 1.x")),
    ("loss_fwd-x-producer_raises", call("loss_fwd", x=lambda a: fakes.RaisingArray()), "x",
     ValueError, ("could not export it through DLPack", "RuntimeError: this producer cannot")),
    ("conv_fwd-w-cuda_producer_raises", call("conv_fwd", w=lambda a: fakes.RaisingArray(
        BufferError("no export today"), device=(fakes.KDL_CUDA, 0))), "w", ValueError,
     ("could not export it through DLPack", "BufferError: no export today")),
    # A TypeError earns the legacy retry (see _control_producer_asked), and the retry's
    # own error is what the message shows.
    ("loss_fwd-t-producer_raises_type_error", call("loss_fwd", t=lambda a: fakes.RaisingArray(
        TypeError("no float32 today"))), "t", ValueError,
     ("could not export it through DLPack", "TypeError: no float32 today")),
]
for case_id, run, name, raises, fragments in CAPSULES:
    refused(case_id, run, raises, at(case_id.split("-")[0], name), *fragments)


class _ReturnsNotACapsule:
    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        return 42

    def __dlpack_device__(self):
        return (fakes.KDL_CPU, 0)


class _DeviceIsNotATuple(fakes.FakeArray):
    def __dlpack_device__(self):
        return 5


class _DeviceTypeIsAString(fakes.FakeArray):
    def __dlpack_device__(self):
        return ("cuda", 0)


refused("loss_fwd-x-dlpack_device_not_a_tuple",
        call("loss_fwd", x=lambda a: _DeviceIsNotATuple(a["x"])), ValueError,
        at("loss_fwd", "x"), "could not export it through DLPack",
        "__dlpack_device__() returned 5", "expected a (device_type, device_id) pair of ints")
refused("loss_fwd-x-dlpack_returns_int", call("loss_fwd", x=lambda a: _ReturnsNotACapsule()),
        TypeError, at("loss_fwd", "x"), "__dlpack__", "int")
refused("loss_fwd-x-dlpack_device_type_str",
        call("loss_fwd", x=lambda a: _DeviceTypeIsAString(a["x"])), ValueError,
        at("loss_fwd", "x"), "__dlpack_device__")

# Messages name the public parameter (y_out), not ops._C's (y).
for case_id, run, name in [
        ("conv_fwd-y_out-names_parameter",
         call("conv_fwd", y_out=reshaped("y_out", (1, 3, 4, 4))), "y_out"),
        ("loss_fwd-count_out-names_parameter",
         call("loss_fwd", count_out=reshaped("count_out", (2,))), "count_out")]:
    refused(case_id, run, ValueError, f"{FUNCTIONS[case_id.split('-')[0]][0]}: {name}:")


# ---- positive controls: valid calls through the same runner -------------------------------------

def _loss_reference(x, t, v, count_factor):
    v = np.ones_like(x) if v is None else v
    count = v.sum(dtype=np.float64)
    return float((((x - t) * v) ** 2).sum(dtype=np.float64) / (count * count_factor)), count


def _loss_forward(x_arg, t_arg, x, t, v=None, count_factor=1.0):
    loss, count = _out((1,)), _out((1,))
    core.sq_error_loss_forward(x_arg, t_arg, v, loss, count, count_factor=count_factor)
    want_loss, want_count = _loss_reference(x, t, v, count_factor)
    return {"got": [float(loss[0]), float(count[0])], "want": [want_loss, want_count]}


def _control_loss_forward():
    x, t = _data((2, 3), 1), _data((2, 3), 2)
    return _loss_forward(x, t, x, t)


def _control_loss_forward_masked():
    x, t = _data((4, 2), 1), _data((4, 2), 2)
    v = np.array([[1, 1], [0, 0], [1, 1], [1, 1]], F32)
    return _loss_forward(x, t, x, t, v, core.DEEPPOSE_COUNT_FACTOR)


def _control_loss_backward():
    x, t = _data((2, 3), 1, F64), _data((2, 3), 2, F64)
    gx, gt = _out((2, 3), F64), _out((2, 3), F64)
    core.sq_error_loss_backward(x, t, None, np.array([6.0]), np.array([0.5]), gx, gt,
                                count_factor=1.0)
    want = 0.5 * 2 * (x - t) / 6.0
    return {"got": [gx.tolist(), gt.tolist()], "want": [want.tolist(), (-want).tolist()]}


def _control_conv_forward_torch():
    import torch
    import torch.nn.functional as F
    x, w, b = (torch.from_numpy(_data(s, i)) for i, s in
               enumerate(((2, 2, 6, 5), (3, 2, 3, 2), (3,)), start=3))
    shape = core.conv2d_output_shape(x.shape, w.shape, stride=(2, 1), padding=1)
    y = torch.full(shape, float("nan"))
    core.conv2d_forward(x, w, b, y, stride=(2, 1), padding=1)
    want = F.conv2d(x, w, b, stride=(2, 1), padding=1)
    return {"got": y.tolist(), "want": want.tolist()}


def _control_kernel_fills_padded_input():
    x, w = _data((1, 2, 1, 1), 3), _data((3, 2, 3, 3), 4)
    y = _out((1, 3, 1, 1))
    core.conv2d_forward(x, w, None, y, padding=1)
    want = (w[:, :, 1, 1] * x[0, :, 0, 0]).sum(axis=1)  # only the centre tap sees x
    return {"got": y.ravel().tolist(), "want": want.tolist()}


def _control_conv_backward_bias():
    gy, gb = _data((2, 3, 4, 5), 6, F64), _out((3,), F64)
    core.conv2d_backward_bias(gy, gb)
    return {"got": gb.tolist(), "want": gy.sum(axis=(0, 2, 3)).tolist()}


def _control_fake_capsules():
    # The fakes describe memory as a real producer would: same answer as plain NumPy.
    x, t = _data((2, 3), 1), _data((2, 3), 2)
    return _loss_forward(fakes.make_capsule(x, strides=(3, 1)), fakes.FakeArray(t), x, t)


def _control_size_one_axes_any_stride():
    # A stride on a size-1 axis is never used, so it need not be the "contiguous" one.
    x = _data((1, 2, 5, 5), 3)
    w = _data((3, 2, 3, 3), 4)
    y, want = _out((1, 3, 3, 3)), _out((1, 3, 3, 3))
    core.conv2d_forward(fakes.make_capsule(x, strides=(12345, 25, 5, 1)), w, None, y)
    core.conv2d_forward(x, w, None, want)
    return {"got": y.tolist(), "want": want.tolist()}


def _control_versioned_read_only_input():
    x, t = _data((2, 3), 1), _data((2, 3), 2)
    versioned = fakes.make_capsule(x, name=b"dltensor_versioned", versioned=True, read_only=True)
    return _loss_forward(versioned, t, x, t)


def _control_cuda_host_memory():
    x, t = _data((2, 3), 1), _data((2, 3), 2)  # pinned host memory is CPU-readable
    return _loss_forward(fakes.make_capsule(x, device=(fakes.KDL_CUDA_HOST, 0)), t, x, t)


def _control_same_array_twice():
    x = _data((2, 3), 1)
    return _loss_forward(x, x, x, x)


def _control_asks_for_versioned_dlpack():
    x, t = _data((2, 3), 1), _data((2, 3), 2)
    producer = fakes.FakeArray(x)
    result = _loss_forward(producer, t, x, t)
    # Asked once, for DLPack 1.0, and the versioned capsule it gave was read correctly.
    asked = [n for version in producer.max_versions for n in version]
    return {"got": result["got"] + asked, "want": result["want"] + [1, 0]}


def _control_legacy_producer():
    x, t = _data((2, 3), 1), _data((2, 3), 2)
    return _loss_forward(fakes.LegacyFakeArray(x), fakes.LegacyFakeArray(t), x, t)


def _control_producer_asked(error, want_calls):
    """How a failing producer is asked: once for DLPack 1.0, then again the legacy way only
    where its error is a TypeError (which may mean it does not know max_version); the call
    fails either way. One number per call: 1 asked with max_version=(1, 0), 0 without."""
    def run():
        producer = fakes.RaisingArray(error)
        with pytest.raises(ValueError):
            call("loss_fwd", x=producer)()
        return {"got": [int(c["max_version"] == (1, 0)) for c in producer.calls],
                "want": want_calls}
    return run


def _control_upgraded_producer_asked_for_versioned():
    """ops._C remembers producer types that refused max_version; a type whose __dlpack__ is
    replaced by one that takes it is asked for DLPack 1.0 again (a read-only input then works)."""
    class Upgraded(fakes.LegacyFakeArray):
        pass

    x, t = _data((2, 3), 1), _data((2, 3), 2)
    first = _loss_forward(Upgraded(x), t, x, t)  # refuses max_version: remembered as legacy
    Upgraded.__dlpack__ = fakes.FakeArray.__dlpack__
    producer = Upgraded(x, read_only=True)
    second = _loss_forward(producer, t, x, t)
    return {"got": first["got"] + second["got"] + [len(producer.max_versions)],
            "want": first["want"] + second["want"] + [1]}


def _stream_asked_of_cuda_producer(stream, want, producer=fakes.FakeArray):
    """The DLPack stream a CUDA producer is asked for (the call then fails: no GPU here)."""
    def run():
        a = _valid_loss_forward()
        x = producer(a["x"], device=(fakes.KDL_CUDA, 0), data=bogus_address())
        args = [on_cuda(name)(a) for name in ("t", "loss_out", "count_out")]
        with pytest.raises(RuntimeError):
            core.sq_error_loss_forward(x, args[0], None, *args[1:], count_factor=1.0,
                                       stream=stream)
        return {"got": x.streams, "want": [want]}
    return run


accepted("loss_fwd-valid", _control_loss_forward)
accepted("loss_fwd-valid_mask_deeppose", _control_loss_forward_masked)
accepted("loss_bwd-valid_float64_with_gt", _control_loss_backward)
accepted("conv_fwd-valid_torch_stride_padding", _control_conv_forward_torch, needs=NEEDS_TORCH)
accepted("conv_fwd-valid_kernel_equals_padded_input", _control_kernel_fills_padded_input)
accepted("conv_bwd_bias-valid_float64", _control_conv_backward_bias)
accepted("conv_shape-valid", lambda: {
    "got": list(core.conv2d_output_shape((2, 3, 7, 6), (4, 3, 3, 2), stride=(2, 1),
                                         padding=(1, 0), dilation=(1, 2))),
    "want": [2, 4, 4, 4]})
accepted("fake-valid_capsule_and_protocol_object", _control_fake_capsules)
accepted("fake-valid_any_stride_on_size_one_axes", _control_size_one_axes_any_stride)
accepted("fake-valid_versioned_read_only_input", _control_versioned_read_only_input)
accepted("fake-valid_cuda_host_memory", _control_cuda_host_memory)
accepted("loss_fwd-valid_same_array_as_x_and_t", _control_same_array_twice)
for label, stream, want in (("None", None, 1), ("0", 0, 1), ("7", 7, 7)):
    accepted(f"fake-cuda_producer_asked_for_stream_{label}",
             _stream_asked_of_cuda_producer(stream, want), needs=("no_gpu",))
accepted("fake-legacy_cuda_producer_asked_for_stream_7", _stream_asked_of_cuda_producer(
    7, 7, producer=fakes.LegacyFakeArray), needs=("no_gpu",))
accepted("fake-asks_for_versioned_dlpack", _control_asks_for_versioned_dlpack)
accepted("fake-valid_legacy_producer", _control_legacy_producer)
accepted("fake-upgraded_producer_asked_for_versioned",
         _control_upgraded_producer_asked_for_versioned)
accepted("fake-producer_error_asked_once", _control_producer_asked(
    RuntimeError("no export today"), [1]))
accepted("fake-producer_type_error_asked_again_legacy", _control_producer_asked(
    TypeError("no export today"), [1, 0]))


# ---- harness controls: a crash and a hang must show up as such ----------------------------------

def _segfault():
    ctypes.string_at(0)


def _hang():
    time.sleep(60)


CASES.append(Case("harness-segfault", _segfault, "harness", outcome="crashed"))
CASES.append(Case("harness-hang", _hang, "harness", outcome="hung", timeout_s=1.0))


# ---- the runner ---------------------------------------------------------------------------------

def _jsonable(value):
    try:
        return json.loads(json.dumps(value, default=lambda o: np.asarray(o).tolist()))
    except (TypeError, ValueError):
        return repr(value)


def _child_main(results_path: str) -> None:
    """Runs the case ids on stdin, one JSON line per start and per outcome."""
    import faulthandler
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a deliberate segfault needs no core file
    faulthandler.enable()
    by_id = {case.id: case for case in CASES}
    with open(results_path, "a") as out:
        def emit(record):
            out.write(json.dumps(record) + "\n")
            out.flush()  # in the kernel's hands before the next case can crash us

        for case_id in json.load(sys.stdin):
            case = by_id[case_id]
            emit({"id": case_id, "event": "start"})
            faulthandler.dump_traceback_later(case.timeout_s, exit=True)
            try:
                value = case.call()
            except BaseException as error:  # noqa: B902 - SystemExit too is an outcome
                record = {"outcome": "raised", "type": type(error).__name__,
                          "message": str(error)}
            else:
                record = {"outcome": "returned", "value": _jsonable(value)}
            finally:
                faulthandler.cancel_dump_traceback_later()
            emit({"id": case_id, "event": "end", **record})


def _death(returncode: Optional[int], stderr: str) -> str:
    if returncode is None or "Timeout (" in stderr:
        return "hung"
    if returncode < 0:
        return "crashed"
    return f"died (exit code {returncode})"


def _run_children(case_ids: Sequence[str]) -> Tuple[Dict[str, dict], List[dict]]:
    """Outcome per case id, and one record per child launched."""
    results: Dict[str, dict] = {}
    launches: List[dict] = []
    pending = list(case_ids)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                      env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as tmp:
        while pending:
            path = Path(tmp) / f"results-{len(launches)}.jsonl"
            path.touch()
            try:
                proc = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--child", str(path)],
                    input=json.dumps(pending), capture_output=True, text=True, cwd=REPO_ROOT,
                    env=env, timeout=CHILD_TIMEOUT_S)
                returncode, stderr = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as expired:
                returncode = None
                stderr = expired.stderr or ""
                stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
            running = None
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if record.pop("event") == "start":
                    running = record["id"]
                else:
                    results[record.pop("id")] = record
                    running = None
            launch = {"returncode": returncode, "stderr": stderr[-4000:], "blamed": running}
            launches.append(launch)
            if running is not None:
                results[running] = {"outcome": _death(returncode, stderr),
                                    "returncode": returncode, "stderr": stderr[-4000:]}
            left = [case_id for case_id in pending if case_id not in results]
            if running is None and left:
                # Died outside any case (at start-up?): no point starting it again.
                for case_id in left:
                    results[case_id] = {"outcome": "not run", "returncode": returncode,
                                        "stderr": stderr[-4000:]}
                left = []
            pending = left
    return results, launches


@pytest.fixture(scope="module")
def child_results():
    runnable = [case.id for case in CASES if case.skip_reason() is None]
    # The deliberate deaths go one third and two thirds of the way in, so that the cases
    # after each are seen to run in a fresh child.
    harness = [case_id for case_id in runnable if case_id.startswith("harness-")]
    ordered = [case_id for case_id in runnable if case_id not in harness]
    for i, case_id in enumerate(harness, start=1):
        ordered.insert(i * len(ordered) // (len(harness) + 1), case_id)
    return _run_children(ordered)


def _describe(result: dict) -> str:
    if result["outcome"] == "raised":
        return f"{result['type']}: {result['message']}"
    if result["outcome"] == "returned":
        return f"returned {result['value']!r}"
    return f"{result['outcome']} (exit code {result.get('returncode')}):\n{result.get('stderr')}"


def _params(kind: str):
    return [pytest.param(case, id=case.id, marks=(
        [pytest.mark.xfail(strict=True, reason=case.defect)] if case.defect else []))
        for case in CASES if case.kind == kind]


def _result(case: Case, child_results) -> dict:
    reason = case.skip_reason()
    if reason:
        pytest.skip(reason)
    return child_results[0][case.id]


@pytest.mark.parametrize("case", _params("refused"))
def test_bad_input_is_refused(case: Case, child_results):
    result = _result(case, child_results)
    got = _describe(result)
    assert result["outcome"] == "raised", f"expected {case.raises.__name__}, got {got}"
    assert result["type"] == case.raises.__name__, (
        f"expected {case.raises.__name__}, got {got}")
    for fragment in case.fragments:
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(option in result["message"] for option in options), (
            f"message lacks {' or '.join(map(repr, options))}: {got}")


@pytest.mark.parametrize("case", _params("accepted"))
def test_valid_input_through_the_runner(case: Case, child_results):
    result = _result(case, child_results)
    assert result["outcome"] == "returned", f"valid call failed: {_describe(result)}"
    value = result["value"]
    got, want = np.asarray(value["got"], F64), np.asarray(value["want"], F64)
    assert got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-6), (
        f"got {value['got']}, want {value['want']}")


@pytest.mark.parametrize("case", _params("harness"))
def test_runner_reports_crashes_and_hangs(case: Case, child_results):
    result = _result(case, child_results)
    assert result["outcome"] == case.outcome, _describe(result)
    if case.outcome == "crashed":
        assert result["returncode"] == -signal.SIGSEGV
        assert "Fatal Python error: Segmentation fault" in result["stderr"]


def test_every_child_exit_is_accounted_for(child_results):
    """A child ends cleanly or dies in a case it is blamed for: a crash at exit shows too, and
    the runner went on after each deliberate death."""
    results, launches = child_results
    unexplained = [launch for launch in launches
                   if launch["returncode"] != 0 and launch["blamed"] is None]
    assert not unexplained, unexplained
    blamed = {launch["blamed"] for launch in launches}
    assert {case.id for case in CASES if case.kind == "harness"} <= blamed, launches
    assert launches[-1]["returncode"] == 0 and launches[-1]["blamed"] is None, launches[-1]


def test_case_ids_are_unique():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(sys.argv[2])
