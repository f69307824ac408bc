#pragma once
// Reference Batch Renorm (normkit/batch_renorm.h): plain loops accumulating in double, beside the
// fast path (BatchNorm's kernels with an effective affine) that the tests hold against it.
// Templates, layouts and conventions as ref/batch_norm.h: activations A (float, double, bf16,
// f16), parameters and statistics P (float, or double for the float64 oracle); weight, bias,
// dweight, dbias may be null. Arguments are validated by the caller.
#include "plan/epilogue.h"
#include "plan/shapes.h"

namespace normkit::ref {

// Writes y, save_mean, save_invstd, save_r, save_d (length C); updates running_mean and
// running_var (required). Nothing is written when N * S == 0.
template <typename A, typename P>
void batch_renorm_forward_training(const plan::BatchNormShape& shape, double eps,
                                   double momentum, double r_max, double d_max,
                                   const plan::ForwardEpilogueOf<A>& epilogue, const A* x,
                                   const P* weight, const P* bias, A* y, P* save_mean,
                                   P* save_invstd, P* save_r, P* save_d, P* running_mean,
                                   P* running_var);

// r and d are constants. Writes dx, dweight, dbias (may be null) and epilogue.dresidual.
template <typename A, typename P>
void batch_renorm_backward_training(const plan::BatchNormShape& shape,
                                    const plan::BackwardEpilogueOf<A>& epilogue, const A* dy,
                                    const A* x, const P* save_mean, const P* save_invstd,
                                    const P* save_r, const P* save_d, const P* weight, A* dx,
                                    P* dweight, P* dbias);

}  // namespace normkit::ref
