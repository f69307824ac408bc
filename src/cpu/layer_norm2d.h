#pragma once
// Optimized LayerNorm2d for channels-first x (the channels-last case is layer_norm's rows, see
// api/layer_norm2d.cpp). Same contract as src/ref/layer_norm2d.h with activations of type T
// (float, bf16 or f16) and float32 statistics, weights and sums.
//
// A position's C values lie `spatial` apart, so the kernels work on blocks of kPositionBlock
// neighbouring positions of one sample with the positions as SIMD lanes (Highway, dispatched at
// run time; one-lane tails): each step over c reads a contiguous run of the block, and each
// position's sums are its own lane. Per position: mean, then the centered sum of squares (two
// passes over the block, the second from cache), then y. Results may differ between SIMD
// targets (the dweight/dbias lane sums), never between thread counts. Blocks depend on the shape only and each position's
// result is computed by one thread in a fixed order; dweight and dbias are summed per channel by
// one thread each, in a fixed order: bitwise identical results for any thread count.
#include <cstdint>

#include "common/dtype.h"
#include "ref/layer_norm2d.h"

namespace normkit::cpu {

using ref::LayerNorm2dShape;

inline constexpr int64_t kPositionBlock = 64;

// Overwrites y, mean and rstd (length batch * spatial).
template <typename T>
void layer_norm2d_forward(const LayerNorm2dShape& shape, int num_threads, double eps, const T* x,
                          const float* weight, const float* bias, T* y, float* mean, float* rstd);

// Overwrites dx and (when not null) dweight, dbias.
template <typename T>
void layer_norm2d_backward(const LayerNorm2dShape& shape, int num_threads, const T* dy,
                           const T* x, const float* mean, const float* rstd, const float* weight,
                           T* dx, float* dweight, float* dbias);

}  // namespace normkit::cpu
