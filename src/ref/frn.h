#pragma once
// Reference FRN + TLU (normkit/frn.h): the plainest correct loops, in double, on activations of
// any dtype widened to double and rounded once to the output dtype. The tests hold the CPU
// kernels against these. Arguments validated (src/api/frn.cpp); shape.groups is ignored (one
// statistic per (n, c)); the statistics live at n * C + c. dweight, dbias, dtau, deps may be
// null.
// Allocates freely.
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::ref {

void frn_forward(const plan::GroupNormShape& shape, double eps, const TensorView& x,
                 const float* weight, const float* bias, const float* tau, const TensorView& y,
                 float* rstd);

void frn_backward(const plan::GroupNormShape& shape, const TensorView& dy, const TensorView& x,
                  const float* rstd, const float* weight, const float* bias, const float* tau,
                  const TensorView& dx, float* dweight, float* dbias, float* dtau, float* deps);

}  // namespace normkit::ref
