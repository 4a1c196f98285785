// Our kernels as MXNet operators: the external operator library libdeepprof_mxnet.so
// (impl="native" in ops.mxnet), written against the lib_api.h that ships in the mxnet wheel and
// loaded with mx.library.load. After loading, each op is an MXNet op like any other:
// mx.nd.<op> imperatively (with autograd), mx.sym.<op> in symbols and hybridized Gluon blocks.
//
//   deepprof_sq_error_loss(x, t[, v]; count_factor, masked=0) -> (loss (1,), count (1,))
//   deepprof_conv2d(x, w[, b]; stride=1, padding=0, dilation=1, no_bias=0) -> y
//
// Attributes are strings, as MXNet passes them: count_factor a finite number > 0; stride,
// padding and dilation "k", "(kh, kw)" or "[kh, kw]"; masked and no_bias "0"/"1"/"true"/"false"
// (any case).
// `masked` and `no_bias` fix the number of inputs, as no_bias does for MXNet's Convolution.
// `count` is the forward's sum(v) (numel without a mask): the backward reads it from the
// forward's outputs rather than recomputing it.
//
// MXNet builds each op's backward node `_backward_<op>` from these registrations: its inputs are
// the output gradients, then the forward inputs, then the forward outputs; its outputs are the
// input gradients (those MXNet does not need come with a null data pointer and are skipped).
// The mask gets a zero gradient: it is a constant. lib_api passes no OpReqType, so gradients
// are always written, never accumulated (see ops/mxnet/__init__.py for what that means).
//
// Every check a user can trip is made in ParseAttrs, InferType or InferShape, which MXNet runs
// synchronously when an op is called or a graph is bound, so bad input is an MXNetError at the
// call, naming the op, the argument, what was expected and what came. The compute functions
// check again (cheaply) and return MX_FAIL rather than let anything reach a kernel unchecked;
// there the error surfaces when the result is waited for, as for any asynchronous MXNet op.
//
// GPU: behind DEEPPROF_MXNET_GPU (set it to 1 when the CUDA kernels are linked in), a "gpu"
// registration runs the CUDA kernels on the stream MXNet hands the op (OpResource), never
// synchronising. It has not run on a GPU yet.
#include <mxnet/lib_api.h>

#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "kernels.h"

#ifndef DEEPPROF_MXNET_GPU
#define DEEPPROF_MXNET_GPU 0
#endif

#if DEEPPROF_MXNET_GPU
// Declared here rather than included: this file is compiled as C++ without the CUDA include
// directories; the symbol comes with the CUDA runtime the CUDA kernels link. Used only to zero
// the (constant) mask's gradient on the device.
extern "C" int cudaMemsetAsync(void* device_ptr, int value, size_t count, void* stream);
#endif

using mxnet::ext::MXContext;
using mxnet::ext::MXReturnValue;
using mxnet::ext::MXTensor;
using mxnet::ext::OpResource;
using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;

namespace {

using Attrs = std::unordered_map<std::string, std::string>;
using Shape = std::vector<unsigned int>;

constexpr const char* kLossOp = "deepprof_sq_error_loss";
constexpr const char* kConvOp = "deepprof_conv2d";
// lib_api hands unknown dimensions over as -1 cast to unsigned; an unknown rank as no dims.
constexpr unsigned int kUnknownDim = std::numeric_limits<unsigned int>::max();

// One failure: the message goes to MXNet (which raises it as MXNetError), MX_FAIL to the caller.
struct Failure {
  explicit Failure(const char* op) { stream << op << ": "; }
  template <typename T>
  Failure& operator<<(const T& value) {
    stream << value;
    return *this;
  }
  operator MXReturnValue() const {  // NOLINT: implicit on purpose, `return Failure(op) << ...;`
    report(stream.str());
    return MX_FAIL;
  }
  std::ostringstream stream;

 private:
  // lib_api (1.9) keeps every message ever reported and MXNet prints them all with each new
  // error, so a second mistake would come with the first one's message: drop the stale ones.
  // MXerrorMsgs is a standard-layout class whose only data member is that vector, so a pointer
  // to it is a pointer to the vector. Compute functions may fail on several engine threads.
  static void report(const std::string& message) {
    using Messages = std::vector<std::stringstream*>;
    static_assert(std::is_standard_layout<mxnet::ext::MXerrorMsgs>::value &&
                      sizeof(mxnet::ext::MXerrorMsgs) == sizeof(Messages),
                  "lib_api's MXerrorMsgs changed layout");
    static std::mutex mutex;
    const std::lock_guard<std::mutex> lock(mutex);
    auto* messages = reinterpret_cast<Messages*>(mxnet::ext::MXerrorMsgs::get());
    for (std::stringstream* m : *messages) delete m;
    messages->clear();
    MX_ERROR_MSG << message;
  }
};

std::string dtype_name(int dtype) {
  switch (dtype) {
    case mxnet::ext::kFloat32: return "float32";
    case mxnet::ext::kFloat64: return "float64";
    case mxnet::ext::kFloat16: return "float16";
    case mxnet::ext::kUint8: return "uint8";
    case mxnet::ext::kInt32: return "int32";
    case mxnet::ext::kInt8: return "int8";
    case mxnet::ext::kInt64: return "int64";
    case 7: return "bool";  // MXNet's mshadow codes beyond lib_api's enum
    case 12: return "bfloat16";
    default: return "dtype code " + std::to_string(dtype);
  }
}

// "(2, 3)"; an unknown dimension (shape inference) shows as "?".
std::string shape_str(const std::vector<int64_t>& dims) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < dims.size(); ++i) s << (i ? ", " : "") << dims[i];
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

std::string shape_str(const Shape& dims) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    s << (i ? ", " : "");
    if (dims[i] == kUnknownDim)
      s << "?";
    else
      s << dims[i];
  }
  s << (dims.size() == 1 ? ",)" : ")");
  return s.str();
}

bool is_float(int dtype) { return dtype == mxnet::ext::kFloat32 || dtype == mxnet::ext::kFloat64; }

bool fully_known(const Shape& shape) {
  if (shape.empty()) return false;
  for (unsigned int d : shape)
    if (d == kUnknownDim) return false;
  return true;
}

// ---- attributes ---------------------------------------------------------------------------------

std::string trim(const std::string& s) {
  const size_t first = s.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return s.substr(first, s.find_last_not_of(" \t") - first + 1);
}

// MXNet adds its own attributes (names starting with "__", e.g. __profiler_scope__); anything
// else we do not know is a typo worth refusing (stride= vs strides=).
MXReturnValue check_attr_names(const char* op, const Attrs& attrs,
                               const std::vector<std::string>& known) {
  for (const auto& kv : attrs) {
    if (kv.first.rfind("__", 0) == 0) continue;
    bool found = false;
    for (const auto& k : known) found = found || kv.first == k;
    if (!found) {
      Failure f(op);
      f << "unknown attribute '" << kv.first << "' (expected";
      for (const auto& k : known) f << " " << k;
      return f << ")";
    }
  }
  return MX_SUCCESS;
}

MXReturnValue parse_bool(const char* op, const Attrs& attrs, const char* key, bool* out) {
  *out = false;
  const auto it = attrs.find(key);
  if (it == attrs.end()) return MX_SUCCESS;
  std::string v = trim(it->second);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "1" || v == "true") {
    *out = true;
  } else if (!(v == "0" || v == "false")) {
    return Failure(op) << key << ": expected 0, 1, true or false, got '" << it->second << "'";
  }
  return MX_SUCCESS;
}

MXReturnValue parse_count_factor(const char* op, const Attrs& attrs, double* out) {
  const auto it = attrs.find("count_factor");
  if (it == attrs.end())
    return Failure(op) << "count_factor: required (1 for the masked mean, 0.5 for DeepPose)";
  const std::string v = trim(it->second);
  char* end = nullptr;
  *out = std::strtod(v.c_str(), &end);
  // strtod reads "inf" and "nan" (Python's str of them); the rule refuses them.
  if (v.empty() || *end != '\0' || !kernels::valid_count_factor(*out))
    return Failure(op) << "count_factor: expected " << kernels::kCountFactorExpected
                       << ", got '" << it->second << "'";
  return MX_SUCCESS;
}

// "k", "(kh, kw)", "[kh, kw]" or "kh,kw" (Python's str of an int, tuple or list); values in
// [low, 2**31 - 1], the range of the kernels' 32-bit GPU indexing.
MXReturnValue parse_pair(const char* op, const Attrs& attrs, const char* key, int64_t fallback,
                         int64_t low, int64_t out[2]) {
  out[0] = out[1] = fallback;
  const auto it = attrs.find(key);
  if (it == attrs.end()) return MX_SUCCESS;
  std::string v = trim(it->second);
  if (v.size() >= 2 && ((v.front() == '(' && v.back() == ')') ||
                        (v.front() == '[' && v.back() == ']')))
    v = v.substr(1, v.size() - 2);
  std::vector<int64_t> values;
  std::stringstream items(v);
  std::string item;
  bool ok = !trim(v).empty();
  while (ok && std::getline(items, item, ',')) {
    item = trim(item);
    if (item.empty() && items.eof() && !values.empty()) break;  // "(3,)"
    char* end = nullptr;
    const long long value = std::strtoll(item.c_str(), &end, 10);
    ok = !item.empty() && *end == '\0';
    values.push_back(value);
  }
  if (!ok || values.empty() || values.size() > 2)
    return Failure(op) << key << ": expected an int or a pair of ints (height, width), got '"
                       << it->second << "'";
  out[0] = values[0];
  out[1] = values.size() == 2 ? values[1] : values[0];
  for (int i = 0; i < 2; ++i)
    if (out[i] < low || out[i] > std::numeric_limits<int32_t>::max())
      return Failure(op) << key << ": expected values in [" << low << ", 2**31 - 1], got '"
                         << it->second << "'";
  return MX_SUCCESS;
}

struct LossAttrs {
  double count_factor = 1.0;
  bool masked = false;
};

MXReturnValue parse_loss_attrs(const Attrs& attrs, LossAttrs* a) {
  if (!check_attr_names(kLossOp, attrs, {"count_factor", "masked"})) return MX_FAIL;
  if (!parse_count_factor(kLossOp, attrs, &a->count_factor)) return MX_FAIL;
  return parse_bool(kLossOp, attrs, "masked", &a->masked);
}

struct ConvAttrs {
  int64_t stride[2], padding[2], dilation[2];
  bool no_bias = false;
};

MXReturnValue parse_conv_attrs(const Attrs& attrs, ConvAttrs* a) {
  if (!check_attr_names(kConvOp, attrs, {"stride", "padding", "dilation", "no_bias"}))
    return MX_FAIL;
  if (!parse_pair(kConvOp, attrs, "stride", 1, 1, a->stride) ||
      !parse_pair(kConvOp, attrs, "padding", 0, 0, a->padding) ||
      !parse_pair(kConvOp, attrs, "dilation", 1, 1, a->dilation))
    return MX_FAIL;
  return parse_bool(kConvOp, attrs, "no_bias", &a->no_bias);
}

// ---- type inference: one float dtype for every input and output -----------------------------

MXReturnValue infer_float_type(const char* op, const std::vector<const char*>& names,
                               std::vector<int>* in_types, std::vector<int>* out_types) {
  int dtype = -1;
  size_t first = 0;
  for (size_t i = 0; i < in_types->size(); ++i) {
    const int t = (*in_types)[i];
    if (t == -1) continue;
    if (!is_float(t))
      return Failure(op) << names[i] << ": expected float32 or float64, got " << dtype_name(t);
    if (dtype == -1) {
      dtype = t;
      first = i;
    } else if (t != dtype) {
      return Failure(op) << names[i] << ": expected " << dtype_name(dtype) << " like "
                         << names[first] << ", got " << dtype_name(t);
    }
  }
  for (int& t : *in_types) t = dtype;
  for (int& t : *out_types) t = dtype;
  return MX_SUCCESS;
}

// ---- masked squared-error loss ----------------------------------------------------------------

const std::vector<const char*> kLossNames = {"x", "t", "v"};

MXReturnValue loss_parse(const Attrs& attrs, int* num_in, int* num_out) {
  LossAttrs a;
  if (!parse_loss_attrs(attrs, &a)) return MX_FAIL;
  *num_in = a.masked ? 3 : 2;
  *num_out = 2;
  return MX_SUCCESS;
}

MXReturnValue loss_infer_type(const Attrs&, std::vector<int>* in_types,
                              std::vector<int>* out_types) {
  return infer_float_type(kLossOp, kLossNames, in_types, out_types);
}

// t and v take x's shape exactly (MXNet would not broadcast here, but say so as the adapters
// do); unknown ones are filled in.
MXReturnValue loss_infer_shape(const Attrs&, std::vector<Shape>* in_shapes,
                               std::vector<Shape>* out_shapes) {
  const Shape& x = (*in_shapes)[0];
  if (!fully_known(x))
    return Failure(kLossOp) << "x: shape unknown " << shape_str(x)
                            << "; give the input shapes";
  for (unsigned int d : x)
    if (d == 0) return Failure(kLossOp) << "x: expected a non-empty array, got shape "
                                        << shape_str(x);
  for (size_t i = 1; i < in_shapes->size(); ++i) {
    Shape& other = (*in_shapes)[i];
    bool matches = other.empty() || other.size() == x.size();
    for (size_t j = 0; matches && j < other.size(); ++j)
      matches = other[j] == kUnknownDim || other[j] == x[j];
    if (!matches)
      return Failure(kLossOp) << kLossNames[i] << ": expected shape " << shape_str(x)
                              << " (same as x), got " << shape_str(other);
    other = x;
  }
  (*out_shapes)[0] = Shape{1};
  (*out_shapes)[1] = Shape{1};
  return MX_SUCCESS;
}

// Cheap re-checks at run time: what inference guaranteed, plus what only run time knows (the
// device and the data pointers), so nothing unchecked reaches a kernel.
MXReturnValue check_tensors(const char* op, const std::vector<MXTensor>& tensors,
                            const std::vector<const char*>& names, const char* dev_type) {
  const MXTensor& first = tensors[0];
  for (size_t i = 0; i < tensors.size(); ++i) {
    const MXTensor& t = tensors[i];
    if (t.stype != mxnet::ext::kDefaultStorage)
      return Failure(op) << names[i] << ": expected a dense array";
    if (t.dtype != first.dtype || !is_float(t.dtype))
      return Failure(op) << names[i] << ": expected float32 or float64 like " << names[0]
                         << ", got " << dtype_name(t.dtype);
    if (t.ctx.dev_type != dev_type || t.ctx.dev_id != first.ctx.dev_id)
      return Failure(op) << names[i] << ": is on " << t.ctx.dev_type << "(" << t.ctx.dev_id
                         << ") but this kernel runs on " << dev_type << "(" << first.ctx.dev_id
                         << ")";
    if (t.data_ptr == nullptr && t.size() > 0)
      return Failure(op) << names[i] << ": null data pointer";
  }
  return MX_SUCCESS;
}

MXReturnValue check_same_shape(const char* op, const MXTensor& t, const char* name,
                               const MXTensor& x) {
  if (t.shape != x.shape)
    return Failure(op) << name << ": expected shape " << shape_str(x.shape) << " (same as x), got "
                       << shape_str(t.shape);
  return MX_SUCCESS;
}

MXReturnValue check_one_element(const char* op, const MXTensor& t, const char* name) {
  if (t.size() != 1)
    return Failure(op) << name << ": expected one element, got shape " << shape_str(t.shape);
  return MX_SUCCESS;
}

// Runs `body` and turns any exception (a stub CUDA kernel in a CPU-only build, an allocation
// failure) into MX_FAIL with its message: nothing may unwind into MXNet's engine.
template <typename Body>
MXReturnValue guarded(const char* op, Body&& body) {
  try {
    return body();
  } catch (const std::exception& e) {
    return Failure(op) << e.what();
  } catch (...) {
    return Failure(op) << "unknown C++ exception";
  }
}

template <typename T>
void loss_forward_kernel(bool gpu, const void* x, const void* t, const void* v, int64_t n,
                         double k, void* loss, void* count, void* stream) {
  const T *xd = static_cast<const T*>(x), *td = static_cast<const T*>(t),
          *vd = static_cast<const T*>(v);
  if (gpu)
    kernels::sq_error_loss_forward_cuda<T>(xd, td, vd, n, k, static_cast<T*>(loss),
                                           static_cast<T*>(count), stream);
  else
    kernels::sq_error_loss_forward_cpu<T>(xd, td, vd, n, k, static_cast<T*>(loss),
                                          static_cast<T*>(count));
}

template <typename T>
void loss_backward_kernel(bool gpu, const void* x, const void* t, const void* v, int64_t n,
                          const void* count, const void* g, double k, void* gx, void* gt,
                          void* stream) {
  const T *xd = static_cast<const T*>(x), *td = static_cast<const T*>(t),
          *vd = static_cast<const T*>(v), *cd = static_cast<const T*>(count),
          *gd = static_cast<const T*>(g);
  if (gpu)
    kernels::sq_error_loss_backward_cuda<T>(xd, td, vd, n, cd, gd, k, static_cast<T*>(gx),
                                            static_cast<T*>(gt), stream);
  else
    kernels::sq_error_loss_backward_cpu<T>(xd, td, vd, n, cd, gd, k, static_cast<T*>(gx),
                                           static_cast<T*>(gt));
}

// Zeroes one output (the mask's gradient) on its device.
MXReturnValue zero_fill(const char* op, MXTensor* t, bool gpu, void* stream) {
  const size_t bytes = static_cast<size_t>(t->size()) * (t->dtype == mxnet::ext::kFloat32 ? 4 : 8);
  if (!gpu) {
    std::memset(t->data_ptr, 0, bytes);
    return MX_SUCCESS;
  }
#if DEEPPROF_MXNET_GPU
  if (cudaMemsetAsync(t->data_ptr, 0, bytes, stream) != 0)
    return Failure(op) << "cudaMemsetAsync failed";
  return MX_SUCCESS;
#else
  (void)stream;
  return Failure(op) << "built without GPU support";
#endif
}

MXReturnValue loss_forward(const char* dev_type, const Attrs& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& res) {
  return guarded(kLossOp, [&]() -> MXReturnValue {
    LossAttrs a;
    if (!parse_loss_attrs(attrs, &a)) return MX_FAIL;
    std::vector<MXTensor>& in = *inputs;
    std::vector<MXTensor>& out = *outputs;
    if (in.size() != (a.masked ? 3u : 2u) || out.size() != 2)
      return Failure(kLossOp) << "wrong number of inputs or outputs";
    if (!check_tensors(kLossOp, in, kLossNames, dev_type) ||
        !check_tensors(kLossOp, out, {"loss", "count"}, dev_type))
      return MX_FAIL;
    for (size_t i = 1; i < in.size(); ++i)
      if (!check_same_shape(kLossOp, in[i], kLossNames[i], in[0])) return MX_FAIL;
    if (in[0].size() == 0 || !out[0].data_ptr || !out[1].data_ptr ||
        !check_one_element(kLossOp, out[0], "loss") ||
        !check_one_element(kLossOp, out[1], "count"))
      return Failure(kLossOp) << "x must be non-empty and loss, count one element each";
    const bool gpu = std::strcmp(dev_type, "gpu") == 0;
    void* stream = res.get_cuda_stream();
    const void* v = a.masked ? in[2].data_ptr : nullptr;
    auto kernel = in[0].dtype == mxnet::ext::kFloat32 ? loss_forward_kernel<float>
                                                      : loss_forward_kernel<double>;
    kernel(gpu, in[0].data_ptr, in[1].data_ptr, v, in[0].size(), a.count_factor,
           out[0].data_ptr, out[1].data_ptr, stream);
    return MX_SUCCESS;
  });
}

// inputs: grad_loss, grad_count, x, t[, v], loss, count; outputs: gx, gt[, gv].
MXReturnValue loss_backward(const char* dev_type, const Attrs& attrs,
                            std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                            const OpResource& res) {
  return guarded(kLossOp, [&]() -> MXReturnValue {
    LossAttrs a;
    if (!parse_loss_attrs(attrs, &a)) return MX_FAIL;
    std::vector<MXTensor>& in = *inputs;
    std::vector<MXTensor>& out = *outputs;
    const size_t num_in = a.masked ? 3 : 2;
    if (in.size() != 2 * 2 + num_in || out.size() != num_in)
      return Failure(kLossOp) << "backward: wrong number of inputs or outputs";
    const MXTensor& g = in[0];
    const MXTensor& x = in[2];
    const MXTensor& t = in[3];
    const MXTensor* v = a.masked ? &in[4] : nullptr;
    const MXTensor& count = in[2 + num_in + 1];
    std::vector<MXTensor> read = {x, t, g, count};
    if (v) read.push_back(*v);
    if (!check_tensors(kLossOp, read, {"x", "t", "grad_loss", "count", "v"}, dev_type))
      return MX_FAIL;
    if (!check_same_shape(kLossOp, t, "t", x) || (v && !check_same_shape(kLossOp, *v, "v", x)) ||
        !check_one_element(kLossOp, g, "grad_loss") ||
        !check_one_element(kLossOp, count, "count"))
      return MX_FAIL;
    const bool gpu = std::strcmp(dev_type, "gpu") == 0;
    void* stream = res.get_cuda_stream();
    MXTensor* gx = out[0].data_ptr ? &out[0] : nullptr;
    MXTensor* gt = out[1].data_ptr ? &out[1] : nullptr;
    for (size_t i = 0; i < num_in; ++i)
      if (out[i].data_ptr && (out[i].shape != x.shape || out[i].dtype != x.dtype ||
                              out[i].ctx.dev_type != x.ctx.dev_type))
        return Failure(kLossOp) << "backward: the gradient of " << kLossNames[i]
                                << " must be like x";
    if (a.masked && out[2].data_ptr && !zero_fill(kLossOp, &out[2], gpu, stream))
      return MX_FAIL;
    if (!gx && !gt) return MX_SUCCESS;
    const int64_t n = x.size();
    const size_t itemsize = x.dtype == mxnet::ext::kFloat32 ? 4 : 8;
    void* gx_data = gx ? gx->data_ptr : nullptr;
    if (!gx_data) {  // the kernel always writes gx; give it scratch when only gt is wanted
      const uint64_t bytes = static_cast<uint64_t>(n) * itemsize;
      if (bytes > static_cast<uint64_t>(std::numeric_limits<int>::max()))
        return Failure(kLossOp) << "backward: scratch for grad_x beyond 2 GiB (lib_api's limit)";
      const int size = static_cast<int>(bytes);
      gx_data = gpu ? res.alloc_gpu(size) : res.alloc_cpu(size);
      if (!gx_data) return Failure(kLossOp) << "backward: could not allocate scratch";
    }
    auto kernel = x.dtype == mxnet::ext::kFloat32 ? loss_backward_kernel<float>
                                                  : loss_backward_kernel<double>;
    kernel(gpu, x.data_ptr, t.data_ptr, v ? v->data_ptr : nullptr, n, count.data_ptr,
           g.data_ptr, a.count_factor, gx_data, gt ? gt->data_ptr : nullptr, stream);
    return MX_SUCCESS;
  });
}

// ---- conv2d -------------------------------------------------------------------------------------

const std::vector<const char*> kConvNames = {"x", "w", "b"};

MXReturnValue conv_parse(const Attrs& attrs, int* num_in, int* num_out) {
  ConvAttrs a;
  if (!parse_conv_attrs(attrs, &a)) return MX_FAIL;
  *num_in = a.no_bias ? 2 : 3;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue conv_infer_type(const Attrs&, std::vector<int>* in_types,
                              std::vector<int>* out_types) {
  return infer_float_type(kConvOp, kConvNames, in_types, out_types);
}

// Output size along one axis, or MX_FAIL when the dilated kernel does not fit the padded input.
MXReturnValue conv_out_size(const char* axis, int64_t in, int64_t k, int64_t stride,
                            int64_t pad, int64_t dil, int64_t* out) {
  const int64_t extent = dil * (k - 1) + 1, padded = in + 2 * pad;
  if (extent > padded)
    return Failure(kConvOp) << "w: kernel " << axis << " extent " << extent << " (size " << k
                            << ", dilation " << dil << ") is larger than the padded input "
                            << axis << " " << padded << " (" << in << " + 2*" << pad << ")";
  *out = (padded - extent) / stride + 1;
  return MX_SUCCESS;
}

// x must be known; w's input-channel dimension and b may be unknown (a Gluon layer whose
// in_channels is inferred from the data) and are filled in.
MXReturnValue conv_infer_shape(const Attrs& attrs, std::vector<Shape>* in_shapes,
                               std::vector<Shape>* out_shapes) {
  ConvAttrs a;
  if (!parse_conv_attrs(attrs, &a)) return MX_FAIL;
  const Shape& x = (*in_shapes)[0];
  Shape& w = (*in_shapes)[1];
  if (!fully_known(x))
    return Failure(kConvOp) << "x: shape unknown " << shape_str(x) << "; give the input shapes";
  if (x.size() != 4)
    return Failure(kConvOp) << "x: expected a 4-d array (B, Cin, H, W), got shape "
                            << shape_str(x);
  for (unsigned int d : x)
    if (d == 0) return Failure(kConvOp) << "x: expected 4 positive sizes, got " << shape_str(x);
  if (w.size() == 4 && w[1] == kUnknownDim) w[1] = x[1];
  if (!fully_known(w) || w.size() != 4 || w[0] == 0 || w[2] == 0 || w[3] == 0)
    return Failure(kConvOp) << "w: expected 4 positive sizes (Cout, Cin, kh, kw), got "
                            << shape_str(w);
  if (w[1] != x[1])
    return Failure(kConvOp) << "w: expected (Cout, " << x[1] << ", kh, kw) to match the " << x[1]
                            << " input channels of x, got " << shape_str(w)
                            << " (groups=1 only)";
  if (!a.no_bias) {
    Shape& b = (*in_shapes)[2];
    if (b.empty() || (b.size() == 1 && b[0] == kUnknownDim)) b = Shape{w[0]};
    if (b != Shape{w[0]})
      return Failure(kConvOp) << "b: expected shape (" << w[0] << ",) to match the " << w[0]
                              << " output channels of w, got " << shape_str(b);
  }
  int64_t oh = 0, ow = 0;
  if (!conv_out_size("height", x[2], w[2], a.stride[0], a.padding[0], a.dilation[0], &oh) ||
      !conv_out_size("width", x[3], w[3], a.stride[1], a.padding[1], a.dilation[1], &ow))
    return MX_FAIL;
  (*out_shapes)[0] = Shape{x[0], w[0], static_cast<unsigned int>(oh),
                           static_cast<unsigned int>(ow)};
  return MX_SUCCESS;
}

kernels::Conv2dShape conv_shape(const MXTensor& x, const MXTensor& w, const ConvAttrs& a,
                                int64_t out_h, int64_t out_w) {
  kernels::Conv2dShape s{};
  s.batch = x.shape[0];
  s.in_channels = x.shape[1];
  s.in_h = x.shape[2];
  s.in_w = x.shape[3];
  s.out_channels = w.shape[0];
  s.kernel_h = w.shape[2];
  s.kernel_w = w.shape[3];
  s.out_h = out_h;
  s.out_w = out_w;
  s.stride_h = a.stride[0];
  s.stride_w = a.stride[1];
  s.pad_h = a.padding[0];
  s.pad_w = a.padding[1];
  s.dilation_h = a.dilation[0];
  s.dilation_w = a.dilation[1];
  return s;
}

// The shapes of x, w, b (when given) and y (or gy), checked as inference did.
MXReturnValue check_conv_run(const MXTensor& x, const MXTensor& w, const MXTensor* b,
                             const MXTensor& y, const ConvAttrs& a) {
  if (x.shape.size() != 4 || w.shape.size() != 4 || y.shape.size() != 4 ||
      w.shape[1] != x.shape[1] || (b && (b->shape.size() != 1 || b->shape[0] != w.shape[0])))
    return Failure(kConvOp) << "inconsistent shapes x " << shape_str(x.shape) << ", w "
                            << shape_str(w.shape) << ", y " << shape_str(y.shape);
  int64_t oh = 0, ow = 0;
  if (!conv_out_size("height", x.shape[2], w.shape[2], a.stride[0], a.padding[0],
                     a.dilation[0], &oh) ||
      !conv_out_size("width", x.shape[3], w.shape[3], a.stride[1], a.padding[1],
                     a.dilation[1], &ow))
    return MX_FAIL;
  const std::vector<int64_t> expected = {x.shape[0], w.shape[0], oh, ow};
  if (y.shape != expected)
    return Failure(kConvOp) << "y: expected shape " << shape_str(expected) << ", got "
                            << shape_str(y.shape);
  if (x.size() == 0 || w.size() == 0)
    return Failure(kConvOp) << "x and w must be non-empty";
  return MX_SUCCESS;
}

template <typename T>
void conv_forward_kernel(bool gpu, const kernels::Conv2dShape& s, const void* x, const void* w,
                         const void* b, void* y, void* stream) {
  const T *xd = static_cast<const T*>(x), *wd = static_cast<const T*>(w),
          *bd = static_cast<const T*>(b);
  if (gpu)
    kernels::conv2d_forward_cuda<T>(s, xd, wd, bd, static_cast<T*>(y), stream);
  else
    kernels::conv2d_forward_cpu<T>(s, xd, wd, bd, static_cast<T*>(y));
}

template <typename T>
void conv_backward_kernels(bool gpu, const kernels::Conv2dShape& s, const void* gy,
                           const void* x, const void* w, void* gx, void* gw, void* gb,
                           void* stream) {
  const T *gyd = static_cast<const T*>(gy), *xd = static_cast<const T*>(x),
          *wd = static_cast<const T*>(w);
  if (gpu) {
    if (gx) kernels::conv2d_backward_data_cuda<T>(s, gyd, wd, static_cast<T*>(gx), stream);
    if (gw) kernels::conv2d_backward_weight_cuda<T>(s, xd, gyd, static_cast<T*>(gw), stream);
    if (gb) kernels::conv2d_backward_bias_cuda<T>(s, gyd, static_cast<T*>(gb), stream);
  } else {
    if (gx) kernels::conv2d_backward_data_cpu<T>(s, gyd, wd, static_cast<T*>(gx));
    if (gw) kernels::conv2d_backward_weight_cpu<T>(s, xd, gyd, static_cast<T*>(gw));
    if (gb) kernels::conv2d_backward_bias_cpu<T>(s, gyd, static_cast<T*>(gb));
  }
}

MXReturnValue conv_forward(const char* dev_type, const Attrs& attrs,
                           std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                           const OpResource& res) {
  return guarded(kConvOp, [&]() -> MXReturnValue {
    ConvAttrs a;
    if (!parse_conv_attrs(attrs, &a)) return MX_FAIL;
    std::vector<MXTensor>& in = *inputs;
    std::vector<MXTensor>& out = *outputs;
    if (in.size() != (a.no_bias ? 2u : 3u) || out.size() != 1)
      return Failure(kConvOp) << "wrong number of inputs or outputs";
    if (!check_tensors(kConvOp, in, kConvNames, dev_type) ||
        !check_tensors(kConvOp, out, {"y"}, dev_type))
      return MX_FAIL;
    const MXTensor* b = a.no_bias ? nullptr : &in[2];
    if (!check_conv_run(in[0], in[1], b, out[0], a)) return MX_FAIL;
    if (!out[0].data_ptr) return Failure(kConvOp) << "y: null data pointer";
    const kernels::Conv2dShape s = conv_shape(in[0], in[1], a, out[0].shape[2], out[0].shape[3]);
    const bool gpu = std::strcmp(dev_type, "gpu") == 0;
    auto kernel = in[0].dtype == mxnet::ext::kFloat32 ? conv_forward_kernel<float>
                                                      : conv_forward_kernel<double>;
    kernel(gpu, s, in[0].data_ptr, in[1].data_ptr, b ? b->data_ptr : nullptr, out[0].data_ptr,
           res.get_cuda_stream());
    return MX_SUCCESS;
  });
}

// inputs: gy, x, w[, b], y; outputs: gx, gw[, gb].
MXReturnValue conv_backward(const char* dev_type, const Attrs& attrs,
                            std::vector<MXTensor>* inputs, std::vector<MXTensor>* outputs,
                            const OpResource& res) {
  return guarded(kConvOp, [&]() -> MXReturnValue {
    ConvAttrs a;
    if (!parse_conv_attrs(attrs, &a)) return MX_FAIL;
    std::vector<MXTensor>& in = *inputs;
    std::vector<MXTensor>& out = *outputs;
    const size_t num_in = a.no_bias ? 2 : 3;
    if (in.size() != 1 + num_in + 1 || out.size() != num_in)
      return Failure(kConvOp) << "backward: wrong number of inputs or outputs";
    const MXTensor& gy = in[0];
    const MXTensor& x = in[1];
    const MXTensor& w = in[2];
    if (!check_tensors(kConvOp, {x, w, gy}, {"x", "w", "grad_y"}, dev_type) ||
        !check_conv_run(x, w, nullptr, gy, a))
      return MX_FAIL;
    const std::vector<int64_t> expected[3] = {x.shape, w.shape, {w.shape[0]}};
    for (size_t i = 0; i < num_in; ++i)
      if (out[i].data_ptr && (out[i].shape != expected[i] || out[i].dtype != x.dtype ||
                              out[i].ctx.dev_type != x.ctx.dev_type))
        return Failure(kConvOp) << "backward: the gradient of " << kConvNames[i]
                                << " must be like " << kConvNames[i];
    const kernels::Conv2dShape s = conv_shape(x, w, a, gy.shape[2], gy.shape[3]);
    const bool gpu = std::strcmp(dev_type, "gpu") == 0;
    auto kernel = x.dtype == mxnet::ext::kFloat32 ? conv_backward_kernels<float>
                                                   : conv_backward_kernels<double>;
    kernel(gpu, s, gy.data_ptr, x.data_ptr, w.data_ptr, out[0].data_ptr, out[1].data_ptr,
            num_in == 3 ? out[2].data_ptr : nullptr, res.get_cuda_stream());
    return MX_SUCCESS;
  });
}

// lib_api takes plain function pointers, one per device.
MXReturnValue loss_forward_cpu(const Attrs& a, std::vector<MXTensor>* i,
                               std::vector<MXTensor>* o, const OpResource& r) {
  return loss_forward("cpu", a, i, o, r);
}
MXReturnValue loss_backward_cpu(const Attrs& a, std::vector<MXTensor>* i,
                                std::vector<MXTensor>* o, const OpResource& r) {
  return loss_backward("cpu", a, i, o, r);
}
MXReturnValue conv_forward_cpu(const Attrs& a, std::vector<MXTensor>* i,
                               std::vector<MXTensor>* o, const OpResource& r) {
  return conv_forward("cpu", a, i, o, r);
}
MXReturnValue conv_backward_cpu(const Attrs& a, std::vector<MXTensor>* i,
                                std::vector<MXTensor>* o, const OpResource& r) {
  return conv_backward("cpu", a, i, o, r);
}

#if DEEPPROF_MXNET_GPU
MXReturnValue loss_forward_gpu(const Attrs& a, std::vector<MXTensor>* i,
                               std::vector<MXTensor>* o, const OpResource& r) {
  return loss_forward("gpu", a, i, o, r);
}
MXReturnValue loss_backward_gpu(const Attrs& a, std::vector<MXTensor>* i,
                                std::vector<MXTensor>* o, const OpResource& r) {
  return loss_backward("gpu", a, i, o, r);
}
MXReturnValue conv_forward_gpu(const Attrs& a, std::vector<MXTensor>* i,
                               std::vector<MXTensor>* o, const OpResource& r) {
  return conv_forward("gpu", a, i, o, r);
}
MXReturnValue conv_backward_gpu(const Attrs& a, std::vector<MXTensor>* i,
                                std::vector<MXTensor>* o, const OpResource& r) {
  return conv_backward("gpu", a, i, o, r);
}
#endif

}  // namespace

REGISTER_OP(deepprof_sq_error_loss)
    .setParseAttrs(loss_parse)
    .setInferType(loss_infer_type)
    .setInferShape(loss_infer_shape)
    .setForward(loss_forward_cpu, "cpu")
    .setBackward(loss_backward_cpu, "cpu")
#if DEEPPROF_MXNET_GPU
    .setForward(loss_forward_gpu, "gpu")
    .setBackward(loss_backward_gpu, "gpu")
#endif
    ;

REGISTER_OP(deepprof_conv2d)
    .setParseAttrs(conv_parse)
    .setInferType(conv_infer_type)
    .setInferShape(conv_infer_shape)
    .setForward(conv_forward_cpu, "cpu")
    .setBackward(conv_backward_cpu, "cpu")
#if DEEPPROF_MXNET_GPU
    .setForward(conv_forward_gpu, "gpu")
    .setBackward(conv_backward_gpu, "gpu")
#endif
    ;

// Called by mx.library.load: lib_api's ABI (MX_LIBRARY_VERSION 11) is MXNet 1.9's.
MXReturnValue initialize(int version) {
  if (version >= 10900) return MX_SUCCESS;
  MX_ERROR_MSG << "libdeepprof_mxnet needs MXNet >= 1.9 (lib_api version "
               << MX_LIBRARY_VERSION << "), got MXNet version code " << version;
  return MX_FAIL;
}

// For ops.mxnet.loader (through ctypes): 1 when the "gpu" registrations are compiled in and
// the CUDA kernels are linked, so impl="native" can run on MXNet's GPU contexts.
extern "C" __attribute__((visibility("default"))) int deepprof_mxnet_gpu_built() {
  return DEEPPROF_MXNET_GPU && kernels::cuda_built() ? 1 : 0;
}
