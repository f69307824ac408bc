// Public Weight Standardization entry points: layer_norm over each output channel's values, no
// affine, on layer_norm's checks and kernels.
#include "normkit/weight_standardization.h"

#include <string>

#include "api/layer_norm_checks.h"
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/layer_norm.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/layer_norm.h"

namespace normkit {
namespace {

namespace row_norm = detail::row_norm;
using detail::check_length;
using detail::fail;
using row_norm::ptr;

constexpr const char* kWorkspaceQuery = "weight_standardization_workspace_size(w, eps)";

// One row per output channel. Without a weight the order of a row's values does not matter, so
// a channels_last w is rows in memory order as well (channels = 0).
plan::LayerNormShape check_weight(const char* fn, const TensorView& w, double eps) {
  detail::check_tensor(fn, "w", w, 2, detail::kActivationDTypes);
  detail::check_eps(fn, eps);
  plan::LayerNormShape sh;
  sh.rows = w.shape[0];
  sh.cols = row_norm::product(fn, w, 1, w.rank);
  return sh;
}

// `t` has w's shape, dtype and memory format, and memory when w has elements.
void check_like_w(const char* fn, const char* name, const TensorView& t, const TensorView& w,
                  int64_t count) {
  detail::check_like(fn, name, t, "w", w);
  if (count > 0 && t.data == nullptr)
    fail(fn, std::string(name) + " has a null data pointer for shape " + shape_string(t));
}

row_norm::CpuCall plan_cpu_call(const char* fn, const TensorView& w,
                                const plan::LayerNormShape& sh, const Context& ctx) {
  row_norm::CpuCall call;
  call.plan = cpu::plan_layer_norm(sh, int64_t(element_size(w.dtype)), detail::thread_count(ctx));
  call.workspace = detail::checked_workspace(fn, kWorkspaceQuery,
                                             row_norm::checked_bytes(fn, w, call.plan.scratch), ctx);
  return call;
}

}  // namespace

std::size_t weight_standardization_workspace_size(const TensorView& w, double eps) {
  const char* fn = "weight_standardization_workspace_size";
  return row_norm::checked_bytes(fn, w, cpu::layer_norm_scratch(check_weight(fn, w, eps)));
}

void weight_standardization_forward(const TensorView& w, double eps, const TensorView& w_hat,
                                    std::span<float> mean, std::span<float> rstd,
                                    const Context& ctx) {
  const char* fn = "weight_standardization_forward";
  const auto sh = check_weight(fn, w, eps);
  check_like_w(fn, "w_hat", w_hat, w, sh.rows * sh.cols);
  check_length(fn, "mean", mean, sh.rows, "C_out", true);
  check_length(fn, "rstd", rstd, sh.rows, "C_out", true);
  if (ctx.backend == Backend::reference) {
    if (sh.rows > 0)
      ref::layer_norm_forward(sh, eps, ForwardEpilogue{}, w, nullptr, nullptr, w_hat, ptr(mean),
                              ptr(rstd));
    return;
  }
  const row_norm::CpuCall call = plan_cpu_call(fn, w, sh, ctx);
  if (sh.rows == 0) return;
  visit_dtype(w.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm_forward(call.plan, eps, cpu::ForwardEpilogueOf<T>::from(ForwardEpilogue{}),
                            w.as<const T>(), nullptr, nullptr, w_hat.as<T>(), ptr(mean),
                            ptr(rstd), call.workspace);
  });
}

void weight_standardization_backward(const TensorView& dw_hat, const TensorView& w,
                                     std::span<const float> mean, std::span<const float> rstd,
                                     const TensorView& dw, const Context& ctx) {
  const char* fn = "weight_standardization_backward";
  const auto sh = check_weight(fn, w, 0.0);
  check_like_w(fn, "dw_hat", dw_hat, w, sh.rows * sh.cols);
  check_like_w(fn, "dw", dw, w, sh.rows * sh.cols);
  check_length(fn, "mean", mean, sh.rows, "C_out", true);
  check_length(fn, "rstd", rstd, sh.rows, "C_out", true);
  if (ctx.backend == Backend::reference) {
    ref::layer_norm_backward(sh, BackwardEpilogue{}, dw_hat, w, ptr(mean), ptr(rstd), nullptr,
                             dw, nullptr, nullptr);
    return;
  }
  const row_norm::CpuCall call = plan_cpu_call(fn, w, sh, ctx);
  visit_dtype(w.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm_backward(call.plan, cpu::BackwardEpilogueOf<T>::from(BackwardEpilogue{}),
                             dw_hat.as<const T>(), w.as<const T>(), ptr(mean), ptr(rstd), nullptr,
                             dw.as<T>(), nullptr, nullptr, call.workspace);
  });
}

}  // namespace normkit
