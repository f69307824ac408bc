#pragma once
// Optimized EvoNorm-S0 kernels. Same contracts as src/ref/evonorm.h (validated arguments with no
// zero dim, either memory format, computed in place of the format; dv/dweight/dbias may be
// null), activations of type T (float, bf16 or f16).
//
// Forward: the group statistics are GroupNorm's (cpu::group_norm_statistics, bitwise), then one
// elementwise pass y = x * sigmoid(v x) * a + b with a = rstd * weight[c] folded per (n, c).
// Backward: one pass for three sums per (n, c), sum(dy), sum(dy * h) and
// sum(dy * x^2 s (1 - s)) (h = x s, s = sigmoid(v x)); the group's term through rstd from them;
// then one elementwise pass dx = p * dy * s (1 + v x (1 - s)) + q * (x - mean) with p, q folded
// per (n, c). Work units are fixed by the shape (channels-first: (n, c) runs; channels-last:
// (n, block of channels) for the sums, (n, block of rows) for the elementwise passes), each
// writes only its own outputs, and every merge runs in a fixed order: bitwise identical results
// for any thread count. Leaf loops are Highway SIMD kernels dispatched at run time.
#include <cstddef>
#include <span>

#include "cpu/group_norm.h"
#include "plan/shapes.h"

namespace normkit::cpu {

// Bytes of scratch for a shape, forward or backward (the GroupNorm statistics' included).
std::size_t evonorm_s0_scratch_bytes(const plan::GroupNormShape& shape);

// Overwrites y, mean and rstd (N * G). `plan`: GroupNorm's, for the statistics.
template <typename T>
void evonorm_s0_forward(const GroupNormPlan& plan, double eps, const T* x, const float* v,
                        const float* weight, const float* bias, T* y, float* mean, float* rstd,
                        std::span<std::byte> workspace);

// Overwrites dx and (when not null) dv, dweight, dbias.
template <typename T>
void evonorm_s0_backward(const GroupNormPlan& plan, const T* dy, const T* x, const float* mean,
                         const float* rstd, const float* v, const float* weight, T* dx,
                         float* dv, float* dweight, float* dbias,
                         std::span<std::byte> workspace);

}  // namespace normkit::cpu
