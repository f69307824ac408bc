#pragma once
// What the GroupNorm and InstanceNorm entry points share once their arguments are validated:
// both run the GroupNorm kernels (InstanceNorm with one channel per group), so the plan, the
// workspace size and the backend dispatch live here, once.
#include <cstddef>
#include <span>
#include <string>

#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/group_norm.h"
#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/tensor.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/group_norm.h"

namespace normkit::detail {

// Any zero dimension: no element to normalize. Decided from the dims alone, since the product
// of the others may not fit in int64 when one of them is 0.
inline bool has_zero_dim(const TensorView& x) {
  for (int i = 0; i < x.rank && i < kMaxRank; ++i)
    if (x.shape[i] == 0) return true;
  return false;
}

inline plan::GroupNormShape group_norm_shape(const TensorView& x, int64_t groups) {
  return {x.batch(), x.channels(), x.spatial_size(), groups, x.format};
}

// Bytes of CPU scratch the GroupNorm kernels need for x (validated) cut into `groups` groups: a
// function of the shape alone.
inline std::size_t group_norm_scratch_bytes(const TensorView& x, int64_t groups) {
  if (has_zero_dim(x)) return 0;
  return cpu::group_norm_scratch(group_norm_shape(x, groups)).bytes;
}

// The call's plan, made once: for x (validated) cut into `groups` groups, on ctx's threads.
// Its scratch.bytes is group_norm_scratch_bytes(x, groups). Without elements the kernels return
// before they read a schedule or scratch, and the plan has none.
inline cpu::GroupNormPlan group_norm_plan(const TensorView& x, int64_t groups, const Context& ctx,
                                          const cpu::GroupNormBackwardWork& backward = {}) {
  if (has_zero_dim(x)) {
    cpu::GroupNormPlan empty;
    empty.shape = group_norm_shape(x, groups);
    return empty;
  }
  return cpu::plan_group_norm(group_norm_shape(x, groups), int64_t(element_size(x.dtype)),
                              thread_count(ctx), backward);
}

// The forward on validated arguments with statistics from x, on ctx's backend: overwrites y,
// mean, rstd (N*G) and, when not null, variance (N*G, biased). Arguments in the public order:
// parameters (the plan first), inputs, outputs, then the context and its checked workspace.
inline void group_norm_forward_on(const cpu::GroupNormPlan& plan, double eps,
                                  const ForwardEpilogue& epilogue, const TensorView& x,
                                  std::span<const float> weight, std::span<const float> bias,
                                  const TensorView& y, std::span<float> mean,
                                  std::span<float> rstd, float* variance, const Context& ctx,
                                  std::span<std::byte> workspace) {
  if (ctx.backend == Backend::reference) {
    ref::group_norm_forward(plan.shape, eps, epilogue, x, weight.data(), bias.data(), y,
                            mean.data(), rstd.data(), variance);
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::group_norm_forward(plan, eps, cpu::ForwardEpilogueOf<T>::from(epilogue),
                            x.as<const T>(), weight.data(), bias.data(), y.as<T>(), mean.data(),
                            rstd.data(), variance, workspace);
  });
}

// What a backward with these arguments computes, for its plan (cpu::GroupNormBackwardWork::of,
// the rule the kernel applies too).
inline cpu::GroupNormBackwardWork backward_work(bool stats_are_constants,
                                                const BackwardEpilogue& epilogue,
                                                std::span<float> dweight, std::span<float> dbias) {
  return cpu::GroupNormBackwardWork::of(stats_are_constants, dweight.data() != nullptr,
                                        dbias.data() != nullptr,
                                        epilogue.dresidual.data != nullptr, epilogue.activation,
                                        epilogue.residual.data != nullptr);
}

// The backward on validated arguments (stats_are_constants: the gradient does not flow through
// mean and rstd) on ctx's backend: overwrites dx, dweight, dbias, epilogue.dresidual. `plan`
// was made with backward_work of these arguments.
inline void group_norm_backward_on(const cpu::GroupNormPlan& plan, bool stats_are_constants,
                                   const BackwardEpilogue& epilogue, const TensorView& dy,
                                   const TensorView& x, std::span<const float> mean,
                                   std::span<const float> rstd, std::span<const float> weight,
                                   const TensorView& dx, std::span<float> dweight,
                                   std::span<float> dbias, const Context& ctx,
                                   std::span<std::byte> workspace) {
  if (ctx.backend == Backend::reference) {
    ref::group_norm_backward(plan.shape, stats_are_constants, epilogue, dy, x, mean.data(),
                             rstd.data(), weight.data(), dx, dweight.data(), dbias.data());
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::group_norm_backward(plan, stats_are_constants,
                             cpu::BackwardEpilogueOf<T>::from(epilogue), dy.as<const T>(),
                             x.as<const T>(), mean.data(), rstd.data(), weight.data(), dx.as<T>(),
                             dweight.data(), dbias.data(), workspace);
  });
}

}  // namespace normkit::detail
