#pragma once
// LayerNorm over the channel dimension of x (N, C, *spatial) (ConvNeXt's LayerNorm2d; torch
// composes it as permute, layer_norm over the last dim, permute back):
//   positions = N * spatial; per (n, s): mean and biased var of the C values x[n, :, s],
//   rstd = 1/sqrt(var + eps); y[n, c, s] = (x[n, c, s] - mean) * rstd * w[c] + b[c]
// mean and rstd are indexed n * spatial + s (s over the spatial dims in channels-first order).
// x has rank 2 to 5, either memory format: channels_last rows are layer_norm's rows (its
// kernels run them); channels_first has its own kernel, vectorized across spatial positions.
//
// Activations (x, y, dy, dx) may be float32, bfloat16 or float16, all of one dtype; weight, bias,
// mean, rstd and the parameter gradients are float32, every sum in float32 or wider. Results are
// bitwise identical for any thread count.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

// Bytes of scratch memory the CPU kernels use for x (0 for channels_first, which uses none;
// layer_norm_workspace_size's rows of C for channels_last). Throws normkit::Error on the
// forward's checks of x and eps.
std::size_t layer_norm2d_workspace_size(const TensorView& x, double eps = 1e-6);

// Reads x, weight and bias (length C, optional). Overwrites y (like x), mean and rstd (length
// N * spatial). Throws normkit::Error before writing anything on a rank outside [2, 5], a dtype
// not float32, bfloat16 or float16, a bad eps, a y unlike x, a vector of the wrong length,
// overflow, or a workspace smaller than layer_norm2d_workspace_size(x, eps).
void layer_norm2d_forward(const TensorView& x, double eps, std::span<const float> weight,
                          std::span<const float> bias, const TensorView& y,
                          std::span<float> mean, std::span<float> rstd, const Context& ctx = {});

// Per position, with gw = dy * w[c] and xhat = (x - mean) * rstd:
//   dx = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat))
//   dweight[c] = sum over positions of dy * xhat; dbias[c] = sum over positions of dy
// Reads dy, x, mean, rstd (the forward's), weight (optional). Overwrites dx (like x), dweight and
// dbias (length C, optional; overwritten, not added to). Throws normkit::Error before writing
// anything on the forward's checks of x, a dy or dx unlike x, a vector of the wrong length, or a
// workspace smaller than layer_norm2d_workspace_size(x).
void layer_norm2d_backward(const TensorView& dy, const TensorView& x, std::span<const float> mean,
                           std::span<const float> rstd, std::span<const float> weight,
                           const TensorView& dx, std::span<float> dweight,
                           std::span<float> dbias, const Context& ctx = {});

}  // namespace normkit
