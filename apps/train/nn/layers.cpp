#include "nn/layers.h"

#include <algorithm>
#include <cmath>

#include "normkit/error.h"

namespace normkit::train {

const Tensor& GlobalAvgPool::forward(const Tensor& x) {
  h_ = x.h;
  w_ = x.w;
  y_.resize(x.n, 1, 1, x.c);
  const int64_t hw = x.h * x.w, c = x.c;
  const double scale = 1.0 / static_cast<double>(hw);
  const float* xp = x.ptr();
  float* yp = y_.ptr();
  for (int64_t n = 0; n < x.n; ++n)
    for (int64_t j = 0; j < c; ++j) {
      double s = 0;
      for (int64_t p = 0; p < hw; ++p) s += xp[(n * hw + p) * c + j];
      yp[n * c + j] = static_cast<float>(s * scale);
    }
  return y_;
}

const Tensor& GlobalAvgPool::backward(const Tensor& dy) {
  dx_.resize(dy.n, h_, w_, dy.c);
  const int64_t hw = h_ * w_, c = dy.c;
  const float scale = 1.0f / static_cast<float>(hw);
  const float* g = dy.ptr();
  float* d = dx_.ptr();
  for (int64_t n = 0; n < dy.n; ++n)
    for (int64_t p = 0; p < hw; ++p)
      for (int64_t j = 0; j < c; ++j) d[(n * hw + p) * c + j] = g[n * c + j] * scale;
  return dx_;
}

Linear::Linear(const std::string& name, int in_features, int out_features)
    : weight(name + ".weight", static_cast<size_t>(in_features) * out_features),
      bias(name + ".bias", out_features), in_(in_features), out_(out_features) {}

void Linear::init(Rng& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_));
  for (float& w : weight.value) w = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
  for (float& b : bias.value) b = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
}

const Tensor& Linear::forward(const Tensor& x) {
  if (x.h * x.w * x.c != in_)
    throw Error("Linear " + weight.name + ": input has " + std::to_string(x.h * x.w * x.c) +
                " features, expected " + std::to_string(in_));
  x_ = &x;
  y_.resize(x.n, 1, 1, out_);
  const float* xp = x.ptr();
  const float* wp = weight.value.data();
  for (int64_t n = 0; n < x.n; ++n)
    for (int o = 0; o < out_; ++o) {
      double s = bias.value[o];
      for (int i = 0; i < in_; ++i) s += static_cast<double>(xp[n * in_ + i]) * wp[o * in_ + i];
      y_.data[n * out_ + o] = static_cast<float>(s);
    }
  return y_;
}

const Tensor& Linear::backward(const Tensor& dy) {
  const Tensor& x = *x_;
  dx_.resize_like(x);
  const float* g = dy.ptr();
  const float* xp = x.ptr();
  for (int o = 0; o < out_; ++o) {
    double sb = 0;
    for (int64_t n = 0; n < x.n; ++n) sb += g[n * out_ + o];
    bias.grad[o] = static_cast<float>(sb);
    for (int i = 0; i < in_; ++i) {
      double s = 0;
      for (int64_t n = 0; n < x.n; ++n) s += static_cast<double>(g[n * out_ + o]) * xp[n * in_ + i];
      weight.grad[o * in_ + i] = static_cast<float>(s);
    }
  }
  for (int64_t n = 0; n < x.n; ++n)
    for (int i = 0; i < in_; ++i) {
      double s = 0;
      for (int o = 0; o < out_; ++o)
        s += static_cast<double>(g[n * out_ + o]) * weight.value[o * in_ + i];
      dx_.data[n * in_ + i] = static_cast<float>(s);
    }
  return dx_;
}

namespace {
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

Dropout::Dropout(double p) : p_(p), scale_(static_cast<float>(1.0 / (1.0 - p))) {
  if (!(p >= 0 && p < 1)) throw Error("Dropout: p = " + std::to_string(p) + " must be in [0, 1)");
}

bool Dropout::keeps(uint64_t sample_key, int64_t feature) const {
  const uint64_t bits = mix(sample_key ^ mix(static_cast<uint64_t>(feature) + 1));
  return static_cast<double>(bits >> 11) * 0x1.0p-53 >= p_;
}

const Tensor& Dropout::forward(const Tensor& x, const std::vector<uint64_t>& sample_keys) {
  if (static_cast<int64_t>(sample_keys.size()) != x.n)
    throw Error("Dropout: " + std::to_string(sample_keys.size()) + " sample keys for " +
                std::to_string(x.n) + " samples");
  y_.resize_like(x);
  mask_.resize_like(x);
  const int64_t features = x.h * x.w * x.c;
  for (int64_t n = 0; n < x.n; ++n)
    for (int64_t j = 0; j < features; ++j) {
      const int64_t i = n * features + j;
      mask_.data[i] = keeps(sample_keys[n], j) ? scale_ : 0.0f;
      y_.data[i] = x.data[i] * mask_.data[i];
    }
  return y_;
}

const Tensor& Dropout::backward(const Tensor& dy) {
  dx_.resize_like(dy);
  for (size_t i = 0; i < dy.data.size(); ++i) dx_.data[i] = dy.data[i] * mask_.data[i];
  return dx_;
}

double SoftmaxCrossEntropy::forward(const Tensor& logits, const uint8_t* labels) {
  const int64_t n = logits.n, k = logits.h * logits.w * logits.c;
  dlogits_.resize_like(logits);
  correct_ = 0;
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float* z = logits.ptr() + i * k;
    float* d = dlogits_.ptr() + i * k;
    if (labels[i] >= k)
      throw Error("SoftmaxCrossEntropy: label " + std::to_string(labels[i]) + " is not below the " +
                  std::to_string(k) + " classes");
    const int64_t arg = std::max_element(z, z + k) - z;
    correct_ += arg == labels[i];
    // log-sum-exp shifted by the max, in double.
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) sum += std::exp(static_cast<double>(z[j]) - z[arg]);
    const double log_sum = std::log(sum) + z[arg];
    total += log_sum - z[labels[i]];
    for (int64_t j = 0; j < k; ++j) {
      const double p = std::exp(static_cast<double>(z[j]) - log_sum);
      d[j] = static_cast<float>((p - (j == labels[i] ? 1.0 : 0.0)) / static_cast<double>(n));
    }
  }
  return total / static_cast<double>(n);
}

}  // namespace normkit::train
