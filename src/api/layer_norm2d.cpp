// Public LayerNorm2d entry points: validate every argument, then run layer_norm's kernels on
// channels_last x (its rows of C values are layer_norm rows) or the channels-first kernel.
#include "normkit/layer_norm2d.h"

#include <string>

#include "api/layer_norm_checks.h"
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/layer_norm.h"
#include "cpu/layer_norm2d.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/layer_norm.h"
#include "ref/layer_norm2d.h"

namespace normkit {
namespace {

namespace row_norm = detail::row_norm;
using detail::check_length;
using row_norm::check_like_any_rank;
using row_norm::ptr;

constexpr const char* kWorkspaceQuery = "layer_norm2d_workspace_size(x, eps)";

struct Problem {
  ref::LayerNorm2dShape shape;
  bool channels_last = false;
  int64_t count = 0, positions = 0;
  // channels_last: one layer_norm row of C per position, stored in logical order.
  plan::LayerNormShape rows() const { return {positions, shape.channels, 0}; }
};

Problem check_input(const char* fn, const TensorView& x, double eps) {
  detail::check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  detail::check_eps(fn, eps);
  Problem p;
  p.shape = {x.shape[0], x.shape[1], row_norm::product(fn, x, 2, x.rank)};
  p.channels_last = x.format == MemoryFormat::channels_last && x.rank > 2;
  p.count = row_norm::product(fn, x, 0, x.rank);
  // N * spatial can overflow where count (with C == 0) does not.
  TensorView positions = x;
  positions.shape[1] = 1;
  p.positions = row_norm::product(fn, positions, 0, x.rank);
  return p;
}

std::size_t cpu_bytes(const char* fn, const TensorView& x, const Problem& p) {
  return p.channels_last ? row_norm::checked_bytes(fn, x, cpu::layer_norm_scratch(p.rows())) : 0;
}

// channels_last on the CPU: layer_norm's plan over the rows, the workspace checked against it.
row_norm::CpuCall plan_rows(const char* fn, const TensorView& x, const Problem& p,
                            const Context& ctx) {
  row_norm::CpuCall call;
  call.plan = cpu::plan_layer_norm(p.rows(), int64_t(element_size(x.dtype)),
                                   detail::thread_count(ctx));
  call.workspace = detail::checked_workspace(fn, kWorkspaceQuery, cpu_bytes(fn, x, p), ctx);
  return call;
}

}  // namespace

std::size_t layer_norm2d_workspace_size(const TensorView& x, double eps) {
  const char* fn = "layer_norm2d_workspace_size";
  return cpu_bytes(fn, x, check_input(fn, x, eps));
}

void layer_norm2d_forward(const TensorView& x, double eps, std::span<const float> weight,
                          std::span<const float> bias, const TensorView& y,
                          std::span<float> mean, std::span<float> rstd, const Context& ctx) {
  const char* fn = "layer_norm2d_forward";
  const Problem p = check_input(fn, x, eps);
  check_length(fn, "weight", weight, p.shape.channels, "C", false);
  check_length(fn, "bias", bias, p.shape.channels, "C", false);
  check_like_any_rank(fn, "y", y, x, p.count);
  check_length(fn, "mean", mean, p.positions, "N * spatial", true);
  check_length(fn, "rstd", rstd, p.positions, "N * spatial", true);
  if (ctx.backend == Backend::reference) {
    if (p.positions == 0) return;
    if (p.channels_last)
      ref::layer_norm_forward(p.rows(), eps, ForwardEpilogue{}, x, ptr(weight), ptr(bias), y,
                              ptr(mean), ptr(rstd));
    else
      ref::layer_norm2d_forward(p.shape, eps, x, ptr(weight), ptr(bias), y, ptr(mean), ptr(rstd));
    return;
  }
  if (p.channels_last) {
    const row_norm::CpuCall call = plan_rows(fn, x, p, ctx);
    if (p.positions == 0) return;
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      cpu::layer_norm_forward(call.plan, eps, cpu::ForwardEpilogueOf<T>::from(ForwardEpilogue{}),
                              x.as<const T>(), ptr(weight), ptr(bias), y.as<T>(), ptr(mean),
                              ptr(rstd), call.workspace);
    });
    return;
  }
  detail::checked_workspace(fn, kWorkspaceQuery, 0, ctx);
  if (p.positions == 0) return;
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm2d_forward(p.shape, detail::thread_count(ctx), eps, x.as<const T>(),
                              ptr(weight), ptr(bias), y.as<T>(), ptr(mean), ptr(rstd));
  });
}

void layer_norm2d_backward(const TensorView& dy, const TensorView& x, std::span<const float> mean,
                           std::span<const float> rstd, std::span<const float> weight,
                           const TensorView& dx, std::span<float> dweight,
                           std::span<float> dbias, const Context& ctx) {
  const char* fn = "layer_norm2d_backward";
  const Problem p = check_input(fn, x, 0.0);
  check_like_any_rank(fn, "dy", dy, x, p.count);
  check_like_any_rank(fn, "dx", dx, x, p.count);
  check_length(fn, "mean", mean, p.positions, "N * spatial", true);
  check_length(fn, "rstd", rstd, p.positions, "N * spatial", true);
  check_length(fn, "weight", weight, p.shape.channels, "C", false);
  check_length(fn, "dweight", dweight, p.shape.channels, "C", false);
  check_length(fn, "dbias", dbias, p.shape.channels, "C", false);
  if (ctx.backend == Backend::reference) {
    if (p.channels_last)
      ref::layer_norm_backward(p.rows(), BackwardEpilogue{}, dy, x, ptr(mean), ptr(rstd),
                               ptr(weight), dx, ptr(dweight), ptr(dbias));
    else
      ref::layer_norm2d_backward(p.shape, dy, x, ptr(mean), ptr(rstd), ptr(weight), dx,
                                 ptr(dweight), ptr(dbias));
    return;
  }
  if (p.channels_last) {
    const row_norm::CpuCall call = plan_rows(fn, x, p, ctx);
    visit_dtype(x.dtype, [&](auto tag) {
      using T = decltype(tag);
      cpu::layer_norm_backward(call.plan, cpu::BackwardEpilogueOf<T>::from(BackwardEpilogue{}),
                               dy.as<const T>(), x.as<const T>(), ptr(mean), ptr(rstd),
                               ptr(weight), dx.as<T>(), ptr(dweight), ptr(dbias), call.workspace);
    });
    return;
  }
  detail::checked_workspace(fn, kWorkspaceQuery, 0, ctx);
  visit_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cpu::layer_norm2d_backward(p.shape, detail::thread_count(ctx), dy.as<const T>(),
                               x.as<const T>(), ptr(mean), ptr(rstd), ptr(weight), dx.as<T>(),
                               ptr(dweight), ptr(dbias));
  });
}

}  // namespace normkit
