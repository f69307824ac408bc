#include "cpu/layer_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/moments.h"

namespace normkit::cpu {
namespace {

constexpr int kLanes = 16;
constexpr int64_t kColumnBlock = 64;     // columns of a dweight/dbias unit (stack accumulators)
constexpr int64_t kRowBlock = 64;        // rows summed in float before adding to double
constexpr int64_t kUnitRowBlocks = 4;    // row blocks per dweight/dbias unit
constexpr int64_t kParallelMin = 8192;

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

// Rows cut into kRunChunk pieces; a unit is one piece of a long row or several short rows.
struct RowPieces {
  int64_t rows, len, pieces, stride, rows_per_unit, units;
  RowPieces(int64_t rows_, int64_t len_) : rows(rows_), len(len_) {
    pieces = run_piece_count(len);
    stride = std::max<int64_t>(pieces, 1);
    rows_per_unit = pieces > 1 ? 1 : std::max<int64_t>(1, kRunChunk / std::max<int64_t>(len, 1));
    units = pieces > 1 ? rows * pieces : (rows + rows_per_unit - 1) / rows_per_unit;
  }
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

// weight and bias in the order the row is stored: for channels-last rows a permuted copy
// (length cols, not the tensor), so every kernel below walks memory in order.
const float* memory_order(const float* v, const LayerNormShape& t, std::vector<float>& buf) {
  if (!v || t.channels <= 0) return v;
  float* out = scratch(buf, t.cols);
  for (int64_t j = 0; j < t.cols; ++j) out[j] = v[ref::layer_norm_logical_index(t, j)];
  return out;
}

// y = ((x - m) * r + t) * w + b over one piece, with m = float(mean) and t = -(mean - m) * r the
// part of the mean float m cannot hold (x - m is exact or nearly, whatever the offset); w and b
// (already offset to the piece) may be null.
void normalize_run(float* y, const float* x, int64_t n, float m, float r, float t, const float* w,
                   const float* b) {
  if (w && b)
    for (int64_t i = 0; i < n; ++i) y[i] = ((x[i] - m) * r + t) * w[i] + b[i];
  else if (w)
    for (int64_t i = 0; i < n; ++i) y[i] = ((x[i] - m) * r + t) * w[i];
  else if (b)
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * r + t + b[i];
  else
    for (int64_t i = 0; i < n; ++i) y[i] = (x[i] - m) * r + t;
}

// sum(dy * w) and sum(dy * w * (x - m)) over one piece (w may be null).
void row_sums_run(const float* dy, const float* x, const float* w, int64_t n, float m,
                  double* sum_g, double* sum_g_xc) {
  float sg[kLanes] = {}, sx[kLanes] = {};
  int64_t i = 0;
  if (w) {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float g = dy[i + j] * w[i + j];
        sg[j] += g;
        sx[j] += g * (x[i + j] - m);
      }
    for (int j = 0; i < n; ++i, ++j) {
      const float g = dy[i] * w[i];
      sg[j] += g;
      sx[j] += g * (x[i] - m);
    }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        sg[j] += dy[i + j];
        sx[j] += dy[i + j] * (x[i + j] - m);
      }
    for (int j = 0; i < n; ++i, ++j) {
      sg[j] += dy[i];
      sx[j] += dy[i] * (x[i] - m);
    }
  }
  *sum_g = lane_sum(sg);
  *sum_g_xc = lane_sum(sx);
}

// dx = a * w * dy + b * (x - m) + c over one piece (w may be null).
void dx_run(float* dx, const float* dy, const float* x, const float* w, int64_t n, float a,
            float b, float m, float c) {
  if (w)
    for (int64_t i = 0; i < n; ++i) dx[i] = a * w[i] * dy[i] + b * (x[i] - m) + c;
  else
    for (int64_t i = 0; i < n; ++i) dx[i] = a * dy[i] + b * (x[i] - m) + c;
}

}  // namespace

void layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* weight,
                        const float* bias, const LayerNormShape& t, double eps, int num_threads) {
  if (t.rows == 0) return;
  const bool parallel = num_threads > 1 && t.rows * t.cols >= kParallelMin;
  thread_local std::vector<Moments> moments_buf;
  Moments* m = scratch(moments_buf, t.rows);
  runs_moments(x, t.rows, t.cols, m, parallel ? num_threads : 1);
  thread_local std::vector<float> tail_buf;
  float* tail = scratch(tail_buf, t.rows);
  for (int64_t i = 0; i < t.rows; ++i) {
    const double r = 1.0 / std::sqrt(m[i].variance() + eps);
    mean[i] = float(m[i].mean);  // 0 for an empty row
    rstd[i] = float(r);
    tail[i] = float(-(m[i].mean - double(mean[i])) * r);
  }
  thread_local std::vector<float> w_buf, b_buf;
  const float* w = memory_order(weight, t, w_buf);
  const float* b = memory_order(bias, t, b_buf);
  const RowPieces p(t.rows, t.cols);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < p.units; ++u)
    p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
      const int64_t at = row * t.cols + lo;
      normalize_run(y + at, x + at, hi - lo, mean[row], rstd[row], tail[row], w ? w + lo : nullptr,
                    b ? b + lo : nullptr);
    });
}

// Per row, over its M elements, with g = dy * w:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//      = rstd * w * dy + b * (x - mean) + c,
//   b = -rstd^3 / M * sum(g * (x - mean))   (through rstd),   c = -rstd / M * sum(g)  (mean)
//   dweight[j] = sum over rows of dy * (x - mean) * rstd,  dbias[j] = sum over rows of dy.
void layer_norm_backward(float* dx, float* dweight, float* dbias, const float* dy,
                         const float* x, const float* mean, const float* rstd,
                         const float* weight, const LayerNormShape& t, int num_threads) {
  const int64_t rows = t.rows, cols = t.cols;
  const bool parallel = num_threads > 1 && rows * cols >= kParallelMin;
  thread_local std::vector<float> w_buf;
  const float* w = memory_order(weight, t, w_buf);

  if (rows * cols > 0) {
    const RowPieces p(rows, cols);
    thread_local std::vector<double> partial_buf;
    double* pg = scratch(partial_buf, 2 * rows * p.stride);
    double* px = pg + rows * p.stride;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u)
      p.for_unit(u, [&](int64_t row, int64_t k, int64_t lo, int64_t hi) {
        const int64_t at = row * cols + lo;
        row_sums_run(dy + at, x + at, w ? w + lo : nullptr, hi - lo, mean[row],
                     &pg[row * p.stride + k], &px[row * p.stride + k]);
      });
    thread_local std::vector<float> coef_buf;
    float* cb = scratch(coef_buf, 2 * rows);
    float* cc = cb + rows;
    for (int64_t row = 0; row < rows; ++row) {
      double sg = 0, sx = 0;
      for (int64_t k = 0; k < p.stride; ++k) sg += pg[row * p.stride + k], sx += px[row * p.stride + k];
      const double r = rstd[row];
      cb[row] = float(-r * r * r * sx / double(cols));
      cc[row] = float(-r * sg / double(cols));
    }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u)
      p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        const int64_t at = row * cols + lo;
        dx_run(dx + at, dy + at, x + at, w ? w + lo : nullptr, hi - lo, rstd[row], cb[row],
               mean[row], cc[row]);
      });
  }

  if (!dweight && !dbias) return;
  // Column sums over rows: units of (kUnitRowBlocks * kRowBlock rows) x (kColumnBlock columns),
  // float within a kRowBlock, double across; unit partials merged in row order.
  const int64_t unit_rows = kRowBlock * kUnitRowBlocks;
  const int64_t row_units = (rows + unit_rows - 1) / unit_rows;
  const int64_t col_units = (cols + kColumnBlock - 1) / kColumnBlock;
  thread_local std::vector<double> column_buf;
  double* qd = scratch(column_buf, 2 * row_units * cols);
  double* qx = qd + row_units * cols;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < row_units * col_units; ++u) {
    const int64_t ru = u / col_units, c0 = (u % col_units) * kColumnBlock;
    const int64_t width = std::min(kColumnBlock, cols - c0);
    const int64_t r_end = std::min(rows, (ru + 1) * unit_rows);
    double dd[kColumnBlock] = {}, dxh[kColumnBlock] = {};
    for (int64_t r0 = ru * unit_rows; r0 < r_end; r0 += kRowBlock) {
      float sd[kColumnBlock] = {}, sx[kColumnBlock] = {};
      for (int64_t r = r0; r < std::min(r_end, r0 + kRowBlock); ++r) {
        const float* dyr = dy + r * cols + c0;
        const float* xr = x + r * cols + c0;
        const float m = mean[r], rs = rstd[r];
        for (int64_t j = 0; j < width; ++j) {
          sd[j] += dyr[j];
          sx[j] += dyr[j] * ((xr[j] - m) * rs);
        }
      }
      for (int64_t j = 0; j < width; ++j) dd[j] += sd[j], dxh[j] += sx[j];
    }
    for (int64_t j = 0; j < width; ++j) {
      qd[ru * cols + c0 + j] = dd[j];
      qx[ru * cols + c0 + j] = dxh[j];
    }
  }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t j = 0; j < cols; ++j) {
    double sd = 0, sx = 0;
    for (int64_t ru = 0; ru < row_units; ++ru) sd += qd[ru * cols + j], sx += qx[ru * cols + j];
    const int64_t k = ref::layer_norm_logical_index(t, j);
    if (dweight) dweight[k] = float(sx);
    if (dbias) dbias[k] = float(sd);
  }
}

}  // namespace normkit::cpu
