#include "nn/norm.h"

#include <algorithm>
#include <limits>

#include "nn/kernels.h"
#include "nn/parallel.h"
#include "nn/profile.h"
#include "normkit/batch_norm.h"
#include "normkit/error.h"
#include "normkit/group_norm.h"

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

Norm::Norm(const std::string& name, NormKind kind, int channels, int groups, bool zero_gamma,
           bool relu)
    : weight(name + ".weight", kind == NormKind::none ? 0 : channels),
      bias(name + ".bias", channels), kind_(kind), channels_(channels), relu_(relu) {
  switch (kind) {
    case NormKind::group:
      if (groups < 1 || channels % groups != 0)
        throw Error("--groups " + std::to_string(groups) + " does not divide the " +
                    std::to_string(channels) + " channels of " + name +
                    ": choose a group count that divides every layer width");
      groups_ = groups;
      break;
    case NormKind::layer: groups_ = 1; break;
    case NormKind::instance: groups_ = channels; break;
    default: groups_ = 0;
  }
  std::fill(weight.value.begin(), weight.value.end(), zero_gamma ? 0.0f : 1.0f);
  if (kind == NormKind::batch) {
    running_mean.assign(channels, 0.0f);
    running_var.assign(channels, 1.0f);
  }
}

std::vector<Param*> Norm::params() {
  if (kind_ == NormKind::none) return {&bias};
  return {&weight, &bias};
}

std::vector<Buffer> Norm::buffers() {
  if (kind_ != NormKind::batch) return {};
  const std::string base = bias.name.substr(0, bias.name.size() - 4);  // keep "<layer>."
  return {{base + "running_mean", &running_mean}, {base + "running_var", &running_var}};
}

const Tensor& Norm::forward(const Tensor& x, Mode mode, const Tensor* residual) {
  const profile::Scope timed(profile::Phase::norm_forward);
  if (x.c != channels_)
    throw Error("Norm " + bias.name + ": input has " + std::to_string(x.c) +
                " channels, expected " + std::to_string(channels_));
  if (residual && !residual->same_shape(x))
    throw Error("Norm " + bias.name + ": the residual's shape differs from the input's");
  had_residual_ = residual != nullptr;
  x_ = &x;
  trained_forward_ = mode == Mode::train;
  y_.resize_like(x);
  const TensorView xv = x.view(), yv = y_.view();
  // normkit fuses the epilogue into its output pass.
  const ForwardEpilogue epilogue{relu_, residual ? residual->view() : TensorView{}};
  switch (kind_) {
    case NormKind::batch: {
      BatchNormParams p;  // eps 1e-5, momentum 0.1 (PyTorch's defaults)
      p.epilogue = epilogue;
      mean_.resize(channels_);
      rstd_.resize(channels_);
      if (mode == Mode::eval)
        batch_norm_forward_inference(p, xv, weight.value, bias.value, running_mean, running_var,
                                     yv);
      else if (mode == Mode::train)
        batch_norm_forward_training(p, xv, weight.value, bias.value, yv, mean_, rstd_,
                                    running_mean, running_var);
      else
        batch_norm_forward_training(p, xv, weight.value, bias.value, yv, mean_, rstd_, {}, {});
      break;
    }
    case NormKind::group:
    case NormKind::layer:
    case NormKind::instance: {
      GroupNormParams p{groups_, 1e-5};
      p.epilogue = epilogue;
      mean_.resize(static_cast<size_t>(x.n * groups_));
      rstd_.resize(static_cast<size_t>(x.n * groups_));
      group_norm_forward(p, xv, weight.value, bias.value, yv, mean_, rstd_);
      break;
    }
    case NormKind::none: {
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
      break;
    }
  }
  return y_;
}

const Tensor& Norm::backward(const Tensor& dy) {
  const profile::Scope timed(profile::Phase::norm_backward);
  if (!trained_forward_)
    throw Error("Norm " + bias.name + ": backward needs a preceding forward in training mode");
  if (!dy.same_shape(y_))
    throw Error("Norm " + bias.name + ": backward dy shape does not match the forward output");
  const Tensor& x = *x_;
  dx_.resize_like(x);
  // g = relu ? dy * (y > 0) : dy is the residual's gradient; normkit writes it in the same
  // pass as its reductions when there is a residual to give it to.
  if (had_residual_) g_.resize_like(dy);
  const BackwardEpilogue epilogue{relu_, relu_ ? y_.view() : TensorView{},
                                  had_residual_ ? g_.view() : TensorView{}};
  switch (kind_) {
    case NormKind::batch:
      batch_norm_backward_training(epilogue, dy.view(), x.view(), mean_, rstd_, weight.value,
                                   dx_.view(), weight.grad, bias.grad);
      break;
    case NormKind::group:
    case NormKind::layer:
    case NormKind::instance:
      group_norm_backward(GroupNormParams{groups_, 1e-5}, epilogue, dy.view(), x.view(), mean_,
                          rstd_, weight.value, dx_.view(), weight.grad, bias.grad);
      break;
    case NormKind::none: {
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
      break;
    }
  }
  return dx_;
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
