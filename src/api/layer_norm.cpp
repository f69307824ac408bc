// Public LayerNorm entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/layer_norm.h"

#include <limits>
#include <string>

#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/layer_norm.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/layer_norm.h"

namespace normkit {
namespace {

using detail::check_backward_epilogue;
using detail::check_forward_epilogue;
using detail::check_length;
using detail::check_tensor;
using detail::fail;

const float* ptr(std::span<const float> v) { return v.data(); }
float* ptr(std::span<float> v) { return v.data(); }

// Product of shape[begin, end), or a normkit::Error when it overflows int64.
int64_t product(const char* fn, const TensorView& x, int begin, int end) {
  int64_t p = 1;
  for (int i = begin; i < end; ++i)
    if (__builtin_mul_overflow(p, x.shape[i], &p))
      fail(fn, "x has more elements than int64 can count: shape " + shape_string(x));
  return p;
}

// `t` (an output or dy) has x's shape, dtype and, above rank 2, memory format; x may have rank 1
// here, where TensorView::numel does not count.
void check_like_any_rank(const char* fn, const char* name, const TensorView& t,
                         const TensorView& x, int64_t count) {
  detail::check_like(fn, name, t, "x", x);
  if (count > 0 && t.data == nullptr)
    fail(fn, std::string(name) + " has a null data pointer for shape " + shape_string(t));
}

// Checks of x, normalized_ndim and weight; returns the row layout.
plan::LayerNormShape check_layer_input(const char* fn, int normalized_ndim, const TensorView& x,
                                      std::span<const float> weight) {
  check_tensor(fn, "x", x, 1, detail::kActivationDTypes);
  const int k = normalized_ndim;
  if (k < 1 || k > x.rank)
    fail(fn, "normalized_ndim must be in [1, rank of x] = [1, " + std::to_string(x.rank) +
                 "], got " + std::to_string(k) + " (x shape " + shape_string(x) + ")");
  const bool channels_last = x.format == MemoryFormat::channels_last && x.rank > 2;
  if (channels_last && k != x.rank - 1)
    fail(fn, "channels_last x needs normalized_ndim = rank - 1 = " + std::to_string(x.rank - 1) +
                 " (one row per sample), got " + std::to_string(k) + " (x shape " +
                 shape_string(x) + ")");
  plan::LayerNormShape sh;
  sh.rows = product(fn, x, 0, x.rank - k);
  sh.cols = product(fn, x, x.rank - k, x.rank);
  sh.channels = channels_last ? x.shape[1] : 0;
  check_length(fn, "weight", weight, sh.cols, "product of the normalized dims", false);
  return sh;
}

// Bytes of the CPU kernels' scratch layout, or a normkit::Error when size_t cannot count them
// (so that such a shape fails here rather than in an allocation).
std::size_t checked_bytes(const char* fn, const TensorView& x, const cpu::LayerNormScratch& s) {
  if (s.bytes == std::numeric_limits<std::size_t>::max())
    fail(fn, "the workspace for x shape " + shape_string(x) + " has more bytes than size_t can count");
  return s.bytes;
}

// A CPU call: its plan, made once, and the caller's workspace checked against the plan's
// scratch before anything is written (empty when none was given).
struct CpuCall {
  cpu::LayerNormPlan plan;
  std::span<std::byte> workspace;
};
CpuCall plan_cpu_call(const char* fn, const TensorView& x, const plan::LayerNormShape& sh,
                      const Context& ctx) {
  CpuCall call;
  call.plan = cpu::plan_layer_norm(sh, int64_t(element_size(x.dtype)), detail::thread_count(ctx));
  call.workspace = detail::checked_workspace(fn, "layer_norm_workspace_size(params, x)",
                                             checked_bytes(fn, x, call.plan.scratch), ctx);
  return call;
}

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
