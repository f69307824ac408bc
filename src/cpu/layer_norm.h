#pragma once
// Optimized float32 LayerNorm kernels. Same contracts as src/ref/layer_norm.h (validated
// arguments; rows stored in logical order or channels-last; weight/bias/dweight/dbias may be
// null), plus a thread count.
//
// Work units depend on the shape only (pieces of kRunChunk elements of a row, or blocks of whole
// short rows; blocks of rows by blocks of columns for dweight/dbias) and partials are merged in a
// fixed order, so the output is bitwise identical for any num_threads.
// Forward: one statistics pass (cpu/moments.h), then y = ((x - m) * rstd + t) * w[j] + b[j] with
// m = float(mean) and t the rest of the mean times rstd, accurate at any offset.
// Backward: one pass for the row sums sum(dy * w) and sum(dy * w * (x - mean)), then
// dx = rstd * w[j] * dy + b * (x - mean) + c per row; dweight/dbias reduce over rows.
#include <cstdint>

#include "ref/layer_norm.h"

namespace normkit::cpu {

using ref::LayerNormShape;

// Writes y, mean and rstd (length rows).
void layer_norm_forward(float* y, float* mean, float* rstd, const float* x, const float* weight,
                        const float* bias, const LayerNormShape& shape, double eps,
                        int num_threads);

// Writes dx and (when not null) dweight, dbias.
void layer_norm_backward(float* dx, float* dweight, float* dbias, const float* dy,
                         const float* x, const float* mean, const float* rstd,
                         const float* weight, const LayerNormShape& shape, int num_threads);

}  // namespace normkit::cpu
