#pragma once
// Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020), for x of
// shape (N, C, *spatial) in either memory format: instance norm without the mean, then a
// learned per-channel floor.
//   nu2 = mean over the spatial positions of x^2, per (n, c)
//   rstd = 1 / sqrt(nu2 + eps)
//   z = x * rstd * weight[c] + bias[c],   y = max(z, tau[c])
// Activations (x, y, dy, dx) may be float32, bfloat16 or float16, all of one dtype; weight, bias,
// tau, rstd and the parameter gradients are float32, every sum float32 or wider. Results are
// bitwise identical for any thread count.
//
// eps is a value. The paper's learned-eps variant enters as eps = |eps_learned| + eps_min: pass
// that sum; frn_backward's deps gives the loss's gradient in eps per channel, and
// d eps_learned = sign(eps_learned) * deps (summed over c for one eps_learned per layer).
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

// Bytes of scratch memory the CPU kernels use for x, forward or backward (3 * N * C doubles,
// aligned; 0 when x has no elements). Pass at least that much as Context::workspace to have no
// allocation in the calls; an empty workspace uses a buffer of the calling thread. Reads the
// dims, format and dtype of x, not its data. Throws normkit::Error on the forward's checks of x.
std::size_t frn_workspace_size(const TensorView& x);

// Reads x, weight, bias, tau (length C each, all required).
// Overwrites y (shape, format and dtype of x) and rstd (N * C floats, (n, c) row-major): the
// saved 1 / sqrt(nu2 + eps) of the backward. A (n, c) without spatial positions gets rstd NaN.
// Throws normkit::Error, before writing anything, on: rank outside 2..5, a negative dim, element
// counts that overflow int64, an unsupported dtype, weight/bias/tau length != C, y
// shape/format/dtype != x's, rstd length != N * C, eps negative or not finite, a non-empty
// Context::workspace smaller than frn_workspace_size(x).
void frn_forward(double eps, const TensorView& x, std::span<const float> weight,
                 std::span<const float> bias, std::span<const float> tau, const TensorView& y,
                 std::span<float> rstd, const Context& ctx = {});

// Backward of frn_forward. The TLU's gradient goes to tau exactly where the forward's max picked
// tau, z < tau; where z >= tau (ties included) it goes to x's side. z is recomputed from x,
// rstd, weight and bias (hence they are read). With g = dy where z >= tau, else 0, per (n, c) over
// its S spatial positions (xhat = x * rstd):
//   dx = weight[c] * rstd * (g - xhat * mean(g * xhat))
//   dweight[c] = sum over n, s of g * xhat,  dbias[c] = sum of g,  dtau[c] = sum of dy - g
//   deps[c] = -weight[c] / 2 * sum over n of rstd^2 * sum over s of g * xhat
// (the gradient in the eps the forward used, per channel; a per-layer scalar eps's gradient is
// the sum of deps over c).
// Reads dy, x, rstd (as written by the forward), weight, bias, tau (length C, required).
// Overwrites dx (like x) and dweight, dbias, dtau, deps (length C each, optional; overwritten,
// not added to). Throws normkit::Error, before writing anything, on the forward's checks of x,
// the vectors and the workspace, dy or dx shape/format/dtype != x's, rstd length != N * C, and
// dweight/dbias/dtau/deps length != C.
void frn_backward(const TensorView& dy, const TensorView& x, std::span<const float> rstd,
                  std::span<const float> weight, std::span<const float> bias,
                  std::span<const float> tau, const TensorView& dx, std::span<float> dweight,
                  std::span<float> dbias, std::span<float> dtau, std::span<float> deps,
                  const Context& ctx = {});

// The same without deps (as the call above with deps empty); callers that pass a Context
// positionally keep compiling.
void frn_backward(const TensorView& dy, const TensorView& x, std::span<const float> rstd,
                  std::span<const float> weight, std::span<const float> bias,
                  std::span<const float> tau, const TensorView& dx, std::span<float> dweight,
                  std::span<float> dbias, std::span<float> dtau, const Context& ctx = {});

}  // namespace normkit
