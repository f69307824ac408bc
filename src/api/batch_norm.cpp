// Public BatchNorm entry points: validate every argument, then hand raw pointers to the backend.
#include "normkit/batch_norm.h"

#include "common/dtype.h"
#include "api/batch_norm_checks.h"
#include "common/validate.h"
#include "cpu/batch_norm.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"
#include "ref/batch_norm.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::check_backward_epilogue;
using detail::check_forward_epilogue;
using detail::check_like;
using detail::check_tensor;
using detail::is_empty;

plan::BatchNormShape shape_of(const TensorView& x) { return detail::batch_norm_shape_of(x); }

// The absent-vector convention: an empty span with a null pointer becomes a null pointer.
const float* ptr(std::span<const float> v) { return v.data(); }
float* ptr(std::span<float> v) { return v.data(); }

// torch's check, on N * spatial computed without overflow (an overflowing product is not 1).
void check_more_than_one_value(const char* fn, const TensorView& x) {
  int64_t count = x.batch();
  for (int i = 2; i < x.rank; ++i)
    if (__builtin_mul_overflow(count, x.shape[i], &count)) return;
  if (count == 1) detail::fail_one_value_per_channel(fn, "input size " + shape_string(x));
}

void check_input(const char* fn, const TensorView& x, std::span<const float> weight,
                 std::span<const float> bias) {
  detail::check_batch_norm_input(fn, x, weight, bias);
}

void check_running_stats(const char* fn, const TensorView& x, std::span<const float> running_mean,
                         std::span<const float> running_var, bool required) {
  detail::check_running_stats(fn, x.channels(), running_mean, running_var, required);
}

using detail::plan_call;
using detail::Planned;

// The checks both backwards share: x and weight, dy and dx like x, the epilogue, and the
// lengths of dweight and dbias.
void check_backward(const char* fn, const BackwardEpilogue& epilogue, const TensorView& dy,
                    const TensorView& x, std::span<const float> weight, const TensorView& dx,
                    std::span<float> dweight, std::span<float> dbias) {
  check_input(fn, x, weight, {});
  check_like(fn, "dy", dy, "x", x);
  check_like(fn, "dx", dx, "x", x);
  check_backward_epilogue(fn, epilogue, x, x.channels(), "C");
  check_length(fn, "dweight", dweight, x.channels(), "C", false);
  check_length(fn, "dbias", dbias, x.channels(), "C", false);
}

// With no values per channel the parameter gradients are empty sums; dx has no elements.
void zero_parameter_grads(std::span<float> dweight, std::span<float> dbias) {
  for (float& v : dweight) v = 0;
  for (float& v : dbias) v = 0;
}

}  // namespace

std::size_t batch_norm_workspace_size(const TensorView& x) {
  check_input("batch_norm_workspace_size", x, {}, {});
  return is_empty(x) ? 0 : cpu::workspace_size(shape_of(x));
}

void batch_norm_forward_training(const BatchNormParams& params, const TensorView& x,
                                 std::span<const float> weight, std::span<const float> bias,
                                 const TensorView& y, std::span<float> save_mean,
                                 std::span<float> save_invstd, std::span<float> running_mean,
                                 std::span<float> running_var, const Context& ctx) {
  const char* fn = "batch_norm_forward_training";
  check_input(fn, x, weight, bias);
  check_like(fn, "y", y, "x", x);
  check_forward_epilogue(fn, params.epilogue, x);
  check_length(fn, "save_mean", save_mean, x.channels(), "C", true);
  check_length(fn, "save_invstd", save_invstd, x.channels(), "C", true);
  check_running_stats(fn, x, running_mean, running_var, false);
  detail::check_eps(fn, params.eps);
  detail::check_momentum(fn, params.momentum);
  // torch's wording, so that users recognize it.
  check_more_than_one_value(fn, x);
  const Planned call = plan_call(fn, x, ctx);
  // As torch: an empty batch gives an empty output and leaves the running statistics alone.
  if (is_empty(x)) return;

  const auto sh = shape_of(x);
  if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_norm_forward_training<A, float>(
          sh, params.eps, params.momentum, plan::ForwardEpilogueOf<A>::from(params.epilogue),
          x.as<const A>(), ptr(weight), ptr(bias), y.as<A>(), ptr(save_mean), ptr(save_invstd),
          ptr(running_mean), ptr(running_var));
    });
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    cpu::batch_norm_forward_training<A>(
        call.plan, params.eps, params.momentum, plan::ForwardEpilogueOf<A>::from(params.epilogue),
        x.as<const A>(), ptr(weight), ptr(bias), y.as<A>(), ptr(save_mean), ptr(save_invstd),
        ptr(running_mean), ptr(running_var), call.workspace);
  });
}

void batch_norm_forward_inference(const BatchNormParams& params, const TensorView& x,
                                  std::span<const float> weight, std::span<const float> bias,
                                  std::span<const float> running_mean,
                                  std::span<const float> running_var, const TensorView& y,
                                  const Context& ctx) {
  const char* fn = "batch_norm_forward_inference";
  check_input(fn, x, weight, bias);
  check_running_stats(fn, x, running_mean, running_var, true);
  check_like(fn, "y", y, "x", x);
  check_forward_epilogue(fn, params.epilogue, x);
  detail::check_eps(fn, params.eps);
  const Planned call = plan_call(fn, x, ctx);
  if (is_empty(x)) return;

  const auto sh = shape_of(x);
  if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_norm_forward_inference<A, float>(
          sh, params.eps, plan::ForwardEpilogueOf<A>::from(params.epilogue), x.as<const A>(),
          ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var), y.as<A>());
    });
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    cpu::batch_norm_forward_inference<A>(
        call.plan, params.eps, plan::ForwardEpilogueOf<A>::from(params.epilogue), x.as<const A>(),
        ptr(weight), ptr(bias), ptr(running_mean), ptr(running_var), y.as<A>(), call.workspace);
  });
}

void batch_norm_backward_training(const BatchNormBackwardParams& params, const TensorView& dy,
                                  const TensorView& x, std::span<const float> save_mean,
                                  std::span<const float> save_invstd,
                                  std::span<const float> weight, const TensorView& dx,
                                  std::span<float> dweight, std::span<float> dbias,
                                  const Context& ctx) {
  const char* fn = "batch_norm_backward_training";
  const BackwardEpilogue& epilogue = params.epilogue;
  check_backward(fn, epilogue, dy, x, weight, dx, dweight, dbias);
  check_length(fn, "save_mean", save_mean, x.channels(), "C", true);
  check_length(fn, "save_invstd", save_invstd, x.channels(), "C", true);
  const Planned call = plan_call(fn, x, ctx);
  if (is_empty(x)) return zero_parameter_grads(dweight, dbias);
  const auto sh = shape_of(x);
  if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_norm_backward_training<A, float>(
          sh, plan::BackwardEpilogueOf<A>::from(epilogue), dy.as<const A>(), x.as<const A>(),
          ptr(save_mean), ptr(save_invstd), ptr(weight), dx.as<A>(), ptr(dweight), ptr(dbias));
    });
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    cpu::batch_norm_backward_training<A>(
        call.plan, plan::BackwardEpilogueOf<A>::from(epilogue), dy.as<const A>(), x.as<const A>(),
        ptr(save_mean), ptr(save_invstd), ptr(weight), dx.as<A>(), ptr(dweight), ptr(dbias),
        call.workspace);
  });
}

void batch_norm_backward_inference(const BatchNormInferenceBackwardParams& params,
                                   const TensorView& dy, const TensorView& x,
                                   std::span<const float> running_mean,
                                   std::span<const float> running_var,
                                   std::span<const float> weight, const TensorView& dx,
                                   std::span<float> dweight, std::span<float> dbias,
                                   const Context& ctx) {
  const char* fn = "batch_norm_backward_inference";
  const BackwardEpilogue& epilogue = params.epilogue;
  check_backward(fn, epilogue, dy, x, weight, dx, dweight, dbias);
  check_running_stats(fn, x, running_mean, running_var, true);
  detail::check_eps(fn, params.eps);
  const Planned call = plan_call(fn, x, ctx);
  if (is_empty(x)) return zero_parameter_grads(dweight, dbias);
  const auto sh = shape_of(x);
  if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_norm_backward_inference<A, float>(
          sh, params.eps, plan::BackwardEpilogueOf<A>::from(epilogue), dy.as<const A>(),
          x.as<const A>(), ptr(running_mean), ptr(running_var), ptr(weight), dx.as<A>(),
          ptr(dweight), ptr(dbias));
    });
    return;
  }
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    cpu::batch_norm_backward_inference<A>(
        call.plan, params.eps, plan::BackwardEpilogueOf<A>::from(epilogue), dy.as<const A>(),
        x.as<const A>(), ptr(running_mean), ptr(running_var), ptr(weight), dx.as<A>(),
        ptr(dweight), ptr(dbias), call.workspace);
  });
}

}  // namespace normkit
