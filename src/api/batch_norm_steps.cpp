// BatchNorm's training steps (normkit/batch_norm_steps.h): validate every argument, compute the
// per-sample leaves with the chosen backend, then the canonical tree (common/batch_norm_tree.h),
// the same code for both backends.
#include "normkit/batch_norm_steps.h"

#include <cmath>
#include <vector>

#include "api/batch_norm_checks.h"
#include "common/batch_norm_tree.h"
#include "common/dtype.h"
#include "common/validate.h"
#include "cpu/batch_norm.h"
#include "cpu/scratch.h"
#include "plan/epilogue.h"
#include "ref/batch_norm.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::fail;
using detail::PartialsKind;

// Offsets, counts and node sizes travel as doubles: every integer must stay exact.
constexpr int64_t kMaxSamples = int64_t(1) << 53;

const float* ptr(std::span<const float> v) { return v.data(); }

void check_piece(const char* fn, int64_t offset, int64_t count) {
  if (offset < 0) fail(fn, "offset must be >= 0, got " + std::to_string(offset));
  if (count < 0) fail(fn, "the piece's sample count must be >= 0, got " + std::to_string(count));
  if (offset > kMaxSamples - count)
    fail(fn, "offset + samples = " + std::to_string(offset) + " + " + std::to_string(count) +
                 " exceeds 2^53, the largest sample index packed partials hold exactly");
}

// x as a piece: an activation tensor with at least one channel.
void check_piece_input(const char* fn, int64_t offset, const TensorView& x) {
  detail::check_tensor(fn, "x", x, 2, detail::kActivationDTypes);
  if (x.channels() < 1) fail(fn, "x must have at least one channel, got shape " + shape_string(x));
  check_piece(fn, offset, x.batch());
}

void check_partials_size(const char* fn, int64_t offset, const TensorView& x,
                         std::span<double> partials) {
  const std::size_t need = batch_norm_partials_size(offset, x.batch(), x.channels());
  if (partials.size() != need)
    fail(fn, "partials has " + std::to_string(partials.size()) +
                 " doubles, expected batch_norm_partials_size(offset, N, C) = " +
                 std::to_string(need) + " for offset " + std::to_string(offset) + ", x shape " +
                 shape_string(x));
}

void check_length(const char* fn, const char* name, std::span<const double> v, int64_t channels) {
  if (v.data() == nullptr) fail(fn, std::string(name) + " is required");
  if (int64_t(v.size()) != channels)
    fail(fn, std::string(name) + " has length " + std::to_string(v.size()) + ", expected C = " +
                 std::to_string(channels));
}

void check_global_batch(const char* fn, int64_t global_batch) {
  if (global_batch < 0 || global_batch > kMaxSamples)
    fail(fn, "global_batch must be in [0, 2^53], got " + std::to_string(global_batch));
}

// The leaves of a piece (two arrays of N * C doubles), in the caller's workspace or a buffer.
struct Leaves {
  std::vector<double> own;
  double* a = nullptr;
  double* b = nullptr;
};

std::size_t leaves_bytes(const TensorView& x) {
  cpu::ScratchLayout l;
  l.add<double>(2, x.batch(), x.channels());
  return l.workspace_bytes();
}

Leaves leaves_for(const char* fn, const TensorView& x, const Context& ctx) {
  const std::size_t bytes = leaves_bytes(x);
  std::span<std::byte> ws = detail::checked_workspace(
      fn, "batch_norm_partials_workspace_size(x)", bytes, ctx);
  Leaves l;
  const std::size_t n = std::size_t(x.batch()) * std::size_t(x.channels());
  if (ws.data() != nullptr) {
    l.a = cpu::scratch_part<double>(cpu::scratch_base(ws, bytes), 0);
  } else {
    l.own.resize(2 * n);
    l.a = l.own.data();
  }
  l.b = l.a + n;
  return l;
}

}  // namespace

std::size_t batch_norm_partials_size(int64_t offset, int64_t count, int64_t channels) {
  const char* fn = "batch_norm_partials_size";
  check_piece(fn, offset, count);
  if (channels < 1) fail(fn, "channels must be >= 1, got " + std::to_string(channels));
  const std::size_t n = detail::packed_partials_size(offset, count, channels);
  if (n == SIZE_MAX)
    fail(fn, "the partials of " + std::to_string(channels) +
                 " channels do not fit in the address space");
  return n;
}

std::size_t batch_norm_partials_workspace_size(const TensorView& x) {
  detail::check_tensor("batch_norm_partials_workspace_size", "x", x, 2,
                       detail::kActivationDTypes);
  return detail::is_empty(x) ? 0 : leaves_bytes(x);
}

void batch_norm_statistics_partials(int64_t offset, const TensorView& x,
                                    std::span<double> partials, const Context& ctx) {
  const char* fn = "batch_norm_statistics_partials";
  check_piece_input(fn, offset, x);
  check_partials_size(fn, offset, x, partials);
  Leaves leaves = leaves_for(fn, x, ctx);

  const auto sh = detail::batch_norm_shape_of(x);
  const int64_t values = sh.batch * sh.channels;
  if (sh.spatial == 0) {  // samples without values: empty leaves
    std::fill(leaves.a, leaves.a + values, 0.0);
    std::fill(leaves.b, leaves.b + values, 0.0);
  } else if (ctx.backend == Backend::reference) {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      ref::batch_norm_sample_statistics<A>(sh, x.as<const A>(), leaves.a, leaves.b);
    });
  } else {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      cpu::batch_norm_sample_statistics<A>(sh, detail::thread_count(ctx), x.as<const A>(),
                                           leaves.a, leaves.b);
    });
  }
  detail::pack_partials(PartialsKind::statistics, sh.channels, sh.spatial, offset, sh.batch,
                        leaves.a, leaves.b, partials);
}

void batch_norm_merge_statistics(const BatchNormParams& params, int64_t global_batch,
                                 std::span<const double> partials, std::span<float> save_mean,
                                 std::span<float> save_invstd, std::span<float> running_mean,
                                 std::span<float> running_var) {
  const char* fn = "batch_norm_merge_statistics";
  check_global_batch(fn, global_batch);
  detail::check_eps(fn, params.eps);
  detail::check_momentum(fn, params.momentum);
  const detail::ParsedPartials parsed =
      detail::parse_partials(fn, PartialsKind::statistics, global_batch, partials);
  if (parsed.channels == 0) return;  // no pieces: an empty global batch, nothing to write
  const int64_t C = parsed.channels;
  check_length(fn, "save_mean", save_mean, C, "C (of the partials)", true);
  check_length(fn, "save_invstd", save_invstd, C, "C (of the partials)", true);
  detail::check_running_stats(fn, C, running_mean, running_var, false);
  // The global count M = N * S; it fits (both are below 2^53, and x's element count fit).
  const double count = double(global_batch) * double(parsed.spatial);
  if (count == 1)
    detail::fail_one_value_per_channel(fn, "a global batch of 1 sample of 1 value per channel");
  if (count == 0) return;  // as batch_norm_forward_training: nothing to normalize

  std::vector<double> mean, m2;
  detail::merge_partials(PartialsKind::statistics, parsed, mean, m2);
  const double momentum = params.momentum;
  for (int64_t c = 0; c < C; ++c) {
    const double variance = m2[c] / count, unbiased = m2[c] / (count - 1);
    save_mean[c] = float(mean[c]);
    save_invstd[c] = float(1.0 / std::sqrt(variance + params.eps));
    if (running_mean.data()) {
      running_mean[c] = float((1 - momentum) * running_mean[c] + momentum * mean[c]);
      running_var[c] = float((1 - momentum) * running_var[c] + momentum * unbiased);
    }
  }
}

void batch_norm_normalize(const BatchNormParams& params, const TensorView& x,
                          std::span<const float> weight, std::span<const float> bias,
                          std::span<const float> mean, std::span<const float> invstd,
                          const TensorView& y, const Context& ctx) {
  const char* fn = "batch_norm_normalize";
  detail::check_batch_norm_input(fn, x, weight, bias);
  detail::check_like(fn, "y", y, "x", x);
  detail::check_forward_epilogue(fn, params.epilogue, x);
  detail::check_steps_activation(fn, params.epilogue.activation);
  check_length(fn, "mean", mean, x.channels(), "C", true);
  check_length(fn, "invstd", invstd, x.channels(), "C", true);
  const detail::Planned call = detail::plan_call(fn, x, ctx);
  if (detail::is_empty(x)) return;

  const auto sh = detail::batch_norm_shape_of(x);
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    const auto epilogue = plan::ForwardEpilogueOf<A>::from(params.epilogue);
    if (ctx.backend == Backend::reference)
      ref::batch_norm_normalize<A>(sh, epilogue, x.as<const A>(), ptr(weight), ptr(bias),
                                   ptr(mean), ptr(invstd), y.as<A>());
    else
      cpu::batch_norm_normalize<A>(call.plan, epilogue, x.as<const A>(), ptr(weight),
                                   ptr(bias), ptr(mean), ptr(invstd), y.as<A>(), call.workspace);
  });
}

void batch_norm_gradient_partials(const BatchNormBackwardParams& params, int64_t offset,
                                  const TensorView& dy, const TensorView& x,
                                  std::span<const float> save_mean, std::span<double> partials,
                                  const Context& ctx) {
  const char* fn = "batch_norm_gradient_partials";
  check_piece_input(fn, offset, x);
  detail::check_like(fn, "dy", dy, "x", x);
  detail::check_backward_epilogue(fn, params.epilogue, x, x.channels(), "C");
  detail::check_steps_activation(fn, params.epilogue.activation);
  check_length(fn, "save_mean", save_mean, x.channels(), "C", true);
  check_partials_size(fn, offset, x, partials);
  Leaves leaves = leaves_for(fn, x, ctx);

  const auto sh = detail::batch_norm_shape_of(x);
  const int64_t values = sh.batch * sh.channels;
  if (sh.spatial == 0) {
    std::fill(leaves.a, leaves.a + values, 0.0);
    std::fill(leaves.b, leaves.b + values, 0.0);
  } else {
    visit_dtype(x.dtype, [&](auto tag) {
      using A = decltype(tag);
      const auto epilogue = plan::BackwardEpilogueOf<A>::from(params.epilogue);
      if (ctx.backend == Backend::reference)
        ref::batch_norm_sample_gradients<A>(sh, epilogue, dy.as<const A>(), x.as<const A>(),
                                            ptr(save_mean), leaves.a, leaves.b);
      else
        cpu::batch_norm_sample_gradients<A>(sh, detail::thread_count(ctx), epilogue,
                                            dy.as<const A>(), x.as<const A>(), ptr(save_mean),
                                            leaves.a, leaves.b);
    });
  }
  detail::pack_partials(PartialsKind::gradients, sh.channels, sh.spatial, offset, sh.batch,
                        leaves.a, leaves.b, partials);
}

void batch_norm_merge_gradients(int64_t global_batch, std::span<const double> partials,
                                std::span<const float> save_invstd, std::span<double> sum_g,
                                std::span<double> sum_g_xmu, std::span<float> dweight,
                                std::span<float> dbias) {
  const char* fn = "batch_norm_merge_gradients";
  check_global_batch(fn, global_batch);
  const detail::ParsedPartials parsed =
      detail::parse_partials(fn, PartialsKind::gradients, global_batch, partials);
  if (parsed.channels == 0) return;
  const int64_t C = parsed.channels;
  check_length(fn, "save_invstd", save_invstd, C, "C (of the partials)", true);
  check_length(fn, "sum_g", sum_g, C);
  check_length(fn, "sum_g_xmu", sum_g_xmu, C);
  check_length(fn, "dweight", dweight, C, "C (of the partials)", false);
  check_length(fn, "dbias", dbias, C, "C (of the partials)", false);

  std::vector<double> g(std::size_t(C), 0.0), gx(std::size_t(C), 0.0);
  // With no values the sums are empty: zero, as batch_norm_backward_training's dweight and
  // dbias (save_invstd was never written then, and is not read).
  const bool any = global_batch > 0 && parsed.spatial > 0;
  if (any) detail::merge_partials(PartialsKind::gradients, parsed, g, gx);
  for (int64_t c = 0; c < C; ++c) {
    sum_g[c] = g[c];
    sum_g_xmu[c] = gx[c];
    if (dbias.data()) dbias[c] = float(g[c]);
    if (dweight.data()) dweight[c] = any ? float(gx[c] * double(save_invstd[c])) : 0.0f;
  }
}

void batch_norm_backward_dx(const BatchNormBackwardParams& params, int64_t global_batch,
                            const TensorView& dy, const TensorView& x,
                            std::span<const float> save_mean, std::span<const float> save_invstd,
                            std::span<const float> weight, std::span<const double> sum_g,
                            std::span<const double> sum_g_xmu, const TensorView& dx,
                            const Context& ctx) {
  const char* fn = "batch_norm_backward_dx";
  detail::check_batch_norm_input(fn, x, weight, {});
  detail::check_like(fn, "dy", dy, "x", x);
  detail::check_like(fn, "dx", dx, "x", x);
  detail::check_backward_epilogue(fn, params.epilogue, x, x.channels(), "C");
  detail::check_steps_activation(fn, params.epilogue.activation);
  check_length(fn, "save_mean", save_mean, x.channels(), "C", true);
  check_length(fn, "save_invstd", save_invstd, x.channels(), "C", true);
  if (x.channels() > 0) {
    check_length(fn, "sum_g", sum_g, x.channels());
    check_length(fn, "sum_g_xmu", sum_g_xmu, x.channels());
  }
  check_global_batch(fn, global_batch);
  if (global_batch < x.batch())
    fail(fn, "global_batch = " + std::to_string(global_batch) +
                 " is smaller than this piece's batch, x shape " + shape_string(x));
  const detail::Planned call = detail::plan_call(fn, x, ctx);
  if (detail::is_empty(x)) return;

  const auto sh = detail::batch_norm_shape_of(x);
  const double count = double(global_batch) * double(sh.spatial);
  visit_dtype(x.dtype, [&](auto tag) {
    using A = decltype(tag);
    const auto epilogue = plan::BackwardEpilogueOf<A>::from(params.epilogue);
    if (ctx.backend == Backend::reference)
      ref::batch_norm_backward_dx<A>(sh, epilogue, count, dy.as<const A>(), x.as<const A>(),
                                     ptr(save_mean), ptr(save_invstd), ptr(weight),
                                     sum_g.data(), sum_g_xmu.data(), dx.as<A>());
    else
      cpu::batch_norm_backward_dx<A>(call.plan, epilogue, count, dy.as<const A>(),
                                     x.as<const A>(), ptr(save_mean), ptr(save_invstd),
                                     ptr(weight), sum_g.data(), sum_g_xmu.data(), dx.as<A>(),
                                     call.workspace);
  });
}

}  // namespace normkit
