// conv2d on the GPU as a tiled implicit GEMM: one shared-memory-tiled GEMM kernel, and three
// "problems" that tell it how to read A(m, k) and B(k, n) straight from the tensors (the im2col
// matrix is never materialised) and where to write C(m, n).
//
//   problem          M      N            K                A(m, k)        B(k, n)
//   forward          Cout   B*OH*OW      Cin*kh*kw        w              x patch
//   backward-data    Cin    B*H*W        Cout*kh*kw       w (transposed) gy "un-patch"
//   backward-weight  Cout   Cin*kh*kw    B*OH*OW          gy             x patch (transposed)
//
// Backward-weight has a short M x N and a long K, so K is split across gridDim.z and the pieces
// are added with atomicAdd into a gw zeroed on the stream first (the order of those additions,
// and so the last bits of gw, can vary between runs). No tensor cores yet: correctness first.
// Index math is 32-bit; bindings.cpp refuses tensors of 2^31 elements or more on this path.
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "kernels.h"

namespace kernels {
namespace {

constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 16;
constexpr int kThreadM = 4, kThreadN = 4;
constexpr int kThreads = (kBlockM / kThreadM) * (kBlockN / kThreadN);  // 256

// The conv geometry in 32-bit ints for cheap device-side index math.
struct Dims {
  int batch, in_channels, in_h, in_w, out_channels, kernel_h, kernel_w, out_h, out_w;
  int stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
};

Dims to_dims(const Conv2dShape& s) {
  return Dims{static_cast<int>(s.batch),      static_cast<int>(s.in_channels),
              static_cast<int>(s.in_h),       static_cast<int>(s.in_w),
              static_cast<int>(s.out_channels), static_cast<int>(s.kernel_h),
              static_cast<int>(s.kernel_w),   static_cast<int>(s.out_h),
              static_cast<int>(s.out_w),      static_cast<int>(s.stride_h),
              static_cast<int>(s.stride_w),   static_cast<int>(s.pad_h),
              static_cast<int>(s.pad_w),      static_cast<int>(s.dilation_h),
              static_cast<int>(s.dilation_w)};
}

// x[b, c, oh*sh - ph + r*dh, ow*sw - pw + q*dw], or 0 in the padding.
template <typename T>
__host__ __device__ __forceinline__ T patch_value(const Dims& d, const T* __restrict__ x, int b, int c,
                                         int r, int q, int oh, int ow) {
  const int ih = oh * d.stride_h - d.pad_h + r * d.dilation_h;
  const int iw = ow * d.stride_w - d.pad_w + q * d.dilation_w;
  if (ih < 0 || ih >= d.in_h || iw < 0 || iw >= d.in_w) return T(0);
  return x[((b * d.in_channels + c) * d.in_h + ih) * d.in_w + iw];
}

template <typename T>
struct ForwardProblem {
  Dims d;
  const T* x;
  const T* w;
  const T* bias;  // may be null
  T* y;

  __host__ __device__ T a(int m, int k) const {
    return w[m * (d.in_channels * d.kernel_h * d.kernel_w) + k];
  }
  __host__ __device__ T b(int k, int n) const {
    const int q = k % d.kernel_w, r = (k / d.kernel_w) % d.kernel_h;
    const int c = k / (d.kernel_w * d.kernel_h);
    const int ow = n % d.out_w, oh = (n / d.out_w) % d.out_h, img = n / (d.out_w * d.out_h);
    return patch_value(d, x, img, c, r, q, oh, ow);
  }
  __host__ __device__ void store(int m, int n, T value) const {
    const int plane = d.out_h * d.out_w, img = n / plane, pixel = n % plane;
    y[(img * d.out_channels + m) * plane + pixel] = value + (bias ? bias[m] : T(0));
  }
};

template <typename T>
struct BackwardDataProblem {
  Dims d;
  const T* gy;
  const T* w;
  T* gx;

  __host__ __device__ T a(int m, int k) const {  // w[co, c = m, r, q] with k = (co, r, q)
    const int taps = d.kernel_h * d.kernel_w, co = k / taps, tap = k % taps;
    return w[(co * d.in_channels + m) * taps + tap];
  }
  // gy[b, co, oh, ow] for the output pixel whose tap (r, q) reads input pixel (ih, iw), or 0 when
  // no output pixel does (off the stride grid or outside the output).
  __host__ __device__ T b(int k, int n) const {
    const int taps = d.kernel_h * d.kernel_w, co = k / taps, tap = k % taps;
    const int r = tap / d.kernel_w, q = tap % d.kernel_w;
    const int iw = n % d.in_w, ih = (n / d.in_w) % d.in_h, img = n / (d.in_w * d.in_h);
    const int th = ih + d.pad_h - r * d.dilation_h, tw = iw + d.pad_w - q * d.dilation_w;
    if (th < 0 || tw < 0 || th % d.stride_h != 0 || tw % d.stride_w != 0) return T(0);
    const int oh = th / d.stride_h, ow = tw / d.stride_w;
    if (oh >= d.out_h || ow >= d.out_w) return T(0);
    return gy[((img * d.out_channels + co) * d.out_h + oh) * d.out_w + ow];
  }
  __host__ __device__ void store(int m, int n, T value) const {
    const int plane = d.in_h * d.in_w, img = n / plane, pixel = n % plane;
    gx[(img * d.in_channels + m) * plane + pixel] = value;
  }
};

template <typename T>
struct BackwardWeightProblem {
  Dims d;
  const T* x;
  const T* gy;
  T* gw;

  __host__ __device__ T a(int m, int k) const {  // gy[b, co = m, oh, ow] with k = (b, oh, ow)
    const int plane = d.out_h * d.out_w, img = k / plane, pixel = k % plane;
    return gy[(img * d.out_channels + m) * plane + pixel];
  }
  __host__ __device__ T b(int k, int n) const {  // x patch value, k = (b, oh, ow), n = (c, r, q)
    const int ow = k % d.out_w, oh = (k / d.out_w) % d.out_h, img = k / (d.out_w * d.out_h);
    const int q = n % d.kernel_w, r = (n / d.kernel_w) % d.kernel_h;
    const int c = n / (d.kernel_w * d.kernel_h);
    return patch_value(d, x, img, c, r, q, oh, ow);
  }
  __host__ __device__ void store(int m, int n, T value) const {
    T* target = &gw[m * (d.in_channels * d.kernel_h * d.kernel_w) + n];
#ifdef __CUDA_ARCH__
    atomicAdd(target, value);
#else
    *target += value;  // host emulation (below): one thread, no race
#endif
  }
};

// C[M x N] = A[M x K] * B[K x N] over k in this block's split [z * k_per_split, ...).
// 16 x 16 threads, each owning a 4 x 4 patch of the 64 x 64 C tile.
template <typename T, typename Problem>
__global__ void __launch_bounds__(kThreads)
    implicit_gemm_kernel(Problem problem, int M, int N, int K, int k_per_split) {
  __shared__ T a_tile[kBlockK][kBlockM + 1];  // +1 column: fewer bank conflicts on the stores
  __shared__ T b_tile[kBlockK][kBlockN + 1];

  const int tid = threadIdx.x;
  const int thread_row = tid / (kBlockN / kThreadN), thread_col = tid % (kBlockN / kThreadN);
  const int m0 = blockIdx.y * kBlockM, n0 = blockIdx.x * kBlockN;
  const int k_begin = blockIdx.z * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);

  T acc[kThreadM][kThreadN];
#pragma unroll
  for (int i = 0; i < kThreadM; ++i)
#pragma unroll
    for (int j = 0; j < kThreadN; ++j) acc[i][j] = T(0);

  for (int k0 = k_begin; k0 < k_end; k0 += kBlockK) {
    // Consecutive threads take consecutive k for A and consecutive n for B: those are the
    // contiguous directions of w / gy and of the image rows.
    for (int i = tid; i < kBlockM * kBlockK; i += kThreads) {
      const int mm = i / kBlockK, kk = i % kBlockK, m = m0 + mm, k = k0 + kk;
      a_tile[kk][mm] = (m < M && k < k_end) ? problem.a(m, k) : T(0);
    }
    for (int i = tid; i < kBlockK * kBlockN; i += kThreads) {
      const int kk = i / kBlockN, nn = i % kBlockN, n = n0 + nn, k = k0 + kk;
      b_tile[kk][nn] = (n < N && k < k_end) ? problem.b(k, n) : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBlockK; ++kk) {
      T a_frag[kThreadM], b_frag[kThreadN];
#pragma unroll
      for (int i = 0; i < kThreadM; ++i) a_frag[i] = a_tile[kk][thread_row * kThreadM + i];
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) b_frag[j] = b_tile[kk][thread_col * kThreadN + j];
#pragma unroll
      for (int i = 0; i < kThreadM; ++i)
#pragma unroll
        for (int j = 0; j < kThreadN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kThreadM; ++i) {
    const int m = m0 + thread_row * kThreadM + i;
#pragma unroll
    for (int j = 0; j < kThreadN; ++j) {
      const int n = n0 + thread_col * kThreadN + j;
      if (m < M && n < N) problem.store(m, n, acc[i][j]);
    }
  }
}

// K-range of each split: a whole number of K-tiles, no empty trailing split.
struct SplitK {
  int k_per_split, splits;
};

SplitK split_k(int K, int splits) {
  const int k_per_split = ((K + splits - 1) / splits + kBlockK - 1) / kBlockK * kBlockK;
  return SplitK{k_per_split, (K + k_per_split - 1) / k_per_split};
}

template <typename T, typename Problem>
void launch_gemm(const Problem& problem, int M, int N, int K, int splits, cudaStream_t stream,
                 const char* name) {
  const SplitK split = split_k(K, splits);
  const dim3 grid((N + kBlockN - 1) / kBlockN, (M + kBlockM - 1) / kBlockM, split.splits);
  implicit_gemm_kernel<T, Problem>
      <<<grid, kThreads, 0, stream>>>(problem, M, N, K, split.k_per_split);
  cuda::check_launch(name);
}

// The same problem on the host, one output at a time, with the same K splits: what the kernel
// computes, minus the tiling. Lets a machine without a GPU test the index maps above.
template <typename T, typename Problem>
void emulate_gemm(const Problem& problem, int M, int N, int K, int splits) {
  const SplitK split = split_k(K, splits);
  for (int z = 0; z < split.splits; ++z) {
    const int k_begin = z * split.k_per_split;
    const int k_end = K < k_begin + split.k_per_split ? K : k_begin + split.k_per_split;
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        T acc = 0;
        for (int k = k_begin; k < k_end; ++k) acc += problem.a(m, k) * problem.b(k, n);
        problem.store(m, n, acc);
      }
  }
}

int backward_weight_splits(int M, int N, int K, int multiprocessors) {
  // Enough splits to give every SM a few blocks, but each split at least 8 K-tiles long.
  const int tiles = ((M + kBlockM - 1) / kBlockM) * ((N + kBlockN - 1) / kBlockN);
  const int wanted = (4 * multiprocessors + tiles - 1) / tiles;
  const int longest = (K + 8 * kBlockK - 1) / (8 * kBlockK);
  int splits = wanted < longest ? wanted : longest;
  if (splits < 1) splits = 1;
  return splits > 65535 ? 65535 : splits;
}

// Per-channel sum of gy over batch and pixels, in double, one block per channel.
template <typename T>
__global__ void __launch_bounds__(256)
    bias_grad_kernel(const T* __restrict__ gy, int batch, int channels, int plane, T* gb) {
  const int co = blockIdx.x;
  double sum = 0;
  for (int img = 0; img < batch; ++img) {
    const T* row = gy + (static_cast<int64_t>(img) * channels + co) * plane;
    for (int p = threadIdx.x; p < plane; p += blockDim.x) sum += row[p];
  }
  sum = cuda::block_sum(sum);
  if (threadIdx.x == 0) gb[co] = static_cast<T>(sum);
}

}  // namespace

template <typename T>
void conv2d_forward_cuda(const Conv2dShape& s, const T* x, const T* w, const T* b, T* y,
                         void* stream) {
  const ForwardProblem<T> problem{to_dims(s), x, w, b, y};
  launch_gemm<T>(problem, static_cast<int>(s.out_channels),
                 static_cast<int>(s.batch * s.out_plane()), static_cast<int>(s.patch_size()), 1,
                 cuda::as_stream(stream), "conv2d forward kernel");
}

template <typename T>
void conv2d_backward_data_cuda(const Conv2dShape& s, const T* gy, const T* w, T* gx,
                               void* stream) {
  const BackwardDataProblem<T> problem{to_dims(s), gy, w, gx};
  launch_gemm<T>(problem, static_cast<int>(s.in_channels),
                 static_cast<int>(s.batch * s.in_plane()),
                 static_cast<int>(s.out_channels * s.kernel_h * s.kernel_w), 1,
                 cuda::as_stream(stream), "conv2d backward-data kernel");
}

template <typename T>
void conv2d_backward_weight_cuda(const Conv2dShape& s, const T* x, const T* gy, T* gw,
                                 void* stream) {
  const int M = static_cast<int>(s.out_channels), N = static_cast<int>(s.patch_size());
  const int K = static_cast<int>(s.batch * s.out_plane());
  const int splits = backward_weight_splits(M, N, K, cuda::multiprocessor_count());
  cudaStream_t st = cuda::as_stream(stream);
  cuda::check(cudaMemsetAsync(gw, 0, sizeof(T) * static_cast<size_t>(M) * N, st),
              "cudaMemsetAsync(gw)");
  const BackwardWeightProblem<T> problem{to_dims(s), x, gy, gw};
  launch_gemm<T>(problem, M, N, K, splits, st, "conv2d backward-weight kernel");
}

template <typename T>
void conv2d_backward_bias_cuda(const Conv2dShape& s, const T* gy, T* gb, void* stream) {
  bias_grad_kernel<T><<<static_cast<unsigned>(s.out_channels), 256, 0,
                        cuda::as_stream(stream)>>>(gy, static_cast<int>(s.batch),
                                                   static_cast<int>(s.out_channels),
                                                   static_cast<int>(s.out_plane()), gb);
  cuda::check_launch("conv2d backward-bias kernel");
}


template <typename T>
void conv2d_cuda_emulated(const char* which, const Conv2dShape& s, const T* in0, const T* in1,
                          const T* bias, T* out, int multiprocessors) {
  const std::string op(which);
  if (op == "forward") {
    const ForwardProblem<T> problem{to_dims(s), in0, in1, bias, out};
    emulate_gemm<T>(problem, static_cast<int>(s.out_channels),
                    static_cast<int>(s.batch * s.out_plane()), static_cast<int>(s.patch_size()),
                    1);
  } else if (op == "backward_data") {
    const BackwardDataProblem<T> problem{to_dims(s), in0, in1, out};
    emulate_gemm<T>(problem, static_cast<int>(s.in_channels),
                    static_cast<int>(s.batch * s.in_plane()),
                    static_cast<int>(s.out_channels * s.kernel_h * s.kernel_w), 1);
  } else if (op == "backward_weight") {
    const int M = static_cast<int>(s.out_channels), N = static_cast<int>(s.patch_size());
    const int K = static_cast<int>(s.batch * s.out_plane());
    for (int i = 0; i < M * N; ++i) out[i] = T(0);
    const BackwardWeightProblem<T> problem{to_dims(s), in0, in1, out};
    emulate_gemm<T>(problem, M, N, K, backward_weight_splits(M, N, K, multiprocessors));
  } else {
    throw std::invalid_argument("conv2d_cuda_emulated: unknown op '" + op + "'");
  }
}

#define INSTANTIATE(T)                                                                        \
  template void conv2d_forward_cuda<T>(const Conv2dShape&, const T*, const T*, const T*, T*,  \
                                       void*);                                                \
  template void conv2d_backward_data_cuda<T>(const Conv2dShape&, const T*, const T*, T*,      \
                                             void*);                                          \
  template void conv2d_backward_weight_cuda<T>(const Conv2dShape&, const T*, const T*, T*,    \
                                               void*);                                        \
  template void conv2d_backward_bias_cuda<T>(const Conv2dShape&, const T*, T*, void*);      \
  template void conv2d_cuda_emulated<T>(const char*, const Conv2dShape&, const T*, const T*,  \
                                        const T*, T*, int);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace kernels
