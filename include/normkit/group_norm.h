#pragma once
// Group Normalization (Wu & He 2018). LayerNorm of the paper is num_groups = 1, InstanceNorm is
// num_groups = C.
//
// For each sample n and group g (channels g*C/G ... (g+1)*C/G - 1, all spatial positions):
//   mean = E[x], var = E[(x - mean)^2] (biased), rstd = 1 / sqrt(var + eps)
//   y = (x - mean) * rstd * weight[c] + bias[c]
#include <span>

#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct GroupNormParams {
  int64_t num_groups = 1;
  double eps = 1e-5;
};

// Reads x, weight (length C, optional), bias (length C, optional).
// Overwrites y (shape, format and dtype of x), mean and rstd (N*G floats each, (n, g) row-major).
// Throws normkit::Error, before writing anything, on: rank outside 2..5, C % G != 0, G <= 0,
// weight/bias length != C, y shape/format/dtype != x's, mean/rstd length != N*G, eps negative or
// not finite, element counts that overflow int64, x and y of unsupported dtype.
// N == 0 is valid and writes nothing. NaN/Inf in x only affects its own (n, g).
void group_norm_forward(const GroupNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx = {});

// Reads dy, x, mean and rstd saved by group_norm_forward, weight (optional).
// Overwrites dx (shape/format/dtype of x); overwrites (does not add to) dweight and dbias
// (length C each; both optional, and either may be given without the other).
// Throws normkit::Error, before writing anything, on the checks of the forward plus dy or dx
// shape/format/dtype != x's and dweight/dbias length != C.
void group_norm_backward(const GroupNormParams& params, const TensorView& dy, const TensorView& x,
                         std::span<const float> mean, std::span<const float> rstd,
                         std::span<const float> weight, const TensorView& dx,
                         std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx = {});

}  // namespace normkit
