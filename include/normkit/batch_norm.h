#pragma once
// Batch Normalization (Ioffe & Szegedy 2015), with PyTorch's functional semantics.
//
// Training: per channel c, over all n and spatial positions (M = N * spatial values):
//   mean = E[x], var = E[(x - mean)^2] (biased), invstd = 1 / sqrt(var + eps)
//   y = (x - mean) * invstd * weight[c] + bias[c]
//   running_mean <- (1 - momentum) * running_mean + momentum * mean
//   running_var  <- (1 - momentum) * running_var  + momentum * var * M / (M - 1)
// Inference: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
// The mode is the function's name; it is never guessed from the batch size.
//
// Activations (x, y, dy, dx and the epilogue tensors) may be float32, bfloat16 or float16, all
// of one dtype; weight, bias and every statistic are float32, and every sum is accumulated in
// float32 or wider (so float16 squares cannot overflow). Results are bitwise identical for any
// thread count.
#include <cstddef>
#include <span>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit {

struct BatchNormParams {
  double eps = 1e-5;
  double momentum = 0.1;  // weight of the new batch in the running averages, in [0, 1]
  // Both forwards: y = act(normalized(x) + residual?) (act none, relu or silu), in the same
  // pass (epilogue.h).
  ForwardEpilogue epilogue = {};
};

// Parameters of the training backward: the epilogue of the forward it differentiates (the
// gradient goes through the batch statistics, so no eps: save_invstd already holds it).
struct BatchNormBackwardParams {
  BackwardEpilogue epilogue = {};
};

// Parameters of the inference backward: the eps the inference forward added to running_var,
// and the forward's epilogue.
struct BatchNormInferenceBackwardParams {
  double eps = 1e-5;
  BackwardEpilogue epilogue = {};
};

// Bytes of scratch memory the CPU kernels use for an input shaped like x (any of the four
// functions; 0 for an empty x), including room to align a buffer of any alignment. Pass at
// least that much as Context::workspace to have no allocation in the call; with an empty
// workspace each calling thread keeps a buffer of its own, allocated on first use and reused.
std::size_t batch_norm_workspace_size(const TensorView& x);

// Reads x, weight and bias (length C, optional), running_mean and running_var (length C,
// optional: either both or neither), params.epilogue.residual (optional).
// Overwrites y (shape/format/dtype of x), save_mean and save_invstd (length C each).
// Updates running_mean and running_var in place as above, when given.
// Throws normkit::Error, before writing anything, on: rank outside 2..5, length != C of any
// vector, only one running statistic given, eps negative or not finite, momentum outside [0, 1],
// M == 1 ("Expected more than 1 value per channel when training"), int64 overflow,
// y or epilogue.residual shape/format/dtype != x's, a workspace smaller than
// batch_norm_workspace_size(x). N == 0 writes nothing and leaves running stats unchanged.
void batch_norm_forward_training(const BatchNormParams& params, const TensorView& x,
                                 std::span<const float> weight, std::span<const float> bias,
                                 const TensorView& y, std::span<float> save_mean,
                                 std::span<float> save_invstd, std::span<float> running_mean,
                                 std::span<float> running_var, const Context& ctx = {});

// Reads x, running_mean and running_var (length C, required), weight and bias (optional).
// Overwrites y. Throws normkit::Error as the training forward (momentum is not used).
void batch_norm_forward_inference(const BatchNormParams& params, const TensorView& x,
                                  std::span<const float> weight, std::span<const float> bias,
                                  std::span<const float> running_mean,
                                  std::span<const float> running_var, const TensorView& y,
                                  const Context& ctx = {});

// Backward of the training forward: the gradient flows through the batch statistics.
// With g = dy * act'(z) (the forward's epilogue, epilogue.h: relu reads params.epilogue.y, the
// forward's output, required then; silu recomputes z from x, save_mean, save_invstd, weight and
// params.epilogue.bias and .residual, the forward's own, absent exactly when the forward had
// none), the gradient of the normalization is computed from g.
// Reads dy, x, save_mean and save_invstd from the training forward, weight (optional),
// params.epilogue.y (with relu), params.epilogue.residual and .bias (with silu).
// Overwrites dx, params.epilogue.dresidual (optional) with g, and (does not add to) dweight,
// dbias (optional, length C).
// Throws normkit::Error, before writing anything, on a dy or dx unlike x, a vector of length
// != C, a missing save_mean / save_invstd, epilogue.y missing with relu, an epilogue tensor
// unlike x, an epilogue.bias of length != C, an activation not in the enum, a too-small
// workspace.
void batch_norm_backward_training(const BatchNormBackwardParams& params, const TensorView& dy,
                                  const TensorView& x, std::span<const float> save_mean,
                                  std::span<const float> save_invstd,
                                  std::span<const float> weight, const TensorView& dx,
                                  std::span<float> dweight, std::span<float> dbias,
                                  const Context& ctx = {});

// Backward of the inference forward: the running statistics are constants.
// Reads dy, x, running_mean, running_var, weight (optional), params.epilogue.y (with relu),
// params.epilogue.residual and .bias (with silu: z as the inference forward made it).
// Overwrites dx, params.epilogue.dresidual (optional), dweight, dbias. x is read only when
// dweight is wanted or with silu. Throws as the training backward, and on a bad params.eps.
void batch_norm_backward_inference(const BatchNormInferenceBackwardParams& params,
                                   const TensorView& dy, const TensorView& x,
                                   std::span<const float> running_mean,
                                   std::span<const float> running_var,
                                   std::span<const float> weight, const TensorView& dx,
                                   std::span<float> dweight, std::span<float> dbias,
                                   const Context& ctx = {});

}  // namespace normkit
