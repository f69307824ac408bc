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
//
// Activations (x, y, dy, dx and the epilogue tensors) may be float32, bfloat16 or float16, all
// of one dtype; weight, bias, mean, rstd and the parameter gradients are float32, and every sum
// is accumulated in float32 or wider. Results are bitwise identical for any thread count.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct LayerNormParams {
  int normalized_ndim = 1;  // how many trailing dims are normalized, 1..rank
  double eps = 1e-5;
  // Forward: y = relu?(normalized(x) + residual?), in the same pass (epilogue.h).
  ForwardEpilogue epilogue = {};
};

// Bytes of scratch memory the CPU kernels use for an input shaped like x, forward or backward
// (0 when x has no elements). Pass at least that much as Context::workspace to have no
// allocation in the call (any alignment); with an empty workspace each calling thread keeps a
// buffer of its own, allocated on first use and reused. Reads params.normalized_ndim and
// params.eps only. Throws normkit::Error on the checks of x and params that the forward makes.
std::size_t layer_norm_workspace_size(const LayerNormParams& params, const TensorView& x);

// Reads x, weight and bias (length cols, optional), params.epilogue.residual (optional).
// Overwrites y (like x), mean and rstd (length rows).
// Throws normkit::Error before writing anything on bad ranks, lengths, eps, layouts, dtypes,
// overflow, an epilogue.residual unlike x, or a workspace smaller than
// layer_norm_workspace_size(params, x).
void layer_norm_forward(const LayerNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx = {});

// Reads dy, x, mean, rstd, weight (optional). Overwrites dx and (does not add to) dweight and
// dbias (length cols, optional). Throws as the forward (params.epilogue is not read), and on a
// dy or dx unlike x.
void layer_norm_backward(const LayerNormParams& params, const TensorView& dy, const TensorView& x,
                         std::span<const float> mean, std::span<const float> rstd,
                         std::span<const float> weight, const TensorView& dx,
                         std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx = {});

// The same through the forward's epilogue: with g = relu ? dy * (epilogue.y > 0) : dy, the
// gradient of the normalization is computed from g, and epilogue.dresidual (optional) is
// overwritten with g. Reads epilogue.y (the forward's output, required with relu). Throws as
// above, and when epilogue.y is missing with relu or an epilogue tensor is unlike x.
void layer_norm_backward(const LayerNormParams& params, const BackwardEpilogue& epilogue,
                         const TensorView& dy, const TensorView& x, std::span<const float> mean,
                         std::span<const float> rstd, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx = {});

}  // namespace normkit
