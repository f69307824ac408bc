#pragma once
// Optimized LayerNorm kernels. Same contracts as src/ref/layer_norm.h (validated arguments; rows
// stored in logical order or channels-last; weight/bias/dweight/dbias may be null), plus a thread
// count, activations of type T (float, bf16 or f16; statistics, weights and accumulation in
// float32 or wider), a workspace and the fused epilogues of normkit/epilogue.h.
//
// Work units depend on the shape only and partials are merged in a fixed order, so the output
// is bitwise identical for any num_threads:
// - forward: rows whose bytes fit in the per-core cache, in groups of whole rows, each row
//   normalized right after its own statistics (its second read comes from cache); longer rows
//   (or too few rows to share) in pieces of kRunChunk elements, statistics first
//   (cpu/moments.h), then y. Both give the same bits (run_moments equals the ordered merge of its
//   pieces; the same elementwise kernel).
//   y = relu?(((x - m) * rstd + t) * w[j] + b[j] + r?) with m = float(mean) and t the rest of
//   the mean times rstd: x - m is exact or nearly, whatever the offset.
// - backward: g = relu ? dy * (y > 0) : dy. One pass over units of (kRowBlock rows) x (kRunChunk
//   columns) computes, per row piece, sum(g * w) and sum(g * w * (x - mean)), per column of the
//   unit the float partials sum(g) and sum(g * xhat) for dbias and dweight, and writes
//   dresidual = g. Then dx = rstd * w[j] * g + b * (x - mean) + c per row.
// Leaf loops are Highway SIMD kernels dispatched at run time (src/cpu/simd.h), with one-lane
// tails, so an element's value never depends on where a vector loop ends. Float32 outputs (y,
// dx) of 16 MiB or more are written with non-temporal stores (cpu/simd.h).
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/dtype.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"

namespace normkit::cpu {

using plan::BackwardEpilogueOf;
using plan::ForwardEpilogueOf;
using plan::LayerNormShape;

// Bytes of scratch the forward or the backward needs for this shape (0 when it has no
// elements), including room to align the caller's workspace.
std::size_t workspace_size(const LayerNormShape& shape);

// Arguments come in the public API's order: the shape and scalar parameters (the epilogue
// among them), then the inputs, then the outputs, then the workspace. `workspace` (cpu/scratch.h,
// as every op's): at least workspace_size(shape) bytes of any alignment, the only memory the
// call uses; or smaller (empty) to use a buffer of the calling thread (allocated on first use,
// then reused).

// Overwrites y, mean and rstd (length rows).
template <typename T>
void layer_norm_forward(const LayerNormShape& shape, double eps, int num_threads,
                        const ForwardEpilogueOf<T>& epilogue, const T* x, const float* weight,
                        const float* bias, T* y, float* mean, float* rstd,
                        std::span<std::byte> workspace);

// Overwrites dx, (when not null) dweight, dbias, and epilogue.dresidual.
template <typename T>
void layer_norm_backward(const LayerNormShape& shape, int num_threads,
                         const BackwardEpilogueOf<T>& epilogue, const T* dy, const T* x,
                         const float* mean, const float* rstd, const float* weight, T* dx,
                         float* dweight, float* dbias, std::span<std::byte> workspace);

}  // namespace normkit::cpu
