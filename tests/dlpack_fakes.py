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
from types import SimpleNamespace
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
IS_COPIED_FLAG = 1 << 1

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
_BY_VERSION = object()  # "dltensor_versioned" for a versioned capsule, else "dltensor"


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
                 name: Optional[bytes] = _BY_VERSION,
                 versioned: bool = False,
                 version: Tuple[int, int] = (1, 0),
                 read_only: bool = False,
                 copied: bool = False):
    """A DLPack capsule describing ``array``'s memory, with any field overridden.

    device: (device type, device id), e.g. ``(KDL_CUDA, 0)`` to fake a GPU array.
    dtype: a name from :data:`DTYPES` or (code, bits, lanes); default: the array's dtype.
    shape / ndim: default the array's; ``ndim`` alone changes only the ndim field (a malformed
    tensor); ``shape=()`` with ``ndim`` > 0 leaves the shape pointer NULL.
    strides: in elements; None (default) sends a NULL pointer, i.e. "compact row-major". Use
    :func:`element_strides` to describe a NumPy view truthfully.
    data: default the array's address; None sends a NULL pointer, an int any address.
    name: the capsule's name (b"dltensor", b"used_dltensor", anything; None for a NULL name);
    default b"dltensor_versioned" for a versioned capsule, else b"dltensor".
    versioned / version / read_only / copied: build a ``DLManagedTensorVersioned`` instead, with
    that version and the read-only and is-copied flags.
    """
    if name is _BY_VERSION:
        name = b"dltensor_versioned" if versioned else b"dltensor"
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
        managed.flags = (READ_ONLY_FLAG if read_only else 0) | (IS_COPIED_FLAG if copied else 0)
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

    It behaves like a DLPack >= 1.0 producer (NumPy >= 2, PyTorch): asked with ``max_version``
    >= (1, 0) it exports a versioned capsule, asked without it a legacy one, and a read-only
    array (``read_only=True``) it refuses to export the legacy way (legacy DLPack cannot say
    read-only), with NumPy's error. ``versioned=`` among the fields forces the capsule kind.
    Each ``__dlpack__`` call builds a fresh capsule from ``array`` and the ``make_capsule``
    fields given here, and records the ``stream`` and ``max_version`` it was asked for in
    ``streams`` and ``max_versions`` (the DLPack stream protocol: a consumer passes its stream to
    a CUDA producer). ``flags.writeable`` answers as a NumPy array's does.
    """

    def __init__(self, array: np.ndarray, **fields):
        self.array = np.asarray(array)
        self.fields = fields
        self.flags = SimpleNamespace(writeable=not fields.get("read_only", False))
        self.streams: list = []
        self.max_versions: list = []

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.max_versions.append(max_version)
        return self._export(stream, versioned=max_version is not None and
                            tuple(max_version) >= (1, 0))

    def _export(self, stream, versioned: bool):
        self.streams.append(stream)
        fields = dict(self.fields)
        fields.setdefault("versioned", versioned)
        if fields.get("read_only") and not fields["versioned"]:
            raise self._read_only_error()
        return make_capsule(self.array, **fields)

    @staticmethod
    def _read_only_error() -> BaseException:
        return BufferError("Cannot export readonly array since signalling readonly is "
                           "unsupported by DLPack.")  # NumPy 2's, asked the legacy way

    def __dlpack_device__(self) -> Tuple[int, int]:
        return tuple(self.fields.get("device", (KDL_CPU, 0)))


class LegacyFakeArray(FakeArray):
    """A producer from before DLPack 1.0 (NumPy < 2, older CuPy): its ``__dlpack__`` has no
    ``max_version`` parameter, so asking for one is Python's own TypeError, and it only
    exports legacy capsules (refusing a read-only array with NumPy 1's error, a TypeError too)."""

    def __dlpack__(self, *, stream=None):
        return self._export(stream, versioned=False)

    @staticmethod
    def _read_only_error() -> BaseException:
        return TypeError("NumPy currently only supports dlpack for writeable arrays")


class RaisingArray:
    """An array-like object whose ``__dlpack__`` raises, as a producer that cannot export; each
    call's keyword arguments are recorded in ``calls``."""

    def __init__(self, error: BaseException = None, device: Tuple[int, int] = (KDL_CPU, 0)):
        self.error = error if error is not None else RuntimeError("this producer cannot export")
        self.device = device
        self.calls: list = []

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        self.calls.append(dict(stream=stream, max_version=max_version))
        raise self.error

    def __dlpack_device__(self) -> Tuple[int, int]:
        return self.device


# ---- what a real producer supports --------------------------------------------------------------

# Own prototypes: setting argtypes on ctypes.pythonapi's shared function objects would change
# them for every other user in the process.
_PyCapsule_GetName = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
    ("PyCapsule_GetName", ctypes.pythonapi))
_PyCapsule_GetPointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def capsule_name(capsule) -> Optional[bytes]:
    """The name of a PyCapsule (b"dltensor", b"dltensor_versioned", ...)."""
    return _PyCapsule_GetName(capsule)


def numpy_exports_read_only() -> bool:
    """Whether this NumPy can export a read-only array through DLPack: asked for DLPack >= 1.0
    (``max_version``), it gives a versioned capsule with the read-only flag (NumPy >= 2).
    Older ones have no ``max_version`` (TypeError) and refuse read-only arrays (BufferError).
    Probed, not read from the version number."""
    array = np.zeros(1, np.float32)
    array.flags.writeable = False
    try:
        capsule = array.__dlpack__(max_version=(1, 0))
    except (TypeError, BufferError):
        return False
    if capsule_name(capsule) != b"dltensor_versioned":
        return False
    # Only read: the capsule stays unconsumed, so its destructor frees the export.
    managed = ctypes.cast(_PyCapsule_GetPointer(capsule, b"dltensor_versioned"),
                          ctypes.POINTER(DLManagedTensorVersioned)).contents
    return bool(managed.flags & READ_ONLY_FLAG)
