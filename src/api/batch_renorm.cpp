// Public Batch Renorm entry points: validate every argument, then run BatchNorm's kernels with
// the effective affine y = xhat * (weight * r) + (weight * d + bias) (batch_renorm.h).
#include "normkit/batch_renorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "api/batch_norm_checks.h"
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/batch_norm.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/batch_renorm.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::fail;
using detail::format_number;
using detail::is_empty;

const float* ptr(std::span<const float> v) { return v.data(); }
float* ptr(std::span<float> v) { return v.data(); }

void check_renorm_params(const char* fn, const BatchRenormParams& p) {
  // eps > 0: with eps = 0 a constant channel of the running variance 0 would divide by zero.
  if (!(std::isfinite(p.eps) && p.eps > 0))
    fail(fn, "eps must be finite and > 0, got " + format_number(p.eps));
  detail::check_momentum(fn, p.momentum);
  if (!(p.r_max >= 1)) fail(fn, "r_max must be >= 1, got " + format_number(p.r_max));
  if (!(p.d_max >= 0)) fail(fn, "d_max must be >= 0, got " + format_number(p.d_max));
}

void check_more_than_one_value(const char* fn, const TensorView& x) {
  int64_t count = x.batch();
  for (int i = 2; i < x.rank; ++i)
    if (__builtin_mul_overflow(count, x.shape[i], &count)) return;
  if (count == 1) detail::fail_one_value_per_channel(fn, "input size " + shape_string(x));
}

}  // namespace

void batch_renorm_forward_training(const BatchRenormParams& params, const TensorView& x,
                                   std::span<const float> weight, std::span<const float> bias,
                                   const TensorView& y, std::span<float> save_mean,
                                   std::span<float> save_invstd, std::span<float> save_r,
                                   std::span<float> save_d, std::span<float> running_mean,
                                   std::span<float> running_var, const Context& ctx) {
  const char* fn = "batch_renorm_forward_training";
  detail::check_batch_norm_input(fn, x, weight, bias);
  detail::check_like(fn, "y", y, "x", x);
  detail::check_forward_epilogue(fn, params.epilogue, x);
  const int64_t C = x.channels();
  check_length(fn, "save_mean", save_mean, C, "C", true);
  check_length(fn, "save_invstd", save_invstd, C, "C", true);
  check_length(fn, "save_r", save_r, C, "C", true);
  check_length(fn, "save_d", save_d, C, "C", true);
  detail::check_running_stats(fn, C, running_mean, running_var, true);
  check_renorm_params(fn, params);
  check_more_than_one_value(fn, x);
  const detail::Planned call = detail::plan_call(fn, x, ctx);
  if (is_empty(x)) return;

  const auto sh = detail::batch_norm_shape_of(x);
  if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_renorm_forward_training<A, float>(
          sh, params.eps, params.momentum, params.r_max, params.d_max,
          plan::ForwardEpilogueOf<A>::from(params.epilogue), x.as<const A>(), ptr(weight),
          ptr(bias), y.as<A>(), ptr(save_mean), ptr(save_invstd), ptr(save_r), ptr(save_d),
          ptr(running_mean), ptr(running_var));
    });
    return;
  }
  // r and d are measured against the running statistics before this batch updates them: park
  // those in save_r / save_d (outputs, written below) while BatchNorm's statistics update them.
  std::copy(running_var.begin(), running_var.end(), save_r.begin());
  std::copy(running_mean.begin(), running_mean.end(), save_d.begin());
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    cpu::batch_norm_statistics<A>(call.plan, params.eps, params.momentum, x.as<const A>(),
                                  ptr(save_mean), ptr(save_invstd), ptr(running_mean),
                                  ptr(running_var), call.workspace);
  });
  // The effective affine, C values each: a per-call allocation as small as the vectors given.
  std::vector<float> affine(2 * C);
  float* w_eff = affine.data();
  float* b_eff = w_eff + C;
  for (int64_t c = 0; c < C; ++c) {
    const double sigma_run = std::sqrt(double(save_r[c]) + params.eps);
    const double r = std::clamp(1.0 / (double(save_invstd[c]) * sigma_run), 1.0 / params.r_max,
                                params.r_max);
    const double d = std::clamp((double(save_mean[c]) - double(save_d[c])) / sigma_run,
                                -params.d_max, params.d_max);
    save_r[c] = float(r);
    save_d[c] = float(d);
    const double w = weight.empty() ? 1.0 : double(weight[c]);
    w_eff[c] = float(w * save_r[c]);
    b_eff[c] = float(w * save_d[c] + (bias.empty() ? 0.0 : double(bias[c])));
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    cpu::batch_norm_normalize<A>(call.plan, plan::ForwardEpilogueOf<A>::from(params.epilogue),
                                 x.as<const A>(), w_eff, b_eff, ptr(save_mean), ptr(save_invstd),
                                 y.as<A>(), call.workspace);
  });
}

void batch_renorm_backward_training(const BatchNormBackwardParams& params, const TensorView& dy,
                                    const TensorView& x, std::span<const float> save_mean,
                                    std::span<const float> save_invstd,
                                    std::span<const float> save_r, std::span<const float> save_d,
                                    std::span<const float> weight, const TensorView& dx,
                                    std::span<float> dweight, std::span<float> dbias,
                                    const Context& ctx) {
  const char* fn = "batch_renorm_backward_training";
  const BackwardEpilogue& epilogue = params.epilogue;
  detail::check_batch_norm_input(fn, x, weight, {});
  detail::check_like(fn, "dy", dy, "x", x);
  detail::check_like(fn, "dx", dx, "x", x);
  const int64_t C = x.channels();
  detail::check_backward_epilogue(fn, epilogue, x, C, "C");
  check_length(fn, "dweight", dweight, C, "C", false);
  check_length(fn, "dbias", dbias, C, "C", false);
  check_length(fn, "save_mean", save_mean, C, "C", true);
  check_length(fn, "save_invstd", save_invstd, C, "C", true);
  check_length(fn, "save_r", save_r, C, "C", true);
  check_length(fn, "save_d", save_d, C, "C", true);
  const detail::Planned call = detail::plan_call(fn, x, ctx);
  if (is_empty(x)) {
    std::fill(dweight.begin(), dweight.end(), 0.0f);
    std::fill(dbias.begin(), dbias.end(), 0.0f);
    return;
  }
  const auto sh = detail::batch_norm_shape_of(x);
  if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_renorm_backward_training<A, float>(
          sh, plan::BackwardEpilogueOf<A>::from(epilogue), dy.as<const A>(), x.as<const A>(),
          ptr(save_mean), ptr(save_invstd), ptr(save_r), ptr(save_d), ptr(weight), dx.as<A>(),
          ptr(dweight), ptr(dbias));
    });
    return;
  }
  // BatchNorm's backward with the effective affine: weight * r scales dx; silu's
  // pre-activation needs the effective bias weight * d + bias. Its dweight is sum g * xhat,
  // from which dweight = r * sum g * xhat + d * sum g.
  std::vector<float> scratch(4 * C);
  float* w_eff = scratch.data();
  float* b_eff = w_eff + C;
  float* sum_g_xhat = b_eff + C;
  float* sum_g = sum_g_xhat + C;
  for (int64_t c = 0; c < C; ++c) {
    const double w = weight.empty() ? 1.0 : double(weight[c]);
    w_eff[c] = float(w * save_r[c]);
    b_eff[c] = float(w * save_d[c] + (epilogue.bias.empty() ? 0.0 : double(epilogue.bias[c])));
  }
  const bool want_parameters = !dweight.empty() || !dbias.empty();
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    auto e = plan::BackwardEpilogueOf<A>::from(epilogue);
    if (e.silu()) e.bias = b_eff;
    cpu::batch_norm_backward_training<A>(
        call.plan, e, dy.as<const A>(), x.as<const A>(), ptr(save_mean), ptr(save_invstd), w_eff,
        dx.as<A>(), dweight.empty() ? nullptr : sum_g_xhat, want_parameters ? sum_g : nullptr,
        call.workspace);
  });
  for (int64_t c = 0; c < int64_t(dweight.size()); ++c)
    dweight[c] = float(double(save_r[c]) * sum_g_xhat[c] + double(save_d[c]) * sum_g[c]);
  for (int64_t c = 0; c < int64_t(dbias.size()); ++c) dbias[c] = sum_g[c];
}

}  // namespace normkit
