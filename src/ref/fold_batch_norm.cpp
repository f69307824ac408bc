#include "ref/fold_batch_norm.h"

#include <cmath>

namespace normkit::ref {

template <typename P>
void fold_batch_norm(double eps, int64_t out_channels, int64_t per_channel, const P* layer_weight,
                     const P* layer_bias, const P* running_mean, const P* running_var,
                     const P* bn_weight, const P* bn_bias, P* folded_weight, P* folded_bias) {
  for (int64_t c = 0; c < out_channels; ++c) {
    // Every input of channel c is read before its outputs are written: in place is safe.
    const double gamma = bn_weight ? double(bn_weight[c]) : 1.0;
    const double beta = bn_bias ? double(bn_bias[c]) : 0.0;
    const double bias = layer_bias ? double(layer_bias[c]) : 0.0;
    const double mean = double(running_mean[c]);
    const double scale = gamma / std::sqrt(double(running_var[c]) + eps);
    const P* w = layer_weight + c * per_channel;
    P* out = folded_weight + c * per_channel;
    for (int64_t k = 0; k < per_channel; ++k) out[k] = static_cast<P>(double(w[k]) * scale);
    folded_bias[c] = static_cast<P>((bias - mean) * scale + beta);
  }
}

template void fold_batch_norm<float>(double, int64_t, int64_t, const float*, const float*,
                                     const float*, const float*, const float*, const float*,
                                     float*, float*);
}  // namespace normkit::ref
