#pragma once
// Fused epilogues: what a ResNet block does right after a normalization, done in the same pass
// over memory instead of one more.
//   forward:  y = relu?(normalized(x) + residual?)
//   backward: g = relu ? dy * (y > 0) : dy;  dx from g;  dresidual = g
#include "normkit/tensor.h"

namespace normkit {

struct ForwardEpilogue {
  bool relu = false;
  TensorView residual;  // absent when data == nullptr; else shape, format and dtype of x
};

struct BackwardEpilogue {
  bool relu = false;
  TensorView y;          // the forward's output; required with relu (its sign is the mask)
  TensorView dresidual;  // optional output, overwritten with g (the residual's gradient)
};

}  // namespace normkit
