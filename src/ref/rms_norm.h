#pragma once
// Reference RMSNorm: the plainest correct loops, accumulating in double; templated on the element
// type so the same code also runs entirely in double (the float64 oracle of the tests). Rows and
// their storage as the reference LayerNorm's (ref/layer_norm.h): `rows` rows of `cols` elements,
// weight (may be null) in logical order, channels-last rows when shape.channels > 0.
#include <cstdint>

#include "normkit/epilogue.h"
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::ref {

using plan::LayerNormShape;

// rstd = 1/sqrt(mean(x^2) + eps) per row; y = x * rstd * w[j]. Overwrites y and rstd (length
// rows). An empty row gets rstd NaN.
template <typename T>
void rms_norm_forward(const LayerNormShape& shape, double eps, const T* x, const T* weight, T* y,
                      T* rstd);

// With xhat = x * rstd and gw = dy * w over the row's M elements:
//   dx = rstd * (gw - xhat * mean(gw * xhat)),  dweight[k] = sum over rows of dy * xhat.
// Overwrites dx and (when not null) dweight.
template <typename T>
void rms_norm_backward(const LayerNormShape& shape, const T* dy, const T* x, const T* rstd,
                       const T* weight, T* dx, T* dweight);

// Views of any activation dtype with the fused residual add and epilogues (normkit/rms_norm.h),
// widened to double and rounded once to the output dtype, as the reference layer_norm's. With
// residual_in.data: sum_out = x + residual_in (rounded), and that is normalized.
//   backward: g = dy * act'(z); dresidual = g; dx = d(norm)(g) + dsum_out?; dweight from g.
void rms_norm_forward(const LayerNormShape& shape, double eps, const ForwardEpilogue& epilogue,
                      const TensorView& x, const float* weight, const TensorView& residual_in,
                      const TensorView& y, float* rstd, const TensorView& sum_out);
void rms_norm_backward(const LayerNormShape& shape, const BackwardEpilogue& epilogue,
                       const TensorView& dy, const TensorView& x, const float* rstd,
                       const float* weight, const TensorView& dsum_out, const TensorView& dx,
                       float* dweight);

}  // namespace normkit::ref
