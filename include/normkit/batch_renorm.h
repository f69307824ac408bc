#pragma once
// Batch Renormalization (Ioffe 2017): BatchNorm whose training output is corrected towards the
// running statistics, so that training and inference normalize alike.
//
// Training: per channel c, over all n and spatial positions (M = N * spatial values):
//   mean = E[x], var = E[(x - mean)^2] (biased), sigma = sqrt(var + eps), invstd = 1 / sigma
//   sigma_run = sqrt(running_var + eps)                  (the running statistics before update)
//   r = clip(sigma / sigma_run, 1 / r_max, r_max)
//   d = clip((mean - running_mean) / sigma_run, -d_max, d_max)
//   y = weight * ((x - mean) * invstd * r + d) + bias
// then the running statistics are updated as batch_norm_forward_training does (PyTorch:
// momentum, unbiased running variance). With r_max = 1 and d_max = 0 this is BatchNorm.
// Inference is BatchNorm's inference with the running statistics:
// batch_norm_forward_inference / batch_norm_backward_inference (batch_norm.h).
//
// r and d are constants of the backward (stop-gradient): dx is BatchNorm's training backward
// with the weight weight * r, dweight = sum g * (xhat * r + d), dbias = sum g.
// Since y = xhat * (weight * r) + (weight * d + bias), both functions run BatchNorm's kernels
// with that effective affine; epilogues, dtypes, formats and determinism are batch_norm.h's.
#include <span>

#include "normkit/batch_norm.h"
#include "normkit/context.h"
#include "normkit/tensor.h"

namespace normkit {

struct BatchRenormParams {
  double eps = 1e-5;
  double momentum = 0.01;  // weight of the new batch in the running averages, in [0, 1]
  double r_max = 3.0;      // r is clipped to [1 / r_max, r_max]; r_max >= 1
  double d_max = 5.0;      // d is clipped to [-d_max, d_max]; d_max >= 0
  ForwardEpilogue epilogue = {};  // y = act(y + residual?), as BatchNormParams::epilogue
};

// Reads x, weight and bias (length C, optional), running_mean and running_var (length C,
// required: r and d are measured against them), params.epilogue.residual (optional).
// Overwrites y (shape/format/dtype of x), save_mean, save_invstd, save_r and save_d (length C
// each, what the backward needs). Updates running_mean and running_var in place.
// Throws normkit::Error, before writing anything, on: rank outside 2..5, a vector of length
// != C, a missing running statistic, eps <= 0 or not finite, momentum outside [0, 1],
// r_max < 1 or NaN, d_max < 0 or NaN, M == 1, int64 overflow, y or
// epilogue.residual unlike x, a workspace smaller than batch_norm_workspace_size(x).
// N == 0 writes nothing and leaves the running statistics unchanged.
void batch_renorm_forward_training(const BatchRenormParams& params, const TensorView& x,
                                   std::span<const float> weight, std::span<const float> bias,
                                   const TensorView& y, std::span<float> save_mean,
                                   std::span<float> save_invstd, std::span<float> save_r,
                                   std::span<float> save_d, std::span<float> running_mean,
                                   std::span<float> running_var, const Context& ctx = {});

// Backward of the training forward, r and d held constant. params.epilogue is the forward's, as
// batch_norm_backward_training takes it (epilogue.bias is the forward's bias, read with silu).
// Reads dy, x, save_mean, save_invstd, save_r, save_d (required), weight (optional),
// the epilogue tensors. Overwrites dx, params.epilogue.dresidual (optional), and (does not
// add to) dweight and dbias (optional, length C).
// Throws normkit::Error, before writing anything, on batch_norm_backward_training's errors and
// a save_r / save_d of length != C.
void batch_renorm_backward_training(const BatchNormBackwardParams& params, const TensorView& dy,
                                    const TensorView& x, std::span<const float> save_mean,
                                    std::span<const float> save_invstd,
                                    std::span<const float> save_r, std::span<const float> save_d,
                                    std::span<const float> weight, const TensorView& dx,
                                    std::span<float> dweight, std::span<float> dbias,
                                    const Context& ctx = {});

}  // namespace normkit
