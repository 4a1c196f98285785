// Masked squared-error loss on the CPU: one pass for S and C (accumulated in double, so float32
// inputs lose nothing to summation order at 16M elements), one elementwise pass for backward.
#include <omp.h>

#include "kernels.h"

namespace kernels {
namespace {
// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelThreshold = 1 << 16;
}  // namespace

template <typename T>
void sq_error_loss_forward_cpu(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                               T* loss, T* count) {
  double sum = 0, visible = 0;
  if (v) {
#pragma omp parallel for reduction(+ : sum, visible) if (n >= kParallelThreshold) num_threads(cpu_threads())
    for (int64_t i = 0; i < n; ++i) {
      const double d = (static_cast<double>(x[i]) - t[i]) * v[i];
      sum += d * d;
      visible += v[i];
    }
  } else {
#pragma omp parallel for reduction(+ : sum) if (n >= kParallelThreshold) num_threads(cpu_threads())
    for (int64_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(x[i]) - t[i];
      sum += d * d;
    }
    visible = static_cast<double>(n);
  }
  *loss = visible != 0 ? static_cast<T>(sum / (visible * count_factor)) : T(0);
  *count = static_cast<T>(visible);
}

template <typename T>
void sq_error_loss_backward_cpu(const T* x, const T* t, const T* v, int64_t n, const T* count,
                                const T* grad_loss, double count_factor, T* gx, T* gt) {
  const double denominator = static_cast<double>(*count) * count_factor;
  // C == 0: the loss is the constant 0, so every gradient is 0 (never 0/0).
  const T scale = denominator != 0 ? static_cast<T>(2.0 * (*grad_loss) / denominator) : T(0);
#pragma omp parallel for if (n >= kParallelThreshold) num_threads(cpu_threads())
  for (int64_t i = 0; i < n; ++i) {
    T g = scale * (x[i] - t[i]);
    if (v) g *= v[i] * v[i];
    gx[i] = g;
    if (gt) gt[i] = -g;
  }
}

template <typename T>
void sq_error_loss_fused_cpu(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                             const T* grad_loss, T* loss, T* count, T* gx, T* gt) {
  // Two passes, as forward then backward: on a CPU the second pass over x, t, v is cheap next
  // to the reduction, and reusing both keeps fused and unfused results identical.
  sq_error_loss_forward_cpu(x, t, v, n, count_factor, loss, count);
  const T one = 1;
  sq_error_loss_backward_cpu(x, t, v, n, count, grad_loss ? grad_loss : &one, count_factor, gx,
                             gt);
}

#define INSTANTIATE(T)                                                                        \
  template void sq_error_loss_forward_cpu<T>(const T*, const T*, const T*, int64_t, double, T*, \
                                             T*);                                           \
  template void sq_error_loss_backward_cpu<T>(const T*, const T*, const T*, int64_t, const T*, \
                                              const T*, double, T*, T*);              \
  template void sq_error_loss_fused_cpu<T>(const T*, const T*, const T*, int64_t, double,     \
                                           const T*, T*, T*, T*, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace kernels
