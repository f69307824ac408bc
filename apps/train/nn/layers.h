#pragma once
// The small layers of the model's head: global average pooling, a fully connected layer and the
// softmax cross-entropy loss.
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
