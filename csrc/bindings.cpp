// ops._C: the framework-agnostic Python door to the kernels.
//
// Every array arrives through DLPack (an object with __dlpack__, or a DLPack capsule), is
// borrowed for the duration of the call (we never take ownership, so the producer's capsule
// destructor frees its bookkeeping as usual), and is checked here before any kernel sees it:
// type, dtype, device, shape, contiguity, emptiness and output/input aliasing. Every failure is
// one Python exception that names the function, the argument, what was expected and what came.
// Kernels run with the GIL released; GPU kernels are enqueued on the caller's stream and never
// synchronised.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "dlpack_abi.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

enum class DType { kFloat32, kFloat64 };

struct Place {
  bool cuda = false;
  int device_id = 0;
  bool operator==(const Place& o) const { return cuda == o.cuda && device_id == o.device_id; }
  std::string str() const { return cuda ? "cuda:" + std::to_string(device_id) : "cpu"; }
};

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) out << ",";
  out << ")";
  return out.str();
}

std::string dtype_str(const dlpack_abi::DataType& t) {
  std::string base;
  switch (t.code) {
    case dlpack_abi::kInt: base = "int"; break;
    case dlpack_abi::kUInt: base = "uint"; break;
    case dlpack_abi::kFloat: base = "float"; break;
    case dlpack_abi::kBfloat: base = "bfloat"; break;
    case dlpack_abi::kComplex: base = "complex"; break;
    case dlpack_abi::kBool: return "bool";
    default: base = "type-code-" + std::to_string(t.code) + "-"; break;
  }
  std::string name = base + std::to_string(t.bits);
  if (t.lanes != 1) name += "x" + std::to_string(t.lanes);
  return name;
}

std::string type_name(py::handle obj) {
  return std::string(py::str(py::type::of(obj).attr("__name__")));
}

// The dtype name of a NumPy/PyTorch/CuPy-like array ("float32", "bool"), "" when it has none.
std::string dtype_of(py::handle obj) {
  if (!py::hasattr(obj, "dtype")) return "";
  py::object dtype = obj.attr("dtype");
  std::string name = py::hasattr(dtype, "name") ? std::string(py::str(dtype.attr("name")))
                                                 : std::string(py::str(dtype));
  const std::string torch_prefix = "torch.";
  if (name.rfind(torch_prefix, 0) == 0) name = name.substr(torch_prefix.size());
  return name;
}

const char* dtype_name(DType d) { return d == DType::kFloat32 ? "float32" : "float64"; }

// The context of one call: its name (for messages), the stream, and the device every array must
// share (set by the first array seen).
struct Call {
  const char* function;
  std::optional<int64_t> stream;
  std::optional<Place> place;
  std::string first_array;

  [[noreturn]] void type_error(const std::string& arg, const std::string& msg) const {
    throw py::type_error(std::string(function) + ": " + arg + ": " + msg);
  }
  [[noreturn]] void value_error(const std::string& arg, const std::string& msg) const {
    throw py::value_error(std::string(function) + ": " + arg + ": " + msg);
  }
  [[noreturn]] void runtime_error(const std::string& msg) const {
    PyErr_SetString(PyExc_RuntimeError, (std::string(function) + ": " + msg).c_str());
    throw py::error_already_set();
  }

  // The DLPack stream value to hand a CUDA producer: 1 (legacy default) for None/0, else as is.
  int64_t dlpack_stream() const { return stream.value_or(0) == 0 ? 1 : *stream; }
  // The cudaStream_t to launch on: None/0/1 are the legacy default stream, 2 per-thread default.
  void* cuda_stream() const {
    const int64_t s = stream.value_or(0);
    return s == 1 ? nullptr : reinterpret_cast<void*>(static_cast<uintptr_t>(s));
  }
};

// One borrowed array. The capsule reference keeps the producer's memory alive for the call.
struct Array {
  std::string name;
  py::object capsule;
  const dlpack_abi::Tensor* t = nullptr;
  bool read_only = false;
  bool copied = false;  // the producer exported a copy: what we write there never reaches it
  DType dtype = DType::kFloat32;
  Place place;
  std::vector<int64_t> shape;
  int64_t numel = 0;

  int64_t dim(int i) const { return shape[i]; }
  size_t itemsize() const { return dtype == DType::kFloat32 ? 4 : 8; }
  char* bytes() const { return static_cast<char*>(t->data) + t->byte_offset; }
  template <typename T>
  T* data() const {
    return reinterpret_cast<T*>(bytes());
  }
};

// Producer types whose __dlpack__ turned out not to take max_version (NumPy 1's ndarray, ...),
// each with the __dlpack__ it had then. Asking them for a versioned capsule again would cost a
// raised and cleared TypeError per array per call (about 1 us: it nearly doubled the time of a
// small NumPy 1 loss call). A type whose __dlpack__ has since been replaced is asked afresh.
// Touched only with the GIL held; a few entries at most, never freed (a static destructor would
// release Python objects after the interpreter is gone).
struct LegacyProducer {
  PyObject* type;
  PyObject* method;
};
std::vector<LegacyProducer>& legacy_producers() {
  static auto* known = new std::vector<LegacyProducer>();
  return *known;
}
constexpr size_t kMaxLegacyProducers = 16;

// The __dlpack__ the type of `obj` has, as a new reference (nullptr, no error set, if none).
PyObject* type_dlpack(py::handle obj) {
  PyObject* method = PyObject_GetAttrString(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())),
                                            "__dlpack__");
  if (!method) PyErr_Clear();
  return method;
}

bool known_legacy_producer(py::handle obj) {
  auto& known = legacy_producers();
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()));
  for (const LegacyProducer& p : known) {
    if (p.type != type) continue;
    PyObject* method = type_dlpack(obj);
    const bool same = method == p.method;
    Py_XDECREF(method);
    return same;
  }
  return false;
}

void remember_legacy_producer(py::handle obj) {
  auto& known = legacy_producers();
  PyObject* method = type_dlpack(obj);
  if (!method) return;
  PyObject* type = reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr()));
  for (LegacyProducer& p : known) {
    if (p.type == type) {  // its __dlpack__ was replaced: keep the one that refused
      Py_DECREF(p.method);
      p.method = method;
      return;
    }
  }
  if (known.size() >= kMaxLegacyProducers) {
    Py_DECREF(method);
    return;
  }
  Py_INCREF(type);
  known.push_back({type, method});
}

// Calls obj.__dlpack__ asking for a versioned capsule (DLPack >= 1.0, the only kind that can say
// an array is read-only), with the stream a CUDA producer must make its data ready on. A producer
// whose __dlpack__ predates max_version (NumPy < 2, older CuPy) rejects the keyword with a
// TypeError; the array API standard's answer is to ask again the legacy way. Only TypeError
// earns that second call, and if the producer then fails too, its second error is the one
// reported: any other error of the first call reaches the caller as the producer raised it.
// `legacy` tells whether the legacy call was made. Raw C API instead of py::error_already_set,
// which costs more, for the TypeError that is expected.
py::object call_dlpack(py::handle obj, bool on_cuda, const Call& call, bool& legacy) {
  py::object method = obj.attr("__dlpack__");
  py::dict kwargs;
  if (on_cuda) kwargs["stream"] = call.dlpack_stream();
  py::tuple no_args;
  const bool known_legacy = known_legacy_producer(obj);
  if (!known_legacy) {
    // Never freed: a static py::object would be destroyed after the interpreter it belongs to.
    static const py::handle max_version = py::make_tuple(1, 0).release();
    kwargs["max_version"] = max_version;
    PyObject* capsule = PyObject_Call(method.ptr(), no_args.ptr(), kwargs.ptr());
    if (capsule) return py::reinterpret_steal<py::object>(capsule);
    if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
    PyErr_Clear();
    PyDict_DelItemString(kwargs.ptr(), "max_version");
  }
  legacy = true;
  PyObject* capsule = PyObject_Call(method.ptr(), no_args.ptr(), kwargs.ptr());
  if (!capsule) throw py::error_already_set();
  // It refused max_version and took the legacy call: its type does not know max_version.
  if (!known_legacy) remember_legacy_producer(obj);
  return py::reinterpret_steal<py::object>(capsule);
}

// True when `obj` says it is a read-only array the NumPy way (flags.writeable is False); False
// for anything else, and for anything whose flags cannot be read.
bool says_read_only(py::handle obj) {
  PyObject* flags = PyObject_GetAttrString(obj.ptr(), "flags");
  if (!flags) {
    PyErr_Clear();
    return false;
  }
  PyObject* writeable = PyObject_GetAttrString(flags, "writeable");
  Py_DECREF(flags);
  if (!writeable) {
    PyErr_Clear();
    return false;
  }
  const int truth = PyObject_IsTrue(writeable);
  Py_DECREF(writeable);
  if (truth < 0) PyErr_Clear();
  return truth == 0;
}

// Turns `obj` into a borrowed DLPack capsule, asking a CUDA producer to make its data ready on
// our stream (the DLPack stream protocol).
py::object export_capsule(py::handle obj, const std::string& name, const Call& call,
                          bool is_output) {
  if (obj.is_none())
    call.type_error(name, "expected an array, got None");
  if (PyCapsule_CheckExact(obj.ptr())) return py::reinterpret_borrow<py::object>(obj);
  if (!py::hasattr(obj, "__dlpack__")) {
    call.type_error(name,
                    "expected an array that exports __dlpack__ (NumPy, PyTorch, CuPy, ...) or a "
                    "DLPack capsule, got " + type_name(obj));
  }
  py::object capsule;
  bool legacy = false;
  try {
    bool on_cuda = false;
    if (py::hasattr(obj, "__dlpack_device__")) {
      py::object device = obj.attr("__dlpack_device__")();
      if (!py::isinstance<py::tuple>(device) || py::len(device) != 2 ||
          !py::isinstance<py::int_>(device[py::int_(0)]) ||
          !py::isinstance<py::int_>(device[py::int_(1)]))
        call.value_error(name, "could not export it through DLPack: __dlpack_device__() "
                               "returned " + std::string(py::repr(device)) +
                               ", expected a (device_type, device_id) pair of ints");
      on_cuda = device[py::int_(0)].cast<int64_t>() == dlpack_abi::kCUDA;
    }
    capsule = call_dlpack(obj, on_cuda, call, legacy);
  } catch (py::error_already_set& e) {
    // When the array's dtype is not one we take, that is the news (NumPy refuses to export
    // bool at all); otherwise the exporter objects to the array's state (read-only, requires
    // grad, byte order) and its own message says which.
    std::string msg = "could not export it through DLPack: " + type_name(e.value()) + ": " +
                      std::string(py::str(e.value()));
    const std::string dtype = dtype_of(obj);
    if (!dtype.empty() && dtype != "float32" && dtype != "float64")
      call.type_error(name, msg + " (expected float32 or float64, got " + dtype + ")");
    // A legacy producer (NumPy < 2) has no way to mark an export read-only, so it refuses to
    // export a read-only array at all, even one we would only read.
    if (legacy && says_read_only(obj)) {
      if (is_output)
        call.value_error(name, "output array is read-only; expected a writable array to write "
                               "the result into (" + msg + ")");
      call.value_error(name, msg + "; this producer cannot mark an array read-only in DLPack "
                                   "(NumPy < 2 cannot), so it refuses to export a read-only "
                                   "input: pass a writable array (np.array(x) copies it) or use "
                                   "NumPy >= 2, whose versioned DLPack export can say read-only");
    }
    call.value_error(name, msg);
  }
  if (!PyCapsule_CheckExact(capsule.ptr()))
    call.type_error(name, "expected its __dlpack__() to return a DLPack capsule, got " +
                              type_name(capsule));
  return capsule;
}

Array borrow(py::handle obj, const std::string& name, Call& call, bool is_output) {
  Array a;
  a.name = name;
  a.capsule = export_capsule(obj, name, call, is_output);
  PyObject* cap = a.capsule.ptr();
  const char* cap_name = PyCapsule_GetName(cap);
  const std::string kind = cap_name ? cap_name : "";
  if (kind == "dltensor") {
    auto* managed = static_cast<dlpack_abi::ManagedTensor*>(PyCapsule_GetPointer(cap, cap_name));
    if (!managed) throw py::error_already_set();
    a.t = &managed->dl_tensor;
  } else if (kind == "dltensor_versioned") {
    auto* managed =
        static_cast<dlpack_abi::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, cap_name));
    if (!managed) throw py::error_already_set();
    if (managed->version.major != 1)
      call.value_error(name, "unsupported DLPack version " +
                                 std::to_string(managed->version.major) + "." +
                                 std::to_string(managed->version.minor) + " (expected 1.x)");
    a.t = &managed->dl_tensor;
    a.read_only = (managed->flags & dlpack_abi::kFlagReadOnly) != 0;
    a.copied = (managed->flags & dlpack_abi::kFlagIsCopied) != 0;
  } else if (kind == "used_dltensor" || kind == "used_dltensor_versioned") {
    call.value_error(name, "this DLPack capsule was already consumed by another library; export "
                           "the array again");
  } else {
    call.type_error(name, "expected a DLPack capsule named 'dltensor', got a capsule named '" +
                              kind + "'");
  }

  const dlpack_abi::Tensor& t = *a.t;
  // Type and layout.
  if (t.dtype.code != dlpack_abi::kFloat || t.dtype.lanes != 1 ||
      (t.dtype.bits != 32 && t.dtype.bits != 64))
    call.type_error(name, "expected float32 or float64, got " + dtype_str(t.dtype));
  a.dtype = t.dtype.bits == 32 ? DType::kFloat32 : DType::kFloat64;
  if (t.ndim < 0 || t.ndim > 32 || (t.ndim > 0 && !t.shape))
    call.value_error(name, "malformed DLPack tensor (ndim " + std::to_string(t.ndim) + ")");
  a.shape.assign(t.shape, t.shape + t.ndim);
  a.numel = 1;
  for (int64_t d : a.shape) {
    if (d < 0) call.value_error(name, "malformed DLPack tensor (negative dimension)");
    if (__builtin_mul_overflow(a.numel, d, &a.numel))
      call.value_error(name, "malformed DLPack tensor (shape " + shape_str(a.shape) +
                                 " has more elements than fit in 64 bits)");
  }
  if (a.numel == 0)
    call.value_error(name, "expected a non-empty array, got shape " + shape_str(a.shape));
  if (t.strides) {
    int64_t expected = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      if (a.shape[i] != 1 && t.strides[i] != expected) {
        std::vector<int64_t> strides(t.strides, t.strides + t.ndim);
        call.value_error(name, "expected a C-contiguous array, got shape " + shape_str(a.shape) +
                                   " with element strides " + shape_str(strides) +
                                   "; make it contiguous first (np.ascontiguousarray, "
                                   "tensor.contiguous(), ...)");
      }
      expected *= a.shape[i];
    }
  }
  if (!t.data) call.value_error(name, "DLPack tensor has a null data pointer");
  if (is_output && a.read_only)
    call.value_error(name, "output array is read-only; expected a writable array to write the "
                           "result into");
  if (is_output && a.copied)
    call.value_error(name, "the producer exported a copy of this output array (DLPack "
                           "IS_COPIED flag), so the result would never reach it; expected the "
                           "array's own memory");

  // Device.
  switch (t.device.device_type) {
    case dlpack_abi::kCPU:
    case dlpack_abi::kCUDAHost: a.place = Place{false, 0}; break;
    case dlpack_abi::kCUDA:
      if (t.device.device_id < 0)
        call.value_error(name, "malformed DLPack tensor (CUDA device id " +
                                   std::to_string(t.device.device_id) + ")");
      a.place = Place{true, t.device.device_id};
      break;
    default:
      call.value_error(name, "unsupported device type " + std::to_string(t.device.device_type) +
                                 " (expected CPU or CUDA memory)");
  }
  if (!call.place) {
    call.place = a.place;
    call.first_array = name;
  } else if (!(*call.place == a.place)) {
    call.value_error(name, "is on " + a.place.str() + " but " + call.first_array + " is on " +
                               call.place->str() + "; all arrays of one call must be on one "
                               "device");
  }
  return a;
}

std::optional<Array> borrow_optional(py::handle obj, const std::string& name, Call& call,
                                     bool is_output) {
  if (obj.is_none()) return std::nullopt;
  return borrow(obj, name, call, is_output);
}

void expect_dtype(const Call& call, const Array& a, const Array& like) {
  if (a.dtype != like.dtype)
    call.type_error(a.name, std::string("expected ") + dtype_name(like.dtype) + " like " +
                                like.name + ", got " + dtype_name(a.dtype));
}

void expect_shape(const Call& call, const Array& a, const std::vector<int64_t>& shape,
                  const std::string& why) {
  if (a.shape != shape)
    call.value_error(a.name, "expected shape " + shape_str(shape) + " (" + why + "), got " +
                                 shape_str(a.shape));
}

void expect_scalar(const Call& call, const Array& a) {
  if (a.numel != 1)
    call.value_error(a.name, "expected a one-element array (shape () or (1,)), got shape " +
                                 shape_str(a.shape));
}

void expect_rank(const Call& call, const Array& a, int rank, const char* layout) {
  if (static_cast<int>(a.shape.size()) != rank)
    call.value_error(a.name, "expected a " + std::to_string(rank) + "-d array " + layout +
                                 ", got shape " + shape_str(a.shape));
}

// An output sharing memory with any other argument would be read while written.
void expect_no_overlap(const Call& call, const Array& out, const std::vector<const Array*>& all) {
  for (const Array* other : all) {
    if (!other || other == &out) continue;
    const char* a0 = out.bytes();
    const char* a1 = a0 + out.numel * out.itemsize();
    const char* b0 = other->bytes();
    const char* b1 = b0 + other->numel * other->itemsize();
    if (a0 < b1 && b0 < a1)
      call.value_error(out.name, "overlaps " + other->name +
                                     " in memory; outputs must not alias other arguments");
  }
}

// Makes the arrays' GPU current for the call and restores the previous one afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(const Call& call) {
    if (!call.place || !call.place->cuda) return;
    if (!kernels::cuda_built())
      call.runtime_error("got arrays on " + call.place->str() +
                         " but this build of ops._C has no CUDA support (nvcc was not found at "
                         "build time, or OPS_CUDA=0); rebuild with CUDA to use GPU arrays");
    const int count = kernels::cuda_device_count();
    if (call.place->device_id >= count)
      call.runtime_error("got arrays on " + call.place->str() + " but " +
                         std::to_string(count) + " CUDA device(s) are usable here");
    try {
      previous_ = kernels::cuda_get_device();
      if (previous_ != call.place->device_id) kernels::cuda_set_device(call.place->device_id);
    } catch (const std::exception& e) {
      call.runtime_error(std::string("could not select ") + call.place->str() + ": " + e.what());
    }
    active_ = true;
  }
  ~DeviceGuard() {
    if (active_ && previous_ >= 0) {
      try {
        kernels::cuda_set_device(previous_);
      } catch (...) {
      }
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool active_ = false;
};

// 32-bit GPU index math needs every tensor below 2^31 elements.
void expect_int32_sized(const Call& call, const std::vector<const Array*>& arrays) {
  if (!call.place || !call.place->cuda) return;
  for (const Array* a : arrays)
    if (a && a->numel >= (int64_t(1) << 31))
      call.value_error(a->name, "has " + std::to_string(a->numel) +
                                    " elements; the CUDA conv kernels take fewer than 2^31");
}

// ... and padded input sizes below 2^31 (the GPU computes ih + pad in 32 bits).
void expect_int32_geometry(const Call& call, const kernels::Conv2dShape& s) {
  if (!call.place || !call.place->cuda) return;
  const int64_t limit = int64_t(1) << 31;
  if (s.in_h + 2 * s.pad_h >= limit || s.in_w + 2 * s.pad_w >= limit)
    call.value_error("padding", "the padded input (" + std::to_string(s.in_h + 2 * s.pad_h) +
                                    " x " + std::to_string(s.in_w + 2 * s.pad_w) +
                                    ") must stay below 2^31 per axis on the CUDA path");
}

template <typename Fn>
void dispatch(DType dtype, Fn&& fn) {
  if (dtype == DType::kFloat32)
    fn(float{});
  else
    fn(double{});
}

// Selects the arrays' GPU (if any), releases the GIL and runs body(T{}, on_cuda, stream) with
// T the arrays' element type. Every Python object the kernel needs was borrowed before this.
template <typename Body>
void run_kernel(const Call& call, DType dtype, Body&& body) {
  DeviceGuard guard(call);
  const bool on_cuda = call.place->cuda;
  void* stream = call.cuda_stream();
  py::gil_scoped_release release;
  dispatch(dtype, [&](auto tag) { body(tag, on_cuda, stream); });
}

Call make_call(const char* function, std::optional<int64_t> stream) {
  Call call{function, stream, std::nullopt, ""};
  if (stream && *stream < 0)
    throw py::value_error(std::string(function) + ": stream: expected None or a CUDA stream "
                          "handle >= 0, got " + std::to_string(*stream));
  return call;
}

double check_count_factor(const Call& call, double count_factor) {
  if (!kernels::valid_count_factor(count_factor)) {
    std::ostringstream got;  // not std::to_string: it prints -1e-300 as "-0.000000"
    got << count_factor;
    call.value_error("count_factor", std::string("expected ") + kernels::kCountFactorExpected +
                                         ", got " + got.str());
  }
  return count_factor;
}

// ---- loss --------------------------------------------------------------------------------------

void sq_error_loss_forward(py::handle x_obj, py::handle t_obj, py::handle v_obj,
                           py::handle loss_obj, py::handle count_obj, double count_factor,
                           std::optional<int64_t> stream) {
  Call call = make_call("sq_error_loss_forward", stream);
  check_count_factor(call, count_factor);
  Array x = borrow(x_obj, "x", call, false);
  Array t = borrow(t_obj, "t", call, false);
  std::optional<Array> v = borrow_optional(v_obj, "v", call, false);
  Array loss = borrow(loss_obj, "loss_out", call, true);
  Array count = borrow(count_obj, "count_out", call, true);
  for (const Array* a : {&t, &loss, &count}) expect_dtype(call, *a, x);
  expect_shape(call, t, x.shape, "same as x");
  if (v) {
    expect_dtype(call, *v, x);
    expect_shape(call, *v, x.shape, "same as x");
  }
  expect_scalar(call, loss);
  expect_scalar(call, count);
  const Array* vp = v ? &*v : nullptr;
  const std::vector<const Array*> all{&x, &t, vp, &loss, &count};
  expect_no_overlap(call, loss, all);
  expect_no_overlap(call, count, all);

  run_kernel(call, x.dtype, [&](auto tag, bool cuda, void* s) {
    using T = decltype(tag);
    const T* vd = v ? v->data<T>() : nullptr;
    if (cuda)
      kernels::sq_error_loss_forward_cuda<T>(x.data<T>(), t.data<T>(), vd, x.numel, count_factor,
                                             loss.data<T>(), count.data<T>(), s);
    else
      kernels::sq_error_loss_forward_cpu<T>(x.data<T>(), t.data<T>(), vd, x.numel, count_factor,
                                            loss.data<T>(), count.data<T>());
  });
}

void sq_error_loss_backward(py::handle x_obj, py::handle t_obj, py::handle v_obj,
                            py::handle count_obj, py::handle grad_loss_obj, py::handle gx_obj,
                            py::handle gt_obj, double count_factor,
                            std::optional<int64_t> stream) {
  Call call = make_call("sq_error_loss_backward", stream);
  check_count_factor(call, count_factor);
  Array x = borrow(x_obj, "x", call, false);
  Array t = borrow(t_obj, "t", call, false);
  std::optional<Array> v = borrow_optional(v_obj, "v", call, false);
  Array count = borrow(count_obj, "count", call, false);
  Array grad_loss = borrow(grad_loss_obj, "grad_loss", call, false);
  Array gx = borrow(gx_obj, "gx_out", call, true);
  std::optional<Array> gt = borrow_optional(gt_obj, "gt_out", call, true);
  for (const Array* a : {&t, &count, &grad_loss, &gx}) expect_dtype(call, *a, x);
  expect_shape(call, t, x.shape, "same as x");
  expect_shape(call, gx, x.shape, "same as x");
  if (v) {
    expect_dtype(call, *v, x);
    expect_shape(call, *v, x.shape, "same as x");
  }
  if (gt) {
    expect_dtype(call, *gt, x);
    expect_shape(call, *gt, x.shape, "same as x");
  }
  expect_scalar(call, count);
  expect_scalar(call, grad_loss);
  const Array* vp = v ? &*v : nullptr;
  const Array* gtp = gt ? &*gt : nullptr;
  const std::vector<const Array*> all{&x, &t, vp, &count, &grad_loss, &gx, gtp};
  expect_no_overlap(call, gx, all);
  if (gt) expect_no_overlap(call, *gt, all);

  run_kernel(call, x.dtype, [&](auto tag, bool cuda, void* s) {
    using T = decltype(tag);
    const T* vd = v ? v->data<T>() : nullptr;
    T* gtd = gt ? gt->data<T>() : nullptr;
    if (cuda)
      kernels::sq_error_loss_backward_cuda<T>(x.data<T>(), t.data<T>(), vd, x.numel,
                                              count.data<T>(), grad_loss.data<T>(),
                                              count_factor, gx.data<T>(), gtd, s);
    else
      kernels::sq_error_loss_backward_cpu<T>(x.data<T>(), t.data<T>(), vd, x.numel,
                                             count.data<T>(), grad_loss.data<T>(), count_factor,
                                             gx.data<T>(), gtd);
  });
}

// Forward and backward in one call: loss_out, count_out, gx_out and (optional) gt_out, with
// grad_loss (optional one-element array; None means 1) as the upstream gradient.
void sq_error_loss_fused(py::handle x_obj, py::handle t_obj, py::handle v_obj,
                         py::handle loss_obj, py::handle count_obj, py::handle gx_obj,
                         py::handle gt_obj, py::handle grad_loss_obj, double count_factor,
                         std::optional<int64_t> stream) {
  Call call = make_call("sq_error_loss_fused", stream);
  check_count_factor(call, count_factor);
  Array x = borrow(x_obj, "x", call, false);
  Array t = borrow(t_obj, "t", call, false);
  std::optional<Array> v = borrow_optional(v_obj, "v", call, false);
  Array loss = borrow(loss_obj, "loss_out", call, true);
  Array count = borrow(count_obj, "count_out", call, true);
  Array gx = borrow(gx_obj, "gx_out", call, true);
  std::optional<Array> gt = borrow_optional(gt_obj, "gt_out", call, true);
  std::optional<Array> grad_loss = borrow_optional(grad_loss_obj, "grad_loss", call, false);
  for (const Array* a : {&t, &loss, &count, &gx}) expect_dtype(call, *a, x);
  expect_shape(call, t, x.shape, "same as x");
  expect_shape(call, gx, x.shape, "same as x");
  for (const std::optional<Array>* a : {&v, &gt}) {
    if (!*a) continue;
    expect_dtype(call, **a, x);
    expect_shape(call, **a, x.shape, "same as x");
  }
  expect_scalar(call, loss);
  expect_scalar(call, count);
  if (grad_loss) {
    expect_dtype(call, *grad_loss, x);
    expect_scalar(call, *grad_loss);
  }
  const Array* vp = v ? &*v : nullptr;
  const Array* gtp = gt ? &*gt : nullptr;
  const Array* gp = grad_loss ? &*grad_loss : nullptr;
  const std::vector<const Array*> all{&x, &t, vp, gp, &loss, &count, &gx, gtp};
  for (const Array* out : std::vector<const Array*>{&loss, &count, &gx, gtp})
    if (out) expect_no_overlap(call, *out, all);

  run_kernel(call, x.dtype, [&](auto tag, bool cuda, void* s) {
    using T = decltype(tag);
    const T* vd = v ? v->data<T>() : nullptr;
    const T* gd = grad_loss ? grad_loss->data<T>() : nullptr;
    T* gtd = gt ? gt->data<T>() : nullptr;
    if (cuda)
      kernels::sq_error_loss_fused_cuda<T>(x.data<T>(), t.data<T>(), vd, x.numel, count_factor,
                                           gd, loss.data<T>(), count.data<T>(), gx.data<T>(),
                                           gtd, s);
    else
      kernels::sq_error_loss_fused_cpu<T>(x.data<T>(), t.data<T>(), vd, x.numel, count_factor,
                                          gd, loss.data<T>(), count.data<T>(), gx.data<T>(),
                                          gtd);
  });
}

// ---- conv2d ------------------------------------------------------------------------------------

using Pair = std::pair<int64_t, int64_t>;

std::string int128_str(__int128 value) {
  if (value >= std::numeric_limits<int64_t>::min() && value <= std::numeric_limits<int64_t>::max())
    return std::to_string(static_cast<int64_t>(value));
  return value < 0 ? "< -2**63" : "> 2**63";
}

struct ConvParams {
  Pair stride, padding, dilation;
};

void check_conv_params(const Call& call, const ConvParams& p) {
  auto pair_str = [](Pair v) {
    return "(" + std::to_string(v.first) + ", " + std::to_string(v.second) + ")";
  };
  // Bounded to 32 bits so no geometry arithmetic below (or in 32-bit GPU indexing) overflows.
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  auto within = [](Pair v, int64_t lo) {
    return v.first >= lo && v.second >= lo && v.first <= kMax && v.second <= kMax;
  };
  if (!within(p.stride, 1))
    call.value_error("stride", "expected values in [1, 2**31 - 1], got " + pair_str(p.stride));
  if (!within(p.padding, 0))
    call.value_error("padding", "expected values in [0, 2**31 - 1], got " + pair_str(p.padding));
  if (!within(p.dilation, 1))
    call.value_error("dilation",
                     "expected values in [1, 2**31 - 1], got " + pair_str(p.dilation));
}

// The geometry from an input-shaped array (B, Cin, H, W) and a weight-shaped array
// (Cout, Cin, kh, kw); refuses kernels that do not fit the padded input.
kernels::Conv2dShape conv_geometry(const Call& call, const Array& input, const Array& weight,
                                   const ConvParams& p) {
  expect_rank(call, input, 4, "(B, Cin, H, W)");
  expect_rank(call, weight, 4, "(Cout, Cin, kh, kw)");
  if (weight.dim(1) != input.dim(1)) {
    call.value_error(weight.name, "expected shape (Cout, " + std::to_string(input.dim(1)) +
                                      ", kh, kw) to match the " + std::to_string(input.dim(1)) +
                                      " input channels of " + input.name + ", got " +
                                      shape_str(weight.shape) +
                                      " (grouped convolution is not implemented)");
  }
  kernels::Conv2dShape s{};
  s.batch = input.dim(0);
  s.in_channels = input.dim(1);
  s.in_h = input.dim(2);
  s.in_w = input.dim(3);
  s.out_channels = weight.dim(0);
  s.kernel_h = weight.dim(2);
  s.kernel_w = weight.dim(3);
  s.stride_h = p.stride.first;
  s.stride_w = p.stride.second;
  s.pad_h = p.padding.first;
  s.pad_w = p.padding.second;
  s.dilation_h = p.dilation.first;
  s.dilation_w = p.dilation.second;
  auto out_size = [&](const char* axis, int64_t in, int64_t k, int64_t stride, int64_t pad,
                      int64_t dil) {
    // 128-bit: a DLPack shape can claim sizes whose products overflow 64 bits.
    const __int128 extent = static_cast<__int128>(dil) * (k - 1) + 1;
    const __int128 padded = static_cast<__int128>(in) + 2 * static_cast<__int128>(pad);
    if (extent > padded)
      call.value_error(weight.name,
                       std::string("kernel ") + axis + " extent " + int128_str(extent) +
                           " (size " + std::to_string(k) + ", dilation " + std::to_string(dil) +
                           ") is larger than the padded input " + axis + " " +
                           int128_str(padded) + " (" + std::to_string(in) + " + 2*" +
                           std::to_string(pad) + ")");
    const __int128 out = (padded - extent) / stride + 1;
    if (out > std::numeric_limits<int32_t>::max() * static_cast<__int128>(1 << 30))
      call.value_error(input.name, std::string("output ") + axis + " " + int128_str(out) +
                                       " is too large");
    return static_cast<int64_t>(out);
  };
  s.out_h = out_size("height", s.in_h, s.kernel_h, s.stride_h, s.pad_h, s.dilation_h);
  s.out_w = out_size("width", s.in_w, s.kernel_w, s.stride_w, s.pad_w, s.dilation_w);
  return s;
}

std::vector<int64_t> output_shape(const kernels::Conv2dShape& s) {
  return {s.batch, s.out_channels, s.out_h, s.out_w};
}

void conv2d_forward(py::handle x_obj, py::handle w_obj, py::handle b_obj, py::handle y_obj,
                    Pair stride, Pair padding, Pair dilation, std::optional<int64_t> stream) {
  Call call = make_call("conv2d_forward", stream);
  const ConvParams p{stride, padding, dilation};
  check_conv_params(call, p);
  Array x = borrow(x_obj, "x", call, false);
  Array w = borrow(w_obj, "w", call, false);
  std::optional<Array> b = borrow_optional(b_obj, "b", call, false);
  Array y = borrow(y_obj, "y_out", call, true);
  expect_dtype(call, w, x);
  expect_dtype(call, y, x);
  const kernels::Conv2dShape s = conv_geometry(call, x, w, p);
  if (b) {
    expect_dtype(call, *b, x);
    expect_shape(call, *b, {s.out_channels}, "Cout");
  }
  expect_shape(call, y, output_shape(s), "B, Cout, OH, OW");
  const Array* bp = b ? &*b : nullptr;
  expect_no_overlap(call, y, {&x, &w, bp});
  expect_int32_sized(call, {&x, &w, &y});
  expect_int32_geometry(call, s);

  run_kernel(call, x.dtype, [&](auto tag, bool cuda, void* st) {
    using T = decltype(tag);
    const T* bd = b ? b->data<T>() : nullptr;
    if (cuda)
      kernels::conv2d_forward_cuda<T>(s, x.data<T>(), w.data<T>(), bd, y.data<T>(), st);
    else
      kernels::conv2d_forward_cpu<T>(s, x.data<T>(), w.data<T>(), bd, y.data<T>());
  });
}

void conv2d_backward_data(py::handle gy_obj, py::handle w_obj, py::handle gx_obj, Pair stride,
                          Pair padding, Pair dilation, std::optional<int64_t> stream) {
  Call call = make_call("conv2d_backward_data", stream);
  const ConvParams p{stride, padding, dilation};
  check_conv_params(call, p);
  Array gy = borrow(gy_obj, "gy", call, false);
  Array w = borrow(w_obj, "w", call, false);
  Array gx = borrow(gx_obj, "gx_out", call, true);
  expect_dtype(call, w, gy);
  expect_dtype(call, gx, gy);
  const kernels::Conv2dShape s = conv_geometry(call, gx, w, p);
  expect_shape(call, gy, output_shape(s), "B, Cout, OH, OW of the conv that made gx's input");
  expect_no_overlap(call, gx, {&gy, &w});
  expect_int32_sized(call, {&gy, &w, &gx});
  expect_int32_geometry(call, s);

  run_kernel(call, gy.dtype, [&](auto tag, bool cuda, void* st) {
    using T = decltype(tag);
    if (cuda)
      kernels::conv2d_backward_data_cuda<T>(s, gy.data<T>(), w.data<T>(), gx.data<T>(), st);
    else
      kernels::conv2d_backward_data_cpu<T>(s, gy.data<T>(), w.data<T>(), gx.data<T>());
  });
}

void conv2d_backward_weight(py::handle x_obj, py::handle gy_obj, py::handle gw_obj, Pair stride,
                            Pair padding, Pair dilation, std::optional<int64_t> stream) {
  Call call = make_call("conv2d_backward_weight", stream);
  const ConvParams p{stride, padding, dilation};
  check_conv_params(call, p);
  Array x = borrow(x_obj, "x", call, false);
  Array gy = borrow(gy_obj, "gy", call, false);
  Array gw = borrow(gw_obj, "gw_out", call, true);
  expect_dtype(call, gy, x);
  expect_dtype(call, gw, x);
  const kernels::Conv2dShape s = conv_geometry(call, x, gw, p);
  expect_shape(call, gy, output_shape(s), "B, Cout, OH, OW");
  expect_no_overlap(call, gw, {&x, &gy});
  expect_int32_sized(call, {&x, &gy, &gw});
  expect_int32_geometry(call, s);

  run_kernel(call, x.dtype, [&](auto tag, bool cuda, void* st) {
    using T = decltype(tag);
    if (cuda)
      kernels::conv2d_backward_weight_cuda<T>(s, x.data<T>(), gy.data<T>(), gw.data<T>(), st);
    else
      kernels::conv2d_backward_weight_cpu<T>(s, x.data<T>(), gy.data<T>(), gw.data<T>());
  });
}

void conv2d_backward_bias(py::handle gy_obj, py::handle gb_obj, std::optional<int64_t> stream) {
  Call call = make_call("conv2d_backward_bias", stream);
  Array gy = borrow(gy_obj, "gy", call, false);
  Array gb = borrow(gb_obj, "gb_out", call, true);
  expect_dtype(call, gb, gy);
  expect_rank(call, gy, 4, "(B, Cout, OH, OW)");
  expect_shape(call, gb, {gy.dim(1)}, "Cout of gy");
  expect_no_overlap(call, gb, {&gy});
  expect_int32_sized(call, {&gy});
  kernels::Conv2dShape s{};
  s.batch = gy.dim(0);
  s.out_channels = gy.dim(1);
  s.out_h = gy.dim(2);
  s.out_w = gy.dim(3);

  run_kernel(call, gy.dtype, [&](auto tag, bool cuda, void* st) {
    using T = decltype(tag);
    if (cuda)
      kernels::conv2d_backward_bias_cuda<T>(s, gy.data<T>(), gb.data<T>(), st);
    else
      kernels::conv2d_backward_bias_cpu<T>(s, gy.data<T>(), gb.data<T>());
  });
}

// Host emulation of the CUDA conv index maps (see kernels.h), on CPU arrays.
void conv2d_cuda_emulated(const std::string& which, py::handle in0_obj, py::handle in1_obj,
                          py::handle bias_obj, py::handle out_obj, Pair stride, Pair padding,
                          Pair dilation, int multiprocessors) {
  Call call = make_call("conv2d_cuda_emulated", std::nullopt);
  const ConvParams p{stride, padding, dilation};
  check_conv_params(call, p);
  Array in0 = borrow(in0_obj, "in0", call, false);
  Array in1 = borrow(in1_obj, "in1", call, false);
  std::optional<Array> bias = borrow_optional(bias_obj, "bias", call, false);
  Array out = borrow(out_obj, "out", call, true);
  if (call.place->cuda) call.value_error("in0", "the emulation runs on CPU arrays only");
  kernels::Conv2dShape s{};
  if (which == "forward") {
    s = conv_geometry(call, in0, in1, p);
    expect_shape(call, out, output_shape(s), "y");
  } else if (which == "backward_data") {
    s = conv_geometry(call, out, in1, p);
    expect_shape(call, in0, output_shape(s), "gy");
  } else if (which == "backward_weight") {
    s = conv_geometry(call, in0, out, p);
    expect_shape(call, in1, output_shape(s), "gy");
  } else {
    call.value_error("which", "expected 'forward', 'backward_data' or 'backward_weight', got '" +
                                  which + "'");
  }
  for (const Array* a : {&in1, &out}) expect_dtype(call, *a, in0);
  if (bias) expect_shape(call, *bias, {s.out_channels}, "Cout");
  py::gil_scoped_release release;
  dispatch(in0.dtype, [&](auto tag) {
    using T = decltype(tag);
    kernels::conv2d_cuda_emulated<T>(which.c_str(), s, in0.data<T>(), in1.data<T>(),
                                     bias ? bias->data<T>() : nullptr, out.data<T>(),
                                     multiprocessors);
  });
}

py::dict build_info() {
  py::dict info;
  info["cuda"] = kernels::cuda_built();
  info["cuda_architectures"] = std::string(OPS_CUDA_ARCHITECTURES);
  info["compiler"] = std::string(OPS_CXX_COMPILER);
  info["build_type"] = std::string(OPS_BUILD_TYPE);
  // Compiled in; which of them this CPU runs, and which one is in use, is ops.core.cpu_info().
  info["cpu_gemm_paths"] = kernels::cpu_gemm_paths_built();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "Hand-written CPU/CUDA kernels (masked squared-error loss, conv2d), framework-agnostic: "
      "arrays in and out through DLPack, outputs allocated by the caller. Use ops.core, not "
      "this module, from the rest of the project.";

  m.def("cuda_built", &kernels::cuda_built, "True when this build contains the CUDA kernels.");
  m.def("cuda_device_count", &kernels::cuda_device_count,
        "Number of usable CUDA devices; 0 without a driver or a device (never raises).");
  m.def("build_info", &build_info, "How this module was built.");

  // CPU kernel settings of this module's copy of the kernels (see kernels.h).
  m.def("cpu_gemm_path", &kernels::cpu_gemm_path,
        "The GEMM path in use, 'avx512', 'avx2' or 'baseline'; the first call reads "
        "OPS_CPU_GEMM and "
        "raises ValueError for a value that is unknown or that this CPU cannot run.");
  m.def("cpu_gemm_paths", &kernels::cpu_gemm_paths, "The GEMM paths this CPU runs, best first.");
  m.def("set_cpu_gemm_path", &kernels::set_cpu_gemm_path, py::arg("name"),
        "Use GEMM path `name` (one of cpu_gemm_paths()) from now on, in this module only.");
  m.def("_resolve_cpu_gemm_path", &kernels::resolve_cpu_gemm_path, py::arg("setting"),
        py::arg("runnable"),
        "What OPS_CPU_GEMM=setting would choose on a CPU that runs the paths `runnable` (best "
        "first, ending with 'baseline'; tests).");
  m.def("cpu_threads", &kernels::cpu_threads, "Threads the CPU kernels' parallel regions use.");
  m.def("set_cpu_threads", &kernels::set_cpu_threads, py::arg("n"),
        "Set the CPU kernels' thread count (n >= 1) for every calling thread.");

  m.def("sq_error_loss_forward", &sq_error_loss_forward, py::arg("x"), py::arg("t"),
        py::arg("v"), py::arg("loss_out"), py::arg("count_out"), py::arg("count_factor"),
        py::arg("stream") = py::none());
  m.def("sq_error_loss_backward", &sq_error_loss_backward, py::arg("x"), py::arg("t"),
        py::arg("v"), py::arg("count"), py::arg("grad_loss"), py::arg("gx_out"),
        py::arg("gt_out"), py::arg("count_factor"), py::arg("stream") = py::none());
  m.def("sq_error_loss_fused", &sq_error_loss_fused, py::arg("x"), py::arg("t"), py::arg("v"),
        py::arg("loss_out"), py::arg("count_out"), py::arg("gx_out"), py::arg("gt_out"),
        py::arg("grad_loss"), py::arg("count_factor"), py::arg("stream") = py::none());

  m.def("conv2d_forward", &conv2d_forward, py::arg("x"), py::arg("w"), py::arg("b"),
        py::arg("y_out"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("stream") = py::none());
  m.def("conv2d_backward_data", &conv2d_backward_data, py::arg("gy"), py::arg("w"),
        py::arg("gx_out"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("stream") = py::none());
  m.def("conv2d_backward_weight", &conv2d_backward_weight, py::arg("x"), py::arg("gy"),
        py::arg("gw_out"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("stream") = py::none());
  m.def("conv2d_backward_bias", &conv2d_backward_bias, py::arg("gy"), py::arg("gb_out"),
        py::arg("stream") = py::none());
  m.def("conv2d_cuda_emulated", &conv2d_cuda_emulated, py::arg("which"), py::arg("in0"),
        py::arg("in1"), py::arg("bias"), py::arg("out"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("multiprocessors"));

  // NVTX ranges for the profiler (csrc/nvtx_ranges.cpp; stubs when built without nvtx3).
  void register_nvtx_ranges(py::module_&);
  register_nvtx_ranges(m);
  // Clock marks taken by C callbacks on a framework's threads (csrc/engine_marks.cpp).
  void register_engine_marks(py::module_&);
  register_engine_marks(m);
}
