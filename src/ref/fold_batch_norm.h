#pragma once
// Reference (and only) BatchNorm folding, in double: see normkit/fold_batch_norm.h. Assumes
// validated arguments (src/api/fold_batch_norm.cpp). P is float (the parameter type, as in
// ref/batch_norm.h). layer_bias, bn_weight and bn_bias may be null.
#include <cstdint>

namespace normkit::ref {

template <typename P>
void fold_batch_norm(double eps, int64_t out_channels, int64_t per_channel, const P* layer_weight,
                     const P* layer_bias, const P* running_mean, const P* running_var,
                     const P* bn_weight, const P* bn_bias, P* folded_weight, P* folded_bias);

}  // namespace normkit::ref
