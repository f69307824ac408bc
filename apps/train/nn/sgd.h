#pragma once
// SGD with momentum as PyTorch implements it (dampening 0, not Nesterov), weight decay on every
// parameter (convolution weights, norm gammas and betas, the classifier's weight and bias):
//   g = grad + weight_decay * w;  v = momentum * v + g;  w = w - lr * v
#include <vector>

#include "nn/param.h"

namespace normkit::train {

struct SgdConfig {
  double momentum = 0.9;
  double weight_decay = 1e-4;
};

// Reads each param's grad; updates its value and momentum buffer in place.
void sgd_step(const std::vector<Param*>& params, double lr, const SgdConfig& config);

}  // namespace normkit::train
