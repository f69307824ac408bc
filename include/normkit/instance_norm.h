#pragma once
// PyTorch-style instance_norm: each (n, c) normalized over its spatial positions; per-channel
// affine. With use_input_stats it is group_norm with num_groups = C, and optionally updates
// running statistics with the batch average of the per-instance mean and unbiased variance
// (as torch: momentum-weighted). Without use_input_stats it normalizes with the running stats.
// Activations (x, y, dy, dx, epilogue tensors) may be float32, bfloat16 or float16, all of one
// dtype; weights, statistics and running statistics are float32. Scratch memory as GroupNorm's
// (normkit/group_norm.h), instance_norm_workspace_size bytes.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct InstanceNormParams {
  bool use_input_stats = true;
  double momentum = 0.1;
  double eps = 1e-5;
  // Fused into the forward's output pass: y = act(normalized + residual?), act none, relu or silu.
  ForwardEpilogue epilogue = {};
};

// Bytes of scratch memory the CPU kernels use for an input shaped like x (a function of the
// shape and format, not of the dtype): enough for instance_norm_forward (either
// use_input_stats, with running statistics) and instance_norm_backward, with any
// epilogue; 0 when x has no elements. Pass at least that much as Context::workspace (at any
// alignment: the size has room to align inside it) to have no allocation in those calls. Reads
// params and the dims, format and dtype of x, not its data (which must be non-null for a
// non-empty x, as in the forward). Throws normkit::Error on the forward's checks of
// x, eps and momentum (including a spatial size of 1 with use_input_stats).
std::size_t instance_norm_workspace_size(const InstanceNormParams& params, const TensorView& x);

// Reads x, weight, bias (length C, optional), running_mean/running_var (length C; optional with
// use_input_stats, required without). Overwrites y, mean and rstd (N*C each; with use_input_stats =
// false they receive the running stats broadcast per sample, so backward can treat them as
// constants). Updates running stats in place when given and use_input_stats. y = act(normalized(x)
// + residual?) (act none, relu or silu) with params.epilogue (residual: shape/format/dtype of x).
// Throws normkit::Error before writing anything (among the rest on a non-empty Context::workspace
// smaller than instance_norm_workspace_size(params, x)); spatial size 1 with use_input_stats throws
// "Expected more than 1 spatial element when training".
void instance_norm_forward(const InstanceNormParams& params, const TensorView& x,
                           std::span<const float> weight, std::span<const float> bias,
                           std::span<float> running_mean, std::span<float> running_var,
                           const TensorView& y, std::span<float> mean, std::span<float> rstd,
                           const Context& ctx = {});

// What instance_norm_backward reads besides its tensors: whether the forward normalized with
// the per-instance statistics, and the epilogue it fused (no eps or momentum: the saved rstd
// already holds eps, and the running statistics are not touched).
struct InstanceNormBackwardParams {
  // As the forward's: with it the gradient flows through the per-instance statistics
  // (group_norm_backward with G = C); without, they are constants.
  bool use_input_stats = true;
  // The forward's activation (epilogue.h): relu, g = dy * (epilogue.y > 0) (epilogue.y, the
  // forward's output, required then); silu, g = dy * silu'(z) with z recomputed from x, the
  // statistics, weight, and epilogue.bias and epilogue.residual: the forward's own bias and
  // residual, absent exactly when the forward had none (nothing can tell a missing one from an
  // absent one: pass what the forward got); none, g = dy. epilogue.dresidual, when given, receives
  // g.
  BackwardEpilogue epilogue = {};
};

// Backward of instance_norm_forward. Reads dy, x, mean, rstd (as written by the forward), weight
// (optional), params.epilogue.y (with relu), params.epilogue.residual and .bias (with silu).
// Overwrites dx, dweight and dbias (length C, optional; overwritten, not added to) and, when given,
// params.epilogue.dresidual with g. Throws normkit::Error before writing anything, on the forward's
// checks of x and the workspace (spatial size 1 with use_input_stats included), dy or dx unlike x,
// a vector of the wrong length, relu without epilogue.y, an epilogue.bias of the wrong length, an
// activation not in the enum, and an epilogue tensor unlike x.
void instance_norm_backward(const InstanceNormBackwardParams& params, const TensorView& dy,
                            const TensorView& x, std::span<const float> mean,
                            std::span<const float> rstd, std::span<const float> weight,
                            const TensorView& dx, std::span<float> dweight,
                            std::span<float> dbias, const Context& ctx = {});

}  // namespace normkit
