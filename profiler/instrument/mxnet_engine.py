"""MXNet's engine and the C engine marks (ops._C, csrc/engine_marks.cpp), for the MXNet
instrument (profiler/instrument/mxnet.py): queueing engine operations that only read the clock,
recording an identity on the autograd tape whose backward calls back, reading the marks taken,
and measuring whether MXNet bulks its backward operators.

Engine marks: the boundary operations run no Python. Their function is C (deepprof_engine_mark,
csrc/engine_marks.cpp): it stores the slot and the clock reading, and ends and starts the NVTX
ranges; the Python side reads the marks once the engine has run the pass (``collect_marks``,
from the instrument's finish_backward) and records the ranges. A Python function there had to
take the GIL, which the main thread holds while it queues the next operators, so the engine
stalled at every boundary: +12% [+8.6, +14.2] of a ResNet-20 step (batch 32, this 2-core CPU,
60 interleaved rounds), against +1.7% [-0.7, +5.5] with a C function in the same run. Only the
output marker's backward is Python (MXNet's custom functions are), once per pass.

Slots: whoever registers one (``new_slot``, ``mark_slot``) is called back by method name with
the argument it registered (and, for a mark, the clock reading in ns); it is held weakly, and
the slots live as long as the process, since MXNet may call back after their owner is gone.

This module knows nothing of layers, recorders or reports: which ranges a layer gets, and when,
is profiler/instrument/mxnet.py's. It must not change what the network computes: the marker is
an identity and the engine operations write nothing.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import traceback
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import mxnet as mx
from mxnet import autograd
from mxnet.base import _LIB, MXCallbackList, NDArrayHandle, check_call
from mxnet.ndarray import NDArray

from ops import _C

# How long backward_is_bulked waits for the engine: its work takes microseconds.
PROBE_TIMEOUT_S = 1.0

# ---- MXNet's C interfaces --------------------------------------------------------------------
# EngineSyncFunc(RunContext*, param); a custom function's backward(num_ograds, num_igrads,
# handles, reqs, is_train, context) and delete(context), as in mxnet.autograd.Function.
_ENGINE_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_MARKER_BACKWARD_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_void_p),
                                       ctypes.POINTER(ctypes.c_int), ctypes.c_int,
                                       ctypes.c_void_p)
_MARKER_DELETE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
_REQ_NULL, _REQ_ADD = autograd._GRAD_REQ_MAP["null"], autograd._GRAD_REQ_MAP["add"]
_CPU_PRIORITIZED = ctypes.c_int(3)  # mxnet::FnProperty::kCPUPrioritized
# MXNet's own NDArray.backward, before the instrument wraps it: the probe's backward pass must
# not reach the instrument's wrapper.
_NDARRAY_BACKWARD = NDArray.backward


class _Context(ctypes.Structure):
    """mxnet::Context: the engine runs the boundary operations on the CPU."""
    _fields_ = [("dev_type", ctypes.c_int), ("dev_id", ctypes.c_int)]


_CPU = _Context(1, 0)

# Callbacks are looked up by slot: slot -> (weak reference to its owner, method, argument).
# MXNet may call a callback after its owner is gone (a recorded graph outlives the instrument's
# remove()), so slots, their C callback lists and the C function objects live as long as the
# process.
_SLOTS: List[Optional[Tuple[weakref.ref, str, object]]] = [None]  # slot 0: NULL means none
_KEEP_ALIVE: List[object] = []


def new_slot(owner, method: str, argument=None) -> int:
    """A slot whose dispatch calls ``owner.method(argument)`` while ``owner`` is alive."""
    _SLOTS.append((weakref.ref(owner), method, argument))
    return len(_SLOTS) - 1


def _dispatch(slot: Optional[int]) -> None:
    entry = _SLOTS[slot] if slot else None
    if entry is None:
        return
    owner = entry[0]()
    if owner is not None:
        getattr(owner, entry[1])(entry[2])


def _on_engine(_run_context, slot) -> None:
    try:
        _dispatch(slot)
    except Exception:  # an engine thread cannot raise into Python: report, keep training
        traceback.print_exc()


def _on_marker_backward(num_ograds, num_igrads, handles, reqs, _is_train, slot) -> int:
    """The marker's backward: its input's gradient is its output's, then the boundary."""
    try:
        # MXNet allocated these handles for us: the NDArrays free them.
        ograd = NDArray(ctypes.cast(handles[0], NDArrayHandle), writable=False)
        igrad = NDArray(ctypes.cast(handles[1], NDArrayHandle), writable=True)
        if reqs[0] == _REQ_ADD:
            igrad += ograd
        elif reqs[0] != _REQ_NULL:
            ograd.copyto(igrad)
        _dispatch(slot)
        return True
    except Exception:
        # MXNet turns False into an MXNetError at the next wait; the traceback is all it shows.
        print(f"Error in the profiler's MXNet output marker: {traceback.format_exc()}")
        return False


def _on_marker_delete(_slot) -> int:
    return True


_ENGINE_CALLBACK = _ENGINE_FN(_on_engine)
_MARKER_BACKWARD = _MARKER_BACKWARD_FN(_on_marker_backward)
_MARKER_DELETE = _MARKER_DELETE_FN(_on_marker_delete)
_MARKER_CALLBACKS = (ctypes.CFUNCTYPE(ctypes.c_int) * 2)(
    ctypes.cast(_MARKER_BACKWARD, ctypes.CFUNCTYPE(ctypes.c_int)),
    ctypes.cast(_MARKER_DELETE, ctypes.CFUNCTYPE(ctypes.c_int)))


def marker_callbacks(slot: int) -> MXCallbackList:
    """The callback list of a marker whose backward dispatches ``slot``; MXNet keeps a pointer
    to it in every graph node recorded with it, so it is never freed."""
    contexts = (ctypes.c_void_p * 2)(slot, slot)
    callbacks = MXCallbackList(
        ctypes.c_int(2),
        ctypes.cast(_MARKER_CALLBACKS, ctypes.POINTER(ctypes.CFUNCTYPE(ctypes.c_int))),
        ctypes.cast(contexts, ctypes.POINTER(ctypes.c_void_p)))
    _KEEP_ALIVE.append((callbacks, contexts))
    return callbacks


def _handles(arrays: Sequence[NDArray]):
    return (NDArrayHandle * len(arrays))(*[a.handle for a in arrays])


def mark(array: NDArray, callbacks: MXCallbackList) -> NDArray:
    """An identity of ``array`` on the autograd tape (a view of the same memory) whose backward
    calls the marker callbacks ``callbacks``. Only while autograd is recording."""
    marked = array.detach()
    check_call(_LIB.MXCustomFunctionRecord(1, _handles([array]), 1, _handles([marked]),
                                           ctypes.byref(callbacks)))
    return marked


def push_boundary(slot: int, reads: Sequence[NDArray], writes: Sequence[NDArray], *,
                  own_thread: bool = False, callback=None) -> None:
    """Queues an engine operation that dispatches ``slot`` once every operation queued before
    it that writes ``reads``, or reads or writes ``writes``, has run: on the CPU worker, in
    queue order, or (``own_thread``) on one of MXNet's CPU-priority threads. It writes nothing;
    declaring ``writes`` makes later operations on them wait for it. ``callback``: the C
    function called with ``slot`` (default: Python's _dispatch; _C_MARK for a C mark)."""
    check_call(_LIB.MXEnginePushSyncND(
        callback or _ENGINE_CALLBACK, ctypes.c_void_p(slot), None, ctypes.byref(_CPU),
        _handles(reads), len(reads), _handles(writes), len(writes),
        ctypes.byref(_CPU_PRIORITIZED) if own_thread else None, 0,
        b"deepprof_layer_boundary"))


# ---- engine marks (csrc/engine_marks.cpp) ----------------------------------------------------
NO_EVENT, NEXT_EVENT = -1, -2   # a mark that starts no NVTX range / its track's next one
# deepprof_engine_mark as MXNet's EngineSyncFunc: takes the mark in C, without the GIL.
_C_MARK = _ENGINE_FN(_C.engine_mark_callback())
# slot -> (weak reference to its owner, method, argument): who reads a mark, as _SLOTS.
_MARK_OWNERS: Dict[int, Tuple[weakref.ref, str, object]] = {}
_NVTX_MESSAGES: Dict[int, str] = {}   # NVTX event index -> message, for collect_marks


def mark_slot(owner, method: str, argument, track: int, event: int) -> int:
    """A C mark slot on ``track`` starting NVTX ``event``, read by ``owner.method``."""
    slot = _C.engine_mark_slot(track, event)
    _MARK_OWNERS[slot] = (weakref.ref(owner), method, argument)
    return slot


def push_mark(slot: int, reads: Sequence[NDArray], writes: Sequence[NDArray]) -> None:
    """push_boundary whose operation takes a C mark of ``slot`` (0: ordering only)."""
    push_boundary(slot, reads, writes, callback=_C_MARK)


def collect_marks() -> List[str]:
    """Hands every mark taken since the last call, in time order, to its owner's method
    (argument, ns); returns the messages of the NVTX ranges those marks started."""
    started = []
    for slot, ns, event in sorted(_C.engine_marks_take(), key=lambda mark: mark[1]):
        owner = _MARK_OWNERS.get(slot)
        reader = owner[0]() if owner else None
        if reader is not None:
            getattr(reader, owner[1])(owner[2], ns)
        if event >= 0:
            started.append(_NVTX_MESSAGES.get(event, f"event {event}"))
    return started


def register_nvtx_event(message: str, colour: str) -> int:
    """The NVTX C API event of (``message``, ``colour``) for a mark slot to start, its message
    kept for collect_marks."""
    from ops import nvtx
    event = nvtx.register(message, colour)
    _NVTX_MESSAGES[event] = message
    return event


# ---- backward bulking --------------------------------------------------------------------------
class _Probe:
    """The two boundaries of backward_is_bulked: a gate that blocks, and a flag."""

    def __init__(self):
        self.open, self.fired = threading.Event(), threading.Event()

    def gate(self, _=None) -> None:
        self.open.wait(PROBE_TIMEOUT_S)

    def fire(self, _=None) -> None:
        self.fired.set()


@functools.lru_cache(maxsize=None)
def backward_is_bulked() -> bool:
    """Whether this process's MXNet runs consecutive backward operators as one engine
    operation (measured once: MXNet fixed it at its first operator).

    A backward pass of two multiplications, z = (x * a) * b, whose second backward operator
    (reading x) is held up by a gate writing x. Unbulked, the first one (reading b) runs on its
    own and a boundary queued behind it on b fires; bulked, both are one operation that waits
    for the gate, and the boundary does not fire before the timeout."""
    probe = _Probe()
    gate, fire = new_slot(probe, "gate"), new_slot(probe, "fire")
    x, a, b = (mx.nd.ones((1,), ctx=mx.cpu()) for _ in range(3))
    a.attach_grad()
    b.attach_grad()
    with autograd.record():
        z = (x * a) * b
    push_boundary(gate, (), [x], own_thread=True)  # the CPU worker must stay free
    try:
        _NDARRAY_BACKWARD(z)
        push_boundary(fire, (), [b])
        fired = probe.fired.wait(PROBE_TIMEOUT_S)
    finally:
        probe.open.set()
    mx.nd.waitall()
    return not fired
