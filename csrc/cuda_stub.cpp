// Stand-ins for the CUDA entry points when the module is built without CUDA (no nvcc, or
// OPS_CUDA=0). bindings.cpp refuses GPU arrays before reaching them; should anything still call
// one, it throws instead of doing nothing.
#include <stdexcept>

#include "kernels.h"

namespace kernels {
namespace {
[[noreturn]] void no_cuda() {
  throw std::runtime_error("this build of ops._C has no CUDA support (built without nvcc)");
}
}  // namespace

bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
void cuda_set_device(int) { no_cuda(); }
int cuda_get_device() { no_cuda(); }

template <typename T>
void sq_error_loss_forward_cuda(const T*, const T*, const T*, int64_t, double, T*, T*, void*) {
  no_cuda();
}
template <typename T>
void sq_error_loss_backward_cuda(const T*, const T*, const T*, int64_t, const T*, const T*,
                                 double, T*, T*, void*) {
  no_cuda();
}
template <typename T>
void sq_error_loss_fused_cuda(const T*, const T*, const T*, int64_t, double, const T*, T*, T*,
                              T*, T*, void*) {
  no_cuda();
}
template <typename T>
void conv2d_forward_cuda(const Conv2dShape&, const T*, const T*, const T*, T*, void*) {
  no_cuda();
}
template <typename T>
void conv2d_backward_data_cuda(const Conv2dShape&, const T*, const T*, T*, void*) {
  no_cuda();
}
template <typename T>
void conv2d_backward_weight_cuda(const Conv2dShape&, const T*, const T*, T*, void*) {
  no_cuda();
}
template <typename T>
void conv2d_backward_bias_cuda(const Conv2dShape&, const T*, T*, void*) {
  no_cuda();
}
template <typename T>
void conv2d_cuda_emulated(const char*, const Conv2dShape&, const T*, const T*, const T*, T*,
                          int) {
  no_cuda();
}

#define INSTANTIATE(T)                                                                       \
  template void sq_error_loss_forward_cuda<T>(const T*, const T*, const T*, int64_t, double, \
                                              T*, T*, void*);                              \
  template void sq_error_loss_backward_cuda<T>(const T*, const T*, const T*, int64_t,      \
                                               const T*, const T*, double, T*, T*, void*); \
  template void sq_error_loss_fused_cuda<T>(const T*, const T*, const T*, int64_t, double,  \
                                            const T*, T*, T*, T*, T*, void*);              \
  template void conv2d_forward_cuda<T>(const Conv2dShape&, const T*, const T*, const T*, T*, \
                                       void*);                                             \
  template void conv2d_backward_data_cuda<T>(const Conv2dShape&, const T*, const T*, T*,   \
                                             void*);                                       \
  template void conv2d_backward_weight_cuda<T>(const Conv2dShape&, const T*, const T*, T*, \
                                               void*);                                     \
  template void conv2d_backward_bias_cuda<T>(const Conv2dShape&, const T*, T*, void*);     \
  template void conv2d_cuda_emulated<T>(const char*, const Conv2dShape&, const T*, const T*, \
                                        const T*, T*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace kernels
