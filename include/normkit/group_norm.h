#pragma once
// Group Normalization (Wu & He 2018). LayerNorm of the paper is num_groups = 1, InstanceNorm is
// num_groups = C.
//
// For each sample n and group g (channels g*C/G ... (g+1)*C/G - 1, all spatial positions):
//   mean = E[x], var = E[(x - mean)^2] (biased), rstd = 1 / sqrt(var + eps)
//   y = (x - mean) * rstd * weight[c] + bias[c]
//
// Activations (x, y, dy, dx and the epilogue tensors) may be float32, bfloat16 or float16, all of
// one dtype; weights, statistics and accumulation are float32 (or wider) whatever the dtype.
//
// Memory: the CPU kernels need scratch (per-piece statistics and per-channel coefficients and
// sums, O(N * C) values plus one partial per work unit), group_norm_workspace_size bytes. Given
// as Context::workspace, it is the only memory they use: no allocation in the call. With an
// empty workspace the calling thread keeps a buffer of its own, allocated on first use and
// reused. No per-element temporary is ever allocated. The reference backend ignores the
// workspace and allocates freely.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct GroupNormParams {
  int64_t num_groups = 1;
  double eps = 1e-5;
  // Fused into the forward's single output pass: y = act(normalized + residual?), act none, relu or
  // silu.
  ForwardEpilogue epilogue = {};
};

// Bytes of scratch memory the CPU kernels use for an input shaped like x cut into
// params.num_groups groups (a function of the shape and format, not of the dtype): enough for
// group_norm_forward and group_norm_backward, with any epilogue; 0 when x has no
// elements. Pass at least that much as Context::workspace (at any alignment: the size has
// room to align inside it) to have no allocation in those calls. Reads
// params.num_groups and the dims, format and dtype of x, not its data (which must be non-null
// for a non-empty x, as in the forward). Throws normkit::Error on the forward's checks of x,
// num_groups and eps.
std::size_t group_norm_workspace_size(const GroupNormParams& params, const TensorView& x);

// Reads x, weight (length C, optional), bias (length C, optional), params.epilogue.residual
// (optional, shape/format/dtype of x).
// Overwrites y (shape, format and dtype of x) with act(normalized(x) + residual?), mean and
// rstd (N*G floats each, (n, g) row-major; the statistics of x alone).
// Throws normkit::Error, before writing anything, on: rank outside 2..5, C % G != 0, G <= 0,
// weight/bias length != C, y or epilogue.residual shape/format/dtype != x's, mean/rstd length !=
// N*G, eps negative or not finite, element counts that overflow int64, an unsupported dtype,
// a non-empty Context::workspace smaller than group_norm_workspace_size(params, x).
// N == 0 is valid and writes nothing. NaN/Inf in x only affects its own (n, g).
void group_norm_forward(const GroupNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx = {});

// What group_norm_backward reads besides its tensors: the grouping of the forward and the
// epilogue the forward fused (no eps: the saved rstd already holds it).
struct GroupNormBackwardParams {
  int64_t num_groups = 1;
  // The forward's activation (epilogue.h): relu, g = dy * (epilogue.y > 0) (epilogue.y, the
  // forward's output, required then); silu, g = dy * silu'(z) with z recomputed from x, the
  // statistics, weight, and epilogue.bias and epilogue.residual: the forward's own bias and
  // residual, absent exactly when the forward had none (nothing can tell a missing one from an
  // absent one: pass what the forward got); none, g = dy. epilogue.dresidual, when given, receives
  // g (the residual's gradient).
  BackwardEpilogue epilogue = {};
};

// Reads dy, x, mean and rstd saved by group_norm_forward, weight (optional), params.epilogue.y
// (with relu), params.epilogue.residual and .bias (with silu). The gradient of the normalization is
// taken with respect to g (above). Overwrites dx (shape/format/dtype of x) and, when given,
// params.epilogue.dresidual with g; overwrites (does not add to) dweight and dbias (length C each;
// both optional, and either may be given without the other), in the same pass as the reductions.
// Throws normkit::Error, before writing anything, on the forward's checks of x, num_groups, weight
// and the workspace, dy or dx shape/format/dtype != x's, mean/rstd length != N*G, dweight/dbias
// length != C, relu without epilogue.y, an epilogue.bias of the wrong length, an activation not in
// the enum, and epilogue.y or epilogue.dresidual shape/format/dtype != x's.
void group_norm_backward(const GroupNormBackwardParams& params, const TensorView& dy,
                         const TensorView& x, std::span<const float> mean,
                         std::span<const float> rstd, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx = {});

}  // namespace normkit
