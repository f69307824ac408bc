// Public RMSNorm entry points: validate every argument, then hand raw pointers to the backend.
// The checks of x, weight and the workspace, and the CPU kernels, are layer_norm's.
#include "normkit/rms_norm.h"

#include <string>

#include "api/layer_norm_checks.h"
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/layer_norm.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/rms_norm.h"

namespace normkit {
namespace {

namespace row_norm = detail::row_norm;
using detail::check_length;
using detail::fail;
using row_norm::check_layer_input;
using row_norm::check_like_any_rank;
using row_norm::ptr;

// residual_in and sum_out come together (h must go somewhere, and comes from somewhere).
void check_residual_add(const char* fn, const RmsNormParams& p, const TensorView& x,
                        int64_t count) {
  const bool in = p.residual_in.data != nullptr, out = p.sum_out.data != nullptr;
  if (in != out)
    fail(fn, in ? "residual_in is given without sum_out (h = x + residual_in must be written)"
                : "sum_out is given without residual_in (it receives x + residual_in)");
  if (!in) return;
  check_like_any_rank(fn, "residual_in", p.residual_in, x, count);
  check_like_any_rank(fn, "sum_out", p.sum_out, x, count);
}

}  // namespace

std::size_t rms_norm_workspace_size(const RmsNormParams& params, const TensorView& x) {
  const char* fn = "rms_norm_workspace_size";
  const auto sh = check_layer_input(fn, params.normalized_ndim, x, {});
  detail::check_eps(fn, params.eps);
  return row_norm::checked_bytes(fn, x, cpu::layer_norm_scratch(sh));
}

void rms_norm_forward(const RmsNormParams& params, const TensorView& x,
                      std::span<const float> weight, const TensorView& y, std::span<float> rstd,
                      const Context& ctx) {
  const char* fn = "rms_norm_forward";
  const auto sh = check_layer_input(fn, params.normalized_ndim, x, weight);
  detail::check_eps(fn, params.eps);
  check_like_any_rank(fn, "y", y, x, sh.rows * sh.cols);
  check_length(fn, "rstd", rstd, sh.rows, "product of the leading dims", true);
  detail::check_forward_epilogue(fn, params.epilogue, x);
  check_residual_add(fn, params, x, sh.rows * sh.cols);
  if (ctx.backend == Backend::reference) {
    if (sh.rows > 0)
      ref::rms_norm_forward(sh, params.eps, params.epilogue, x, ptr(weight), params.residual_in,
                            y, ptr(rstd), params.sum_out);
    return;
  }
  const row_norm::CpuCall call = row_norm::plan_cpu_call(fn, x, sh, ctx);
  if (sh.rows == 0) return;
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::rms_norm_forward(call.plan, params.eps, cpu::ForwardEpilogueOf<T>::from(params.epilogue),
                          x.as<const T>(), ptr(weight), params.residual_in.as<const T>(),
                          y.as<T>(), ptr(rstd), params.sum_out.as<T>(), call.workspace);
  });
}

void rms_norm_backward(const RmsNormBackwardParams& params, const TensorView& dy,
                       const TensorView& x, std::span<const float> rstd,
                       std::span<const float> weight, const TensorView& dx,
                       std::span<float> dweight, const Context& ctx) {
  const char* fn = "rms_norm_backward";
  const BackwardEpilogue& epilogue = params.epilogue;
  const auto sh = check_layer_input(fn, params.normalized_ndim, x, weight);
  check_like_any_rank(fn, "dy", dy, x, sh.rows * sh.cols);
  check_like_any_rank(fn, "dx", dx, x, sh.rows * sh.cols);
  if (params.dsum_out.data) check_like_any_rank(fn, "dsum_out", params.dsum_out, x, sh.rows * sh.cols);
  check_length(fn, "rstd", rstd, sh.rows, "product of the leading dims", true);
  check_length(fn, "dweight", dweight, sh.cols, "product of the normalized dims", false);
  if (!epilogue.bias.empty())
    fail(fn, "epilogue.bias must be empty: rms_norm has no bias (got " +
                 std::to_string(epilogue.bias.size()) + " values)");
  detail::check_backward_epilogue(fn, epilogue, x, 0, "0 (rms_norm has no bias)");
  if (ctx.backend == Backend::reference) {
    ref::rms_norm_backward(sh, epilogue, dy, x, ptr(rstd), ptr(weight), params.dsum_out, dx,
                           ptr(dweight));
    return;
  }
  const row_norm::CpuCall call = row_norm::plan_cpu_call(fn, x, sh, ctx);
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::rms_norm_backward(call.plan, cpu::BackwardEpilogueOf<T>::from(epilogue),
                           dy.as<const T>(), x.as<const T>(), ptr(rstd), ptr(weight),
                           params.dsum_out.as<const T>(), dx.as<T>(), ptr(dweight),
                           call.workspace);
  });
}

}  // namespace normkit
