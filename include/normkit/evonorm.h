#pragma once
// EvoNorm-S0 (Liu et al. 2020), for x of shape (N, C, *spatial) in either memory format: a
// sigmoid-gated numerator over GroupNorm's group standard deviation.
//   per sample n and group g (channels g*C/G ... (g+1)*C/G - 1, all spatial positions):
//     mean = E[x], var = E[(x - mean)^2] (biased), rstd = 1 / sqrt(var + eps)
//   y = x * sigmoid(v[c] * x) * rstd * weight[c] + bias[c]
// The numerator is not centred: the group mean enters only through the variance.
// Activations (x, y, dy, dx) may be float32, bfloat16 or float16, all of one dtype; v, weight,
// bias, the statistics and the parameter gradients are float32, every sum float32 or wider.
// The statistics are GroupNorm's (normkit/group_norm.h), computed by the same kernels, bitwise.
// Results are bitwise identical for any thread count.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct EvoNormS0Params {
  int64_t num_groups = 1;  // G, dividing C
  double eps = 1e-5;
};

// Bytes of scratch memory the CPU kernels use for x cut into params.num_groups groups, forward
// or backward; 0 when x has no elements. Pass at least that much as Context::workspace to have
// no allocation in the calls; an empty workspace uses a buffer of the calling thread. Reads the
// dims, format and dtype of x, not its data. Throws normkit::Error on the forward's checks of x,
// num_groups and eps.
std::size_t evonorm_s0_workspace_size(const EvoNormS0Params& params, const TensorView& x);

// Reads x, v, weight, bias (length C each, all required).
// Overwrites y (shape, format and dtype of x), mean and rstd (N * G floats each, (n, g)
// row-major; as group_norm_forward writes them for x and params, bitwise).
// Throws normkit::Error, before writing anything, on: rank outside 2..5, a negative dim, element
// counts that overflow int64, an unsupported dtype, num_groups <= 0 or not dividing C,
// v/weight/bias length != C, y shape/format/dtype != x's, mean/rstd length != N * G, eps negative
// or not finite, a non-empty Context::workspace smaller than evonorm_s0_workspace_size.
void evonorm_s0_forward(const EvoNormS0Params& params, const TensorView& x,
                        std::span<const float> v, std::span<const float> weight,
                        std::span<const float> bias, const TensorView& y, std::span<float> mean,
                        std::span<float> rstd, const Context& ctx = {});

// Backward of evonorm_s0_forward. With s = sigmoid(v x), h = x * s and M the group's element
// count, the gradient flows through the numerator and through the group statistics (the std
// depends on x too):
//   dx = dy * weight * rstd * s * (1 + v x (1 - s))                 (through h)
//        - rstd^3 (x - mean) / M * sum over the group of dy * weight * h    (through rstd)
//   dv[c] = sum over n, s of dy * weight * rstd * x^2 s (1 - s)
//   dweight[c] = sum of dy * h * rstd,   dbias[c] = sum of dy
// Reads dy, x, mean and rstd (as written by the forward), v, weight (length C, required).
// Overwrites dx (like x) and dv, dweight, dbias (length C each, optional; overwritten, not
// added to). Throws normkit::Error, before writing anything, on the forward's checks of x,
// num_groups, v, weight and the workspace, dy or dx shape/format/dtype != x's, mean/rstd length
// != N * G, and dv/dweight/dbias length != C.
void evonorm_s0_backward(int64_t num_groups, const TensorView& dy, const TensorView& x,
                         std::span<const float> mean, std::span<const float> rstd,
                         std::span<const float> v, std::span<const float> weight,
                         const TensorView& dx, std::span<float> dv, std::span<float> dweight,
                         std::span<float> dbias, const Context& ctx = {});

}  // namespace normkit
