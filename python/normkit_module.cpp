// normkit's Python module: torch.nn.functional's names, defaults and semantics over NumPy arrays.
//
// Activations (x, dy) may come in either memory format: an array whose strides are those of a
// channels-last tensor (NLC, NHWC, NDHWC memory seen as (N, C, *spatial)) is computed
// channels-last and its outputs get the same strides; a C-contiguous array is computed
// channels-first; any other strides are copied to C-contiguous first. Every result is a new
// array; only the running statistics passed in are written to.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "normkit/batch_norm.h"
#include "normkit/context.h"
#include "normkit/error.h"
#include "normkit/group_norm.h"
#include "normkit/instance_norm.h"
#include "normkit/layer_norm.h"
#include "normkit/tensor.h"
#include "array_args.h"
#include "batch_norm_args.h"

namespace py = pybind11;
using normkit::DType;
using normkit::MemoryFormat;
using normkit::TensorView;

namespace {

using namespace normkit::python;

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

py::tuple group_norm_forward_impl(const char* function, const py::array& x_in,
                                  int64_t num_groups, const OptionalArray& weight_in,
                                  const OptionalArray& bias_in, double eps) {
  const Activation x = activation_input(function, "x", x_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const Activation y = activation_output(x);
  const Shape stats_shape{batch_of(x.view), groups_accepted(num_groups, x.view) ? num_groups : 0};
  const VectorOut mean = vector_output(stats_shape);
  const VectorOut rstd = vector_output(stats_shape);
  const normkit::GroupNormParams params{num_groups, eps};
  without_gil([&] {
    normkit::group_norm_forward(params, x.view, weight.span, bias.span, y.view, mean.span,
                                rstd.span);
  });
  return py::make_tuple(y.array, mean.array, rstd.array);
}

py::tuple group_norm_backward_impl(const py::array& dy_in, const py::array& x_in,
                                   const py::array& mean_in, const py::array& rstd_in,
                                   int64_t num_groups, const OptionalArray& weight_in) {
  const char* function = "group_norm_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const Shape stats_shape{batch_of(x.view), num_groups};
  const bool accepted = groups_accepted(num_groups, x.view);
  VectorIn stats[2];
  const char* names[2] = {"mean", "rstd"};
  const py::array* arrays[2] = {&mean_in, &rstd_in};
  for (int i = 0; i < 2; ++i) {
    const py::array& a = *arrays[i];
    require_float32(function, names[i], a);
    // The op sees the statistics flattened: their (N, num_groups) shape is checked here, once
    // the library accepts num_groups, so that a bad one is reported as such by the op.
    if (accepted && shape_of(a) != stats_shape)
      value_error(function, std::string(names[i]) + " has shape " + shape_string(shape_of(a)) +
                                ", expected (N, num_groups) = " + shape_string(stats_shape));
    py::array c = contiguous(a);
    stats[i] = {c, {static_cast<const float*>(c.data()), static_cast<std::size_t>(c.size())}};
  }
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output({channels_of(x.view)});
    dbias = vector_output({channels_of(x.view)});
  }
  const normkit::GroupNormBackwardParams params{num_groups};
  without_gil([&] {
    normkit::group_norm_backward(params, dy.view, x.view, stats[0].span, stats[1].span,
                                 weight.span, dx.view, dweight.span, dbias.span);
  });
  return py::make_tuple(dx.array, or_none(dweight), or_none(dbias));
}

// ---------------------------------------------------------------------------------------------
// batch_norm

py::tuple batch_norm_forward_impl(const char* function, const py::array& x_in,
                                  const OptionalArray& running_mean_in,
                                  const OptionalArray& running_var_in,
                                  const OptionalArray& weight_in, const OptionalArray& bias_in,
                                  bool training, double momentum, double eps) {
  BatchNormForwardArgs a = batch_norm_forward_args(function, x_in, running_mean_in,
                                                   running_var_in, weight_in, bias_in, training);
  const normkit::BatchNormParams params{eps, momentum};
  if (training) {
    without_gil([&] {
      normkit::batch_norm_forward_training(params, a.x.view, a.weight.span, a.bias.span,
                                           a.y.view, a.save_mean.span, a.save_invstd.span,
                                           a.running_mean, a.running_var);
    });
    define_empty_statistics(a);
  } else {
    without_gil([&] {
      normkit::batch_norm_forward_inference(params, a.x.view, a.weight.span, a.bias.span,
                                            a.running_mean, a.running_var, a.y.view);
    });
  }
  return py::make_tuple(a.y.array, a.save_mean.array, a.save_invstd.array);
}

py::tuple batch_norm_backward_impl(const py::array& dy_in, const py::array& x_in,
                                   const OptionalArray& weight_in,
                                   const OptionalArray& save_mean_in,
                                   const OptionalArray& save_invstd_in, bool training,
                                   const OptionalArray& running_mean_in,
                                   const OptionalArray& running_var_in, double eps) {
  const char* function = "batch_norm_backward";
  BatchNormBackwardArgs a = batch_norm_backward_args(function, dy_in, x_in, weight_in);
  if (training) {
    batch_norm_saved_statistics(function, a, save_mean_in, save_invstd_in);
    without_gil([&] {
      normkit::batch_norm_backward_training({}, a.dy.view, a.x.view, a.save_mean.span,
                                            a.save_invstd.span, a.weight.span, a.dx.view,
                                            a.dweight.span, a.dbias.span);
    });
  } else {
    if (!running_mean_in || !running_var_in)
      value_error(function, "running_mean and running_var are required when training=False");
    const VectorIn running_mean = vector_input(function, "running_mean", running_mean_in);
    const VectorIn running_var = vector_input(function, "running_var", running_var_in);
    const normkit::BatchNormInferenceBackwardParams params{.eps = eps};
    without_gil([&] {
      normkit::batch_norm_backward_inference(params, a.dy.view, a.x.view, running_mean.span,
                                             running_var.span, a.weight.span, a.dx.view,
                                             a.dweight.span, a.dbias.span);
    });
  }
  return py::make_tuple(a.dx.array, or_none(a.dweight), or_none(a.dbias));
}

// ---------------------------------------------------------------------------------------------
// instance_norm, layer_norm

py::array instance_norm_impl(const py::array& x_in, const OptionalArray& running_mean_in,
                             const OptionalArray& running_var_in, const OptionalArray& weight_in,
                             const OptionalArray& bias_in, bool use_input_stats, double momentum,
                             double eps) {
  const char* function = "instance_norm";
  const Activation x = activation_input(function, "x", x_in);
  const std::span<float> running_mean =
      running_stat(function, "running_mean", running_mean_in, use_input_stats);
  const std::span<float> running_var =
      running_stat(function, "running_var", running_var_in, use_input_stats);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const Activation y = activation_output(x);
  const VectorOut mean = vector_output({batch_of(x.view), channels_of(x.view)});
  const VectorOut rstd = vector_output({batch_of(x.view), channels_of(x.view)});
  const normkit::InstanceNormParams params{use_input_stats, momentum, eps};
  without_gil([&] {
    normkit::instance_norm_forward(params, x.view, weight.span, bias.span, running_mean,
                                   running_var, y.view, mean.span, rstd.span);
  });
  return y.array;
}

Shape normalized_shape_of(const py::object& normalized_shape) {
  const char* function = "layer_norm";
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
VectorIn layer_norm_param(const char* name, const OptionalArray& a, const Shape& normalized) {
  const char* function = "layer_norm";
  if (!a) return {};
  require_float32(function, name, *a);
  if (shape_of(*a) != normalized)
    value_error(function, std::string(name) + " has shape " + shape_string(shape_of(*a)) +
                              ", expected normalized_shape " + shape_string(normalized));
  py::array flat = contiguous(*a).attr("reshape")(-1);
  return {flat, {static_cast<const float*>(flat.data()), static_cast<std::size_t>(flat.size())}};
}

py::array layer_norm_impl(const py::array& x_in, const py::object& normalized_shape_in,
                          const OptionalArray& weight_in, const OptionalArray& bias_in,
                          double eps) {
  const char* function = "layer_norm";
  const Shape normalized = normalized_shape_of(normalized_shape_in);
  activation_dtype(function, "x", x_in);
  const Shape shape = shape_of(x_in);
  const int rank = static_cast<int>(shape.size());
  const int normalized_ndim = static_cast<int>(normalized.size());
  if (normalized_ndim > rank ||
      !std::equal(normalized.begin(), normalized.end(), shape.end() - normalized_ndim))
    value_error(function, "x shape " + shape_string(shape) +
                              " does not end with normalized_shape " + shape_string(normalized));
  const VectorIn weight = layer_norm_param("weight", weight_in, normalized);
  const VectorIn bias = layer_norm_param("bias", bias_in, normalized);

  // The kernel computes channels-last only when each sample is one row; other normalized dims
  // need channels-first. Ranks above the kernel's are folded to (rows, cols), which is the same
  // computation on channels-first memory.
  Activation x = activation_input(function, "x", x_in);
  const bool last_ok = normalized_ndim == rank - 1 && rank <= normkit::kMaxRank;
  if (x.view.format == MemoryFormat::channels_last && !last_ok)
    x = activation_input(function, "x", x_in, MemoryFormat::channels_first);
  int kernel_normalized_ndim = normalized_ndim;
  if (rank > normkit::kMaxRank) {
    int64_t rows = 1, cols = 1;
    for (int d = 0; d < rank; ++d) (d < rank - normalized_ndim ? rows : cols) *= shape[d];
    const int64_t folded[2] = {rows, cols};
    x.view = TensorView(x.view.data, x.view.dtype, 2, folded, MemoryFormat::channels_first);
    kernel_normalized_ndim = 1;
  }
  // y has x's full shape and format; the kernel sees it through x's (possibly folded) view.
  py::array y = new_output(x.array.dtype(), shape, x.view.format);
  TensorView y_view = x.view;
  y_view.data = y.mutable_data();
  int64_t rows = 1;
  for (int d = 0; d < rank - normalized_ndim; ++d) rows *= shape[d];
  const VectorOut mean = vector_output({rows});
  const VectorOut rstd = vector_output({rows});
  const normkit::LayerNormParams params{kernel_normalized_ndim, eps};
  without_gil([&] {
    normkit::layer_norm_forward(params, x.view, weight.span, bias.span, y_view, mean.span,
                                rstd.span);
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(_normkit, m) {
  m.doc() =
      "Batch Normalization and the Group Normalization family (GroupNorm, LayerNorm,\n"
      "InstanceNorm) over NumPy arrays, with torch.nn.functional's names, defaults and\n"
      "semantics. Activations (x, dy) may be float32 or float16 (computed in float32: weights,\n"
      "statistics and sums stay float32, outputs have the input's dtype).\n\n"
      "Activations have shape (N, C, *spatial) with 0 to 3 spatial dims. An array with the strides\n"
      "of a channels-last tensor (NLC, NHWC or NDHWC memory viewed as (N, C, ...), e.g.\n"
      "torch_tensor.to(memory_format=torch.channels_last).numpy()) is computed channels-last and\n"
      "its outputs have the same strides; a C-contiguous array is computed channels-first; other\n"
      "strides are copied to C-contiguous first. Results are new arrays; running statistics\n"
      "passed in are updated in place. Invalid arguments raise ValueError, unsupported dtypes\n"
      "TypeError; nothing is written then.";
#ifdef NORMKIT_VERSION
  m.attr("__version__") = NORMKIT_VERSION;
#endif

  register_error_translator();

  m.def(
      "group_norm",
      [](const py::array& x, int64_t num_groups, const OptionalArray& weight,
         const OptionalArray& bias, double eps) {
        return group_norm_forward_impl("group_norm", x, num_groups, weight, bias, eps)[0]
            .cast<py::array>();
      },
      py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5,
      R"doc(Group normalization (torch.nn.functional.group_norm).

x: (N, C, *spatial) float32, 0-3 spatial dims; C must be divisible by num_groups.
For each sample and group of C/num_groups channels: y = (x - mean) / sqrt(var + eps)
(biased variance over the group's channels and positions), then y * weight[c] + bias[c]
when weight / bias (float32, length C) are given. Returns y, a new array in x's memory format.)doc");

  m.def("group_norm_forward", [](const py::array& x, int64_t num_groups,
                                 const OptionalArray& weight, const OptionalArray& bias,
                                 double eps) {
        return group_norm_forward_impl("group_norm_forward", x, num_groups, weight, bias, eps);
      },
      py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5,
      R"doc(group_norm that also returns the statistics its backward needs.

Returns (y, mean, rstd): y as group_norm's; mean and rstd = 1 / sqrt(var + eps), float32
arrays of shape (N, num_groups), as torch.native_group_norm returns them.)doc");

  m.def("group_norm_backward", &group_norm_backward_impl, py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("num_groups"), py::arg("weight") = py::none(),
        R"doc(Gradients of group_norm.

dy: the gradient of the loss with respect to y (x's shape; any strides). x, mean, rstd,
num_groups and weight as passed to / returned by group_norm_forward.
Returns (dx, dweight, dbias): dx has x's shape and memory format; dweight and dbias (float32,
length C) are None when weight is None.)doc");

  m.def("batch_norm", [](const py::array& x, const OptionalArray& running_mean,
                         const OptionalArray& running_var, const OptionalArray& weight,
                         const OptionalArray& bias, bool training, double momentum,
                         double eps) {
        return batch_norm_forward_impl("batch_norm", x, running_mean, running_var, weight, bias,
                                       training, momentum, eps)[0]
            .cast<py::array>();
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5,
      R"doc(Batch normalization (torch.nn.functional.batch_norm).

x: (N, C, *spatial) float32. running_mean, running_var: float32 arrays of length C, or None.
training=True: normalizes each channel with its batch mean and biased variance over N and the
spatial positions (needs more than one value per channel), and, when running statistics are
given, updates them in place (they must then be writable and contiguous):
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * unbiased variance
training=False: normalizes with running_mean and running_var, which are then required.
weight and bias (length C) are optional. Returns y, a new array in x's memory format.)doc");

  m.def("batch_norm_forward", [](const py::array& x, const OptionalArray& running_mean,
                                 const OptionalArray& running_var, const OptionalArray& weight,
                                 const OptionalArray& bias, bool training, double momentum,
                                 double eps) {
        return batch_norm_forward_impl("batch_norm_forward", x, running_mean, running_var,
                                       weight, bias, training, momentum, eps);
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5,
      R"doc(batch_norm that also returns the statistics its backward needs.

Returns (y, save_mean, save_invstd). Training: the batch mean and 1 / sqrt(biased var + eps),
float32 of length C (zeros for an empty batch, which has no statistics). Inference: two empty
arrays, as torch.native_batch_norm (the backward then reads the running statistics).)doc");

  m.def("batch_norm_backward", &batch_norm_backward_impl, py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("save_mean"), py::arg("save_invstd"),
        py::arg("training") = true, py::arg("running_mean") = py::none(),
        py::arg("running_var") = py::none(), py::arg("eps") = 1e-5,
        R"doc(Gradients of batch_norm.

dy: the gradient with respect to y (x's shape; any strides). training=True: the gradient flows
through the batch statistics; save_mean and save_invstd are those batch_norm_forward returned.
training=False: the statistics are constants; running_mean, running_var (length C) and eps are
those of the forward, and save_mean / save_invstd are not read.
Returns (dx, dweight, dbias): dx has x's shape and memory format; dweight and dbias (float32,
length C) are None when weight is None.)doc");

  m.def("instance_norm", &instance_norm_impl, py::arg("x"), py::arg("running_mean") = py::none(),
        py::arg("running_var") = py::none(), py::arg("weight") = py::none(),
        py::arg("bias") = py::none(), py::arg("use_input_stats") = true,
        py::arg("momentum") = 0.1, py::arg("eps") = 1e-5,
        R"doc(Instance normalization (torch.nn.functional.instance_norm).

x: (N, C, *spatial) float32. use_input_stats=True: each (sample, channel) is normalized over its
spatial positions (more than one needed); given running statistics (length C, writable,
contiguous) are updated in place with the batch averages of the per-instance mean and unbiased
variance, weighted by momentum. use_input_stats=False: normalizes with running_mean and
running_var, which are then required. weight and bias (length C) are optional.
Returns y, a new array in x's memory format.)doc");

  m.def("layer_norm", &layer_norm_impl, py::arg("x"), py::arg("normalized_shape"),
        py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("eps") = 1e-5,
        R"doc(Layer normalization (torch.nn.functional.layer_norm).

x: float32 or float16 of any rank whose trailing dims equal normalized_shape (an int or a sequence
of ints). Each slice over those dims is normalized with its mean and biased variance, then
multiplied by weight and shifted by bias (optional, float32, both of shape normalized_shape);
float16 is computed in float32 inside. Returns y, a new array of x's dtype; a channels-last x keeps
its format when normalized_shape covers every dim but N.)doc");

  m.def("set_num_threads", &normkit::set_num_threads, py::arg("n"),
        R"doc(Sets the number of threads every later call uses (n >= 1). Results do not depend
on it: they are bitwise the same for any thread count.)doc");
  m.def("get_num_threads", &normkit::get_num_threads,
        R"doc(The number of threads calls use: set_num_threads's value, else all cores.)doc");

  m.def(
      "_set_output_poison", [](bool enabled) { g_poison_outputs = enabled; },
      py::arg("enabled"),
      R"doc(Testing aid: when enabled, every output array is filled with NaN before the kernel
runs, so an element the kernel fails to write cannot pass for a correct one.)doc");
}
