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
  // Forward: y = act(normalized(x) + residual?) (act none, relu or silu), in the same pass
  // (epilogue.h).
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

// What layer_norm_backward reads besides its tensors: the rows of the forward and the epilogue
// it fused (no eps: the saved rstd already holds it).
struct LayerNormBackwardParams {
  int normalized_ndim = 1;  // as the forward's
  // The forward's activation (epilogue.h): relu, g = dy * (epilogue.y > 0) (epilogue.y, the
  // forward's output, required then); silu, g = dy * silu'(z) with z recomputed from x, the
  // statistics, weight, and epilogue.bias and epilogue.residual: the forward's own bias and
  // residual, absent exactly when the forward had none (nothing can tell a missing one from an
  // absent one: pass what the forward got); none, g = dy. epilogue.dresidual, when given, receives
  // g.
  BackwardEpilogue epilogue = {};
};

// Reads dy, x, mean, rstd, weight (optional), params.epilogue.y (with relu),
// params.epilogue.residual and .bias (with silu). The gradient of the normalization is taken with
// respect to g (above). Overwrites dx (like x), dweight and dbias (length cols, optional;
// overwritten, not added to) and, when given, params.epilogue.dresidual with g. Throws
// normkit::Error before writing anything on the forward's checks of x, normalized_ndim, weight and
// the workspace, a dy or dx unlike x, a vector of the wrong length, relu without epilogue.y, an
// epilogue.bias of the wrong length, an activation not in the enum, or an epilogue tensor unlike x.
void layer_norm_backward(const LayerNormBackwardParams& params, const TensorView& dy,
                         const TensorView& x, std::span<const float> mean,
                         std::span<const float> rstd, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx = {});

}  // namespace normkit
