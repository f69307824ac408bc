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

// Runs are a few dozen floats (kernel * C_in, C_in a multiple of 16 but in the first layer), so
// they move in blocks of 16 floats with fixed-size copies, which compile to one AVX-512 (two
// AVX2, four SSE) load and store, and no loop prologue; a scalar tail takes the rest.
using Block = float __attribute__((vector_size(64)));
constexpr int64_t kBlock = 16;

inline Block load(const float* p) {
  Block b;
  __builtin_memcpy(&b, p, sizeof b);
  return b;
}
inline void store(float* p, Block b) { __builtin_memcpy(p, &b, sizeof b); }

inline void copy_run(float* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}
inline void zero_run(float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) store(dst + i, Block{});
  for (; i < n; ++i) dst[i] = 0.0f;
}
inline void add_run(float* __restrict dst, const float* __restrict src, int64_t n) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) store(dst + i, load(dst + i) + load(src + i));
  for (; i < n; ++i) dst[i] += src[i];
}

inline void sum_run(float* __restrict dst, const float* __restrict a, const float* __restrict b,
                    int64_t n) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) store(dst + i, load(a + i) + load(b + i));
  for (; i < n; ++i) dst[i] = a[i] + b[i];
}

}  // namespace

NK_CLONES void im2col(const ConvGeometry& g, const float* image, float* col, int64_t row_begin,
                      int64_t row_end) {
  const int64_t c = g.channels, run = g.kernel * c;
  float* dst = col;
  int64_t i = row_begin / g.out_w, j = row_begin % g.out_w;  // (i, j) advance with p
  for (int64_t p = row_begin; p < row_end; ++p) {
    // The taps kw in [kw0, kw1) of output column j read input columns inside the image; for one
    // kernel row kh they are consecutive pixels of input row ih: one run of contiguous floats.
    const int64_t iw0 = j * g.stride - g.pad;
    const int kw0 = static_cast<int>(std::max<int64_t>(0, -iw0));
    const int kw1 = static_cast<int>(std::min<int64_t>(g.kernel, g.in_w - iw0));
    for (int kh = 0; kh < g.kernel; ++kh, dst += run) {
      const int64_t ih = i * g.stride - g.pad + kh;
      if (ih < 0 || ih >= g.in_h || kw0 >= kw1) {
        zero_run(dst, run);
      } else if (c == 1) {  // the first layer: a few floats, one by one
        const float* src = image + ih * g.in_w + iw0;
        for (int kw = 0; kw < g.kernel; ++kw) dst[kw] = kw >= kw0 && kw < kw1 ? src[kw] : 0.0f;
      } else {
        zero_run(dst, kw0 * c);
        copy_run(dst + kw0 * c, image + (ih * g.in_w + iw0 + kw0) * c, (kw1 - kw0) * c);
        zero_run(dst + kw1 * c, (g.kernel - kw1) * c);
      }
    }
    if (++j == g.out_w) {
      j = 0;
      ++i;
    }
  }
}

NK_CLONES void col2im_add(const ConvGeometry& g, const float* dcol, float* dx, int64_t row_begin,
                          int64_t row_end) {
  const int64_t c = g.channels, run = g.kernel * c;
  const float* src = dcol;
  int64_t i = row_begin / g.out_w, j = row_begin % g.out_w;
  for (int64_t p = row_begin; p < row_end; ++p) {
    const int64_t iw0 = j * g.stride - g.pad;
    const int kw0 = static_cast<int>(std::max<int64_t>(0, -iw0));
    const int kw1 = static_cast<int>(std::min<int64_t>(g.kernel, g.in_w - iw0));
    for (int kh = 0; kh < g.kernel; ++kh, src += run) {
      const int64_t ih = i * g.stride - g.pad + kh;
      if (ih < 0 || ih >= g.in_h || kw0 >= kw1) continue;
      add_run(dx + (ih * g.in_w + iw0 + kw0) * c, src + kw0 * c, (kw1 - kw0) * c);
    }
    if (++j == g.out_w) {
      j = 0;
      ++i;
    }
  }
}

NK_CLONES void pad_image(const float* image, int64_t h, int64_t w, int64_t c, int64_t pad,
                         float* padded) {
  const int64_t row = (w + 2 * pad) * c;
  float* dst = padded;
  zero_run(dst, pad * row + pad * c);  // the top rows and the first row's left padding
  dst += pad * row + pad * c;
  for (int64_t i = 0; i < h; ++i, dst += row) {
    copy_run(dst, image + i * w * c, w * c);
    zero_run(dst + w * c, 2 * pad * c);  // this row's right padding and the next one's left
  }
  // dst is now past the last image row's right and the next row's left padding: the remaining
  // bottom rows and the slack.
  zero_run(dst, pad * row - pad * c + 2 * pad * c);
}

NK_CLONES void copy_rows(float* dst, const float* src, int64_t rows, int64_t len,
                         int64_t src_stride, const float* add) {
  for (int64_t r = 0; r < rows; ++r) {
    if (add)
      sum_run(dst + r * len, src + r * src_stride, add + r * len, len);
    else
      copy_run(dst + r * len, src + r * src_stride, len);
  }
}

NK_CLONES void copy_or_zero(float* dst, const float* src, int64_t n) {
  if (src)
    copy_run(dst, src, n);
  else
    zero_run(dst, n);
}

NK_CLONES void sgd_update(float* w, float* v, const float* grad, int64_t n, float lr, float mu,
                          float wd) {
  for (int64_t i = 0; i < n; ++i) {
    v[i] = mu * v[i] + (grad[i] + wd * w[i]);
    w[i] -= lr * v[i];
  }
}

}  // namespace normkit::train::kernels
