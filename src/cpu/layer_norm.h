#pragma once
// Optimized LayerNorm kernels. Same contracts as src/ref/layer_norm.h (validated arguments; rows
// stored in logical order or channels-last; weight/bias/dweight/dbias may be null), plus a plan
// (the shape, thread count, schedules and scratch layout), activations of type T (float, bf16 or
// f16; statistics, weights and accumulation in float32 or wider), a workspace and the fused
// epilogues of normkit/epilogue.h.
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

// Where each scratch part lies from the scratch base (cpu/scratch.h), a function of the shape
// only: weight and bias in memory order (cols floats each), then either
//   forward:  per-row moments (rows), per-piece moments (runs_moments_scratch_size), the mean's
//             tail (rows floats)
//   backward: per-(row, piece) partial sums (2 * rows * pieces doubles), dx coefficients
//             (2 * rows floats), column partials (2 * row_blocks * cols floats).
struct LayerNormScratch {
  int64_t pieces = 0, row_blocks = 0;  // kRunChunk pieces of a row; blocks of kRowBlock rows
  std::size_t weight = 0, bias = 0;
  std::size_t moments = 0, piece_moments = 0, tail = 0;
  std::size_t partials = 0, coefficients = 0, columns = 0;
  // Bytes the forward or the backward needs (room to align a caller's workspace included; 0
  // when the shape has no elements; SIZE_MAX when size_t cannot count them):
  // layer_norm_workspace_size's value.
  std::size_t bytes = 0;
};
LayerNormScratch layer_norm_scratch(const LayerNormShape& shape);

// The schedules. Each gives the same bits (layer_norm.cpp).
enum class LayerNormForwardSchedule {
  cached_rows,  // each row's output right after its statistics, from cache
  two_phase,    // every row's statistics, then every output
};
enum class LayerNormBackwardSchedule {
  cached_row_blocks,  // block by block of rows: each row's dx right after its sums, from cache
  two_phase,          // every row's sums, then every dx
};

struct LayerNormPlan {
  LayerNormShape shape;
  int num_threads = 1;
  bool parallel = false;  // enough elements to share among the threads
  LayerNormForwardSchedule forward = LayerNormForwardSchedule::two_phase;
  LayerNormBackwardSchedule backward = LayerNormBackwardSchedule::two_phase;
  LayerNormScratch scratch;
};

// The plan of a call on activations of value_bytes bytes each (sizeof the kernel's T) with
// num_threads threads, from the shape and the cache budgets of cpu/cache.h. The api makes it
// once and hands it down; the kernels do not choose again.
LayerNormPlan plan_layer_norm(const LayerNormShape& shape, int64_t value_bytes, int num_threads);

// Arguments come in the public API's order: the plan and scalar parameters (the epilogue among
// them), then the inputs, then the outputs, then the workspace. `workspace` (cpu/scratch.h, as
// every op's): at least plan.scratch.bytes of any alignment, the only memory the call uses; or
// smaller (empty) to use a buffer of the calling thread (allocated on first use, then reused).

// Overwrites y, mean and rstd (length rows).
template <typename T>
void layer_norm_forward(const LayerNormPlan& plan, double eps,
                        const ForwardEpilogueOf<T>& epilogue, const T* x, const float* weight,
                        const float* bias, T* y, float* mean, float* rstd,
                        std::span<std::byte> workspace);

// Overwrites dx, (when not null) dweight, dbias, and epilogue.dresidual.
template <typename T>
void layer_norm_backward(const LayerNormPlan& plan, const BackwardEpilogueOf<T>& epilogue,
                         const T* dy, const T* x, const float* mean, const float* rstd,
                         const float* weight, T* dx, float* dweight, float* dbias,
                         std::span<std::byte> workspace);

// RMSNorm on the same plan (plan_layer_norm), kernels and schedules, with the mean 0 (see
// normkit/rms_norm.h). With residual_in (else null), first sum_out = x + residual_in (may be the
// memory of either), then sum_out is normalized. Overwrites y, rstd and sum_out.
template <typename T>
void rms_norm_forward(const LayerNormPlan& plan, double eps, const ForwardEpilogueOf<T>& epilogue,
                      const T* x, const float* weight, const T* residual_in, T* y, float* rstd,
                      T* sum_out, std::span<std::byte> workspace);

// dx = d(norm) + dsum_out (null: none; may be dx's memory). Overwrites dx, dweight (not null) and
// epilogue.dresidual.
template <typename T>
void rms_norm_backward(const LayerNormPlan& plan, const BackwardEpilogueOf<T>& epilogue,
                       const T* dy, const T* x, const float* rstd, const float* weight,
                       const T* dsum_out, T* dx, float* dweight, std::span<std::byte> workspace);

}  // namespace normkit::cpu
