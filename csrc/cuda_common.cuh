// Small helpers shared by the CUDA kernels: error checks that turn into C++ exceptions (which
// pybind11 turns into RuntimeError), a cached multiprocessor count, and a block-wide sum.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kernels {
namespace cuda {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error so the next call starts clean
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

// After a launch: catches bad configurations without synchronising (errors raised by the
// kernel while it runs surface at the caller's next synchronisation, as with any CUDA op).
inline void check_launch(const char* kernel_name) {
  check(cudaGetLastError(), kernel_name);
}

int multiprocessor_count();  // of the current device, cached per device

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Sum of `value` over the block; the result is valid in thread 0. Every thread must call it;
// blockDim.x must be a multiple of 32 and at most 1024.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc value) {
  __shared__ Acc warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    value += __shfl_down_sync(0xffffffffu, value, offset);
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : Acc(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

}  // namespace cuda
}  // namespace kernels
