// Masked squared-error loss on the GPU: one fused kernel forward, one backward, no host sync.
//
// Forward is a single launch that reduces to a scalar: each block writes its partial (S, C) to a
// small workspace, and the block that finishes last (an atomic ticket) adds the partials in block
// order and writes loss and count. Adding in a fixed order makes the result deterministic, unlike
// atomicAdd on floats. The workspace (partials + ticket counter) is cached per (device, stream):
// launches on one stream run in order, so they can share it; the last block resets the ticket.
#include <map>
#include <mutex>
#include <utility>

#include "cuda_common.cuh"
#include "kernels.h"

namespace kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;

struct LossWorkspace {
  double* partials = nullptr;        // 2 * kMaxBlocks: (S, C) per block
  unsigned int* ticket = nullptr;    // blocks finished so far; 0 between launches
};

LossWorkspace& workspace_for(cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, LossWorkspace> cache;
  const int device = cuda_get_device();
  std::lock_guard<std::mutex> lock(mutex);
  LossWorkspace& ws = cache[{device, stream}];
  if (!ws.partials) {
    void* memory = nullptr;
    const size_t bytes = sizeof(double) * 2 * kMaxBlocks + sizeof(unsigned int);
    cuda::check(cudaMalloc(&memory, bytes), "cudaMalloc(loss workspace)");
    ws.partials = static_cast<double*>(memory);
    ws.ticket = reinterpret_cast<unsigned int*>(ws.partials + 2 * kMaxBlocks);
    cuda::check(cudaMemsetAsync(ws.ticket, 0, sizeof(unsigned int), stream),
                "cudaMemsetAsync(loss workspace)");
  }
  return ws;
}

template <typename T, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    sq_error_forward_kernel(const T* __restrict__ x, const T* __restrict__ t,
                            const T* __restrict__ v, int64_t n, double count_factor, T* loss,
                            T* count, double* partials, unsigned int* ticket) {
  double sum = 0, visible = 0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += step) {
    double d = static_cast<double>(x[i]) - static_cast<double>(t[i]);
    if (kMasked) {
      const double weight = v[i];
      d *= weight;
      visible += weight;
    }
    sum += d * d;
  }
  sum = cuda::block_sum(sum);
  if (kMasked) visible = cuda::block_sum(visible);

  __shared__ bool is_last_block;
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = sum;
    partials[2 * blockIdx.x + 1] = visible;
    __threadfence();  // make the partial visible device-wide before taking a ticket
    is_last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;

  double total = 0, total_visible = 0;
  for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x) {
    total += __ldcg(&partials[2 * b]);  // L2 read: other SMs wrote these
    total_visible += __ldcg(&partials[2 * b + 1]);
  }
  total = cuda::block_sum(total);
  total_visible = kMasked ? cuda::block_sum(total_visible) : static_cast<double>(n);
  if (threadIdx.x == 0) {
    *loss = total_visible != 0 ? static_cast<T>(total / (total_visible * count_factor)) : T(0);
    *count = static_cast<T>(total_visible);
    *ticket = 0;
  }
}

template <typename T, bool kMasked, bool kWithGt>
__global__ void __launch_bounds__(kThreads)
    sq_error_backward_kernel(const T* __restrict__ x, const T* __restrict__ t,
                             const T* __restrict__ v, int64_t n, const T* count,
                             const T* grad_loss, double count_factor, T* __restrict__ gx,
                             T* __restrict__ gt) {
  const double denominator = static_cast<double>(*count) * count_factor;
  const T scale =
      denominator != 0 ? static_cast<T>(2.0 * static_cast<double>(*grad_loss) / denominator)
                       : T(0);
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += step) {
    T g = scale * (x[i] - t[i]);
    if (kMasked) g *= v[i] * v[i];
    gx[i] = g;
    if (kWithGt) gt[i] = -g;
  }
}

int grid_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int64_t cap = 4LL * cuda::multiprocessor_count();
  int64_t blocks = wanted < cap ? wanted : cap;
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  return blocks < 1 ? 1 : static_cast<int>(blocks);
}

}  // namespace

template <typename T>
void sq_error_loss_forward_cuda(const T* x, const T* t, const T* v, int64_t n,
                                double count_factor, T* loss, T* count, void* stream_ptr) {
  cudaStream_t stream = cuda::as_stream(stream_ptr);
  LossWorkspace& ws = workspace_for(stream);
  const int blocks = grid_for(n);
  if (v) {
    sq_error_forward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(
        x, t, v, n, count_factor, loss, count, ws.partials, ws.ticket);
  } else {
    sq_error_forward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(
        x, t, v, n, count_factor, loss, count, ws.partials, ws.ticket);
  }
  cuda::check_launch("sq_error_forward_kernel");
}

template <typename T>
void sq_error_loss_backward_cuda(const T* x, const T* t, const T* v, int64_t n, const T* count,
                                 const T* grad_loss, double count_factor, T* gx, T* gt,
                                 void* stream_ptr) {
  cudaStream_t stream = cuda::as_stream(stream_ptr);
  const int blocks = grid_for(n);
#define LAUNCH(MASKED, WITH_GT)                                                  \
  sq_error_backward_kernel<T, MASKED, WITH_GT><<<blocks, kThreads, 0, stream>>>( \
      x, t, v, n, count, grad_loss, count_factor, gx, gt)
  if (v && gt) LAUNCH(true, true);
  else if (v) LAUNCH(true, false);
  else if (gt) LAUNCH(false, true);
  else LAUNCH(false, false);
#undef LAUNCH
  cuda::check_launch("sq_error_backward_kernel");
}

#define INSTANTIATE(T)                                                                      \
  template void sq_error_loss_forward_cuda<T>(const T*, const T*, const T*, int64_t, double, \
                                              T*, T*, void*);                             \
  template void sq_error_loss_backward_cuda<T>(const T*, const T*, const T*, int64_t,       \
                                               const T*, const T*, double, T*, T*, void*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace kernels
