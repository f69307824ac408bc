#pragma once
// The small layers of the model's head: global average pooling, dropout, a fully connected layer
// and the softmax cross-entropy loss.
#include <cstdint>
#include <string>
#include <vector>

#include "nn/param.h"
#include "nn/rng.h"
#include "nn/tensor.h"

namespace normkit::train {

// (N, H, W, C) -> (N, 1, 1, C): the mean over H*W.
class GlobalAvgPool {
 public:
  const Tensor& forward(const Tensor& x);
  // Reads dy (N, 1, 1, C). Returns dx (shape of x), owned here: dy / (H*W) at every position.
  const Tensor& backward(const Tensor& dy);

 private:
  int64_t h_ = 0, w_ = 0;
  Tensor y_, dx_;
};

// (N, 1, 1, in) -> (N, 1, 1, out): y = x W^T + b, W stored (out, in).
class Linear {
 public:
  Linear(const std::string& name, int in_features, int out_features);
  // PyTorch's default: weight and bias uniform in +-1/sqrt(in_features).
  void init(Rng& rng);
  const Tensor& forward(const Tensor& x);  // x must stay unchanged until backward
  // Overwrites weight.grad and bias.grad. Returns dx, owned here.
  const Tensor& backward(const Tensor& dy);

  Param weight, bias;

 private:
  int in_, out_;
  const Tensor* x_ = nullptr;
  Tensor y_, dx_;
};

// Inverted dropout on (N, 1, 1, C) features in training: each feature kept with probability
// 1 - p and then scaled by 1 / (1 - p), else zeroed. Sample n's mask is a function of
// sample_keys[n] alone (feature j kept iff uniform(key, j) >= p, a counter-based hash), so it
// does not depend on the batch the sample is in, its position there, the device or the thread.
class Dropout {
 public:
  // Throws normkit::Error unless 0 <= p < 1.
  explicit Dropout(double p);
  // Reads x and one key per sample (throws normkit::Error naming both counts otherwise).
  // Returns the dropped-out x, owned here.
  const Tensor& forward(const Tensor& x, const std::vector<uint64_t>& sample_keys);
  // Reads dy (shape of the last forward's x). Returns dx = dy * mask / (1 - p), owned here.
  const Tensor& backward(const Tensor& dy);
  // Whether feature `feature` of the sample with this key is kept.
  bool keeps(uint64_t sample_key, int64_t feature) const;
  double p() const { return p_; }

 private:
  double p_;
  float scale_;
  Tensor y_, dx_, mask_;  // mask_: the last forward's 0 or 1 / (1 - p) per feature
};

// Mean over the batch of -log softmax(logits)[label].
class SoftmaxCrossEntropy {
 public:
  // Reads logits (N, 1, 1, K) and N labels in [0, K). Returns the mean loss; keeps the gradient
  // d(mean loss)/d(logits) and the count of correct arg-max predictions.
  double forward(const Tensor& logits, const uint8_t* labels);
  const Tensor& gradient() const { return dlogits_; }
  int64_t correct() const { return correct_; }

 private:
  Tensor dlogits_;
  int64_t correct_ = 0;
};

}  // namespace normkit::train
