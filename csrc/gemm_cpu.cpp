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
#include <type_traits>
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
#if OPS_GEMM_HAS_AVX2
#include <immintrin.h>  // AVX-512 and AVX2 intrinsics, used only under their targets
#endif

namespace kernels {
namespace cpu {
namespace {

#define ALWAYS_INLINE inline __attribute__((always_inline))

// op(A): a matrix in memory (packed by pack_a per block) or packed already (pack_all_a).
template <typename T>
struct ASource {
  bool trans_a;
  const T* A;
  int64_t lda;
  const T* packed;  // when set, A and trans_a are unused
};

// op(B): a matrix in memory (packed by pack_b) or an im2col matrix (pack_b_im2col).
template <typename T>
struct BSource {
  bool trans_b;
  const T* B;
  int64_t ldb;
  const Im2colB<T>* im2col;  // when set, B and trans_b are unused
};


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

// The GEMM compiled once per ISA (gemm_cpu_kernels.inc): each copy's gemm_entry is the whole
// GEMM for that ISA, everything it calls inlined into it.
#if OPS_GEMM_HAS_AVX2
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12 flags the intrinsics' own "undefined" inputs as maybe-uninitialized: a false alarm.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define OPS_GEMM_VEC_BYTES 64
#define OPS_GEMM_ROWS 8
#define OPS_GEMM_AVX512_INTRINSICS 1
#define OPS_GEMM_AVX2_INTRINSICS 0
#include "gemm_cpu_kernels.inc"
#undef OPS_GEMM_AVX2_INTRINSICS
#undef OPS_GEMM_AVX512_INTRINSICS
#undef OPS_GEMM_ROWS
#undef OPS_GEMM_VEC_BYTES
#pragma GCC diagnostic pop
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define OPS_GEMM_VEC_BYTES 32
#define OPS_GEMM_ROWS 6
#define OPS_GEMM_AVX512_INTRINSICS 0
#define OPS_GEMM_AVX2_INTRINSICS 1
#include "gemm_cpu_kernels.inc"
#undef OPS_GEMM_AVX2_INTRINSICS
#undef OPS_GEMM_AVX512_INTRINSICS
#undef OPS_GEMM_ROWS
#undef OPS_GEMM_VEC_BYTES
#pragma GCC pop_options
}  // namespace avx2
#endif

namespace baseline {
#define OPS_GEMM_VEC_BYTES 16
#define OPS_GEMM_ROWS 6
#define OPS_GEMM_AVX512_INTRINSICS 0
#define OPS_GEMM_AVX2_INTRINSICS 0
#include "gemm_cpu_kernels.inc"
#undef OPS_GEMM_AVX2_INTRINSICS
#undef OPS_GEMM_AVX512_INTRINSICS
#undef OPS_GEMM_ROWS
#undef OPS_GEMM_VEC_BYTES
}  // namespace baseline

// Calls call(isa) with the entry points (Isa) of `path`'s compilation.
template <typename Call>
void on_path(GemmPath path, Call call) {
  switch (path) {
#if OPS_GEMM_HAS_AVX2
    case GemmPath::kAvx512:
      call(avx512::Isa{});
      return;
    case GemmPath::kAvx2:
      call(avx2::Isa{});
      return;
#endif
    default:
      call(baseline::Isa{});
  }
}

template <typename T>
void gemm_dispatch(GemmPath path, const ASource<T>& a, int64_t M, int64_t N, int64_t K,
                   const BSource<T>& b, T* C, int64_t ldc, bool accumulate) {
  on_path(path, [&](auto isa) { isa.gemm(a, M, N, K, b, C, ldc, accumulate); });
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
          int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_dispatch<float>(active_path(), {trans_a, A, lda, nullptr}, M, N, K,
                       {trans_b, B, ldb, nullptr}, C, ldc, accumulate);
}
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
          int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate) {
  gemm_dispatch<double>(active_path(), {trans_a, A, lda, nullptr}, M, N, K,
                        {trans_b, B, ldb, nullptr}, C, ldc, accumulate);
}
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const Im2colB<float>& b, float* C, int64_t ldc, bool accumulate) {
  gemm_dispatch<float>(active_path(), {trans_a, A, lda, nullptr}, M, N, K,
                       {false, nullptr, 0, &b}, C, ldc, accumulate);
}
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
          const Im2colB<double>& b, double* C, int64_t ldc, bool accumulate) {
  gemm_dispatch<double>(active_path(), {trans_a, A, lda, nullptr}, M, N, K,
                        {false, nullptr, 0, &b}, C, ldc, accumulate);
}

void col2im_add(const float* gcol, int64_t K, int64_t P, int64_t ld,
                const Im2colB<float>& layout, float* gxp) {
  on_path(active_path(), [&](auto isa) { isa.col2im(gcol, K, P, ld, layout, gxp); });
}
void col2im_add(const double* gcol, int64_t K, int64_t P, int64_t ld,
                const Im2colB<double>& layout, double* gxp) {
  on_path(active_path(), [&](auto isa) { isa.col2im(gcol, K, P, ld, layout, gxp); });
}

void im2col_dot(int64_t M, int64_t N, int64_t P, const float* G, int64_t ldg,
                const Im2colB<float>& b, float* C, int64_t ldc, bool accumulate) {
  on_path(active_path(), [&](auto isa) { isa.im2col_dot(M, N, P, G, ldg, b, C, ldc, accumulate); });
}
void im2col_dot(int64_t M, int64_t N, int64_t P, const double* G, int64_t ldg,
                const Im2colB<double>& b, double* C, int64_t ldc, bool accumulate) {
  on_path(active_path(), [&](auto isa) { isa.im2col_dot(M, N, P, G, ldg, b, C, ldc, accumulate); });
}

bool im2col_dot_pays(int64_t P, int64_t N) {
  // Below 512 positions each tile's lane sums at its end weigh too much (about 32 steps).
  if (P < 512) return false;
  const GemmPath path = active_path();
  return path == GemmPath::kAvx512 || (path == GemmPath::kAvx2 && N <= 32);
}

template <typename T>
PackedA<T>::PackedA(bool trans_a, int64_t M, int64_t K, const T* A, int64_t lda,
                    std::vector<T>& storage)
    : values_(storage), path_(static_cast<int>(active_path())), rows_(M), depth_(K) {
  on_path(static_cast<GemmPath>(path_),
          [&](auto isa) { isa.pack_a(trans_a, M, K, A, lda, values_); });
}
template class PackedA<float>;
template class PackedA<double>;

template <typename T>
static void gemm_packed(const PackedA<T>& a, int64_t N, const BSource<T>& b, T* C, int64_t ldc,
                        bool accumulate) {
  // The path A was packed for (its tile height), whatever the active path is now.
  gemm_dispatch<T>(static_cast<GemmPath>(a.path()), {false, nullptr, 0, a.data()}, a.rows(), N,
                   a.depth(), b, C, ldc, accumulate);
}
void gemm(const PackedA<float>& a, int64_t N, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate) {
  gemm_packed<float>(a, N, {false, B, ldb, nullptr}, C, ldc, accumulate);
}
void gemm(const PackedA<double>& a, int64_t N, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate) {
  gemm_packed<double>(a, N, {false, B, ldb, nullptr}, C, ldc, accumulate);
}
void gemm(const PackedA<float>& a, int64_t N, const Im2colB<float>& b, float* C, int64_t ldc,
          bool accumulate) {
  gemm_packed<float>(a, N, {false, nullptr, 0, &b}, C, ldc, accumulate);
}
void gemm(const PackedA<double>& a, int64_t N, const Im2colB<double>& b, double* C,
          int64_t ldc, bool accumulate) {
  gemm_packed<double>(a, N, {false, nullptr, 0, &b}, C, ldc, accumulate);
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
