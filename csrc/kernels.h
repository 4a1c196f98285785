// The kernel entry points: plain pointers and sizes in, results written to caller memory out.
// Kernels know nothing of Python, DLPack or frameworks; bindings.cpp validates every argument
// before calling here, so these functions trust their inputs (shapes consistent, pointers valid,
// outputs not aliasing inputs). CUDA entry points take the stream as an opaque pointer so that
// this header compiles without the CUDA toolkit; they enqueue work and never synchronise.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace kernels {

// ---- Masked squared-error loss -------------------------------------------------------------
// S = sum(((x - t) * v)^2), C = sum(v) (numel when v is null); loss = S / (C * count_factor),
// 0 when C == 0. count_factor 1 is the masked mean, 0.5 the DeepPose normalisation.
// Backward: gx = g * 2 * (x - t) * v^2 / (C * count_factor) (v^2 == v for a 0/1 mask; the
// square makes it the exact derivative for fractional weights too), gt = -gx.
// `count` and `grad_loss` are one-element arrays in the same memory as x (device memory on the
// GPU), so no value ever has to come back to the host.

// The one rule for count_factor, which every binding checks (each in its own error style) before
// calling a loss kernel: a finite number > 0. NaN poisons every result; +inf turns the loss and
// gradients silently into 0; 0 and negatives divide by zero or flip the sign.
inline constexpr const char* kCountFactorExpected = "a finite number > 0";
inline bool valid_count_factor(double count_factor) {
  return std::isfinite(count_factor) && count_factor > 0;
}

template <typename T>
void sq_error_loss_forward_cpu(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                               T* loss, T* count);
template <typename T>
void sq_error_loss_backward_cpu(const T* x, const T* t, const T* v, int64_t n, const T* count,
                                const T* grad_loss, double count_factor, T* gx, T* gt);
// Forward and backward in one call, for when the gradient is always wanted (training): writes
// loss, count, gx and (when gt is not null) gt, with grad_loss (a one-element array in x's
// memory; null means 1) as the upstream gradient. Results equal forward then backward.
template <typename T>
void sq_error_loss_fused_cpu(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                             const T* grad_loss, T* loss, T* count, T* gx, T* gt);

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

// ---- CPU kernel settings: process-wide, one set per copy of this library -------------------
// ops._C and each framework op library (torch, TensorFlow, MXNet) link their own copy, so each
// has its own settings; OPS_CPU_GEMM and OMP_NUM_THREADS reach them all.

// The GEMM compilation the CPU conv kernels run: "avx512" (AVX-512F, x86-64 only), "avx2"
// (AVX2 + FMA, x86-64 only) or "baseline" (plain x86-64, or whatever the target is). Chosen at
// the first call of this or of a CPU conv kernel from the environment variable OPS_CPU_GEMM:
// "auto" (or unset/empty) = the best path this CPU runs, or one path by name
// (case-insensitive). An unknown value, or a path the CPU (or the build) cannot run, throws
// std::invalid_argument naming OPS_CPU_GEMM, at every call until it is fixed, and no GEMM runs:
// a wrong setting never executes illegal instructions.
std::string cpu_gemm_path();
// The paths this CPU can run, best first (each only where the CPU and the OS support it).
std::vector<std::string> cpu_gemm_paths();
// The paths compiled into this build, best first.
std::vector<std::string> cpu_gemm_paths_built();
// Overrides the choice for this copy of the library (tests, benchmarks); throws
// std::invalid_argument for a name that is not one of cpu_gemm_paths().
void set_cpu_gemm_path(const std::string& name);
// What OPS_CPU_GEMM = `setting` would choose on a CPU that runs the paths `runnable` (best
// first, ending with "baseline"), without touching the active path; throws as cpu_gemm_path()
// would. For tests of the refusals on CPUs other than this one.
std::string resolve_cpu_gemm_path(const std::string& setting,
                                  const std::vector<std::string>& runnable);

// The number of threads every OpenMP region of the CPU kernels asks for (the conv's never more
// than there are images or column blocks to share out). One atomic value for the whole process
// rather than OpenMP's per-thread nthreads ICV, so a count set from Python's main thread also
// holds for kernels that a framework calls from its own worker threads. Default:
// omp_get_max_threads() at the first use (which honours OMP_NUM_THREADS).
int cpu_threads();
// n >= 1 (more than the cores is allowed, and correct); throws std::invalid_argument otherwise.
void set_cpu_threads(int n);

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
// The same in one launch (sq_error_loss_cuda.cu); its GPU speed is not yet measured.
template <typename T>
void sq_error_loss_fused_cuda(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                              const T* grad_loss, T* loss, T* count, T* gx, T* gt, void* stream);

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
