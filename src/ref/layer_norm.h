#pragma once
// Reference LayerNorm: the plainest correct loops, accumulating in double; templated on the
// element type so the same code also runs entirely in double (the float64 oracle of the tests).
//
// x is `rows` rows of `cols` elements, row i at x + i * cols. Each row is normalized over its
// elements; weight and bias (length cols, may be null) are indexed in logical order. A row is
// stored in logical order when channels == 0; with channels > 0 it is stored channels-last: the
// logical (c, s) element, c < channels, s < cols / channels, sits at s * channels + c.
// Arguments come in the public API's order: the shape and scalar parameters, then the inputs,
// then the outputs.
#include <cstdint>

#include "normkit/epilogue.h"
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::ref {

using plan::LayerNormShape;
using plan::layer_norm_logical_index;

// Overwrites y, mean and rstd (length rows). An empty row gets mean 0 and rstd NaN (as torch).
template <typename T>
void layer_norm_forward(const LayerNormShape& shape, double eps, const T* x, const T* weight,
                        const T* bias, T* y, T* mean, T* rstd);

// Overwrites dx and (when not null) dweight, dbias; the gradient flows through mean and rstd.
template <typename T>
void layer_norm_backward(const LayerNormShape& shape, const T* dy, const T* x, const T* mean,
                         const T* rstd, const T* weight, T* dx, T* dweight, T* dbias);

// Views of any activation dtype (float32, bfloat16, float16) with the fused epilogues of
// normkit/epilogue.h: activations are widened to double, the double kernels above run, the
// epilogue is applied in double, and results are rounded once to the output dtype. Statistics
// and weight vectors are float32, as in the public API. Allocates (reference backend).
//   forward: y = act(norm(x) + residual?)
//   backward: g = dy * act'(z) (relu: y > 0; silu: z recomputed from x, mean, rstd, weight,
//   epilogue.bias and epilogue.residual); dresidual = g; dx, dweight, dbias from g.
void layer_norm_forward(const LayerNormShape& shape, double eps, const ForwardEpilogue& epilogue,
                        const TensorView& x, const float* weight, const float* bias,
                        const TensorView& y, float* mean, float* rstd);
void layer_norm_backward(const LayerNormShape& shape, const BackwardEpilogue& epilogue,
                         const TensorView& dy, const TensorView& x, const float* mean,
                         const float* rstd, const float* weight, const TensorView& dx,
                         float* dweight, float* dbias);

}  // namespace normkit::ref
