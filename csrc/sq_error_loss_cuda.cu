// Masked squared-error loss on the GPU: one fused kernel forward, one backward, no host sync.
//
// Forward is a single launch that reduces to a scalar: each block writes its partial (S, C) to a
// small workspace, and the block that finishes last (an atomic ticket) adds the partials in block
// order and writes loss and count. Adding in a fixed order makes the result deterministic, unlike
// atomicAdd on floats. The workspace (partials + ticket counter) is cached per (device, stream):
// launches on one stream run in order, so they can share it; the last block resets the ticket.
//
// Fused forward + backward (sq_error_loss_fused_cuda): loss, count and the gradients in ONE
// launch, for training steps where the loss's gradient is always wanted. The gradient needs C,
// a reduction over the whole input, so the kernel has a grid-wide dependency:
//   - n <= kFusedSingleBlockMax (DeepPose: batch 1..256 x 28): one block reduces S and C, then
//     writes the gradient, rereading x, t, v from L1/L2. No workspace, no grid sync: the cost is
//     one launch, which is what this size is bound by (PyTorch's composite is ~10 launches).
//   - larger: a cooperative launch (every block resident) in two phases split by grid.sync():
//     phase 1 sums v per block (only v is read; unmasked C is n and phase 1 is skipped), every
//     block then adds the per-block counts in block order (the same C everywhere, bit for bit);
//     phase 2 reads x, t, v once, writes gx (and gt) and sums S; after a second grid.sync block
//     0 adds the S partials in block order. Deterministic like the forward kernel.
//   Phase 2 walks the input backwards, so the part of v that phase 1 read last is likeliest to
//   still be in L2, and streams x, t, gx, gt with evict-first hints so they do not push v out.
//   Loads and stores are 16-byte vectors where every pointer allows it.
// GPU PERFORMANCE UNVERIFIED: written on a machine without a GPU; the targets (>= 5x PyTorch's
// masked composite at batch 1..256 x 28, >= 80% of device-copy bandwidth at 16M elements) are
// measured by `python -m experiments.bench_kernels --device cuda` (make gpu-check).
#include <cooperative_groups.h>

#include <cstring>
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

namespace {
// ---- fused forward + backward ----------------------------------------------------------------

// One block this size takes the whole problem up to kFusedSingleBlockMax elements: above that a
// single SM's bandwidth, not the launch, starts to bound it. Both are first guesses to tune on
// the GPU.
constexpr int kFusedSingleBlockThreads = 1024;
constexpr int64_t kFusedSingleBlockMax = 1 << 15;
constexpr int kFusedGridThreads = 512;

template <typename T>
struct FusedArgs {
  const T* x;
  const T* t;
  const T* v;  // null: no mask, C = n
  int64_t n;
  double count_factor;
  const T* grad_loss;  // null: 1
  T* loss;
  T* count;
  T* gx;
  T* gt;              // null: not wanted
  double* partials;   // grid kernel only: 2 per block, (S, C)
};

// W consecutive elements; W * sizeof(T) == 16 makes it one vector load/store.
template <typename T, int W>
struct alignas(sizeof(T) * W) Chunk {
  T e[W];
};

template <typename T>
struct Vector16;
template <>
struct Vector16<float> {
  using type = float4;
};
template <>
struct Vector16<double> {
  using type = double2;
};

// Chunk j of p. kStream: read once, evict first (__ldcs); else through the read-only cache.
template <bool kStream, int W, typename T>
__device__ __forceinline__ Chunk<T, W> load_chunk(const T* p, int64_t j) {
  Chunk<T, W> c;
  if constexpr (W * sizeof(T) == 16) {
    using V = typename Vector16<T>::type;
    const V* q = reinterpret_cast<const V*>(p) + j;
    const V raw = kStream ? __ldcs(q) : __ldg(q);
    memcpy(&c, &raw, sizeof raw);
  } else {
    static_assert(W == 1, "chunks are one element or 16 bytes");
    c.e[0] = kStream ? __ldcs(p + j) : __ldg(p + j);
  }
  return c;
}

template <bool kStream, int W, typename T>
__device__ __forceinline__ void store_chunk(T* p, int64_t j, const Chunk<T, W>& c) {
  if constexpr (W * sizeof(T) == 16) {
    using V = typename Vector16<T>::type;
    V raw;
    memcpy(&raw, &c, sizeof raw);
    V* q = reinterpret_cast<V*>(p) + j;
    if (kStream) __stcs(q, raw); else *q = raw;
  } else {
    if (kStream) __stcs(p + j, c.e[0]); else p[j] = c.e[0];
  }
}

// Chunk j of the gradient pass: gx = scale (x - t) v^2, gt = -gx; adds ((x - t) v)^2 to sum.
// The same arithmetic as the forward and backward kernels, so fused and unfused agree.
template <bool kMasked, bool kWithGt, bool kStream, int W, typename T>
__device__ __forceinline__ void gradient_chunk(const FusedArgs<T>& a, int64_t j, T scale,
                                               double& sum) {
  const Chunk<T, W> x = load_chunk<kStream, W>(a.x, j), t = load_chunk<kStream, W>(a.t, j);
  Chunk<T, W> v;
  if (kMasked) v = load_chunk<false, W>(a.v, j);  // maybe still in L2 from the count phase
  Chunk<T, W> g;
#pragma unroll
  for (int k = 0; k < W; ++k) {
    double d = static_cast<double>(x.e[k]) - static_cast<double>(t.e[k]);
    T gk = scale * (x.e[k] - t.e[k]);
    if (kMasked) {
      d *= v.e[k];
      gk *= v.e[k] * v.e[k];
    }
    sum += d * d;
    g.e[k] = gk;
  }
  store_chunk<kStream, W>(a.gx, j, g);
  if (kWithGt) {
#pragma unroll
    for (int k = 0; k < W; ++k) g.e[k] = -g.e[k];
    store_chunk<kStream, W>(a.gt, j, g);
  }
}

template <int W, typename T>
__device__ __forceinline__ double count_chunk(const T* v, int64_t j) {
  const Chunk<T, W> c = load_chunk<false, W>(v, j);
  double s = 0;
#pragma unroll
  for (int k = 0; k < W; ++k) s += c.e[k];
  return s;
}

template <typename T>
__device__ __forceinline__ T gradient_scale(const FusedArgs<T>& a, double count) {
  const double g = a.grad_loss ? static_cast<double>(*a.grad_loss) : 1.0;
  const double denominator = count * a.count_factor;
  return denominator != 0 ? static_cast<T>(2.0 * g / denominator) : T(0);
}

template <typename T>
__device__ __forceinline__ void write_loss(const FusedArgs<T>& a, double sum, double count) {
  *a.loss = count != 0 ? static_cast<T>(sum / (count * a.count_factor)) : T(0);
  *a.count = static_cast<T>(count);
}

// W-element chunks cover [0, n - n % W); the last n % W elements go one by one.
template <int W>
__device__ __forceinline__ int64_t chunk_count(int64_t n) { return n / W; }

template <typename T, bool kMasked, bool kWithGt, int W>
__global__ void __launch_bounds__(kFusedSingleBlockThreads)
    sq_error_fused_block_kernel(FusedArgs<T> a) {
  const int64_t chunks = chunk_count<W>(a.n), tail = chunks * W;
  double sum = 0, visible = 0;
  for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x) {
    const Chunk<T, W> x = load_chunk<false, W>(a.x, j), t = load_chunk<false, W>(a.t, j);
    Chunk<T, W> v;
    if (kMasked) v = load_chunk<false, W>(a.v, j);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      double d = static_cast<double>(x.e[k]) - static_cast<double>(t.e[k]);
      if (kMasked) {
        d *= v.e[k];
        visible += v.e[k];
      }
      sum += d * d;
    }
  }
  for (int64_t i = tail + threadIdx.x; i < a.n; i += blockDim.x) {
    double d = static_cast<double>(a.x[i]) - static_cast<double>(a.t[i]);
    if (kMasked) {
      d *= a.v[i];
      visible += a.v[i];
    }
    sum += d * d;
  }
  sum = cuda::block_sum(sum);
  visible = kMasked ? cuda::block_sum(visible) : static_cast<double>(a.n);
  __shared__ T scale;
  if (threadIdx.x == 0) {
    write_loss(a, sum, visible);
    scale = gradient_scale(a, visible);
  }
  __syncthreads();
  double unused = 0;  // S is known; the gradient pass's sum is discarded
  for (int64_t j = threadIdx.x; j < chunks; j += blockDim.x)
    gradient_chunk<kMasked, kWithGt, false, W>(a, j, scale, unused);
  for (int64_t i = tail + threadIdx.x; i < a.n; i += blockDim.x)
    gradient_chunk<kMasked, kWithGt, false, 1>(a, i, scale, unused);
}

template <typename T, bool kMasked, bool kWithGt, int W>
__global__ void __launch_bounds__(kFusedGridThreads) sq_error_fused_grid_kernel(FusedArgs<T> a) {
  namespace cg = cooperative_groups;
  cg::grid_group grid = cg::this_grid();
  const int64_t chunks = chunk_count<W>(a.n), tail = chunks * W;
  const int64_t rank = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Phase 1: C.
  double visible = static_cast<double>(a.n);
  if (kMasked) {
    __shared__ double total_visible;
    double mine = 0;
    for (int64_t j = rank; j < chunks; j += step) mine += count_chunk<W>(a.v, j);
    for (int64_t i = tail + rank; i < a.n; i += step) mine += a.v[i];
    mine = cuda::block_sum(mine);
    if (threadIdx.x == 0) a.partials[2 * blockIdx.x + 1] = mine;
    grid.sync();
    double c = 0;
    for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x)
      c += __ldcg(&a.partials[2 * b + 1]);  // L2 read: other SMs wrote these
    c = cuda::block_sum(c);
    if (threadIdx.x == 0) total_visible = c;
    __syncthreads();
    visible = total_visible;
  }
  const T scale = gradient_scale(a, visible);

  // Phase 2: gradients and S, last chunks first (see the top of the file).
  double sum = 0;
  for (int64_t j = chunks - 1 - rank; j >= 0; j -= step)
    gradient_chunk<kMasked, kWithGt, true, W>(a, j, scale, sum);
  for (int64_t i = tail + rank; i < a.n; i += step)
    gradient_chunk<kMasked, kWithGt, true, 1>(a, i, scale, sum);
  sum = cuda::block_sum(sum);
  if (threadIdx.x == 0) a.partials[2 * blockIdx.x] = sum;
  grid.sync();
  if (blockIdx.x != 0) return;
  double total = 0;
  for (int b = threadIdx.x; b < static_cast<int>(gridDim.x); b += blockDim.x)
    total += __ldcg(&a.partials[2 * b]);
  total = cuda::block_sum(total);
  if (threadIdx.x == 0) write_loss(a, total, visible);
}

// Blocks of `kernel` that fit on the current device at once (cooperative launches need them all
// resident), capped by the workspace; 0 where the device cannot launch cooperatively.
int cooperative_grid_limit(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, int> cache;
  const int device = cuda_get_device();
  std::lock_guard<std::mutex> lock(mutex);
  auto found = cache.find({device, kernel});
  if (found != cache.end()) return found->second;
  int cooperative = 0, per_sm = 0;
  cuda::check(cudaDeviceGetAttribute(&cooperative, cudaDevAttrCooperativeLaunch, device),
              "cudaDeviceGetAttribute(CooperativeLaunch)");
  if (cooperative)
    cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFusedGridThreads,
                                                              0),
                "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  int64_t limit = static_cast<int64_t>(per_sm) * cuda::multiprocessor_count();
  if (limit > kMaxBlocks) limit = kMaxBlocks;
  return cache[{device, kernel}] = static_cast<int>(limit);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, bool kMasked, bool kWithGt, int W>
void launch_fused(FusedArgs<T> a, cudaStream_t stream) {
  if (a.n <= kFusedSingleBlockMax) {
    sq_error_fused_block_kernel<T, kMasked, kWithGt, W>
        <<<1, kFusedSingleBlockThreads, 0, stream>>>(a);
    cuda::check_launch("sq_error_fused_block_kernel");
    return;
  }
  const void* kernel = reinterpret_cast<const void*>(
      &sq_error_fused_grid_kernel<T, kMasked, kWithGt, W>);
  const int limit = cooperative_grid_limit(kernel);
  if (limit == 0) {  // no cooperative launch here: the two unfused kernels, still on `stream`
    sq_error_loss_forward_cuda<T>(a.x, a.t, a.v, a.n, a.count_factor, a.loss, a.count, stream);
    sq_error_loss_backward_cuda<T>(a.x, a.t, a.v, a.n, a.count, a.grad_loss, a.count_factor,
                                   a.gx, a.gt, stream);
    return;
  }
  const int64_t wanted = (chunk_count<W>(a.n) + kFusedGridThreads - 1) / kFusedGridThreads;
  const int blocks = static_cast<int>(wanted < limit ? wanted : limit);
  a.partials = workspace_for(stream).partials;
  void* args[] = {&a};
  cuda::check(cudaLaunchCooperativeKernel(kernel, dim3(blocks), dim3(kFusedGridThreads), args, 0,
                                          stream),
              "sq_error_fused_grid_kernel (cooperative launch)");
}

}  // namespace

template <typename T>
void sq_error_loss_fused_cuda(const T* x, const T* t, const T* v, int64_t n, double count_factor,
                              const T* grad_loss, T* loss, T* count, T* gx, T* gt,
                              void* stream_ptr) {
  cudaStream_t stream = cuda::as_stream(stream_ptr);
  const FusedArgs<T> a{x, t, v, n, count_factor, grad_loss, loss, count, gx, gt, nullptr};
  const bool vectors = aligned16(x) && aligned16(t) && aligned16(gx) && (!v || aligned16(v)) &&
                       (!gt || aligned16(gt));
  constexpr int kWide = 16 / sizeof(T);
#define LAUNCH(MASKED, WITH_GT)                                              \
  (vectors ? launch_fused<T, MASKED, WITH_GT, kWide>(a, stream)              \
           : launch_fused<T, MASKED, WITH_GT, 1>(a, stream))
  if (v && gt) LAUNCH(true, true);
  else if (v) LAUNCH(true, false);
  else if (gt) LAUNCH(false, true);
  else LAUNCH(false, false);
#undef LAUNCH
}

#define INSTANTIATE(T)                                                                      \
  template void sq_error_loss_forward_cuda<T>(const T*, const T*, const T*, int64_t, double, \
                                              T*, T*, void*);                             \
  template void sq_error_loss_backward_cuda<T>(const T*, const T*, const T*, int64_t,       \
                                               const T*, const T*, double, T*, T*, void*); \
  template void sq_error_loss_fused_cuda<T>(const T*, const T*, const T*, int64_t, double,  \
                                            const T*, T*, T*, T*, T*, void*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace kernels
