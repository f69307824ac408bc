#include "cpu/moments.h"

#include <algorithm>
#include <vector>

namespace normkit::cpu {
namespace {

// Independent float accumulators per run chunk: 128 terms each for a full chunk, and enough
// lanes for the compiler to keep several vector registers busy.
constexpr int kLanes = 16;
// Columns per pass of block_moments: its float accumulators live on the stack.
constexpr int64_t kColumnBlock = 64;

double lane_sum(const float* acc) {
  // Fixed pairwise order: the result does not depend on how the compiler vectorized the lanes.
  double s[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) s[j] = double(acc[j]) + double(acc[j + kLanes / 2]);
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// One chunk (n <= kRunChunk) of a run.
Moments chunk_moments(const float* x, int64_t n) {
  if (n <= 0) return {};
  // Pass 1: shifted sum; the pivot keeps the float terms at the scale of the spread, not of
  // the offset.
  const float pivot = x[0];
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += x[i + j] - pivot;
  for (int j = 0; i < n; ++i, ++j) acc[j] += x[i] - pivot;
  const double count = double(n);
  const float mean0 = float(double(pivot) + lane_sum(acc) / count);

  // Pass 2 (from cache): centred sums. sum(d) corrects the rounding of mean0.
  float s1[kLanes] = {}, s2[kLanes] = {};
  i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const float d = x[i + j] - mean0;
      s1[j] += d;
      s2[j] += d * d;
    }
  for (int j = 0; i < n; ++i, ++j) {
    const float d = x[i] - mean0;
    s1[j] += d;
    s2[j] += d * d;
  }
  const double sum_d = lane_sum(s1), sum_d2 = lane_sum(s2);
  double m2 = sum_d2 - sum_d * sum_d / count;
  if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
  return {count, double(mean0) + sum_d / count, m2};
}

}  // namespace

Moments run_moments(const float* x, int64_t n) {
  Moments m;
  for (int64_t start = 0; start < n; start += kRunChunk)
    m = merge(m, chunk_moments(x + start, std::min(kRunChunk, n - start)));
  return m;
}

void block_moments(const float* x, int64_t rows, int64_t channels, int64_t row_stride,
                   Moments* out) {
  if (rows <= 0) {
    for (int64_t c = 0; c < channels; ++c) out[c] = {};
    return;
  }
  const double count = double(rows);
  for (int64_t c0 = 0; c0 < channels; c0 += kColumnBlock) {
    const int64_t w = std::min(kColumnBlock, channels - c0);
    const float* base = x + c0;
    float pivot[kColumnBlock], acc[kColumnBlock] = {};
    for (int64_t j = 0; j < w; ++j) pivot[j] = base[j];
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = base + r * row_stride;
      for (int64_t j = 0; j < w; ++j) acc[j] += row[j] - pivot[j];
    }
    float mean0[kColumnBlock], s1[kColumnBlock] = {}, s2[kColumnBlock] = {};
    for (int64_t j = 0; j < w; ++j) mean0[j] = float(double(pivot[j]) + double(acc[j]) / count);
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = base + r * row_stride;
      for (int64_t j = 0; j < w; ++j) {
        const float d = row[j] - mean0[j];
        s1[j] += d;
        s2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      const double sum_d = s1[j];
      double m2 = double(s2[j]) - sum_d * sum_d / count;
      if (m2 < 0) m2 = 0;
      out[c0 + j] = {count, double(mean0[j]) + sum_d / count, m2};
    }
  }
}

void runs_moments(const float* x, int64_t runs, int64_t length, Moments* out, int num_threads) {
  if (runs <= 0) return;
  const int64_t pieces = run_piece_count(length);
  const bool parallel = num_threads > 1 && runs * length >= 2 * kRunChunk;
  if (pieces <= 1) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t r = 0; r < runs; ++r) out[r] = chunk_moments(x + r * length, length);
    return;
  }
  // Several pieces per run: compute every piece, then merge each run's pieces in order.
  thread_local std::vector<Moments> scratch;
  scratch.resize(std::size_t(runs * pieces));
  Moments* piece = scratch.data();
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < runs * pieces; ++u) {
    const int64_t r = u / pieces, k = u % pieces;
    const int64_t start = k * kRunChunk;
    piece[u] = chunk_moments(x + r * length + start, std::min(kRunChunk, length - start));
  }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && runs > 1)
  for (int64_t r = 0; r < runs; ++r) {
    Moments m;
    for (int64_t k = 0; k < pieces; ++k) m = merge(m, piece[r * pieces + k]);
    out[r] = m;
  }
}

}  // namespace normkit::cpu
