// Float32 BatchNorm on the CPU: per-channel reductions over (N, spatial) cut into units fixed by
// the shape, run on OpenMP threads, merged per channel in a fixed order; elementwise passes with
// per-channel coefficients folded in double.
#include "cpu/batch_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/moments.h"

namespace normkit::cpu {
namespace {

// Elements a unit of reduction work covers, about: large enough to amortize the merge, small
// enough that a few hundred thousand elements still spread over every core.
constexpr int64_t kUnitElements = int64_t(1) << 15;
// Partial results per channel are capped near this (more units than threads buy nothing).
constexpr int64_t kMaxSlots = 64;
// Channels-first runs shorter than this are read as columns of a (N, C*S) matrix instead.
constexpr int64_t kMinRunLength = 64;
// Columns one column-form unit covers, at most: whole channels of cols_per_channel columns
// (< kMinRunLength <= kBlockColumns, so at least one channel fits).
constexpr int64_t kBlockColumns = 512;
// Independent float accumulators per run chunk (kRunChunk / kLanes terms each).
constexpr int kLanes = 16;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// How a per-channel reduction is cut into units. A function of the shape only: this is what
// makes every result independent of the thread count.
//
// Column form (channels-last, S == 1, or channels-first with short runs): the data is a matrix
// of `rows` rows, row r at x + r * row_stride, each channel owning `cols_per_channel`
// consecutive columns. A unit is (row group, channel block); row groups are the slots.
// Run form (channels-first, runs of S >= kMinRunLength): channel c is N runs of S floats. A unit
// is (channel, slot), the slot covering `samples_per_unit` whole runs, or, for runs longer than
// kUnitElements, one `segment_length` piece of one run.
struct Plan {
  bool column_form = true;
  int64_t channels = 0;
  int64_t slots = 0;  // partial results per channel
  int64_t units = 0;
  // column form
  int64_t rows = 0, row_stride = 0, cols_per_channel = 1;
  int64_t channels_per_block = 0, channel_blocks = 0, rows_per_group = 0, block_rows = 0;
  // run form
  int64_t batch = 0, spatial = 0, samples_per_unit = 0, segment_length = 0, segments = 0;
};

bool reads_as_rows(const BatchNormShape& sh) {
  return sh.format == MemoryFormat::channels_last || sh.spatial == 1;
}

Plan make_plan(const BatchNormShape& sh) {
  Plan p;
  p.channels = sh.channels;
  if (reads_as_rows(sh) || sh.spatial < kMinRunLength) {
    p.column_form = true;
    const bool rows = reads_as_rows(sh);
    p.rows = rows ? sh.batch * sh.spatial : sh.batch;
    p.row_stride = rows ? sh.channels : sh.channels * sh.spatial;
    p.cols_per_channel = rows ? 1 : sh.spatial;
    p.channels_per_block =
        std::min(sh.channels, std::max<int64_t>(1, kBlockColumns / p.cols_per_channel));
    p.channel_blocks = ceil_div(sh.channels, p.channels_per_block);
    const int64_t width = p.channels_per_block * p.cols_per_channel;
    p.block_rows = block_rows(width);
    p.rows_per_group = std::max(round_up(ceil_div(kUnitElements, width), p.block_rows),
                                round_up(ceil_div(p.rows, kMaxSlots), p.block_rows));
    p.slots = ceil_div(p.rows, p.rows_per_group);
    p.units = p.slots * p.channel_blocks;
  } else {
    p.column_form = false;
    p.batch = sh.batch;
    p.spatial = sh.spatial;
    if (sh.spatial <= kUnitElements) {
      p.segment_length = sh.spatial;
      p.segments = 1;
      p.samples_per_unit =
          std::max(kUnitElements / sh.spatial, ceil_div(sh.batch, kMaxSlots));
      p.slots = ceil_div(sh.batch, p.samples_per_unit);
    } else {
      p.segment_length = kUnitElements;  // a multiple of kRunChunk
      p.segments = ceil_div(sh.spatial, kUnitElements);
      p.samples_per_unit = 1;
      p.slots = sh.batch * p.segments;
    }
    p.units = p.slots * sh.channels;
  }
  return p;
}

// Calls f(n, begin, length) for the pieces of channel-first runs that run-form slot k covers,
// in order; offsets are within run (n, c).
template <class F>
void for_each_run_piece(const Plan& p, int64_t k, F f) {
  if (p.segments == 1) {
    const int64_t n1 = std::min(p.batch, (k + 1) * p.samples_per_unit);
    for (int64_t n = k * p.samples_per_unit; n < n1; ++n) f(n, int64_t(0), p.spatial);
  } else {
    const int64_t n = k / p.segments, begin = (k % p.segments) * p.segment_length;
    f(n, begin, std::min(p.segment_length, p.spatial - begin));
  }
}

// Row range [r0, r1) and channel range [c0, c1) of column-form unit u.
struct Block {
  int64_t slot, r0, r1, c0, c1;
};
Block column_block(const Plan& p, int64_t u) {
  Block b;
  b.slot = u / p.channel_blocks;
  const int64_t cb = u % p.channel_blocks;
  b.r0 = b.slot * p.rows_per_group;
  b.r1 = std::min(p.rows, b.r0 + p.rows_per_group);
  b.c0 = cb * p.channels_per_block;
  b.c1 = std::min(p.channels, b.c0 + p.channels_per_block);
  return b;
}

bool worth_threads(int num_threads, int64_t elements) {
  return num_threads > 1 && elements >= 2 * kUnitElements;
}

// ---- statistics ----

// partial[k * C + c]: the moments of channel c over slot k.
void stats_partials(const Plan& p, const float* x, int64_t C, Moments* partial, int num_threads,
                    bool parallel) {
  if (p.column_form) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u) {
      const Block b = column_block(p, u);
      const int64_t cps = p.cols_per_channel, width = (b.c1 - b.c0) * cps;
      Moments columns[kBlockColumns];
      Moments* acc = partial + b.slot * C;
      for (int64_t c = b.c0; c < b.c1; ++c) acc[c] = {};
      for (int64_t r = b.r0; r < b.r1; r += p.block_rows) {
        const int64_t n_rows = std::min(p.block_rows, b.r1 - r);
        block_moments(x + r * p.row_stride + b.c0 * cps, n_rows, width, p.row_stride, columns);
        for (int64_t c = b.c0; c < b.c1; ++c)
          for (int64_t j = 0; j < cps; ++j)
            acc[c] = merge(acc[c], columns[(c - b.c0) * cps + j]);
      }
    }
  } else {
    const int64_t S = p.spatial;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u) {
      const int64_t c = u / p.slots, k = u % p.slots;
      Moments m;
      for_each_run_piece(p, k, [&](int64_t n, int64_t begin, int64_t length) {
        m = merge(m, run_moments(x + (n * C + c) * S + begin, length));
      });
      partial[k * C + c] = m;
    }
  }
}

// ---- gradient sums ----

struct GradSums {
  double dy = 0;        // sum(dy)
  double dy_xc = 0;     // sum(dy * (x - center))
};

double lane_sum(const float* acc) {
  // A fixed pairwise order, whatever the compiler did with the lanes.
  double s[kLanes / 2];
  for (int j = 0; j < kLanes / 2; ++j) s[j] = double(acc[j]) + double(acc[j + kLanes / 2]);
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j) s[j] += s[j + w];
  return s[0];
}

// Sums over a contiguous run, in float chunks of kRunChunk with kLanes accumulators each.
void run_grad_sums(const float* dy, const float* x, float center, int64_t n, GradSums& out) {
  for (int64_t start = 0; start < n; start += kRunChunk) {
    const int64_t len = std::min(kRunChunk, n - start);
    const float* g = dy + start;
    const float* v = x + start;
    float s_dy[kLanes] = {}, s_dyx[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        s_dy[j] += g[i + j];
        s_dyx[j] += g[i + j] * (v[i + j] - center);
      }
    for (int j = 0; i < len; ++i, ++j) {
      s_dy[j] += g[i];
      s_dyx[j] += g[i] * (v[i] - center);
    }
    out.dy += lane_sum(s_dy);
    out.dy_xc += lane_sum(s_dyx);
  }
}

// partial[k * C + c]: the sums of channel c over slot k; center[c] is subtracted from x.
void grad_partials(const Plan& p, const float* dy, const float* x, const float* center, int64_t C,
                   GradSums* partial, int num_threads, bool parallel) {
  if (p.column_form) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u) {
      const Block b = column_block(p, u);
      const int64_t cps = p.cols_per_channel, width = (b.c1 - b.c0) * cps;
      float centers[kBlockColumns];
      for (int64_t c = b.c0; c < b.c1; ++c)
        for (int64_t j = 0; j < cps; ++j) centers[(c - b.c0) * cps + j] = center[c];
      GradSums* acc = partial + b.slot * C;
      for (int64_t c = b.c0; c < b.c1; ++c) acc[c] = {};
      for (int64_t r = b.r0; r < b.r1; r += p.block_rows) {
        const int64_t n_rows = std::min(p.block_rows, b.r1 - r);
        // Float over at most block_rows rows per column, vectorized across columns.
        float s_dy[kBlockColumns] = {}, s_dyx[kBlockColumns] = {};
        for (int64_t i = 0; i < n_rows; ++i) {
          const int64_t base = (r + i) * p.row_stride + b.c0 * cps;
          const float* g = dy + base;
          const float* v = x + base;
          for (int64_t j = 0; j < width; ++j) {
            s_dy[j] += g[j];
            s_dyx[j] += g[j] * (v[j] - centers[j]);
          }
        }
        for (int64_t c = b.c0; c < b.c1; ++c)
          for (int64_t j = 0; j < cps; ++j) {
            acc[c].dy += s_dy[(c - b.c0) * cps + j];
            acc[c].dy_xc += s_dyx[(c - b.c0) * cps + j];
          }
      }
    }
  } else {
    const int64_t S = p.spatial;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u) {
      const int64_t c = u / p.slots, k = u % p.slots;
      GradSums s;
      for_each_run_piece(p, k, [&](int64_t n, int64_t begin, int64_t length) {
        const int64_t at = (n * C + c) * S + begin;
        run_grad_sums(dy + at, x + at, center[c], length, s);
      });
      partial[k * C + c] = s;
    }
  }
}

// Per-channel sums over every slot, merged in slot order.
void reduce_grad_sums(const Plan& p, const float* dy, const float* x, const float* center,
                      int64_t C, GradSums* out, int num_threads, bool parallel) {
  thread_local std::vector<GradSums> scratch;
  scratch.resize(std::size_t(p.slots * C));
  GradSums* partial = scratch.data();
  grad_partials(p, dy, x, center, C, partial, num_threads, parallel);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && C > 1)
  for (int64_t c = 0; c < C; ++c) {
    GradSums s;
    for (int64_t k = 0; k < p.slots; ++k) {
      s.dy += partial[k * C + c].dy;
      s.dy_xc += partial[k * C + c].dy_xc;
    }
    out[c] = s;
  }
}

// ---- elementwise passes ----

// Calls run(c, offset, length) over channels-first runs (pieces of one (n, c) plane), or
// rows(offset, row_count) over blocks of channels-last rows; in parallel, pieces fixed by shape.
template <class RunFn, class RowsFn>
void for_each_piece(const BatchNormShape& sh, int num_threads, RunFn run, RowsFn rows) {
  const int64_t total = sh.batch * sh.channels * sh.spatial;
  const bool parallel = worth_threads(num_threads, total);
  if (reads_as_rows(sh)) {
    const int64_t n_rows = sh.batch * sh.spatial;
    const int64_t per_piece = std::max<int64_t>(1, kUnitElements / sh.channels);
    const int64_t pieces = ceil_div(n_rows, per_piece);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t k = 0; k < pieces; ++k) {
      const int64_t r0 = k * per_piece;
      rows(r0 * sh.channels, std::min(per_piece, n_rows - r0));
    }
  } else {
    const int64_t per_plane = ceil_div(sh.spatial, kUnitElements);
    const int64_t pieces = sh.batch * sh.channels * per_plane;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t k = 0; k < pieces; ++k) {
      const int64_t plane = k / per_plane, begin = (k % per_plane) * kUnitElements;
      run(plane % sh.channels, plane * sh.spatial + begin,
          std::min(kUnitElements, sh.spatial - begin));
    }
  }
}

// y = x * a[c] + b[c].
void scale_shift(float* y, const float* x, const float* a, const float* b,
                 const BatchNormShape& sh, int num_threads) {
  const int64_t C = sh.channels;
  for_each_piece(
      sh, num_threads,
      [&](int64_t c, int64_t at, int64_t length) {
        const float ac = a[c], bc = b[c];
        const float* in = x + at;
        float* out = y + at;
        for (int64_t i = 0; i < length; ++i) out[i] = in[i] * ac + bc;
      },
      [&](int64_t at, int64_t row_count) {
        for (int64_t r = 0; r < row_count; ++r) {
          const float* in = x + at + r * C;
          float* out = y + at + r * C;
          for (int64_t c = 0; c < C; ++c) out[c] = in[c] * a[c] + b[c];
        }
      });
}

// Per-call scratch of `count` floats, reused across calls on the same thread.
float* float_scratch(std::vector<float>& v, int64_t count) {
  v.resize(std::size_t(count));
  return v.data();
}

}  // namespace

void batch_norm_forward_training(float* y, float* save_mean, float* save_invstd,
                                 float* running_mean, float* running_var, const float* x,
                                 const float* weight, const float* bias, const BatchNormShape& sh,
                                 double eps, double momentum, int num_threads) {
  const int64_t C = sh.channels, total = sh.batch * C * sh.spatial;
  if (total == 0) return;
  const Plan plan = make_plan(sh);
  const bool parallel = worth_threads(num_threads, total);

  thread_local std::vector<Moments> moments_scratch;
  moments_scratch.resize(std::size_t(plan.slots * C));
  Moments* partial = moments_scratch.data();
  stats_partials(plan, x, C, partial, num_threads, parallel);

  thread_local std::vector<float> coefficient_scratch;
  float* a = float_scratch(coefficient_scratch, 2 * C);
  float* b = a + C;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && C > 1)
  for (int64_t c = 0; c < C; ++c) {
    Moments m;
    for (int64_t k = 0; k < plan.slots; ++k) m = merge(m, partial[k * C + c]);
    const double invstd = 1.0 / std::sqrt(m.variance() + eps);
    save_mean[c] = float(m.mean);
    save_invstd[c] = float(invstd);
    if (running_mean) {
      running_mean[c] = float((1 - momentum) * running_mean[c] + momentum * m.mean);
      running_var[c] = float((1 - momentum) * running_var[c] + momentum * m.unbiased_variance());
    }
    // y = (x - mean) * invstd * w + bias = x * a + b; b uses the rounded a so that x == mean
    // maps to bias up to the rounding of the two float operations.
    a[c] = float(invstd * (weight ? weight[c] : 1.0f));
    b[c] = float((bias ? bias[c] : 0.0f) - m.mean * double(a[c]));
  }
  scale_shift(y, x, a, b, sh, num_threads);
}

void batch_norm_forward_inference(float* y, const float* x, const float* weight, const float* bias,
                                  const float* running_mean, const float* running_var,
                                  const BatchNormShape& sh, double eps, int num_threads) {
  const int64_t C = sh.channels;
  if (sh.batch * C * sh.spatial == 0) return;
  thread_local std::vector<float> coefficient_scratch;
  float* a = float_scratch(coefficient_scratch, 2 * C);
  float* b = a + C;
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(double(running_var[c]) + eps);
    a[c] = float(invstd * (weight ? weight[c] : 1.0f));
    b[c] = float((bias ? bias[c] : 0.0f) - double(running_mean[c]) * double(a[c]));
  }
  scale_shift(y, x, a, b, sh, num_threads);
}

// With xhat = (x - mean) * invstd, M values per channel, p = weight * invstd:
//   dbias = sum(dy), dweight = sum(dy * xhat) = invstd * sum(dy * (x - mean))
//   dx = p * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)
//      = dy * p + (x - mean) * q + r,   q = -p * invstd^2 * sum(dy * (x - mean)) / M
//                                       r = -p * sum(dy) / M
// the q term being the gradient through the variance and r the one through the mean.
void batch_norm_backward_training(float* dx, float* dweight, float* dbias, const float* dy,
                                  const float* x, const float* save_mean, const float* save_invstd,
                                  const float* weight, const BatchNormShape& sh,
                                  int num_threads) {
  const int64_t C = sh.channels, count = sh.batch * sh.spatial;
  if (count * C == 0) return;
  const Plan plan = make_plan(sh);
  const bool parallel = worth_threads(num_threads, count * C);

  thread_local std::vector<GradSums> sums_scratch;
  sums_scratch.resize(std::size_t(C));
  GradSums* sums = sums_scratch.data();
  reduce_grad_sums(plan, dy, x, save_mean, C, sums, num_threads, parallel);

  thread_local std::vector<float> coefficient_scratch;
  float* p = float_scratch(coefficient_scratch, 3 * C);
  float* q = p + C;
  float* r = q + C;
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = save_invstd[c];
    const double pc = (weight ? weight[c] : 1.0f) * invstd;
    if (dbias) dbias[c] = float(sums[c].dy);
    if (dweight) dweight[c] = float(sums[c].dy_xc * invstd);
    p[c] = float(pc);
    q[c] = float(-pc * invstd * invstd * sums[c].dy_xc / double(count));
    r[c] = float(-pc * sums[c].dy / double(count));
  }
  for_each_piece(
      sh, num_threads,
      [&](int64_t c, int64_t at, int64_t length) {
        const float pc = p[c], qc = q[c], rc = r[c], mc = save_mean[c];
        const float* g = dy + at;
        const float* v = x + at;
        float* out = dx + at;
        for (int64_t i = 0; i < length; ++i) out[i] = g[i] * pc + (v[i] - mc) * qc + rc;
      },
      [&](int64_t at, int64_t row_count) {
        for (int64_t k = 0; k < row_count; ++k) {
          const float* g = dy + at + k * C;
          const float* v = x + at + k * C;
          float* out = dx + at + k * C;
          for (int64_t c = 0; c < C; ++c)
            out[c] = g[c] * p[c] + (v[c] - save_mean[c]) * q[c] + r[c];
        }
      });
}

void batch_norm_backward_inference(float* dx, float* dweight, float* dbias, const float* dy,
                                   const float* x, const float* running_mean,
                                   const float* running_var, const float* weight,
                                   const BatchNormShape& sh, double eps, int num_threads) {
  const int64_t C = sh.channels, total = sh.batch * C * sh.spatial;
  if (total == 0) return;
  thread_local std::vector<float> coefficient_scratch;
  float* p = float_scratch(coefficient_scratch, C);
  for (int64_t c = 0; c < C; ++c)
    p[c] = float((weight ? weight[c] : 1.0f) / std::sqrt(double(running_var[c]) + eps));
  if (dweight || dbias) {
    const Plan plan = make_plan(sh);
    thread_local std::vector<GradSums> sums_scratch;
    sums_scratch.resize(std::size_t(C));
    GradSums* sums = sums_scratch.data();
    reduce_grad_sums(plan, dy, x, running_mean, C, sums, num_threads,
                     worth_threads(num_threads, total));
    for (int64_t c = 0; c < C; ++c) {
      if (dbias) dbias[c] = float(sums[c].dy);
      if (dweight)
        dweight[c] = float(sums[c].dy_xc / std::sqrt(double(running_var[c]) + eps));
    }
  }
  for_each_piece(
      sh, num_threads,
      [&](int64_t c, int64_t at, int64_t length) {
        const float pc = p[c];
        const float* g = dy + at;
        float* out = dx + at;
        for (int64_t i = 0; i < length; ++i) out[i] = g[i] * pc;
      },
      [&](int64_t at, int64_t row_count) {
        for (int64_t k = 0; k < row_count; ++k) {
          const float* g = dy + at + k * C;
          float* out = dx + at + k * C;
          for (int64_t c = 0; c < C; ++c) out[c] = g[c] * p[c];
        }
      });
}

}  // namespace normkit::cpu
