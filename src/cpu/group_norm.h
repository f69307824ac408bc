#pragma once
// Optimized GroupNorm kernels (also InstanceNorm's). Same contracts as src/ref/group_norm.h
// (validated arguments, either memory format, computed in place of the format: no transposing
// copy; weight/bias/dweight/dbias may be null), plus a thread count, activations of type T
// (float, bf16 or f16; statistics, weights and accumulation in float32 or wider) and the fused
// epilogues of normkit/epilogue.h.
//
// Threads work on units fixed by the shape: (n, g) or (n, g, piece of the group) for
// channels-first, (n, block of spatial rows) for channels-last, so N = 1 still uses every core.
// Each unit writes its own partial result, partials are merged in a fixed order, and the output
// is bitwise identical for any num_threads.
//
// Forward: statistics (channels-first: runs of cpu/moments.h; channels-last: a SIMD pass over
// columns of a cache-sized block of rows, the same corrected two-pass algorithm, merged with
// the Moments of cpu/moments.h), then one fused pass y = (x - m) * a + b [+ r] [relu]
// with m = float(mean), a = rstd * weight[c], b = bias[c] - (mean - m) * a folded per (n, c).
// Channels-first groups that fit in the per-core cache are normalized right after their own
// statistics, so the second read of x comes from cache.
// Backward: g = relu ? dy * (y > 0) : dy; one pass for both reductions per (n, c), sum(g) and
// sum(g * (x - mean)) (also writing dresidual = g), then one elementwise pass
// dx = a * g + b * (x - mean) + c with coefficients folded per (n, c). Channels-first groups
// whose dy and x fit in the per-core cache get their dx right after their sums, from cache.
// Leaf loops are Highway SIMD kernels dispatched at run time (src/cpu/simd.h). Float32 outputs
// (y, dx) of 16 MiB or more are written with non-temporal stores (cpu/simd.h).
//
// Scratch (cpu/scratch.h, as every op's): every function takes a workspace of at least
// workspace_size(shape) bytes, or an empty one to use a buffer of the calling thread (allocated
// on first use, then reused). Nothing else is allocated, on any thread.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/dtype.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"

namespace normkit::cpu {

using plan::BackwardEpilogueOf;
using plan::ForwardEpilogueOf;
using plan::GroupNormShape;

// Bytes of scratch the three functions below need for this shape, any of them, with any
// epilogue (a multiple of sizeof(float); 0 when N * C * S == 0).
std::size_t workspace_size(const GroupNormShape& shape);

// Arguments come in the public API's order: the shape and scalar parameters (the epilogue
// among them), then the inputs, then the outputs, then the workspace.

// Overwrites y, mean, rstd (N*G) and, when not null, variance (N*G, biased).
template <typename T>
void group_norm_forward(const GroupNormShape& shape, double eps, int num_threads,
                        const ForwardEpilogueOf<T>& epilogue, const T* x, const float* weight,
                        const float* bias, T* y, float* mean, float* rstd, float* variance,
                        std::span<std::byte> workspace);

// Overwrites y = (x - mean) * rstd * weight + bias (then the epilogue) with the given
// per-(n, g) mean and rstd.
template <typename T>
void group_norm_apply(const GroupNormShape& shape, int num_threads,
                      const ForwardEpilogueOf<T>& epilogue, const T* x, const float* mean,
                      const float* rstd, const float* weight, const float* bias, T* y,
                      std::span<std::byte> workspace);

// Overwrites dx, (when not null) dweight, dbias, and epilogue.dresidual. With
// stats_are_constants the gradient does not flow through mean and rstd.
template <typename T>
void group_norm_backward(const GroupNormShape& shape, bool stats_are_constants, int num_threads,
                         const BackwardEpilogueOf<T>& epilogue, const T* dy, const T* x,
                         const float* mean, const float* rstd, const float* weight, T* dx,
                         float* dweight, float* dbias, std::span<std::byte> workspace);

}  // namespace normkit::cpu
