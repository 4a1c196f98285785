// The CPU conv kernels (csrc/conv2d_cpu.cpp, csrc/gemm_cpu.cpp) on random shapes, every GEMM
// path this CPU runs and several thread counts, for a build under AddressSanitizer and
// UndefinedBehaviorSanitizer (tests/test_sanitized_kernels.py compiles and runs it). Outputs
// are vectors of their exact size, so a write or read past one is reported where it happens,
// not as an abort somewhere later. Values are checked loosely against a naive float64 conv to
// catch a wrong index; the exact checks are the Python tests'.
//
//   conv2d_cpu_sanitized ITERATIONS SEED   -> exit 0, or 1 with the shapes that disagreed
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels.h"

namespace {

using kernels::Conv2dShape;

struct Reference {
  std::vector<double> y, gx, gw;
};

// The conv and its two gradients by their definitions, in float64.
template <typename T>
Reference naive_conv(const Conv2dShape& s, const std::vector<T>& x, const std::vector<T>& w,
                     const std::vector<T>& gy) {
  Reference r{std::vector<double>(gy.size()), std::vector<double>(x.size()),
              std::vector<double>(w.size())};
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t co = 0; co < s.out_channels; ++co)
      for (int64_t oh = 0; oh < s.out_h; ++oh)
        for (int64_t ow = 0; ow < s.out_w; ++ow) {
          const int64_t yi = ((n * s.out_channels + co) * s.out_h + oh) * s.out_w + ow;
          for (int64_t ci = 0; ci < s.in_channels; ++ci)
            for (int64_t kr = 0; kr < s.kernel_h; ++kr)
              for (int64_t kq = 0; kq < s.kernel_w; ++kq) {
                const int64_t h = oh * s.stride_h - s.pad_h + kr * s.dilation_h;
                const int64_t col = ow * s.stride_w - s.pad_w + kq * s.dilation_w;
                if (h < 0 || h >= s.in_h || col < 0 || col >= s.in_w) continue;
                const int64_t xi = ((n * s.in_channels + ci) * s.in_h + h) * s.in_w + col;
                const int64_t wi = ((co * s.in_channels + ci) * s.kernel_h + kr) * s.kernel_w + kq;
                r.y[yi] += double(x[xi]) * w[wi];
                r.gx[xi] += double(gy[yi]) * w[wi];
                r.gw[wi] += double(gy[yi]) * x[xi];
              }
        }
  return r;
}

// Largest |got - want| relative to the largest |want| (1 where want is all zero).
template <typename T>
double relative_error(const std::vector<T>& got, const std::vector<double>& want) {
  double scale = 0, worst = 0;
  for (double v : want) scale = std::max(scale, std::fabs(v));
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - want[i]));
  return worst / std::max(scale, 1.0);
}

template <typename T>
bool agrees(const Conv2dShape& s, std::mt19937& rng) {
  std::uniform_real_distribution<double> value(-1, 1);
  std::vector<T> x(s.batch * s.in_channels * s.in_plane()), w(s.out_channels * s.patch_size()),
      gy(s.batch * s.out_channels * s.out_plane());
  for (std::vector<T>* v : {&x, &w, &gy})
    for (T& e : *v) e = static_cast<T>(value(rng));
  std::vector<T> y(gy.size()), gx(x.size()), gw(w.size());
  kernels::conv2d_forward_cpu<T>(s, x.data(), w.data(), nullptr, y.data());
  kernels::conv2d_backward_data_cpu<T>(s, gy.data(), w.data(), gx.data());
  kernels::conv2d_backward_weight_cpu<T>(s, x.data(), gy.data(), gw.data());
  const Reference r = naive_conv(s, x, w, gy);
  // Loose on purpose (sums of up to a few thousand terms of magnitude <= 1): a wrong index is
  // off by O(1), rounding by far less.
  const double tolerance = sizeof(T) == 4 ? 1e-4 : 1e-10;
  const double errors[3] = {relative_error(y, r.y), relative_error(gx, r.gx),
                            relative_error(gw, r.gw)};
  if (std::max({errors[0], errors[1], errors[2]}) <= tolerance) return true;
  std::printf("disagrees: %s batch %ld, %ld x %ld x %ld -> %ld, kernel %ld x %ld, stride %ld,%ld, "
              "pad %ld,%ld, dilation %ld,%ld, path %s, threads %d: y %.3g gx %.3g gw %.3g\n",
              sizeof(T) == 4 ? "float32" : "float64", long(s.batch), long(s.in_channels),
              long(s.in_h), long(s.in_w), long(s.out_channels), long(s.kernel_h),
              long(s.kernel_w), long(s.stride_h), long(s.stride_w), long(s.pad_h),
              long(s.pad_w), long(s.dilation_h), long(s.dilation_w),
              kernels::cpu_gemm_path().c_str(), kernels::cpu_threads(), errors[0], errors[1],
              errors[2]);
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s ITERATIONS SEED\n", argv[0]);
    return 2;
  }
  const int iterations = std::atoi(argv[1]);
  std::mt19937 rng(static_cast<unsigned>(std::atoi(argv[2])));
  auto draw = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const std::vector<std::string> paths = kernels::cpu_gemm_paths();
  int disagreements = 0;
  for (int done = 0; done < iterations;) {
    Conv2dShape s{};
    s.batch = draw(1, 5);
    s.in_channels = draw(0, 3) == 0 ? draw(1, 4) : draw(1, 48);  // stems' few channels too
    s.in_h = draw(1, 40);
    s.in_w = draw(1, 40);
    s.out_channels = draw(1, 70);
    s.kernel_h = draw(1, 5);
    s.kernel_w = draw(1, 5);
    if (draw(0, 3) == 0) s.kernel_h = s.kernel_w = draw(0, 1) ? 1 : 3;
    s.stride_h = draw(1, 4);
    s.stride_w = draw(0, 1) ? s.stride_h : draw(1, 4);
    s.pad_h = draw(0, 3);
    s.pad_w = draw(0, 3);
    s.dilation_h = draw(0, 2) == 0 ? draw(1, 3) : 1;
    s.dilation_w = draw(0, 2) == 0 ? draw(1, 3) : 1;
    const int64_t span_h = s.dilation_h * (s.kernel_h - 1) + 1;
    const int64_t span_w = s.dilation_w * (s.kernel_w - 1) + 1;
    if (s.in_h + 2 * s.pad_h < span_h || s.in_w + 2 * s.pad_w < span_w) continue;  // no output
    s.out_h = (s.in_h + 2 * s.pad_h - span_h) / s.stride_h + 1;
    s.out_w = (s.in_w + 2 * s.pad_w - span_w) / s.stride_w + 1;
    kernels::set_cpu_gemm_path(paths[draw(0, static_cast<int>(paths.size()) - 1)]);
    kernels::set_cpu_threads(draw(1, 5));
    const bool ok = draw(0, 1) ? agrees<float>(s, rng) : agrees<double>(s, rng);
    disagreements += ok ? 0 : 1;
    ++done;
  }
  std::printf("%d shapes, %d disagreed\n", iterations, disagreements);
  return disagreements == 0 ? 0 : 1;
}
