#include "cpu/layer_norm2d.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/parallel.h"

namespace normkit::cpu {
namespace {

// A block: positions [s0, s0 + len) of sample n.
struct Block {
  int64_t n, s0, len;
};

Block block_of(const LayerNorm2dShape& t, int64_t i) {
  const int64_t per_sample = (t.spatial + kPositionBlock - 1) / kPositionBlock;
  const int64_t n = i / per_sample, s0 = (i % per_sample) * kPositionBlock;
  return {n, s0, std::min(kPositionBlock, t.spatial - s0)};
}

int64_t block_count(const LayerNorm2dShape& t) {
  return t.batch * ((t.spatial + kPositionBlock - 1) / kPositionBlock);
}

// Enough work to wake the threads.
bool worth_sharing(const LayerNorm2dShape& t) {
  return t.batch * t.channels * t.spatial >= (int64_t(1) << 15);
}

}  // namespace

template <typename T>
void layer_norm2d_forward(const LayerNorm2dShape& t, int num_threads, double eps, const T* x,
                          const float* weight, const float* bias, T* y, float* mean,
                          float* rstd) {
  const int64_t C = t.channels, S = t.spatial;
  parallel_for(block_count(t), num_threads, worth_sharing(t), false, [&](int64_t i) {
    const Block b = block_of(t, i);
    const T* xb = x + b.n * C * S + b.s0;  // x[n, c, s0 + k] = xb[c * S + k]
    T* yb = y + b.n * C * S + b.s0;
    float m[kPositionBlock], r[kPositionBlock], acc[kPositionBlock];
    std::fill(acc, acc + b.len, 0.0f);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < b.len; ++k) acc[k] += to_float(xb[c * S + k]);
    for (int64_t k = 0; k < b.len; ++k) m[k] = C > 0 ? acc[k] / float(C) : 0.0f;
    // The centered second pass (not E[x^2] - E[x]^2): exact for any offset of the values.
    std::fill(acc, acc + b.len, 0.0f);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t k = 0; k < b.len; ++k) {
        const float d = to_float(xb[c * S + k]) - m[k];
        acc[k] += d * d;
      }
    for (int64_t k = 0; k < b.len; ++k)
      r[k] = C > 0 ? float(1.0 / std::sqrt(double(acc[k]) / double(C) + eps))
                   : std::numeric_limits<float>::quiet_NaN();
    std::copy(m, m + b.len, mean + b.n * S + b.s0);
    std::copy(r, r + b.len, rstd + b.n * S + b.s0);
    for (int64_t c = 0; c < C; ++c) {
      const float w = weight ? weight[c] : 1.0f, bc = bias ? bias[c] : 0.0f;
      for (int64_t k = 0; k < b.len; ++k)
        yb[c * S + k] = from_float<T>((to_float(xb[c * S + k]) - m[k]) * r[k] * w + bc);
    }
  });
}

// dx = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat)), gw = dy * w[c]: the first term is
// the direct path, the second the path through the mean, the third through rstd.
template <typename T>
void layer_norm2d_backward(const LayerNorm2dShape& t, int num_threads, const T* dy, const T* x,
                           const float* mean, const float* rstd, const float* weight, T* dx,
                           float* dweight, float* dbias) {
  const int64_t C = t.channels, S = t.spatial;
  const bool share = worth_sharing(t);
  parallel_for(block_count(t), num_threads, share, false, [&](int64_t i) {
    const Block b = block_of(t, i);
    const int64_t base = b.n * C * S + b.s0;
    const float* m = mean + b.n * S + b.s0;
    const float* r = rstd + b.n * S + b.s0;
    float sum_gw[kPositionBlock], sum_gw_xhat[kPositionBlock];
    std::fill(sum_gw, sum_gw + b.len, 0.0f);
    std::fill(sum_gw_xhat, sum_gw_xhat + b.len, 0.0f);
    for (int64_t c = 0; c < C; ++c) {
      const float w = weight ? weight[c] : 1.0f;
      for (int64_t k = 0; k < b.len; ++k) {
        const float gw = to_float(dy[base + c * S + k]) * w;
        sum_gw[k] += gw;
        sum_gw_xhat[k] += gw * (to_float(x[base + c * S + k]) - m[k]) * r[k];
      }
    }
    const float inv_c = 1.0f / float(C);
    for (int64_t k = 0; k < b.len; ++k) {
      sum_gw[k] *= inv_c;
      sum_gw_xhat[k] *= inv_c;
    }
    for (int64_t c = 0; c < C; ++c) {
      const float w = weight ? weight[c] : 1.0f;
      for (int64_t k = 0; k < b.len; ++k) {
        const float xhat = (to_float(x[base + c * S + k]) - m[k]) * r[k];
        const float gw = to_float(dy[base + c * S + k]) * w;
        dx[base + c * S + k] = from_float<T>(r[k] * (gw - sum_gw[k] - xhat * sum_gw_xhat[k]));
      }
    }
  });
  if (!dweight && !dbias) return;
  // Per channel, over every position: sample by sample, each sample's run in float, the runs
  // added in double.
  parallel_for(C, num_threads, share, false, [&](int64_t c) {
    double dw = 0, db = 0;
    for (int64_t n = 0; n < t.batch; ++n) {
      const T* dyr = dy + (n * C + c) * S;
      const T* xr = x + (n * C + c) * S;
      const float* m = mean + n * S;
      const float* r = rstd + n * S;
      float run_dw = 0, run_db = 0;
      for (int64_t s = 0; s < S; ++s) {
        const float g = to_float(dyr[s]);
        run_dw += g * (to_float(xr[s]) - m[s]) * r[s];
        run_db += g;
      }
      dw += run_dw;
      db += run_db;
    }
    if (dweight) dweight[c] = float(dw);
    if (dbias) dbias[c] = float(db);
  });
}

#define NORMKIT_CPU_LAYER_NORM2D(T)                                                            \
  template void layer_norm2d_forward<T>(const LayerNorm2dShape&, int, double, const T*,        \
                                        const float*, const float*, T*, float*, float*);       \
  template void layer_norm2d_backward<T>(const LayerNorm2dShape&, int, const T*, const T*,     \
                                         const float*, const float*, const float*, T*, float*, \
                                         float*);
NORMKIT_CPU_LAYER_NORM2D(float)
NORMKIT_CPU_LAYER_NORM2D(bf16)
NORMKIT_CPU_LAYER_NORM2D(f16)
#undef NORMKIT_CPU_LAYER_NORM2D

}  // namespace normkit::cpu
