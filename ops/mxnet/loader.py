"""What this MXNet can run, and what every ops.mxnet entry point shares, MXNet's defects included.

- The operator library ``ops/libdeepprof_mxnet.so`` (impl="native"), built by setup.py from
  ``csrc/mxnet_ops.cc`` against the lib_api.h of the installed mxnet wheel, is loaded here with
  ``mx.library.load``, once; where it was not built or does not load, impl="native" is
  unavailable and :func:`native_unavailable_reason` says why.
- :func:`impl_support` / :func:`available_impls` tell which impls run on which context.
- :func:`check_types` and :func:`check_like_x` are the argument checks every entry point
  shares (as in ops.torch.loader).
- :func:`onednn_active` says whether MXNet computes with oneDNN in this process (compiled in
  *and* not switched off with ``MXNET_MKLDNN_ENABLED=0``), probed, not assumed.
- :class:`Function` is ``mx.autograd.Function`` with MXNet 1.9.1's gradient hand-over fixed
  (see there); the explicit and kernel impls derive from it imperatively.
- :func:`custom_op` puts a CustomOp into a graph (the explicit and kernel impls in hybridized
  blocks) past MXNet 1.9.1's oneDNN race; :func:`kernel_target` / :func:`assign_from` honour a
  CustomOp's write requests; :func:`dlpack_in`, :func:`dlpack_read`, :func:`dlpack_saved` and
  :func:`dlpack_out` hand NDArrays to our kernels with MXNet's asynchronous engine in mind.
- :func:`restore_plain_layout` undoes oneDNN's in-place reorder of a weight.

MXNet 1.9.1 defects worked around in this adapter (each where it can be handled for every user
of ops.mxnet, not in the code that uses the adapter):

1. ``mx.autograd.Function`` drops gradients: its hand-over stops at the first input without a
   gradient, and grad_req='add' is ignored. :class:`Function` corrects it.
2. Arrays a oneDNN operator left in its blocked layout cannot be exported through DLPack:
   :func:`dlpack_read` exports a plain copy of those.
3. A CustomOp fed straight from a oneDNN operator reads unconverted data: in graphs the
   explicit and kernel impls get their data through an out-of-place copy (:func:`custom_op`).
4. Engine deadlock when training with the kernel impl imperatively. Its Function's backward
   runs on an MXNet engine thread and is declared to MXNet as reading the output gradients
   only, not the inputs it saved; the optimizer's update of a weight, queued by
   ``Trainer.step`` before that backward has run, waits for the gradient the backward writes.
   A backward that waited for the weight's pending writes (what ``to_dlpack_for_read`` does)
   would wait for that update: neither runs, and the next call that touches the weight hangs.
   Avoided inside the Functions, so a training loop needs no wait of its own: their forward
   keeps the arrays it read, waited for and plain (:func:`dlpack_read`), and their backward
   reads those without waiting again (:func:`dlpack_saved`). That is safe because every write
   queued before the forward was finished when it read them, and the writes a training loop
   queues after it (the optimizer's) need the gradient this backward writes, so the engine
   runs them after it. Changing a saved input in place between forward and backward is, as in
   every autograd, not supported (MXNet's own operators would then see the new values; ours
   may see either). CustomOps (the kernel impl in graphs) are not affected: MXNet declares
   their inputs as dependencies and hands them arrays of their own.
5. oneDNN reorders a convolution's weight *in place* into its blocked layout when MXNet's own
   convolution runs in inference mode (not ``autograd.is_training()``), and the array stays so
   until a training-mode convolution reorders it back. A CustomOp given such a weight (the
   kernel impl in a hybridized graph) reads garbage, the kernel impl imperatively exports a
   copy of it on every call, and NumPy cannot be copied into it (``Parameter.set_data``).
   ``ops.mxnet.Conv2D`` puts its weight back into the plain layout after each inference call
   it runs with impl="framework", and when its impl changes to one of our kernels (a
   hybridized parent's graph runs the convolution without calling the layer; the impl switch
   still goes through it) with :func:`restore_plain_layout`, which anyone holding other
   arrays can call. The price: oneDNN reorders the weight again at the next inference call
   (as it does at every training call) instead of keeping its reordered copy.
6. A hang at interpreter exit with our Python work still queued: MXNet runs the Python code of
   CustomOps (the explicit and kernel impls in graphs) and of Functions' backward on its own
   threads, which cannot take the GIL once the interpreter is finalizing, and MXNet's own exit
   handler then waits for them forever (seen with the kernel impl's CustomOp). Importing
   this module registers a drain of MXNet's queue (``mx.nd.waitall``) with ``atexit``; handlers
   run last-registered first, and mxnet registers its shutdown when it is imported (above),
   so the drain runs before it.

A seventh is not worked around: the native operators cannot accumulate gradients (lib_api
gives external operators no OpReqType), so grad_req='add' on their inputs is not supported;
``Conv2D`` refuses it.

An eighth is turned from a crash into an error: MXNet 1.9.1 imported into a process that has
already imported TensorFlow 2.17 dies inside ``import mxnet`` (SIGSEGV loading libmxnet.so,
or SIGFPE; here with oneDNN on or off in either, and with PyTorch imported in between), while
MXNet first and TensorFlow after works. Nothing in Python can catch that, so this module
refuses with an ImportError before it imports mxnet; import MXNet (or ops.mxnet) first.

Nothing here computes a loss or a convolution.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import sys
import traceback
from pathlib import Path
from typing import Dict, Optional, Tuple

if "mxnet" not in sys.modules and "tensorflow" in sys.modules:
    raise ImportError("ops.mxnet: TensorFlow is already imported in this process, and MXNet "
                      "1.9.1 crashes the interpreter when imported after it (defect 8 in "
                      "ops/mxnet/loader.py); import mxnet (or ops.mxnet) before tensorflow")

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd as _autograd
from mxnet.base import (_LIB, DLPackHandle, MXCallbackList, NDArrayHandle, c_array,
                        c_handle_array, check_call)
# The capsule name and destructor MXNet's own to_dlpack_for_read uses, for exports that must
# not wait (defect 4 in the module docstring).
from mxnet.ndarray.ndarray import _c_dlpack_deleter, _c_str_dltensor

from ..impls import CONV_IMPLS, LOSS_IMPLS, UnsupportedImplError, check_float

LIBRARY = Path(__file__).resolve().parent.parent / "libdeepprof_mxnet.so"
#: The operators the library registers (mx.nd.<name>, mx.sym.<name>).
NATIVE_OPS = ("deepprof_sq_error_loss", "deepprof_conv2d")

_IMPLS = {"loss": LOSS_IMPLS, "conv": CONV_IMPLS}
_CPU_TYPES = ("cpu", "cpu_pinned", "cpu_shared")  # MXNet's host-memory contexts
_KERNEL_ON_GPU = ("MXNet runs GPU ops on its own non-blocking CUDA streams and does not expose "
                  "them to Python, and ops.core never synchronises, so a kernel launched from "
                  "Python could race MXNet's work; impl='native' runs on the stream MXNet hands "
                  "the op")


def _drain_engine_at_exit() -> None:
    """Defect 6: runs MXNet's queued work while the interpreter can still run its Python parts.
    An error in that work can no longer reach its caller: it is reported, and exit goes on."""
    try:
        mx.nd.waitall()
    except mx.base.MXNetError as error:
        print(f"ops.mxnet: queued MXNet work failed at exit: {error}", file=sys.stderr)


atexit.register(_drain_engine_at_exit)


@functools.lru_cache(maxsize=None)
def onednn_active() -> bool:
    """True when MXNet computes with oneDNN in this process: compiled in
    (``mx.runtime.Features``) and not switched off (``MXNET_MKLDNN_ENABLED=0``, which MXNet
    reads once, at start). Compiled-in alone is not enough, so this asks MXNet: the output of a
    small convolution is left in oneDNN's blocked layout, which MXNet refuses to export, only
    when oneDNN computed it. Probed once, at the first call (not at import: MXNet fixes some
    settings, bulking among them, at its first operator)."""
    if not mx.runtime.Features().is_enabled("MKLDNN"):
        return False
    with _autograd.pause():
        x = mx.nd.ones((1, 16, 4, 4), ctx=mx.cpu())
        y = mx.nd.Convolution(x, mx.nd.ones((16, 16, 3, 3), ctx=mx.cpu()), kernel=(3, 3),
                              pad=(1, 1), num_filter=16, no_bias=True)
        return _in_onednn_layout(y)


def _in_onednn_layout(array) -> bool:
    """Whether ``array`` (its pending writes done) is in oneDNN's blocked layout: MXNet's refusal
    to export it is the only public sign."""
    try:
        array.to_dlpack_for_read()
    except mx.base.MXNetError as error:
        if "MKLDNN" not in str(error):
            raise
        return True
    return False


@functools.lru_cache(maxsize=None)
def native_unavailable_reason() -> Optional[str]:
    """None when the deepprof_* operators are loaded into MXNet, else why not (loads them on
    the first call)."""
    if not LIBRARY.exists():
        return (f"{LIBRARY.name} was not built (mxnet was not installed when ops was built, or "
                f"OPS_MXNET=0); rebuild with `pip install --no-build-isolation -e .`")
    try:
        mx.library.load(str(LIBRARY), verbose=False)
    except (mx.base.MXNetError, OSError) as error:  # e.g. built against another MXNet's lib_api
        return f"{LIBRARY.name} does not load into mxnet {mx.__version__}: {error}"
    missing = [name for name in NATIVE_OPS if not hasattr(mx.nd, name)]
    if missing:
        return f"{LIBRARY.name} loaded but did not register {', '.join(missing)}"
    return None


@functools.lru_cache(maxsize=None)
def _native_gpu_unavailable_reason() -> Optional[str]:
    reason = native_unavailable_reason()
    if reason is not None:
        return reason
    if not ctypes.CDLL(str(LIBRARY)).deepprof_mxnet_gpu_built():
        return (f"{LIBRARY.name} was built without its GPU registration (DEEPPROF_MXNET_GPU=0 "
                f"or no CUDA kernels)")
    return None


def native_op(F, name: str):
    """``mx.nd.<name>`` or ``mx.sym.<name>`` (F is the module); UnsupportedImplError when the
    library is missing."""
    reason = native_unavailable_reason()
    if reason is not None:
        raise UnsupportedImplError(f"impl='native' is not available here: {reason}")
    return getattr(F, name)


def _device_type(device) -> str:
    if isinstance(device, mx.Context):
        return device.device_type
    if isinstance(device, str) and device.split(":")[0] in _CPU_TYPES + ("gpu", "cuda"):
        return "gpu" if device.startswith("cuda") else device.split(":")[0]
    raise ValueError(f"ops.mxnet.impl_support: device: expected 'cpu', 'gpu', 'gpu:N' ('cuda', "
                     f"'cuda:N' as in the other adapters) or an mx.Context, got {device!r}")


def impl_support(kind: str, device="cpu") -> Dict[str, Optional[str]]:
    """Every impl of ``kind`` ("loss" or "conv") mapped to None when it runs here on ``device``
    ("cpu", "gpu", "gpu:N", "cuda", "cuda:N" or an mx.Context), or to the reason it does
    not."""
    if kind not in _IMPLS:
        raise ValueError(f"ops.mxnet.impl_support: kind: expected 'loss' or 'conv', got {kind!r}")
    device_type = _device_type(device)
    support: Dict[str, Optional[str]] = {impl: None for impl in _IMPLS[kind]}
    if device_type in _CPU_TYPES:
        support["native"] = native_unavailable_reason()
    elif mx.context.num_gpus() == 0:
        reason = ("this MXNet has no GPU (built without CUDA, or no device: "
                  "mx.context.num_gpus() is 0)")
        support = {impl: reason for impl in support}
    else:
        support["kernel"] = _KERNEL_ON_GPU
        support["native"] = _native_gpu_unavailable_reason()
    return support


def available_impls(kind: str, device="cpu") -> Tuple[str, ...]:
    """The impls of ``kind`` that run here on ``device`` (see :func:`impl_support`)."""
    return tuple(impl for impl, reason in impl_support(kind, device).items() if reason is None)


def unavailable_impls(kind: str, device) -> Dict[str, str]:
    """impl -> reason for those of ``kind`` that do not run on ``device`` (an mx.Context; None
    for Symbols, whose context is chosen when the graph is bound: then only whether the native
    library is loaded is known): the ``unavailable`` argument of ``ops.impls.check_impl``."""
    if device is None:
        reason = native_unavailable_reason()
        return {} if reason is None else {"native": reason}
    return {impl: reason for impl, reason in impl_support(kind, device).items() if reason}


def check_types(function: str, arrays: Dict[str, object]):
    """Every argument (None where optional and absent) is an NDArray, or every one a Symbol (in
    a hybridized block). Returns the module they belong to, ``mx.nd`` or ``mx.sym``."""
    x = arrays["x"]
    if isinstance(x, mx.sym.Symbol):
        kind, F, what = mx.sym.Symbol, mx.sym, "an mx.sym.Symbol"
    elif isinstance(x, mx.nd.NDArray):
        kind, F, what = mx.nd.NDArray, mx.nd, "an mx.nd.NDArray"
    else:
        raise TypeError(f"{function}: x: expected an mx.nd.NDArray (or an mx.sym.Symbol in a "
                        f"hybridized block), got {type(x).__name__}")
    for name, value in arrays.items():
        if value is not None and not isinstance(value, kind):
            raise TypeError(f"{function}: {name}: expected {what} like x, "
                            f"got {type(value).__name__}")
    return F


def check_like_x(function: str, impl: str, arrays: Dict[str, object]) -> None:
    """Every NDArray dense, on x's context, of x's floating-point dtype (float32/float64 for our
    kernels): the same rule for every impl, so impls stay interchangeable. Symbols carry no
    dtype or context yet: MXNet checks them when it infers the graph's types."""
    x = arrays["x"]
    if not isinstance(x, mx.nd.NDArray):
        return
    x_dtype = np.dtype(x.dtype)
    for name, value in arrays.items():
        if value is None:
            continue
        if value.stype != "default":
            raise TypeError(f"{function}: {name}: expected a dense NDArray, got storage type "
                            f"{value.stype!r}")
        if value.context != x.context:
            raise ValueError(f"{function}: {name}: is on {value.context} but x is on "
                             f"{x.context}")
        dtype = np.dtype(value.dtype)
        check_float(function, impl, name, dtype.name)
        if dtype.kind != "f":
            raise TypeError(f"{function}: {name}: expected a floating-point NDArray, "
                            f"got {dtype.name}")
        if dtype != x_dtype:
            raise TypeError(f"{function}: {name}: expected {x_dtype.name} like x, "
                            f"got {dtype.name}")


def context_of(array) -> Optional[mx.Context]:
    """An NDArray's context; None for a Symbol."""
    return array.context if isinstance(array, mx.nd.NDArray) else None


def refuse_gpu_kernel(function: str, array) -> None:
    """Our Python-side kernel calls run on CPU arrays only (see impl_support); a hybridized
    graph bound to a GPU reaches them only at run time, so they check there too."""
    if array.context.device_type == "gpu":
        raise UnsupportedImplError(f"{function}: impl='kernel' is not available on "
                                   f"{array.context}: {_KERNEL_ON_GPU}")


_REQ_NULL, _REQ_ADD = _autograd._GRAD_REQ_MAP["null"], _autograd._GRAD_REQ_MAP["add"]


class Function(_autograd.Function):
    """``mx.autograd.Function`` whose gradients reach their inputs.

    MXNet 1.9.1's ``Function.__call__`` hands the gradients over with two bugs: it *returns* at
    the first input whose gradient is not requested (grad_req 'null'), so every later input's
    gradient is silently dropped (``f(x, w)`` with a plain data ``x``: ``w`` never gets one),
    and it compares the integer grad_req with the string 'add', so grad_req='add' accumulates
    nothing. This ``__call__`` is MXNet's with the hand-over corrected, and it also sets
    ``self.needs_input_grad`` (one bool per input) before calling ``backward``, which may then
    return None for an input whose gradient is not requested (as in PyTorch).
    """

    def __init__(self):
        super().__init__()
        self.needs_input_grad: Tuple[bool, ...] = ()

    def __call__(self, *inputs):
        if self._used:
            raise RuntimeError(f"{type(self).__name__}: each Function instance can only be "
                               f"called once; make another")
        self._used = True
        recording = _autograd.set_recording(False)
        try:
            outputs = self.forward(*inputs)
        finally:
            _autograd.set_recording(recording)
        if not recording:
            return outputs
        returned = outputs
        if isinstance(outputs, mx.nd.NDArray):
            outputs = (outputs,)
        key = _autograd.Function._registry.inc()

        def backward_entry(num_ograds, num_igrads, ptrs, reqs, is_train, _):
            try:
                output_grads = [mx.nd.NDArray(ctypes.cast(p, NDArrayHandle), writable=False)
                                for p in ptrs[:num_ograds]]
                input_grads = [mx.nd.NDArray(ctypes.cast(p, NDArrayHandle), writable=True)
                               for p in ptrs[num_ograds:num_ograds + num_igrads]]
                reqs = [reqs[i] for i in range(num_igrads)]
                self.needs_input_grad = tuple(req != _REQ_NULL for req in reqs)
                grads = self.backward(*output_grads)
                if isinstance(grads, mx.nd.NDArray) or grads is None:
                    grads = (grads,)
                if len(grads) != len(input_grads):
                    raise ValueError(f"{type(self).__name__}.backward returned {len(grads)} "
                                     f"gradients for {len(input_grads)} inputs")
                for grad_buffer, grad, req in zip(input_grads, grads, reqs):
                    if req == _REQ_NULL:
                        continue
                    if not isinstance(grad, mx.nd.NDArray):
                        raise TypeError(f"{type(self).__name__}.backward returned "
                                        f"{type(grad).__name__} for an input that needs a "
                                        f"gradient")
                    if req == _REQ_ADD:
                        grad_buffer[:] += grad
                    else:
                        grad_buffer[:] = grad
            except Exception:  # pylint: disable=broad-except
                # MXNet turns a False return into an MXNetError; the traceback is all it shows
                print(f"Error in {type(self).__name__}.backward: {traceback.format_exc()}")
                return False
            return True

        def delete_entry(_):
            try:
                del _autograd.Function._registry.ref_holder[key]
            except Exception:  # pylint: disable=broad-except
                print(f"Error in {type(self).__name__} delete: {traceback.format_exc()}")
                return False
            return True

        callbacks = [_autograd.Function._bwd_functype(backward_entry),
                     _autograd.Function._del_functype(delete_entry)]
        callbacks = [ctypes.cast(c, ctypes.CFUNCTYPE(ctypes.c_int)) for c in callbacks]
        context = MXCallbackList(
            ctypes.c_int(len(callbacks)),
            ctypes.cast(c_array(ctypes.CFUNCTYPE(ctypes.c_int), callbacks),
                        ctypes.POINTER(ctypes.CFUNCTYPE(ctypes.c_int))),
            ctypes.cast(c_array(ctypes.c_void_p, [None] * len(callbacks)),
                        ctypes.POINTER(ctypes.c_void_p)))
        _autograd.Function._registry.ref_holder[key] = context
        check_call(_LIB.MXCustomFunctionRecord(
            ctypes.c_int(len(inputs)), c_handle_array(inputs),
            ctypes.c_int(len(outputs)), c_handle_array(outputs), ctypes.byref(context)))
        return returned


def custom_op(F, op_type: str, inputs, *, output: int = 0, data_inputs=None, **attrs):
    """``F.Custom(*inputs, op_type=op_type, **attrs)[output]`` for a graph (Symbols), safe from
    MXNet 1.9.1's oneDNN race: a CustomOp whose input comes straight from a oneDNN operator
    (an input in the forward pass; an upstream gradient in the backward pass) is handed the
    array before MXNet has finished converting it out of the blocked layout, and reads garbage.
    Where MXNet uses oneDNN, the inputs numbered in ``data_inputs`` (default: all) and the
    output therefore pass through an out-of-place copy made by an operator without a oneDNN
    path (``swapaxes`` of axis 0 with itself, which any rank has), which hands the CustomOp
    plain arrays in both passes. Parameters (a conv's weight and bias) need no copy, and must
    not get one: shape inference could not fill in an unknown in_channels through it. That is
    a copy per data input and output: part of what a CustomOp costs in a graph here. Where
    oneDNN is not active (:func:`onednn_active`) nothing is blocked and nothing is copied."""
    copy = onednn_active()
    if copy:
        wrap = range(len(inputs)) if data_inputs is None else data_inputs
        inputs = [F.swapaxes(a, dim1=0, dim2=0) if i in wrap else a
                  for i, a in enumerate(inputs)]
    outputs = F.Custom(*inputs, op_type=op_type, **attrs)
    result = outputs[output] if len(outputs) > 1 else outputs
    return F.swapaxes(result, dim1=0, dim2=0) if copy else result


def assign_from(target, req: str, result) -> None:
    """Writes a kernel's ``result`` into an output MXNet handed a CustomOp, honouring its
    ``req`` (no-op when ``result`` is ``target``, i.e. the kernel wrote in place)."""
    if req == "null" or result is target:
        return
    if req == "add":
        target[:] += result
    else:
        target[:] = result


def kernel_target(target, req: str):
    """Where a kernel should write an output MXNet handed a CustomOp: the output itself when
    it is simply overwritten, a fresh array otherwise (accumulation, or an in-place output our
    kernels, which refuse aliasing, cannot write)."""
    if req == "write":
        return target
    return mx.nd.empty(target.shape, ctx=target.context, dtype=target.dtype)


def _export(array):
    """MXNet's read capsule for ``array``, without waiting for anything."""
    handle = DLPackHandle()
    check_call(_LIB.MXNDArrayToDLPack(array.handle, ctypes.byref(handle)))
    return ctypes.pythonapi.PyCapsule_New(handle, _c_str_dltensor, _c_dlpack_deleter)


def dlpack_read(array):
    """(read capsule for our kernels, the array it views). First waits for MXNet's pending
    writes to ``array`` (the engine is asynchronous), so the kernel, which runs synchronously on
    this thread, reads finished data.

    MXNet's CPU build keeps some arrays (outputs of its own convolutions, for one) in oneDNN's
    blocked layout, which it refuses to export (defect 2): those are exported from a copy, which
    MXNet makes in the plain layout (for the native operators MXNet reorders such inputs itself).
    The capsule holds the copy alive; a Function keeps the viewed array for its backward
    (:func:`dlpack_saved`)."""
    array.wait_to_read()
    try:
        return _export(array), array
    except mx.base.MXNetError as error:
        if "MKLDNN" not in str(error):
            raise
    plain = array.copy()
    plain.wait_to_read()
    return _export(plain), plain


def dlpack_in(array):
    """A read capsule for our kernels (None stays None): :func:`dlpack_read`'s capsule."""
    return None if array is None else dlpack_read(array)[0]


def dlpack_saved(array):
    """A read capsule, without waiting, of an array a Function's forward read through
    :func:`dlpack_read` and kept for its backward (None stays None). Waiting there could
    deadlock with the optimizer's queued update (defect 4 in the module docstring); the data
    was final when the forward read it, and stays so until the backward is done."""
    return None if array is None else _export(array)


def dlpack_out(array):
    """A write capsule for our kernels. ``to_dlpack_for_write`` first waits for MXNet's pending
    reads and writes of ``array``; once the kernel returns, the data is final, before any later
    MXNet op on it can be queued."""
    return array.to_dlpack_for_write()


def _wait_to_write(array) -> None:
    check_call(_LIB.MXNDArrayWaitToWrite(array.handle))


def restore_plain_layout(array) -> bool:
    """Puts ``array`` back into MXNet's plain layout where oneDNN reordered it in place (defect 5
    in the module docstring: a weight after MXNet's convolution ran in inference mode); True
    when it had to. The same NDArray, so whatever holds it (a Parameter, a Trainer's states)
    sees the plain data. Waits for the array's pending work: oneDNN queues its reorder while
    the convolution runs, so a first wait for the array's readers makes sure it is queued and a
    second that it is done. A no-op (False) where oneDNN is not active, off the CPU and for
    sparse arrays."""
    if not isinstance(array, mx.nd.NDArray):
        raise TypeError(f"ops.mxnet.loader.restore_plain_layout: array: expected an "
                        f"mx.nd.NDArray, got {type(array).__name__}")
    if (array.context.device_type not in _CPU_TYPES or array.stype != "default"
            or not onednn_active()):
        return False
    _wait_to_write(array)
    _wait_to_write(array)
    if not _in_onednn_layout(array):
        return False
    # MXNDArrayGetData queues a reorder of a blocked array to the default layout, in place,
    # and waits for it (MXNet's c_api.cc): the array itself changes, not a copy of it.
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(ctypes.c_void_p())))
    return True
