#pragma once
// Fused epilogues: what a ResNet block or a diffusion UNet does right after a normalization,
// done in the same pass over memory instead of one more.
//   forward:  z = normalized(x) + residual?;  y = act(z), act one of
//             none: y = z;  relu: y = max(z, 0) (NaN stays NaN);  silu: y = z * sigmoid(z)
//   backward: g = dy * act'(z);  dx from g (the normalization's backward);  dresidual = g
//     relu: act'(z) = (y > 0), read from the forward's output y.
//     silu: act'(z) = s * (1 + z * (1 - s)) with s = sigmoid(z). silu is not invertible from
//           y, so z is recomputed from x and what the forward normalized it with (the saved
//           statistics, weight, and the bias and residual given here), in the passes the
//           backward makes over x anyway: no pass and no stored tensor more.
#include <span>

#include "normkit/tensor.h"

namespace normkit {

enum class Activation { none, relu, silu };

struct ForwardEpilogue {
  Activation activation = Activation::none;
  TensorView residual;  // absent when data == nullptr; else shape, format and dtype of x
};

struct BackwardEpilogue {
  Activation activation = Activation::none;
  TensorView y;          // the forward's output; required with relu (its sign is the mask)
  // With silu, the forward's residual and bias (read only with silu). Each is absent (data ==
  // nullptr, empty span) when the forward had none: then z is recomputed without it, so pass
  // exactly what the forward got. residual: shape, format and dtype of x; bias: the length of
  // the forward's bias (C, or the normalized size for LayerNorm).
  TensorView residual;
  std::span<const float> bias;
  TensorView dresidual;  // optional output, overwritten with g (the residual's gradient)
};

}  // namespace normkit
