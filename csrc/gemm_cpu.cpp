// Blocked GEMM in the Goto/BLIS layout: B is packed into NR-wide column strips of a KC x NC
// panel, A into MR-tall row strips of an MC x KC block, and an MR x NR register-tile micro-kernel
// (GCC vector extensions, so the compiler emits FMA on whatever ISA the clone targets) walks
// them. Packing makes every inner-loop load contiguous whatever the transposes are.
//
// The public entry points are compiled twice through target_clones (x86-64-v3 = AVX2 + FMA, and
// the baseline), picked at load time, so the same binary runs on any x86-64 machine and uses
// AVX2 where it exists.
#include "gemm_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace kernels {
namespace cpu {
namespace {

#define ALWAYS_INLINE inline __attribute__((always_inline))

template <typename T>
struct Tiling;

template <>
struct Tiling<float> {
  typedef float Vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
  static constexpr int MR = 6, NR = 16;       // 12 accumulators of 8 lanes: fits 16 ymm
  static constexpr int64_t KC = 256, MC = 96, NC = 2048;
};

template <>
struct Tiling<double> {
  typedef double Vec __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
  static constexpr int MR = 6, NR = 8;
  static constexpr int64_t KC = 256, MC = 96, NC = 1024;
};

// Packs op(A)[m0 : m0+mc, k0 : k0+kc] into MR-row strips laid out [strip][k][MR], zero-padding the
// last strip so the micro-kernel never branches on the edge. Reads go along memory rows: walking
// k across MR rows at once would touch MR lines a row-stride apart, and a power-of-two stride
// (P = 1024 floats in a 32x32 conv) maps them all to one L1 set.
template <typename T>
ALWAYS_INLINE void pack_a(bool trans_a, const T* A, int64_t lda, int64_t m0, int64_t mc,
                          int64_t k0, int64_t kc, T* packed) {
  constexpr int MR = Tiling<T>::MR;
  for (int64_t i0 = 0; i0 < mc; i0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, mc - i0));
    T* strip = packed + i0 * kc;
    if (trans_a) {  // op(A)(m, k) = A[k * lda + m]: the MR values of one k are adjacent
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = A + (k0 + k) * lda + m0 + i0;
        for (int i = 0; i < rows; ++i) strip[k * MR + i] = src[i];
        for (int i = rows; i < MR; ++i) strip[k * MR + i] = 0;
      }
    } else {
      for (int i = 0; i < rows; ++i) {
        const T* src = A + (m0 + i0 + i) * lda + k0;
        for (int64_t k = 0; k < kc; ++k) strip[k * MR + i] = src[k];
      }
      for (int i = rows; i < MR; ++i)
        for (int64_t k = 0; k < kc; ++k) strip[k * MR + i] = 0;
    }
  }
}

// Packs op(B)[k0 : k0+kc, n0 : n0+nc] into NR-column strips laid out [strip][k][NR]; like pack_a,
// it reads along memory rows.
template <typename T>
ALWAYS_INLINE void pack_b(bool trans_b, const T* B, int64_t ldb, int64_t k0, int64_t kc,
                          int64_t n0, int64_t nc, T* packed) {
  constexpr int NR = Tiling<T>::NR;
  for (int64_t j0 = 0; j0 < nc; j0 += NR) {
    const int cols = static_cast<int>(std::min<int64_t>(NR, nc - j0));
    T* strip = packed + j0 * kc;
    if (!trans_b) {  // op(B)(k, n) = B[k * ldb + n]: the NR values of one k are adjacent
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = B + (k0 + k) * ldb + n0 + j0;
        T* dst = strip + k * NR;
        for (int j = 0; j < cols; ++j) dst[j] = src[j];
        for (int j = cols; j < NR; ++j) dst[j] = 0;
      }
    } else {
      for (int j = 0; j < cols; ++j) {
        const T* src = B + (n0 + j0 + j) * ldb + k0;
        for (int64_t k = 0; k < kc; ++k) strip[k * NR + j] = src[k];
      }
      for (int j = cols; j < NR; ++j)
        for (int64_t k = 0; k < kc; ++k) strip[k * NR + j] = 0;
    }
  }
}

// C[0:rows, 0:cols] (+)= a_strip^T * b_strip over kc, accumulating in an MR x NR register tile.
template <typename T>
ALWAYS_INLINE void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b,
                                T* __restrict c, int64_t ldc, int rows, int cols,
                                bool accumulate) {
  using Vec = typename Tiling<T>::Vec;
  constexpr int MR = Tiling<T>::MR, NR = Tiling<T>::NR, L = Tiling<T>::kLanes, NV = NR / L;
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) acc[i][j] = Vec{};

  for (int64_t k = 0; k < kc; ++k) {
    Vec bv[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], b + k * NR + j * L, sizeof(Vec));
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T ai = a[k * MR + i];
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bv[j];
    }
  }

  if (rows == MR && cols == NR) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        T* dst = c + i * ldc + j * L;
        Vec out = acc[i][j];
        if (accumulate) {
          Vec old;
          std::memcpy(&old, dst, sizeof(Vec));
          out += old;
        }
        std::memcpy(dst, &out, sizeof(Vec));
      }
    }
    return;
  }
  // Edge tile: spill the register tile and copy the valid part only.
  alignas(32) T tile[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) std::memcpy(&tile[i][j * L], &acc[i][j], sizeof(Vec));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
}

template <typename T>
ALWAYS_INLINE void gemm_impl(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                             const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                             bool accumulate) {
  using Tl = Tiling<T>;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    return;
  }
  // Per-thread packing buffers, grown once and reused: callers run one gemm per thread.
  thread_local std::vector<T> packed_a, packed_b;
  const int64_t kc_max = std::min<int64_t>(Tl::KC, K);
  const int64_t mc_max = std::min<int64_t>(Tl::MC, M);
  const int64_t nc_max = std::min<int64_t>(Tl::NC, N);
  const int64_t a_size = ((mc_max + Tl::MR - 1) / Tl::MR) * Tl::MR * kc_max;
  const int64_t b_size = ((nc_max + Tl::NR - 1) / Tl::NR) * Tl::NR * kc_max;
  if (static_cast<int64_t>(packed_a.size()) < a_size) packed_a.resize(a_size);
  if (static_cast<int64_t>(packed_b.size()) < b_size) packed_b.resize(b_size);

  for (int64_t n0 = 0; n0 < N; n0 += Tl::NC) {
    const int64_t nc = std::min<int64_t>(Tl::NC, N - n0);
    for (int64_t k0 = 0; k0 < K; k0 += Tl::KC) {
      const int64_t kc = std::min<int64_t>(Tl::KC, K - k0);
      const bool acc = accumulate || k0 > 0;
      pack_b(trans_b, B, ldb, k0, kc, n0, nc, packed_b.data());
      for (int64_t m0 = 0; m0 < M; m0 += Tl::MC) {
        const int64_t mc = std::min<int64_t>(Tl::MC, M - m0);
        pack_a(trans_a, A, lda, m0, mc, k0, kc, packed_a.data());
        for (int64_t j = 0; j < nc; j += Tl::NR) {
          const int cols = static_cast<int>(std::min<int64_t>(Tl::NR, nc - j));
          for (int64_t i = 0; i < mc; i += Tl::MR) {
            const int rows = static_cast<int>(std::min<int64_t>(Tl::MR, mc - i));
            micro_kernel<T>(kc, packed_a.data() + i * kc, packed_b.data() + j * kc,
                            C + (m0 + i) * ldc + n0 + j, ldc, rows, cols, acc);
          }
        }
      }
    }
  }
}

}  // namespace

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GEMM_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GEMM_CLONES
#endif

GEMM_CLONES
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
          int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_impl<float>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

GEMM_CLONES
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
          int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_impl<double>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace cpu
}  // namespace kernels
