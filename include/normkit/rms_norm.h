#pragma once
// RMSNorm (Zhang & Sennrich 2019; torch.nn.functional.rms_norm): layer_norm without the mean,
// over the trailing `normalized_ndim` dims of x, with an optional elementwise weight.
//   rows = product of the leading dims, cols = product of the normalized dims
//   per row: rstd = 1/sqrt(mean(h^2) + eps); y = h * rstd * w[j]
// where h = x, or h = x + residual_in with the fused residual add of pre-norm transformers
// (below). Rank, layouts, dtypes and determinism are layer_norm's (layer_norm.h): activations
// float32, bfloat16 or float16, all of one dtype; weight, rstd and dweight float32; every sum in
// float32 or wider; bitwise identical results for any thread count.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct RmsNormParams {
  int normalized_ndim = 1;  // how many trailing dims are normalized, 1..rank
  double eps = 1e-6;        // torch's default is the dtype's machine epsilon: pass it explicitly
  // Forward: y = act(normalized(h) + residual?) (act none, relu or silu), in the same pass
  // (epilogue.h). This residual is added after the norm; residual_in below, before it.
  ForwardEpilogue epilogue = {};
  // The fused residual add: when residual_in.data is not null, h = x + residual_in (rounded to
  // the activation dtype) is written to sum_out and normalized. Both then shaped like x;
  // sum_out may be the memory of x or of residual_in (in place), no other overlap.
  TensorView residual_in;
  TensorView sum_out;
};

// Bytes of scratch memory the CPU kernels use for x, forward or backward, as
// layer_norm_workspace_size (layer_norm.h). Reads params.normalized_ndim and params.eps only.
std::size_t rms_norm_workspace_size(const RmsNormParams& params, const TensorView& x);

// Reads x, weight (length cols, optional: 1), params.epilogue.residual and params.residual_in
// (optional). Overwrites y (like x), rstd (length rows) and, with residual_in, sum_out.
// An empty row (cols == 0) gets rstd NaN.
// Throws normkit::Error before writing anything on bad ranks, lengths, eps, layouts, dtypes,
// overflow, an epilogue.residual unlike x, a residual_in unlike x or without sum_out (or a
// sum_out without residual_in), a sum_out unlike x, or a workspace smaller than
// rms_norm_workspace_size(params, x).
void rms_norm_forward(const RmsNormParams& params, const TensorView& x,
                      std::span<const float> weight, const TensorView& y, std::span<float> rstd,
                      const Context& ctx = {});

struct RmsNormBackwardParams {
  int normalized_ndim = 1;  // as the forward's
  // The forward's activation, as layer_norm_backward's (layer_norm.h; epilogue.bias: none, RMSNorm
  // has no bias, so it must be empty).
  BackwardEpilogue epilogue = {};
  // The gradient arriving at the forward's sum_out (optional, shaped like x): with the fused
  // residual add, h = x + residual_in feeds both the norm and sum_out, so
  //   dh = d(norm) + dsum_out,   and dx = dresidual_in = dh.
  TensorView dsum_out;
};

// x is what the forward normalized: the forward's x, or its sum_out with the fused residual add.
// Per row, with g = dy through the epilogue (layer_norm.h), gw = g * w[j], xhat = x * rstd:
//   dx = rstd * (gw - xhat * mean(gw * xhat)) + dsum_out?
//   dweight[j] = sum over rows of g * xhat
// Reads dy, x, rstd, weight (optional), params.epilogue.y (relu), .residual (silu),
// params.dsum_out (optional). Overwrites dx (like x), dweight (length cols, optional; overwritten,
// not added to) and, when given, params.epilogue.dresidual with g. dx may not overlap dsum_out
// unless it is the same memory. Throws normkit::Error before writing anything on the forward's
// checks of x, normalized_ndim, weight and the workspace, a dy, dx or dsum_out unlike x, a vector
// of the wrong length, relu without epilogue.y, an epilogue.bias given, an activation not in the
// enum, or an epilogue tensor unlike x.
void rms_norm_backward(const RmsNormBackwardParams& params, const TensorView& dy,
                       const TensorView& x, std::span<const float> rstd,
                       std::span<const float> weight, const TensorView& dx,
                       std::span<float> dweight, const Context& ctx = {});

}  // namespace normkit
