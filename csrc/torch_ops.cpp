// Our kernels as PyTorch's own operators: the `deepprof::` library (impl="native" in ops.torch).
//
// Built into a plain shared library (libdeepprof_torch.so) against the installed torch and
// loaded with torch.ops.load_library. Per op: a schema, CPU and CUDA kernels (one function,
// branching on the device), a Meta kernel (shapes only, SymInt-aware, so the ops trace under
// torch.compile), and for the two user-facing ops an Autograd kernel written in C++, so the
// backward pass runs without Python in between.
//
//   sq_error_loss(x, t, v?, count_factor) -> loss            user-facing, differentiable
//   sq_error_loss_forward(...) -> (loss, count)              the forward kernel
//   sq_error_loss_backward(g, x, t, v?, count, ...) -> (gx, gt)
//   sq_error_loss_fused(x, t, v?, ...) -> (loss, count, gx, gt)   both in one kernel launch
//   conv2d(x, w, b?, stride, padding, dilation) -> y         user-facing, differentiable
//   conv2d_forward(...) -> y
//   conv2d_backward(gy, x, w, ..., output_mask) -> (gx, gw, gb)
//
// The CUDA stream is PyTorch's current stream on the tensors' device, read through c10's
// device-generic interface, so this file needs no CUDA headers and builds against CPU-only
// torch as well. Nothing here synchronises the device.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void* current_stream(const Tensor& t) {
  if (!t.is_cuda()) return nullptr;
  c10::impl::VirtualGuardImpl cuda(c10::DeviceType::CUDA);
  return cuda.getStream(t.device()).native_handle();
}

// Makes x's GPU current for the kernel call; nothing to do for CPU tensors.
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const Tensor& x) {
    if (x.is_cuda()) guard.reset_device(x.device());
  }
  c10::OptionalDeviceGuard guard;
};

// ---- argument checks: the adapter checks first; these guard direct torch.ops calls ------------

void check_float(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                   name, ": expected float32 or float64, got ", t.scalar_type());
}

void check_like(const char* op, const char* name, const Tensor& t, const Tensor& x,
                bool same_shape) {
  check_float(op, name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, ": expected ",
                   x.scalar_type(), " like x, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, ": is on ", t.device(),
                    " but x is on ", x.device());
  if (same_shape)
    TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, ": expected shape ", x.sizes(),
                      " (same as x), got ", t.sizes());
}

void check_device(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cpu() || x.is_cuda(), op, ": x: expected a CPU or CUDA tensor, got ",
                    x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, op, ": x: expected a non-empty tensor, got shape ",
                    x.sizes());
}

// What every loss op takes: x (float, on a CPU or CUDA device, not empty), t and v (optional)
// like it, and a count_factor that kernels::valid_count_factor accepts.
void check_loss_inputs(const char* op, const Tensor& x, const Tensor& t,
                       const std::optional<Tensor>& v, double count_factor) {
  check_float(op, "x", x);
  check_device(op, x);
  check_like(op, "t", t, x, true);
  if (v) check_like(op, "v", *v, x, true);
  TORCH_CHECK_VALUE(kernels::valid_count_factor(count_factor), op, ": count_factor: expected ",
                    kernels::kCountFactorExpected, ", got ", count_factor);
}

// ---- masked squared-error loss -----------------------------------------------------------------

std::tuple<Tensor, Tensor> sq_error_loss_forward(const Tensor& x_, const Tensor& t_,
                                                 const std::optional<Tensor>& v_,
                                                 double count_factor) {
  const char* op = "deepprof::sq_error_loss_forward";
  check_loss_inputs(op, x_, t_, v_, count_factor);
  const Tensor x = x_.contiguous(), t = t_.contiguous();
  const Tensor v = v_ ? v_->contiguous() : Tensor();
  Tensor loss = at::empty({}, x.options()), count = at::empty({}, x.options());
  const KernelDeviceGuard guard(x);
  void* stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sq_error_loss_forward", [&] {
    const scalar_t* vd = v.defined() ? v.const_data_ptr<scalar_t>() : nullptr;
    if (x.is_cuda())
      kernels::sq_error_loss_forward_cuda<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), vd, x.numel(),
          count_factor, loss.mutable_data_ptr<scalar_t>(), count.mutable_data_ptr<scalar_t>(),
          stream);
    else
      kernels::sq_error_loss_forward_cpu<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), vd, x.numel(),
          count_factor, loss.mutable_data_ptr<scalar_t>(), count.mutable_data_ptr<scalar_t>());
  });
  return {loss, count};
}

std::tuple<Tensor, Tensor> sq_error_loss_backward(const Tensor& grad_loss_, const Tensor& x_,
                                                  const Tensor& t_,
                                                  const std::optional<Tensor>& v_,
                                                  const Tensor& count_, double count_factor,
                                                  bool with_gt) {
  const char* op = "deepprof::sq_error_loss_backward";
  check_loss_inputs(op, x_, t_, v_, count_factor);
  check_like(op, "count", count_, x_, false);
  check_like(op, "grad_loss", grad_loss_, x_, false);
  TORCH_CHECK_VALUE(count_.numel() == 1 && grad_loss_.numel() == 1, op,
                    ": count and grad_loss must have one element each");
  const Tensor x = x_.contiguous(), t = t_.contiguous();
  const Tensor v = v_ ? v_->contiguous() : Tensor();
  const Tensor count = count_.contiguous(), grad_loss = grad_loss_.contiguous();
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor gt = with_gt ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const KernelDeviceGuard guard(x);
  void* stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sq_error_loss_backward", [&] {
    const scalar_t* vd = v.defined() ? v.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtd = with_gt ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    if (x.is_cuda())
      kernels::sq_error_loss_backward_cuda<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), vd, x.numel(),
          count.const_data_ptr<scalar_t>(), grad_loss.const_data_ptr<scalar_t>(), count_factor,
          gx.mutable_data_ptr<scalar_t>(), gtd, stream);
    else
      kernels::sq_error_loss_backward_cpu<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), vd, x.numel(),
          count.const_data_ptr<scalar_t>(), grad_loss.const_data_ptr<scalar_t>(), count_factor,
          gx.mutable_data_ptr<scalar_t>(), gtd);
  });
  return {gx, gt};
}

// Loss and gradient (for an upstream gradient of 1) in one call: one kernel launch on the GPU.
std::tuple<Tensor, Tensor, Tensor, Tensor> sq_error_loss_fused(const Tensor& x_, const Tensor& t_,
                                                               const std::optional<Tensor>& v_,
                                                               double count_factor,
                                                               bool with_gt) {
  const char* op = "deepprof::sq_error_loss_fused";
  check_loss_inputs(op, x_, t_, v_, count_factor);
  const Tensor x = x_.contiguous(), t = t_.contiguous();
  const Tensor v = v_ ? v_->contiguous() : Tensor();
  Tensor loss = at::empty({}, x.options()), count = at::empty({}, x.options());
  Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor gt = with_gt ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const KernelDeviceGuard guard(x);
  void* stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sq_error_loss_fused", [&] {
    const scalar_t* vd = v.defined() ? v.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* gtd = with_gt ? gt.mutable_data_ptr<scalar_t>() : nullptr;
    if (x.is_cuda())
      kernels::sq_error_loss_fused_cuda<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), vd, x.numel(),
          count_factor, nullptr, loss.mutable_data_ptr<scalar_t>(),
          count.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), gtd, stream);
    else
      kernels::sq_error_loss_fused_cpu<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), vd, x.numel(),
          count_factor, nullptr, loss.mutable_data_ptr<scalar_t>(),
          count.mutable_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), gtd);
  });
  return {loss, count, gx, gt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> sq_error_loss_fused_meta(
    const Tensor& x, const Tensor&, const std::optional<Tensor>&, double, bool with_gt) {
  return {at::empty({}, x.options()), at::empty({}, x.options()),
          at::empty_like(x, at::MemoryFormat::Contiguous),
          with_gt ? at::empty_like(x, at::MemoryFormat::Contiguous)
                  : at::empty({0}, x.options())};
}

std::tuple<Tensor, Tensor> sq_error_loss_forward_meta(const Tensor& x, const Tensor&,
                                                      const std::optional<Tensor>&, double) {
  return {at::empty({}, x.options()), at::empty({}, x.options())};
}

std::tuple<Tensor, Tensor> sq_error_loss_backward_meta(const Tensor&, const Tensor& x,
                                                       const Tensor&,
                                                       const std::optional<Tensor>&,
                                                       const Tensor&, double, bool with_gt) {
  return {at::empty_like(x, at::MemoryFormat::Contiguous),
          with_gt ? at::empty_like(x, at::MemoryFormat::Contiguous)
                  : at::empty({0}, x.options())};
}

// Calls through the dispatcher, so autograd, tracing and the right backend all see the ops.
std::tuple<Tensor, Tensor> call_sq_error_loss_forward(const Tensor& x, const Tensor& t,
                                                      const std::optional<Tensor>& v,
                                                      double count_factor) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepprof::sq_error_loss_forward", "")
                       .typed<decltype(sq_error_loss_forward)>();
  return op.call(x, t, v, count_factor);
}

std::tuple<Tensor, Tensor> call_sq_error_loss_backward(const Tensor& g, const Tensor& x,
                                                       const Tensor& t,
                                                       const std::optional<Tensor>& v,
                                                       const Tensor& count, double count_factor,
                                                       bool with_gt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepprof::sq_error_loss_backward", "")
                       .typed<decltype(sq_error_loss_backward)>();
  return op.call(g, x, t, v, count, count_factor, with_gt);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_sq_error_loss_fused(
    const Tensor& x, const Tensor& t, const std::optional<Tensor>& v, double count_factor,
    bool with_gt) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepprof::sq_error_loss_fused", "")
                       .typed<decltype(sq_error_loss_fused)>();
  return op.call(x, t, v, count_factor, with_gt);
}

// When a gradient will be wanted (an input requires grad: training), forward runs the fused
// kernel and keeps the gradient for an upstream gradient of 1; backward only scales it. A loss
// is the root of backward, so that scale is 1 in practice: one launch per step instead of two,
// and x, t, v need not be kept. Otherwise (inference, no grad) the forward kernel alone runs.
class SqErrorLossFunction : public torch::autograd::Function<SqErrorLossFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& t,
                        const std::optional<Tensor>& v, double count_factor) {
    if (x.requires_grad() || t.requires_grad()) {
      auto [loss, count, gx, gt] =
          call_sq_error_loss_fused(x, t, v, count_factor, t.requires_grad());
      ctx->save_for_backward({gx, t.requires_grad() ? gt : Tensor()});
      ctx->saved_data["fused"] = true;
      return loss;
    }
    auto [loss, count] = call_sq_error_loss_forward(x, t, v, count_factor);
    ctx->save_for_backward({x, t, v.value_or(Tensor()), count});
    ctx->saved_data["count_factor"] = count_factor;
    ctx->saved_data["fused"] = false;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    if (ctx->saved_data["fused"].toBool()) {
      const Tensor& g = grad_outputs[0];
      const bool want_gx = ctx->needs_input_grad(0), want_gt = ctx->needs_input_grad(1);
      return {want_gx ? saved[0] * g : Tensor(),
              want_gt && saved[1].defined() ? saved[1] * g : Tensor(), Tensor(), Tensor()};
    }
    const std::optional<Tensor> v = saved[2].defined() ? std::optional<Tensor>(saved[2])
                                                       : std::nullopt;
    const bool want_gx = ctx->needs_input_grad(0), want_gt = ctx->needs_input_grad(1);
    if (!want_gx && !want_gt) return {Tensor(), Tensor(), Tensor(), Tensor()};
    auto [gx, gt] = call_sq_error_loss_backward(grad_outputs[0], saved[0], saved[1], v,
                                                saved[3],
                                                ctx->saved_data["count_factor"].toDouble(),
                                                want_gt);
    return {want_gx ? gx : Tensor(), want_gt ? gt : Tensor(), Tensor(), Tensor()};
  }
};

Tensor sq_error_loss_autograd(const Tensor& x, const Tensor& t, const std::optional<Tensor>& v,
                              double count_factor) {
  return SqErrorLossFunction::apply(x, t, v, count_factor);
}

Tensor sq_error_loss_composite(const Tensor& x, const Tensor& t, const std::optional<Tensor>& v,
                               double count_factor) {
  return std::get<0>(call_sq_error_loss_forward(x, t, v, count_factor));
}

// ---- conv2d -------------------------------------------------------------------------------------

struct ConvArgs {
  at::IntArrayRef stride, padding, dilation;
};

void check_conv_args(const char* op, const ConvArgs& a) {
  TORCH_CHECK_VALUE(a.stride.size() == 2 && a.padding.size() == 2 && a.dilation.size() == 2, op,
                    ": stride, padding and dilation take two values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(a.stride[i] >= 1 && a.stride[i] <= INT32_MAX, op,
                      ": stride: expected values in [1, 2**31 - 1], got ", a.stride);
    TORCH_CHECK_VALUE(a.padding[i] >= 0 && a.padding[i] <= INT32_MAX, op,
                      ": padding: expected values in [0, 2**31 - 1], got ", a.padding);
    TORCH_CHECK_VALUE(a.dilation[i] >= 1 && a.dilation[i] <= INT32_MAX, op,
                      ": dilation: expected values in [1, 2**31 - 1], got ", a.dilation);
  }
}

// Output size along one axis; SymInt so the Meta kernel works with dynamic shapes.
c10::SymInt conv_out_size(const char* op, const char* axis, const c10::SymInt& in,
                          const c10::SymInt& k, int64_t stride, int64_t pad, int64_t dil) {
  const c10::SymInt extent = (k - 1) * dil + 1, padded = in + 2 * pad;
  TORCH_CHECK_VALUE(extent <= padded, op, ": w: kernel ", axis, " extent ", extent,
                    " is larger than the padded input ", axis, " ", padded);
  return (padded - extent) / stride + 1;
}

// Shapes via sym_size, so the Meta kernels can use it under dynamic shapes; the device check is
// for real kernels only.
void check_conv_tensors(const char* op, const Tensor& x, const Tensor& w,
                        const std::optional<Tensor>& b, bool real_device = true) {
  check_float(op, "x", x);
  if (real_device) check_device(op, x);
  check_like(op, "w", w, x, false);
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x: expected a 4-d tensor (B, Cin, H, W), got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 4 && w.sym_size(1) == x.sym_size(1), op,
                    ": w: expected shape (Cout, ", x.sym_size(1), ", kh, kw), got ", w.sizes(),
                    " (groups=1 only)");
  if (b) {
    check_like(op, "b", *b, x, false);
    TORCH_CHECK_VALUE(b->dim() == 1 && b->sym_size(0) == w.sym_size(0), op,
                      ": b: expected shape (", w.sym_size(0), ",), got ", b->sizes());
  }
}

std::vector<c10::SymInt> conv_output_shape(const char* op, const Tensor& x, const Tensor& w,
                                           const ConvArgs& a) {
  return {x.sym_size(0), w.sym_size(0),
          conv_out_size(op, "height", x.sym_size(2), w.sym_size(2), a.stride[0], a.padding[0],
                        a.dilation[0]),
          conv_out_size(op, "width", x.sym_size(3), w.sym_size(3), a.stride[1], a.padding[1],
                        a.dilation[1])};
}

kernels::Conv2dShape conv_shape(const Tensor& x, const Tensor& w, const ConvArgs& a,
                                int64_t out_h, int64_t out_w) {
  kernels::Conv2dShape s{};
  s.batch = x.size(0);
  s.in_channels = x.size(1);
  s.in_h = x.size(2);
  s.in_w = x.size(3);
  s.out_channels = w.size(0);
  s.kernel_h = w.size(2);
  s.kernel_w = w.size(3);
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

Tensor conv2d_forward(const Tensor& x_, const Tensor& w_, const std::optional<Tensor>& b_,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "deepprof::conv2d_forward";
  const ConvArgs a{stride, padding, dilation};
  check_conv_args(op, a);
  check_conv_tensors(op, x_, w_, b_);
  const Tensor x = x_.contiguous(), w = w_.contiguous();
  const Tensor b = b_ ? b_->contiguous() : Tensor();
  Tensor y = at::empty_symint(conv_output_shape(op, x, w, a), x.options());
  const kernels::Conv2dShape s = conv_shape(x, w, a, y.size(2), y.size(3));
  const KernelDeviceGuard guard(x);
  void* stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_forward", [&] {
    const scalar_t* bd = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (x.is_cuda())
      kernels::conv2d_forward_cuda<scalar_t>(s, x.const_data_ptr<scalar_t>(),
                                             w.const_data_ptr<scalar_t>(), bd,
                                             y.mutable_data_ptr<scalar_t>(), stream);
    else
      kernels::conv2d_forward_cpu<scalar_t>(s, x.const_data_ptr<scalar_t>(),
                                            w.const_data_ptr<scalar_t>(), bd,
                                            y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward(const Tensor& gy_, const Tensor& x_,
                                                   const Tensor& w_, at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation,
                                                   std::array<bool, 3> output_mask) {
  const char* op = "deepprof::conv2d_backward";
  const ConvArgs a{stride, padding, dilation};
  check_conv_args(op, a);
  check_conv_tensors(op, x_, w_, std::nullopt);
  check_like(op, "grad_y", gy_, x_, false);
  const std::vector<c10::SymInt> y_shape = conv_output_shape(op, x_, w_, a);
  TORCH_CHECK_VALUE(gy_.sym_sizes() == c10::SymIntArrayRef(y_shape), op,
                    ": grad_y: expected shape ", c10::SymIntArrayRef(y_shape), ", got ",
                    gy_.sizes());
  const Tensor x = x_.contiguous(), w = w_.contiguous(), gy = gy_.contiguous();
  Tensor gx = output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : Tensor();
  Tensor gw = output_mask[1] ? at::empty_like(w, at::MemoryFormat::Contiguous) : Tensor();
  Tensor gb = output_mask[2] ? at::empty({w.size(0)}, x.options()) : Tensor();
  const kernels::Conv2dShape s = conv_shape(x, w, a, gy.size(2), gy.size(3));
  const KernelDeviceGuard guard(x);
  void* stream = current_stream(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv2d_backward", [&] {
    const scalar_t* gyd = gy.const_data_ptr<scalar_t>();
    if (x.is_cuda()) {
      if (gx.defined())
        kernels::conv2d_backward_data_cuda<scalar_t>(s, gyd, w.const_data_ptr<scalar_t>(),
                                                     gx.mutable_data_ptr<scalar_t>(), stream);
      if (gw.defined())
        kernels::conv2d_backward_weight_cuda<scalar_t>(s, x.const_data_ptr<scalar_t>(), gyd,
                                                       gw.mutable_data_ptr<scalar_t>(), stream);
      if (gb.defined())
        kernels::conv2d_backward_bias_cuda<scalar_t>(s, gyd, gb.mutable_data_ptr<scalar_t>(),
                                                     stream);
    } else {
      if (gx.defined())
        kernels::conv2d_backward_data_cpu<scalar_t>(s, gyd, w.const_data_ptr<scalar_t>(),
                                                    gx.mutable_data_ptr<scalar_t>());
      if (gw.defined())
        kernels::conv2d_backward_weight_cpu<scalar_t>(s, x.const_data_ptr<scalar_t>(), gyd,
                                                      gw.mutable_data_ptr<scalar_t>());
      if (gb.defined())
        kernels::conv2d_backward_bias_cpu<scalar_t>(s, gyd, gb.mutable_data_ptr<scalar_t>());
    }
  });
  return {gx, gw, gb};
}

Tensor conv2d_forward_meta(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  const char* op = "deepprof::conv2d_forward";
  const ConvArgs a{stride, padding, dilation};
  check_conv_args(op, a);
  check_conv_tensors(op, x, w, b, /*real_device=*/false);
  return at::empty_symint(conv_output_shape(op, x, w, a), x.options());
}

std::tuple<Tensor, Tensor, Tensor> conv2d_backward_meta(const Tensor&, const Tensor& x,
                                                        const Tensor& w, at::IntArrayRef,
                                                        at::IntArrayRef, at::IntArrayRef,
                                                        std::array<bool, 3> output_mask) {
  return {output_mask[0] ? at::empty_like(x, at::MemoryFormat::Contiguous) : Tensor(),
          output_mask[1] ? at::empty_like(w, at::MemoryFormat::Contiguous) : Tensor(),
          output_mask[2] ? at::empty_symint({w.sym_size(0)}, x.options()) : Tensor()};
}

Tensor call_conv2d_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepprof::conv2d_forward", "")
                       .typed<decltype(conv2d_forward)>();
  return op.call(x, w, b, stride, padding, dilation);
}

std::tuple<Tensor, Tensor, Tensor> call_conv2d_backward(const Tensor& gy, const Tensor& x,
                                                        const Tensor& w, at::IntArrayRef stride,
                                                        at::IntArrayRef padding,
                                                        at::IntArrayRef dilation,
                                                        std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deepprof::conv2d_backward", "")
                       .typed<decltype(conv2d_backward)>();
  return op.call(gy, x, w, stride, padding, dilation, output_mask);
}

class Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                        const std::optional<Tensor>& b, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["has_bias"] = b.has_value() && b->defined();
    return call_conv2d_forward(x, w, b, stride, padding, dilation);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
    auto [gx, gw, gb] = call_conv2d_backward(grad_outputs[0], saved[0], saved[1], stride,
                                             padding, dilation, mask);
    return {gx, gw, gb, Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv2d_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation) {
  return Conv2dFunction::apply(x, w, b, stride, padding, dilation);
}

}  // namespace

TORCH_LIBRARY(deepprof, m) {
  m.def("sq_error_loss(Tensor x, Tensor t, Tensor? v, float count_factor) -> Tensor");
  m.def("sq_error_loss_forward(Tensor x, Tensor t, Tensor? v, float count_factor) "
        "-> (Tensor, Tensor)");
  m.def("sq_error_loss_backward(Tensor grad_loss, Tensor x, Tensor t, Tensor? v, "
        "Tensor count, float count_factor, bool with_gt) -> (Tensor, Tensor)");
  m.def("sq_error_loss_fused(Tensor x, Tensor t, Tensor? v, float count_factor, bool with_gt) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("conv2d(Tensor x, Tensor w, Tensor? b, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  m.def("conv2d_forward(Tensor x, Tensor w, Tensor? b, int[2] stride, int[2] padding, "
        "int[2] dilation) -> Tensor");
  m.def("conv2d_backward(Tensor grad_y, Tensor x, Tensor w, int[2] stride, int[2] padding, "
        "int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(deepprof, CPU, m) {
  m.impl("sq_error_loss_fused", &sq_error_loss_fused);
  m.impl("sq_error_loss_forward", &sq_error_loss_forward);
  m.impl("sq_error_loss_backward", &sq_error_loss_backward);
  m.impl("conv2d_forward", &conv2d_forward);
  m.impl("conv2d_backward", &conv2d_backward);
}

TORCH_LIBRARY_IMPL(deepprof, CUDA, m) {
  m.impl("sq_error_loss_fused", &sq_error_loss_fused);
  m.impl("sq_error_loss_forward", &sq_error_loss_forward);
  m.impl("sq_error_loss_backward", &sq_error_loss_backward);
  m.impl("conv2d_forward", &conv2d_forward);
  m.impl("conv2d_backward", &conv2d_backward);
}

TORCH_LIBRARY_IMPL(deepprof, Meta, m) {
  m.impl("sq_error_loss_fused", &sq_error_loss_fused_meta);
  m.impl("sq_error_loss_forward", &sq_error_loss_forward_meta);
  m.impl("sq_error_loss_backward", &sq_error_loss_backward_meta);
  m.impl("conv2d_forward", &conv2d_forward_meta);
  m.impl("conv2d_backward", &conv2d_backward_meta);
}

// The user-facing ops: forward alone below autograd (any backend, inference mode, tracing) ...
TORCH_LIBRARY_IMPL(deepprof, CompositeExplicitAutograd, m) {
  m.impl("sq_error_loss", &sq_error_loss_composite);
  m.impl("conv2d", &call_conv2d_forward);
}

// ... and with their C++ backward when autograd is on.
TORCH_LIBRARY_IMPL(deepprof, Autograd, m) {
  m.impl("sq_error_loss", &sq_error_loss_autograd);
  m.impl("conv2d", &conv2d_autograd);
}
