// Public InstanceNorm entry points: group_norm with one channel per group, plus torch's running
// statistics (batch average of the per-instance mean and unbiased variance, momentum-weighted).
#include "normkit/instance_norm.h"

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "api/group_norm_dispatch.h"
#include "common/dtype.h"
#include "common/validate.h"

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

// Checks of x and weight shared by forward and backward.
void check_instance_input(const char* fn, const TensorView& x, std::span<const float> weight) {
  check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  check_length(fn, "weight", weight, x.channels(), "C", false);
}

// The forward's scalars (the backward has none).
void check_forward_scalars(const char* fn, const InstanceNormParams& params) {
  detail::check_eps(fn, params.eps);
  detail::check_momentum(fn, params.momentum);
}

// Checks of the instances, after those above; returns N * C.
int64_t check_instances(const char* fn, bool use_input_stats, const TensorView& x) {
  // torch's wording, so that users recognize it (torch checks before the batch size, too).
  if (use_input_stats && x.spatial_size() == 1)
    fail(fn, "Expected more than 1 spatial element when training, got input size " +
                 shape_string(x));
  int64_t instances = 0;
  if (__builtin_mul_overflow(x.batch(), x.channels(), &instances))
    fail(fn, "N * C overflows int64: shape " + shape_string(x));
  return instances;
}

constexpr const char* kWorkspaceQuery = "instance_norm_workspace_size(params, x)";

// N*C floats for the per-instance variances that update the running statistics (with room to
// align them in a caller's buffer of any alignment), then the GroupNorm kernels' scratch
// (G = C), which aligns itself.
std::size_t variance_bytes(const TensorView& x) {
  return std::size_t(x.batch() * x.channels()) * sizeof(float) + alignof(float) - 1;
}
std::size_t workspace_bytes(const TensorView& x, std::size_t group_norm_bytes) {
  if (detail::has_zero_dim(x)) return 0;
  return variance_bytes(x) + group_norm_bytes;
}

}  // namespace

std::size_t instance_norm_workspace_size(const InstanceNormParams& params, const TensorView& x) {
  const char* fn = "instance_norm_workspace_size";
  check_instance_input(fn, x, {});
  check_forward_scalars(fn, params);
  check_instances(fn, params.use_input_stats, x);
  return workspace_bytes(x, detail::group_norm_scratch_bytes(x, x.channels()));
}

void instance_norm_forward(const InstanceNormParams& params, const TensorView& x,
                           std::span<const float> weight, std::span<const float> bias,
                           std::span<float> running_mean, std::span<float> running_var,
                           const TensorView& y, std::span<float> mean, std::span<float> rstd,
                           const Context& ctx) {
  const char* fn = "instance_norm_forward";
  check_instance_input(fn, x, weight);
  check_forward_scalars(fn, params);
  const int64_t instances = check_instances(fn, params.use_input_stats, x);
  const int64_t C = x.channels();
  check_length(fn, "bias", bias, C, "C", false);
  const bool need_running = !params.use_input_stats;
  check_length(fn, "running_mean", running_mean, C, "C", need_running);
  check_length(fn, "running_var", running_var, C, "C", need_running);
  if ((running_mean.data() == nullptr) != (running_var.data() == nullptr))
    fail(fn, std::string("running_mean and running_var must be given together, got only ") +
                 (running_mean.data() ? "running_mean" : "running_var"));
  check_like(fn, "y", y, "x", x);
  check_length(fn, "mean", mean, instances, "N * C", true);
  check_length(fn, "rstd", rstd, instances, "N * C", true);
  const ForwardEpilogue& epi = params.epilogue;
  check_forward_epilogue(fn, epi, x);
  const auto plan = detail::group_norm_plan(x, C, ctx);
  const auto workspace = detail::checked_workspace(
      fn, kWorkspaceQuery, workspace_bytes(x, plan.scratch.bytes), ctx);
  // An empty batch gives an empty output and leaves the running statistics alone. So does
  // C == 0, whatever N is: no loop below may run over the N of an input with no instances.
  if (instances == 0) return;

  if (!params.use_input_stats) {
    for (int64_t n = 0; n < x.batch(); ++n)
      for (int64_t c = 0; c < C; ++c) {
        mean[n * C + c] = running_mean[c];
        rstd[n * C + c] = float(1.0 / std::sqrt(double(running_var[c]) + params.eps));
      }
    if (ctx.backend == Backend::reference)
      ref::group_norm_apply(plan.shape, epi, x, ptr(mean), ptr(rstd), ptr(weight), ptr(bias), y);
    else
      visit_dtype(x.dtype, [&](auto tag) {
        using T = decltype(tag);
        cpu::group_norm_apply(plan, cpu::ForwardEpilogueOf<T>::from(epi), x.as<const T>(),
                              ptr(mean), ptr(rstd), ptr(weight), ptr(bias), y.as<T>(),
                              workspace);
      });
    return;
  }

  const bool update = running_mean.data() != nullptr && x.spatial_size() > 0;
  float* var = nullptr;
  if (update && !workspace.empty()) {
    void* base = workspace.data();
    std::size_t room = variance_bytes(x);
    var = static_cast<float*>(std::align(alignof(float), std::size_t(instances) * sizeof(float),
                                         base, room));
  } else if (update) {
    thread_local std::vector<float> variance;  // reused: no allocation once warm
    if (variance.size() < std::size_t(instances)) variance.resize(std::size_t(instances));
    var = variance.data();
  }
  detail::group_norm_forward_on(plan, params.eps, epi, x, weight, bias, y, mean, rstd, var, ctx,
                                workspace.empty() ? workspace : workspace.subspan(variance_bytes(x)));
  if (!update) return;
  // torch: running <- (1 - m) * running + m * (average over n of the per-instance statistic),
  // the variance unbiased over the S spatial elements.
  const double N = double(x.batch()), S = double(x.spatial_size()), m = params.momentum;
  for (int64_t c = 0; c < C; ++c) {
    double sum_mean = 0, sum_var = 0;
    for (int64_t n = 0; n < x.batch(); ++n) {
      sum_mean += mean[n * C + c];
      sum_var += double(var[n * C + c]) * S / (S - 1);
    }
    running_mean[c] = float((1 - m) * running_mean[c] + m * sum_mean / N);
    running_var[c] = float((1 - m) * running_var[c] + m * sum_var / N);
  }
}

void instance_norm_backward(const InstanceNormBackwardParams& params, const TensorView& dy,
                            const TensorView& x, std::span<const float> mean,
                            std::span<const float> rstd, std::span<const float> weight,
                            const TensorView& dx, std::span<float> dweight,
                            std::span<float> dbias, const Context& ctx) {
  const char* fn = "instance_norm_backward";
  const BackwardEpilogue& epilogue = params.epilogue;
  check_instance_input(fn, x, weight);
  const int64_t instances = check_instances(fn, params.use_input_stats, x);
  check_like(fn, "dy", dy, "x", x);
  check_like(fn, "dx", dx, "x", x);
  check_length(fn, "mean", mean, instances, "N * C", true);
  check_length(fn, "rstd", rstd, instances, "N * C", true);
  check_length(fn, "dweight", dweight, x.channels(), "C", false);
  check_length(fn, "dbias", dbias, x.channels(), "C", false);
  check_backward_epilogue(fn, epilogue, x, x.channels(), "C");
  const bool constants = !params.use_input_stats;
  const auto plan = detail::group_norm_plan(
      x, x.channels(), ctx, detail::backward_work(constants, epilogue, dweight, dbias));
  const auto workspace = detail::checked_workspace(
      fn, kWorkspaceQuery, workspace_bytes(x, plan.scratch.bytes), ctx);

  detail::group_norm_backward_on(plan, constants, epilogue, dy, x, mean, rstd, weight, dx,
                                 dweight, dbias, ctx, workspace);
}

}  // namespace normkit
