// Public LayerNorm entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/layer_norm.h"

#include <limits>
#include <string>

#include "common/dtype.h"
#include "common/validate.h"
#include "api/layer_norm_checks.h"
#include "cpu/layer_norm.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/layer_norm.h"

namespace normkit {
namespace {

namespace row_norm = detail::row_norm;
using detail::check_backward_epilogue;
using detail::check_forward_epilogue;
using detail::check_length;
using detail::check_tensor;
using detail::fail;

using row_norm::check_layer_input;
using row_norm::check_like_any_rank;
using row_norm::checked_bytes;
using row_norm::CpuCall;
using row_norm::plan_cpu_call;
using row_norm::ptr;

}  // namespace

std::size_t layer_norm_workspace_size(const LayerNormParams& params, const TensorView& x) {
  const char* fn = "layer_norm_workspace_size";
  const auto sh = check_layer_input(fn, params.normalized_ndim, x, {});
  detail::check_eps(fn, params.eps);
  return checked_bytes(fn, x, cpu::layer_norm_scratch(sh));
}

void layer_norm_forward(const LayerNormParams& params, const TensorView& x,
                        std::span<const float> weight, std::span<const float> bias,
                        const TensorView& y, std::span<float> mean, std::span<float> rstd,
                        const Context& ctx) {
  const char* fn = "layer_norm_forward";
  const auto sh = check_layer_input(fn, params.normalized_ndim, x, weight);
  detail::check_eps(fn, params.eps);
  check_length(fn, "bias", bias, sh.cols, "product of the normalized dims", false);
  check_like_any_rank(fn, "y", y, x, sh.rows * sh.cols);
  check_length(fn, "mean", mean, sh.rows, "product of the leading dims", true);
  check_length(fn, "rstd", rstd, sh.rows, "product of the leading dims", true);
  check_forward_epilogue(fn, params.epilogue, x);
  if (ctx.backend == Backend::reference) {
    if (sh.rows > 0)
      ref::layer_norm_forward(sh, params.eps, params.epilogue, x, ptr(weight), ptr(bias), y,
                              ptr(mean), ptr(rstd));
    return;
  }
  const CpuCall call = plan_cpu_call(fn, x, sh, ctx);
  if (sh.rows == 0) return;
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm_forward(call.plan, params.eps,
                            cpu::ForwardEpilogueOf<T>::from(params.epilogue), x.as<const T>(),
                            ptr(weight), ptr(bias), y.as<T>(), ptr(mean), ptr(rstd),
                            call.workspace);
  });
}

void layer_norm_backward(const LayerNormBackwardParams& params, const TensorView& dy,
                         const TensorView& x, std::span<const float> mean,
                         std::span<const float> rstd, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dweight, std::span<float> dbias,
                         const Context& ctx) {
  const char* fn = "layer_norm_backward";
  const BackwardEpilogue& epilogue = params.epilogue;
  const auto sh = check_layer_input(fn, params.normalized_ndim, x, weight);
  check_like_any_rank(fn, "dy", dy, x, sh.rows * sh.cols);
  check_like_any_rank(fn, "dx", dx, x, sh.rows * sh.cols);
  check_length(fn, "mean", mean, sh.rows, "product of the leading dims", true);
  check_length(fn, "rstd", rstd, sh.rows, "product of the leading dims", true);
  check_length(fn, "dweight", dweight, sh.cols, "product of the normalized dims", false);
  check_length(fn, "dbias", dbias, sh.cols, "product of the normalized dims", false);
  check_backward_epilogue(fn, epilogue, x, sh.cols, "product of the normalized dims");
  if (ctx.backend == Backend::reference) {
    ref::layer_norm_backward(sh, epilogue, dy, x, ptr(mean), ptr(rstd), ptr(weight), dx,
                             ptr(dweight), ptr(dbias));
    return;
  }
  const CpuCall call = plan_cpu_call(fn, x, sh, ctx);
  // Only relu reads the forward's y; only silu its residual and bias.
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm_backward(call.plan, cpu::BackwardEpilogueOf<T>::from(epilogue),
                             dy.as<const T>(), x.as<const T>(), ptr(mean), ptr(rstd), ptr(weight),
                             dx.as<T>(), ptr(dweight), ptr(dbias), call.workspace);
  });
}

}  // namespace normkit
