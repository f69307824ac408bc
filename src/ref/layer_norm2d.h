#pragma once
// Reference LayerNorm2d for channels-first x: (batch, channels, spatial) stored in that order,
// each position (n, s) normalized over its channels. Accumulates in double; templated so the
// same loops run in double (the tests' float64 oracle). weight, bias, dweight, dbias may be null.
#include <cstdint>

#include "normkit/tensor.h"

namespace normkit::ref {

struct LayerNorm2dShape {
  int64_t batch = 0, channels = 0, spatial = 0;
};

// Overwrites y, mean and rstd (length batch * spatial). No channels: mean 0, rstd NaN (as torch).
template <typename T>
void layer_norm2d_forward(const LayerNorm2dShape& shape, double eps, const T* x, const T* weight,
                          const T* bias, T* y, T* mean, T* rstd);

// Overwrites dx and (when not null) dweight, dbias; the gradient flows through mean and rstd.
template <typename T>
void layer_norm2d_backward(const LayerNorm2dShape& shape, const T* dy, const T* x, const T* mean,
                           const T* rstd, const T* weight, T* dx, T* dweight, T* dbias);

// Views of any activation dtype: widened to double, the double loops above, rounded once.
void layer_norm2d_forward(const LayerNorm2dShape& shape, double eps, const TensorView& x,
                          const float* weight, const float* bias, const TensorView& y,
                          float* mean, float* rstd);
void layer_norm2d_backward(const LayerNorm2dShape& shape, const TensorView& dy,
                           const TensorView& x, const float* mean, const float* rstd,
                           const float* weight, const TensorView& dx, float* dweight,
                           float* dbias);

}  // namespace normkit::ref
