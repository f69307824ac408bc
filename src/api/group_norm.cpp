// Public GroupNorm entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/group_norm.h"

#include <string>

#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/group_norm.h"
#include "ref/group_norm.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::check_backward_epilogue;
using detail::check_forward_epilogue;
using detail::check_like;
using detail::check_tensor;
using detail::fail;

const float* ptr(std::span<const float> v) { return v.data(); }
float* ptr(std::span<float> v) { return v.data(); }

// Checks of x, num_groups, weight and eps shared by forward and backward; returns N * G.
int64_t check_group_input(const char* fn, const GroupNormParams& params, const TensorView& x,
                          std::span<const float> weight) {
  check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  const int64_t groups = params.num_groups, channels = x.channels();
  if (groups <= 0) fail(fn, "num_groups must be > 0, got " + std::to_string(groups));
  if (channels % groups != 0)
    fail(fn, "num_groups = " + std::to_string(groups) + " must divide the number of channels C = " +
                 std::to_string(channels) + " (x shape " + shape_string(x) + ")");
  check_length(fn, "weight", weight, channels, "C", false);
  detail::check_eps(fn, params.eps);
  int64_t batch_groups = 0;
  if (__builtin_mul_overflow(x.batch(), groups, &batch_groups))
    fail(fn, "N * num_groups overflows int64: N = " + std::to_string(x.batch()) +
                 ", num_groups = " + std::to_string(groups));
  return batch_groups;
}

ref::GroupNormShape shape_of(const TensorView& x, int64_t groups) {
  return {x.batch(), x.channels(), x.spatial_size(), groups, x.format};
}

}  // namespace

void group_norm_forward(const GroupNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx) {
  const char* fn = "group_norm_forward";
  const int64_t batch_groups = check_group_input(fn, params, x, weight);
  check_length(fn, "bias", bias, x.channels(), "C", false);
  check_like(fn, "y", y, "x", x);
  check_length(fn, "mean", mean, batch_groups, "N * num_groups", true);
  check_length(fn, "rstd", rstd, batch_groups, "N * num_groups", true);
  check_forward_epilogue(fn, params.epilogue, x);
  if (x.batch() == 0) return;

  const auto sh = shape_of(x, params.num_groups);
  if (ctx.backend == Backend::reference) {
    ref::group_norm_forward(y, ptr(mean), ptr(rstd), x, ptr(weight), ptr(bias), sh, params.eps,
                            params.epilogue);
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::group_norm_forward(y.as<T>(), ptr(mean), ptr(rstd), x.as<const T>(), ptr(weight),
                            ptr(bias), sh, params.eps, detail::thread_count(ctx), nullptr,
                            cpu::GroupNormForwardEpilogue<T>{params.epilogue.residual.as<const T>(),
                                                             params.epilogue.relu});
  });
}

void group_norm_backward(const GroupNormParams& params, const TensorView& dy, const TensorView& x,
                         std::span<const float> mean, std::span<const float> rstd,
                         std::span<const float> weight, const TensorView& dx,
                         std::span<float> dweight, std::span<float> dbias, const Context& ctx) {
  group_norm_backward(params, BackwardEpilogue{}, dy, x, mean, rstd, weight, dx, dweight, dbias,
                      ctx);
}

void group_norm_backward(const GroupNormParams& params, const BackwardEpilogue& epilogue,
                         const TensorView& dy, const TensorView& x, std::span<const float> mean,
                         std::span<const float> rstd, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx) {
  const char* fn = "group_norm_backward";
  const int64_t batch_groups = check_group_input(fn, params, x, weight);
  check_like(fn, "dy", dy, "x", x);
  check_like(fn, "dx", dx, "x", x);
  check_length(fn, "mean", mean, batch_groups, "N * num_groups", true);
  check_length(fn, "rstd", rstd, batch_groups, "N * num_groups", true);
  check_length(fn, "dweight", dweight, x.channels(), "C", false);
  check_length(fn, "dbias", dbias, x.channels(), "C", false);
  check_backward_epilogue(fn, epilogue, x);

  const auto sh = shape_of(x, params.num_groups);
  if (ctx.backend == Backend::reference) {
    ref::group_norm_backward(dx, ptr(dweight), ptr(dbias), dy, x, ptr(mean), ptr(rstd), ptr(weight),
                             sh, false, epilogue);
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::group_norm_backward(dx.as<T>(), ptr(dweight), ptr(dbias), dy.as<const T>(),
                             x.as<const T>(), ptr(mean), ptr(rstd), ptr(weight), sh, false,
                             detail::thread_count(ctx),
                             cpu::GroupNormBackwardEpilogue<T>{epilogue.relu, epilogue.y.as<const T>(),
                                                               epilogue.dresidual.as<T>()});
  });
}

}  // namespace normkit
