// Public GroupNorm entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/group_norm.h"

#include <algorithm>
#include <limits>
#include <string>

#include "api/group_norm_dispatch.h"
#include "common/validate.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::check_backward_epilogue;
using detail::check_forward_epilogue;
using detail::check_like;
using detail::check_tensor;
using detail::fail;

constexpr const char* kWorkspaceQuery = "group_norm_workspace_size(params, x)";

// Checks of x, num_groups and weight shared by forward and backward; returns N * G.
int64_t check_group_input(const char* fn, int64_t groups, const TensorView& x,
                          std::span<const float> weight) {
  check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  const int64_t channels = x.channels();
  detail::check_num_groups(fn, groups, channels, " (x shape " + shape_string(x) + ")");
  check_length(fn, "weight", weight, channels, "C", false);
  int64_t batch_groups = 0;
  if (__builtin_mul_overflow(x.batch(), groups, &batch_groups))
    fail(fn, "N * num_groups overflows int64: N = " + std::to_string(x.batch()) +
                 ", num_groups = " + std::to_string(groups));
  return batch_groups;
}

}  // namespace

std::size_t group_norm_workspace_size(const GroupNormParams& params, const TensorView& x) {
  const char* fn = "group_norm_workspace_size";
  check_group_input(fn, params.num_groups, x, {});
  detail::check_eps(fn, params.eps);
  return detail::group_norm_scratch_bytes(x, params.num_groups);
}

void group_norm_forward(const GroupNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx) {
  const char* fn = "group_norm_forward";
  const int64_t batch_groups = check_group_input(fn, params.num_groups, x, weight);
  detail::check_eps(fn, params.eps);
  check_length(fn, "bias", bias, x.channels(), "C", false);
  check_like(fn, "y", y, "x", x);
  check_length(fn, "mean", mean, batch_groups, "N * num_groups", true);
  check_length(fn, "rstd", rstd, batch_groups, "N * num_groups", true);
  check_forward_epilogue(fn, params.epilogue, x);
  const auto plan = detail::group_norm_plan(x, params.num_groups, ctx);
  const auto workspace = detail::checked_workspace(fn, kWorkspaceQuery, plan.scratch.bytes, ctx);
  if (x.batch() == 0) return;
  // Every group empty (a zero channel or spatial dim): the statistics of no values are mean 0
  // and rstd NaN, as torch gives, and y has no elements. Written here: the kernels would walk
  // every channel of a C that may be far larger than any buffer to find that out.
  if (detail::has_zero_dim(x)) {
    std::fill(mean.begin(), mean.end(), 0.0f);
    std::fill(rstd.begin(), rstd.end(), std::numeric_limits<float>::quiet_NaN());
    return;
  }

  detail::group_norm_forward_on(plan, params.eps, params.epilogue, x, weight, bias, y, mean, rstd,
                                nullptr, ctx, workspace);
}

void group_norm_backward(const GroupNormBackwardParams& params, const TensorView& dy,
                         const TensorView& x, std::span<const float> mean,
                         std::span<const float> rstd, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx) {
  const char* fn = "group_norm_backward";
  const BackwardEpilogue& epilogue = params.epilogue;
  const int64_t batch_groups = check_group_input(fn, params.num_groups, x, weight);
  check_like(fn, "dy", dy, "x", x);
  check_like(fn, "dx", dx, "x", x);
  check_length(fn, "mean", mean, batch_groups, "N * num_groups", true);
  check_length(fn, "rstd", rstd, batch_groups, "N * num_groups", true);
  check_length(fn, "dweight", dweight, x.channels(), "C", false);
  check_length(fn, "dbias", dbias, x.channels(), "C", false);
  check_backward_epilogue(fn, epilogue, x, x.channels(), "C");
  const auto plan = detail::group_norm_plan(
      x, params.num_groups, ctx, detail::backward_work(false, epilogue, dweight, dbias));
  const auto workspace = detail::checked_workspace(fn, kWorkspaceQuery, plan.scratch.bytes, ctx);

  detail::group_norm_backward_on(plan, false, epilogue, dy, x, mean, rstd, weight, dx, dweight,
                                 dbias, ctx, workspace);
}

}  // namespace normkit
