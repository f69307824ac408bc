// Public EvoNorm-S0 entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/evonorm.h"

#include <algorithm>
#include <limits>
#include <string>

#include "api/group_norm_dispatch.h"
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/evonorm.h"
#include "ref/evonorm.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::check_like;
using detail::fail;

constexpr const char* kWorkspaceQuery = "evonorm_s0_workspace_size(params, x)";

// Checks of x, num_groups, v and weight shared by forward and backward; returns N * G.
int64_t check_evonorm_input(const char* fn, int64_t groups, const TensorView& x,
                            std::span<const float> v, std::span<const float> weight,
                            bool vectors) {
  detail::check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  const int64_t channels = x.channels();
  detail::check_num_groups(fn, groups, channels, " (x shape " + shape_string(x) + ")");
  if (vectors) {
    check_length(fn, "v", v, channels, "C", true);
    check_length(fn, "weight", weight, channels, "C", true);
  }
  int64_t batch_groups = 0;
  if (__builtin_mul_overflow(x.batch(), groups, &batch_groups))
    fail(fn, "N * num_groups overflows int64: N = " + std::to_string(x.batch()) +
                 ", num_groups = " + std::to_string(groups));
  return batch_groups;
}

std::size_t scratch_bytes(const TensorView& x, int64_t groups) {
  if (detail::has_zero_dim(x)) return 0;
  return cpu::evonorm_s0_scratch_bytes(detail::group_norm_shape(x, groups));
}

}  // namespace

std::size_t evonorm_s0_workspace_size(const EvoNormS0Params& params, const TensorView& x) {
  const char* fn = "evonorm_s0_workspace_size";
  check_evonorm_input(fn, params.num_groups, x, {}, {}, false);
  detail::check_eps(fn, params.eps);
  return scratch_bytes(x, params.num_groups);
}

void evonorm_s0_forward(const EvoNormS0Params& params, const TensorView& x,
                        std::span<const float> v, std::span<const float> weight,
                        std::span<const float> bias, const TensorView& y, std::span<float> mean,
                        std::span<float> rstd, const Context& ctx) {
  const char* fn = "evonorm_s0_forward";
  const int64_t batch_groups = check_evonorm_input(fn, params.num_groups, x, v, weight, true);
  check_length(fn, "bias", bias, x.channels(), "C", true);
  detail::check_eps(fn, params.eps);
  check_like(fn, "y", y, "x", x);
  check_length(fn, "mean", mean, batch_groups, "N * num_groups", true);
  check_length(fn, "rstd", rstd, batch_groups, "N * num_groups", true);
  const auto workspace = detail::checked_workspace(fn, kWorkspaceQuery,
                                                   scratch_bytes(x, params.num_groups), ctx);
  if (x.batch() == 0) return;
  // Every group empty: GroupNorm's statistics of no values, mean 0 and rstd NaN; y is empty.
  if (detail::has_zero_dim(x)) {
    std::fill(mean.begin(), mean.end(), 0.0f);
    std::fill(rstd.begin(), rstd.end(), std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const auto plan = detail::group_norm_plan(x, params.num_groups, ctx);
  if (ctx.backend == Backend::reference) {
    ref::evonorm_s0_forward(plan.shape, params.eps, x, v.data(), weight.data(), bias.data(), y,
                            mean.data(), rstd.data());
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::evonorm_s0_forward(plan, params.eps, x.as<const T>(), v.data(), weight.data(),
                            bias.data(), y.as<T>(), mean.data(), rstd.data(), workspace);
  });
}

void evonorm_s0_backward(int64_t num_groups, const TensorView& dy, const TensorView& x,
                         std::span<const float> mean, std::span<const float> rstd,
                         std::span<const float> v, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dv, std::span<float> dweight,
                         std::span<float> dbias, const Context& ctx) {
  const char* fn = "evonorm_s0_backward";
  const int64_t batch_groups = check_evonorm_input(fn, num_groups, x, v, weight, true);
  check_like(fn, "dy", dy, "x", x);
  check_like(fn, "dx", dx, "x", x);
  check_length(fn, "mean", mean, batch_groups, "N * num_groups", true);
  check_length(fn, "rstd", rstd, batch_groups, "N * num_groups", true);
  check_length(fn, "dv", dv, x.channels(), "C", false);
  check_length(fn, "dweight", dweight, x.channels(), "C", false);
  check_length(fn, "dbias", dbias, x.channels(), "C", false);
  const auto workspace =
      detail::checked_workspace(fn, kWorkspaceQuery, scratch_bytes(x, num_groups), ctx);
  // No element: the parameter gradients are sums of nothing.
  if (detail::has_zero_dim(x)) {
    for (auto g : {dv, dweight, dbias}) std::fill(g.begin(), g.end(), 0.0f);
    return;
  }
  const auto plan = detail::group_norm_plan(x, num_groups, ctx);
  if (ctx.backend == Backend::reference) {
    ref::evonorm_s0_backward(plan.shape, dy, x, mean.data(), rstd.data(), v.data(),
                             weight.data(), dx, dv.data(), dweight.data(), dbias.data());
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::evonorm_s0_backward(plan, dy.as<const T>(), x.as<const T>(), mean.data(), rstd.data(),
                             v.data(), weight.data(), dx.as<T>(), dv.data(), dweight.data(),
                             dbias.data(), workspace);
  });
}

}  // namespace normkit
