#pragma once
// PyTorch-style layer_norm: normalizes over the trailing `normalized_ndim` dims of x, with an
// elementwise affine (weight and bias have the shape of those dims).
//   rows = product of the leading dims, cols = product of the normalized dims
//   per row: mean, biased var, rstd = 1/sqrt(var + eps); y = (x - mean) * rstd * w[j] + b[j]
// The LayerNorm of the GroupNorm paper (per-channel affine over C, H, W) is group_norm with
// num_groups = 1.
//
// x here may have any rank from 1 to 5 (rank is not limited to (N, C, ...)); it must be
// channels_first, or channels_last with normalized_ndim == rank - 1 (one row per sample; weight
// is indexed in logical (C, *spatial) order).
#include <span>

#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct LayerNormParams {
  int normalized_ndim = 1;  // how many trailing dims are normalized, 1..rank
  double eps = 1e-5;
};

// Reads x, weight and bias (length cols, optional). Overwrites y (like x), mean and rstd
// (length rows). Throws normkit::Error before writing anything on bad ranks, lengths, eps,
// layouts or overflow.
void layer_norm_forward(const LayerNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx = {});

// Reads dy, x, mean, rstd, weight (optional). Overwrites dx and (does not add to) dweight and
// dbias (length cols, optional).
void layer_norm_backward(const LayerNormParams& params, const TensorView& dy, const TensorView& x,
                         std::span<const float> mean, std::span<const float> rstd,
                         std::span<const float> weight, const TensorView& dx,
                         std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx = {});

}  // namespace normkit
