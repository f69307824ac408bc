// normkit's Python module: torch.nn.functional's names, defaults and semantics over NumPy arrays
// and DLPack tensors (torch.Tensor among them).
//
// Tensors come as NumPy arrays or as any object with __dlpack__ / __dlpack_device__ (CPU
// memory). Activations (x, dy) may come in either memory format: a tensor whose strides are
// those of a channels-last tensor (NLC, NHWC, NDHWC memory seen as (N, C, *spatial)) is computed
// channels-last and its outputs get the same strides; a C-contiguous one is computed
// channels-first. A NumPy array with any other strides is copied to C-contiguous first; a
// DLPack tensor never is (other strides are an error), so its memory is the kernels'. Results
// are new tensors of the kind x is: NumPy arrays for NumPy, torch tensors for torch (handed over
// through DLPack), DLPackTensor objects for other producers. Only the running statistics passed
// in are written to. The argument conversions are array_args.h's, shared with normkit._mpi.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "array_args.h"
#include "normkit/batch_norm.h"
#include "normkit/batch_renorm.h"
#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/fold_batch_norm.h"
#include "normkit/evonorm.h"
#include "normkit/frn.h"
#include "normkit/group_norm.h"
#include "normkit/instance_norm.h"
#include "normkit/layer_norm.h"
#include "normkit/layer_norm2d.h"
#include "normkit/weight_standardization.h"
#include "normkit/rms_norm.h"
#include "normkit/tensor.h"

namespace py = pybind11;
using normkit::DType;
using normkit::MemoryFormat;
using normkit::TensorView;

namespace {

using namespace normkit::python;

// ---------------------------------------------------------------------------------------------
// Fused epilogues: y = activation(normalized(x) + residual), and their gradients.

// The activations a forward can fuse, by the name Python passes: one row each, saying how the
// library's epilogue is set for it and what its gradient reads besides dy.
struct FusedActivation {
  const char* name;
  normkit::Activation activation;
  bool backward_needs_y;  // relu: the forward's output, whose sign is the mask
  // silu: z is recomputed from x, so the forward's residual and bias are read again.
  bool backward_needs_forward_inputs;
};
constexpr FusedActivation kFusedActivations[] = {
    {"relu", normkit::Activation::relu, true, false},
    {"silu", normkit::Activation::silu, false, true},
};

// nullptr for None.
const FusedActivation* fused_activation(const char* function, const py::object& activation) {
  if (activation.is_none()) return nullptr;
  std::string allowed = "None";
  for (const FusedActivation& a : kFusedActivations) allowed += std::string(", '") + a.name + "'";
  const std::string got = py::repr(activation).cast<std::string>();
  if (!py::isinstance<py::str>(activation))
    type_error(function, "activation must be one of " + allowed + ", got " + got);
  const std::string name = activation.cast<std::string>();
  for (const FusedActivation& a : kFusedActivations)
    if (name == a.name) return &a;
  value_error(function, "activation must be one of " + allowed + ", got " + got);
}

void set_activation(const FusedActivation* activation, normkit::ForwardEpilogue& epilogue) {
  epilogue.activation = activation ? activation->activation : normkit::Activation::none;
}
void set_activation(const FusedActivation* activation, normkit::BackwardEpilogue& epilogue) {
  epilogue.activation = activation ? activation->activation : normkit::Activation::none;
}

// An epilogue tensor is used where it lies, never copied: it must have x's shape and dtype and
// be dense in the memory format x is computed in. `x_view`: x as the kernel sees it (the
// epilogue tensor is seen the same way).
struct EpilogueTensor {
  py::object owner;
  TensorView view;
};

EpilogueTensor exactly_like_x(const char* function, const char* name, const py::object& obj,
                              const Activation& x, const TensorView& x_view) {
  const Tensor a = tensor_arg(function, name, obj);
  if (a.shape != x.tensor.shape)
    value_error(function, std::string(name) + " has shape " + shape_string(a.shape) +
                              ", expected x's shape " + shape_string(x.tensor.shape));
  if (activation_dtype(function, name, a) != x.view.dtype)
    type_error(function, std::string(name) + " has dtype " + a.dtype_name() +
                             ", expected x's dtype " + x.tensor.dtype_name());
  if (!a.aligned || (a.size() > 0 && !dense_in(a, x.view.format, true)))
    value_error(function, std::string(name) + " must be laid out as x is computed (" +
                              normkit::to_string(x.view.format) + ", byte strides " +
                              shape_string(dense_strides(a.shape, x.view.format, a.itemsize)) +
                              "), got byte strides " + strides_string(a));
  TensorView view = x_view;
  view.data = a.data;
  return {a.owner, view};
}

// What a forward fuses: `activation` (None or a name of kFusedActivations) and `residual`
// (None or an array exactly like x).
struct FusedForward {
  normkit::ForwardEpilogue epilogue;
  py::object residual;  // keeps the residual's memory alive
};

FusedForward forward_epilogue(const char* function, const py::object& activation,
                                          const OptionalArray& residual, const Activation& x,
                                          const TensorView& x_view) {
  FusedForward fused;
  set_activation(fused_activation(function, activation), fused.epilogue);
  if (residual) {
    const EpilogueTensor r = exactly_like_x(function, "residual", *residual, x, x_view);
    fused.epilogue.residual = r.view;
    fused.residual = r.owner;
  }
  return fused;
}

// What a backward undoes: the forward's `activation`, `y` (the forward's output, required when
// the activation's gradient reads it), the forward's `residual` and `bias` (required when the
// activation's gradient recomputes z), and whether the residual's gradient is wanted.
struct BackwardEpilogueArgs {
  py::object activation;
  OptionalArray y;
  bool residual_grad = false;
  // Ellipsis (the default) is "not given", None "the forward had none": the library cannot
  // tell a forgotten residual or bias from an absent one, so silu asks for both explicitly.
  py::object residual = py::ellipsis();
  py::object bias = py::ellipsis();
};

// Converts the forward's bias as the op's forward does (length C, or normalized_shape).
using BiasInput = std::function<VectorIn(const OptionalArray&)>;

struct FusedBackward {
  normkit::BackwardEpilogue epilogue;
  py::object y;                         // keeps y's memory alive
  py::object residual;                  // keeps the residual's memory alive
  VectorIn bias;                        // keeps the bias's memory alive
  std::optional<py::object> dresidual;  // a new tensor, with residual_grad
};

// A forward input a backward reads again (residual, bias): required with an activation whose
// gradient recomputes z, refused (unless None) with one that does not.
OptionalArray forward_input_again(const char* function, const char* name, const py::object& obj,
                                  const FusedActivation* activation,
                                  const py::object& activation_arg) {
  const bool needed = activation && activation->backward_needs_forward_inputs;
  const bool given = !obj.is(py::ellipsis());
  if (needed && !given)
    value_error(function, std::string(name) + " (the forward's " + name + ", or None if it had " +
                              "none) is required with activation='" + activation->name + "'");
  if (!needed && given && !obj.is_none())
    value_error(function, std::string(name) + " is not read with activation=" +
                              py::repr(activation_arg).cast<std::string>() +
                              ": pass the forward's activation with it");
  if (!given || obj.is_none()) return std::nullopt;
  return obj;
}

FusedBackward backward_epilogue(const char* function, const BackwardEpilogueArgs& args,
                                const Activation& x, const TensorView& x_view,
                                const BiasInput& bias_input) {
  FusedBackward fused;
  const FusedActivation* activation = fused_activation(function, args.activation);
  set_activation(activation, fused.epilogue);
  const OptionalArray residual =
      forward_input_again(function, "residual", args.residual, activation, args.activation);
  const OptionalArray bias =
      forward_input_again(function, "bias", args.bias, activation, args.activation);
  if (residual) {
    const EpilogueTensor r = exactly_like_x(function, "residual", *residual, x, x_view);
    fused.epilogue.residual = r.view;
    fused.residual = r.owner;
  }
  fused.bias = bias_input(bias);
  fused.epilogue.bias = fused.bias.span;
  if (activation && activation->backward_needs_y && !args.y)
    value_error(function, std::string("y (the forward's output) is required with activation='") +
                              activation->name + "'");
  if (args.y && !(activation && activation->backward_needs_y))
    value_error(function, std::string("y is not read with activation=") +
                              py::repr(args.activation).cast<std::string>() +
                              ": pass the forward's activation with it");
  if (args.y) {
    const EpilogueTensor y = exactly_like_x(function, "y", *args.y, x, x_view);
    fused.epilogue.y = y.view;
    fused.y = y.owner;
  }
  if (args.residual_grad) {
    const Output d = new_output(x.tensor, x.view.dtype, x.tensor.shape, x.view.format);
    fused.epilogue.dresidual = x_view;
    fused.epilogue.dresidual.data = d.data;
    fused.dresidual = d.value;
  }
  return fused;
}

// (dx, dweight, dbias), then dresidual when it was asked for.
py::tuple backward_result(const py::object& dx, const py::object& dweight, const py::object& dbias,
                          const FusedBackward& fused) {
  if (fused.dresidual) return py::make_tuple(dx, dweight, dbias, *fused.dresidual);
  return py::make_tuple(dx, dweight, dbias);
}

// ---------------------------------------------------------------------------------------------
// group_norm

// Whether the library accepts num_groups for x (its workspace query makes the forward's checks
// of x and num_groups). Only then do the statistics get the shape (N, num_groups); otherwise
// they get none and the op reports the problem in its own words, before reading them (and
// without N * num_groups floats allocated for a nonsense value).
bool groups_accepted(int64_t num_groups, const TensorView& x) {
  normkit::GroupNormParams params;
  params.num_groups = num_groups;
  try {
    normkit::group_norm_workspace_size(params, x);
  } catch (const normkit::Error&) {
    return false;
  }
  return true;
}

py::tuple group_norm_forward_impl(const char* function, const py::object& x_in,
                                  int64_t num_groups, const OptionalArray& weight_in,
                                  const OptionalArray& bias_in, double eps,
                                  const py::object& activation, const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const FusedForward fused = forward_epilogue(function, activation, residual, x, x.view);
  const normkit::GroupNormParams params{
      num_groups, eps, fused.epilogue};
  const Activation y = activation_output(x);
  const Shape stats_shape{batch_of(x.view), groups_accepted(num_groups, x.view) ? num_groups : 0};
  const VectorOut mean = vector_output(x.tensor, stats_shape);
  const VectorOut rstd = vector_output(x.tensor, stats_shape);
  without_gil([&] {
    normkit::group_norm_forward(params, x.view, weight.span, bias.span, y.view, mean.span,
                                rstd.span);
  });
  return py::make_tuple(y.tensor.value, mean.value, rstd.value);
}

py::tuple group_norm_backward_impl(const py::object& dy_in, const py::object& x_in,
                                   const py::object& mean_in, const py::object& rstd_in,
                                   int64_t num_groups, const OptionalArray& weight_in,
                                   const BackwardEpilogueArgs& fused_args) {
  const char* function = "group_norm_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const FusedBackward fused = backward_epilogue(
      function, fused_args, x, x.view,
      [&](const OptionalArray& b) { return vector_input(function, "bias", b); });
  const Shape stats_shape{batch_of(x.view), num_groups};
  const bool accepted = groups_accepted(num_groups, x.view);
  // The op sees the statistics flattened: their (N, num_groups) shape is checked here, once
  // the library accepts num_groups, so that a bad one is reported as such by the op.
  const VectorIn stats[2] = {
      saved_stat(function, "mean", mean_in, stats_shape, "(N, num_groups)", accepted),
      saved_stat(function, "rstd", rstd_in, stats_shape, "(N, num_groups)", accepted)};
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(x.tensor, {channels_of(x.view)});
    dbias = vector_output(x.tensor, {channels_of(x.view)});
  }
  const normkit::GroupNormBackwardParams params{num_groups, fused.epilogue};
  without_gil([&] {
    normkit::group_norm_backward(params, dy.view, x.view, stats[0].span, stats[1].span,
                                 weight.span, dx.view, dweight.span, dbias.span);
  });
  return backward_result(dx.tensor.value, or_none(dweight), or_none(dbias), fused);
}

// ---------------------------------------------------------------------------------------------
// batch_norm

py::tuple batch_norm_forward_impl(const char* function, const py::object& x_in,
                                  const OptionalArray& running_mean_in,
                                  const OptionalArray& running_var_in,
                                  const OptionalArray& weight_in, const OptionalArray& bias_in,
                                  bool training, double momentum, double eps,
                                  const py::object& activation, const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const RunningStat running_mean =
      running_stat(function, "running_mean", running_mean_in, training);
  const RunningStat running_var =
      running_stat(function, "running_var", running_var_in, training);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const FusedForward fused = forward_epilogue(function, activation, residual, x, x.view);
  const normkit::BatchNormParams params{
      eps, momentum, fused.epilogue};
  const Activation y = activation_output(x);
  if (training) {
    const VectorOut save_mean = vector_output(x.tensor, {channels_of(x.view)});
    const VectorOut save_invstd = vector_output(x.tensor, {channels_of(x.view)});
    without_gil([&] {
      normkit::batch_norm_forward_training(params, x.view, weight.span, bias.span, y.view,
                                           save_mean.span, save_invstd.span, running_mean.span,
                                           running_var.span);
    });
    // An empty batch has no statistics and the kernel writes none; give them a defined value.
    if (x.tensor.size() == 0) {
      std::fill(save_mean.span.begin(), save_mean.span.end(), 0.0f);
      std::fill(save_invstd.span.begin(), save_invstd.span.end(), 0.0f);
    }
    return py::make_tuple(y.tensor.value, save_mean.value, save_invstd.value);
  }
  // As torch: inference saves no statistics; its backward reads the running ones.
  const VectorOut save_mean = vector_output(x.tensor, {0});
  const VectorOut save_invstd = vector_output(x.tensor, {0});
  without_gil([&] {
    normkit::batch_norm_forward_inference(params, x.view, weight.span, bias.span,
                                          running_mean.span, running_var.span, y.view);
  });
  return py::make_tuple(y.tensor.value, save_mean.value, save_invstd.value);
}

py::tuple batch_norm_backward_impl(const py::object& dy_in, const py::object& x_in,
                                   const OptionalArray& weight_in,
                                   const OptionalArray& save_mean_in,
                                   const OptionalArray& save_invstd_in, bool training,
                                   const OptionalArray& running_mean_in,
                                   const OptionalArray& running_var_in, double eps,
                                   const BackwardEpilogueArgs& fused_args) {
  const char* function = "batch_norm_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const FusedBackward fused = backward_epilogue(
      function, fused_args, x, x.view,
      [&](const OptionalArray& b) { return vector_input(function, "bias", b); });
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(x.tensor, {channels_of(x.view)});
    dbias = vector_output(x.tensor, {channels_of(x.view)});
  }
  if (training) {
    if (!save_mean_in || !save_invstd_in)
      value_error(function, "save_mean and save_invstd (from batch_norm_forward with "
                            "training=True) are required when training=True");
    const VectorIn save_mean = vector_input(function, "save_mean", save_mean_in);
    const VectorIn save_invstd = vector_input(function, "save_invstd", save_invstd_in);
    without_gil([&] {
      normkit::batch_norm_backward_training({fused.epilogue}, dy.view, x.view, save_mean.span,
                                            save_invstd.span, weight.span, dx.view, dweight.span,
                                            dbias.span);
    });
  } else {
    if (!running_mean_in || !running_var_in)
      value_error(function, "running_mean and running_var are required when training=False");
    const VectorIn running_mean = vector_input(function, "running_mean", running_mean_in);
    const VectorIn running_var = vector_input(function, "running_var", running_var_in);
    const normkit::BatchNormInferenceBackwardParams params{.eps = eps,
                                                           .epilogue = fused.epilogue};
    without_gil([&] {
      normkit::batch_norm_backward_inference(params, dy.view, x.view, running_mean.span,
                                             running_var.span, weight.span, dx.view,
                                             dweight.span, dbias.span);
    });
  }
  return backward_result(dx.tensor.value, or_none(dweight), or_none(dbias), fused);
}

// ---------------------------------------------------------------------------------------------
// batch_renorm: training is BatchNorm corrected by r and d (saved for the backward); inference is
// batch_norm's with the running statistics.

py::tuple batch_renorm_forward_impl(const char* function, const py::object& x_in,
                                    const OptionalArray& running_mean_in,
                                    const OptionalArray& running_var_in,
                                    const OptionalArray& weight_in, const OptionalArray& bias_in,
                                    bool training, double momentum, double eps, double r_max,
                                    double d_max, const py::object& activation,
                                    const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const RunningStat running_mean =
      running_stat(function, "running_mean", running_mean_in, training);
  const RunningStat running_var =
      running_stat(function, "running_var", running_var_in, training);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const FusedForward fused = forward_epilogue(function, activation, residual, x, x.view);
  const Activation y = activation_output(x);
  const Shape stats{training ? channels_of(x.view) : 0};
  const VectorOut saved[4] = {vector_output(x.tensor, stats), vector_output(x.tensor, stats),
                              vector_output(x.tensor, stats), vector_output(x.tensor, stats)};
  if (training) {
    normkit::BatchRenormParams params;
    params.eps = eps, params.momentum = momentum, params.r_max = r_max, params.d_max = d_max;
    params.epilogue = fused.epilogue;
    without_gil([&] {
      normkit::batch_renorm_forward_training(params, x.view, weight.span, bias.span, y.view,
                                             saved[0].span, saved[1].span, saved[2].span,
                                             saved[3].span, running_mean.span, running_var.span);
    });
    // An empty batch has no statistics and the kernel writes none; give them a defined value.
    if (x.tensor.size() == 0)
      for (const VectorOut& v : saved) std::fill(v.span.begin(), v.span.end(), 0.0f);
  } else {
    const normkit::BatchNormParams params{eps, momentum, fused.epilogue};
    without_gil([&] {
      normkit::batch_norm_forward_inference(params, x.view, weight.span, bias.span,
                                            running_mean.span, running_var.span, y.view);
    });
  }
  return py::make_tuple(y.tensor.value, saved[0].value, saved[1].value, saved[2].value,
                        saved[3].value);
}

py::tuple batch_renorm_backward_impl(const py::object& dy_in, const py::object& x_in,
                                     const OptionalArray& weight_in,
                                     const OptionalArray& save_mean_in,
                                     const OptionalArray& save_invstd_in,
                                     const OptionalArray& save_r_in,
                                     const OptionalArray& save_d_in, bool training,
                                     const OptionalArray& running_mean_in,
                                     const OptionalArray& running_var_in, double eps,
                                     const BackwardEpilogueArgs& fused_args) {
  const char* function = "batch_renorm_backward";
  if (!training)
    return batch_norm_backward_impl(dy_in, x_in, weight_in, save_mean_in, save_invstd_in, false,
                                    running_mean_in, running_var_in, eps, fused_args);
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const FusedBackward fused = backward_epilogue(
      function, fused_args, x, x.view,
      [&](const OptionalArray& b) { return vector_input(function, "bias", b); });
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(x.tensor, {channels_of(x.view)});
    dbias = vector_output(x.tensor, {channels_of(x.view)});
  }
  if (!save_mean_in || !save_invstd_in || !save_r_in || !save_d_in)
    value_error(function, "save_mean, save_invstd, save_r and save_d (from batch_renorm_forward "
                          "with training=True) are required when training=True");
  const VectorIn save_mean = vector_input(function, "save_mean", save_mean_in);
  const VectorIn save_invstd = vector_input(function, "save_invstd", save_invstd_in);
  const VectorIn save_r = vector_input(function, "save_r", save_r_in);
  const VectorIn save_d = vector_input(function, "save_d", save_d_in);
  without_gil([&] {
    normkit::batch_renorm_backward_training({fused.epilogue}, dy.view, x.view, save_mean.span,
                                            save_invstd.span, save_r.span, save_d.span,
                                            weight.span, dx.view, dweight.span, dbias.span);
  });
  return backward_result(dx.tensor.value, or_none(dweight), or_none(dbias), fused);
}

// ---------------------------------------------------------------------------------------------
// instance_norm, layer_norm

// The (N, C) statistics of an instance_norm call (one per instance, as group_norm's (N, G) with
// G = C; torch has no native op that returns them).
Shape instance_stats_shape(const TensorView& x) { return {batch_of(x), channels_of(x)}; }

py::tuple instance_norm_forward_impl(const char* function, const py::object& x_in,
                                     const OptionalArray& running_mean_in,
                                     const OptionalArray& running_var_in,
                                     const OptionalArray& weight_in, const OptionalArray& bias_in,
                                     bool use_input_stats, double momentum, double eps,
                                     const py::object& activation,
                                     const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const RunningStat running_mean =
      running_stat(function, "running_mean", running_mean_in, use_input_stats);
  const RunningStat running_var =
      running_stat(function, "running_var", running_var_in, use_input_stats);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const FusedForward fused = forward_epilogue(function, activation, residual, x, x.view);
  const normkit::InstanceNormParams params{use_input_stats, momentum, eps, fused.epilogue};
  const Activation y = activation_output(x);
  const VectorOut mean = vector_output(x.tensor, instance_stats_shape(x.view));
  const VectorOut rstd = vector_output(x.tensor, instance_stats_shape(x.view));
  without_gil([&] {
    normkit::instance_norm_forward(params, x.view, weight.span, bias.span, running_mean.span,
                                   running_var.span, y.view, mean.span, rstd.span);
  });
  return py::make_tuple(y.tensor.value, mean.value, rstd.value);
}

py::tuple instance_norm_backward_impl(const py::object& dy_in, const py::object& x_in,
                                      const OptionalArray& save_mean_in,
                                      const OptionalArray& save_rstd_in,
                                      const OptionalArray& weight_in, bool use_input_stats,
                                      const OptionalArray& running_mean_in,
                                      const OptionalArray& running_var_in, double eps,
                                      const BackwardEpilogueArgs& fused_args) {
  const char* function = "instance_norm_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const FusedBackward fused = backward_epilogue(
      function, fused_args, x, x.view,
      [&](const OptionalArray& b) { return vector_input(function, "bias", b); });
  const Shape stats_shape = instance_stats_shape(x.view);
  bool accepted = true;
  try {
    normkit::instance_norm_workspace_size({use_input_stats, 0.1, 0.0}, x.view);
  } catch (const normkit::Error&) {
    accepted = false;
  }
  VectorIn mean, rstd;
  if (save_mean_in && save_rstd_in) {
    mean = saved_stat(function, "save_mean", *save_mean_in, stats_shape, "(N, C)", accepted);
    rstd = saved_stat(function, "save_rstd", *save_rstd_in, stats_shape, "(N, C)", accepted);
  } else if (use_input_stats) {
    value_error(function, "save_mean and save_rstd (from instance_norm_forward) are required "
                          "when use_input_stats=True");
  } else {
    // The statistics are the constants the forward used: the running ones, per sample, with
    // rstd formed as the forward forms it (so these are the forward's bits).
    if (!running_mean_in || !running_var_in)
      value_error(function, "use_input_stats=False needs save_mean and save_rstd (from "
                            "instance_norm_forward), or running_mean and running_var");
    const VectorIn running_mean = vector_input(function, "running_mean", running_mean_in);
    const VectorIn running_var = vector_input(function, "running_var", running_var_in);
    const int64_t channels = channels_of(x.view);
    for (const VectorIn* v : {&running_mean, &running_var})
      if (static_cast<int64_t>(v->span.size()) != channels)
        value_error(function, std::string(v == &running_mean ? "running_mean" : "running_var") +
                                  " has length " + std::to_string(v->span.size()) +
                                  ", expected C = " + std::to_string(channels));
    if (!(std::isfinite(eps) && eps >= 0))
      value_error(function, "eps must be finite and >= 0, got " + py::repr(py::float_(eps))
                                                                      .cast<std::string>());
    const VectorOut mean_out = vector_output(x.tensor, stats_shape);
    const VectorOut rstd_out = vector_output(x.tensor, stats_shape);
    for (int64_t n = 0; n < batch_of(x.view); ++n)
      for (int64_t c = 0; c < channels; ++c) {
        mean_out.span[n * channels + c] = running_mean.span[c];
        rstd_out.span[n * channels + c] =
            float(1.0 / std::sqrt(double(running_var.span[c]) + eps));
      }
    mean = {mean_out.value, mean_out.span};
    rstd = {rstd_out.value, rstd_out.span};
  }
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(x.tensor, {channels_of(x.view)});
    dbias = vector_output(x.tensor, {channels_of(x.view)});
  }
  normkit::InstanceNormBackwardParams params;
  params.use_input_stats = use_input_stats;
  params.epilogue = fused.epilogue;
  without_gil([&] {
    normkit::instance_norm_backward(params, dy.view, x.view, mean.span, rstd.span, weight.span,
                                    dx.view, dweight.span, dbias.span);
  });
  return backward_result(dx.tensor.value, or_none(dweight), or_none(dbias), fused);
}

Shape normalized_shape_of(const char* function, const py::object& normalized_shape) {
  Shape shape;
  if (py::isinstance<py::int_>(normalized_shape)) {
    shape.push_back(normalized_shape.cast<py::ssize_t>());
  } else if (py::isinstance<py::sequence>(normalized_shape) &&
             !py::isinstance<py::str>(normalized_shape)) {
    for (py::handle d : normalized_shape) {
      if (!py::isinstance<py::int_>(d))
        type_error(function, "normalized_shape must be an int or a sequence of ints, got " +
                                 py::repr(normalized_shape).cast<std::string>());
      shape.push_back(d.cast<py::ssize_t>());
    }
  } else {
    type_error(function, "normalized_shape must be an int or a sequence of ints, got " +
                             py::repr(normalized_shape).cast<std::string>());
  }
  if (shape.empty())
    value_error(function, "normalized_shape must have at least one dim, got ()");
  return shape;
}

// weight and bias of layer_norm have normalized_shape; the kernel takes them flattened.
VectorIn layer_norm_param(const char* function, const char* name, const OptionalArray& a,
                          const Shape& normalized) {
  if (!a) return {};
  const Tensor t = tensor_arg(function, name, *a);
  require_float32(function, name, t);
  if (t.shape != normalized)
    value_error(function, std::string(name) + " has shape " + shape_string(t.shape) +
                              ", expected normalized_shape " + shape_string(normalized));
  return float32_input(function, name, t);
}

// A layer_norm call as the kernel computes it. The kernel computes channels-last only when each
// sample is one row; other normalized dims need channels-first. Ranks above the kernel's are
// folded to (rows, cols), which is the same computation on channels-first memory.
struct LayerNormProblem {
  Shape shape;       // x's
  Shape normalized;  // normalized_shape
  Activation x;      // the array, and the (possibly folded) view the kernel sees
  int kernel_normalized_ndim = 1;
  int64_t rows = 1;
  // An array of x's shape, dtype and format, as the kernel sees x.
  TensorView like_x(void* data) const {
    TensorView v = x.view;
    v.data = data;
    return v;
  }
  // x's leading dims, then a 1 for each normalized dim: torch.native_layer_norm's shape.
  Shape stats_shape() const {
    Shape s(shape.begin(), shape.end() - normalized.size());
    s.resize(shape.size(), 1);
    return s;
  }
};

LayerNormProblem layer_norm_problem(const char* function, const py::object& x_in,
                                    const py::object& normalized_shape_in) {
  LayerNormProblem p;
  p.normalized = normalized_shape_of(function, normalized_shape_in);
  const Tensor x = tensor_arg(function, "x", x_in);
  activation_dtype(function, "x", x);
  p.shape = x.shape;
  const int rank = static_cast<int>(p.shape.size());
  const int normalized_ndim = static_cast<int>(p.normalized.size());
  if (normalized_ndim > rank ||
      !std::equal(p.normalized.begin(), p.normalized.end(), p.shape.end() - normalized_ndim))
    value_error(function, "x shape " + shape_string(p.shape) +
                              " does not end with normalized_shape " +
                              shape_string(p.normalized));
  p.x = activation_input(function, "x", x);
  const bool last_ok = normalized_ndim == rank - 1 && rank <= normkit::kMaxRank;
  if (p.x.view.format == MemoryFormat::channels_last && !last_ok) {
    if (x.producer != Producer::numpy)
      value_error(function, "x is channels-last, which is computed as such only when "
                            "normalized_shape covers every dim but the first (got " +
                                shape_string(p.normalized) + " for x of shape " +
                                shape_string(p.shape) +
                                "); normkit does not copy DLPack tensors: pass x.contiguous()");
    p.x = activation_input(function, "x", x, MemoryFormat::channels_first);
  }
  p.kernel_normalized_ndim = normalized_ndim;
  for (int d = 0; d < rank - normalized_ndim; ++d) p.rows *= p.shape[d];
  if (rank > normkit::kMaxRank) {
    int64_t cols = 1;
    for (int d = rank - normalized_ndim; d < rank; ++d) cols *= p.shape[d];
    const int64_t folded[2] = {p.rows, cols};
    p.x.view = TensorView(p.x.view.data, p.x.view.dtype, 2, folded, MemoryFormat::channels_first);
    p.kernel_normalized_ndim = 1;
  }
  return p;
}

py::tuple layer_norm_forward_impl(const char* function, const py::object& x_in,
                                  const py::object& normalized_shape_in,
                                  const OptionalArray& weight_in, const OptionalArray& bias_in,
                                  double eps, const py::object& activation,
                                  const OptionalArray& residual) {
  const LayerNormProblem p = layer_norm_problem(function, x_in, normalized_shape_in);
  const VectorIn weight = layer_norm_param(function, "weight", weight_in, p.normalized);
  const VectorIn bias = layer_norm_param(function, "bias", bias_in, p.normalized);
  const FusedForward fused = forward_epilogue(function, activation, residual, p.x, p.x.view);
  const normkit::LayerNormParams params{p.kernel_normalized_ndim, eps, fused.epilogue};
  // y has x's full shape and format; the kernel sees it through x's (possibly folded) view.
  const Output y = new_output(p.x.tensor, p.x.view.dtype, p.shape, p.x.view.format);
  const TensorView y_view = p.like_x(y.data);
  const VectorOut mean = vector_output(p.x.tensor, p.stats_shape());
  const VectorOut rstd = vector_output(p.x.tensor, p.stats_shape());
  without_gil([&] {
    normkit::layer_norm_forward(params, p.x.view, weight.span, bias.span, y_view, mean.span,
                                rstd.span);
  });
  return py::make_tuple(y.value, mean.value, rstd.value);
}

py::tuple layer_norm_backward_impl(const py::object& dy_in, const py::object& x_in,
                                   const py::object& normalized_shape_in,
                                   const py::object& mean_in, const py::object& rstd_in,
                                   const OptionalArray& weight_in,
                                   const BackwardEpilogueArgs& fused_args) {
  const char* function = "layer_norm_backward";
  const LayerNormProblem p = layer_norm_problem(function, x_in, normalized_shape_in);
  const Activation dy = activation_input(function, "dy", dy_in, p.x.view.format);
  // dy is seen through x's view (folded or not), so its shape and dtype are checked here.
  if (dy.tensor.shape != p.shape)
    value_error(function, "dy has shape " + shape_string(dy.tensor.shape) +
                              ", expected x's shape " + shape_string(p.shape));
  if (dy.view.dtype != p.x.view.dtype)
    type_error(function, "dy has dtype " + dy.tensor.dtype_name() + ", expected x's dtype " +
                             p.x.tensor.dtype_name());
  const Shape stats_shape = p.stats_shape();
  const VectorIn mean = saved_stat(function, "mean", mean_in, stats_shape,
                                   "x's leading dims then 1s", true);
  const VectorIn rstd = saved_stat(function, "rstd", rstd_in, stats_shape,
                                   "x's leading dims then 1s", true);
  const VectorIn weight = layer_norm_param(function, "weight", weight_in, p.normalized);
  const FusedBackward fused = backward_epilogue(
      function, fused_args, p.x, p.x.view,
      [&](const OptionalArray& b) { return layer_norm_param(function, "bias", b, p.normalized); });
  const Output dx = new_output(p.x.tensor, p.x.view.dtype, p.shape, p.x.view.format);
  const TensorView dx_view = p.like_x(dx.data);
  const TensorView dy_view = p.like_x(dy.tensor.data);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(p.x.tensor, p.normalized);
    dbias = vector_output(p.x.tensor, p.normalized);
  }
  normkit::LayerNormBackwardParams params;
  params.normalized_ndim = p.kernel_normalized_ndim;
  params.epilogue = fused.epilogue;
  without_gil([&] {
    normkit::layer_norm_backward(params, dy_view, p.x.view, mean.span, rstd.span, weight.span,
                                 dx_view, dweight.span, dbias.span);
  });
  return backward_result(dx.value, or_none(dweight), or_none(dbias), fused);
}

// ---------------------------------------------------------------------------------------------
// rms_norm: layer_norm's problem (normalized_shape, folding, formats), without mean and bias

// eps=None is the dtype's machine epsilon, torch's rule (torch.finfo(x.dtype).eps).
double rms_norm_eps(std::optional<double> eps, normkit::DType dtype) {
  if (eps) return *eps;
  switch (dtype) {
    case normkit::DType::bfloat16: return 0.0078125;     // 2^-7
    case normkit::DType::float16: return 0.0009765625;   // 2^-10
    default: return 1.1920928955078125e-07;              // 2^-23
  }
}

py::tuple rms_norm_forward_impl(const char* function, const py::object& x_in,
                                const py::object& normalized_shape_in,
                                const OptionalArray& weight_in, std::optional<double> eps_in,
                                const py::object& activation, const OptionalArray& residual,
                                const OptionalArray& residual_in) {
  const LayerNormProblem p = layer_norm_problem(function, x_in, normalized_shape_in);
  const VectorIn weight = layer_norm_param(function, "weight", weight_in, p.normalized);
  const FusedForward fused = forward_epilogue(function, activation, residual, p.x, p.x.view);
  normkit::RmsNormParams params;
  params.normalized_ndim = p.kernel_normalized_ndim;
  params.eps = rms_norm_eps(eps_in, p.x.view.dtype);
  params.epilogue = fused.epilogue;
  py::object residual_in_owner;
  std::optional<Output> sum;
  if (residual_in) {
    const EpilogueTensor r = exactly_like_x(function, "residual_in", *residual_in, p.x, p.x.view);
    residual_in_owner = r.owner;
    params.residual_in = r.view;
    sum.emplace(new_output(p.x.tensor, p.x.view.dtype, p.shape, p.x.view.format));
    params.sum_out = p.like_x(sum->data);
  }
  const Output y = new_output(p.x.tensor, p.x.view.dtype, p.shape, p.x.view.format);
  const TensorView y_view = p.like_x(y.data);
  const VectorOut rstd = vector_output(p.x.tensor, p.stats_shape());
  without_gil([&] { normkit::rms_norm_forward(params, p.x.view, weight.span, y_view, rstd.span); });
  if (sum) return py::make_tuple(y.value, rstd.value, sum->value);
  return py::make_tuple(y.value, rstd.value);
}

py::tuple rms_norm_backward_impl(const py::object& dy_in, const py::object& x_in,
                                 const py::object& normalized_shape_in, const py::object& rstd_in,
                                 const OptionalArray& weight_in, const OptionalArray& dsum_out_in,
                                 const BackwardEpilogueArgs& fused_args) {
  const char* function = "rms_norm_backward";
  const LayerNormProblem p = layer_norm_problem(function, x_in, normalized_shape_in);
  const Activation dy = activation_input(function, "dy", dy_in, p.x.view.format);
  if (dy.tensor.shape != p.shape)
    value_error(function, "dy has shape " + shape_string(dy.tensor.shape) +
                              ", expected x's shape " + shape_string(p.shape));
  if (dy.view.dtype != p.x.view.dtype)
    type_error(function, "dy has dtype " + dy.tensor.dtype_name() + ", expected x's dtype " +
                             p.x.tensor.dtype_name());
  const VectorIn rstd = saved_stat(function, "rstd", rstd_in, p.stats_shape(),
                                   "x's leading dims then 1s", true);
  const VectorIn weight = layer_norm_param(function, "weight", weight_in, p.normalized);
  // No bias to recompute silu's z with: None stands for it.
  BackwardEpilogueArgs args = fused_args;
  args.bias = py::none();
  const FusedBackward fused =
      backward_epilogue(function, args, p.x, p.x.view, [](const OptionalArray&) { return VectorIn{}; });
  normkit::RmsNormBackwardParams params;
  params.normalized_ndim = p.kernel_normalized_ndim;
  params.epilogue = fused.epilogue;
  py::object dsum_owner;
  if (dsum_out_in) {
    const EpilogueTensor d = exactly_like_x(function, "dsum_out", *dsum_out_in, p.x, p.x.view);
    dsum_owner = d.owner;
    params.dsum_out = d.view;
  }
  const Output dx = new_output(p.x.tensor, p.x.view.dtype, p.shape, p.x.view.format);
  const TensorView dx_view = p.like_x(dx.data);
  const TensorView dy_view = p.like_x(dy.tensor.data);
  VectorOut dweight;
  if (weight.present()) dweight = vector_output(p.x.tensor, p.normalized);
  without_gil([&] {
    normkit::rms_norm_backward(params, dy_view, p.x.view, rstd.span, weight.span, dx_view,
                               dweight.span);
  });
  if (fused.dresidual) return py::make_tuple(dx.value, or_none(dweight), *fused.dresidual);
  return py::make_tuple(dx.value, or_none(dweight));
}

// ---------------------------------------------------------------------------------------------
// layer_norm2d, weight_standardization

// layer_norm2d's statistics: one per (n, position), shape (N, *spatial).
Shape positions_shape(const Tensor& x) {
  Shape s = x.shape;
  if (s.size() >= 2) s.erase(s.begin() + 1);
  return s;
}

py::tuple layer_norm2d_forward_impl(const char* function, const py::object& x_in,
                                    const OptionalArray& weight_in, const OptionalArray& bias_in,
                                    double eps) {
  const Activation x = activation_input(function, "x", x_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const Activation y = activation_output(x);
  const VectorOut mean = vector_output(x.tensor, positions_shape(x.tensor));
  const VectorOut rstd = vector_output(x.tensor, positions_shape(x.tensor));
  without_gil([&] {
    normkit::layer_norm2d_forward(x.view, eps, weight.span, bias.span, y.view, mean.span,
                                  rstd.span);
  });
  return py::make_tuple(y.tensor.value, mean.value, rstd.value);
}

py::tuple layer_norm2d_backward_impl(const py::object& dy_in, const py::object& x_in,
                                     const py::object& mean_in, const py::object& rstd_in,
                                     const OptionalArray& weight_in) {
  const char* function = "layer_norm2d_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  if (dy.view.dtype != x.view.dtype)
    type_error(function, "dy has dtype " + dy.tensor.dtype_name() + ", expected x's dtype " +
                             x.tensor.dtype_name());
  const Shape stats_shape = positions_shape(x.tensor);
  const VectorIn mean = saved_stat(function, "mean", mean_in, stats_shape, "(N, *spatial)", true);
  const VectorIn rstd = saved_stat(function, "rstd", rstd_in, stats_shape, "(N, *spatial)", true);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(x.tensor, {channels_of(x.view)});
    dbias = vector_output(x.tensor, {channels_of(x.view)});
  }
  without_gil([&] {
    normkit::layer_norm2d_backward(dy.view, x.view, mean.span, rstd.span, weight.span, dx.view,
                                   dweight.span, dbias.span);
  });
  return py::make_tuple(dx.tensor.value, or_none(dweight), or_none(dbias));
}

py::tuple weight_standardization_forward_impl(const char* function, const py::object& w_in,
                                              double eps) {
  const Activation w = activation_input(function, "w", w_in);
  const Activation w_hat = activation_output(w);
  const Shape stats_shape{w.tensor.shape.empty() ? 0 : w.tensor.shape[0]};
  const VectorOut mean = vector_output(w.tensor, stats_shape);
  const VectorOut rstd = vector_output(w.tensor, stats_shape);
  without_gil([&] {
    normkit::weight_standardization_forward(w.view, eps, w_hat.view, mean.span, rstd.span);
  });
  return py::make_tuple(w_hat.tensor.value, mean.value, rstd.value);
}

py::object weight_standardization_backward_impl(const py::object& dw_hat_in, const py::object& w_in,
                                                const py::object& mean_in,
                                                const py::object& rstd_in) {
  const char* function = "weight_standardization_backward";
  const Activation w = activation_input(function, "w", w_in);
  const Activation dw_hat = activation_input(function, "dw_hat", dw_hat_in, w.view.format);
  if (dw_hat.view.dtype != w.view.dtype)
    type_error(function, "dw_hat has dtype " + dw_hat.tensor.dtype_name() +
                             ", expected w's dtype " + w.tensor.dtype_name());
  const Shape stats_shape{w.tensor.shape.empty() ? 0 : w.tensor.shape[0]};
  const VectorIn mean = saved_stat(function, "mean", mean_in, stats_shape, "(C_out,)", true);
  const VectorIn rstd = saved_stat(function, "rstd", rstd_in, stats_shape, "(C_out,)", true);
  const Activation dw = activation_output(w);
  without_gil([&] {
    normkit::weight_standardization_backward(dw_hat.view, w.view, mean.span, rstd.span, dw.view);
  });
  return dw.tensor.value;
}

// ---------------------------------------------------------------------------------------------
// frn

// The (N, C) statistics of an frn call, once the library accepts x (else none: the op reports
// the problem in its own words).
Shape frn_stats_shape(const TensorView& x) {
  try {
    normkit::frn_workspace_size(x);
  } catch (const normkit::Error&) {
    return {0};
  }
  return {batch_of(x), channels_of(x)};
}

// The learned-eps variant's parameter: one finite number per layer, since the op takes one eps
// (a per-channel array is refused by name).
std::optional<double> learned_eps_input(const char* function, const py::object& v) {
  if (v.is_none()) return std::nullopt;
  const std::string got = py::repr(v).cast<std::string>();
  if (py::isinstance<py::bool_>(v) || py::hasattr(v, "__len__") || !py::hasattr(v, "__float__"))
    type_error(function, "learned_eps must be a float (the op takes one eps per layer, not one "
                         "per channel), got " + got);
  const double e = py::float_(v).cast<double>();
  if (!std::isfinite(e)) value_error(function, "learned_eps must be finite, got " + got);
  return e;
}

// eps, plus |learned_eps| when the learned-eps variant is asked for.
double effective_eps(const char* function, double eps, const py::object& learned_eps) {
  const std::optional<double> learned = learned_eps_input(function, learned_eps);
  return learned ? eps + std::abs(*learned) : eps;
}

py::tuple frn_forward_impl(const char* function, const py::object& x_in,
                           const py::object& weight_in, const py::object& bias_in,
                           const py::object& tau_in, double eps) {
  const Activation x = activation_input(function, "x", x_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const VectorIn tau = vector_input(function, "tau", tau_in);
  const Activation y = activation_output(x);
  const VectorOut rstd = vector_output(x.tensor, frn_stats_shape(x.view));
  without_gil([&] {
    normkit::frn_forward(eps, x.view, weight.span, bias.span, tau.span, y.view, rstd.span);
  });
  return py::make_tuple(y.tensor.value, rstd.value);
}

py::tuple frn_backward_impl(const py::object& dy_in, const py::object& x_in,
                            const py::object& rstd_in, const py::object& weight_in,
                            const py::object& bias_in, const py::object& tau_in,
                            const py::object& learned_eps_in) {
  const char* function = "frn_backward";
  const std::optional<double> learned_eps = learned_eps_input(function, learned_eps_in);
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  if (dy.view.dtype != x.view.dtype)
    type_error(function, "dy has dtype " + dy.tensor.dtype_name() + ", expected x's dtype " +
                             x.tensor.dtype_name());
  const Shape stats_shape = frn_stats_shape(x.view);
  const VectorIn rstd = saved_stat(function, "rstd", rstd_in, stats_shape, "(N, C)",
                                   stats_shape.size() == 2);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const VectorIn tau = vector_input(function, "tau", tau_in);
  const Activation dx = activation_output(x);
  const Shape channels{channels_of(x.view)};
  const VectorOut dweight = vector_output(x.tensor, channels);
  const VectorOut dbias = vector_output(x.tensor, channels);
  const VectorOut dtau = vector_output(x.tensor, channels);
  std::vector<float> deps(learned_eps ? static_cast<std::size_t>(channels[0]) : 0);
  without_gil([&] {
    normkit::frn_backward(dy.view, x.view, rstd.span, weight.span, bias.span, tau.span, dx.view,
                          dweight.span, dbias.span, dtau.span, deps);
  });
  if (!learned_eps) return py::make_tuple(dx.tensor.value, dweight.value, dbias.value, dtau.value);
  // eps = eps_min + |learned_eps| for every channel: d learned_eps = sign * sum over c of deps
  // (sign 0 at 0, as torch's abs).
  double sum = 0;
  for (float v : deps) sum += v;
  const double sign = double(*learned_eps > 0) - double(*learned_eps < 0);
  return py::make_tuple(dx.tensor.value, dweight.value, dbias.value, dtau.value, sign * sum);
}

// ---------------------------------------------------------------------------------------------
// evonorm_s0

// The (N, num_groups) statistics of an evonorm_s0 call, once the library accepts x and
// num_groups (else none: the op reports the problem in its own words).
Shape evonorm_stats_shape(int64_t num_groups, const TensorView& x) {
  return {batch_of(x), groups_accepted(num_groups, x) ? num_groups : 0};
}

py::tuple evonorm_s0_forward_impl(const char* function, const py::object& x_in,
                                  const py::object& v_in, const py::object& weight_in,
                                  const py::object& bias_in, int64_t num_groups, double eps) {
  const Activation x = activation_input(function, "x", x_in);
  const VectorIn v = vector_input(function, "v", v_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const Activation y = activation_output(x);
  const Shape stats_shape = evonorm_stats_shape(num_groups, x.view);
  const VectorOut mean = vector_output(x.tensor, stats_shape);
  const VectorOut rstd = vector_output(x.tensor, stats_shape);
  without_gil([&] {
    normkit::evonorm_s0_forward({num_groups, eps}, x.view, v.span, weight.span, bias.span, y.view,
                                mean.span, rstd.span);
  });
  return py::make_tuple(y.tensor.value, mean.value, rstd.value);
}

py::tuple evonorm_s0_backward_impl(const py::object& dy_in, const py::object& x_in,
                                   const py::object& mean_in, const py::object& rstd_in,
                                   const py::object& v_in, const py::object& weight_in,
                                   int64_t num_groups) {
  const char* function = "evonorm_s0_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  if (dy.view.dtype != x.view.dtype)
    type_error(function, "dy has dtype " + dy.tensor.dtype_name() + ", expected x's dtype " +
                             x.tensor.dtype_name());
  const bool accepted = groups_accepted(num_groups, x.view);
  const Shape stats_shape{batch_of(x.view), num_groups};
  const VectorIn mean =
      saved_stat(function, "mean", mean_in, stats_shape, "(N, num_groups)", accepted);
  const VectorIn rstd =
      saved_stat(function, "rstd", rstd_in, stats_shape, "(N, num_groups)", accepted);
  const VectorIn v = vector_input(function, "v", v_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const Activation dx = activation_output(x);
  const Shape channels{channels_of(x.view)};
  const VectorOut dv = vector_output(x.tensor, channels);
  const VectorOut dweight = vector_output(x.tensor, channels);
  const VectorOut dbias = vector_output(x.tensor, channels);
  without_gil([&] {
    normkit::evonorm_s0_backward(num_groups, dy.view, x.view, mean.span, rstd.span, v.span,
                                 weight.span, dx.view, dv.span, dweight.span, dbias.span);
  });
  return py::make_tuple(dx.tensor.value, dv.value, dweight.value, dbias.value);
}

}  // namespace

// Keyword-only arguments of every forward and backward: the fused epilogue (epilogue.h).
#define FORWARD_EPILOGUE_ARGS \
  py::kw_only(), py::arg("activation") = py::none(), py::arg("residual") = py::none()
#define BACKWARD_EPILOGUE_ARGS                                                    \
  py::kw_only(), py::arg("activation") = py::none(), py::arg("y") = py::none(), \
      py::arg("residual_grad") = false, py::arg("residual") = py::ellipsis(),         \
      py::arg("bias") = py::ellipsis()
#define FORWARD_EPILOGUE_DOC                                                                     \
  "\n\nKeyword-only, fused into the same pass over memory: activation (None, 'relu' or\n"      \
  "'silu': z * sigmoid(z)) and residual (None, or an array exactly like x: its shape and\n"       \
  "dtype, laid out in the memory format x is computed in; it is never copied). The result is\n"  \
  "activation(normalized + residual)."
#define BACKWARD_EPILOGUE_DOC                                                                    \
  "\n\nKeyword-only, for a forward that fused an epilogue: activation as passed to the\n"       \
  "forward; y, the forward's output (exactly like x), required with 'relu', whose mask y > 0\n"  \
  "it reads; residual and bias, the forward's own (None where it had none; the default,\n"     \
  "Ellipsis, is 'not given'), both required with 'silu', whose gradient recomputes\n"         \
  "z = normalized + residual from x, the statistics, weight, bias and residual (silu is not\n"  \
  "invertible from y); passing y, or a residual or bias other than None, with an activation\n" \
  "that does not read it is an error. residual_grad=True also\n"  \
  "returns the residual's gradient, a new tensor like x, as a fourth element: (dx, dweight,\n"   \
  "dbias, dresidual). The gradient of the normalization is then taken with respect to\n"        \
  "g = dy * act'(z): dy * (y > 0) for 'relu', dy * s * (1 + z * (1 - s)) with s = sigmoid(z)\n"  \
  "for 'silu', dy without activation; and dresidual = g."

PYBIND11_MODULE(_normkit, m) {
  m.doc() =
      "Batch Normalization and the Group Normalization family (GroupNorm, LayerNorm,\n"
      "InstanceNorm), with torch.nn.functional's names, defaults and semantics, over NumPy\n"
      "arrays and DLPack tensors (torch.Tensor, or any object with __dlpack__ and\n"
      "__dlpack_device__, in CPU memory). Activations (x, dy, residual, y) may be float32,\n"
      "float16 or, from DLPack producers, bfloat16 (computed in float32: weights, statistics and\n"
      "sums stay float32, outputs have the input's dtype).\n\n"
      "Activations have shape (N, C, *spatial) with 0 to 3 spatial dims. A tensor with the\n"
      "strides of a channels-last tensor (NLC, NHWC or NDHWC memory viewed as (N, C, ...), e.g.\n"
      "torch_tensor.contiguous(memory_format=torch.channels_last)) is computed channels-last and\n"
      "its outputs have the same strides; a C-contiguous one is computed channels-first. A NumPy\n"
      "array with other strides is copied to C-contiguous first; a DLPack tensor is never copied,\n"
      "so other strides are an error. Results are new tensors of the kind x is: NumPy arrays for\n"
      "NumPy, torch tensors for torch, DLPackTensor for other producers. Running statistics\n"
      "passed in are updated in place. Invalid arguments raise ValueError, unsupported dtypes\n"
      "TypeError; nothing is written then. docs/python.md is the reference.";
#ifdef NORMKIT_VERSION
  m.attr("__version__") = NORMKIT_VERSION;
#endif
  // The pybind11 the module was built with: before 2.12 it reads NumPy 2's arrays with NumPy 1's
  // layout, so normkit/__init__.py refuses that pairing at import (see _check_numpy_support).
  m.attr("_pybind11_version") = py::make_tuple(PYBIND11_VERSION_MAJOR, PYBIND11_VERSION_MINOR);

  register_error_translator();

  py::class_<DLPackTensor>(m, "DLPackTensor", R"doc(A result for a DLPack producer other than NumPy
and torch: CPU memory the module allocated, handed to any DLPack consumer (numpy.from_dlpack,
torch.from_dlpack, jax.dlpack.from_dlpack, ...) without a copy. Also accepted as an input.)doc")
      .def(
          "__dlpack__",
          [](const DLPackTensor& t, const py::object&) { return dlpack_capsule(t.storage); },
          py::arg("stream") = py::none())
      .def("__dlpack_device__",
           [](const DLPackTensor&) { return py::make_tuple(static_cast<int>(kDLCPU), 0); })
      .def_property_readonly("shape",
                             [](const DLPackTensor& t) {
                               return py::tuple(py::cast(t.storage.shape));
                             })
      .def_property_readonly("dtype", [](const DLPackTensor& t) {
        return dlpack_type_name(t.storage.dtype);
      });

  m.def(
      "group_norm",
      [](const py::object& x, int64_t num_groups, const OptionalArray& weight,
         const OptionalArray& bias, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return group_norm_forward_impl("group_norm", x, num_groups, weight, bias, eps,
                                       activation, residual)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(Group normalization (torch.nn.functional.group_norm).

x: (N, C, *spatial), 0-3 spatial dims; C must be divisible by num_groups.
For each sample and group of C/num_groups channels: y = (x - mean) / sqrt(var + eps)
(biased variance over the group's channels and positions), then y * weight[c] + bias[c]
when weight / bias (float32, length C) are given. Returns y, a new tensor in x's memory format.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("group_norm_forward", [](const py::object& x, int64_t num_groups,
                                 const OptionalArray& weight, const OptionalArray& bias,
                                 double eps, const py::object& activation,
                                 const OptionalArray& residual) {
        return group_norm_forward_impl("group_norm_forward", x, num_groups, weight, bias, eps,
                                       activation, residual);
      },
      py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(group_norm that also returns the statistics its backward needs.

Returns (y, mean, rstd): y as group_norm's; mean and rstd = 1 / sqrt(var + eps), float32
arrays of shape (N, num_groups), as torch.native_group_norm returns them.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("group_norm_backward",
        [](const py::object& dy, const py::object& x, const py::object& mean,
           const py::object& rstd, int64_t num_groups, const OptionalArray& weight,
           const py::object& activation, const OptionalArray& y, bool residual_grad,
           const py::object& residual, const py::object& bias) {
          return group_norm_backward_impl(dy, x, mean, rstd, num_groups, weight,
                                          {activation, y, residual_grad, residual, bias});
        },
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("num_groups"),
        py::arg("weight") = py::none(), BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of group_norm.

dy: the gradient of the loss with respect to y (x's shape; any strides). x, mean, rstd,
num_groups and weight as passed to / returned by group_norm_forward.
Returns (dx, dweight, dbias): dx has x's shape and memory format; dweight and dbias (float32,
length C) are None when weight is None.)doc"
      BACKWARD_EPILOGUE_DOC);

  m.def("batch_norm", [](const py::object& x, const OptionalArray& running_mean,
                         const OptionalArray& running_var, const OptionalArray& weight,
                         const OptionalArray& bias, bool training, double momentum,
                         double eps, const py::object& activation,
                         const OptionalArray& residual) {
        return batch_norm_forward_impl("batch_norm", x, running_mean, running_var, weight, bias,
                                       training, momentum, eps, activation, residual)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(Batch normalization (torch.nn.functional.batch_norm).

x: (N, C, *spatial). running_mean, running_var: float32, length C, or None.
training=True: normalizes each channel with its batch mean and biased variance over N and the
spatial positions (needs more than one value per channel), and, when running statistics are
given, updates them in place (they must then be writable and contiguous):
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * unbiased variance
training=False: normalizes with running_mean and running_var, which are then required.
weight and bias (length C) are optional. Returns y, a new tensor in x's memory format.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("batch_norm_forward", [](const py::object& x, const OptionalArray& running_mean,
                                 const OptionalArray& running_var, const OptionalArray& weight,
                                 const OptionalArray& bias, bool training, double momentum,
                                 double eps, const py::object& activation,
                                 const OptionalArray& residual) {
        return batch_norm_forward_impl("batch_norm_forward", x, running_mean, running_var,
                                       weight, bias, training, momentum, eps, activation,
                                       residual);
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(batch_norm that also returns the statistics its backward needs.

Returns (y, save_mean, save_invstd). Training: the batch mean and 1 / sqrt(biased var + eps),
float32 of length C (zeros for an empty batch, which has no statistics). Inference: two empty
arrays, as torch.native_batch_norm (the backward then reads the running statistics).)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("batch_norm_backward",
        [](const py::object& dy, const py::object& x, const OptionalArray& weight,
           const OptionalArray& save_mean, const OptionalArray& save_invstd, bool training,
           const OptionalArray& running_mean, const OptionalArray& running_var, double eps,
           const py::object& activation, const OptionalArray& y, bool residual_grad,
           const py::object& residual, const py::object& bias) {
          return batch_norm_backward_impl(dy, x, weight, save_mean, save_invstd, training,
                                          running_mean, running_var, eps,
                                          {activation, y, residual_grad, residual, bias});
        },
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("save_mean"),
        py::arg("save_invstd"), py::arg("training") = true,
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("eps") = 1e-5, BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of batch_norm.

dy: the gradient with respect to y (x's shape; any strides). training=True: the gradient flows
through the batch statistics; save_mean and save_invstd are those batch_norm_forward returned.
training=False: the statistics are constants; running_mean, running_var (length C) and eps are
those of the forward, and save_mean / save_invstd are not read.
Returns (dx, dweight, dbias): dx has x's shape and memory format; dweight and dbias (float32,
length C) are None when weight is None.)doc"
      BACKWARD_EPILOGUE_DOC);

  m.def("batch_renorm", [](const py::object& x, const OptionalArray& running_mean,
                           const OptionalArray& running_var, const OptionalArray& weight,
                           const OptionalArray& bias, bool training, double momentum, double eps,
                           double r_max, double d_max, const py::object& activation,
                           const OptionalArray& residual) {
        return batch_renorm_forward_impl("batch_renorm", x, running_mean, running_var, weight,
                                         bias, training, momentum, eps, r_max, d_max, activation,
                                         residual)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.01, py::arg("eps") = 1e-5, py::arg("r_max") = 3.0,
      py::arg("d_max") = 5.0, FORWARD_EPILOGUE_ARGS,
      R"doc(Batch renormalization (Ioffe 2017).

x: (N, C, *spatial). running_mean, running_var: float32, length C, required.
training=True: per channel, with the batch mean and sigma = sqrt(biased var + eps) and
sigma_run = sqrt(running_var + eps) (before the update),
    r = clip(sigma / sigma_run, 1 / r_max, r_max)
    d = clip((mean - running_mean) / sigma_run, -d_max, d_max)
    y = weight * ((x - mean) / sigma * r + d) + bias
then the running statistics are updated in place as batch_norm's (momentum, unbiased variance).
r_max = 1 and d_max = 0 give batch_norm. training=False: batch_norm's inference.
Returns y, a new tensor in x's memory format.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("batch_renorm_forward", [](const py::object& x, const OptionalArray& running_mean,
                                   const OptionalArray& running_var, const OptionalArray& weight,
                                   const OptionalArray& bias, bool training, double momentum,
                                   double eps, double r_max, double d_max,
                                   const py::object& activation, const OptionalArray& residual) {
        return batch_renorm_forward_impl("batch_renorm_forward", x, running_mean, running_var,
                                         weight, bias, training, momentum, eps, r_max, d_max,
                                         activation, residual);
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.01, py::arg("eps") = 1e-5, py::arg("r_max") = 3.0,
      py::arg("d_max") = 5.0, FORWARD_EPILOGUE_ARGS,
      R"doc(batch_renorm that also returns what its backward needs.

Returns (y, save_mean, save_invstd, save_r, save_d), the last four float32 of length C when
training (zeros for an empty batch), empty arrays in inference.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("batch_renorm_backward",
        [](const py::object& dy, const py::object& x, const OptionalArray& weight,
           const OptionalArray& save_mean, const OptionalArray& save_invstd,
           const OptionalArray& save_r, const OptionalArray& save_d, bool training,
           const OptionalArray& running_mean, const OptionalArray& running_var, double eps,
           const py::object& activation, const OptionalArray& y, bool residual_grad,
           const py::object& residual, const py::object& bias) {
          return batch_renorm_backward_impl(dy, x, weight, save_mean, save_invstd, save_r,
                                            save_d, training, running_mean, running_var, eps,
                                            {activation, y, residual_grad, residual, bias});
        },
        py::arg("dy"), py::arg("x"), py::arg("weight"), py::arg("save_mean"),
        py::arg("save_invstd"), py::arg("save_r"), py::arg("save_d"),
        py::arg("training") = true, py::arg("running_mean") = py::none(),
        py::arg("running_var") = py::none(), py::arg("eps") = 1e-5, BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of batch_renorm.

training=True: r and d (save_r, save_d from batch_renorm_forward) are constants:
dx is batch_norm's training dx with the weight weight * r, dweight = sum dy * (xhat * r + d),
dbias = sum dy. training=False: batch_norm_backward's inference gradients (running_mean,
running_var and eps of the forward; the saved arrays are not read).
Returns (dx, dweight, dbias); dweight and dbias are None when weight is None.)doc"
      BACKWARD_EPILOGUE_DOC);

  m.def(
      "instance_norm",
      [](const py::object& x, const OptionalArray& running_mean, const OptionalArray& running_var,
         const OptionalArray& weight, const OptionalArray& bias, bool use_input_stats,
         double momentum, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return instance_norm_forward_impl("instance_norm", x, running_mean, running_var, weight,
                                          bias, use_input_stats, momentum, eps, activation,
                                          residual)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("use_input_stats") = true, py::arg("momentum") = 0.1, py::arg("eps") = 1e-5,
      FORWARD_EPILOGUE_ARGS,
      R"doc(Instance normalization (torch.nn.functional.instance_norm).

x: (N, C, *spatial). use_input_stats=True: each (sample, channel) is normalized over its
spatial positions (more than one needed); given running statistics (length C, writable,
contiguous) are updated in place with the batch averages of the per-instance mean and unbiased
variance, weighted by momentum. use_input_stats=False: normalizes with running_mean and
running_var, which are then required. weight and bias (length C) are optional.
Returns y, a new tensor in x's memory format.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def(
      "instance_norm_forward",
      [](const py::object& x, const OptionalArray& running_mean, const OptionalArray& running_var,
         const OptionalArray& weight, const OptionalArray& bias, bool use_input_stats,
         double momentum, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return instance_norm_forward_impl("instance_norm_forward", x, running_mean, running_var,
                                          weight, bias, use_input_stats, momentum, eps,
                                          activation, residual);
      },
      py::arg("x"), py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("use_input_stats") = true, py::arg("momentum") = 0.1, py::arg("eps") = 1e-5,
      FORWARD_EPILOGUE_ARGS,
      R"doc(instance_norm that also returns the statistics its backward needs.

Returns (y, save_mean, save_rstd): y as instance_norm's; save_mean and save_rstd, float32 arrays
of shape (N, C) (as group_norm_forward's (N, num_groups) with num_groups = C; torch has no native
instance norm that returns them). use_input_stats=True: each instance's mean and
1 / sqrt(biased var + eps). use_input_stats=False: running_mean and 1 / sqrt(running_var + eps),
repeated for each sample.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("instance_norm_backward",
        [](const py::object& dy, const py::object& x, const OptionalArray& save_mean,
           const OptionalArray& save_rstd, const OptionalArray& weight, bool use_input_stats,
           const OptionalArray& running_mean, const OptionalArray& running_var, double eps,
           const py::object& activation, const OptionalArray& y, bool residual_grad,
           const py::object& residual, const py::object& bias) {
          return instance_norm_backward_impl(dy, x, save_mean, save_rstd, weight,
                                             use_input_stats, running_mean, running_var, eps,
                                             {activation, y, residual_grad, residual, bias});
        },
        py::arg("dy"), py::arg("x"), py::arg("save_mean"), py::arg("save_rstd"),
        py::arg("weight") = py::none(), py::arg("use_input_stats") = true,
        py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
        py::arg("eps") = 1e-5, BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of instance_norm.

dy: the gradient with respect to y (x's shape; any strides). use_input_stats=True: the gradient
flows through the per-instance statistics; save_mean and save_rstd are those
instance_norm_forward returned (shape (N, C)). use_input_stats=False: the statistics are
constants; pass either save_mean and save_rstd from the forward, or None for both and the
forward's running_mean, running_var (length C) and eps, from which the same statistics are
formed. Running statistics are only read.
Returns (dx, dweight, dbias): dx has x's shape and memory format; dweight and dbias (float32,
length C) are None when weight is None.)doc"
      BACKWARD_EPILOGUE_DOC);

  m.def(
      "layer_norm",
      [](const py::object& x, const py::object& normalized_shape, const OptionalArray& weight,
         const OptionalArray& bias, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return layer_norm_forward_impl("layer_norm", x, normalized_shape, weight, bias, eps,
                                       activation, residual)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(Layer normalization (torch.nn.functional.layer_norm).

x: a tensor of any rank whose trailing dims equal normalized_shape (an int or a sequence
of ints). Each slice over those dims is normalized with its mean and biased variance, then
multiplied by weight and shifted by bias (optional, float32, both of shape normalized_shape).
Returns y, a new tensor of x's dtype; a channels-last x keeps its format when normalized_shape
covers every dim but N (a channels-last DLPack tensor normalized otherwise is an error, as it
would need a copy).)doc"
      FORWARD_EPILOGUE_DOC);

  m.def(
      "layer_norm_forward",
      [](const py::object& x, const py::object& normalized_shape, const OptionalArray& weight,
         const OptionalArray& bias, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return layer_norm_forward_impl("layer_norm_forward", x, normalized_shape, weight, bias,
                                       eps, activation, residual);
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(layer_norm that also returns the statistics its backward needs.

Returns (y, mean, rstd): y as layer_norm's; mean and rstd = 1 / sqrt(biased var + eps), float32
arrays of x's leading dims followed by a 1 for each normalized dim (x of shape (2, 3, 4, 5) with
normalized_shape (4, 5): (2, 3, 1, 1)), as torch.native_layer_norm returns them.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("layer_norm_backward",
        [](const py::object& dy, const py::object& x, const py::object& normalized_shape,
           const py::object& mean, const py::object& rstd, const OptionalArray& weight,
           const py::object& activation, const OptionalArray& y, bool residual_grad,
           const py::object& residual, const py::object& bias) {
          return layer_norm_backward_impl(dy, x, normalized_shape, mean, rstd, weight,
                                          {activation, y, residual_grad, residual, bias});
        },
        py::arg("dy"), py::arg("x"), py::arg("normalized_shape"), py::arg("mean"),
        py::arg("rstd"), py::arg("weight") = py::none(), BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of layer_norm.

dy: the gradient with respect to y (x's shape and dtype; any strides). x, normalized_shape,
mean, rstd (the shape layer_norm_forward returns them in, e.g. torch.native_layer_norm's) and
weight as passed to / returned by layer_norm_forward.
Returns (dx, dweight, dbias): dx has x's shape, dtype and the memory format y had; dweight and
dbias (float32, of shape normalized_shape) are None when weight is None.)doc"
      BACKWARD_EPILOGUE_DOC);

  m.def(
      "layer_norm2d",
      [](const py::object& x, const OptionalArray& weight, const OptionalArray& bias, double eps) {
        return layer_norm2d_forward_impl("layer_norm2d", x, weight, bias, eps)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("eps") = 1e-6,
      R"doc(Layer normalization over the channels of x (N, C, *spatial) (ConvNeXt's LayerNorm2d).

For every sample and spatial position, the C values are normalized with their mean and biased
variance, then multiplied by weight and shifted by bias (optional, float32, length C): torch's
x.permute(0, 2, 3, 1) -> layer_norm over C -> permute back, without the permutes. x may be
float32, bfloat16 or float16, in either memory format (kept). Returns y.)doc");

  m.def(
      "layer_norm2d_forward",
      [](const py::object& x, const OptionalArray& weight, const OptionalArray& bias, double eps) {
        return layer_norm2d_forward_impl("layer_norm2d_forward", x, weight, bias, eps);
      },
      py::arg("x"), py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("eps") = 1e-6,
      R"doc(layer_norm2d that also returns the statistics its backward needs.

Returns (y, mean, rstd): y as layer_norm2d's; mean and rstd = 1 / sqrt(biased var + eps), float32
arrays of shape (N, *spatial), one per sample and position.)doc");

  m.def("layer_norm2d_backward", &layer_norm2d_backward_impl, py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("weight") = py::none(),
        R"doc(Gradients of layer_norm2d.

dy: the gradient with respect to y (x's shape and dtype; any strides). mean and rstd as
layer_norm2d_forward returned them, weight as passed to it.
Returns (dx, dweight, dbias): dx has x's shape, dtype and memory format; dweight and dbias
(float32, length C) are None when weight is None.)doc");

  m.def(
      "weight_standardization",
      [](const py::object& w, double eps) {
        return weight_standardization_forward_impl("weight_standardization", w, eps)[0]
            .cast<py::object>();
      },
      py::arg("w"), py::arg("eps") = 1e-5,
      R"doc(Weight Standardization (Qiao et al. 2019; timm's StdConv2d) of a conv weight.

w: (C_out, C_in, *kernel dims), rank 2 to 5, float32, bfloat16 or float16, either memory format.
Each output channel's values are standardized with their mean and biased variance:
w_hat = (w - mean) / sqrt(var + eps). Returns w_hat (w's shape, dtype and format).)doc");

  m.def(
      "weight_standardization_forward",
      [](const py::object& w, double eps) {
        return weight_standardization_forward_impl("weight_standardization_forward", w, eps);
      },
      py::arg("w"), py::arg("eps") = 1e-5,
      R"doc(weight_standardization that also returns the statistics its backward needs.

Returns (w_hat, mean, rstd): mean and rstd = 1 / sqrt(biased var + eps), float32, shape (C_out,).)doc");

  m.def("weight_standardization_backward", &weight_standardization_backward_impl,
        py::arg("dw_hat"), py::arg("w"), py::arg("mean"), py::arg("rstd"),
        R"doc(Gradient of weight_standardization: dw from dw_hat (the gradient with respect to
w_hat; w's shape and dtype, any strides), w, and the mean and rstd weight_standardization_forward
returned. Returns dw (w's shape, dtype and format).)doc");

  m.def(
      "evonorm_s0",
      [](const py::object& x, const py::object& v, const py::object& weight,
         const py::object& bias, int64_t groups, double eps) {
        return evonorm_s0_forward_impl("evonorm_s0", x, v, weight, bias, groups, eps)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("v"), py::arg("weight"), py::arg("bias"), py::arg("groups"),
      py::arg("eps") = 1e-5,
      R"doc(EvoNorm-S0 (Liu et al. 2020).

x: (N, C, *spatial), 0-3 spatial dims, float32, bfloat16 or float16, either memory format; C
must be divisible by groups. v, weight, bias: float32, length C (all required).
y = x * sigmoid(v[c] * x) / sqrt(var + eps) * weight[c] + bias[c], var the biased variance of
x over the sample's group (its C/groups channels and all positions), as group_norm's.
Returns y, a new tensor in x's memory format.)doc");

  m.def(
      "evonorm_s0_forward",
      [](const py::object& x, const py::object& v, const py::object& weight,
         const py::object& bias, int64_t groups, double eps) {
        return evonorm_s0_forward_impl("evonorm_s0_forward", x, v, weight, bias, groups, eps);
      },
      py::arg("x"), py::arg("v"), py::arg("weight"), py::arg("bias"), py::arg("groups"),
      py::arg("eps") = 1e-5,
      R"doc(evonorm_s0 that also returns the statistics its backward needs.

Returns (y, mean, rstd): y as evonorm_s0's; mean and rstd = 1 / sqrt(var + eps) of each group,
float32 of shape (N, groups), as group_norm_forward returns them.)doc");

  m.def("evonorm_s0_backward", &evonorm_s0_backward_impl, py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("v"), py::arg("weight"), py::arg("groups"),
        R"doc(Gradients of evonorm_s0 (through the group statistics too).

dy: the gradient with respect to y (x's shape and dtype; any strides). mean and rstd as
evonorm_s0_forward returned them; v, weight and groups as passed to it.
Returns (dx, dv, dweight, dbias): dx has x's shape, dtype and memory format; the others are
float32 of length C.)doc");

  m.def(
      "frn",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& tau, double eps, const py::object& learned_eps) {
        return frn_forward_impl("frn", x, weight, bias, tau,
                                effective_eps("frn", eps, learned_eps))[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("tau"), py::arg("eps") = 1e-6,
      py::arg("learned_eps") = py::none(),
      R"doc(Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan 2020).

x: (N, C, *spatial), 0-3 spatial dims, float32, bfloat16 or float16, either memory format.
weight, bias, tau: float32, length C (all required). For each sample and channel:
nu2 = mean of x^2 over the spatial positions, then y = max(x / sqrt(nu2 + eps) * weight[c] +
bias[c], tau[c]). The learned-eps variant: learned_eps, a float (one per layer), makes the eps
used eps + |learned_eps| (eps then plays eps_min); frn_backward returns its gradient. Returns y,
a new tensor in x's memory format.)doc");

  m.def(
      "frn_forward",
      [](const py::object& x, const py::object& weight, const py::object& bias,
         const py::object& tau, double eps, const py::object& learned_eps) {
        return frn_forward_impl("frn_forward", x, weight, bias, tau,
                                effective_eps("frn_forward", eps, learned_eps));
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("tau"), py::arg("eps") = 1e-6,
      py::arg("learned_eps") = py::none(),
      R"doc(frn that also returns the statistic its backward needs.

Returns (y, rstd): y as frn's; rstd = 1 / sqrt(nu2 + eps), float32 of shape (N, C), eps the one
used (eps + |learned_eps| when learned_eps is given).)doc");

  m.def("frn_backward", &frn_backward_impl, py::arg("dy"), py::arg("x"), py::arg("rstd"),
        py::arg("weight"), py::arg("bias"), py::arg("tau"), py::arg("learned_eps") = py::none(),
        R"doc(Gradients of frn.

dy: the gradient with respect to y (x's shape and dtype; any strides). rstd as frn_forward
returned it; weight, bias and tau as passed to it (the backward recomputes where the max took
tau). The TLU's gradient goes to tau exactly where x / sqrt(nu2 + eps) * weight + bias < tau;
ties go to x's side. Returns (dx, dweight, dbias, dtau): dx has x's shape, dtype and memory
format; the others are float32 of length C. With learned_eps (the float the forward got), also
d learned_eps = sign(learned_eps) * (the sum over channels of the gradient in eps), a float, at
the end: (dx, dweight, dbias, dtau, dlearned_eps).)doc");

  m.def(
      "rms_norm",
      [](const py::object& x, const py::object& normalized_shape, const OptionalArray& weight,
         std::optional<double> eps, const py::object& activation, const OptionalArray& residual) {
        return rms_norm_forward_impl("rms_norm", x, normalized_shape, weight, eps, activation,
                                     residual, std::nullopt)[0]
            .cast<py::object>();
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("eps") = py::none(), FORWARD_EPILOGUE_ARGS,
      R"doc(Root-mean-square normalization (torch.nn.functional.rms_norm).

x: a tensor of any rank whose trailing dims equal normalized_shape (an int or a sequence of
ints). Each slice over those dims is divided by sqrt(mean(x^2) + eps), then multiplied by weight
(optional, float32, of shape normalized_shape). eps=None is torch.finfo(x.dtype).eps. Returns y,
a new tensor of x's dtype, in x's format as layer_norm's.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def(
      "rms_norm_forward",
      [](const py::object& x, const py::object& normalized_shape, const OptionalArray& weight,
         std::optional<double> eps, const py::object& activation, const OptionalArray& residual,
         const OptionalArray& residual_in) {
        return rms_norm_forward_impl("rms_norm_forward", x, normalized_shape, weight, eps,
                                     activation, residual, residual_in);
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("eps") = py::none(), FORWARD_EPILOGUE_ARGS, py::arg("residual_in") = py::none(),
      R"doc(rms_norm that also returns the statistics its backward needs.

Returns (y, rstd): y as rms_norm's; rstd = 1 / sqrt(mean(x^2) + eps), float32, of x's leading
dims followed by a 1 for each normalized dim (as layer_norm_forward's).

residual_in (keyword-only; None, or an array exactly like x): the residual add of pre-norm
transformers fused in front: h = x + residual_in (rounded to x's dtype) is normalized, and
returned as a third element, (y, rstd, h), for the next block's residual. Pass h as the
backward's x.)doc"
      FORWARD_EPILOGUE_DOC);

  m.def("rms_norm_backward",
        [](const py::object& dy, const py::object& x, const py::object& normalized_shape,
           const py::object& rstd, const OptionalArray& weight, const OptionalArray& dsum_out,
           const py::object& activation, const OptionalArray& y, bool residual_grad,
           const py::object& residual) {
          return rms_norm_backward_impl(dy, x, normalized_shape, rstd, weight, dsum_out,
                                        {activation, y, residual_grad, residual, py::none()});
        },
        py::arg("dy"), py::arg("x"), py::arg("normalized_shape"), py::arg("rstd"),
        py::arg("weight") = py::none(), py::kw_only(), py::arg("dsum_out") = py::none(),
        py::arg("activation") = py::none(), py::arg("y") = py::none(),
        py::arg("residual_grad") = false, py::arg("residual") = py::ellipsis(),
        R"doc(Gradients of rms_norm.

dy: the gradient with respect to y (x's shape and dtype; any strides). x (what the forward
normalized: its h with residual_in), normalized_shape, rstd and weight as passed to / returned
by rms_norm_forward.
dsum_out (keyword-only; None, or an array exactly like x): with residual_in, the gradient
arriving at h from the next block; then dh = d(norm) + dsum_out, which is the gradient of both
x and residual_in.
Returns (dx, dweight): dx has x's shape, dtype and the memory format y had; dweight (float32, of
shape normalized_shape) is None when weight is None. activation, y, residual and
residual_grad as layer_norm_backward's (there is no bias: silu recomputes z without one);
residual_grad=True returns (dx, dweight, dresidual).)doc");

  m.def("set_num_threads", &normkit::set_num_threads, py::arg("n"),
        R"doc(Sets the number of threads every later call uses (n >= 1). Results do not depend
on it: they are bitwise the same for any thread count.)doc");
  m.def("get_num_threads", &normkit::get_num_threads,
        R"doc(The number of threads calls use: set_num_threads's value, else all cores.)doc");

  m.def(
      "_kernel_view",
      [](const py::object& x) {
        const Activation a = activation_input("_kernel_view", "x", x);
        return py::make_tuple(reinterpret_cast<std::uintptr_t>(a.view.data),
                              normkit::to_string(a.view.format));
      },
      py::arg("x"),
      R"doc(Testing aid: the address and memory format the kernels would read x at (x's own
memory unless a NumPy array had to be copied).)doc");

  m.def(
      "_set_output_poison", [](bool enabled) { g_poison_outputs = enabled; },
      py::arg("enabled"),
      R"doc(Testing aid: when enabled, every output array is filled with NaN before the kernel
runs, so an element the kernel fails to write cannot pass for a correct one.)doc");

  // ---- BatchNorm folding ----
  m.def(
      "fold_batch_norm",
      [](const py::object& conv_weight, const OptionalArray& conv_bias,
         const py::object& running_mean, const py::object& running_var,
         const OptionalArray& bn_weight, const OptionalArray& bn_bias, double eps) {
        const char* fn = "fold_batch_norm";
        const Tensor weight_t = tensor_arg(fn, "conv_weight", conv_weight);
        require_float32(fn, "conv_weight", weight_t);
        if (weight_t.ndim() < 1)
          value_error(fn, "conv_weight must have shape (C_out, ...), got shape ()");
        const VectorIn weight = float32_input(fn, "conv_weight", weight_t);
        const VectorIn bias = vector_input(fn, "conv_bias", conv_bias);
        const VectorIn mean = vector_input(fn, "running_mean", running_mean);
        const VectorIn var = vector_input(fn, "running_var", running_var);
        const VectorIn gamma = vector_input(fn, "bn_weight", bn_weight);
        const VectorIn beta = vector_input(fn, "bn_bias", bn_bias);
        const int64_t out_channels = weight_t.shape[0];
        // Results of the kind conv_weight is (NumPy, torch, DLPack).
        const Output folded = new_output(weight_t, DType::float32, weight_t.shape,
                                         MemoryFormat::channels_first);
        const VectorOut folded_bias = vector_output(weight_t, {out_channels});
        try {
          normkit::fold_batch_norm(
              {.eps = eps}, weight.span, out_channels, bias.span, mean.span, var.span,
              gamma.span, beta.span,
              {static_cast<float*>(folded.data), weight.span.size()}, folded_bias.span);
        } catch (const normkit::Error& e) {
          // The library's names for a layer of any kind, as this function's arguments say them.
          std::string message = e.what();
          for (auto [from, to] : {std::pair{"layer_weight", "conv_weight"},
                                  std::pair{"layer_bias", "conv_bias"}})
            for (auto at = message.find(from); at != std::string::npos; at = message.find(from))
              message.replace(at, std::string(from).size(), to);
          throw py::value_error(message);
        }
        return py::make_tuple(folded.value, folded_bias.value);
      },
      py::arg("conv_weight"), py::arg("conv_bias"), py::arg("running_mean"),
      py::arg("running_var"), py::arg("bn_weight"), py::arg("bn_bias"), py::arg("eps") = 1e-5,
      R"doc(Folds an inference BatchNorm into the convolution or linear layer before it
(torch.nn.utils.fusion.fuse_conv_bn_weights).

conv_weight: float32 (C_out, ...) (a conv's (C_out, C_in / groups, *kernel) or a linear layer's
(C_out, C_in)); conv_bias, running_mean, running_var, bn_weight, bn_bias: float32 of length
C_out; conv_bias, bn_weight and bn_bias may be None (0, 1 and 0). With
scale = bn_weight / sqrt(running_var + eps):
    weight = conv_weight * scale (per output channel)
    bias   = (conv_bias - running_mean) * scale + bn_bias
computed in float64 and rounded to float32 once. Returns (weight, bias), new tensors of the
kind conv_weight is (weight C-contiguous, of conv_weight's shape). Raises ValueError on
mismatched lengths, a bad eps or a negative or NaN running_var.)doc");
}
