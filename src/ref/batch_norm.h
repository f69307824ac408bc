#pragma once
// Reference BatchNorm: the plainest correct loops, accumulating in double. The tests hold the
// optimized kernels against these. Templated on the activation type A (x, y, dy, dx, residual:
// float, double, bf16 or f16, read as double, written rounded once) and the parameter type P
// (weight, bias, statistics: float, or double for the float64 oracle of the accuracy and
// finite-difference tests).
//
// Arguments in the order of the public API (normkit/batch_norm.h): the shape and parameters,
// then the inputs, then the outputs. All kernels assume validated arguments (see
// src/api/batch_norm.cpp). Layout: x is (N, C, S)
// with S the product of the spatial dims, stored channels_first (index (n*C + c)*S + s) or
// channels_last (index (n*S + s)*C + c). weight, bias, dweight, dbias may be null.
#include <cstdint>

#include "common/dtype.h"
#include "normkit/tensor.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"

namespace normkit::ref {

using plan::BatchNormShape;
using plan::ForwardEpilogueOf;
using plan::BackwardEpilogueOf;

// Writes y, save_mean, save_invstd (length C); updates running_mean/running_var (may be null)
// with momentum and the unbiased variance. Nothing is written when N * S == 0.
template <typename A, typename P>
void batch_norm_forward_training(const BatchNormShape& shape, double eps, double momentum,
                                 const ForwardEpilogueOf<A>& epilogue, const A* x,
                                 const P* weight, const P* bias, A* y, P* save_mean,
                                 P* save_invstd, P* running_mean, P* running_var);

// Writes y = (x - running_mean) / sqrt(running_var + eps) * weight + bias (then the epilogue).
template <typename A, typename P>
void batch_norm_forward_inference(const BatchNormShape& shape, double eps,
                                  const ForwardEpilogueOf<A>& epilogue, const A* x,
                                  const P* weight, const P* bias, const P* running_mean,
                                  const P* running_var, A* y);

// Gradient through the batch statistics. Writes dx, dweight, dbias (the last two may be null)
// and epilogue.dresidual.
template <typename A, typename P>
void batch_norm_backward_training(const BatchNormShape& shape,
                                  const BackwardEpilogueOf<A>& epilogue, const A* dy,
                                  const A* x, const P* save_mean, const P* save_invstd,
                                  const P* weight, A* dx, P* dweight, P* dbias);

// Running statistics are constants. Writes dx, dweight, dbias (the last two may be null) and
// epilogue.dresidual.
template <typename A, typename P>
void batch_norm_backward_inference(const BatchNormShape& shape, double eps,
                                   const BackwardEpilogueOf<A>& epilogue, const A* dy,
                                   const A* x, const P* running_mean, const P* running_var,
                                   const P* weight, A* dx, P* dweight, P* dbias);

// ---- the steps of normkit/batch_norm_steps.h (activations A: float, bf16 or f16) ----

// The leaves of the canonical tree: for sample n and channel c, mean[n * C + c] and
// m2[n * C + c] of its S values (two passes in double). Writes nothing when S == 0.
template <typename A>
void batch_norm_sample_statistics(const BatchNormShape& shape, const A* x, double* mean,
                                  double* m2);

// The gradient leaves: sum_g[n * C + c] = sum g and sum_g_xmu[n * C + c] = sum g * (x - mean[c])
// over sample n's S values of channel c, g being dy through the epilogue's mask.
template <typename A>
void batch_norm_sample_gradients(const BatchNormShape& shape,
                                 const BackwardEpilogueOf<A>& epilogue, const A* dy, const A* x,
                                 const float* mean, double* sum_g, double* sum_g_xmu);

// y = epilogue((x - mean) * invstd * weight + bias).
template <typename A>
void batch_norm_normalize(const BatchNormShape& shape, const ForwardEpilogueOf<A>& epilogue,
                          const A* x, const float* weight, const float* bias, const float* mean,
                          const float* invstd, A* y);

// dx from the global sums over `count` values per channel; writes epilogue.dresidual.
template <typename A>
void batch_norm_backward_dx(const BatchNormShape& shape, const BackwardEpilogueOf<A>& epilogue,
                            double count, const A* dy, const A* x, const float* mean,
                            const float* invstd, const float* weight, const double* sum_g,
                            const double* sum_g_xmu, A* dx);

}  // namespace normkit::ref
