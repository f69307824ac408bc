#include "nn/norm.h"

#include <algorithm>
#include <limits>

#include "nn/kernels.h"
#include "nn/parallel.h"
#include "nn/profile.h"
#include "normkit/error.h"

namespace normkit::train {

NormKind parse_norm_kind(const std::string& s) {
  if (s == "bn") return NormKind::batch;
  if (s == "gn") return NormKind::group;
  if (s == "ln") return NormKind::layer;
  if (s == "in") return NormKind::instance;
  if (s == "none") return NormKind::none;
  throw Error("unknown norm '" + s + "': expected one of bn, gn, ln, in, none");
}

const char* to_string(NormKind kind) {
  switch (kind) {
    case NormKind::batch: return "bn";
    case NormKind::group: return "gn";
    case NormKind::layer: return "ln";
    case NormKind::instance: return "in";
    case NormKind::none: return "none";
  }
  return "?";
}

std::unique_ptr<NormLayer> make_norm_layer(const std::string& name, NormKind kind, int channels,
                                           int groups) {
  switch (kind) {
    case NormKind::batch: return std::make_unique<BatchNorm>(channels);  // momentum 0.1, eps 1e-5
    case NormKind::group:
      try {
        return std::make_unique<GroupNorm>(groups, channels);
      } catch (const Error& e) {
        // The layer's reason, with what the user can change.
        throw Error("--groups " + std::to_string(groups) + " does not divide the " +
                    std::to_string(channels) + " channels of " + name + " (" + e.what() +
                    "): choose a group count that divides every layer width");
      }
    case NormKind::layer: return std::make_unique<LayerNorm>(channels);
    case NormKind::instance:
      return std::make_unique<InstanceNorm>(channels, InstanceNormOptions{.affine = true});
    case NormKind::none: return nullptr;
  }
  return nullptr;
}

Norm::Norm(const std::string& name, NormKind kind, int channels, int groups, bool zero_gamma,
           bool relu)
    : weight(name + ".weight", kind == NormKind::none ? 0 : channels),
      bias(name + ".bias", channels), kind_(kind), channels_(channels), relu_(relu),
      layer_(make_norm_layer(name, kind, channels, groups)),
      batch_norm_(dynamic_cast<BatchNorm*>(layer_.get())) {
  switch (kind) {
    case NormKind::group: groups_ = groups; break;
    case NormKind::layer: groups_ = 1; break;
    case NormKind::instance: groups_ = channels; break;
    default: groups_ = 0;
  }
  std::fill(weight.value.begin(), weight.value.end(), zero_gamma ? 0.0f : 1.0f);
}

std::vector<Param*> Norm::params() {
  if (kind_ == NormKind::none) return {&bias};
  return {&weight, &bias};
}

const std::vector<float>& Norm::running_mean() const {
  static const std::vector<float> none;
  return batch_norm_ ? batch_norm_->running_mean : none;
}

const std::vector<float>& Norm::running_var() const {
  static const std::vector<float> none;
  return batch_norm_ ? batch_norm_->running_var : none;
}

std::vector<Buffer> Norm::buffers() {
  if (!batch_norm_) return {};
  const std::string base = bias.name.substr(0, bias.name.size() - 4);  // keep "<layer>."
  return {{base + "running_mean", &batch_norm_->running_mean},
          {base + "running_var", &batch_norm_->running_var}};
}

const Tensor& Norm::forward(const Tensor& x, Mode mode, const Tensor* residual) {
  const profile::Scope timed(profile::Phase::norm_forward);
  y_.resize_like(x);
  if (layer_) {
    layer_->train(mode == Mode::train);
    if (batch_norm_) batch_norm_->options.eval_batch_stats = mode == Mode::eval_batch_stats;
    layer_->weight = weight.value;
    layer_->bias = bias.value;
    // The layer checks x and the residual and fuses the epilogue into its output pass.
    layer_->forward(x.view(), {relu_, residual ? residual->view() : TensorView{}}, y_.view());
  } else {
    forward_bias(x, residual);
  }
  had_residual_ = residual != nullptr;
  x_ = &x;
  trained_forward_ = mode == Mode::train;
  return y_;
}

void Norm::forward_bias(const Tensor& x, const Tensor* residual) {
  if (x.c != channels_)
    throw Error("Norm " + bias.name + ": input has " + std::to_string(x.c) +
                " channels, expected " + std::to_string(channels_));
  if (residual && !residual->same_shape(x))
    throw Error("Norm " + bias.name + ": the residual's shape differs from the input's");
  const int64_t rows = x.pixels(), c = channels_;
  const float* xp = x.ptr();
  const float* b = bias.value.data();
  float* yp = y_.ptr();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < c; ++j) yp[r * c + j] = xp[r * c + j] + b[j];
  if (residual || relu_) {
    const float* res = residual ? residual->ptr() : nullptr;
    const bool relu = relu_;
    parallel_chunks(y_.numel(), [&](int64_t begin, int64_t end) {
      kernels::add_relu(yp + begin, res ? res + begin : nullptr, end - begin, relu);
    });
  }
}

const Tensor& Norm::backward(const Tensor& dy) {
  const profile::Scope timed(profile::Phase::norm_backward);
  if (!trained_forward_)
    throw Error("Norm " + bias.name + ": backward needs a preceding forward in training mode");
  dx_.resize_like(*x_);
  // g = relu ? dy * (y > 0) : dy is the residual's gradient; it is written in the same pass as
  // the layer's reductions when there is a residual to give it to.
  if (had_residual_) g_.resize_like(*x_);
  if (layer_) {
    layer_->backward(dy.view(), dx_.view(), had_residual_ ? g_.view() : TensorView{});
    std::copy(layer_->weight_grad.begin(), layer_->weight_grad.end(), weight.grad.begin());
    std::copy(layer_->bias_grad.begin(), layer_->bias_grad.end(), bias.grad.begin());
  } else {
    backward_bias(dy);
  }
  return dx_;
}

void Norm::backward_bias(const Tensor& dy) {
  if (!dy.same_shape(y_))
    throw Error("Norm " + bias.name + ": backward dy shape does not match the forward output");
  // Without normalization dx is g itself.
  const float* d = dy.ptr();
  float* out = dx_.ptr();
  if (relu_) {
    const float* yp = y_.ptr();
    parallel_chunks(y_.numel(), [&](int64_t begin, int64_t end) {
      kernels::relu_mask(out + begin, d + begin, yp + begin, end - begin);
    });
  } else {
    std::copy_n(d, dy.numel(), out);
  }
  column_sums(out, dy.pixels(), channels_, bias.grad.data(), sums_);
  if (had_residual_) std::copy_n(out, dy.numel(), g_.ptr());
}

void column_sums(const float* x, int64_t rows, int64_t cols, float* out,
                 std::vector<double>& partial) {
  // Fixed chunks of rows summed in parallel, then the chunks in order: the same bits for any
  // thread count.
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (rows + kChunk - 1) / kChunk;
  partial.assign(static_cast<size_t>(std::max<int64_t>(chunks, 1) * cols), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    double* p = partial.data() + ch * cols;
    for (int64_t r = ch * kChunk; r < std::min(rows, (ch + 1) * kChunk); ++r)
      for (int64_t j = 0; j < cols; ++j) p[j] += x[r * cols + j];
  }
  for (int64_t j = 0; j < cols; ++j) {
    double s = 0;
    for (int64_t ch = 0; ch < chunks; ++ch) s += partial[ch * cols + j];
    out[j] = static_cast<float>(s);
  }
}

}  // namespace normkit::train
