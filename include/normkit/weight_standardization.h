#pragma once
// Weight Standardization (Qiao et al. 2019, timm's StdConv2d): each output channel of a conv
// weight w (C_out, C_in, *kernel dims; rank 2 to 5) standardized over the rest of its values:
//   per o < C_out: mean, biased var over w[o, ...], rstd = 1/sqrt(var + eps)
//   w_hat[o, ...] = (w[o, ...] - mean) * rstd
// This is layer_norm over the trailing rank - 1 dims without weight or bias (layer_norm.h), and
// it runs on layer_norm's kernels: the same dtypes (float32, bfloat16, float16 weights; mean and
// rstd float32; sums in float32 or wider), both memory formats (channels_last keeps each output
// channel's values together, so it is one row as well) and bitwise identical results for any
// thread count.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

// Bytes of scratch memory the CPU kernels use for a weight shaped like w, forward or backward, as
// layer_norm_workspace_size (layer_norm.h). Throws normkit::Error on the forward's checks of w
// and eps.
std::size_t weight_standardization_workspace_size(const TensorView& w, double eps = 1e-5);

// Reads w. Overwrites w_hat (like w), mean and rstd (length C_out).
// Throws normkit::Error before writing anything on a rank of w outside [2, 5], a dtype not
// float32, bfloat16 or float16, a bad eps (negative or not finite), a w_hat unlike w, a mean or
// rstd not of length C_out, overflow, or a workspace smaller than
// weight_standardization_workspace_size(w, eps).
void weight_standardization_forward(const TensorView& w, double eps, const TensorView& w_hat,
                                    std::span<float> mean, std::span<float> rstd,
                                    const Context& ctx = {});

// The gradient with respect to w of a loss whose gradient with respect to w_hat is dw_hat; per
// output channel, with xhat = (w - mean) * rstd:
//   dw = rstd * (dw_hat - mean(dw_hat) - xhat * mean(dw_hat * xhat))
// Reads dw_hat, w, mean and rstd (the forward's). Overwrites dw (like w; not added to).
// Throws normkit::Error before writing anything on the forward's checks of w, a dw_hat or dw
// unlike w, or a mean or rstd not of length C_out.
void weight_standardization_backward(const TensorView& dw_hat, const TensorView& w,
                                     std::span<const float> mean, std::span<const float> rstd,
                                     const TensorView& dw, const Context& ctx = {});

}  // namespace normkit
