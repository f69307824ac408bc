#pragma once
// Reference GroupNorm: the plainest correct loops, accumulating in double. The tests hold the
// optimized kernels against these. Templated on the element type so the same code also runs
// entirely in double (the float64 oracle of the accuracy and finite-difference tests).
//
// All kernels assume validated arguments (see src/api/group_norm.cpp). Layout: x is (N, C, S)
// with S the product of the spatial dims, stored channels_first (index (n*C + c)*S + s) or
// channels_last (index (n*S + s)*C + c). Group g of sample n holds channels
// g*C/G .. (g+1)*C/G - 1; its statistics live at index n*G + g. weight, bias, dweight, dbias may
// be null. Arguments come in the public API's order: the shape and scalar parameters, then the
// inputs, then the outputs.
#include <cstdint>
#include <vector>

#include "normkit/epilogue.h"
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::ref {

using plan::GroupNormShape;

// Overwrites y, mean and rstd (N*G each). An empty group gets mean 0 and rstd NaN (as torch).
// variance (N*G, may be null) receives the biased variance of each group.
template <typename T>
void group_norm_forward(const GroupNormShape& shape, double eps, const T* x, const T* weight,
                        const T* bias, T* y, T* mean, T* rstd, T* variance = nullptr);

// Overwrites y = (x - mean) * rstd * weight + bias with the given per-(n, g) mean and rstd.
template <typename T>
void group_norm_apply(const GroupNormShape& shape, const T* x, const T* mean, const T* rstd,
                      const T* weight, const T* bias, T* y);

// Overwrites dx and (when not null) dweight, dbias. With stats_are_constants the gradient does
// not flow through mean and rstd (they came from outside, e.g. running statistics).
template <typename T>
void group_norm_backward(const GroupNormShape& shape, bool stats_are_constants, const T* dy,
                         const T* x, const T* mean, const T* rstd, const T* weight, T* dx,
                         T* dweight, T* dbias);

// Views of any activation dtype (float32, bfloat16, float16) with the fused epilogues of
// normkit/epilogue.h: activations are widened to double, the double kernels above run, the
// epilogue is applied in double, and results are rounded once to the output dtype. Statistics
// and per-channel vectors are float32, as in the public API. Allocates (reference backend).
//   forward: y = act(norm(x) + residual?)
//   backward: g = dy * act'(z) (relu: y > 0; silu: z recomputed from x, mean, rstd, weight,
//   epilogue.bias and epilogue.residual); dresidual = g; dx, dweight, dbias from g.
void group_norm_forward(const GroupNormShape& shape, double eps, const ForwardEpilogue& epilogue,
                        const TensorView& x, const float* weight, const float* bias,
                        const TensorView& y, float* mean, float* rstd, float* variance = nullptr);
void group_norm_apply(const GroupNormShape& shape, const ForwardEpilogue& epilogue,
                      const TensorView& x, const float* mean, const float* rstd,
                      const float* weight, const float* bias, const TensorView& y);
void group_norm_backward(const GroupNormShape& shape, bool stats_are_constants,
                         const BackwardEpilogue& epilogue, const TensorView& dy,
                         const TensorView& x, const float* mean, const float* rstd,
                         const float* weight, const TensorView& dx, float* dweight,
                         float* dbias);

// Activations of a view as double, and back (rounded to nearest even for 16-bit dtypes).
std::vector<double> widen(const TensorView& t, int64_t count);
void narrow(const std::vector<double>& v, const TensorView& t);

}  // namespace normkit::ref
