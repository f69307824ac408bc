#pragma once
// Optimized float32 BatchNorm kernels. Same contracts as src/ref/batch_norm.h (validated
// arguments, either memory format, weight/bias/dweight/dbias may be null), plus a thread count.
//
// Work is cut into pieces whose boundaries depend on the shape only; every piece writes its own
// partial result and partials are merged in a fixed order, so the output is bitwise identical for
// any num_threads.
#include <cstdint>

#include "ref/batch_norm.h"

namespace normkit::cpu {

using ref::BatchNormShape;

// One statistics pass (stable, mergeable moments), then one fused pass y = x * a[c] + b[c] with
// a = invstd * weight and b = bias - mean * a.
void batch_norm_forward_training(float* y, float* save_mean, float* save_invstd,
                                 float* running_mean, float* running_var, const float* x,
                                 const float* weight, const float* bias, const BatchNormShape& shape,
                                 double eps, double momentum, int num_threads);

// One fused pass with a, b folded from the running statistics.
void batch_norm_forward_inference(float* y, const float* x, const float* weight, const float* bias,
                                  const float* running_mean, const float* running_var,
                                  const BatchNormShape& shape, double eps, int num_threads);

// One pass for both reductions (sum dy and sum (x - mean) * dy per channel), then one
// elementwise pass dx = dy * p[c] + x * q[c] + r[c].
void batch_norm_backward_training(float* dx, float* dweight, float* dbias, const float* dy,
                                  const float* x, const float* save_mean, const float* save_invstd,
                                  const float* weight, const BatchNormShape& shape,
                                  int num_threads);

// dx = dy * weight * invstd in one pass; the reductions for dweight/dbias only when requested.
void batch_norm_backward_inference(float* dx, float* dweight, float* dbias, const float* dy,
                                   const float* x, const float* running_mean,
                                   const float* running_var, const float* weight,
                                   const BatchNormShape& shape, double eps, int num_threads);

}  // namespace normkit::cpu
