#pragma once
// Reference BatchNorm: the plainest correct loops, accumulating in double. The tests hold the
// optimized kernels against these. Templated on the element type so that the same code also runs
// entirely in double (the float64 oracle of the accuracy and finite-difference tests).
//
// All kernels assume validated arguments (see src/api/batch_norm.cpp). Layout: x is (N, C, S)
// with S the product of the spatial dims, stored channels_first (index (n*C + c)*S + s) or
// channels_last (index (n*S + s)*C + c). weight, bias, dweight, dbias may be null.
#include <cstdint>

#include "normkit/tensor.h"

namespace normkit::ref {

struct BatchNormShape {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 1;   // S
  MemoryFormat format = MemoryFormat::channels_first;
};

// Writes y, save_mean, save_invstd (length C); updates running_mean/running_var (may be null)
// with momentum and the unbiased variance. Nothing is written when N * S == 0.
template <typename T>
void batch_norm_forward_training(T* y, T* save_mean, T* save_invstd, T* running_mean,
                                 T* running_var, const T* x, const T* weight, const T* bias,
                                 const BatchNormShape& shape, double eps, double momentum);

// Writes y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
template <typename T>
void batch_norm_forward_inference(T* y, const T* x, const T* weight, const T* bias,
                                  const T* running_mean, const T* running_var,
                                  const BatchNormShape& shape, double eps);

// Gradient through the batch statistics. Writes dx, dweight, dbias (the last two may be null).
template <typename T>
void batch_norm_backward_training(T* dx, T* dweight, T* dbias, const T* dy, const T* x,
                                  const T* save_mean, const T* save_invstd, const T* weight,
                                  const BatchNormShape& shape);

// Running statistics are constants. Writes dx, dweight, dbias (the last two may be null).
template <typename T>
void batch_norm_backward_inference(T* dx, T* dweight, T* dbias, const T* dy, const T* x,
                                   const T* running_mean, const T* running_var, const T* weight,
                                   const BatchNormShape& shape, double eps);

}  // namespace normkit::ref
