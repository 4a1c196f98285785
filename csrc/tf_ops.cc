// Our kernels as TensorFlow's own ops: libdeepprof_tf.so (impl="native" in ops.tensorflow).
//
// Built against the installed TensorFlow (tf.sysconfig flags, see CMakeLists.txt) and loaded
// with tf.load_op_library by ops/tensorflow/loader.py, which also registers the gradients
// (tf.RegisterGradient) that call the backward ops below, so the backward pass runs without
// Python in between, in eager mode, inside tf.function and inside Keras models.
//
//   DeepprofSqErrorLoss(x, t, v[0..1]) -> (loss, count)            count: keep for backward
//   DeepprofSqErrorLossBackward(grad_loss, x, t, v[0..1], count) -> (grad_x, grad_t)
//   DeepprofConv2d(x, w, b[0..1]) -> y                              NCHW, w (Cout, Cin, kh, kw)
//   DeepprofConv2dBackwardData(grad_y, w, x) -> grad_x              x: read for its shape only
//   DeepprofConv2dBackwardWeight(x, grad_y, w) -> grad_w            w: read for its shape only
//   DeepprofConv2dBackwardBias(grad_y) -> grad_b
//
// Optional inputs (the mask v, the bias b) are lists of zero or one tensor, TensorFlow's idiom
// for them (as in _FusedConv2D's `args`). Every op takes float32 and float64 (attr T). Every
// argument is checked in the OpKernel with OP_REQUIRES (InvalidArgument naming the op and the
// argument) before a kernel sees it, and in the shape functions where shapes are static, so
// graph construction fails early; a kernel that throws becomes an Internal error, never a crash.
//
// CPU kernels always; GPU kernels only in a TensorFlow built with CUDA (GOOGLE_CUDA, which the
// build must define together with our CUDA kernels). The GPU half runs our kernels on the op's
// own stream (the stream executor's, through platform_specific_handle) and never synchronises.
// It has not run anywhere yet: the TensorFlow of this project is tensorflow-cpu.
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"

#if GOOGLE_CUDA
#include "xla/stream_executor/stream.h"
#endif

#include "kernels.h"

namespace {

using tensorflow::DEVICE_CPU;
using tensorflow::OpInputList;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Status;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

constexpr char kLoss[] = "DeepprofSqErrorLoss";
constexpr char kLossBackward[] = "DeepprofSqErrorLossBackward";
constexpr char kConv[] = "DeepprofConv2d";
constexpr char kConvData[] = "DeepprofConv2dBackwardData";
constexpr char kConvWeight[] = "DeepprofConv2dBackwardWeight";
constexpr char kConvBias[] = "DeepprofConv2dBackwardBias";

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

// ---- the device a kernel runs on -------------------------------------------------------------

#if GOOGLE_CUDA
void* gpu_stream(OpKernelContext* ctx) {
  return ctx->op_device_context()->stream()->platform_specific_handle().stream;
}

// Makes the op's GPU current for our kernels (they use the CUDA runtime's current device).
class GpuDeviceGuard {
 public:
  explicit GpuDeviceGuard(OpKernelContext* ctx) {
    const auto* info = ctx->device()->tensorflow_accelerator_device_info();
    const int device = info ? info->gpu_id : -1;
    previous_ = kernels::cuda_get_device();
    if (device >= 0 && device != previous_) {
      kernels::cuda_set_device(device);
      switched_ = true;
    }
  }
  ~GpuDeviceGuard() {
    if (switched_) kernels::cuda_set_device(previous_);
  }
  GpuDeviceGuard(const GpuDeviceGuard&) = delete;
  GpuDeviceGuard& operator=(const GpuDeviceGuard&) = delete;

 private:
  int previous_ = -1;
  bool switched_ = false;
};
#endif

// Runs body(stream) for the op's device (stream: nullptr on the CPU). Our kernels may throw
// (e.g. the CUDA stand-ins of a CPU-only ops_kernels); TensorFlow must never see an exception.
template <bool kGpu, typename Body>
void run_kernel(OpKernelContext* ctx, const char* op, Body&& body) {
  try {
    if constexpr (kGpu) {
#if GOOGLE_CUDA
      GpuDeviceGuard guard(ctx);
      body(gpu_stream(ctx));
#else
      ctx->SetStatus(tensorflow::errors::Internal(op, ": built without GPU kernels"));
#endif
    } else {
      body(nullptr);
    }
  } catch (const std::exception& e) {
    ctx->SetStatus(tensorflow::errors::Internal(op, ": kernel failed: ", e.what()));
  }
}

template <typename T>
const T* data(const Tensor& t) {
  return t.flat<T>().data();
}

template <typename T>
T* data(Tensor* t) {
  return t->flat<T>().data();
}

// ---- shared checks ---------------------------------------------------------------------------

Status expect_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  if (t.shape() != x.shape())
    return InvalidArgument(op, ": ", name, ": expected shape ", x.shape().DebugString(),
                           " (same as x), got ", t.shape().DebugString());
  return Status();
}

Status expect_one_element(const char* op, const char* name, const Tensor& t) {
  if (t.NumElements() != 1)
    return InvalidArgument(op, ": ", name, ": expected one element, got shape ",
                           t.shape().DebugString());
  return Status();
}

Status expect_at_most_one(const char* op, const char* name, int64_t n) {
  if (n > 1)
    return InvalidArgument(op, ": ", name, ": expected a list of zero or one tensor, got ", n);
  return Status();
}

Status expect_positive_sizes(const char* op, const char* name, const Tensor& t, int rank) {
  if (t.dims() != rank)
    return InvalidArgument(op, ": ", name, ": expected a ", rank, "-d tensor, got shape ",
                           t.shape().DebugString());
  for (int i = 0; i < rank; ++i)
    if (t.dim_size(i) < 1)
      return InvalidArgument(op, ": ", name, ": expected positive sizes, got shape ",
                             t.shape().DebugString());
  return Status();
}

// On the GPU our kernels index in 32 bits.
Status expect_int32_sized(const char* op, const char* name, const Tensor& t, bool gpu) {
  if (gpu && t.NumElements() > kInt32Max)
    return InvalidArgument(op, ": ", name, ": has ", t.NumElements(),
                           " elements; the CUDA kernels take fewer than 2^31");
  return Status();
}

// ---- masked squared-error loss -----------------------------------------------------------------

template <typename Ctx>
Status read_count_factor(Ctx* c, const char* op, float* count_factor) {
  TF_RETURN_IF_ERROR(c->GetAttr("count_factor", count_factor));
  if (!kernels::valid_count_factor(*count_factor))
    return InvalidArgument(op, ": count_factor: expected ", kernels::kCountFactorExpected,
                           ", got ", *count_factor);
  return Status();
}

// x, t and the optional mask v, all of one shape: (x, t, v-or-null) after the checks.
Status loss_inputs(OpKernelContext* ctx, const char* op, int first, const Tensor** x,
                   const Tensor** t, const Tensor** v) {
  *x = &ctx->input(first);
  *t = &ctx->input(first + 1);
  OpInputList masks;
  TF_RETURN_IF_ERROR(ctx->input_list("v", &masks));
  TF_RETURN_IF_ERROR(expect_at_most_one(op, "v", masks.size()));
  *v = masks.size() == 1 ? &masks[0] : nullptr;
  if ((*x)->NumElements() == 0)
    return InvalidArgument(op, ": x: expected a non-empty tensor, got shape ",
                           (*x)->shape().DebugString());
  TF_RETURN_IF_ERROR(expect_same_shape(op, "t", **t, **x));
  if (*v) TF_RETURN_IF_ERROR(expect_same_shape(op, "v", **v, **x));
  return Status();
}

template <typename T, bool kGpu>
class SqErrorLossOp : public OpKernel {
 public:
  explicit SqErrorLossOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, read_count_factor(c, kLoss, &count_factor_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor *x, *t, *v;
    OP_REQUIRES_OK(ctx, loss_inputs(ctx, kLoss, 0, &x, &t, &v));
    Tensor *loss = nullptr, *count = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &loss));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &count));
    const T* vd = v ? data<T>(*v) : nullptr;
    run_kernel<kGpu>(ctx, kLoss, [&](void* stream) {
      if constexpr (kGpu)
        kernels::sq_error_loss_forward_cuda<T>(data<T>(*x), data<T>(*t), vd, x->NumElements(),
                                               count_factor_, data<T>(loss), data<T>(count),
                                               stream);
      else
        kernels::sq_error_loss_forward_cpu<T>(data<T>(*x), data<T>(*t), vd, x->NumElements(),
                                              count_factor_, data<T>(loss), data<T>(count));
    });
  }

 private:
  float count_factor_ = 1;
};

template <typename T, bool kGpu>
class SqErrorLossBackwardOp : public OpKernel {
 public:
  explicit SqErrorLossBackwardOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, read_count_factor(c, kLossBackward, &count_factor_));
    OP_REQUIRES_OK(c, c->GetAttr("with_grad_t", &with_grad_t_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad_loss = ctx->input(0);
    const Tensor *x, *t, *v;
    OP_REQUIRES_OK(ctx, loss_inputs(ctx, kLossBackward, 1, &x, &t, &v));
    const Tensor& count = ctx->input(ctx->num_inputs() - 1);
    OP_REQUIRES_OK(ctx, expect_one_element(kLossBackward, "grad_loss", grad_loss));
    OP_REQUIRES_OK(ctx, expect_one_element(kLossBackward, "count", count));
    Tensor *gx = nullptr, *gt = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x->shape(), &gx));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, with_grad_t_ ? x->shape() : TensorShape({0}),
                                             &gt));
    const T* vd = v ? data<T>(*v) : nullptr;
    T* gtd = with_grad_t_ ? data<T>(gt) : nullptr;
    run_kernel<kGpu>(ctx, kLossBackward, [&](void* stream) {
      if constexpr (kGpu)
        kernels::sq_error_loss_backward_cuda<T>(data<T>(*x), data<T>(*t), vd, x->NumElements(),
                                                data<T>(count), data<T>(grad_loss),
                                                count_factor_, data<T>(gx), gtd, stream);
      else
        kernels::sq_error_loss_backward_cpu<T>(data<T>(*x), data<T>(*t), vd, x->NumElements(),
                                               data<T>(count), data<T>(grad_loss),
                                               count_factor_, data<T>(gx), gtd);
    });
  }

 private:
  float count_factor_ = 1;
  bool with_grad_t_ = true;
};

// ---- conv2d -------------------------------------------------------------------------------------

struct ConvAttrs {
  std::vector<int64_t> stride, padding, dilation;
};

template <typename Ctx>
Status read_conv_attrs(Ctx* c, const char* op, ConvAttrs* a) {
  TF_RETURN_IF_ERROR(c->GetAttr("stride", &a->stride));
  TF_RETURN_IF_ERROR(c->GetAttr("padding", &a->padding));
  TF_RETURN_IF_ERROR(c->GetAttr("dilation", &a->dilation));
  const struct {
    const char* name;
    const std::vector<int64_t>& values;
    int64_t low;
  } params[] = {{"stride", a->stride, 1}, {"padding", a->padding, 0}, {"dilation", a->dilation, 1}};
  for (const auto& p : params) {
    if (p.values.size() != 2)
      return InvalidArgument(op, ": ", p.name, ": expected two values (height, width), got ",
                             p.values.size());
    for (int64_t v : p.values)
      if (v < p.low || v > kInt32Max)
        return InvalidArgument(op, ": ", p.name, ": expected values in [", p.low,
                               ", 2**31 - 1], got [", p.values[0], ", ", p.values[1], "]");
  }
  return Status();
}

// The output size along one axis, or an error when the dilated kernel does not fit. 128-bit:
// sizes and attrs are each in range, but their products need not be.
Status conv_out_size(const char* op, const char* axis, int64_t in, int64_t k, int64_t stride,
                     int64_t pad, int64_t dil, int64_t* out) {
  const __int128 extent = static_cast<__int128>(dil) * (k - 1) + 1;
  const __int128 padded = static_cast<__int128>(in) + 2 * static_cast<__int128>(pad);
  if (extent > padded)
    return InvalidArgument(op, ": w: kernel ", axis, " extent ", static_cast<int64_t>(extent),
                           " (size ", k, ", dilation ", dil, ") is larger than the padded input ",
                           axis, " ", static_cast<int64_t>(padded), " (", in, " + 2*", pad, ")");
  *out = static_cast<int64_t>((padded - extent) / stride + 1);
  return Status();
}

// Every check of x (B, Cin, H, W) against w (Cout, Cin, kh, kw), and the kernels' geometry.
Status conv_geometry(const char* op, const Tensor& x, const Tensor& w, const ConvAttrs& a,
                     bool gpu, kernels::Conv2dShape* s) {
  TF_RETURN_IF_ERROR(expect_positive_sizes(op, "x", x, 4));
  TF_RETURN_IF_ERROR(expect_positive_sizes(op, "w", w, 4));
  if (w.dim_size(1) != x.dim_size(1))
    return InvalidArgument(op, ": w: expected shape (Cout, ", x.dim_size(1),
                           ", kh, kw) to match the input channels of x, got ",
                           w.shape().DebugString(), " (groups=1 only)");
  *s = kernels::Conv2dShape{};
  s->batch = x.dim_size(0);
  s->in_channels = x.dim_size(1);
  s->in_h = x.dim_size(2);
  s->in_w = x.dim_size(3);
  s->out_channels = w.dim_size(0);
  s->kernel_h = w.dim_size(2);
  s->kernel_w = w.dim_size(3);
  s->stride_h = a.stride[0];
  s->stride_w = a.stride[1];
  s->pad_h = a.padding[0];
  s->pad_w = a.padding[1];
  s->dilation_h = a.dilation[0];
  s->dilation_w = a.dilation[1];
  TF_RETURN_IF_ERROR(conv_out_size(op, "height", s->in_h, s->kernel_h, s->stride_h, s->pad_h,
                                   s->dilation_h, &s->out_h));
  TF_RETURN_IF_ERROR(conv_out_size(op, "width", s->in_w, s->kernel_w, s->stride_w, s->pad_w,
                                   s->dilation_w, &s->out_w));
  if (gpu) {
    TF_RETURN_IF_ERROR(expect_int32_sized(op, "x", x, gpu));
    TF_RETURN_IF_ERROR(expect_int32_sized(op, "w", w, gpu));
    if (s->in_h + 2 * s->pad_h > kInt32Max || s->in_w + 2 * s->pad_w > kInt32Max)
      return InvalidArgument(op, ": padding: the padded input must stay below 2^31 per axis "
                                 "on the GPU");
  }
  return Status();
}

TensorShape conv_output_shape(const kernels::Conv2dShape& s) {
  return TensorShape({s.batch, s.out_channels, s.out_h, s.out_w});
}

Status expect_grad_y(const char* op, const Tensor& gy, const kernels::Conv2dShape& s, bool gpu) {
  const TensorShape want = conv_output_shape(s);
  if (gy.shape() != want)
    return InvalidArgument(op, ": grad_y: expected shape ", want.DebugString(),
                           " (the conv's output), got ", gy.shape().DebugString());
  return expect_int32_sized(op, "grad_y", gy, gpu);
}

template <typename T, bool kGpu>
class Conv2dOp : public OpKernel {
 public:
  explicit Conv2dOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, read_conv_attrs(c, kConv, &attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& w = ctx->input(1);
    OpInputList biases;
    OP_REQUIRES_OK(ctx, ctx->input_list("b", &biases));
    OP_REQUIRES_OK(ctx, expect_at_most_one(kConv, "b", biases.size()));
    kernels::Conv2dShape s;
    OP_REQUIRES_OK(ctx, conv_geometry(kConv, x, w, attrs_, kGpu, &s));
    const T* bd = nullptr;
    if (biases.size() == 1) {
      const Tensor& b = biases[0];
      OP_REQUIRES(ctx, b.dims() == 1 && b.dim_size(0) == s.out_channels,
                  InvalidArgument(kConv, ": b: expected shape [", s.out_channels,
                                  "] to match the output channels of w, got ",
                                  b.shape().DebugString()));
      bd = data<T>(b);
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, conv_output_shape(s), &y));
    OP_REQUIRES_OK(ctx, expect_int32_sized(kConv, "y", *y, kGpu));
    run_kernel<kGpu>(ctx, kConv, [&](void* stream) {
      if constexpr (kGpu)
        kernels::conv2d_forward_cuda<T>(s, data<T>(x), data<T>(w), bd, data<T>(y), stream);
      else
        kernels::conv2d_forward_cpu<T>(s, data<T>(x), data<T>(w), bd, data<T>(y));
    });
  }

 private:
  ConvAttrs attrs_;
};

template <typename T, bool kGpu>
class Conv2dBackwardDataOp : public OpKernel {
 public:
  explicit Conv2dBackwardDataOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, read_conv_attrs(c, kConvData, &attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& gy = ctx->input(0);
    const Tensor& w = ctx->input(1);
    const Tensor& x = ctx->input(2);  // for its shape only
    kernels::Conv2dShape s;
    OP_REQUIRES_OK(ctx, conv_geometry(kConvData, x, w, attrs_, kGpu, &s));
    OP_REQUIRES_OK(ctx, expect_grad_y(kConvData, gy, s, kGpu));
    Tensor* gx = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, x.shape(), &gx));
    run_kernel<kGpu>(ctx, kConvData, [&](void* stream) {
      if constexpr (kGpu)
        kernels::conv2d_backward_data_cuda<T>(s, data<T>(gy), data<T>(w), data<T>(gx), stream);
      else
        kernels::conv2d_backward_data_cpu<T>(s, data<T>(gy), data<T>(w), data<T>(gx));
    });
  }

 private:
  ConvAttrs attrs_;
};

template <typename T, bool kGpu>
class Conv2dBackwardWeightOp : public OpKernel {
 public:
  explicit Conv2dBackwardWeightOp(OpKernelConstruction* c) : OpKernel(c) {
    OP_REQUIRES_OK(c, read_conv_attrs(c, kConvWeight, &attrs_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    const Tensor& gy = ctx->input(1);
    const Tensor& w = ctx->input(2);  // for its shape only
    kernels::Conv2dShape s;
    OP_REQUIRES_OK(ctx, conv_geometry(kConvWeight, x, w, attrs_, kGpu, &s));
    OP_REQUIRES_OK(ctx, expect_grad_y(kConvWeight, gy, s, kGpu));
    Tensor* gw = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, w.shape(), &gw));
    run_kernel<kGpu>(ctx, kConvWeight, [&](void* stream) {
      if constexpr (kGpu)
        kernels::conv2d_backward_weight_cuda<T>(s, data<T>(x), data<T>(gy), data<T>(gw), stream);
      else
        kernels::conv2d_backward_weight_cpu<T>(s, data<T>(x), data<T>(gy), data<T>(gw));
    });
  }

 private:
  ConvAttrs attrs_;
};

template <typename T, bool kGpu>
class Conv2dBackwardBiasOp : public OpKernel {
 public:
  explicit Conv2dBackwardBiasOp(OpKernelConstruction* c) : OpKernel(c) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& gy = ctx->input(0);
    OP_REQUIRES_OK(ctx, expect_positive_sizes(kConvBias, "grad_y", gy, 4));
    OP_REQUIRES_OK(ctx, expect_int32_sized(kConvBias, "grad_y", gy, kGpu));
    // The bias kernel reads only batch, channels and the output plane.
    kernels::Conv2dShape s{};
    s.batch = gy.dim_size(0);
    s.out_channels = gy.dim_size(1);
    s.out_h = gy.dim_size(2);
    s.out_w = gy.dim_size(3);
    Tensor* gb = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({s.out_channels}), &gb));
    run_kernel<kGpu>(ctx, kConvBias, [&](void* stream) {
      if constexpr (kGpu)
        kernels::conv2d_backward_bias_cuda<T>(s, data<T>(gy), data<T>(gb), stream);
      else
        kernels::conv2d_backward_bias_cpu<T>(s, data<T>(gy), data<T>(gb));
    });
  }
};

// ---- shape functions: the same checks where shapes are static, unknown sizes pass ------------

// s0 and s1 must be compatible, else "op: name: expected shape <s0> (same as x), got <s1>".
Status merge_like_x(InferenceContext* c, const char* op, const char* name, ShapeHandle x,
                    ShapeHandle other, ShapeHandle* out) {
  if (!c->Merge(x, other, out).ok())
    return InvalidArgument(op, ": ", name, ": expected shape ", c->DebugString(x),
                           " (same as x), got ", c->DebugString(other));
  return Status();
}

// The shape of x merged with t's and v's, inputs starting at `first`.
Status loss_shape(InferenceContext* c, const char* op, int first, ShapeHandle* x) {
  float count_factor;
  TF_RETURN_IF_ERROR(read_count_factor(c, op, &count_factor));
  std::vector<ShapeHandle> masks;
  TF_RETURN_IF_ERROR(c->input("v", &masks));
  TF_RETURN_IF_ERROR(expect_at_most_one(op, "v", masks.size()));
  *x = c->input(first);
  TF_RETURN_IF_ERROR(merge_like_x(c, op, "t", *x, c->input(first + 1), x));
  if (!masks.empty()) TF_RETURN_IF_ERROR(merge_like_x(c, op, "v", *x, masks[0], x));
  return Status();
}

Status sq_error_loss_shape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(loss_shape(c, kLoss, 0, &x));
  c->set_output(0, c->Scalar());
  c->set_output(1, c->Scalar());
  return Status();
}

Status sq_error_loss_backward_shape(InferenceContext* c) {
  ShapeHandle x;
  TF_RETURN_IF_ERROR(loss_shape(c, kLossBackward, 1, &x));
  bool with_grad_t;
  TF_RETURN_IF_ERROR(c->GetAttr("with_grad_t", &with_grad_t));
  c->set_output(0, x);
  c->set_output(1, with_grad_t ? x : c->MakeShape({0}));
  return Status();
}

DimensionHandle conv_out_dim(InferenceContext* c, const char* op, const char* axis,
                             DimensionHandle in, DimensionHandle k, int64_t stride, int64_t pad,
                             int64_t dil, Status* status) {
  if (!c->ValueKnown(in) || !c->ValueKnown(k)) return c->UnknownDim();
  int64_t out = 0;
  *status = conv_out_size(op, axis, c->Value(in), c->Value(k), stride, pad, dil, &out);
  return c->MakeDim(out);
}

// The checked output shape (B, Cout, OH, OW) of x (input x_index) and w (input w_index).
Status conv_shape(InferenceContext* c, const char* op, int x_index, int w_index,
                  ShapeHandle* y) {
  ConvAttrs a;
  TF_RETURN_IF_ERROR(read_conv_attrs(c, op, &a));
  ShapeHandle x, w;
  if (!c->WithRank(c->input(x_index), 4, &x).ok())
    return InvalidArgument(op, ": x: expected a 4-d tensor (B, Cin, H, W), got shape ",
                           c->DebugString(c->input(x_index)));
  if (!c->WithRank(c->input(w_index), 4, &w).ok())
    return InvalidArgument(op, ": w: expected a 4-d tensor (Cout, Cin, kh, kw), got shape ",
                           c->DebugString(c->input(w_index)));
  DimensionHandle channels;
  if (!c->Merge(c->Dim(x, 1), c->Dim(w, 1), &channels).ok())
    return InvalidArgument(op, ": w: expected shape (Cout, ", c->DebugString(c->Dim(x, 1)),
                           ", kh, kw) to match the input channels of x, got ", c->DebugString(w),
                           " (groups=1 only)");
  Status status;
  DimensionHandle out_h = conv_out_dim(c, op, "height", c->Dim(x, 2), c->Dim(w, 2), a.stride[0],
                                       a.padding[0], a.dilation[0], &status);
  TF_RETURN_IF_ERROR(status);
  DimensionHandle out_w = conv_out_dim(c, op, "width", c->Dim(x, 3), c->Dim(w, 3), a.stride[1],
                                       a.padding[1], a.dilation[1], &status);
  TF_RETURN_IF_ERROR(status);
  *y = c->MakeShape({c->Dim(x, 0), c->Dim(w, 0), out_h, out_w});
  return Status();
}

Status expect_grad_y_shape(InferenceContext* c, const char* op, ShapeHandle y, int gy_index) {
  ShapeHandle merged;
  if (!c->Merge(y, c->input(gy_index), &merged).ok())
    return InvalidArgument(op, ": grad_y: expected shape ", c->DebugString(y),
                           " (the conv's output), got ", c->DebugString(c->input(gy_index)));
  return Status();
}

Status conv2d_shape(InferenceContext* c) {
  ShapeHandle y;
  TF_RETURN_IF_ERROR(conv_shape(c, kConv, 0, 1, &y));
  std::vector<ShapeHandle> biases;
  TF_RETURN_IF_ERROR(c->input("b", &biases));
  TF_RETURN_IF_ERROR(expect_at_most_one(kConv, "b", biases.size()));
  if (!biases.empty()) {
    ShapeHandle b;
    DimensionHandle channels;
    if (!c->WithRank(biases[0], 1, &b).ok() ||
        !c->Merge(c->Dim(b, 0), c->Dim(y, 1), &channels).ok())
      return InvalidArgument(kConv, ": b: expected shape [", c->DebugString(c->Dim(y, 1)),
                             "] to match the output channels of w, got ",
                             c->DebugString(biases[0]));
  }
  c->set_output(0, y);
  return Status();
}

Status conv2d_backward_data_shape(InferenceContext* c) {
  ShapeHandle y;
  TF_RETURN_IF_ERROR(conv_shape(c, kConvData, 2, 1, &y));
  TF_RETURN_IF_ERROR(expect_grad_y_shape(c, kConvData, y, 0));
  c->set_output(0, c->input(2));
  return Status();
}

Status conv2d_backward_weight_shape(InferenceContext* c) {
  ShapeHandle y;
  TF_RETURN_IF_ERROR(conv_shape(c, kConvWeight, 0, 2, &y));
  TF_RETURN_IF_ERROR(expect_grad_y_shape(c, kConvWeight, y, 1));
  c->set_output(0, c->input(2));
  return Status();
}

Status conv2d_backward_bias_shape(InferenceContext* c) {
  ShapeHandle gy;
  if (!c->WithRank(c->input(0), 4, &gy).ok())
    return InvalidArgument(kConvBias, ": grad_y: expected a 4-d tensor, got shape ",
                           c->DebugString(c->input(0)));
  c->set_output(0, c->Vector(c->Dim(gy, 1)));
  return Status();
}

}  // namespace

// ---- the ops: contract in one place -------------------------------------------------------------

REGISTER_OP("DeepprofSqErrorLoss")
    .Input("x: T")
    .Input("t: T")
    .Input("v: num_masks * T")
    .Output("loss: T")
    .Output("count: T")
    .Attr("T: {float, double}")
    .Attr("count_factor: float")
    .Attr("num_masks: int >= 0")
    .SetShapeFn(sq_error_loss_shape);

REGISTER_OP("DeepprofSqErrorLossBackward")
    .Input("grad_loss: T")
    .Input("x: T")
    .Input("t: T")
    .Input("v: num_masks * T")
    .Input("count: T")
    .Output("grad_x: T")
    .Output("grad_t: T")
    .Attr("T: {float, double}")
    .Attr("count_factor: float")
    .Attr("num_masks: int >= 0")
    .Attr("with_grad_t: bool = true")
    .SetShapeFn(sq_error_loss_backward_shape);

REGISTER_OP("DeepprofConv2d")
    .Input("x: T")
    .Input("w: T")
    .Input("b: num_biases * T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("stride: list(int) = [1, 1]")
    .Attr("padding: list(int) = [0, 0]")
    .Attr("dilation: list(int) = [1, 1]")
    .Attr("num_biases: int >= 0")
    .SetShapeFn(conv2d_shape);

REGISTER_OP("DeepprofConv2dBackwardData")
    .Input("grad_y: T")
    .Input("w: T")
    .Input("x: T")
    .Output("grad_x: T")
    .Attr("T: {float, double}")
    .Attr("stride: list(int) = [1, 1]")
    .Attr("padding: list(int) = [0, 0]")
    .Attr("dilation: list(int) = [1, 1]")
    .SetShapeFn(conv2d_backward_data_shape);

REGISTER_OP("DeepprofConv2dBackwardWeight")
    .Input("x: T")
    .Input("grad_y: T")
    .Input("w: T")
    .Output("grad_w: T")
    .Attr("T: {float, double}")
    .Attr("stride: list(int) = [1, 1]")
    .Attr("padding: list(int) = [0, 0]")
    .Attr("dilation: list(int) = [1, 1]")
    .SetShapeFn(conv2d_backward_weight_shape);

REGISTER_OP("DeepprofConv2dBackwardBias")
    .Input("grad_y: T")
    .Output("grad_b: T")
    .Attr("T: {float, double}")
    .SetShapeFn(conv2d_backward_bias_shape);

// ---- kernels, one block per device ------------------------------------------------------------

#define DEEPPROF_REGISTER(DEVICE, T, ON_GPU)                                                    \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("DeepprofSqErrorLoss").Device(DEVICE).TypeConstraint<T>("T"),                       \
      SqErrorLossOp<T, ON_GPU>);                                                               \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("DeepprofSqErrorLossBackward").Device(DEVICE).TypeConstraint<T>("T"),               \
      SqErrorLossBackwardOp<T, ON_GPU>);                                                       \
  REGISTER_KERNEL_BUILDER(Name("DeepprofConv2d").Device(DEVICE).TypeConstraint<T>("T"),        \
                          Conv2dOp<T, ON_GPU>);                                                \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("DeepprofConv2dBackwardData").Device(DEVICE).TypeConstraint<T>("T"),                \
      Conv2dBackwardDataOp<T, ON_GPU>);                                                        \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("DeepprofConv2dBackwardWeight").Device(DEVICE).TypeConstraint<T>("T"),              \
      Conv2dBackwardWeightOp<T, ON_GPU>);                                                      \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("DeepprofConv2dBackwardBias").Device(DEVICE).TypeConstraint<T>("T"),                \
      Conv2dBackwardBiasOp<T, ON_GPU>)

DEEPPROF_REGISTER(DEVICE_CPU, float, false);
DEEPPROF_REGISTER(DEVICE_CPU, double, false);

#if GOOGLE_CUDA
DEEPPROF_REGISTER(tensorflow::DEVICE_GPU, float, true);
DEEPPROF_REGISTER(tensorflow::DEVICE_GPU, double, true);
#endif
