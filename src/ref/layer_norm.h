#pragma once
// Reference LayerNorm: the plainest correct loops, accumulating in double; templated on the
// element type so the same code also runs entirely in double (the float64 oracle of the tests).
//
// x is `rows` rows of `cols` elements, row i at x + i * cols. Each row is normalized over its
// elements; weight and bias (length cols, may be null) are indexed in logical order. A row is
// stored in logical order when channels == 0; with channels > 0 it is stored channels-last: the
// logical (c, s) element, c < channels, s < cols / channels, sits at s * channels + c.
#include <cstdint>

#include "normkit/epilogue.h"
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::ref {

using plan::LayerNormShape;
using plan::layer_norm_logical_index;

// Writes y, mean and rstd (length rows). An empty row gets mean 0 and rstd NaN (as torch).
template <typename T>
void layer_norm_forward(T* y, T* mean, T* rstd, const T* x, const T* weight, const T* bias,
                        const LayerNormShape& shape, double eps);

// Writes dx and (when not null) dweight, dbias; the gradient flows through mean and rstd.
template <typename T>
void layer_norm_backward(T* dx, T* dweight, T* dbias, const T* dy, const T* x, const T* mean,
                         const T* rstd, const T* weight, const LayerNormShape& shape);

// Views of any activation dtype (float32, bfloat16, float16) with the fused epilogues of
// normkit/epilogue.h: activations are widened to double, the double kernels above run, the
// epilogue is applied in double, and results are rounded once to the output dtype. Statistics
// and weight vectors are float32, as in the public API. Allocates (reference backend).
//   forward: y = relu?(norm(x) + residual?)
//   backward: g = relu ? dy * (y > 0) : dy; dresidual = g; dx, dweight, dbias from g.
void layer_norm_forward(const TensorView& y, float* mean, float* rstd, const TensorView& x,
                        const float* weight, const float* bias, const LayerNormShape& shape,
                        double eps, const ForwardEpilogue& epilogue);
void layer_norm_backward(const TensorView& dx, float* dweight, float* dbias, const TensorView& dy,
                         const TensorView& x, const float* mean, const float* rstd,
                         const float* weight, const LayerNormShape& shape,
                         const BackwardEpilogue& epilogue);

}  // namespace normkit::ref
