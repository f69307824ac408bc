#include "nn/kernels.h"

#include <algorithm>

// Built with -fno-tree-loop-distribute-patterns (see CMakeLists.txt): the short copy loops stay
// vector loops instead of becoming calls to memcpy / memset.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define NK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NK_CLONES
#endif

namespace normkit::train::kernels {
namespace {

inline void copy_run(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}
inline void zero_run(float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = 0.0f;
}
inline void add_run(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// The taps kw in [begin, end) of output column j read input columns inside the image.
inline void tap_range(const ConvGeometry& g, int64_t j, int64_t& iw0, int& begin, int& end) {
  iw0 = j * g.stride - g.pad;
  begin = static_cast<int>(std::max<int64_t>(0, -iw0));
  end = static_cast<int>(std::min<int64_t>(g.kernel, g.in_w - iw0));
}

}  // namespace

NK_CLONES void im2col(const ConvGeometry& g, const float* image, float* col) {
  const int64_t c = g.channels, row = g.kernel * c;
  float* dst = col;
  for (int64_t i = 0; i < g.out_h; ++i)
    for (int64_t j = 0; j < g.out_w; ++j) {
      // For one kernel row kh the taps kw read consecutive pixels of input row ih: one run of
      // up to kernel * C_in contiguous floats.
      int64_t iw0;
      int begin, end;
      tap_range(g, j, iw0, begin, end);
      for (int kh = 0; kh < g.kernel; ++kh, dst += row) {
        const int64_t ih = i * g.stride - g.pad + kh;
        if (ih < 0 || ih >= g.in_h || begin >= end) {
          zero_run(dst, row);
          continue;
        }
        zero_run(dst, begin * c);
        copy_run(dst + begin * c, image + (ih * g.in_w + iw0 + begin) * c, (end - begin) * c);
        zero_run(dst + end * c, (g.kernel - end) * c);
      }
    }
}

NK_CLONES void col2im(const ConvGeometry& g, const float* dcol, const float* base, float* dx) {
  const int64_t c = g.channels, row = g.kernel * c, size = g.in_h * g.in_w * c;
  if (base)
    copy_run(dx, base, size);
  else
    zero_run(dx, size);
  const float* src = dcol;
  for (int64_t i = 0; i < g.out_h; ++i)
    for (int64_t j = 0; j < g.out_w; ++j) {
      int64_t iw0;
      int begin, end;
      tap_range(g, j, iw0, begin, end);
      for (int kh = 0; kh < g.kernel; ++kh, src += row) {
        const int64_t ih = i * g.stride - g.pad + kh;
        if (ih < 0 || ih >= g.in_h || begin >= end) continue;
        add_run(dx + (ih * g.in_w + iw0 + begin) * c, src + begin * c, (end - begin) * c);
      }
    }
}

NK_CLONES void add_relu(float* y, const float* r, int64_t n, bool relu) {
  if (r && relu)
    for (int64_t i = 0; i < n; ++i) y[i] = std::max(y[i] + r[i], 0.0f);
  else if (r)
    for (int64_t i = 0; i < n; ++i) y[i] += r[i];
  else if (relu)
    for (int64_t i = 0; i < n; ++i) y[i] = std::max(y[i], 0.0f);
}

NK_CLONES void relu_mask(float* g, const float* dy, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = y[i] > 0.0f ? dy[i] : 0.0f;
}

NK_CLONES void sgd_update(float* w, float* v, const float* grad, int64_t n, float lr, float mu,
                          float wd) {
  for (int64_t i = 0; i < n; ++i) {
    v[i] = mu * v[i] + (grad[i] + wd * w[i]);
    w[i] -= lr * v[i];
  }
}

}  // namespace normkit::train::kernels
