// Our own blocked, vectorised single-threaded GEMM for the CPU conv (no BLAS: hand-written is
// the point). Row-major; callers choose the parallel split (see conv2d_cpu.cpp).
#pragma once

// The CPU kernels shuffle GCC vector-extension vectors with __builtin_shufflevector (halves
// joined in the micro-kernel's hot loop; a copy through memory there ran 4x slower).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 12
#error "deepprof's CPU kernels need GCC 12 or newer, or Clang (for __builtin_shufflevector)"
#endif

#include <cstdint>
#include <vector>

namespace kernels {
namespace cpu {

// C[M x N] = (accumulate ? C : 0) + op(A)[M x K] * op(B)[K x N], all row-major, with
// op(A)(m, k) = trans_a ? A[k * lda + m] : A[m * lda + k] and likewise for B.
// C may be a sub-block of a larger matrix (ldc >= N). K == 0 leaves C (or zeroes it).
// Runs the AVX2 or the baseline compilation, as kernels::cpu_gemm_path() says (kernels.h). The
// first call may throw std::invalid_argument (a bad OPS_CPU_GEMM): callers inside a parallel
// region must have resolved the path before entering it.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const float* A,
          int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, const double* A,
          int64_t lda, const double* B, int64_t ldb, double* C, int64_t ldc, bool accumulate);

// op(B) = the im2col matrix of one image, never written whole: the GEMM packs its panels
// straight from the image. With a zero-padded image `xp` (every index below inside it),
//   col[kk][p] = xp[patch_offset[kk] + position_offset[p]]
// for patch index kk = (c * kh + r) * kw + q (offset c*Hp*Wp + r*dh*Wp + q*dw) and output
// position p = oh * OW + ow (offset oh*sh*Wp + ow*sw). op(B) = col (forward: K = patch
// indices, N = positions) or col^T (`transposed`, backward-weight: K = positions, N = patch
// indices); op(B)'s column j is col's column (or row) `first_column + j`. Every offset, and
// the image, below 2**31 (gathered with 32-bit indices).
template <typename T>
struct Im2colB {
  const T* xp;
  const int64_t* patch_offset;
  const int64_t* position_offset;
  bool transposed;
  int64_t first_column;
};

// C[M x N] = (accumulate ? C : 0) + op(A)[M x K] * op(B)[K x N], op(B) an im2col matrix;
// otherwise as gemm() above.
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
          const Im2colB<float>& b, float* C, int64_t ldc, bool accumulate);
void gemm(bool trans_a, int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
          const Im2colB<double>& b, double* C, int64_t ldc, bool accumulate);

// C[M x N] = (accumulate ? C : 0) + G[M x P] * col^T, col's rows first_column .. + N of the
// im2col matrix `b` (its `transposed` unused): backward-weight's gy * col^T as dot products
// along the positions, nothing packed.
void im2col_dot(int64_t M, int64_t N, int64_t P, const float* G, int64_t ldg,
                const Im2colB<float>& b, float* C, int64_t ldc, bool accumulate);
void im2col_dot(int64_t M, int64_t N, int64_t P, const double* G, int64_t ldg,
                const Im2colB<double>& b, double* C, int64_t ldc, bool accumulate);

// Whether im2col_dot beats the GEMM with col^T packed, for P positions and N patch rows on the
// active path. Measured on 2 cores, b32: AVX-512 at 16 channels x 32x32 (P = 1024) 370 against
// 270 GFLOPS, at 32 x 16x16 (P = 256) 280 against 355; AVX2's 2 x 4 tile is load-bound: at 16
// channels x 32x32 146 against 161, but at a stem's 27 patch rows (two 16-wide strips, one
// mostly padding) 134 against 107.
bool im2col_dot_pays(int64_t P, int64_t N);

// The adjoint of an im2col matrix (col2im): gxp[patch_offset[kk] + position_offset[p]] +=
// gcol[kk * ld + p] for kk < K, p < P, with `layout`'s offset tables (its xp, transposed and
// first_column unused), vectorised for the active GEMM path's ISA.
void col2im_add(const float* gcol, int64_t K, int64_t P, int64_t ld,
                const Im2colB<float>& layout, float* gxp);
void col2im_add(const double* gcol, int64_t K, int64_t P, int64_t ld,
                const Im2colB<double>& layout, double* gxp);

// op(A) packed once for several GEMMs with the same A (the conv's weights, the same for every
// image), for the GEMM path active when it was made (which the GEMMs with it then run).
// Constructing it resolves the path, so it may throw as gemm() may.
// The packed values live in `storage` (the caller's, reused between calls), which must outlive
// it and not be touched meanwhile.
template <typename T>
class PackedA {
 public:
  PackedA(bool trans_a, int64_t M, int64_t K, const T* A, int64_t lda, std::vector<T>& storage);
  const T* data() const { return values_.data(); }
  int path() const { return path_; }  // the GemmPath it was packed for (gemm_cpu.cpp)
  int64_t rows() const { return rows_; }
  int64_t depth() const { return depth_; }

 private:
  std::vector<T>& values_;
  int path_;
  int64_t rows_, depth_;
};

// C[M x N] = (accumulate ? C : 0) + op(A) * op(B), op(A) packed (M x K), op(B) = B (K x N,
// row-major, not transposed) or an im2col matrix.
void gemm(const PackedA<float>& a, int64_t N, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool accumulate);
void gemm(const PackedA<double>& a, int64_t N, const double* B, int64_t ldb, double* C,
          int64_t ldc, bool accumulate);
void gemm(const PackedA<float>& a, int64_t N, const Im2colB<float>& b, float* C, int64_t ldc,
          bool accumulate);
void gemm(const PackedA<double>& a, int64_t N, const Im2colB<double>& b, double* C,
          int64_t ldc, bool accumulate);

}  // namespace cpu
}  // namespace kernels
