// The kernel entry points: plain pointers and sizes in, results written to caller memory out.
// Kernels know nothing of Python, DLPack or frameworks; bindings.cpp validates every argument
// before calling here, so these functions trust their inputs (shapes consistent, pointers valid,
// outputs not aliasing inputs). CUDA entry points take the stream as an opaque pointer so that
// this header compiles without the CUDA toolkit; they enqueue work and never synchronise.
#pragma once

#include <cstdint>

namespace kernels {

// ---- Masked squared-error loss -------------------------------------------------------------
// S = sum(((x - t) * v)^2), C = sum(v) (numel when v is null); loss = S / (C * count_factor),
// 0 when C == 0. count_factor 1 is the masked mean, 0.5 the DeepPose normalisation.
// Backward: gx = g * 2 * (x - t) * v^2 / (C * count_factor) (v^2 == v for a 0/1 mask; the
// square makes it the exact derivative for fractional weights too), gt = -gx.
// `count` and `grad_loss` are one-element arrays in the same memory as x (device memory on the
// GPU), so no value ever has to come back to the host.

template <typename T>
void sq_error_loss_forward_cpu(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                               T* loss, T* count);
template <typename T>
void sq_error_loss_backward_cpu(const T* x, const T* t, const T* v, int64_t n, const T* count,
                                const T* grad_loss, double count_factor, T* gx, T* gt);

// ---- conv2d, NCHW, weight (Cout, Cin, kh, kw), groups = 1 ----------------------------------
struct Conv2dShape {
  int64_t batch, in_channels, in_h, in_w;
  int64_t out_channels, kernel_h, kernel_w;
  int64_t out_h, out_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;

  int64_t patch_size() const { return in_channels * kernel_h * kernel_w; }
  int64_t in_plane() const { return in_h * in_w; }
  int64_t out_plane() const { return out_h * out_w; }
};

template <typename T>
void conv2d_forward_cpu(const Conv2dShape& s, const T* x, const T* w, const T* b, T* y);
template <typename T>
void conv2d_backward_data_cpu(const Conv2dShape& s, const T* gy, const T* w, T* gx);
template <typename T>
void conv2d_backward_weight_cpu(const Conv2dShape& s, const T* x, const T* gy, T* gw);
template <typename T>
void conv2d_backward_bias_cpu(const Conv2dShape& s, const T* gy, T* gb);

// ---- CUDA (defined in *.cu; stubs that throw when the module is built without CUDA) --------
bool cuda_built();
int cuda_device_count();  // 0 when there is no driver or no device, never throws
void cuda_set_device(int device);
int cuda_get_device();

template <typename T>
void sq_error_loss_forward_cuda(const T* x, const T* t, const T* v, int64_t n,
                                double count_factor, T* loss, T* count, void* stream);
template <typename T>
void sq_error_loss_backward_cuda(const T* x, const T* t, const T* v, int64_t n, const T* count,
                                 const T* grad_loss, double count_factor, T* gx, T* gt,
                                 void* stream);

template <typename T>
void conv2d_forward_cuda(const Conv2dShape& s, const T* x, const T* w, const T* b, T* y,
                         void* stream);
template <typename T>
void conv2d_backward_data_cuda(const Conv2dShape& s, const T* gy, const T* w, T* gx,
                               void* stream);
template <typename T>
void conv2d_backward_weight_cuda(const Conv2dShape& s, const T* x, const T* gy, T* gw,
                                 void* stream);
template <typename T>
void conv2d_backward_bias_cuda(const Conv2dShape& s, const T* gy, T* gb, void* stream);

// Host emulation of the CUDA conv kernels: the same A/B/store index maps and K splits, looped
// naively on the CPU (host pointers), so a machine without a GPU can test the GPU path's index
// math. `which` is "forward" (in0 = x, in1 = w, bias), "backward_data" (in0 = gy, in1 = w) or
// "backward_weight" (in0 = x, in1 = gy); `multiprocessors` picks the split-K as a GPU with that
// many SMs would.
template <typename T>
void conv2d_cuda_emulated(const char* which, const Conv2dShape& s, const T* in0, const T* in1,
                          const T* bias, T* out, int multiprocessors);

}  // namespace kernels
