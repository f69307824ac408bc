#pragma once
// Optimized BatchNorm kernels: Highway SIMD, compiled for every x86 target (SSE4, AVX2,
// AVX-512, scalar fallback) and chosen at run time, on OpenMP threads. Activations are float32,
// bfloat16 or float16 (`dtype`); weights, statistics and every sum are float32 or wider. Same
// contracts as src/ref/batch_norm.h (validated arguments, either memory format, optional
// pointers may be null), plus a thread count and a workspace.
//
// Work is cut into pieces whose boundaries depend on the shape only; every piece writes its own
// partial result and partials are merged in a fixed order, so the output is bitwise identical for
// any num_threads (for a given SIMD target).
//
// Cache: for channels-first data whose per-channel slice fits in a core's L2, each thread takes
// blocks of whole channels (as many as fit in L2 together; their runs of one sample are one
// contiguous stream) and runs the reduction and the elementwise pass of a block back to back,
// so the second pass reads from cache. Otherwise (few channels, channels-last, large slices) the
// reduction runs over all of x split by channel, sample and position, then the elementwise
// pass, all in one parallel region. Float32 outputs (y, dx) of 16 MiB or more are written with
// non-temporal stores (cpu/simd.h). Both compute every per-channel sum in the same order, so
// which one runs does not change a bit of the result.
#include <cstddef>
#include <cstdint>
#include <span>

#include "normkit/tensor.h"
#include "plan/shapes.h"

namespace normkit::cpu {

using plan::BatchNormShape;

struct ForwardJob {
  DType dtype = DType::float32;
  BatchNormShape shape;
  const void* x = nullptr;
  void* y = nullptr;
  const void* residual = nullptr;  // optional, added before the ReLU
  bool relu = false;
  const float* weight = nullptr;  // optional
  const float* bias = nullptr;    // optional
  double eps = 1e-5;
};

struct BackwardJob {
  DType dtype = DType::float32;
  BatchNormShape shape;
  const void* dy = nullptr;
  const void* x = nullptr;
  void* dx = nullptr;
  const void* y = nullptr;  // the forward's output, read when relu
  bool relu = false;
  void* dresidual = nullptr;      // optional, receives the masked dy
  const float* weight = nullptr;  // optional
  float* dweight = nullptr;       // optional
  float* dbias = nullptr;         // optional
};

// Bytes of scratch any of the four kernels needs for this shape (0 for an empty one).
std::size_t workspace_size(const BatchNormShape& shape);

// `workspace`: at least workspace_size(shape) bytes, or empty to use a buffer of the calling
// thread (allocated on first use, then reused).

// One statistics pass (stable, mergeable moments), then one fused pass
// y = epilogue(x * a[c] + b[c]) with a = invstd * weight and b = bias - mean * a.
void batch_norm_forward_training(const ForwardJob& job, float* save_mean, float* save_invstd,
                                 float* running_mean, float* running_var, double momentum,
                                 int num_threads, std::span<std::byte> workspace);

// One streaming pass with a, b folded from the running statistics.
void batch_norm_forward_inference(const ForwardJob& job, const float* running_mean,
                                  const float* running_var, int num_threads,
                                  std::span<std::byte> workspace);

// One pass for both reductions (sum g and sum (x - mean) * g per channel, g the masked dy),
// then one elementwise pass dx = g * p[c] + (x - mean) * q[c] + r[c].
void batch_norm_backward_training(const BackwardJob& job, const float* save_mean,
                                  const float* save_invstd, int num_threads,
                                  std::span<std::byte> workspace);

// dx = g * weight * invstd in one pass; the reductions for dweight/dbias only when requested.
void batch_norm_backward_inference(const BackwardJob& job, const float* running_mean,
                                   const float* running_var, double eps, int num_threads,
                                   std::span<std::byte> workspace);

}  // namespace normkit::cpu
