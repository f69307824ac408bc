#include "nn/norm.h"

#include <algorithm>
#include <cstdio>
#include <limits>

#include "nn/profile.h"
#include "normkit/batch_norm_steps.h"
#include "normkit/batch_renorm.h"
#include "normkit/error.h"
#include "normkit/evonorm.h"
#include "normkit/frn.h"

namespace normkit::train {

NormKind parse_norm_kind(const std::string& s) {
  if (s == "bn") return NormKind::batch;
  if (s == "gn") return NormKind::group;
  if (s == "ln") return NormKind::layer;
  if (s == "in") return NormKind::instance;
  if (s == "none") return NormKind::none;
  if (s == "frozen") return NormKind::frozen;
  if (s == "gn+ws") return NormKind::group_ws;
  if (s == "frn") return NormKind::frn;
  if (s == "evonorm") return NormKind::evonorm;
  if (s == "brn") return NormKind::batch_renorm;
  throw Error("unknown norm '" + s +
              "': expected one of bn, gn, ln, in, none, frozen, gn+ws, frn, evonorm, brn");
}

const char* to_string(NormKind kind) {
  switch (kind) {
    case NormKind::batch: return "bn";
    case NormKind::group: return "gn";
    case NormKind::layer: return "ln";
    case NormKind::instance: return "in";
    case NormKind::none: return "none";
    case NormKind::frozen: return "frozen";
    case NormKind::group_ws: return "gn+ws";
    case NormKind::frn: return "frn";
    case NormKind::evonorm: return "evonorm";
    case NormKind::batch_renorm: return "brn";
  }
  return "?";
}

bool uses_groups(NormKind kind) {
  return kind == NormKind::group || kind == NormKind::group_ws || kind == NormKind::evonorm;
}

bool standardizes_weights(NormKind kind) { return kind == NormKind::group_ws; }

bool has_batch_statistics(NormKind kind) {
  return kind == NormKind::batch || kind == NormKind::batch_renorm;
}

namespace {
// FRN's fixed eps (the paper's value for layers with more than one spatial position).
constexpr double kFrnEps = 1e-6;
constexpr double kEvoNormEps = 1e-5;
}  // namespace

std::unique_ptr<NormLayer> make_norm_layer(const std::string& name, NormKind kind, int channels,
                                           int groups) {
  switch (kind) {
    case NormKind::batch:
    case NormKind::batch_renorm: return std::make_unique<BatchNorm>(channels);  // momentum 0.1, eps 1e-5
    case NormKind::group:
    case NormKind::group_ws:
    case NormKind::evonorm:
      try {
        auto layer = std::make_unique<GroupNorm>(groups, channels);
        // EvoNorm-S0 runs on normkit's functions; the layer only checked the group count.
        if (kind == NormKind::evonorm) return nullptr;
        return layer;
      } catch (const Error& e) {
        // The layer's reason, with what the user can change.
        throw Error("--groups " + std::to_string(groups) + " is refused for the " +
                    std::to_string(channels) + " channels of " + name + " (" + e.what() +
                    "): choose a positive group count that divides every layer width");
      }
    case NormKind::layer: return std::make_unique<LayerNorm>(channels);
    case NormKind::instance:
      return std::make_unique<InstanceNorm>(channels, InstanceNormOptions{.affine = true});
    case NormKind::none: return std::make_unique<NoNorm>(channels);
    case NormKind::frozen: return std::make_unique<FrozenBatchNorm>(channels);  // eps 1e-5
    case NormKind::frn: return nullptr;  // normkit's functions, in Norm
  }
  return nullptr;
}

Norm::Norm(const std::string& name, NormKind kind, int channels, int groups, bool zero_gamma,
           bool relu, bool residual)
    : weight(name + ".weight", kind == NormKind::none ? 0 : channels),
      bias(name + ".bias", channels),
      extra((kind == NormKind::frn || kind == NormKind::evonorm) && relu && !residual
                ? Param(name + (kind == NormKind::frn ? ".tau" : ".v"), channels)
                : Param()),
      kind_(kind), relu_(relu), fused_nonlinearity_(extra.size() > 0),
      layer_(make_norm_layer(name, kind, channels, groups)),
      batch_norm_(dynamic_cast<BatchNorm*>(layer_.get())),
      frozen_(dynamic_cast<FrozenBatchNorm*>(layer_.get())) {
  switch (kind) {
    case NormKind::group:
    case NormKind::group_ws:
    case NormKind::evonorm: groups_ = groups; break;
    case NormKind::layer: groups_ = 1; break;
    case NormKind::instance: groups_ = channels; break;
    default: groups_ = 0;
  }
  std::fill(weight.value.begin(), weight.value.end(), zero_gamma ? 0.0f : 1.0f);
  // tau starts at 0 (the TLU starts as a ReLU), v at 1 (the papers' and timm's choices).
  if (kind == NormKind::evonorm) std::fill(extra.value.begin(), extra.value.end(), 1.0f);
}

std::vector<Param*> Norm::params() {
  if (kind_ == NormKind::none) return {&bias};
  if (frozen_) return {};
  if (fused_nonlinearity_) return {&weight, &bias, &extra};
  return {&weight, &bias};
}

const std::vector<float>& Norm::running_mean() const {
  static const std::vector<float> none;
  if (frozen_) return frozen_->running_mean;
  return batch_norm_ ? batch_norm_->running_mean : none;
}

const std::vector<float>& Norm::running_var() const {
  static const std::vector<float> none;
  if (frozen_) return frozen_->running_var;
  return batch_norm_ ? batch_norm_->running_var : none;
}

std::vector<Buffer> Norm::buffers() {
  const std::string base = bias.name.substr(0, bias.name.size() - 4);  // keep "<layer>."
  // BN's names, so that a BN checkpoint's tensors load into the frozen layer by name.
  if (frozen_)
    return {{weight.name, &weight.value},
            {bias.name, &bias.value},
            {base + "running_mean", &frozen_->running_mean},
            {base + "running_var", &frozen_->running_var}};
  if (!batch_norm_) return {};
  return {{base + "running_mean", &batch_norm_->running_mean},
          {base + "running_var", &batch_norm_->running_var}};
}

void Norm::set_sync(const SyncBatchNorm& sync) {
  if ((!batch_norm_ || kind_ == NormKind::batch_renorm) && sync.exchange)
    throw Error("Norm " + bias.name + ": only BatchNorm synchronizes across devices");
  sync_ = sync;
  weight.grad_summed_over_devices = bias.grad_summed_over_devices = sync.exchange != nullptr;
}

void Norm::set_cumulative_average(bool on) {
  if (!batch_norm_ || on == cumulative_) return;
  cumulative_ = on;
  if (on) {
    kept_momentum_ = batch_norm_->options.momentum;
    kept_batches_tracked_ = batch_norm_->num_batches_tracked;
    batch_norm_->options.momentum = std::nullopt;
    batch_norm_->num_batches_tracked = 0;
  } else {
    batch_norm_->options.momentum = kept_momentum_;
    batch_norm_->num_batches_tracked = kept_batches_tracked_;
  }
}

void Norm::set_renorm_limits(double r_max, double d_max) {
  auto text = [](double v) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", v);
    return std::string(b);
  };
  if (!(r_max >= 1))
    throw Error("Norm " + bias.name + ": r_max " + text(r_max) + " must be >= 1");
  if (!(d_max >= 0))
    throw Error("Norm " + bias.name + ": d_max " + text(d_max) + " must be >= 0");
  r_max_ = r_max;
  d_max_ = d_max;
}

const Tensor& Norm::forward(const Tensor& x, Mode mode, const Tensor* residual) {
  const profile::Scope timed(profile::Phase::norm_forward);
  y_.resize_like(x);
  const Activation act = relu_ ? Activation::relu : Activation::none;
  // What the backward needs, kept once the forward succeeded.
  auto keep = [&](bool synced) {
    had_residual_ = residual != nullptr;
    x_ = &x;
    trained_forward_ = mode == Mode::train;
    synced_forward_ = synced;
    renorm_forward_ = false;
  };
  if (mode == Mode::train && sync_.exchange != nullptr) {
    // The library's steps: this device's partial statistics, every device's merged over the
    // canonical tree (the same bits on every device), then this device's normalization.
    const int64_t c = x.c;
    partials_.resize(batch_norm_partials_size(sync_.offset, x.n, c));
    batch_norm_statistics_partials(sync_.offset, x.view(), partials_);
    const std::span<const double> all = sync_.exchange->exchange(partials_);
    save_mean_.resize(static_cast<size_t>(c));
    save_invstd_.resize(static_cast<size_t>(c));
    const BatchNormOptions& o = batch_norm_->options;
    // The layer's own momentum rule (nullopt: the cumulative average).
    const double momentum =
        o.momentum ? *o.momentum : 1.0 / static_cast<double>(batch_norm_->num_batches_tracked + 1);
    batch_norm_merge_statistics({.eps = o.eps, .momentum = momentum}, sync_.global_batch, all,
                                save_mean_, save_invstd_, batch_norm_->running_mean,
                                batch_norm_->running_var);
    ++batch_norm_->num_batches_tracked;
    batch_norm_normalize({.eps = o.eps,
                          .epilogue = {act, residual ? residual->view() : TensorView{}}},
                         x.view(), weight.value, bias.value, save_mean_, save_invstd_, y_.view());
    keep(true);
    return y_;
  }
  if (!layer_) {
    function_forward(x, residual);
    keep(false);
    return y_;
  }
  // brn in training (but not while precise statistics are gathered: those are bn's forwards).
  if (kind_ == NormKind::batch_renorm && mode == Mode::train && !cumulative_) {
    renorm_training_forward(x, residual);
    keep(false);
    renorm_forward_ = true;
    return y_;
  }
  layer_->train(mode == Mode::train);
  if (batch_norm_) batch_norm_->options.eval_batch_stats = mode == Mode::eval_batch_stats;
  layer_->weight = weight.value;
  layer_->bias = bias.value;
  // The layer checks x and the residual and fuses the epilogue into its output pass.
  layer_->forward(x.view(), {act, residual ? residual->view() : TensorView{}}, y_.view());
  keep(false);
  return y_;
}

// The backward epilogue of the BN-family training forwards here: through the fused ReLU (from
// y), and the residual's gradient g_ when the forward had a residual.
BackwardEpilogue Norm::relu_residual_epilogue() {
  return {.activation = relu_ ? Activation::relu : Activation::none,
          .y = relu_ ? y_.view() : TensorView{},
          .residual = {},
          .bias = {},
          .dresidual = had_residual_ ? g_.view() : TensorView{}};
}

const Tensor& Norm::backward(const Tensor& dy) {
  const profile::Scope timed(profile::Phase::norm_backward);
  if (!trained_forward_)
    throw Error("Norm " + bias.name + ": backward needs a preceding forward in training mode");
  dx_.resize_like(*x_);
  // g = relu ? dy * (y > 0) : dy is the residual's gradient; the layer writes it in the same
  // pass as its reductions when there is a residual to give it to.
  if (had_residual_) g_.resize_like(*x_);
  if (!layer_) return function_backward(dy);
  if (renorm_forward_) {
    const BackwardEpilogue epilogue = relu_residual_epilogue();
    batch_renorm_backward_training({.epilogue = epilogue}, dy.view(), x_->view(), save_mean_,
                                   save_invstd_, save_r_, save_d_, weight.value, dx_.view(),
                                   weight.grad, bias.grad);
    return dx_;
  }
  if (synced_forward_) {
    const BackwardEpilogue epilogue = relu_residual_epilogue();
    const int64_t c = x_->c;
    partials_.resize(batch_norm_partials_size(sync_.offset, x_->n, c));
    batch_norm_gradient_partials({.epilogue = epilogue}, sync_.offset, dy.view(), x_->view(),
                                 save_mean_, partials_);
    const std::span<const double> all = sync_.exchange->exchange(partials_);
    sum_g_.resize(static_cast<size_t>(c));
    sum_g_xmu_.resize(static_cast<size_t>(c));
    // weight.grad and bias.grad: the global batch's, the same on every device.
    batch_norm_merge_gradients(sync_.global_batch, all, save_invstd_, sum_g_, sum_g_xmu_,
                               weight.grad, bias.grad);
    batch_norm_backward_dx({.epilogue = epilogue}, sync_.global_batch, dy.view(), x_->view(),
                           save_mean_, save_invstd_, weight.value, sum_g_, sum_g_xmu_,
                           dx_.view());
    return dx_;
  }
  layer_->backward(dy.view(), dx_.view(), had_residual_ ? g_.view() : TensorView{});
  std::copy(layer_->weight_grad.begin(), layer_->weight_grad.end(), weight.grad.begin());
  std::copy(layer_->bias_grad.begin(), layer_->bias_grad.end(), bias.grad.begin());
  return dx_;
}

void Norm::renorm_training_forward(const Tensor& x, const Tensor* residual) {
  const size_t c = static_cast<size_t>(x.c);
  save_mean_.resize(c);
  save_invstd_.resize(c);
  save_r_.resize(c);
  save_d_.resize(c);
  const BatchNormOptions& o = batch_norm_->options;
  // The layer's momentum (bn's 0.1): r and d measure the batch against these running averages.
  const double momentum =
      o.momentum ? *o.momentum : 1.0 / static_cast<double>(batch_norm_->num_batches_tracked + 1);
  batch_renorm_forward_training(
      {.eps = o.eps,
       .momentum = momentum,
       .r_max = r_max_,
       .d_max = d_max_,
       .epilogue = {relu_ ? Activation::relu : Activation::none,
                    residual ? residual->view() : TensorView{}}},
      x.view(), weight.value, bias.value, y_.view(), save_mean_, save_invstd_, save_r_, save_d_,
      batch_norm_->running_mean, batch_norm_->running_var);
  ++batch_norm_->num_batches_tracked;
}

const Tensor& Norm::function_forward(const Tensor& x, const Tensor* residual) {
  if (residual && !residual->same_shape(x))
    throw Error("Norm " + bias.name + ": the residual's shape does not match the input's");
  const size_t c = static_cast<size_t>(x.c), n = static_cast<size_t>(x.n);
  // With a residual the op writes z_, and y = relu?(z + residual) follows.
  Tensor& out = residual ? z_ : y_;
  out.resize_like(x);
  if (kind_ == NormKind::frn) {
    op_rstd_.resize(n * c);
    // Without the TLU: tau = -inf, so max(z, tau) = z and tau gets no gradient.
    if (!fused_nonlinearity_) op_tau_.assign(c, -std::numeric_limits<float>::infinity());
    frn_forward(kFrnEps, x.view(), weight.value, bias.value,
                fused_nonlinearity_ ? extra.value : op_tau_, out.view(), op_rstd_);
  } else {
    const size_t g = static_cast<size_t>(groups_);
    op_mean_.resize(n * g);
    op_rstd_.resize(n * g);
    if (!fused_nonlinearity_) {
      // x * sigmoid(0) * rstd * (2 gamma) = x / std * gamma, exactly: the factors are powers of 2.
      op_v_.assign(c, 0.0f);
      op_weight_.resize(c);
      for (size_t i = 0; i < c; ++i) op_weight_[i] = 2.0f * weight.value[i];
    }
    evonorm_s0_forward({.num_groups = groups_, .eps = kEvoNormEps}, x.view(),
                       fused_nonlinearity_ ? extra.value : op_v_,
                       fused_nonlinearity_ ? weight.value : op_weight_, bias.value, out.view(),
                       op_mean_, op_rstd_);
  }
  if (residual) {
    const float* z = z_.ptr();
    const float* r = residual->ptr();
    float* y = y_.ptr();
    for (int64_t i = 0; i < x.numel(); ++i) {
      const float s = z[i] + r[i];
      y[i] = relu_ ? std::max(s, 0.0f) : s;
    }
  }
  return y_;
}

const Tensor& Norm::function_backward(const Tensor& dy) {
  if (!dy.same_shape(*x_))
    throw Error("Norm " + bias.name + ": backward dy shape does not match the forward input");
  const Tensor* d = &dy;
  if (had_residual_) {
    // The sum's gradient, masked by the ReLU: the residual's and the op's output's.
    const float* y = y_.ptr();
    const float* dyp = dy.ptr();
    float* g = g_.ptr();
    for (int64_t i = 0; i < dy.numel(); ++i) g[i] = !relu_ || y[i] > 0 ? dyp[i] : 0.0f;
    d = &g_;
  }
  if (kind_ == NormKind::frn) {
    frn_backward(d->view(), x_->view(), op_rstd_, weight.value, bias.value,
                 fused_nonlinearity_ ? extra.value : op_tau_, dx_.view(), weight.grad, bias.grad,
                 fused_nonlinearity_ ? std::span<float>(extra.grad) : std::span<float>());
    return dx_;
  }
  if (fused_nonlinearity_) {
    evonorm_s0_backward(groups_, d->view(), x_->view(), op_mean_, op_rstd_, extra.value,
                        weight.value, dx_.view(), extra.grad, weight.grad, bias.grad);
    return dx_;
  }
  op_dweight_.resize(weight.size());
  evonorm_s0_backward(groups_, d->view(), x_->view(), op_mean_, op_rstd_, op_v_, op_weight_,
                      dx_.view(), {}, op_dweight_, bias.grad);
  // The op's weight is 2 gamma.
  for (size_t i = 0; i < weight.size(); ++i) weight.grad[i] = 2.0f * op_dweight_[i];
  return dx_;
}

}  // namespace normkit::train
