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

namespace py = pybind11;
using normkit::DType;
using normkit::MemoryFormat;
using normkit::TensorView;

namespace {

using Shape = std::vector<py::ssize_t>;
using OptionalArray = std::optional<py::array>;

// Tests turn this on so that an output element a kernel forgets to write shows up as NaN.
bool g_poison_outputs = false;

[[noreturn]] void type_error(const char* function, const std::string& message) {
  throw py::type_error(std::string(function) + ": " + message);
}
[[noreturn]] void value_error(const char* function, const std::string& message) {
  throw py::value_error(std::string(function) + ": " + message);
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

std::string shape_string(const Shape& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += shape.size() == 1 ? ",)" : ")";
  return s;
}
Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

bool native_byte_order(const py::dtype& dt) {
  constexpr char native = std::endian::native == std::endian::little ? '<' : '>';
  return dt.byteorder() == '=' || dt.byteorder() == '|' || dt.byteorder() == native;
}

// ---------------------------------------------------------------------------------------------
// Element types.

// Activation dtypes (x, dy, and y/dx, which take x's) handed to the kernels, keyed by NumPy's
// type character. Supporting another dtype is one more row, once the kernels implement it.
struct ActivationType {
  char numpy_char;
  DType dtype;
};
// NumPy has no bfloat16, so half precision from Python is float16 ('e').
constexpr ActivationType kActivationTypes[] = {
    {'f', DType::float32},
    {'e', DType::float16},
};

DType activation_dtype(const char* function, const char* name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (native_byte_order(dt))
    for (const ActivationType& t : kActivationTypes)
      if (dt.char_() == t.numpy_char) return t.dtype;
  std::string supported;
  for (const ActivationType& t : kActivationTypes)
    supported += std::string(supported.empty() ? "" : ", ") + normkit::to_string(t.dtype);
  type_error(function, std::string(name) + " has dtype " + dtype_name(a) + "; supported: " +
                           supported);
}

// Parameters and statistics are float32 whatever the activation dtype.
void require_float32(const char* function, const char* name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (dt.char_() != 'f' || !native_byte_order(dt))
    type_error(function, std::string(name) + " has dtype " + dtype_name(a) + ", expected float32");
}

// ---------------------------------------------------------------------------------------------
// Memory formats.

bool is_aligned(const py::array& a) {
  return (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
}

// Dims from outermost to innermost in memory.
std::vector<int> dim_order(int rank, MemoryFormat format) {
  std::vector<int> order(rank);
  std::iota(order.begin(), order.end(), 0);
  if (format == MemoryFormat::channels_last && rank >= 3) {
    std::rotate(order.begin() + 1, order.begin() + 2, order.end());  // N, *spatial, C
  }
  return order;
}

// Byte strides of a dense array of `shape` in `format` (as torch computes them: a zero-size dim
// counts as 1, so an empty channels-last tensor still has channels-last strides).
Shape dense_strides(const Shape& shape, MemoryFormat format, py::ssize_t itemsize) {
  const int rank = static_cast<int>(shape.size());
  const std::vector<int> order = dim_order(rank, format);
  Shape strides(rank);
  py::ssize_t step = itemsize;
  for (int i = rank - 1; i >= 0; --i) {
    strides[order[i]] = step;
    step *= std::max<py::ssize_t>(shape[order[i]], 1);
  }
  return strides;
}

// Whether `a` is laid out densely in `format`. `ignore_unit_dims`: a dim of extent 1 never moves,
// so its stride may be anything (NumPy and torch both produce such arrays).
bool dense_in(const py::array& a, MemoryFormat format, bool ignore_unit_dims) {
  const Shape shape = shape_of(a);
  const Shape expected = dense_strides(shape, format, a.itemsize());
  for (py::ssize_t d = 0; d < a.ndim(); ++d) {
    if (ignore_unit_dims && shape[d] <= 1) continue;
    if (a.strides(d) != expected[d]) return false;
  }
  return true;
}

// The format `a` can be computed in without a copy, if any. Exact strides decide first, so an
// array that is dense in both (C == 1, or all spatial dims 1) keeps the strides it came with.
std::optional<MemoryFormat> dense_format(const py::array& a) {
  if (!is_aligned(a)) return std::nullopt;
  const bool may_be_last = a.ndim() >= 3;
  for (bool ignore_unit_dims : {false, true}) {
    if (dense_in(a, MemoryFormat::channels_first, ignore_unit_dims))
      return MemoryFormat::channels_first;
    if (may_be_last && dense_in(a, MemoryFormat::channels_last, ignore_unit_dims))
      return MemoryFormat::channels_last;
  }
  if (a.size() == 0) return MemoryFormat::channels_first;
  return std::nullopt;
}

// A new array of `shape` whose strides are the dense ones of `format`; its contents are undefined.
py::array allocate(const py::dtype& dtype, const Shape& shape, MemoryFormat format) {
  const int rank = static_cast<int>(shape.size());
  py::array out;
  if (format == MemoryFormat::channels_first || rank < 3) {
    out = py::array(dtype, shape);
  } else {
    // Allocate in memory order, then view it in logical order.
    const std::vector<int> order = dim_order(rank, format);
    Shape memory_shape(rank);
    for (int i = 0; i < rank; ++i) memory_shape[i] = shape[order[i]];
    py::array storage(dtype, memory_shape);
    Shape strides(rank);
    for (int i = 0; i < rank; ++i) strides[order[i]] = storage.strides(i);
    out = py::array(dtype, shape, strides, storage.data(), storage);
  }
  return out;
}

// An array a kernel is about to write.
py::array new_output(const py::dtype& dtype, const Shape& shape, MemoryFormat format) {
  py::array out = allocate(dtype, shape, format);
  if (g_poison_outputs) out.attr("fill")(std::numeric_limits<double>::quiet_NaN());
  return out;
}

py::array copy_to_format(const py::array& a, MemoryFormat format) {
  py::array out = allocate(a.dtype(), shape_of(a), format);
  py::module_::import("numpy").attr("copyto")(out, a);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Arguments.

// An activation array and the view the kernels see; `array` keeps the data alive.
struct Activation {
  py::array array;
  TensorView view;
};

TensorView view_of(const py::array& a, void* data, DType dtype, MemoryFormat format) {
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  return TensorView(data, dtype, static_cast<int>(a.ndim()), shape.data(), format);
}

// x-like input. With `format`, the array is brought to that format (dy follows x's); without,
// it keeps its own if it has one, else it is copied to channels-first.
Activation activation_input(const char* function, const char* name, py::array a,
                            std::optional<MemoryFormat> format = std::nullopt) {
  const DType dtype = activation_dtype(function, name, a);
  MemoryFormat chosen = MemoryFormat::channels_first;
  if (format) {
    chosen = a.ndim() >= 3 ? *format : MemoryFormat::channels_first;
    const bool usable = is_aligned(a) && (a.size() == 0 || dense_in(a, chosen, true));
    if (!usable) a = copy_to_format(a, chosen);
  } else if (std::optional<MemoryFormat> own = dense_format(a)) {
    chosen = *own;
  } else {
    a = copy_to_format(a, MemoryFormat::channels_first);
  }
  return {a, view_of(a, const_cast<void*>(a.data()), dtype, chosen)};
}

// A new output like `like` (shape, dtype, memory format).
Activation activation_output(const Activation& like) {
  py::array out = new_output(like.array.dtype(), shape_of(like.array), like.view.format);
  return {out, view_of(out, out.mutable_data(), like.view.dtype, like.view.format)};
}

// Contiguous, aligned, native: what a std::span can point into. Copies only when needed.
py::array contiguous(const py::array& a) {
  return py::array::ensure(a, static_cast<int>(py::array::c_style) |
                                   static_cast<int>(py::detail::npy_api::NPY_ARRAY_ALIGNED_));
}

// An optional read-only float32 vector (weight, bias, saved statistics): a 1-D array, or None.
struct VectorIn {
  py::array array;
  std::span<const float> span;  // data() == nullptr: absent
  bool present() const { return span.data() != nullptr; }
};

VectorIn vector_input(const char* function, const char* name, const OptionalArray& a) {
  if (!a) return {};
  require_float32(function, name, *a);
  if (a->ndim() != 1)
    value_error(function, std::string(name) + " must be 1-D, got shape " +
                              shape_string(shape_of(*a)));
  py::array c = contiguous(*a);
  return {c, {static_cast<const float*>(c.data()), static_cast<std::size_t>(c.size())}};
}

// An optional running statistic the kernel updates in place: it must be the caller's own
// memory, so nothing is copied; anything else is an error.
std::span<float> running_stat(const char* function, const char* name, const OptionalArray& a,
                              bool written) {
  if (!a) return {};
  require_float32(function, name, *a);
  if (a->ndim() != 1)
    value_error(function, std::string(name) + " must be 1-D, got shape " +
                              shape_string(shape_of(*a)));
  if (!is_aligned(*a) || (a->size() > 1 && a->strides(0) != a->itemsize()))
    value_error(function, std::string(name) +
                              " must be contiguous (it is updated in place), got strides " +
                              shape_string(Shape(a->strides(), a->strides() + 1)));
  if (written && !a->writeable())
    value_error(function, std::string(name) + " must be writable (it is updated in place)");
  return {static_cast<float*>(const_cast<void*>(a->data())), static_cast<std::size_t>(a->size())};
}

// A new float32 statistic or parameter gradient.
struct VectorOut {
  py::array array;
  std::span<float> span;  // data() == nullptr: not asked for
};

VectorOut vector_output(const Shape& shape) {
  py::array out = new_output(py::dtype::of<float>(), shape, MemoryFormat::channels_first);
  return {out, {static_cast<float*>(out.mutable_data()), static_cast<std::size_t>(out.size())}};
}

py::object or_none(const VectorOut& v) {
  return v.span.data() ? py::object(v.array) : py::object(py::none());
}

int64_t channels_of(const TensorView& x) { return x.rank >= 2 ? x.shape[1] : 0; }
int64_t batch_of(const TensorView& x) { return x.rank >= 1 ? x.shape[0] : 0; }

// Run a kernel without the GIL: the arrays it touches are held by the caller's locals.
template <typename F> void without_gil(F&& kernel) {
  py::gil_scoped_release release;
  kernel();
}

// ---------------------------------------------------------------------------------------------
// Fused epilogues: y = activation(normalized(x) + residual), and their gradients.

// The activations a forward can fuse, by the name Python passes: one row each, saying how the
// library's epilogue is set for it and what its gradient reads besides dy.
struct FusedActivation {
  const char* name;
  bool relu;
  bool backward_needs_y;  // relu: the forward's output, whose sign is the mask
};
constexpr FusedActivation kFusedActivations[] = {
    {"relu", true, true},
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
  epilogue.relu = activation && activation->relu;
}
void set_activation(const FusedActivation* activation, normkit::BackwardEpilogue& epilogue) {
  epilogue.relu = activation && activation->relu;
}

// An epilogue tensor is used where it lies, never copied: it must have x's shape and dtype and
// be dense in the memory format x is computed in. `x_view`: x as the kernel sees it (the
// epilogue tensor is seen the same way).
TensorView exactly_like_x(const char* function, const char* name, const py::array& a,
                          const Activation& x, const TensorView& x_view, bool written) {
  if (shape_of(a) != shape_of(x.array))
    value_error(function, std::string(name) + " has shape " + shape_string(shape_of(a)) +
                              ", expected x's shape " + shape_string(shape_of(x.array)));
  if (activation_dtype(function, name, a) != x.view.dtype)
    type_error(function, std::string(name) + " has dtype " + dtype_name(a) +
                             ", expected x's dtype " + dtype_name(x.array));
  if (!is_aligned(a) || (a.size() > 0 && !dense_in(a, x.view.format, true)))
    value_error(function, std::string(name) + " must be laid out as x is computed (" +
                              normkit::to_string(x.view.format) + ", byte strides " +
                              shape_string(dense_strides(shape_of(a), x.view.format,
                                                         a.itemsize())) +
                              "), got byte strides " +
                              shape_string(Shape(a.strides(), a.strides() + a.ndim())));
  if (written && !a.writeable()) value_error(function, std::string(name) + " must be writable");
  TensorView view = x_view;
  view.data = const_cast<void*>(a.data());
  return view;
}

// What a forward fuses: `activation` (None or a name of kFusedActivations) and `residual`
// (None or an array exactly like x).
normkit::ForwardEpilogue forward_epilogue(const char* function, const py::object& activation,
                                          const OptionalArray& residual, const Activation& x,
                                          const TensorView& x_view) {
  normkit::ForwardEpilogue epilogue;
  set_activation(fused_activation(function, activation), epilogue);
  if (residual) epilogue.residual = exactly_like_x(function, "residual", *residual, x, x_view, false);
  return epilogue;
}

// What a backward undoes: the forward's `activation`, `y` (the forward's output, required when
// the activation's gradient reads it), and whether the residual's gradient is wanted.
struct BackwardEpilogueArgs {
  py::object activation;
  OptionalArray y;
  bool residual_grad = false;
};

struct FusedBackward {
  normkit::BackwardEpilogue epilogue;
  std::optional<py::array> dresidual;  // a new array, with residual_grad
};

FusedBackward backward_epilogue(const char* function, const BackwardEpilogueArgs& args,
                                const Activation& x, const TensorView& x_view) {
  FusedBackward fused;
  const FusedActivation* activation = fused_activation(function, args.activation);
  set_activation(activation, fused.epilogue);
  if (activation && activation->backward_needs_y && !args.y)
    value_error(function, std::string("y (the forward's output) is required with activation='") +
                              activation->name + "'");
  if (args.y && !(activation && activation->backward_needs_y))
    value_error(function, std::string("y is not read with activation=") +
                              py::repr(args.activation).cast<std::string>() +
                              ": pass the forward's activation with it");
  if (args.y) fused.epilogue.y = exactly_like_x(function, "y", *args.y, x, x_view, false);
  if (args.residual_grad) {
    py::array d = new_output(x.array.dtype(), shape_of(x.array), x.view.format);
    fused.epilogue.dresidual = x_view;
    fused.epilogue.dresidual.data = d.mutable_data();
    fused.dresidual = d;
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

py::tuple group_norm_forward_impl(const char* function, const py::array& x_in,
                                  int64_t num_groups, const OptionalArray& weight_in,
                                  const OptionalArray& bias_in, double eps,
                                  const py::object& activation, const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const normkit::GroupNormParams params{
      num_groups, eps, forward_epilogue(function, activation, residual, x, x.view)};
  const Activation y = activation_output(x);
  const Shape stats_shape{batch_of(x.view), groups_accepted(num_groups, x.view) ? num_groups : 0};
  const VectorOut mean = vector_output(stats_shape);
  const VectorOut rstd = vector_output(stats_shape);
  without_gil([&] {
    normkit::group_norm_forward(params, x.view, weight.span, bias.span, y.view, mean.span,
                                rstd.span);
  });
  return py::make_tuple(y.array, mean.array, rstd.array);
}

py::tuple group_norm_backward_impl(const py::array& dy_in, const py::array& x_in,
                                   const py::array& mean_in, const py::array& rstd_in,
                                   int64_t num_groups, const OptionalArray& weight_in,
                                   const BackwardEpilogueArgs& fused_args) {
  const char* function = "group_norm_backward";
  const Activation x = activation_input(function, "x", x_in);
  const Activation dy = activation_input(function, "dy", dy_in, x.view.format);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const FusedBackward fused = backward_epilogue(function, fused_args, x, x.view);
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
  const normkit::GroupNormBackwardParams params{num_groups, fused.epilogue};
  without_gil([&] {
    normkit::group_norm_backward(params, dy.view, x.view, stats[0].span, stats[1].span,
                                 weight.span, dx.view, dweight.span, dbias.span);
  });
  return backward_result(dx.array, or_none(dweight), or_none(dbias), fused);
}

// ---------------------------------------------------------------------------------------------
// batch_norm

py::tuple batch_norm_forward_impl(const char* function, const py::array& x_in,
                                  const OptionalArray& running_mean_in,
                                  const OptionalArray& running_var_in,
                                  const OptionalArray& weight_in, const OptionalArray& bias_in,
                                  bool training, double momentum, double eps,
                                  const py::object& activation, const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const std::span<float> running_mean =
      running_stat(function, "running_mean", running_mean_in, training);
  const std::span<float> running_var =
      running_stat(function, "running_var", running_var_in, training);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const normkit::BatchNormParams params{
      eps, momentum, forward_epilogue(function, activation, residual, x, x.view)};
  const Activation y = activation_output(x);
  if (training) {
    const VectorOut save_mean = vector_output({channels_of(x.view)});
    const VectorOut save_invstd = vector_output({channels_of(x.view)});
    without_gil([&] {
      normkit::batch_norm_forward_training(params, x.view, weight.span, bias.span, y.view,
                                           save_mean.span, save_invstd.span, running_mean,
                                           running_var);
    });
    // An empty batch has no statistics and the kernel writes none; give them a defined value.
    if (x.array.size() == 0) {
      std::fill(save_mean.span.begin(), save_mean.span.end(), 0.0f);
      std::fill(save_invstd.span.begin(), save_invstd.span.end(), 0.0f);
    }
    return py::make_tuple(y.array, save_mean.array, save_invstd.array);
  }
  // As torch: inference saves no statistics; its backward reads the running ones.
  const VectorOut save_mean = vector_output({0});
  const VectorOut save_invstd = vector_output({0});
  without_gil([&] {
    normkit::batch_norm_forward_inference(params, x.view, weight.span, bias.span, running_mean,
                                          running_var, y.view);
  });
  return py::make_tuple(y.array, save_mean.array, save_invstd.array);
}

py::tuple batch_norm_backward_impl(const py::array& dy_in, const py::array& x_in,
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
  const FusedBackward fused = backward_epilogue(function, fused_args, x, x.view);
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output({channels_of(x.view)});
    dbias = vector_output({channels_of(x.view)});
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
  return backward_result(dx.array, or_none(dweight), or_none(dbias), fused);
}

// ---------------------------------------------------------------------------------------------
// instance_norm, layer_norm

// The (N, C) statistics of an instance_norm call (one per instance, as group_norm's (N, G) with
// G = C; torch has no native op that returns them).
Shape instance_stats_shape(const TensorView& x) { return {batch_of(x), channels_of(x)}; }

py::tuple instance_norm_forward_impl(const char* function, const py::array& x_in,
                                     const OptionalArray& running_mean_in,
                                     const OptionalArray& running_var_in,
                                     const OptionalArray& weight_in, const OptionalArray& bias_in,
                                     bool use_input_stats, double momentum, double eps,
                                     const py::object& activation,
                                     const OptionalArray& residual) {
  const Activation x = activation_input(function, "x", x_in);
  const std::span<float> running_mean =
      running_stat(function, "running_mean", running_mean_in, use_input_stats);
  const std::span<float> running_var =
      running_stat(function, "running_var", running_var_in, use_input_stats);
  const VectorIn weight = vector_input(function, "weight", weight_in);
  const VectorIn bias = vector_input(function, "bias", bias_in);
  const normkit::InstanceNormParams params{
      use_input_stats, momentum, eps,
      forward_epilogue(function, activation, residual, x, x.view)};
  const Activation y = activation_output(x);
  const VectorOut mean = vector_output(instance_stats_shape(x.view));
  const VectorOut rstd = vector_output(instance_stats_shape(x.view));
  without_gil([&] {
    normkit::instance_norm_forward(params, x.view, weight.span, bias.span, running_mean,
                                   running_var, y.view, mean.span, rstd.span);
  });
  return py::make_tuple(y.array, mean.array, rstd.array);
}

// A saved statistic passed back to a backward: float32 of exactly `expected` shape (checked
// only once the op accepts x, so that a bad x is reported as such), read flattened.
VectorIn saved_stat(const char* function, const char* name, const py::array& a,
                    const Shape& expected, const char* expected_name, bool check_shape) {
  require_float32(function, name, a);
  if (check_shape && shape_of(a) != expected)
    value_error(function, std::string(name) + " has shape " + shape_string(shape_of(a)) +
                              ", expected " + expected_name + " = " + shape_string(expected));
  py::array c = contiguous(a);
  return {c, {static_cast<const float*>(c.data()), static_cast<std::size_t>(c.size())}};
}

py::tuple instance_norm_backward_impl(const py::array& dy_in, const py::array& x_in,
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
  const FusedBackward fused = backward_epilogue(function, fused_args, x, x.view);
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
    const VectorOut mean_out = vector_output(stats_shape);
    const VectorOut rstd_out = vector_output(stats_shape);
    for (int64_t n = 0; n < batch_of(x.view); ++n)
      for (int64_t c = 0; c < channels; ++c) {
        mean_out.span[n * channels + c] = running_mean.span[c];
        rstd_out.span[n * channels + c] =
            float(1.0 / std::sqrt(double(running_var.span[c]) + eps));
      }
    mean = {mean_out.array, mean_out.span};
    rstd = {rstd_out.array, rstd_out.span};
  }
  const Activation dx = activation_output(x);
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output({channels_of(x.view)});
    dbias = vector_output({channels_of(x.view)});
  }
  normkit::InstanceNormBackwardParams params;
  params.use_input_stats = use_input_stats;
  params.epilogue = fused.epilogue;
  without_gil([&] {
    normkit::instance_norm_backward(params, dy.view, x.view, mean.span, rstd.span, weight.span,
                                    dx.view, dweight.span, dbias.span);
  });
  return backward_result(dx.array, or_none(dweight), or_none(dbias), fused);
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
  require_float32(function, name, *a);
  if (shape_of(*a) != normalized)
    value_error(function, std::string(name) + " has shape " + shape_string(shape_of(*a)) +
                              ", expected normalized_shape " + shape_string(normalized));
  py::array flat = contiguous(*a).attr("reshape")(-1);
  return {flat, {static_cast<const float*>(flat.data()), static_cast<std::size_t>(flat.size())}};
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

LayerNormProblem layer_norm_problem(const char* function, const py::array& x_in,
                                    const py::object& normalized_shape_in) {
  LayerNormProblem p;
  p.normalized = normalized_shape_of(function, normalized_shape_in);
  activation_dtype(function, "x", x_in);
  p.shape = shape_of(x_in);
  const int rank = static_cast<int>(p.shape.size());
  const int normalized_ndim = static_cast<int>(p.normalized.size());
  if (normalized_ndim > rank ||
      !std::equal(p.normalized.begin(), p.normalized.end(), p.shape.end() - normalized_ndim))
    value_error(function, "x shape " + shape_string(p.shape) +
                              " does not end with normalized_shape " +
                              shape_string(p.normalized));
  p.x = activation_input(function, "x", x_in);
  const bool last_ok = normalized_ndim == rank - 1 && rank <= normkit::kMaxRank;
  if (p.x.view.format == MemoryFormat::channels_last && !last_ok)
    p.x = activation_input(function, "x", x_in, MemoryFormat::channels_first);
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

py::tuple layer_norm_forward_impl(const char* function, const py::array& x_in,
                                  const py::object& normalized_shape_in,
                                  const OptionalArray& weight_in, const OptionalArray& bias_in,
                                  double eps, const py::object& activation,
                                  const OptionalArray& residual) {
  const LayerNormProblem p = layer_norm_problem(function, x_in, normalized_shape_in);
  const VectorIn weight = layer_norm_param(function, "weight", weight_in, p.normalized);
  const VectorIn bias = layer_norm_param(function, "bias", bias_in, p.normalized);
  const normkit::LayerNormParams params{
      p.kernel_normalized_ndim, eps,
      forward_epilogue(function, activation, residual, p.x, p.x.view)};
  // y has x's full shape and format; the kernel sees it through x's (possibly folded) view.
  py::array y = new_output(p.x.array.dtype(), p.shape, p.x.view.format);
  const TensorView y_view = p.like_x(y.mutable_data());
  const VectorOut mean = vector_output(p.stats_shape());
  const VectorOut rstd = vector_output(p.stats_shape());
  without_gil([&] {
    normkit::layer_norm_forward(params, p.x.view, weight.span, bias.span, y_view, mean.span,
                                rstd.span);
  });
  return py::make_tuple(y, mean.array, rstd.array);
}

py::tuple layer_norm_backward_impl(const py::array& dy_in, const py::array& x_in,
                                   const py::object& normalized_shape_in,
                                   const py::array& mean_in, const py::array& rstd_in,
                                   const OptionalArray& weight_in,
                                   const BackwardEpilogueArgs& fused_args) {
  const char* function = "layer_norm_backward";
  const LayerNormProblem p = layer_norm_problem(function, x_in, normalized_shape_in);
  const Activation dy = activation_input(function, "dy", dy_in, p.x.view.format);
  // dy is seen through x's view (folded or not), so its shape and dtype are checked here.
  if (shape_of(dy.array) != p.shape)
    value_error(function, "dy has shape " + shape_string(shape_of(dy.array)) +
                              ", expected x's shape " + shape_string(p.shape));
  if (dy.view.dtype != p.x.view.dtype)
    type_error(function, "dy has dtype " + dtype_name(dy.array) + ", expected x's dtype " +
                             dtype_name(p.x.array));
  const Shape stats_shape = p.stats_shape();
  const VectorIn mean = saved_stat(function, "mean", mean_in, stats_shape,
                                   "x's leading dims then 1s", true);
  const VectorIn rstd = saved_stat(function, "rstd", rstd_in, stats_shape,
                                   "x's leading dims then 1s", true);
  const VectorIn weight = layer_norm_param(function, "weight", weight_in, p.normalized);
  const FusedBackward fused = backward_epilogue(function, fused_args, p.x, p.x.view);
  py::array dx = new_output(p.x.array.dtype(), p.shape, p.x.view.format);
  const TensorView dx_view = p.like_x(dx.mutable_data());
  const TensorView dy_view = p.like_x(const_cast<void*>(dy.array.data()));
  VectorOut dweight, dbias;
  if (weight.present()) {
    dweight = vector_output(p.normalized);
    dbias = vector_output(p.normalized);
  }
  normkit::LayerNormBackwardParams params;
  params.normalized_ndim = p.kernel_normalized_ndim;
  params.epilogue = fused.epilogue;
  without_gil([&] {
    normkit::layer_norm_backward(params, dy_view, p.x.view, mean.span, rstd.span, weight.span,
                                 dx_view, dweight.span, dbias.span);
  });
  return backward_result(dx, or_none(dweight), or_none(dbias), fused);
}

}  // namespace

// Keyword-only arguments of every forward and backward: the fused epilogue (epilogue.h).
#define FORWARD_EPILOGUE_ARGS \
  py::kw_only(), py::arg("activation") = py::none(), py::arg("residual") = py::none()
#define BACKWARD_EPILOGUE_ARGS                                                    \
  py::kw_only(), py::arg("activation") = py::none(), py::arg("y") = py::none(), \
      py::arg("residual_grad") = false
#define FORWARD_EPILOGUE_DOC                                                                     \
  "\n\nKeyword-only, fused into the same pass over memory: activation (None or 'relu') and\n"   \
  "residual (None, or an array exactly like x: its shape and dtype, laid out in the memory\n"     \
  "format x is computed in; it is never copied). The result is\n"                               \
  "activation(normalized + residual)."
#define BACKWARD_EPILOGUE_DOC                                                                    \
  "\n\nKeyword-only, for a forward that fused an epilogue: activation as passed to the\n"       \
  "forward; y, the forward's output (exactly like x), required with 'relu', whose mask y > 0\n"  \
  "it reads; residual_grad=True also returns the residual's gradient, a new array like x, as\n"  \
  "a fourth element: (dx, dweight, dbias, dresidual). The gradient of the normalization is\n"    \
  "then taken with respect to g = dy * (y > 0) for 'relu', else dy, and dresidual = g."

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

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const normkit::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def(
      "group_norm",
      [](const py::array& x, int64_t num_groups, const OptionalArray& weight,
         const OptionalArray& bias, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return group_norm_forward_impl("group_norm", x, num_groups, weight, bias, eps,
                                       activation, residual)[0]
            .cast<py::array>();
      },
      py::arg("x"), py::arg("num_groups"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(Group normalization (torch.nn.functional.group_norm).

x: (N, C, *spatial) float32, 0-3 spatial dims; C must be divisible by num_groups.
For each sample and group of C/num_groups channels: y = (x - mean) / sqrt(var + eps)
(biased variance over the group's channels and positions), then y * weight[c] + bias[c]
when weight / bias (float32, length C) are given. Returns y, a new array in x's memory format.)doc" FORWARD_EPILOGUE_DOC);

  m.def("group_norm_forward", [](const py::array& x, int64_t num_groups,
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
arrays of shape (N, num_groups), as torch.native_group_norm returns them.)doc" FORWARD_EPILOGUE_DOC);

  m.def("group_norm_backward",
        [](const py::array& dy, const py::array& x, const py::array& mean, const py::array& rstd,
           int64_t num_groups, const OptionalArray& weight, const py::object& activation,
           const OptionalArray& y, bool residual_grad) {
          return group_norm_backward_impl(dy, x, mean, rstd, num_groups, weight,
                                          {activation, y, residual_grad});
        },
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("num_groups"),
        py::arg("weight") = py::none(), BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of group_norm.

dy: the gradient of the loss with respect to y (x's shape; any strides). x, mean, rstd,
num_groups and weight as passed to / returned by group_norm_forward.
Returns (dx, dweight, dbias): dx has x's shape and memory format; dweight and dbias (float32,
length C) are None when weight is None.)doc" BACKWARD_EPILOGUE_DOC);

  m.def("batch_norm", [](const py::array& x, const OptionalArray& running_mean,
                         const OptionalArray& running_var, const OptionalArray& weight,
                         const OptionalArray& bias, bool training, double momentum,
                         double eps, const py::object& activation,
                         const OptionalArray& residual) {
        return batch_norm_forward_impl("batch_norm", x, running_mean, running_var, weight, bias,
                                       training, momentum, eps, activation, residual)[0]
            .cast<py::array>();
      },
      py::arg("x"), py::arg("running_mean"), py::arg("running_var"),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(), py::arg("training") = false,
      py::arg("momentum") = 0.1, py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(Batch normalization (torch.nn.functional.batch_norm).

x: (N, C, *spatial) float32. running_mean, running_var: float32 arrays of length C, or None.
training=True: normalizes each channel with its batch mean and biased variance over N and the
spatial positions (needs more than one value per channel), and, when running statistics are
given, updates them in place (they must then be writable and contiguous):
    running_mean = (1 - momentum) * running_mean + momentum * mean
    running_var  = (1 - momentum) * running_var  + momentum * unbiased variance
training=False: normalizes with running_mean and running_var, which are then required.
weight and bias (length C) are optional. Returns y, a new array in x's memory format.)doc" FORWARD_EPILOGUE_DOC);

  m.def("batch_norm_forward", [](const py::array& x, const OptionalArray& running_mean,
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
arrays, as torch.native_batch_norm (the backward then reads the running statistics).)doc" FORWARD_EPILOGUE_DOC);

  m.def("batch_norm_backward",
        [](const py::array& dy, const py::array& x, const OptionalArray& weight,
           const OptionalArray& save_mean, const OptionalArray& save_invstd, bool training,
           const OptionalArray& running_mean, const OptionalArray& running_var, double eps,
           const py::object& activation, const OptionalArray& y, bool residual_grad) {
          return batch_norm_backward_impl(dy, x, weight, save_mean, save_invstd, training,
                                          running_mean, running_var, eps,
                                          {activation, y, residual_grad});
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
length C) are None when weight is None.)doc" BACKWARD_EPILOGUE_DOC);

  m.def(
      "instance_norm",
      [](const py::array& x, const OptionalArray& running_mean, const OptionalArray& running_var,
         const OptionalArray& weight, const OptionalArray& bias, bool use_input_stats,
         double momentum, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return instance_norm_forward_impl("instance_norm", x, running_mean, running_var, weight,
                                          bias, use_input_stats, momentum, eps, activation,
                                          residual)[0]
            .cast<py::array>();
      },
      py::arg("x"), py::arg("running_mean") = py::none(), py::arg("running_var") = py::none(),
      py::arg("weight") = py::none(), py::arg("bias") = py::none(),
      py::arg("use_input_stats") = true, py::arg("momentum") = 0.1, py::arg("eps") = 1e-5,
      FORWARD_EPILOGUE_ARGS,
      R"doc(Instance normalization (torch.nn.functional.instance_norm).

x: (N, C, *spatial) float32. use_input_stats=True: each (sample, channel) is normalized over its
spatial positions (more than one needed); given running statistics (length C, writable,
contiguous) are updated in place with the batch averages of the per-instance mean and unbiased
variance, weighted by momentum. use_input_stats=False: normalizes with running_mean and
running_var, which are then required. weight and bias (length C) are optional.
Returns y, a new array in x's memory format.)doc" FORWARD_EPILOGUE_DOC);

  m.def(
      "instance_norm_forward",
      [](const py::array& x, const OptionalArray& running_mean, const OptionalArray& running_var,
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
repeated for each sample.)doc" FORWARD_EPILOGUE_DOC);

  m.def("instance_norm_backward",
        [](const py::array& dy, const py::array& x, const OptionalArray& save_mean,
           const OptionalArray& save_rstd, const OptionalArray& weight, bool use_input_stats,
           const OptionalArray& running_mean, const OptionalArray& running_var, double eps,
           const py::object& activation, const OptionalArray& y, bool residual_grad) {
          return instance_norm_backward_impl(dy, x, save_mean, save_rstd, weight,
                                             use_input_stats, running_mean, running_var, eps,
                                             {activation, y, residual_grad});
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
length C) are None when weight is None.)doc" BACKWARD_EPILOGUE_DOC);

  m.def(
      "layer_norm",
      [](const py::array& x, const py::object& normalized_shape, const OptionalArray& weight,
         const OptionalArray& bias, double eps, const py::object& activation,
         const OptionalArray& residual) {
        return layer_norm_forward_impl("layer_norm", x, normalized_shape, weight, bias, eps,
                                       activation, residual)[0]
            .cast<py::array>();
      },
      py::arg("x"), py::arg("normalized_shape"), py::arg("weight") = py::none(),
      py::arg("bias") = py::none(), py::arg("eps") = 1e-5, FORWARD_EPILOGUE_ARGS,
      R"doc(Layer normalization (torch.nn.functional.layer_norm).

x: float32 or float16 of any rank whose trailing dims equal normalized_shape (an int or a sequence
of ints). Each slice over those dims is normalized with its mean and biased variance, then
multiplied by weight and shifted by bias (optional, float32, both of shape normalized_shape);
float16 is computed in float32 inside. Returns y, a new array of x's dtype; a channels-last x keeps
its format when normalized_shape covers every dim but N.)doc" FORWARD_EPILOGUE_DOC);

  m.def(
      "layer_norm_forward",
      [](const py::array& x, const py::object& normalized_shape, const OptionalArray& weight,
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
normalized_shape (4, 5): (2, 3, 1, 1)), as torch.native_layer_norm returns them.)doc" FORWARD_EPILOGUE_DOC);

  m.def("layer_norm_backward",
        [](const py::array& dy, const py::array& x, const py::object& normalized_shape,
           const py::array& mean, const py::array& rstd, const OptionalArray& weight,
           const py::object& activation, const OptionalArray& y, bool residual_grad) {
          return layer_norm_backward_impl(dy, x, normalized_shape, mean, rstd, weight,
                                          {activation, y, residual_grad});
        },
        py::arg("dy"), py::arg("x"), py::arg("normalized_shape"), py::arg("mean"),
        py::arg("rstd"), py::arg("weight") = py::none(), BACKWARD_EPILOGUE_ARGS,
        R"doc(Gradients of layer_norm.

dy: the gradient with respect to y (x's shape and dtype; any strides). x, normalized_shape,
mean, rstd (the shape layer_norm_forward returns them in, e.g. torch.native_layer_norm's) and
weight as passed to / returned by layer_norm_forward.
Returns (dx, dweight, dbias): dx has x's shape, dtype and the memory format y had; dweight and
dbias (float32, of shape normalized_shape) are None when weight is None.)doc" BACKWARD_EPILOGUE_DOC);

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
