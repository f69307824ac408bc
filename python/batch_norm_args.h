#pragma once
// BatchNorm's Python arguments for the synchronized batch_norm_forward / batch_norm_backward
// (normkit._mpi), converted and checked by array_args.h as normkit._normkit converts its own:
// the same rules and messages, under the calling function's name.
#include "array_args.h"

namespace normkit::python {

// A training or inference forward: the inputs, and new y, save_mean, save_invstd.
struct BatchNormForwardArgs {
  Activation x;
  RunningStat running_mean, running_var;
  VectorIn weight, bias;
  Activation y;
  VectorOut save_mean, save_invstd;  // length C when training, else empty
};

inline BatchNormForwardArgs batch_norm_forward_args(const char* function, const py::object& x_in,
                                                    const OptionalArray& running_mean_in,
                                                    const OptionalArray& running_var_in,
                                                    const OptionalArray& weight_in,
                                                    const OptionalArray& bias_in,
                                                    bool training) {
  BatchNormForwardArgs a;
  a.x = activation_input(function, "x", x_in);
  a.running_mean = running_stat(function, "running_mean", running_mean_in, training);
  a.running_var = running_stat(function, "running_var", running_var_in, training);
  a.weight = vector_input(function, "weight", weight_in);
  a.bias = vector_input(function, "bias", bias_in);
  a.y = activation_output(a.x);
  // As torch: inference saves no statistics; its backward reads the running ones.
  const Shape stats{training ? channels_of(a.x.view) : 0};
  a.save_mean = vector_output(a.x.tensor, stats);
  a.save_invstd = vector_output(a.x.tensor, stats);
  return a;
}

// An empty batch has no statistics and the kernels write none; give them a defined value.
inline void define_empty_statistics(BatchNormForwardArgs& a) {
  if (a.x.tensor.size() != 0) return;
  std::fill(a.save_mean.span.begin(), a.save_mean.span.end(), 0.0f);
  std::fill(a.save_invstd.span.begin(), a.save_invstd.span.end(), 0.0f);
}

// A training backward: the inputs, and new dx, dweight, dbias (the last two only with weight).
struct BatchNormBackwardArgs {
  Activation x, dy;
  VectorIn weight, save_mean, save_invstd;
  Activation dx;
  VectorOut dweight, dbias;
};

// The part both backwards share: dy follows x's memory format.
inline BatchNormBackwardArgs batch_norm_backward_args(const char* function,
                                                      const py::object& dy_in,
                                                      const py::object& x_in,
                                                      const OptionalArray& weight_in) {
  BatchNormBackwardArgs a;
  a.x = activation_input(function, "x", x_in);
  a.dy = activation_input(function, "dy", dy_in, a.x.view.format);
  a.weight = vector_input(function, "weight", weight_in);
  a.dx = activation_output(a.x);
  if (a.weight.present()) {
    a.dweight = vector_output(a.x.tensor, {channels_of(a.x.view)});
    a.dbias = vector_output(a.x.tensor, {channels_of(a.x.view)});
  }
  return a;
}

// The training backward's saved statistics, required.
inline void batch_norm_saved_statistics(const char* function, BatchNormBackwardArgs& a,
                                        const OptionalArray& save_mean_in,
                                        const OptionalArray& save_invstd_in) {
  if (!save_mean_in || !save_invstd_in)
    value_error(function, "save_mean and save_invstd (from batch_norm_forward with "
                          "training=True) are required when training=True");
  a.save_mean = vector_input(function, "save_mean", save_mean_in);
  a.save_invstd = vector_input(function, "save_invstd", save_invstd_in);
}

}  // namespace normkit::python
