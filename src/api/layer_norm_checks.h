#pragma once
// The checks and the CPU call plan that layer_norm and rms_norm share: the same rows of columns,
// the same layouts, the same kernels (cpu/layer_norm.h).
#include <cstdint>
#include <limits>
#include <span>
#include <string>

#include "common/validate.h"
#include "cpu/layer_norm.h"
#include "plan/shapes.h"

namespace normkit::detail::row_norm {

using detail::check_length;
using detail::check_tensor;
using detail::fail;

inline const float* ptr(std::span<const float> v) { return v.data(); }
inline float* ptr(std::span<float> v) { return v.data(); }

// Product of shape[begin, end), or a normkit::Error when it overflows int64.
inline int64_t product(const char* fn, const TensorView& x, int begin, int end) {
  int64_t p = 1;
  for (int i = begin; i < end; ++i)
    if (__builtin_mul_overflow(p, x.shape[i], &p))
      fail(fn, "x has more elements than int64 can count: shape " + shape_string(x));
  return p;
}

// `t` (an output or dy) has x's shape, dtype and, above rank 2, memory format; x may have rank 1
// here, where TensorView::numel does not count.
inline void check_like_any_rank(const char* fn, const char* name, const TensorView& t,
                                const TensorView& x, int64_t count) {
  detail::check_like(fn, name, t, "x", x);
  if (count > 0 && t.data == nullptr)
    fail(fn, std::string(name) + " has a null data pointer for shape " + shape_string(t));
}

// Checks of x, normalized_ndim and weight; returns the row layout.
inline plan::LayerNormShape check_layer_input(const char* fn, int normalized_ndim, const TensorView& x,
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
inline std::size_t checked_bytes(const char* fn, const TensorView& x,
                                 const cpu::LayerNormScratch& s) {
  if (s.bytes == std::numeric_limits<std::size_t>::max())
    fail(fn, "the workspace for x shape " + shape_string(x) +
                 " has more bytes than size_t can count");
  return s.bytes;
}

// A CPU call: its plan, made once, and the caller's workspace checked against the plan's
// scratch before anything is written (empty when none was given).
struct CpuCall {
  cpu::LayerNormPlan plan;
  std::span<std::byte> workspace;
};
inline CpuCall plan_cpu_call(const char* fn, const TensorView& x, const plan::LayerNormShape& sh,
                      const Context& ctx) {
  CpuCall call;
  call.plan = cpu::plan_layer_norm(sh, int64_t(element_size(x.dtype)), detail::thread_count(ctx));
  call.workspace = detail::checked_workspace(fn, "layer_norm_workspace_size(params, x)",
                                             checked_bytes(fn, x, call.plan.scratch), ctx);
  return call;
}

}  // namespace normkit::detail::row_norm
