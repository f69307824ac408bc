#include "nn/sgd.h"

namespace normkit::train {

void sgd_step(const std::vector<Param*>& params, double lr, const SgdConfig& config) {
  const float mu = static_cast<float>(config.momentum);
  const float wd = static_cast<float>(config.weight_decay);
  const float rate = static_cast<float>(lr);
  for (Param* p : params) {
    float* w = p->value.data();
    float* v = p->momentum.data();
    const float* g = p->grad.data();
    const size_t n = p->size();
    for (size_t i = 0; i < n; ++i) {
      v[i] = mu * v[i] + (g[i] + wd * w[i]);
      w[i] -= rate * v[i];
    }
  }
}

}  // namespace normkit::train
