#pragma once
// Optimized float32 GroupNorm kernels. Same contracts as src/ref/group_norm.h (validated
// arguments, either memory format, computed in place of the format: no transposing copy;
// weight/bias/dweight/dbias may be null), plus a thread count.
//
// Threads work on units fixed by the shape: (n, g, piece of the group) for channels-first
// statistics, (n, block of spatial rows) for channels-last, so N = 1 still uses every core.
// Each unit writes its own partial result, partials are merged in a fixed order, and the
// output is bitwise identical for any num_threads.
//
// Forward: one statistics pass (cpu/moments.h), then one fused pass y = (x - m) * a + b with
// m = float(mean), a = rstd * weight[c], b = bias[c] - (mean - m) * a folded per (n, c).
// (Subtracting m first, rather than y = x * a + (b - mean * a), keeps y accurate to a few ulps
// of |y| at any offset, for one more operation per element of a memory-bound pass.)
// Backward: one pass for both reductions per (n, c), sum(dy) and sum(dy * (x - mean)), then one
// elementwise pass dx = a * dy + b * (x - mean) + c with coefficients folded per (n, c).
// Leaf kernels below are plain loops over raw pointers, the unit an explicit SIMD version
// replaces.
#include <cstdint>

#include "ref/group_norm.h"

namespace normkit::cpu {

using ref::GroupNormShape;

// Writes y, mean, rstd (N*G) and, when not null, variance (N*G, biased).
void group_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* weight,
                        const float* bias, const GroupNormShape& shape, double eps,
                        int num_threads, float* variance = nullptr);

// Writes y = (x - mean) * rstd * weight + bias with the given per-(n, g) mean and rstd.
void group_norm_apply(float* y, const float* x, const float* mean, const float* rstd,
                      const float* weight, const float* bias, const GroupNormShape& shape,
                      int num_threads);

// Writes dx and (when not null) dweight, dbias. With stats_are_constants the gradient does not
// flow through mean and rstd.
void group_norm_backward(float* dx, float* dweight, float* dbias, const float* dy,
                         const float* x, const float* mean, const float* rstd,
                         const float* weight, const GroupNormShape& shape,
                         bool stats_are_constants, int num_threads);

// ---- leaf kernels -------------------------------------------------------------------------
// y[i] = (x[i] - m) * a + b, i < n.
void affine_run(float* y, const float* x, int64_t n, float m, float a, float b);
// y[r*channels + c] = (x[r*channels + c] - m[c]) * a[c] + b[c], r < rows, c < channels.
void affine_rows(float* y, const float* x, int64_t rows, int64_t channels, const float* m,
                 const float* a, const float* b);
// sum_dy = sum(dy[i]), sum_dy_xc = sum(dy[i] * (x[i] - m)), i < n <= kRunChunk; float lanes.
void dy_sums_run(const float* dy, const float* x, int64_t n, float m, double* sum_dy,
                 double* sum_dy_xc);
// Per column c of a channels-last block (rows <= 128): adds sum(dy) to sum_dy[c] and
// sum(dy * (x - m[c])) to sum_dy_xc[c].
void dy_sums_rows(const float* dy, const float* x, int64_t rows, int64_t channels,
                  const float* m, double* sum_dy, double* sum_dy_xc);
// dx[i] = a * dy[i] + b * (x[i] - m) + c, i < n.
void dx_run(float* dx, const float* dy, const float* x, int64_t n, float a, float b, float m,
            float c);
// dx[r, k] = a[k] * dy[r, k] + b[k] * (x[r, k] - m[k]) + c[k] for a channels-last block.
void dx_rows(float* dx, const float* dy, const float* x, int64_t rows, int64_t channels,
             const float* a, const float* b, const float* m, const float* c);

}  // namespace normkit::cpu
