#pragma once
// BatchNorm training as composable steps, for a batch split into pieces that may live in
// different processes (synchronized BatchNorm) or on different logical devices. No
// communication happens here: a caller (normkit::mpi, mpi.h, or its own transport) moves the
// packed partials between the local step and the merge.
//
// A global batch of N samples is split into pieces; a piece is the samples
// [offset, offset + n) of it, held as an ordinary TensorView x of batch size n (n may be 0).
//
// Forward (training):
//   1. batch_norm_statistics_partials: each piece packs the partial statistics of its samples.
//   2. batch_norm_merge_statistics: the packed buffers of all pieces, concatenated in any order,
//      give save_mean and save_invstd (float, C each) and update the running statistics
//      exactly as batch_norm_forward_training does (batch_norm.h: PyTorch semantics, unbiased
//      running variance with the global count M = N * spatial size).
//   3. batch_norm_normalize: y = epilogue((x - mean) * invstd * weight + bias) on each piece.
// Inference needs no steps: it is batch_norm_forward_inference on each piece.
// The steps' epilogues are none or relu: an epilogue with activation silu is refused (the
// gradient steps do not rebuild silu's pre-activation yet), forward and backward alike.
// Backward (training), with g = relu ? dy * (y > 0) : dy (the forward's epilogue):
//   1. batch_norm_gradient_partials: each piece packs sum g and sum g * (x - mean) per channel.
//   2. batch_norm_merge_gradients: the global sums (double, C each), and from them dweight =
//      sum g * (x - mean) * invstd and dbias = sum g over the GLOBAL batch: every piece gets the
//      same, complete values (torch.nn.SyncBatchNorm instead returns each rank's local part and
//      leaves the sum to DistributedDataParallel's all-reduce; do not all-reduce these again).
//   3. batch_norm_backward_dx: dx (and the epilogue's dresidual) of each piece from the sums.
//
// Bitwise independence of the split. The statistics are merged over one canonical tree whose
// shape depends on the global sample indices only:
// - a leaf is one sample: per channel (count = spatial size S, mean, M2) of its S values, or
//   its sums sum g and sum g * (x - mean), computed by a fixed-order reduction that depends
//   only on S, the memory format, the dtype and the data (not on threads or on which piece holds
//   the sample);
// - node [k * 2^j, (k + 1) * 2^j) is merge(left half, right half); a half holding no sample
//   (beyond N) is absent and merge(a, absent) = a exactly;
// - statistics merge with Chan's formula on (count, mean, M2) in double (never sum and sum of
//   squares), gradient sums by addition in double.
// A piece packs the maximal tree nodes inside its range (at most 2 * log2(n) + 2 of them), the
// merge rebuilds the root from the nodes of all pieces with the same recursion. So mean,
// invstd, the running statistics, y, dx, dweight and dbias are bitwise identical for any split
// of the batch into pieces (any number, uneven, empty, in any order), for any thread count, and
// for either backend's own results (Context::backend: the reference and the cpu backends
// each give their own bits). They agree with the single-process batch_norm_* functions within
// float tolerance, not bitwise: those keep their own faster thread-invariant tiling.
//
// Packed partials are std::span<double> buffers whose layout is private to this header's
// functions: a piece's buffer holds its own header (what it is, C, S, offset, n) and its nodes,
// so buffers of several pieces can simply be concatenated. Their size is
// batch_norm_partials_size(offset, n, C) doubles, for statistics and gradients alike; a
// transport needs nothing else.
//
// Activations (x, y, dy, dx, epilogue tensors) may be float32, bfloat16 or float16, in either
// memory format, as in batch_norm.h; every statistic and sum is double until it is written.
// Every function validates all its arguments before it writes anything and throws
// normkit::Error naming the argument and the values.
#include <cstddef>
#include <cstdint>
#include <span>

#include "normkit/batch_norm.h"
#include "normkit/context.h"
#include "normkit/tensor.h"

namespace normkit {

// Doubles in the packed partials of the piece [offset, offset + count) with `channels`
// channels (statistics or gradients). Throws normkit::Error on a negative offset or count,
// channels < 1, or a size beyond the address space.
std::size_t batch_norm_partials_size(int64_t offset, int64_t count, int64_t channels);

// Bytes of scratch memory batch_norm_statistics_partials and batch_norm_gradient_partials use
// for a piece shaped like x. Pass at least that much as Context::workspace to have no
// allocation in the call; with an empty workspace the call allocates it.
std::size_t batch_norm_partials_workspace_size(const TensorView& x);

// Step 1 of the forward: the partial statistics of the piece x, the samples
// [offset, offset + x.batch()) of the global batch.
// Reads x. Overwrites all of partials, whose size must be
// batch_norm_partials_size(offset, x.batch(), x.channels()).
// Throws normkit::Error, before writing anything, on: rank outside 2..5, channels < 1,
// offset < 0, int64 overflow, a partials size other than the above, a workspace smaller than
// batch_norm_partials_workspace_size(x).
void batch_norm_statistics_partials(int64_t offset, const TensorView& x,
                                    std::span<double> partials, const Context& ctx = {});

// Step 2 of the forward: merges the partials of all pieces of a global batch of global_batch
// samples (their buffers concatenated, in any order) over the canonical tree.
// Reads partials, running_mean and running_var. Overwrites save_mean and save_invstd (length C);
// updates running_mean and running_var (length C, optional: both or neither) with
// params.momentum and the unbiased variance, as batch_norm_forward_training. Uses params.eps
// and params.momentum only (the epilogue is step 3's).
// Throws normkit::Error, before writing anything, on: partials that do not parse as
// concatenated statistics buffers (truncated, gradient partials, garbage), pieces with
// different channel counts or spatial sizes, a channel count != the length of save_mean /
// save_invstd / running_mean / running_var, pieces that overlap or do not tile
// [0, global_batch) exactly (the message names the samples missing or covered twice),
// global_batch < 0, only one running statistic given, eps negative or not finite, momentum
// outside [0, 1], global_batch * S == 1 ("Expected more than 1 value per channel when
// training"). global_batch * S == 0 writes nothing and leaves the running statistics as they
// were.
void batch_norm_merge_statistics(const BatchNormParams& params, int64_t global_batch,
                                 std::span<const double> partials, std::span<float> save_mean,
                                 std::span<float> save_invstd, std::span<float> running_mean,
                                 std::span<float> running_var);

// Step 3 of the forward: y = epilogue((x - mean[c]) * invstd[c] * weight[c] + bias[c]) for the
// piece x, with mean and invstd from batch_norm_merge_statistics.
// Reads x, weight and bias (optional), mean and invstd (length C, required),
// params.epilogue.residual (optional). Overwrites y (shape/format/dtype of x).
// Throws normkit::Error, before writing anything, on: rank outside 2..5, a vector of length
// != C, a missing mean or invstd, y or epilogue.residual unlike x, int64 overflow.
// x with no samples writes nothing.
void batch_norm_normalize(const BatchNormParams& params, const TensorView& x,
                          std::span<const float> weight, std::span<const float> bias,
                          std::span<const float> mean, std::span<const float> invstd,
                          const TensorView& y, const Context& ctx = {});

// Step 1 of the backward: per channel, sum g and sum g * (x - save_mean) over the piece's
// samples [offset, offset + x.batch()), g being dy through params.epilogue's mask.
// Reads dy, x, save_mean (length C, required), params.epilogue.y (required with relu).
// Overwrites all of partials (size batch_norm_partials_size(offset, x.batch(), x.channels())).
// Writes nothing else (dresidual is step 3's).
// Throws normkit::Error, before writing anything, on: dy or epilogue.y unlike x, a save_mean
// of length != C, epilogue.y missing with relu, offset < 0, a partials size other than the
// above, a too-small workspace, and x's own errors as in batch_norm_statistics_partials.
void batch_norm_gradient_partials(const BatchNormBackwardParams& params, int64_t offset,
                                  const TensorView& dy, const TensorView& x,
                                  std::span<const float> save_mean, std::span<double> partials,
                                  const Context& ctx = {});

// Step 2 of the backward: merges the gradient partials of all pieces of a global batch of
// global_batch samples (concatenated in any order) over the canonical tree.
// Reads partials, save_invstd (length C, required). Overwrites sum_g and sum_g_xmu (length C,
// required: the global sum g and sum g * (x - mean)) and, when given, dweight = sum_g_xmu *
// save_invstd and dbias = sum_g (length C, not added to).
// Throws normkit::Error, before writing anything, on the partials errors of
// batch_norm_merge_statistics (statistics partials given here included) and a vector of
// length != C.
void batch_norm_merge_gradients(int64_t global_batch, std::span<const double> partials,
                                std::span<const float> save_invstd, std::span<double> sum_g,
                                std::span<double> sum_g_xmu, std::span<float> dweight,
                                std::span<float> dbias);

// Step 3 of the backward, for the piece x of a global batch of global_batch samples:
//   dx = (g - sum_g / M - (x - mean) * invstd^2 * sum_g_xmu / M) * invstd * weight
// with M = global_batch * S, from the global sums of batch_norm_merge_gradients.
// Reads dy, x, save_mean and save_invstd (required), weight (optional), sum_g and sum_g_xmu
// (length C, required), params.epilogue.y (required with relu). Overwrites dx and
// params.epilogue.dresidual (optional) with g.
// Throws normkit::Error, before writing anything, on: dy, dx or an epilogue tensor unlike x,
// a vector of length != C, a missing required vector, epilogue.y missing with relu,
// global_batch < x.batch(), int64 overflow.
void batch_norm_backward_dx(const BatchNormBackwardParams& params, int64_t global_batch,
                            const TensorView& dy, const TensorView& x,
                            std::span<const float> save_mean, std::span<const float> save_invstd,
                            std::span<const float> weight, std::span<const double> sum_g,
                            std::span<const double> sum_g_xmu, const TensorView& dx,
                            const Context& ctx = {});

}  // namespace normkit
