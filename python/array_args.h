#pragma once
// The conversions and checks from Python arguments to the library's views that every extension
// module of the package shares (normkit._normkit and normkit._mpi): one rule and one message
// for each argument. See normkit_module.cpp for the memory-format rules.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments

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

#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit::python {

namespace py = pybind11;
using normkit::DType;
using normkit::MemoryFormat;
using normkit::TensorView;

using Shape = std::vector<py::ssize_t>;
using OptionalArray = std::optional<py::array>;

// Tests turn this on so that an output element a kernel forgets to write shows up as NaN.
inline bool g_poison_outputs = false;

[[noreturn]] inline void type_error(const char* function, const std::string& message) {
  throw py::type_error(std::string(function) + ": " + message);
}
[[noreturn]] inline void value_error(const char* function, const std::string& message) {
  throw py::value_error(std::string(function) + ": " + message);
}

inline std::string dtype_name(const py::array& a) {
  return py::str(a.dtype()).cast<std::string>();
}

inline std::string shape_string(const Shape& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  s += shape.size() == 1 ? ",)" : ")";
  return s;
}
inline Shape shape_of(const py::array& a) { return Shape(a.shape(), a.shape() + a.ndim()); }

inline bool native_byte_order(const py::dtype& dt) {
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

inline DType activation_dtype(const char* function, const char* name, const py::array& a) {
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
inline void require_float32(const char* function, const char* name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (dt.char_() != 'f' || !native_byte_order(dt))
    type_error(function, std::string(name) + " has dtype " + dtype_name(a) + ", expected float32");
}

// ---------------------------------------------------------------------------------------------
// Memory formats.

inline bool is_aligned(const py::array& a) {
  return (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
}

// Dims from outermost to innermost in memory.
inline std::vector<int> dim_order(int rank, MemoryFormat format) {
  std::vector<int> order(rank);
  std::iota(order.begin(), order.end(), 0);
  if (format == MemoryFormat::channels_last && rank >= 3) {
    std::rotate(order.begin() + 1, order.begin() + 2, order.end());  // N, *spatial, C
  }
  return order;
}

// Byte strides of a dense array of `shape` in `format` (as torch computes them: a zero-size dim
// counts as 1, so an empty channels-last tensor still has channels-last strides).
inline Shape dense_strides(const Shape& shape, MemoryFormat format, py::ssize_t itemsize) {
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
inline bool dense_in(const py::array& a, MemoryFormat format, bool ignore_unit_dims) {
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
inline std::optional<MemoryFormat> dense_format(const py::array& a) {
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
inline py::array allocate(const py::dtype& dtype, const Shape& shape, MemoryFormat format) {
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
inline py::array new_output(const py::dtype& dtype, const Shape& shape, MemoryFormat format) {
  py::array out = allocate(dtype, shape, format);
  if (g_poison_outputs) out.attr("fill")(std::numeric_limits<double>::quiet_NaN());
  return out;
}

inline py::array copy_to_format(const py::array& a, MemoryFormat format) {
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

inline TensorView view_of(const py::array& a, void* data, DType dtype, MemoryFormat format) {
  std::vector<int64_t> shape(a.shape(), a.shape() + a.ndim());
  return TensorView(data, dtype, static_cast<int>(a.ndim()), shape.data(), format);
}

// x-like input. With `format`, the array is brought to that format (dy follows x's); without,
// it keeps its own if it has one, else it is copied to channels-first.
inline Activation activation_input(const char* function, const char* name, py::array a,
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
inline Activation activation_output(const Activation& like) {
  py::array out = new_output(like.array.dtype(), shape_of(like.array), like.view.format);
  return {out, view_of(out, out.mutable_data(), like.view.dtype, like.view.format)};
}

// Contiguous, aligned, native: what a std::span can point into. Copies only when needed.
inline py::array contiguous(const py::array& a) {
  return py::array::ensure(a, static_cast<int>(py::array::c_style) |
                                   static_cast<int>(py::detail::npy_api::NPY_ARRAY_ALIGNED_));
}

// An optional read-only float32 vector (weight, bias, saved statistics): a 1-D array, or None.
struct VectorIn {
  py::array array;
  std::span<const float> span;  // data() == nullptr: absent
  bool present() const { return span.data() != nullptr; }
};

inline VectorIn vector_input(const char* function, const char* name, const OptionalArray& a) {
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
inline std::span<float> running_stat(const char* function, const char* name,
                                     const OptionalArray& a, bool written) {
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

inline VectorOut vector_output(const Shape& shape) {
  py::array out = new_output(py::dtype::of<float>(), shape, MemoryFormat::channels_first);
  return {out, {static_cast<float*>(out.mutable_data()), static_cast<std::size_t>(out.size())}};
}

inline py::object or_none(const VectorOut& v) {
  return v.span.data() ? py::object(v.array) : py::object(py::none());
}

inline int64_t channels_of(const TensorView& x) { return x.rank >= 2 ? x.shape[1] : 0; }
inline int64_t batch_of(const TensorView& x) { return x.rank >= 1 ? x.shape[0] : 0; }

// Run a kernel without the GIL: the arrays it touches are held by the caller's locals.
template <typename F>
void without_gil(F&& kernel) {
  py::gil_scoped_release release;
  kernel();
}

// normkit::Error -> ValueError, in whichever module registers it.
inline void register_error_translator() {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const normkit::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
}

}  // namespace normkit::python
