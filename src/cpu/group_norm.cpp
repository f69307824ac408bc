#include "cpu/group_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/moments.h"

namespace normkit::cpu {
namespace {

constexpr int kLanes = 16;             // independent float accumulators of dy_sums_run
constexpr int64_t kColumnBlock = 64;   // columns per stack-held accumulator block
constexpr int64_t kUnitElements = 32768;  // target size of a channels-last work unit
constexpr int64_t kParallelMin = 8192;    // smaller tensors are not worth waking threads

// Per-call buffers reused across calls on the calling thread (no allocation once warm).
template <typename T>
T* scratch(std::vector<T>& v, int64_t n) {
  if (v.size() < std::size_t(n)) v.resize(std::size_t(n));
  return v.data();
}

double lane_sum(const float* acc) {
  double s[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) s[j] = double(acc[j]) + double(acc[j + kLanes / 2]);
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// Channels-first work: `rows` contiguous rows of `len` elements, cut into kRunChunk pieces.
// A unit is one piece of a long row, or several whole short rows.
struct RowPieces {
  int64_t rows, len, pieces, stride, rows_per_unit, units;
  RowPieces(int64_t rows_, int64_t len_) : rows(rows_), len(len_) {
    pieces = run_piece_count(len);
    stride = std::max<int64_t>(pieces, 1);
    rows_per_unit = pieces > 1 ? 1 : std::max<int64_t>(1, kRunChunk / std::max<int64_t>(len, 1));
    units = pieces > 1 ? rows * pieces : (rows + rows_per_unit - 1) / rows_per_unit;
  }
  // f(row, piece, begin, end) for each piece in unit u.
  template <typename F>
  void for_unit(int64_t u, F&& f) const {
    if (pieces > 1) {
      const int64_t row = u / pieces, k = u % pieces, lo = k * kRunChunk;
      f(row, k, lo, std::min(len, lo + kRunChunk));
      return;
    }
    const int64_t end = std::min(rows, (u + 1) * rows_per_unit);
    for (int64_t row = u * rows_per_unit; row < end; ++row) f(row, int64_t(0), int64_t(0), len);
  }
};

// Channels-last work: per sample, `spatial` rows of `channels` floats. A unit is a range of
// unit_rows rows, walked in blocks of block_rows (the in-cache chunk of the statistics).
struct RowBlocks {
  int64_t block, unit_rows, units_per_sample;
  RowBlocks(int64_t spatial, int64_t channels) {
    block = block_rows(channels);
    unit_rows = block * std::max<int64_t>(1, kUnitElements / (block * std::max<int64_t>(channels, 1)));
    units_per_sample = (spatial + unit_rows - 1) / unit_rows;
  }
};

// Channels-last statistics: per unit, per-channel moments of each block merged into the unit's
// per-group moments (channel order, then block order); then the units of (n, g) in order.
void channels_last_group_moments(const float* x, const GroupNormShape& t, Moments* out,
                                 int num_threads, bool parallel) {
  const int64_t C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  const RowBlocks rb(S, C);
  const int64_t units = t.batch * rb.units_per_sample;
  thread_local std::vector<Moments> unit_buf;
  Moments* unit_moments = scratch(unit_buf, units * G);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < units; ++u) {
    thread_local std::vector<Moments> channel_buf;
    Moments* cm = scratch(channel_buf, C);
    const int64_t n = u / rb.units_per_sample, k = u % rb.units_per_sample;
    const int64_t r_end = std::min(S, (k + 1) * rb.unit_rows);
    Moments* gm = unit_moments + u * G;
    std::fill(gm, gm + G, Moments{});
    for (int64_t r0 = k * rb.unit_rows; r0 < r_end; r0 += rb.block) {
      block_moments(x + (n * S + r0) * C, std::min(rb.block, r_end - r0), C, C, cm);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) gm[g] = merge(gm[g], cm[c]);
    }
  }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t i = 0; i < t.batch * G; ++i) {
    const int64_t n = i / G, g = i % G;
    Moments m;
    for (int64_t k = 0; k < rb.units_per_sample; ++k)
      m = merge(m, unit_moments[(n * rb.units_per_sample + k) * G + g]);
    out[i] = m;
  }
}

// Folds m = float(mean), a = rstd * w[c] and b = bias[c] - (mean - m) * a per (n, c), then
// y = (x - m) * a + b. Subtracting first makes x - m exact (or nearly) whatever the offset, and b
// carries the part of the mean that float m cannot hold, so y is accurate to a few ulps of |y|
// even for groups whose |mean| is many times their spread; x * a + (b - mean * a) would cancel.
void fold_and_apply(float* y, const float* x, const double* mean, const double* rstd,
                    const float* weight, const float* bias, const GroupNormShape& t,
                    int num_threads, bool parallel) {
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  const int64_t per_group = C / G;
  thread_local std::vector<float> coef_buf;
  float* m = scratch(coef_buf, 3 * N * C);
  float* a = m + N * C;
  float* b = a + N * C;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * G + c / per_group;
      const float mf = float(mean[i]);
      const double scale = rstd[i] * (weight ? double(weight[c]) : 1.0);
      m[n * C + c] = mf;
      a[n * C + c] = float(scale);
      b[n * C + c] = float((bias ? double(bias[c]) : 0.0) - (mean[i] - double(mf)) * scale);
    }
  if (t.format == MemoryFormat::channels_first) {
    const RowPieces p(N * C, S);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u)
      p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        affine_run(y + row * S + lo, x + row * S + lo, hi - lo, m[row], a[row], b[row]);
      });
  } else {
    const RowBlocks rb(S, C);
    const int64_t units = N * rb.units_per_sample;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / rb.units_per_sample, r0 = (u % rb.units_per_sample) * rb.unit_rows;
      const int64_t rows = std::min(S - r0, rb.unit_rows);
      affine_rows(y + (n * S + r0) * C, x + (n * S + r0) * C, rows, C, m + n * C, a + n * C,
                  b + n * C);
    }
  }
}

}  // namespace

void group_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* weight,
                        const float* bias, const GroupNormShape& t, double eps, int num_threads,
                        float* variance) {
  const int64_t N = t.batch, G = t.groups, per_group = t.channels / G;
  if (N == 0) return;
  const bool parallel = num_threads > 1 && N * t.channels * t.spatial >= kParallelMin;
  thread_local std::vector<Moments> moments_buf;
  Moments* gm = scratch(moments_buf, N * G);
  if (t.format == MemoryFormat::channels_first)
    runs_moments(x, N * G, per_group * t.spatial, gm, parallel ? num_threads : 1);
  else
    channels_last_group_moments(x, t, gm, num_threads, parallel);
  thread_local std::vector<double> stat_buf;
  double* mu = scratch(stat_buf, 2 * N * G);
  double* rs = mu + N * G;
  for (int64_t i = 0; i < N * G; ++i) {
    const double var = gm[i].variance();  // NaN for an empty group, as torch's rstd
    mu[i] = gm[i].mean;                   // 0 for an empty group
    rs[i] = 1.0 / std::sqrt(var + eps);
    mean[i] = float(mu[i]);
    rstd[i] = float(rs[i]);
    if (variance) variance[i] = float(var);
  }
  fold_and_apply(y, x, mu, rs, weight, bias, t, num_threads, parallel);
}

void group_norm_apply(float* y, const float* x, const float* mean, const float* rstd,
                      const float* weight, const float* bias, const GroupNormShape& t,
                      int num_threads) {
  const int64_t NG = t.batch * t.groups;
  if (t.batch == 0) return;
  thread_local std::vector<double> stat_buf;
  double* mu = scratch(stat_buf, 2 * NG);
  double* rs = mu + NG;
  for (int64_t i = 0; i < NG; ++i) mu[i] = mean[i], rs[i] = rstd[i];
  const bool parallel = num_threads > 1 && t.batch * t.channels * t.spatial >= kParallelMin;
  fold_and_apply(y, x, mu, rs, weight, bias, t, num_threads, parallel);
}

// Per (n, g), over its M = (C/G) * S elements, with g_i = dy_i * w[c] and
// sum_dy[c] = sum_s dy, sum_dy_xc[c] = sum_s dy * (x - mean):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//      = (rstd * w[c]) * dy + b * (x - mean) + c0, with
//   b  = -rstd^3 / M * sum_c w[c] * sum_dy_xc[c]     (through rstd)
//   c0 = -rstd / M * sum_c w[c] * sum_dy[c]          (through mean)
// and b = c0 = 0 when the statistics are constants.
//   dweight[c] = sum_n rstd[n, g] * sum_dy_xc[n, c],  dbias[c] = sum_n sum_dy[n, c].
void group_norm_backward(float* dx, float* dweight, float* dbias, const float* dy,
                         const float* x, const float* mean, const float* rstd,
                         const float* weight, const GroupNormShape& t, bool stats_are_constants,
                         int num_threads) {
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  const int64_t per_group = C / G;
  const bool parallel = num_threads > 1 && N * C * S >= kParallelMin;
  const bool channels_first = t.format == MemoryFormat::channels_first;

  // Per-(n, c) reductions.
  thread_local std::vector<double> sums_buf;
  double* sum_dy = scratch(sums_buf, 2 * N * C);
  double* sum_dy_xc = sum_dy + N * C;
  const bool need_sums = !stats_are_constants || dweight || dbias;
  if (need_sums && N * C > 0) {
    thread_local std::vector<double> partial_buf;
    if (channels_first) {
      const RowPieces p(N * C, S);
      double* pd = scratch(partial_buf, 2 * N * C * p.stride);
      double* px = pd + N * C * p.stride;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t u = 0; u < p.units; ++u)
        p.for_unit(u, [&](int64_t row, int64_t k, int64_t lo, int64_t hi) {
          const float m = mean[(row / C) * G + (row % C) / per_group];
          dy_sums_run(dy + row * S + lo, x + row * S + lo, hi - lo, m, &pd[row * p.stride + k],
                      &px[row * p.stride + k]);
        });
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t row = 0; row < N * C; ++row) {
        double sd = 0, sx = 0;
        for (int64_t k = 0; k < p.stride; ++k) sd += pd[row * p.stride + k], sx += px[row * p.stride + k];
        sum_dy[row] = sd;
        sum_dy_xc[row] = sx;
      }
    } else {
      const RowBlocks rb(S, C);
      const int64_t units = N * rb.units_per_sample;
      thread_local std::vector<float> mean_buf;
      float* mean_c = scratch(mean_buf, N * C);  // mean of each channel's group
      for (int64_t i = 0; i < N * C; ++i) mean_c[i] = mean[(i / C) * G + (i % C) / per_group];
      double* pd = scratch(partial_buf, 2 * units * C);
      double* px = pd + units * C;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t u = 0; u < units; ++u) {
        const int64_t n = u / rb.units_per_sample, k = u % rb.units_per_sample;
        const int64_t r_end = std::min(S, (k + 1) * rb.unit_rows);
        std::fill(pd + u * C, pd + (u + 1) * C, 0.0);
        std::fill(px + u * C, px + (u + 1) * C, 0.0);
        for (int64_t r0 = k * rb.unit_rows; r0 < r_end; r0 += rb.block) {
          const int64_t at = (n * S + r0) * C;
          dy_sums_rows(dy + at, x + at, std::min(rb.block, r_end - r0), C, mean_c + n * C,
                       pd + u * C, px + u * C);
        }
      }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t i = 0; i < N * C; ++i) {
        const int64_t n = i / C, c = i % C;
        double sd = 0, sx = 0;
        for (int64_t k = 0; k < rb.units_per_sample; ++k) {
          const int64_t at = (n * rb.units_per_sample + k) * C + c;
          sd += pd[at];
          sx += px[at];
        }
        sum_dy[i] = sd;
        sum_dy_xc[i] = sx;
      }
    }
  }

  if (dweight || dbias) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && C > 1)
    for (int64_t c = 0; c < C; ++c) {
      double dw = 0, db = 0;
      for (int64_t n = 0; n < N; ++n) {
        dw += double(rstd[n * G + c / per_group]) * sum_dy_xc[n * C + c];
        db += sum_dy[n * C + c];
      }
      if (dweight) dweight[c] = float(dw);
      if (dbias) dbias[c] = float(db);
    }
  }
  if (N * C * S == 0) return;

  // Coefficients of dx per (n, c).
  thread_local std::vector<float> coef_buf;
  float* ca = scratch(coef_buf, 4 * N * C);
  float* cb = ca + N * C;
  float* cc = cb + N * C;
  float* cm = cc + N * C;
  const double count = double(per_group * S);
  for (int64_t i = 0; i < N * G; ++i) {
    const double r = rstd[i];
    const int64_t n = i / G, c0 = (i % G) * per_group;
    double b = 0, c = 0;
    if (!stats_are_constants) {
      double sum_g = 0, sum_g_xc = 0;
      for (int64_t ch = c0; ch < c0 + per_group; ++ch) {
        const double w = weight ? double(weight[ch]) : 1.0;
        sum_g += w * sum_dy[n * C + ch];
        sum_g_xc += w * sum_dy_xc[n * C + ch];
      }
      b = -r * r * r * sum_g_xc / count;
      c = -r * sum_g / count;
    }
    for (int64_t ch = c0; ch < c0 + per_group; ++ch) {
      ca[n * C + ch] = float(r * (weight ? double(weight[ch]) : 1.0));
      cb[n * C + ch] = float(b);
      cc[n * C + ch] = float(c);
      cm[n * C + ch] = mean[i];
    }
  }

  if (channels_first) {
    const RowPieces p(N * C, S);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u)
      p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        const int64_t at = row * S + lo;
        dx_run(dx + at, dy + at, x + at, hi - lo, ca[row], cb[row], cm[row], cc[row]);
      });
  } else {
    const RowBlocks rb(S, C);
    const int64_t units = N * rb.units_per_sample;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / rb.units_per_sample, r0 = (u % rb.units_per_sample) * rb.unit_rows;
      const int64_t at = (n * S + r0) * C;
      dx_rows(dx + at, dy + at, x + at, std::min(S - r0, rb.unit_rows), C, ca + n * C,
              cb + n * C, cm + n * C, cc + n * C);
    }
  }
}

// ---- leaf kernels -------------------------------------------------------------------------

void affine_run(float* y, const float* x, int64_t n, float m, float a, float b) {
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * a + b;
}

void affine_rows(float* y, const float* x, int64_t rows, int64_t channels, const float* m,
                 const float* a, const float* b) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * channels;
    float* yr = y + r * channels;
    for (int64_t c = 0; c < channels; ++c) yr[c] = (xr[c] - m[c]) * a[c] + b[c];
  }
}

void dy_sums_run(const float* dy, const float* x, int64_t n, float m, double* sum_dy,
                 double* sum_dy_xc) {
  float sd[kLanes] = {}, sx[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      sd[j] += dy[i + j];
      sx[j] += dy[i + j] * (x[i + j] - m);
    }
  for (int j = 0; i < n; ++i, ++j) {
    sd[j] += dy[i];
    sx[j] += dy[i] * (x[i] - m);
  }
  *sum_dy = lane_sum(sd);
  *sum_dy_xc = lane_sum(sx);
}

void dy_sums_rows(const float* dy, const float* x, int64_t rows, int64_t channels,
                  const float* m, double* sum_dy, double* sum_dy_xc) {
  for (int64_t c0 = 0; c0 < channels; c0 += kColumnBlock) {
    const int64_t w = std::min(kColumnBlock, channels - c0);
    float sd[kColumnBlock] = {}, sx[kColumnBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const float* dyr = dy + r * channels + c0;
      const float* xr = x + r * channels + c0;
      for (int64_t j = 0; j < w; ++j) {
        sd[j] += dyr[j];
        sx[j] += dyr[j] * (xr[j] - m[c0 + j]);
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      sum_dy[c0 + j] += sd[j];
      sum_dy_xc[c0 + j] += sx[j];
    }
  }
}

void dx_run(float* dx, const float* dy, const float* x, int64_t n, float a, float b, float m,
            float c) {
  for (int64_t i = 0; i < n; ++i) dx[i] = a * dy[i] + b * (x[i] - m) + c;
}

void dx_rows(float* dx, const float* dy, const float* x, int64_t rows, int64_t channels,
             const float* a, const float* b, const float* m, const float* c) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = r * channels;
    for (int64_t k = 0; k < channels; ++k)
      dx[at + k] = a[k] * dy[at + k] + b[k] * (x[at + k] - m[k]) + c[k];
  }
}

}  // namespace normkit::cpu
