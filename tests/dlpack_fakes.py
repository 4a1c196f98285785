"""Hand-made DLPack capsules for tests: any field a producer could send, pointing at NumPy memory.

Real producers (NumPy, PyTorch) only export what they believe in, so the tests cannot ask them for
a GPU array on a machine without a GPU, a bfloat16 or 4-lane dtype from NumPy, strides that lie,
a null data pointer, or a capsule some other library already consumed. ``make_capsule`` builds
the ``DLManagedTensor`` (or ``DLManagedTensorVersioned``) of csrc/dlpack_abi.h with ctypes, lets
the caller override any field, and wraps it in a PyCapsule named as asked.

Memory safety: the capsule's struct, shape and stride arrays, name and the NumPy array behind the
data pointer are held in ``_KEEPALIVE`` under the capsule's ``id`` for as long as the capsule
lives (an entry is dropped only when a later capsule reuses the id, i.e. after the first died).
The struct's deleter and the capsule destructor are both NULL: ``ops._C`` only borrows a capsule
and never calls the deleter, and nothing here owns memory that would need freeing.

A fake describes the memory as told, truthfully or not: a dtype, shape or stride that claims
more bytes than the array has is only safe in a call that must refuse it before any kernel runs.
On a machine with a GPU, a fake CUDA tensor points at host memory: never let such a call proceed.

This module must not import ``ops``: it fakes a producer, it does not test anything itself.
"""

from __future__ import annotations

import ctypes
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np

# Device types and type codes, fixed by the DLPack standard (see csrc/dlpack_abi.h).
KDL_CPU = 1
KDL_CUDA = 2
KDL_CUDA_HOST = 3
KDL_OPENCL = 4
KDL_ROCM = 10
KDL_CUDA_MANAGED = 13

KDL_INT = 0
KDL_UINT = 1
KDL_FLOAT = 2
KDL_BFLOAT = 4
KDL_COMPLEX = 5
KDL_BOOL = 6

READ_ONLY_FLAG = 1 << 0

#: dtype names a test may pass as ``dtype=``, as (type code, bits, lanes).
DTYPES: Dict[str, Tuple[int, int, int]] = {
    "float32": (KDL_FLOAT, 32, 1),
    "float64": (KDL_FLOAT, 64, 1),
    "float16": (KDL_FLOAT, 16, 1),
    "bfloat16": (KDL_BFLOAT, 16, 1),
    "float32x4": (KDL_FLOAT, 32, 4),
    "int32": (KDL_INT, 32, 1),
    "int64": (KDL_INT, 64, 1),
    "uint8": (KDL_UINT, 8, 1),
    "bool": (KDL_BOOL, 8, 1),
    "complex64": (KDL_COMPLEX, 64, 1),
}

DTypeSpec = Union[str, Tuple[int, int, int]]


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),  # in elements; NULL: compact row-major
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    pass


DLManagedTensor._fields_ = [
    ("dl_tensor", DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))),
]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


DLManagedTensorVersioned._fields_ = [
    ("version", DLPackVersion),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))),
    ("flags", ctypes.c_uint64),
    ("dl_tensor", DLTensor),
]

_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]

# id(capsule) -> everything the capsule points at (see the module docstring).
_KEEPALIVE: Dict[int, tuple] = {}

_FROM_ARRAY = object()  # "take this field from the NumPy array"


def numpy_dtype_spec(dtype: np.dtype) -> Tuple[int, int, int]:
    """(type code, bits, lanes) of a NumPy dtype, as a DLPack producer would describe it."""
    dtype = np.dtype(dtype)
    code = {"f": KDL_FLOAT, "i": KDL_INT, "u": KDL_UINT, "b": KDL_BOOL, "c": KDL_COMPLEX}
    return (code[dtype.kind], dtype.itemsize * 8, 1)


def element_strides(array: np.ndarray) -> Tuple[int, ...]:
    """The array's strides in elements (DLPack's unit), e.g. of a sliced or transposed view."""
    return tuple(s // array.itemsize for s in array.strides)


def make_capsule(array: np.ndarray, *,
                 device: Tuple[int, int] = (KDL_CPU, 0),
                 dtype: Optional[DTypeSpec] = None,
                 shape: Optional[Sequence[int]] = None,
                 ndim: Optional[int] = None,
                 strides: Optional[Sequence[int]] = None,
                 data=_FROM_ARRAY,
                 byte_offset: int = 0,
                 name: Optional[bytes] = b"dltensor",
                 versioned: bool = False,
                 version: Tuple[int, int] = (1, 0),
                 read_only: bool = False):
    """A DLPack capsule describing ``array``'s memory, with any field overridden.

    device: (device type, device id), e.g. ``(KDL_CUDA, 0)`` to fake a GPU array.
    dtype: a name from :data:`DTYPES` or (code, bits, lanes); default: the array's dtype.
    shape / ndim: default the array's; ``ndim`` alone changes only the ndim field (a malformed
    tensor); ``shape=()`` with ``ndim`` > 0 leaves the shape pointer NULL.
    strides: in elements; None (default) sends a NULL pointer, i.e. "compact row-major". Use
    :func:`element_strides` to describe a NumPy view truthfully.
    data: default the array's address; None sends a NULL pointer, an int any address.
    name: the capsule's name (b"dltensor", b"used_dltensor", anything; None for a NULL name).
    versioned / version / read_only: build a ``DLManagedTensorVersioned`` instead (give
    ``name=b"dltensor_versioned"``), with that version and the read-only flag.
    """
    array = np.asarray(array)
    code, bits, lanes = numpy_dtype_spec(array.dtype) if dtype is None else (
        DTYPES[dtype] if isinstance(dtype, str) else dtype)
    dims = tuple(array.shape) if shape is None else tuple(int(d) for d in shape)

    shape_buf = (ctypes.c_int64 * max(len(dims), 1))(*dims)
    stride_buf = None
    if strides is not None:
        stride_buf = (ctypes.c_int64 * max(len(strides), 1))(*[int(s) for s in strides])

    tensor = DLTensor()
    tensor.data = array.ctypes.data if data is _FROM_ARRAY else data
    tensor.device = DLDevice(*device)
    tensor.ndim = len(dims) if ndim is None else ndim
    tensor.dtype = DLDataType(code, bits, lanes)
    if dims:
        tensor.shape = ctypes.cast(shape_buf, ctypes.POINTER(ctypes.c_int64))
    if stride_buf is not None:
        tensor.strides = ctypes.cast(stride_buf, ctypes.POINTER(ctypes.c_int64))
    tensor.byte_offset = byte_offset

    if versioned:
        managed = DLManagedTensorVersioned()
        managed.version = DLPackVersion(*version)
        managed.flags = READ_ONLY_FLAG if read_only else 0
    else:
        managed = DLManagedTensor()
    managed.dl_tensor = tensor  # copies the struct; its pointers still need shape_buf & co

    name_buf = None if name is None else ctypes.create_string_buffer(name)
    capsule = _PyCapsule_New(ctypes.addressof(managed),
                             None if name_buf is None else ctypes.addressof(name_buf), None)
    _KEEPALIVE[id(capsule)] = (managed, shape_buf, stride_buf, name_buf, array)
    return capsule


def used_capsule(array: np.ndarray, **fields):
    """A capsule renamed "used_dltensor", as a consumer leaves it after taking ownership."""
    return make_capsule(array, name=b"used_dltensor", **fields)


def foreign_capsule(array: np.ndarray, name: bytes = b"not_a_dltensor", **fields):
    """A capsule with an unrelated name (not a DLPack tensor at all, as far as anyone can know)."""
    return make_capsule(array, name=name, **fields)


class FakeArray:
    """An array-like object that exports a fake DLPack tensor through the protocol methods.

    Each ``__dlpack__`` call builds a fresh capsule from ``array`` and the ``make_capsule``
    fields given here, and records the ``stream`` it was asked for in ``streams`` (the DLPack
    stream protocol: a consumer passes its stream to a CUDA producer).
    """

    def __init__(self, array: np.ndarray, **fields):
        self.array = np.asarray(array)
        self.fields = fields
        self.streams: list = []

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.streams.append(stream)
        return make_capsule(self.array, **self.fields)

    def __dlpack_device__(self) -> Tuple[int, int]:
        return tuple(self.fields.get("device", (KDL_CPU, 0)))


class RaisingArray:
    """An array-like object whose ``__dlpack__`` raises, as a producer that cannot export."""

    def __init__(self, error: BaseException = None, device: Tuple[int, int] = (KDL_CPU, 0)):
        self.error = error if error is not None else RuntimeError("this producer cannot export")
        self.device = device

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        raise self.error

    def __dlpack_device__(self) -> Tuple[int, int]:
        return self.device
