#pragma once
// Optimized FRN + TLU kernels. Same contracts as src/ref/frn.h (validated arguments with no zero
// dim, either memory format, computed in place of the format; dweight/dbias/dtau may be null),
// activations of type T (float, bf16 or f16).
//
// FRN is instance norm without the mean. Channels-first: each (n, c) run's statistics come from
// the Moments kernels of InstanceNorm (cpu/moments.h), nu2 = var + mean^2 as RMSNorm takes it (two
// non-negative terms: no cancellation, no float overflow of x^2), and the run is written right
// after its statistics, from cache. Channels-last: units of (n, block of up to 256 channels) sum
// x^2 per column with BatchNorm's column-sums kernel (cpu/column_sums-inl.h)
// over blocks of rows, then write their block. Backward: per unit, sum(g), sum(g * x) and
// sum(dy - g) in one pass, then dx = A * g + B * x with A, B per (n, c); the parameter gradients
// are the per-(n, c) sums (kept in scratch) added over n in order. Every unit writes only its
// own outputs and the merges run in a fixed order: bitwise identical results for any thread
// count. Leaf loops are Highway SIMD kernels dispatched at run time (cpu/simd.h).
#include <cstddef>
#include <span>

#include "plan/shapes.h"

namespace normkit::cpu {

// Bytes of scratch for a shape: 3 * N * C doubles, aligned (the backward's per-(n, c) sums).
std::size_t frn_scratch_bytes(const plan::GroupNormShape& shape);

// Overwrites y and rstd (N * C).
template <typename T>
void frn_forward(const plan::GroupNormShape& shape, double eps, const T* x, const float* weight,
                 const float* bias, const float* tau, T* y, float* rstd, int num_threads);

// Overwrites dx and (when not null) dweight, dbias, dtau, deps.
template <typename T>
void frn_backward(const plan::GroupNormShape& shape, const T* dy, const T* x, const float* rstd,
                  const float* weight, const float* bias, const float* tau, T* dx,
                  float* dweight, float* dbias, float* dtau, float* deps, int num_threads,
                  std::span<std::byte> workspace);

}  // namespace normkit::cpu
