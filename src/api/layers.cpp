// Layer objects: parameter and running-statistic bookkeeping around the free functions.
#include "normkit/layers.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <string>

#include "common/validate.h"
#include "normkit/batch_norm.h"
#include "normkit/group_norm.h"
#include "normkit/instance_norm.h"

namespace normkit {
namespace {

// A vector that is absent when it is empty (an empty std::vector may still have a data pointer).
std::span<float> optional_view(std::vector<float>& v) {
  return v.empty() ? std::span<float>{} : std::span<float>(v);
}

// Length of the per-(sample, group) statistics, checked for overflow.
int64_t statistics_length(const char* layer, const TensorView& x, int64_t per_sample) {
  int64_t n = 0;
  if (__builtin_mul_overflow(x.batch(), per_sample, &n))
    detail::fail(layer, "N * groups overflows int64: shape " + shape_string(x));
  return n;
}

std::string qualified(const char* layer, const char* method) {
  return std::string(layer) + "." + method;
}

void check_options(const char* layer, double eps, std::optional<double> momentum) {
  detail::check_eps(layer, eps);
  if (momentum) detail::check_momentum(layer, *momentum);
}

// The context of a GroupNorm or InstanceNorm layer's call: `context` itself when it carries a
// workspace (or runs the reference backend), else with the layer's own workspace, grown to what
// `query` (the op's *_workspace_size for this input) asks. When the query rejects the input,
// the call goes ahead without a workspace and the op reports the problem in its own words.
template <typename Query>
Context with_own_workspace(const Context& context, std::vector<std::byte>& own, Query&& query) {
  if (context.workspace.data() != nullptr || context.backend != Backend::cpu) return context;
  std::size_t need = 0;
  try {
    need = query();
  } catch (const Error&) {
    return context;
  }
  if (need == 0) return context;
  if (own.size() < need) own.resize(need);
  Context ctx = context;
  ctx.workspace = std::span<std::byte>(own.data(), need);
  return ctx;
}

// torch's factor: momentum, or the cumulative average 1 / n over the n batches seen so far
// (this one included).
double average_factor(std::optional<double> momentum, int64_t batches_including_this) {
  return momentum ? *momentum : 1.0 / static_cast<double>(batches_including_this);
}

}  // namespace

NormLayer::NormLayer(const char* name, int64_t num_channels, bool affine)
    : name_(name), num_channels_(num_channels), affine_(affine) {
  if (num_channels < 0)
    detail::fail(name, "num_channels must be >= 0, got " + std::to_string(num_channels));
  if (affine) {
    weight.assign(num_channels, 1.0f);
    bias.assign(num_channels, 0.0f);
    weight_grad.assign(num_channels, 0.0f);
    bias_grad.assign(num_channels, 0.0f);
  }
}

void NormLayer::check_input(const char* method, const TensorView& x) const {
  const std::string fn = qualified(name_, method);
  detail::check_tensor(fn.c_str(), "x", x, 2,
                       accepts_16bit_activations() ? detail::kActivationDTypes
                                                   : detail::kFloat32Only);
  if (x.channels() != num_channels_)
    detail::fail(fn.c_str(), "x has " + std::to_string(x.channels()) + " channels (shape " +
                                 shape_string(x) + "), expected num_channels = " +
                                 std::to_string(num_channels_));
}

void NormLayer::check_backward(const TensorView& dy, const TensorView& dx) const {
  const std::string fn = qualified(name_, "backward");
  if (saved_x_.rank == 0) detail::fail(fn.c_str(), "called before any forward");
  detail::check_like(fn.c_str(), "dy", dy, "the last forward's x", saved_x_);
  detail::check_like(fn.c_str(), "dx", dx, "the last forward's x", saved_x_);
}

void NormLayer::forward(const TensorView& x, const ForwardEpilogue& epilogue,
                        const TensorView& y) {
  check_input("forward", x);
  forward_op(x, epilogue, y);
  saved_x_ = x;
  used_activation_ = epilogue.activation;
  saved_y_ = epilogue.activation == Activation::relu ? y : TensorView{};
  saved_residual_ = epilogue.activation == Activation::silu ? epilogue.residual : TensorView{};
}

void NormLayer::backward(const TensorView& dy, const TensorView& dx,
                         const TensorView& dresidual) {
  check_backward(dy, dx);
  if (dresidual.data != nullptr) {
    const std::string fn = qualified(name_, "backward");
    detail::check_like(fn.c_str(), "dresidual", dresidual, "the last forward's x", saved_x_);
  }
  backward_op({.activation = used_activation_,
               .y = saved_y_,
               .residual = saved_residual_,
               .bias = used_activation_ == Activation::silu ? std::span<const float>(bias)
                                                             : std::span<const float>(),
               .dresidual = dresidual},
              dy, dx);
}

// ---- BatchNorm ----

BatchNorm::BatchNorm(int64_t num_features, Options opts)
    : NormLayer("BatchNorm", num_features, opts.affine),
      options(opts),
      track_running_stats_(opts.track_running_stats) {
  check_options(name_, options.eps, options.momentum);
  if (track_running_stats_) {
    running_mean.assign(num_features, 0.0f);
    running_var.assign(num_features, 1.0f);
  }
}

void BatchNorm::forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                           const TensorView& y) {
  check_options(name_, options.eps, options.momentum);
  const bool batch_stats = training_ || !track_running_stats_ || options.eval_batch_stats;
  if (batch_stats) {
    const bool update = training_ && track_running_stats_;
    save_mean_.resize(num_channels_);
    save_invstd_.resize(num_channels_);
    BatchNormParams params{.eps = options.eps,
                           .momentum = update ? average_factor(options.momentum,
                                                               num_batches_tracked + 1)
                                              : 0.0,
                           .epilogue = epilogue};
    batch_norm_forward_training(params, x, optional_view(weight), optional_view(bias), y,
                                save_mean_, save_invstd_,
                                update ? optional_view(running_mean) : std::span<float>{},
                                update ? optional_view(running_var) : std::span<float>{},
                                context);
    if (update) ++num_batches_tracked;
  } else {
    batch_norm_forward_inference({.eps = options.eps, .epilogue = epilogue}, x,
                                 optional_view(weight), optional_view(bias), running_mean,
                                 running_var, y, context);
  }
  used_batch_stats_ = batch_stats;
  used_eps_ = options.eps;
}

void BatchNorm::backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                            const TensorView& dx) {
  if (used_batch_stats_)
    batch_norm_backward_training({.epilogue = epilogue}, dy, saved_x_, save_mean_, save_invstd_,
                                 optional_view(weight), dx, optional_view(weight_grad),
                                 optional_view(bias_grad), context);
  else
    batch_norm_backward_inference({.eps = used_eps_, .epilogue = epilogue}, dy, saved_x_,
                                  running_mean, running_var, optional_view(weight), dx,
                                  optional_view(weight_grad), optional_view(bias_grad), context);
}

// ---- FrozenBatchNorm ----

FrozenBatchNorm::FrozenBatchNorm(int64_t num_features, Options opts)
    : NormLayer("FrozenBatchNorm", num_features, true), options(opts) {
  check_options(name_, options.eps, std::nullopt);
  running_mean.assign(num_features, 0.0f);
  running_var.assign(num_features, 1.0f);
  if (!options.parameter_grads) {
    weight_grad.clear();
    bias_grad.clear();
  }
}

void FrozenBatchNorm::forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                                 const TensorView& y) {
  batch_norm_forward_inference({.eps = options.eps, .epilogue = epilogue}, x, weight, bias,
                               running_mean, running_var, y, context);
  used_eps_ = options.eps;
}

void FrozenBatchNorm::backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                                  const TensorView& dx) {
  // Without parameter gradients the spans are empty and the op reads x only for silu.
  batch_norm_backward_inference({.eps = used_eps_, .epilogue = epilogue}, dy, saved_x_,
                                running_mean, running_var, weight, dx,
                                optional_view(weight_grad), optional_view(bias_grad), context);
}

// ---- GroupNorm / LayerNorm ----

GroupNorm::GroupNorm(int64_t num_groups, int64_t num_channels, Options opts)
    : GroupNorm("GroupNorm", num_groups, num_channels, opts) {}

GroupNorm::GroupNorm(const char* name, int64_t num_groups, int64_t num_channels, Options opts)
    : NormLayer(name, num_channels, opts.affine), options(opts), num_groups_(num_groups) {
  // The op's own rule, checked here too so that a bad layer fails when it is made (as torch's).
  detail::check_num_groups(name, num_groups, num_channels, "");
  check_options(name, options.eps, std::nullopt);
}

void GroupNorm::forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                           const TensorView& y) {
  const GroupNormParams params{
      .num_groups = num_groups_, .eps = options.eps, .epilogue = epilogue};
  const int64_t length = statistics_length(name_, x, num_groups_);
  mean_.resize(length);
  rstd_.resize(length);
  const Context ctx = with_own_workspace(context, workspace_,
                                         [&] { return group_norm_workspace_size(params, x); });
  group_norm_forward(params, x, optional_view(weight), optional_view(bias), y, mean_, rstd_, ctx);
}

void GroupNorm::backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                            const TensorView& dx) {
  const Context ctx = with_own_workspace(context, workspace_, [&] {
    return group_norm_workspace_size({.num_groups = num_groups_}, saved_x_);
  });
  group_norm_backward({.num_groups = num_groups_, .epilogue = epilogue}, dy, saved_x_, mean_,
                      rstd_, optional_view(weight), dx, optional_view(weight_grad),
                      optional_view(bias_grad), ctx);
}

// ---- InstanceNorm ----

InstanceNorm::InstanceNorm(int64_t num_features, Options opts)
    : NormLayer("InstanceNorm", num_features, opts.affine),
      options(opts),
      track_running_stats_(opts.track_running_stats) {
  check_options(name_, options.eps, options.momentum);
  if (track_running_stats_) {
    running_mean.assign(num_features, 0.0f);
    running_var.assign(num_features, 1.0f);
  }
}

void InstanceNorm::forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                              const TensorView& y) {
  check_options(name_, options.eps, options.momentum);
  const bool input_stats = training_ || !track_running_stats_;
  const bool update = training_ && track_running_stats_;
  const InstanceNormParams params{
      .use_input_stats = input_stats,
      .momentum = update ? average_factor(options.momentum, num_batches_tracked + 1) : 0.0,
      .eps = options.eps,
      .epilogue = epilogue};
  const int64_t length = statistics_length(name_, x, num_channels_);
  mean_.resize(length);
  rstd_.resize(length);
  // Running statistics go in when they are updated (training) or used (eval).
  const bool pass_running = track_running_stats_ && (update || !input_stats);
  const Context ctx = with_own_workspace(
      context, workspace_, [&] { return instance_norm_workspace_size(params, x); });
  instance_norm_forward(params, x, optional_view(weight), optional_view(bias),
                        pass_running ? optional_view(running_mean) : std::span<float>{},
                        pass_running ? optional_view(running_var) : std::span<float>{}, y, mean_,
                        rstd_, ctx);
  if (update) ++num_batches_tracked;
  used_input_stats_ = input_stats;
}

void InstanceNorm::backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                               const TensorView& dx) {
  const Context ctx = with_own_workspace(context, workspace_, [&] {
    return instance_norm_workspace_size({.use_input_stats = used_input_stats_}, saved_x_);
  });
  instance_norm_backward({.use_input_stats = used_input_stats_, .epilogue = epilogue}, dy,
                         saved_x_, mean_, rstd_, optional_view(weight), dx,
                         optional_view(weight_grad), optional_view(bias_grad), ctx);
}

// ---- NoNorm ----

NoNorm::NoNorm(int64_t num_channels) : NormLayer("NoNorm", num_channels, false) {
  bias.assign(num_channels, 0.0f);
  bias_grad.assign(num_channels, 0.0f);
}

namespace {

int threads_of(const Context& context) {
  return context.num_threads > 0 ? context.num_threads : get_num_threads();
}

// (rows, C) when the channels are the fastest dimension, else (N * C, spatial) blocks.
bool channels_innermost(const TensorView& x) {
  return x.rank == 2 || x.format == MemoryFormat::channels_last;
}

}  // namespace

void NoNorm::forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                        const TensorView& y) {
  const std::string fn = qualified(name_, "forward");
  detail::check_like(fn.c_str(), "y", y, "x", x);
  if (epilogue.residual.data != nullptr)
    detail::check_like(fn.c_str(), "epilogue.residual", epilogue.residual, "x", x);
  const int64_t C = num_channels_, S = x.spatial_size(), rows = x.numel() / std::max<int64_t>(C, 1);
  const float* xp = static_cast<const float*>(x.data);
  const float* rp = static_cast<const float*>(epilogue.residual.data);
  const float* b = bias.data();
  float* yp = static_cast<float*>(y.data);
  detail::check_activation(fn.c_str(), epilogue.activation);
  const Activation act = epilogue.activation;
  const bool last = channels_innermost(x);
  // The same float operations in the same order as a bias add, a residual add and a ReLU.
#pragma omp parallel for schedule(static) num_threads(threads_of(context))
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < C; ++j) {
      const int64_t i = r * C + j;
      const int64_t c = last ? j : (i / S) % C;
      float v = xp[i] + b[c];
      if (rp) v += rp[i];
      yp[i] = act == Activation::relu ? std::max(v, 0.0f)
              : act == Activation::silu ? float(double(v) / (1.0 + std::exp(-double(v))))
                                        : v;
    }
}

void NoNorm::backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                         const TensorView& dx) {
  const int64_t C = num_channels_, S = dy.spatial_size(), total = dy.numel();
  const float* d = static_cast<const float*>(dy.data);
  const float* yp = static_cast<const float*>(epilogue.y.data);
  const float* xp = static_cast<const float*>(saved_x_.data);
  const float* rp = static_cast<const float*>(epilogue.residual.data);
  const bool last_in = channels_innermost(dy);
  float* g = static_cast<float*>(dx.data);  // dx is g itself
  float* dres = static_cast<float*>(epilogue.dresidual.data);
  const int threads = threads_of(context);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < total; ++i) {
    if (epilogue.activation == Activation::silu) {
      // z as the forward made it: x + bias + residual?
      const int64_t c = last_in ? i % C : (i / S) % C;
      float z = xp[i] + (epilogue.bias.empty() ? 0.0f : epilogue.bias[std::size_t(c)]);
      if (rp) z += rp[i];
      const double s = 1.0 / (1.0 + std::exp(-double(z)));
      g[i] = float(double(d[i]) * s * (1.0 + double(z) * (1.0 - s)));
    } else {
      g[i] = epilogue.activation == Activation::relu ? (yp[i] > 0.0f ? d[i] : 0.0f) : d[i];
    }
    if (dres) dres[i] = g[i];
  }
  // Fixed chunks summed in parallel, then the chunks in order: the same bits for any thread
  // count.
  constexpr int64_t kChunk = 256;
  if (channels_innermost(dy)) {
    const int64_t rows = C > 0 ? total / C : 0, chunks = (rows + kChunk - 1) / kChunk;
    partial_.assign(static_cast<std::size_t>(std::max<int64_t>(chunks, 1) * C), 0.0);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t ch = 0; ch < chunks; ++ch) {
      double* p = partial_.data() + ch * C;
      for (int64_t r = ch * kChunk; r < std::min(rows, (ch + 1) * kChunk); ++r)
        for (int64_t j = 0; j < C; ++j) p[j] += g[r * C + j];
    }
    for (int64_t j = 0; j < C; ++j) {
      double sum = 0;
      for (int64_t ch = 0; ch < chunks; ++ch) sum += partial_[ch * C + j];
      bias_grad[j] = static_cast<float>(sum);
    }
  } else {
    const int64_t N = dy.batch();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t c = 0; c < C; ++c) {
      double sum = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) sum += g[(n * C + c) * S + s];
      bias_grad[c] = static_cast<float>(sum);
    }
  }
}

}  // namespace normkit
