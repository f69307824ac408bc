#pragma once
// Optimized GroupNorm kernels (also InstanceNorm's). Same contracts as src/ref/group_norm.h
// (validated arguments, either memory format, computed in place of the format: no transposing copy;
// weight/bias/dweight/dbias may be null), plus a plan (the shape, thread count, schedules and
// scratch layout), activations of type T (float, bf16 or f16; statistics, weights and accumulation
// in float32 or wider) and the fused epilogues of normkit/epilogue.h.
//
// Threads work on units fixed by the shape: (n, g) or (n, g, piece of the group) for
// channels-first, (n, block of spatial rows) for channels-last, so N = 1 still uses every core.
// Each unit writes its own partial result, partials are merged in a fixed order, and the output
// is bitwise identical for any num_threads.
//
// Forward: statistics (channels-first: runs of cpu/moments.h; channels-last: a SIMD pass over
// columns of a cache-sized block of rows, the same corrected two-pass algorithm, merged with
// the Moments of cpu/moments.h), then one fused pass y = act((x - m) * a + b [+ r])
// with m = float(mean), a = rstd * weight[c], b = bias[c] - (mean - m) * a folded per (n, c).
// Channels-first groups that fit in the per-core cache are normalized right after their own
// statistics, so the second read of x comes from cache.
// Backward: g = dy * act'(z) (relu: y > 0; silu: z = (x - mean) * rstd * w + bias + r?
// recomputed in each pass that needs g, from the x it reads anyway, rather than stored: no
// stream more than relu's); one pass for both reductions per (n, c), sum(g) and
// sum(g * (x - mean)) (also writing dresidual = g), then one elementwise pass
// dx = a * g + b * (x - mean) + c with coefficients folded per (n, c), g read back from
// dresidual when written (and exact). Channels-first groups
// whose dy and x fit in the per-core cache get their dx right after their sums, from cache.
// Leaf loops are Highway SIMD kernels dispatched at run time (src/cpu/simd.h). Float32 outputs
// (y, dx) of 16 MiB or more are written with non-temporal stores (cpu/simd.h).
//
// The api plans a call once (plan_group_norm: the schedules, the thread count, the scratch
// layout) and hands the plan down; the kernels do not choose again.
// Scratch (cpu/scratch.h, as every op's): every function takes a workspace of at least
// plan.scratch.bytes, or an empty one to use a buffer of the calling thread (allocated on first
// use, then reused). Nothing else is allocated, on any thread.
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

// Where each scratch part lies from the scratch base (cpu/scratch.h), a function of the shape
// only: the forward (and apply) and the backward lay out their parts over the same memory.
struct GroupNormScratch {
  std::size_t groups = 0, pieces = 0, stats = 0, forward_coef = 0;          // forward
  std::size_t sums = 0, partial_dy = 0, partial_xc = 0, backward_coef = 0,  // backward
      silu_coef = 0, channel_mean = 0;
  // Bytes the three functions below need, any of them, with any epilogue (room to align a
  // caller's workspace included; 0 when N * C * S == 0): group_norm_workspace_size's value.
  std::size_t bytes = 0;
};
GroupNormScratch group_norm_scratch(const GroupNormShape& shape);

// The schedules. Each runs the same phase functions on the same pieces, so which one runs
// changes no bit (group_norm.cpp).
enum class GroupNormForwardSchedule {
  cached_groups,   // channels-first: each group's output right after its statistics, from cache
  cached_samples,  // channels-last: each sample's statistics, then its output, from cache
  two_phase,       // every statistic, then every output
};
enum class GroupNormBackwardSchedule {
  cached_groups,  // channels-first: each group's sums, then its dx while dy and x are in cache
  two_phase,      // channels-first: every sum, then every dx
  channels_last,  // every sum over blocks of rows, then every dx
};

// What a backward call computes, as far as its schedule depends on it (the forward ignores it).
struct GroupNormBackwardWork {
  // The per-(n, c) sums: needed unless the statistics are constants and none of dweight, dbias
  // and dresidual is wanted.
  bool sums = true;
  // A third activation tensor is read besides dy and x: relu's y, or silu's residual.
  bool third_input = false;

  // The one rule, for the api's plan and the kernel alike.
  static GroupNormBackwardWork of(bool stats_are_constants, bool dweight, bool dbias,
                                  bool dresidual, Activation activation, bool residual) {
    return {!stats_are_constants || dweight || dbias || dresidual,
            activation == Activation::relu || (activation == Activation::silu && residual)};
  }
};

struct GroupNormPlan {
  GroupNormShape shape;
  int num_threads = 1;
  bool parallel = false;  // enough elements to share among the threads
  GroupNormForwardSchedule forward = GroupNormForwardSchedule::two_phase;
  GroupNormBackwardSchedule backward = GroupNormBackwardSchedule::two_phase;
  GroupNormScratch scratch;
};

// The plan of a call on activations of value_bytes bytes each (sizeof the kernel's T) with
// num_threads threads, from the shape and the cache budgets of cpu/cache.h.
GroupNormPlan plan_group_norm(const GroupNormShape& shape, int64_t value_bytes, int num_threads,
                              const GroupNormBackwardWork& backward = {});

// Arguments come in the public API's order: the plan and scalar parameters (the epilogue among
// them), then the inputs, then the outputs, then the workspace.

// Overwrites y, mean, rstd (N*G) and, when not null, variance (N*G, biased).
template <typename T>
void group_norm_forward(const GroupNormPlan& plan, double eps,
                        const ForwardEpilogueOf<T>& epilogue, const T* x, const float* weight,
                        const float* bias, T* y, float* mean, float* rstd, float* variance,
                        std::span<std::byte> workspace);

// The forward's statistics alone, for ops that normalize by GroupNorm's groups but write their
// own output (EvoNorm-S0): overwrites mean and rstd (N*G) with the values group_norm_forward
// writes, bitwise, and, when not null, variance (N*G, biased).
template <typename T>
void group_norm_statistics(const GroupNormPlan& plan, double eps, const T* x, float* mean,
                           float* rstd, float* variance, std::span<std::byte> workspace);

// Overwrites y = (x - mean) * rstd * weight + bias (then the epilogue) with the given
// per-(n, g) mean and rstd.
template <typename T>
void group_norm_apply(const GroupNormPlan& plan, const ForwardEpilogueOf<T>& epilogue, const T* x,
                      const float* mean, const float* rstd, const float* weight,
                      const float* bias, T* y, std::span<std::byte> workspace);

// Overwrites dx, (when not null) dweight, dbias, and epilogue.dresidual. With
// stats_are_constants the gradient does not flow through mean and rstd. `plan` was made with the
// GroupNormBackwardWork of these arguments.
template <typename T>
void group_norm_backward(const GroupNormPlan& plan, bool stats_are_constants,
                         const BackwardEpilogueOf<T>& epilogue, const T* dy, const T* x,
                         const float* mean, const float* rstd, const float* weight, T* dx,
                         float* dweight, float* dbias, std::span<std::byte> workspace);

}  // namespace normkit::cpu
