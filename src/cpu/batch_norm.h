#pragma once
// Optimized BatchNorm kernels. Same contracts as src/ref/batch_norm.h (validated arguments,
// either memory format, optional pointers may be null), plus a plan (shape, thread count,
// scratch), activations of type T (float, bf16 or f16; weights, statistics and every sum in
// float32 or wider), the fused epilogues of normkit/epilogue.h and a workspace.
//
// Work is cut into pieces whose boundaries depend on the shape only (BatchNormTiling); every
// piece writes its own partial result and partials are merged in a fixed order, so the output
// is bitwise identical for any num_threads (for a given SIMD target).
//
// Each call runs one of two schedules over the same phases (sums of the pieces, their merge per
// channel with the fold into coefficients, the elementwise pass):
// - cached channels: for channels-first data whose per-channel slice fits in a core's L2, each
//   thread takes blocks of whole channels (as many as fit in L2 together; their runs of one
//   sample are one contiguous stream) and runs the sums and the elementwise pass of a block back
//   to back, so the second pass reads from cache;
// - two-phase: otherwise (few channels, channels-last, large slices) the sums run over all of x
//   split by channel, sample and position, then the merge, then the elementwise pass, all in one
//   parallel region.
// Both compute every per-channel sum from the same pieces in the same order, so which one runs
// changes no bit. Float32 outputs (y, dx) of 16 MiB or more are written with non-temporal
// stores (cpu/simd.h). Leaf loops are Highway SIMD kernels dispatched at run time.
//
// Scratch (cpu/scratch.h): every function takes a workspace of at least plan.scratch.bytes
// bytes, or an empty one to use a buffer of the calling thread (allocated on first use, then
// reused). Nothing else is allocated, on any thread.
#include <cstddef>
#include <cstdint>
#include <span>

#include "common/dtype.h"
#include "plan/epilogue.h"
#include "plan/shapes.h"

namespace normkit::cpu {

using plan::BackwardEpilogueOf;
using plan::BatchNormShape;
using plan::ForwardEpilogueOf;

// How a per-channel reduction is cut into units: a function of the shape only, which is what
// makes every result independent of the thread count.
//
// Column form (channels-last, S == 1, or channels-first with runs shorter than 16): the data is
// a matrix of `rows` rows, row r at x + r * row_stride, each channel owning `cols_per_channel`
// consecutive columns. A unit is (row group, channel block); row groups are the slots, walked
// in blocks of block_rows rows whose float sums go to double.
// Run form (channels-first, runs of S >= 16): channel c is N runs of S values. A unit is
// (channel, slot), the slot covering `samples_per_unit` whole runs, or, for runs longer than a
// unit, one `segment_length` piece of one run.
struct BatchNormTiling {
  bool column_form = true;
  int64_t channels = 0;
  int64_t slots = 0;  // partial results per channel
  int64_t units = 0;
  // column form
  int64_t rows = 0, row_stride = 0, cols_per_channel = 1;
  int64_t channels_per_block = 0, channel_blocks = 0, rows_per_group = 0, block_rows = 0;
  // run form
  int64_t batch = 0, spatial = 0, samples_per_unit = 0, segment_length = 0, segments = 0;
};

// Byte offsets of the scratch parts (cpu/scratch.h): per-slot partial sums (slots * C pairs of
// doubles) and four arrays of C floats (per-channel coefficients and pivots).
struct BatchNormScratch {
  std::size_t partial = 0, coefficients = 0;
  std::size_t bytes = 0;  // what a workspace must hold (ScratchLayout::workspace_bytes())
};

// One call's plan, built once (by the api) from the validated shape: the tiling, the scratch
// and the threads. Each function picks its schedule from it and its epilogue (which inputs the
// second pass re-reads) and the cache sizes of cpu/cache.h.
struct BatchNormPlan {
  BatchNormShape shape;
  int64_t value_bytes = 4;  // bytes of one activation
  int num_threads = 1;
  BatchNormTiling tiling;
  BatchNormScratch scratch;  // all zero for an empty shape
};

BatchNormPlan plan_batch_norm(const BatchNormShape& shape, int64_t value_bytes, int num_threads);

// Bytes of scratch any of the four functions needs for this shape, any schedule, any thread
// count, any activation type (0 for an empty shape): plan_batch_norm(shape, ...).scratch.bytes.
std::size_t workspace_size(const BatchNormShape& shape);

// Every function below does nothing for an empty shape (N * C * S == 0).

// One statistics pass (shifted sums around a per-channel pivot), then one fused pass
// y = epilogue(x * a[c] + b[c]) with a = invstd * weight and b = bias - mean * a.
// Overwrites y, save_mean and save_invstd (C each); updates running_mean and running_var (C
// each, both or neither may be null) with momentum and the unbiased variance.
template <typename T>
void batch_norm_forward_training(const BatchNormPlan& plan, double eps, double momentum,
                                 const ForwardEpilogueOf<T>& epilogue, const T* x,
                                 const float* weight, const float* bias, T* y, float* save_mean,
                                 float* save_invstd, float* running_mean, float* running_var,
                                 std::span<std::byte> workspace);

// The training forward's statistics alone, no elementwise pass: the same sums in the same order,
// so save_mean and save_invstd are bitwise those of batch_norm_forward_training. Overwrites
// save_mean and save_invstd; updates running_mean and running_var (both or neither null).
// For ops that normalize with an affine of their own from these statistics (Batch Renorm).
template <typename T>
void batch_norm_statistics(const BatchNormPlan& plan, double eps, double momentum, const T* x,
                           float* save_mean, float* save_invstd, float* running_mean,
                           float* running_var, std::span<std::byte> workspace);

// One streaming pass with a, b folded from the running statistics. Overwrites y.
template <typename T>
void batch_norm_forward_inference(const BatchNormPlan& plan, double eps,
                                  const ForwardEpilogueOf<T>& epilogue, const T* x,
                                  const float* weight, const float* bias,
                                  const float* running_mean, const float* running_var, T* y,
                                  std::span<std::byte> workspace);

// One pass for both reductions (sum g and sum (x - mean) * g per channel, g = dy masked by the
// epilogue), then one elementwise pass dx = g * p[c] + (x - mean) * q[c] + r[c]. Overwrites dx,
// epilogue.dresidual (with g) and, when not null, dweight and dbias (not added to).
template <typename T>
void batch_norm_backward_training(const BatchNormPlan& plan, const BackwardEpilogueOf<T>& epilogue,
                                  const T* dy, const T* x, const float* save_mean,
                                  const float* save_invstd, const float* weight, T* dx,
                                  float* dweight, float* dbias, std::span<std::byte> workspace);

// The running statistics are constants: dx = g * weight * invstd in one pass; the reductions
// for dweight and dbias only when one is requested (x is read only then). Overwrites dx,
// epilogue.dresidual and, when not null, dweight and dbias.
template <typename T>
void batch_norm_backward_inference(const BatchNormPlan& plan, double eps,
                                   const BackwardEpilogueOf<T>& epilogue, const T* dy,
                                   const T* x, const float* running_mean,
                                   const float* running_var, const float* weight, T* dx,
                                   float* dweight, float* dbias, std::span<std::byte> workspace);

// ---- the steps of normkit/batch_norm_steps.h ----
// The leaves of the canonical tree are single samples: each (sample, channel) is reduced on its
// own by the same leaf loops as above (the run sums for channels-first runs, the column sums
// for channels-last rows and S == 1), in an order fixed by S and the format, over units of
// (sample, block of channels) shared among the threads: bitwise the same for any thread count
// and wherever the sample sits in a piece. No scratch.

// For sample n and channel c: mean[n * C + c] and m2[n * C + c] of its S values, from shifted
// sums around a pivot (the mean of its first 16 values) folded in double. Nothing when
// S == 0.
template <typename T>
void batch_norm_sample_statistics(const BatchNormShape& shape, int num_threads, const T* x,
                                  double* mean, double* m2);

// sum_g[n * C + c] = sum g and sum_g_xmu[n * C + c] = sum g * (x - mean[c]) over sample n's
// values of channel c; g = dy masked by the epilogue.
template <typename T>
void batch_norm_sample_gradients(const BatchNormShape& shape, int num_threads,
                                 const BackwardEpilogueOf<T>& epilogue, const T* dy, const T* x,
                                 const float* mean, double* sum_g, double* sum_g_xmu);

// The forward's elementwise pass with a, b folded from the given mean and invstd.
template <typename T>
void batch_norm_normalize(const BatchNormPlan& plan, const ForwardEpilogueOf<T>& epilogue,
                          const T* x, const float* weight, const float* bias, const float* mean,
                          const float* invstd, T* y, std::span<std::byte> workspace);

// The backward's elementwise pass with its coefficients from the sums over `count` values per
// channel (the global batch). Overwrites dx and epilogue.dresidual.
template <typename T>
void batch_norm_backward_dx(const BatchNormPlan& plan, const BackwardEpilogueOf<T>& epilogue,
                            double count, const T* dy, const T* x, const float* save_mean,
                            const float* save_invstd, const float* weight, const double* sum_g,
                            const double* sum_g_xmu, T* dx, std::span<std::byte> workspace);

}  // namespace normkit::cpu
