#include "nn/sgd.h"

#include "nn/kernels.h"

namespace normkit::train {

void sgd_step(const std::vector<Param*>& params, double lr, const SgdConfig& config) {
  const float mu = static_cast<float>(config.momentum);
  const float wd = static_cast<float>(config.weight_decay);
  const float rate = static_cast<float>(lr);
  for (Param* p : params)
    kernels::sgd_update(p->value.data(), p->momentum.data(), p->grad.data(),
                        static_cast<int64_t>(p->size()), rate, mu, wd);
}

}  // namespace normkit::train
