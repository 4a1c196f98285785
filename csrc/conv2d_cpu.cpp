// conv2d on the CPU as im2col + our GEMM (gemm_cpu.cpp). Per image b, with P = OH * OW and
// K = Cin * kh * kw:
//   forward          y_b[Cout x P]  = w[Cout x K] * col_b[K x P] (+ bias)
//   backward-data    gcol[K x P]    = w^T[K x Cout] * gy_b[Cout x P], then col2im adds into gx_b
//   backward-weight  gw[Cout x K]  += gy_b[Cout x P] * col_b^T[P x K], summed over b
// A 1x1, stride-1, unpadded conv needs no im2col: x_b already is col_b. Otherwise col_b is
// never written whole: the GEMM packs its panels straight from x_b (zero-padded where the conv
// pads; Im2colTables), which saves a write and a read of K x P values per image over im2col
// followed by packing.
//
// Threads (OpenMP): with at least as many images as threads, each thread takes whole images
// (no synchronisation inside a GEMM); with fewer (batch 1 inference), the images run one by one
// and each GEMM's columns are split across the threads instead. The thread count is
// kernels::cpu_threads() (kernels.h), read once per call and passed to every parallel region.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "gemm_cpu.h"
#include "kernels.h"

namespace kernels {

namespace {
std::atomic<int> g_cpu_threads{0};  // 0: not chosen yet
}  // namespace

namespace {
// OPS_CPU_THREADS as a count >= 1, or 0 where it is unset or not such a count (ops refuses
// those at import; a library loaded without ops falls back to OpenMP's count). Read from the
// environment so that every copy of this library, including op libraries a framework loads
// later, starts from the count ops.threads gave the process.
int env_cpu_threads() {
  const char* text = std::getenv("OPS_CPU_THREADS");
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(text, &end, 10);
  return (*end == '\0' && n >= 1 && n <= std::numeric_limits<int>::max()) ? static_cast<int>(n)
                                                                          : 0;
}
}  // namespace

int cpu_threads() {
  const int now = g_cpu_threads.load(std::memory_order_relaxed);
  if (now > 0) return now;
  // OPS_CPU_THREADS, else the first caller's view of OMP_NUM_THREADS (or the core count): the
  // same in every thread unless someone called omp_set_num_threads, which this replaces.
  const int from_env = env_cpu_threads();
  int expected = 0;
  g_cpu_threads.compare_exchange_strong(
      expected, from_env > 0 ? from_env : std::max(1, omp_get_max_threads()),
      std::memory_order_relaxed);
  return g_cpu_threads.load(std::memory_order_relaxed);
}

void set_cpu_threads(int n) {
  if (n < 1)
    throw std::invalid_argument("set_cpu_threads: n: expected an int >= 1, got " +
                                std::to_string(n));
  g_cpu_threads.store(n, std::memory_order_relaxed);
}

namespace {

// What every entry point reads once, before any parallel region: the thread count, and the GEMM
// path resolved (a bad OPS_CPU_GEMM throws here, where an exception can still leave the call,
// not inside an OpenMP region where it would terminate the process).
int prepare_call() {
  cpu_gemm_path();
  return cpu_threads();
}

bool is_pointwise(const Conv2dShape& s) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 &&
         s.pad_h == 0 && s.pad_w == 0;
}

// Buffers each thread keeps between calls, one per use: a fresh buffer of 100+ KiB per call
// is a fresh mmap whose page faults cost up to a quarter of a small conv (64 channels at 8x8
// on 2 cores). Contents are never relied on between calls: every user sizes and fills (or
// zeroes) its buffer first. (A framework's worker thread that calls us keeps its own.)
enum class Kept { kWeights, kFlipped, kImage, kGcol, kGradImage, kPartial };
template <typename T, Kept kUse>
std::vector<T>& kept() {
  thread_local std::vector<T> buffer;
  return buffer;
}

// What the GEMM needs to read an image's im2col matrix without writing it (cpu::Im2colB):
// the offset tables, once per call, and the image as xp: zero-padded where the conv pads, and
// with each padded row split into its sw column phases (column w at phase w % sw, index
// w / sw) where the conv strides and reads most of the image, so that a strided conv's output
// row reads consecutive values too. A copy per thread
// whose border is zeroed once and whose interior each image overwrites: C x Hp x Wp values
// against im2col's K x P, 1/9 of them for a 3x3 conv; none at all for an unpadded stride-1
// conv, which reads x as it is.
//   col[(c*kh + r)*kw + q][oh*OW + ow] = x[c][oh*sh - ph + r*dh][ow*sw - pw + q*dw] (0 outside)
//                                      = xp[c][oh*sh + r*dh][phase (q*dw) % sw][ow + (q*dw) / sw]
template <typename T>
class Im2colTables {
 public:
  explicit Im2colTables(const Conv2dShape& s)
      : s_(s), hp_(s.in_h + 2 * s.pad_h),
        // Split only where im2col reads more values than the image has (a 3x3/2 conv, not a
        // 1x1/2 one, which reads a quarter of it: there, gathering them costs less than a copy).
        phases_(s.stride_w > 1 && s.kernel_h * s.kernel_w * s.out_plane() >= s.in_plane()
                    ? s.stride_w : 1),
        phase_len_((s.in_w + 2 * s.pad_w + phases_ - 1) / phases_),
        row_len_(phase_len_ * phases_),
        copied_(s.pad_h > 0 || s.pad_w > 0 || phases_ > 1) {
    // The GEMM gathers with 32-bit offsets into one image.
    if (s.in_channels * hp_ * row_len_ > std::numeric_limits<int32_t>::max())
      throw std::invalid_argument(
          "conv2d: x: expected an image (channels x padded height x padded width) of at most "
          "2**31 - 1 values for the CPU kernels, got " + std::to_string(s.in_channels) + " x " +
          std::to_string(hp_) + " x " + std::to_string(row_len_));
    for (int64_t c = 0; c < s.in_channels; ++c)
      for (int64_t r = 0; r < s.kernel_h; ++r)
        for (int64_t q = 0; q < s.kernel_w; ++q)
          patch_.push_back(c * hp_ * row_len_ + r * s.dilation_h * row_len_ +
                           column(q * s.dilation_w));
    for (int64_t oh = 0; oh < s.out_h; ++oh)
      for (int64_t ow = 0; ow < s.out_w; ++ow)
        position_.push_back(oh * s.stride_h * row_len_ + ow * (s.stride_w / phases_));
  }

  // A buffer for image(): sized and zeroed, once per call and thread (its border stays zero
  // while image() rewrites the interior for every image).
  std::vector<T>& image_buffer() const {
    std::vector<T>& buffer = kept<T, Kept::kImage>();
    if (copied_) buffer.assign(size(), T(0));
    return buffer;
  }
  // Image x_b as the GEMM reads it: itself, or copied into image_buffer()'s `buffer`.
  const T* image(const T* x_b, std::vector<T>& buffer) const {
    if (!copied_) return x_b;
    for (int64_t c = 0; c < s_.in_channels; ++c)
      for (int64_t h = 0; h < s_.in_h; ++h)
        to_split(x_b + (c * s_.in_h + h) * s_.in_w, buffer.data() + interior_row(c, h));
    return buffer.data();
  }

  // The gradient image that col2im adds into: gx_b itself (zeroed), or `buffer` zeroed, whose
  // interior unpad() then copies to gx_b.
  T* zeroed_target(T* gx_b) const {
    if (!copied_) {
      std::fill(gx_b, gx_b + s_.in_channels * s_.in_plane(), T(0));
      return gx_b;
    }
    std::vector<T>& buffer = kept<T, Kept::kGradImage>();
    buffer.assign(size(), T(0));
    return buffer.data();
  }
  void unpad(T* gxp, T* gx_b) const {
    if (!copied_) return;
    for (int64_t c = 0; c < s_.in_channels; ++c)
      for (int64_t h = 0; h < s_.in_h; ++h)
        from_split(gxp + interior_row(c, h), gx_b + (c * s_.in_h + h) * s_.in_w);
  }

  cpu::Im2colB<T> matrix(const T* xp, bool transposed, int64_t first_column) const {
    return {xp, patch_.data(), position_.data(), transposed, first_column};
  }

 private:
  size_t size() const { return static_cast<size_t>(s_.in_channels * hp_ * row_len_); }
  // Where padded column w lies in its row.
  int64_t column(int64_t w) const { return (w % phases_) * phase_len_ + w / phases_; }
  // Where input row (c, h)'s padded row begins.
  int64_t interior_row(int64_t c, int64_t h) const {
    return (c * hp_ + h + s_.pad_h) * row_len_;
  }
  // Padded column phase + i * phases is input column w = phase - pw + i * phases, inside the
  // row for i in [first, last): calls each(part, first, last, start) with part that phase's
  // values in the split row and start its w at i = 0.
  template <typename Each>
  void each_phase(T* split, Each each) const {
    for (int64_t phase = 0; phase < phases_; ++phase) {
      const int64_t start = phase - s_.pad_w;
      const int64_t first = start >= 0 ? 0 : (-start + phases_ - 1) / phases_;
      // (No column at all where the phase starts past the row: a 1-column image, stride 2.)
      const int64_t last =
          start > s_.in_w - 1 ? 0 : std::min(phase_len_, (s_.in_w - 1 - start) / phases_ + 1);
      each(split + phase * phase_len_, first, last, start);
    }
  }
  // Input row `row` into its padded, phase-split place `split`.
  void to_split(const T* row, T* split) const {
    if (phases_ == 1) {
      std::memcpy(split + s_.pad_w, row, sizeof(T) * s_.in_w);
    } else if (phases_ == 2) {
      split_in_two(row, split);
    } else {
      each_phase(split, [&](T* part, int64_t first, int64_t last, int64_t start) {
        for (int64_t i = first; i < last; ++i) part[i] = row[start + i * phases_];
      });
    }
  }
  // The inverse: the split row's interior back into input row `row`.
  void from_split(T* split, T* row) const {
    if (phases_ == 1) {
      std::memcpy(row, split + s_.pad_w, sizeof(T) * s_.in_w);
      return;
    }
    each_phase(split, [&](T* part, int64_t first, int64_t last, int64_t start) {
      for (int64_t i = first; i < last; ++i) row[start + i * phases_] = part[i];
    });
  }
  // to_split for 2 phases (a stride-2 conv): 16 bytes of even and of odd
  // input columns at a time, deinterleaved in registers, then the rest one by one. Input
  // column w goes to padded column w + pw: phase (w + pw) % 2, index (w + pw) / 2.
  void split_in_two(const T* row, T* split) const {
    typedef T V __attribute__((vector_size(16)));
    constexpr int n = 16 / sizeof(T);  // lanes: 4 floats, 2 doubles
    T* to_phase[2] = {split, split + phase_len_};
    int64_t w = 0;
    for (; w + 2 * n <= s_.in_w; w += 2 * n) {
      V a, b, even, odd;
      std::memcpy(&a, row + w, sizeof(V));
      std::memcpy(&b, row + w + n, sizeof(V));
      if constexpr (n == 4) {
        even = __builtin_shufflevector(a, b, 0, 2, 4, 6);
        odd = __builtin_shufflevector(a, b, 1, 3, 5, 7);
      } else {
        even = __builtin_shufflevector(a, b, 0, 2);
        odd = __builtin_shufflevector(a, b, 1, 3);
      }
      const int64_t at = w + s_.pad_w;  // padded column of `even`'s first value
      std::memcpy(to_phase[at % 2] + at / 2, &even, sizeof(V));
      std::memcpy(to_phase[(at + 1) % 2] + (at + 1) / 2, &odd, sizeof(V));
    }
    for (; w < s_.in_w; ++w) to_phase[(w + s_.pad_w) % 2][(w + s_.pad_w) / 2] = row[w];
  }

  const Conv2dShape& s_;
  int64_t hp_, phases_, phase_len_, row_len_;
  bool copied_;
  std::vector<int64_t> patch_, position_;
};

// Runs body(begin, end) over [0, n) split into chunks aligned to `align` for up to `threads`
// threads, or inline when already inside a parallel region or n is small.
template <typename Body>
void parallel_columns(int64_t n, int64_t align, int threads, Body body) {
  if (omp_in_parallel()) threads = 1;
  const int64_t chunks = std::min<int64_t>(threads, (n + align - 1) / align);
  if (chunks <= 1) {
    body(int64_t(0), n);
    return;
  }
  const int64_t per_chunk = ((n + chunks - 1) / chunks + align - 1) / align * align;
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static, 1)
  for (int64_t i = 0; i < chunks; ++i) {
    const int64_t begin = std::min(n, i * per_chunk), end = std::min(n, begin + per_chunk);
    if (begin < end) body(begin, end);
  }
}

// Images go to threads when there are enough of them; see the file comment.
bool split_by_image(int64_t batch, int threads) { return batch >= threads; }

constexpr int64_t kColumnAlign = 64;  // a multiple of every micro-kernel's NR

template <typename T>
void add_bias(const Conv2dShape& s, const T* b, T* y_b) {
  if (!b) return;
  const int64_t P = s.out_plane();
  for (int64_t co = 0; co < s.out_channels; ++co) {
    T* row = y_b + co * P;
    const T bias = b[co];
    for (int64_t p = 0; p < P; ++p) row[p] += bias;
  }
}

}  // namespace

template <typename T>
void conv2d_forward_cpu(const Conv2dShape& s, const T* x, const T* w, const T* b, T* y) {
  const int64_t K = s.patch_size(), P = s.out_plane(), Cout = s.out_channels;
  const bool pointwise = is_pointwise(s);
  const int threads = prepare_call();

  const Im2colTables<T> tables(s);
  // packed once, for every image
  const cpu::PackedA<T> weights(false, Cout, K, w, K, kept<T, Kept::kWeights>());
  // y_b[:, j0:j1] = w * col_b[:, j0:j1]; col_b is x_b itself (pointwise) or read from the
  // (padded) image xp_b as the GEMM packs it.
  auto columns = [&](const T* xp_b, T* y_b, int64_t j0, int64_t j1) {
    if (pointwise)
      cpu::gemm(weights, j1 - j0, xp_b + j0, P, y_b + j0, P, false);
    else
      cpu::gemm(weights, j1 - j0, tables.matrix(xp_b, false, j0), y_b + j0, P, false);
  };
  auto one_image = [&](int64_t n, bool split_columns, std::vector<T>& padded) {
    const T* xp_b = tables.image(x + n * s.in_channels * s.in_plane(), padded);
    T* y_b = y + n * Cout * P;
    if (split_columns) {
      parallel_columns(P, kColumnAlign, threads,
                       [&](int64_t j0, int64_t j1) { columns(xp_b, y_b, j0, j1); });
    } else {
      columns(xp_b, y_b, 0, P);
    }
    add_bias(s, b, y_b);
  };

  if (split_by_image(s.batch, threads)) {
#pragma omp parallel num_threads(threads)
    {
      std::vector<T>& padded = tables.image_buffer();
#pragma omp for schedule(static)
      for (int64_t n = 0; n < s.batch; ++n) one_image(n, false, padded);
    }
  } else {
    std::vector<T>& padded = tables.image_buffer();
    for (int64_t n = 0; n < s.batch; ++n) one_image(n, true, padded);
  }
}

// A stride-1 conv's backward-data is itself a stride-1 conv: of gy, padded by
// dilation * (kernel - 1) - pad, with w's channel axes swapped and its taps flipped:
//   gx[ci][h][w] = sum over co, r, q of gy[co][h + ph - r*dh][w + pw - q*dw] * w[co][ci][r][q].
// So it runs on the forward path (no gcol, no col2im). The shape of that conv, where it exists
// (padding <= dilation * (kernel - 1), which any "same" or "valid" conv meets).
bool backward_data_as_forward(const Conv2dShape& s, Conv2dShape* t) {
  const int64_t ph = s.dilation_h * (s.kernel_h - 1) - s.pad_h;
  const int64_t pw = s.dilation_w * (s.kernel_w - 1) - s.pad_w;
  if (s.stride_h != 1 || s.stride_w != 1 || ph < 0 || pw < 0) return false;
  *t = s;
  t->in_channels = s.out_channels;
  t->in_h = s.out_h;
  t->in_w = s.out_w;
  t->out_channels = s.in_channels;
  t->out_h = s.in_h;
  t->out_w = s.in_w;
  t->pad_h = ph;
  t->pad_w = pw;
  return true;
}

template <typename T>
void conv2d_backward_data_cpu(const Conv2dShape& s, const T* gy, const T* w, T* gx) {
  Conv2dShape t;
  // (Not where gx has fewer channels than a register tile has rows, e.g. a stem's 3: the
  // forward GEMM's tiles would then be mostly padding.)
  if (!is_pointwise(s) && s.in_channels >= 8 && backward_data_as_forward(s, &t)) {
    prepare_call();  // a bad OPS_CPU_GEMM throws before anything is allocated
    const int64_t taps = s.kernel_h * s.kernel_w;
    std::vector<T>& flipped = kept<T, Kept::kFlipped>();  // [ci][co][taps reversed]
    flipped.clear();
    for (int64_t ci = 0; ci < s.in_channels; ++ci)
      for (int64_t co = 0; co < s.out_channels; ++co) {
        const T* taps_of = w + (co * s.in_channels + ci) * taps;
        for (int64_t tap = taps - 1; tap >= 0; --tap) flipped.push_back(taps_of[tap]);
      }
    conv2d_forward_cpu(t, gy, flipped.data(), static_cast<const T*>(nullptr), gx);
    return;
  }
  const int64_t K = s.patch_size(), P = s.out_plane(), Cout = s.out_channels;
  const int64_t in_size = s.in_channels * s.in_plane();
  const bool pointwise = is_pointwise(s);
  const int threads = prepare_call();
  // w^T, packed once for every image
  const cpu::PackedA<T> weights_t(true, K, Cout, w, K, kept<T, Kept::kWeights>());
  const Im2colTables<T> tables(s);

  auto one_image = [&](int64_t n, bool split_columns, std::vector<T>& gcol) {
    const T* gy_b = gy + n * Cout * P;
    T* gx_b = gx + n * in_size;
    // Pointwise: gx_b is gcol itself, so the GEMM writes it directly. Else gcol's rows are
    // ld apart: P, one cache line more where P rows would be a multiple of 4 KiB apart (the
    // micro-kernel's 8 row stores then all fall in one L1 set: 16 channels at 32 x 32 ran
    // 30% slower).
    T* target = gx_b;
    int64_t ld = P;
    if (!pointwise) {
      if ((P * sizeof(T)) % 4096 == 0) ld += 64 / sizeof(T);
      gcol.resize(K * ld);
      target = gcol.data();
    }
    if (split_columns) {
      parallel_columns(P, kColumnAlign, threads, [&](int64_t j0, int64_t j1) {
        cpu::gemm(weights_t, j1 - j0, gy_b + j0, P, target + j0, ld, false);
      });
    } else {
      cpu::gemm(weights_t, P, gy_b, P, target, ld, false);
    }
    if (!pointwise) {
      T* gxp = tables.zeroed_target(gx_b);
      cpu::col2im_add(gcol.data(), K, P, ld, tables.matrix(nullptr, false, 0), gxp);
      tables.unpad(gxp, gx_b);
    }
  };

  if (split_by_image(s.batch, threads)) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t n = 0; n < s.batch; ++n) one_image(n, false, kept<T, Kept::kGcol>());
    }
  } else {
    for (int64_t n = 0; n < s.batch; ++n) one_image(n, true, kept<T, Kept::kGcol>());
  }
}

template <typename T>
void conv2d_backward_weight_cpu(const Conv2dShape& s, const T* x, const T* gy, T* gw) {
  const int64_t K = s.patch_size(), P = s.out_plane(), Cout = s.out_channels;
  const bool pointwise = is_pointwise(s);
  const int threads = prepare_call();

  const Im2colTables<T> tables(s);
  // Over many positions per image, dot products along them (cpu::im2col_dot: nothing packed);
  // else the GEMM with col^T packed by transposes (cpu::im2col_dot_pays says which).
  const bool dot = cpu::im2col_dot_pays(P, K);
  // gw[:, j0:j1] (+)= gy_b * col_b[j0:j1, :]^T; col_b is x_b itself (pointwise) or read from
  // the (padded) image xp_b.
  auto accumulate_image = [&](int64_t n, const T* xp_b, T* gw_out, int64_t j0, int64_t j1,
                              bool add) {
    const T* gy_b = gy + n * Cout * P;
    if (pointwise)
      cpu::gemm(false, true, Cout, j1 - j0, P, gy_b, P, xp_b + j0 * P, P, gw_out + j0, K, add);
    else if (dot)
      cpu::im2col_dot(Cout, j1 - j0, P, gy_b, P, tables.matrix(xp_b, true, j0), gw_out + j0, K,
                      add);
    else
      cpu::gemm(false, Cout, j1 - j0, P, gy_b, P, tables.matrix(xp_b, true, j0), gw_out + j0,
                K, add);
  };
  auto image = [&](int64_t n, std::vector<T>& padded) {
    return tables.image(x + n * s.in_channels * s.in_plane(), padded);
  };

  if (split_by_image(s.batch, threads)) {
    // Each thread sums its images into a private gw; the partial sums are added in thread order
    // afterwards, so the result does not depend on scheduling. (The team may be smaller than
    // asked for, never larger: unused partials stay empty.)
    std::vector<const T*> partial(threads, nullptr);
#pragma omp parallel num_threads(threads)
    {
      std::vector<T>& mine = kept<T, Kept::kPartial>();
      mine.assign(Cout * K, T(0));
      partial[omp_get_thread_num()] = mine.data();
      std::vector<T>& padded = tables.image_buffer();
#pragma omp for schedule(static)
      for (int64_t n = 0; n < s.batch; ++n)
        accumulate_image(n, image(n, padded), mine.data(), 0, K, true);
    }
    std::fill(gw, gw + Cout * K, T(0));
    for (const T* part : partial)
      if (part)
        for (int64_t i = 0; i < Cout * K; ++i) gw[i] += part[i];
  } else {
    std::vector<T>& padded = tables.image_buffer();
    for (int64_t n = 0; n < s.batch; ++n) {
      const T* xp_b = image(n, padded);
      parallel_columns(K, kColumnAlign, threads, [&](int64_t j0, int64_t j1) {
        accumulate_image(n, xp_b, gw, j0, j1, n > 0);
      });
    }
  }
}

template <typename T>
void conv2d_backward_bias_cpu(const Conv2dShape& s, const T* gy, T* gb) {
  const int64_t P = s.out_plane();
  for (int64_t co = 0; co < s.out_channels; ++co) {
    double sum = 0;  // double: sums of up to B*OH*OW float terms
    for (int64_t n = 0; n < s.batch; ++n) {
      const T* row = gy + (n * s.out_channels + co) * P;
      for (int64_t p = 0; p < P; ++p) sum += row[p];
    }
    gb[co] = static_cast<T>(sum);
  }
}

#define INSTANTIATE(T)                                                                     \
  template void conv2d_forward_cpu<T>(const Conv2dShape&, const T*, const T*, const T*, T*); \
  template void conv2d_backward_data_cpu<T>(const Conv2dShape&, const T*, const T*, T*);    \
  template void conv2d_backward_weight_cpu<T>(const Conv2dShape&, const T*, const T*, T*);  \
  template void conv2d_backward_bias_cpu<T>(const Conv2dShape&, const T*, T*);
INSTANTIATE(float)
INSTANTIATE(double)
#undef INSTANTIATE

}  // namespace kernels

// For the framework op libraries, which link their own copy of this file and so have their own
// count (through ctypes, as deepprof_cpu_gemm_path in gemm_cpu.cpp): read it, and set it (0 on
// success, -1 for n < 1), e.g. to give them the count ops.core.set_cpu_threads gave ops._C.
extern "C" __attribute__((visibility("default"))) int deepprof_cpu_threads() {
  return kernels::cpu_threads();
}
extern "C" __attribute__((visibility("default"))) int deepprof_set_cpu_threads(int n) {
  if (n < 1) return -1;
  kernels::set_cpu_threads(n);
  return 0;
}
