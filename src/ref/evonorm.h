#pragma once
// Reference EvoNorm-S0 (normkit/evonorm.h): the plainest correct loops, in double, on
// activations of any dtype widened to double and rounded once to the output dtype. The group
// statistics are the reference GroupNorm's (ref/group_norm.h). The tests hold the CPU kernels
// against these. Arguments validated (src/api/evonorm.cpp); statistics at n * G + g; dv,
// dweight, dbias may be null. Allocates freely.
#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::ref {

void evonorm_s0_forward(const plan::GroupNormShape& shape, double eps, const TensorView& x,
                        const float* v, const float* weight, const float* bias,
                        const TensorView& y, float* mean, float* rstd);

void evonorm_s0_backward(const plan::GroupNormShape& shape, const TensorView& dy,
                         const TensorView& x, const float* mean, const float* rstd,
                         const float* v, const float* weight, const TensorView& dx, float* dv,
                         float* dweight, float* dbias);

}  // namespace normkit::ref
