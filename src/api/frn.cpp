// Public FRN + TLU entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/frn.h"

#include <algorithm>
#include <limits>
#include <string>

#include "api/group_norm_dispatch.h"  // has_zero_dim
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/frn.h"
#include "ref/frn.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::check_like;
using detail::fail;

constexpr const char* kWorkspaceQuery = "frn_workspace_size(x)";

// Checks of x and the per-channel vectors shared by forward and backward; returns N * C.
int64_t check_frn_input(const char* fn, const TensorView& x, std::span<const float> weight,
                        std::span<const float> bias, std::span<const float> tau, bool vectors) {
  detail::check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  const int64_t channels = x.channels();
  if (vectors) {
    check_length(fn, "weight", weight, channels, "C", true);
    check_length(fn, "bias", bias, channels, "C", true);
    check_length(fn, "tau", tau, channels, "C", true);
  }
  int64_t instances = 0;
  if (__builtin_mul_overflow(x.batch(), channels, &instances))
    fail(fn, "N * C overflows int64: N = " + std::to_string(x.batch()) +
                 ", C = " + std::to_string(channels));
  return instances;
}

plan::GroupNormShape frn_shape(const TensorView& x) {
  return {x.batch(), x.channels(), x.spatial_size(), x.channels(), x.format};
}

std::size_t scratch_bytes(const TensorView& x) {
  return detail::has_zero_dim(x) ? 0 : cpu::frn_scratch_bytes(frn_shape(x));
}

}  // namespace

std::size_t frn_workspace_size(const TensorView& x) {
  check_frn_input("frn_workspace_size", x, {}, {}, {}, false);
  return scratch_bytes(x);
}

void frn_forward(double eps, const TensorView& x, std::span<const float> weight,
                 std::span<const float> bias, std::span<const float> tau, const TensorView& y,
                 std::span<float> rstd, const Context& ctx) {
  const char* fn = "frn_forward";
  const int64_t instances = check_frn_input(fn, x, weight, bias, tau, true);
  detail::check_eps(fn, eps);
  check_like(fn, "y", y, "x", x);
  check_length(fn, "rstd", rstd, instances, "N * C", true);
  detail::checked_workspace(fn, kWorkspaceQuery, scratch_bytes(x), ctx);
  if (x.batch() == 0 || x.channels() == 0) return;
  // No spatial position: nu2 of no values is NaN, as the mean of GroupNorm's empty groups.
  if (detail::has_zero_dim(x)) {
    std::fill(rstd.begin(), rstd.end(), std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const auto shape = frn_shape(x);
  if (ctx.backend == Backend::reference) {
    ref::frn_forward(shape, eps, x, weight.data(), bias.data(), tau.data(), y, rstd.data());
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::frn_forward(shape, eps, x.as<const T>(), weight.data(), bias.data(), tau.data(),
                     y.as<T>(), rstd.data(), detail::thread_count(ctx));
  });
}

void frn_backward(const TensorView& dy, const TensorView& x, std::span<const float> rstd,
                  std::span<const float> weight, std::span<const float> bias,
                  std::span<const float> tau, const TensorView& dx, std::span<float> dweight,
                  std::span<float> dbias, std::span<float> dtau, std::span<float> deps,
                  const Context& ctx) {
  const char* fn = "frn_backward";
  const int64_t instances = check_frn_input(fn, x, weight, bias, tau, true);
  check_like(fn, "dy", dy, "x", x);
  check_like(fn, "dx", dx, "x", x);
  check_length(fn, "rstd", rstd, instances, "N * C", true);
  check_length(fn, "dweight", dweight, x.channels(), "C", false);
  check_length(fn, "dbias", dbias, x.channels(), "C", false);
  check_length(fn, "dtau", dtau, x.channels(), "C", false);
  check_length(fn, "deps", deps, x.channels(), "C", false);
  const auto workspace = detail::checked_workspace(fn, kWorkspaceQuery, scratch_bytes(x), ctx);
  // No element: the parameter gradients are sums of nothing.
  if (detail::has_zero_dim(x)) {
    for (auto v : {dweight, dbias, dtau, deps}) std::fill(v.begin(), v.end(), 0.0f);
    return;
  }
  const auto shape = frn_shape(x);
  if (ctx.backend == Backend::reference) {
    ref::frn_backward(shape, dy, x, rstd.data(), weight.data(), bias.data(), tau.data(), dx,
                      dweight.data(), dbias.data(), dtau.data(), deps.data());
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::frn_backward(shape, dy.as<const T>(), x.as<const T>(), rstd.data(), weight.data(),
                      bias.data(), tau.data(), dx.as<T>(), dweight.data(), dbias.data(),
                      dtau.data(), deps.data(), detail::thread_count(ctx), workspace);
  });
}

void frn_backward(const TensorView& dy, const TensorView& x, std::span<const float> rstd,
                  std::span<const float> weight, std::span<const float> bias,
                  std::span<const float> tau, const TensorView& dx, std::span<float> dweight,
                  std::span<float> dbias, std::span<float> dtau, const Context& ctx) {
  frn_backward(dy, x, rstd, weight, bias, tau, dx, dweight, dbias, dtau, {}, ctx);
}

}  // namespace normkit
