// Blocked GEMM in the Goto/BLIS layout: B is packed into NR-wide column strips of a KC x NC
// panel, A into MR-tall row strips of an MC x KC block, and an MR x NR register-tile micro-kernel
// (GCC vector extensions, so the compiler emits FMA on whatever ISA the caller targets) walks
// them. Packing makes every inner-loop load contiguous whatever the transposes are.
//
// The whole GEMM is compiled three times, by thin entry points that inline the same template
// with a register tile sized for their ISA: for AVX-512F (zmm, 32 registers), for AVX2 + FMA
// (the vector part of x86-64-v3, ymm) and for plain x86-64 (SSE2, xmm). Which one runs is an
// explicit, process-wide choice (OPS_CPU_GEMM, read once at first use; see kernels.h) rather
// than a loader decision, so tests and benchmarks can force any path the CPU runs, and a
// machine without AVX-512 or AVX2 runs a path the tests have run too. Elsewhere (not x86-64, or
// a compiler without target attributes) only the baseline exists.
#include "gemm_cpu.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

// -DOPS_GEMM_HAS_AVX2=0 builds what a non-x86 machine gets (the baseline alone), to check it.
#ifndef OPS_GEMM_HAS_AVX2
#if defined(__x86_64__) && defined(__GNUC__)  // GCC and Clang: target attributes, cpu builtins
#define OPS_GEMM_HAS_AVX2 1
#else
#define OPS_GEMM_HAS_AVX2 0
#endif
#endif

namespace kernels {
namespace cpu {
namespace {

#define ALWAYS_INLINE inline __attribute__((always_inline))

// Block sizes and the register tile per scalar type, vector width and tile height (64 bytes:
// AVX-512's zmm, 32: AVX2's ymm, 16: the baseline's SSE2 xmm). AVX2 and SSE2 have 16 vector
// registers: a 6 x 2-vector tile takes 12 of them as accumulators, leaving room for the 2 B
// vectors and one broadcast A value (a 32-byte tile on SSE2 would need 24 registers and spill
// on every k step). AVX-512 has 32: an 8 x 2-vector tile (16 accumulators, twice the FMA
// pipes' latency x width) whose 8 rows divide the conv's channel counts (16, 32, 64) with no
// padded rows, where a 12- or 14-row tile would waste a third of the rows at 16 channels.
template <typename T, int kVecBytes, int kRows = 6>
struct Tiling {
  typedef T Scalar;
  typedef T Vec __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));
  static constexpr int kAlign = kVecBytes;
  static constexpr int MR = kRows, NR = 2 * kLanes;  // MR x 2 vectors of accumulators
  // The same panel bytes for float and double: 8 KiB rows of B per NC block.
  static constexpr int64_t KC = 256, MC = 96, NC = 8192 / static_cast<int64_t>(sizeof(T));
};

// Packs op(A)[m0 : m0+mc, k0 : k0+kc] into MR-row strips laid out [strip][k][MR], zero-padding the
// last strip so the micro-kernel never branches on the edge. Reads go along memory rows: walking
// k across MR rows at once would touch MR lines a row-stride apart, and a power-of-two stride
// (P = 1024 floats in a 32x32 conv) maps them all to one L1 set.
template <typename Tl, typename T = typename Tl::Scalar>
ALWAYS_INLINE void pack_a(bool trans_a, const T* A, int64_t lda, int64_t m0, int64_t mc,
                          int64_t k0, int64_t kc, T* packed) {
  constexpr int MR = Tl::MR;
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
template <typename Tl, typename T = typename Tl::Scalar>
ALWAYS_INLINE void pack_b(bool trans_b, const T* B, int64_t ldb, int64_t k0, int64_t kc,
                          int64_t n0, int64_t nc, T* packed) {
  constexpr int NR = Tl::NR;
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
template <typename Tl, typename T = typename Tl::Scalar>
ALWAYS_INLINE void micro_kernel(int64_t kc, const T* __restrict a, const T* __restrict b,
                                T* __restrict c, int64_t ldc, int rows, int cols,
                                bool accumulate) {
  using Vec = typename Tl::Vec;
  constexpr int MR = Tl::MR, NR = Tl::NR, L = Tl::kLanes, NV = NR / L;
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
  alignas(Tl::kAlign) T tile[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) std::memcpy(&tile[i][j * L], &acc[i][j], sizeof(Vec));
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < cols; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + tile[i][j] : tile[i][j];
}

template <typename Tl, typename T = typename Tl::Scalar>
ALWAYS_INLINE void gemm_impl(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                             const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                             bool accumulate) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    return;
  }
  // Per-thread packing buffers (one pair per tiling), grown once and reused: callers run one
  // gemm per thread.
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
      pack_b<Tl>(trans_b, B, ldb, k0, kc, n0, nc, packed_b.data());
      for (int64_t m0 = 0; m0 < M; m0 += Tl::MC) {
        const int64_t mc = std::min<int64_t>(Tl::MC, M - m0);
        pack_a<Tl>(trans_a, A, lda, m0, mc, k0, kc, packed_a.data());
        for (int64_t j = 0; j < nc; j += Tl::NR) {
          const int cols = static_cast<int>(std::min<int64_t>(Tl::NR, nc - j));
          for (int64_t i = 0; i < mc; i += Tl::MR) {
            const int rows = static_cast<int>(std::min<int64_t>(Tl::MR, mc - i));
            micro_kernel<Tl>(kc, packed_a.data() + i * kc, packed_b.data() + j * kc,
                            C + (m0 + i) * ldc + n0 + j, ldc, rows, cols, acc);
          }
        }
      }
    }
  }
}

// ---- the three compilations and the choice between them -------------------------------------

enum class GemmPath : int { kUnresolved = -1, kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

const char* path_name(GemmPath path) {
  return path == GemmPath::kAvx512 ? "avx512" : path == GemmPath::kAvx2 ? "avx2" : "baseline";
}

bool cpu_runs_avx2() {
#if OPS_GEMM_HAS_AVX2
  __builtin_cpu_init();  // harmless when already done; needed if we run before libgcc's init
  // Both builtins also check that the OS saves the ymm registers (XCR0), not only CPUID.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_runs_avx512() {
#if OPS_GEMM_HAS_AVX2
  __builtin_cpu_init();
  // libgcc sets avx512f only where the OS also saves the zmm and mask registers (XCR0).
  return cpu_runs_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// The paths this CPU runs, best first.
std::vector<std::string> runnable_paths() {
  if (cpu_runs_avx512()) return {"avx512", "avx2", "baseline"};
  if (cpu_runs_avx2()) return {"avx2", "baseline"};
  return {"baseline"};
}

// The process-wide choice (per copy of this library: ops._C and each framework op library link
// their own). kUnresolved until the first use reads OPS_CPU_GEMM.
std::atomic<int> g_active_path{static_cast<int>(GemmPath::kUnresolved)};

std::string quoted_list(const std::vector<std::string>& names, const char* last_joint) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? last_joint : ", ";
    out += "'" + names[i] + "'";
  }
  return out;
}

// OPS_CPU_GEMM's value -> the path, given the paths a CPU runs (best first), or
// std::invalid_argument naming `what` (the variable).
GemmPath parse_path(const std::string& value, const std::vector<std::string>& runnable,
                    const std::string& what) {
  // Lenient in what shells produce: surrounding blanks and case do not matter.
  const size_t first = value.find_first_not_of(" \t\n");
  const size_t last = value.find_last_not_of(" \t\n");
  std::string v = first == std::string::npos ? "" : value.substr(first, last - first + 1);
  for (char& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v.empty() || v == "auto") v = runnable.front();
  const bool known = v == "avx512" || v == "avx2" || v == "baseline";
  if (!known)
    throw std::invalid_argument(what + ": expected 'auto', 'avx512', 'avx2' or 'baseline', got '" +
                                value + "'");
  if (std::find(runnable.begin(), runnable.end(), v) == runnable.end()) {
    std::vector<std::string> allowed{"auto"};
    allowed.insert(allowed.end(), runnable.begin(), runnable.end());
    const char* why = !OPS_GEMM_HAS_AVX2 ? "this build has only the baseline: it is not x86-64"
                      : v == "avx512"    ? "this CPU lacks AVX-512F (or the OS does not enable it)"
                                         : "this CPU lacks AVX2 or FMA";
    throw std::invalid_argument(what + ": expected " + quoted_list(allowed, " or ") +
                                " (the GEMM paths this CPU runs; " + why + "), got '" + value +
                                "'");
  }
  return v == "avx512" ? GemmPath::kAvx512 : v == "avx2" ? GemmPath::kAvx2 : GemmPath::kBaseline;
}

GemmPath active_path() {
  const int now = g_active_path.load(std::memory_order_acquire);
  if (now != static_cast<int>(GemmPath::kUnresolved)) return static_cast<GemmPath>(now);
  const char* env = std::getenv("OPS_CPU_GEMM");
  const GemmPath chosen = parse_path(env ? env : "auto", runnable_paths(), "OPS_CPU_GEMM");
  int expected = static_cast<int>(GemmPath::kUnresolved);
  // Racing first callers read the same environment; whoever stores first wins either way.
  g_active_path.compare_exchange_strong(expected, static_cast<int>(chosen),
                                        std::memory_order_acq_rel);
  return static_cast<GemmPath>(g_active_path.load(std::memory_order_acquire));
}

#if OPS_GEMM_HAS_AVX2
#define OPS_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define OPS_TARGET_AVX2 __attribute__((target("avx2,fma")))

OPS_TARGET_AVX512 void gemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                                   const float* A, int64_t lda, const float* B, int64_t ldb,
                                   float* C, int64_t ldc, bool accumulate) {
  gemm_impl<Tiling<float, 64, 8>>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc,
                                  accumulate);
}
OPS_TARGET_AVX512 void gemm_avx512(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                                   const double* A, int64_t lda, const double* B, int64_t ldb,
                                   double* C, int64_t ldc, bool accumulate) {
  gemm_impl<Tiling<double, 64, 8>>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc,
                                   accumulate);
}
OPS_TARGET_AVX2 void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                               const float* A, int64_t lda, const float* B, int64_t ldb,
                               float* C, int64_t ldc, bool accumulate) {
  gemm_impl<Tiling<float, 32>>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
OPS_TARGET_AVX2 void gemm_avx2(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                               const double* A, int64_t lda, const double* B, int64_t ldb,
                               double* C, int64_t ldc, bool accumulate) {
  gemm_impl<Tiling<double, 32>>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
#undef OPS_TARGET_AVX2
#undef OPS_TARGET_AVX512
#endif

void gemm_baseline(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
                   int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                   bool accumulate) {
  gemm_impl<Tiling<float, 16>>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm_baseline(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
                   int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc,
                   bool accumulate) {
  gemm_impl<Tiling<double, 16>>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

template <typename T>
void gemm_dispatch(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const T* A,
                   int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, bool accumulate) {
#if OPS_GEMM_HAS_AVX2
  switch (active_path()) {
    case GemmPath::kAvx512:
      gemm_avx512(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
      return;
    case GemmPath::kAvx2:
      gemm_avx2(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
      return;
    default:
      break;
  }
#else
  active_path();  // resolves (and validates) OPS_CPU_GEMM all the same
#endif
  gemm_baseline(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
          int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_dispatch<float>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
          int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_dispatch<double>(trans_a, trans_b, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace cpu

// ---- the settings API of kernels.h ----------------------------------------------------------

std::string cpu_gemm_path() { return cpu::path_name(cpu::active_path()); }

std::vector<std::string> cpu_gemm_paths() { return cpu::runnable_paths(); }

std::vector<std::string> cpu_gemm_paths_built() {
  if (OPS_GEMM_HAS_AVX2) return {"avx512", "avx2", "baseline"};
  return {"baseline"};
}

void set_cpu_gemm_path(const std::string& name) {
  // A path by its exact name ("auto" is a setting, not a path), and only one this CPU runs.
  const std::vector<std::string> runnable = cpu_gemm_paths();
  if (std::find(runnable.begin(), runnable.end(), name) == runnable.end())
    throw std::invalid_argument("set_gemm_path: name: expected one of " +
                                cpu::quoted_list(runnable, ", ") +
                                " (the GEMM paths this CPU runs), got '" + name + "'");
  const cpu::GemmPath path = name == "avx512" ? cpu::GemmPath::kAvx512
                             : name == "avx2" ? cpu::GemmPath::kAvx2
                                              : cpu::GemmPath::kBaseline;
  cpu::g_active_path.store(static_cast<int>(path), std::memory_order_release);
}

std::string resolve_cpu_gemm_path(const std::string& setting,
                                  const std::vector<std::string>& runnable) {
  if (runnable.empty() || runnable.back() != "baseline")
    throw std::invalid_argument("resolve_cpu_gemm_path: runnable: expected the paths a CPU "
                                "runs, best first, ending with 'baseline'");
  return cpu::path_name(cpu::parse_path(setting, runnable, "OPS_CPU_GEMM"));
}

}  // namespace kernels

// For the framework op libraries, which link their own copy of this file (through ctypes, e.g.
// ctypes.CDLL("ops/libdeepprof_torch.so").deepprof_cpu_gemm_path()): the path that copy uses,
// resolving it if no kernel ran yet; nullptr when OPS_CPU_GEMM is invalid.
extern "C" __attribute__((visibility("default"))) const char* deepprof_cpu_gemm_path() {
  try {
    return kernels::cpu::path_name(kernels::cpu::active_path());
  } catch (const std::exception&) {
    return nullptr;
  }
}
