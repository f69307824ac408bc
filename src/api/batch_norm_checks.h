#pragma once
// The argument checks and the call plan BatchNorm's public functions share (api/batch_norm.cpp and
// api/batch_norm_steps.cpp): one wording for one condition.
#include <cstdint>
#include <span>
#include <string>

#include "normkit/context.h"

#include "common/validate.h"
#include "cpu/batch_norm.h"
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::detail {

inline plan::BatchNormShape batch_norm_shape_of(const TensorView& x) {
  return {x.batch(), x.channels(), x.spatial_size(), x.format};
}

// Any zero dimension: nothing to normalize. Decided from the dims alone, since the products of
// the others may not fit in int64 when one dim is 0.
inline bool is_empty(const TensorView& x) {
  for (int i = 0; i < x.rank; ++i)
    if (x.shape[i] == 0) return true;
  return false;
}

// x and the per-channel affine weight (and bias).
inline void check_batch_norm_input(const char* fn, const TensorView& x,
                                   std::span<const float> weight, std::span<const float> bias) {
  check_tensor(fn, "x", x, 2, kActivationDTypes);
  check_length(fn, "weight", weight, x.channels(), "C", false);
  check_length(fn, "bias", bias, x.channels(), "C", false);
}

inline void check_running_stats(const char* fn, int64_t channels,
                                std::span<const float> running_mean,
                                std::span<const float> running_var, bool required) {
  check_length(fn, "running_mean", running_mean, channels, "C", required);
  check_length(fn, "running_var", running_var, channels, "C", required);
  if ((running_mean.data() == nullptr) != (running_var.data() == nullptr))
    fail(fn, std::string("running_mean and running_var must be given together, got only ") +
                 (running_mean.data() ? "running_mean" : "running_var"));
}

// torch's wording, so that users recognize it; `what` describes the batch.
inline void fail_one_value_per_channel(const char* fn, const std::string& what) {
  fail(fn, "Expected more than 1 value per channel when training, got " + what);
}

// The BatchNorm steps (and the sync calls built on them) fuse none or relu: silu's backward
// needs z, which the gradient steps do not rebuild yet, so its forward is refused too rather
// than offered without a backward.
inline void check_steps_activation(const char* fn, Activation activation) {
  if (activation == Activation::silu)
    fail(fn, "epilogue.activation silu is not supported by the BatchNorm steps (none or relu)");
}

// The plan of a call (cpu/batch_norm.h), built once, and the caller's workspace checked
// against it.
struct Planned {
  cpu::BatchNormPlan plan;
  std::span<std::byte> workspace;
};
inline Planned plan_call(const char* fn, const TensorView& x, const Context& ctx) {
  Planned p;
  if (!is_empty(x))
    p.plan = cpu::plan_batch_norm(batch_norm_shape_of(x), int64_t(element_size(x.dtype)),
                                  thread_count(ctx));
  p.workspace = checked_workspace(fn, "batch_norm_workspace_size(x)", p.plan.scratch.bytes, ctx);
  return p;
}

}  // namespace normkit::detail
