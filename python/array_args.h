#pragma once
// The conversions and checks from Python arguments to the library's views that every extension
// module of the package shares (normkit._normkit and normkit._mpi): one rule and one message
// for each argument.
//
// Tensors come as NumPy arrays or as any object with __dlpack__ / __dlpack_device__ (CPU
// memory). Activations (x, dy) may come in either memory format: a tensor whose strides are
// those of a channels-last tensor (NLC, NHWC, NDHWC memory seen as (N, C, *spatial)) is computed
// channels-last and its outputs get the same strides; a C-contiguous one is computed
// channels-first. A NumPy array with any other strides is copied to C-contiguous first; a
// DLPack tensor never is (other strides are an error), so its memory is the kernels'. Results
// are new tensors of the kind x is: NumPy arrays for NumPy, torch tensors for torch (handed over
// through DLPack), DLPackTensor objects for other producers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // std::optional arguments

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <dlpack/dlpack.h>  // Debian: libdlpack-dev
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit::python {

namespace py = pybind11;
using normkit::DType;
using normkit::MemoryFormat;
using normkit::TensorView;

using Shape = std::vector<py::ssize_t>;
// A tensor argument that may be None: a NumPy array, a DLPack producer, or what NumPy can make
// an array of.
using OptionalArray = std::optional<py::object>;

// Tests turn this on so that an output element a kernel forgets to write shows up as NaN.
inline bool g_poison_outputs = false;

[[noreturn]] inline void type_error(const char* function, const std::string& message) {
  throw py::type_error(std::string(function) + ": " + message);
}
[[noreturn]] inline void value_error(const char* function, const std::string& message) {
  throw py::value_error(std::string(function) + ": " + message);
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

inline bool native_byte_order(const py::dtype& dt) {
  constexpr char native = std::endian::native == std::endian::little ? '<' : '>';
  return dt.byteorder() == '=' || dt.byteorder() == '|' || dt.byteorder() == native;
}

// ---------------------------------------------------------------------------------------------
// Element types.

// Activation dtypes (x, dy, and y/dx, which take x's) handed to the kernels, by NumPy's type
// character and DLPack's type. Supporting another dtype is one more row, once the kernels
// implement it. float32 is also the type of every parameter and statistic.
struct ElementType {
  DType dtype;
  char numpy_char;  // 0: NumPy has no such dtype
  uint8_t dlpack_code;
  uint8_t bits;
};
inline constexpr ElementType kActivationTypes[] = {
    {DType::float32, 'f', kDLFloat, 32},
    {DType::float16, 'e', kDLFloat, 16},
    {DType::bfloat16, 0, kDLBfloat, 16},  // from DLPack producers only
};

inline const ElementType& element_type(DType dtype) {
  for (const ElementType& t : kActivationTypes)
    if (t.dtype == dtype) return t;
  throw std::logic_error("unlisted dtype");
}

// ---------------------------------------------------------------------------------------------
// Tensors from Python: NumPy arrays and DLPack producers.

// Who made a tensor, and so what the results of a call on it are returned as.
enum class Producer { numpy, torch, dlpack };

// A tensor argument's memory and layout, whoever made it.
struct Tensor {
  py::object value;  // what Python passed (or, for an output, what Python gets)
  py::object owner;  // keeps `data` alive: the array, or the consumed DLPack capsule
  Producer producer = Producer::numpy;
  void* data = nullptr;
  std::optional<DType> dtype;  // one of kActivationTypes, if it is
  // The element type as the producer describes it, named only for messages (NumPy's name
  // costs a call into Python).
  py::object numpy_dtype;
  DLDataType dlpack_dtype{};
  py::ssize_t itemsize = 0;
  Shape shape, strides;  // strides in bytes
  bool aligned = true;
  bool writable = true;

  py::ssize_t ndim() const { return static_cast<py::ssize_t>(shape.size()); }
  py::ssize_t size() const {
    return std::accumulate(shape.begin(), shape.end(), py::ssize_t{1}, std::multiplies<>());
  }
  py::array array() const { return py::reinterpret_borrow<py::array>(owner); }
  std::string dtype_name() const;
};

inline Tensor from_numpy(const py::array& a) {
  Tensor t;
  t.value = t.owner = a;
  t.data = const_cast<void*>(a.data());
  const py::dtype dt = a.dtype();
  if (native_byte_order(dt))
    for (const ElementType& e : kActivationTypes)
      if (e.numpy_char && dt.char_() == e.numpy_char) t.dtype = e.dtype;
  t.numpy_dtype = dt;
  t.itemsize = a.itemsize();
  t.shape.assign(a.shape(), a.shape() + a.ndim());
  t.strides.assign(a.strides(), a.strides() + a.ndim());
  t.aligned = (a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0;
  t.writable = a.writeable();
  return t;
}

inline std::string dlpack_type_name(const DLDataType& t) {
  static const char* const names[] = {"int",    "uint",    "float", "handle",
                                      "bfloat", "complex", "bool"};
  std::string s = t.code < std::size(names) ? names[t.code] : "code " + std::to_string(t.code);
  s += std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

// Objects kept for the process: torch's Tensor type and DLPack functions, once torch is loaded
// (a torch tensor can only come from a process that imported torch). Each is looked up under the
// GIL into a plain pointer, not a function-local static: the static's guard, held across a call
// into Python, could deadlock with a thread waiting for the GIL (two threads may both look it
// up; one reference then leaks, once).
inline PyObject* torch_attribute(const char* module, const char* name) {
  PyObject* m = PyImport_ImportModule(module);
  if (!m) throw py::error_already_set();
  PyObject* attr = PyObject_GetAttrString(m, name);
  Py_DECREF(m);
  if (!attr) throw py::error_already_set();
  return attr;
}

inline bool is_torch_tensor(const py::handle& obj) {
  static PyObject* tensor_type = nullptr;
  if (!tensor_type) {
    if (!PyDict_GetItemString(PyImport_GetModuleDict(), "torch")) return false;
    tensor_type = torch_attribute("torch", "Tensor");
  }
  return PyObject_IsInstance(obj.ptr(), tensor_type) == 1;
}

// torch's function from a DLPack capsule to a tensor: torch.utils.dlpack.from_dlpack calls it
// after a check for __dlpack__, a Python frame that would cost as much as the rest of a small
// call; the public function where torch lacks it.
inline PyObject* torch_capsule_importer() {
  PyObject* c = PyImport_ImportModule("torch._C");
  if (c) {
    PyObject* f = PyObject_GetAttrString(c, "_from_dlpack");
    Py_DECREF(c);
    if (f) return f;
  }
  PyErr_Clear();
  return torch_attribute("torch.utils.dlpack", "from_dlpack");
}

// The capsule's tensor, which this call consumes (DLPack's protocol: renamed, so that the
// producer's capsule no longer frees it; the returned owner calls its deleter).
inline py::object consume_capsule(const char* function, const char* name, const py::object& capsule,
                           DLManagedTensor** managed) {
  if (!PyCapsule_IsValid(capsule.ptr(), "dltensor"))
    type_error(function, std::string(name) + ": __dlpack__ did not return a DLPack capsule");
  *managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"));
  PyCapsule_SetName(capsule.ptr(), "used_dltensor");
  return py::capsule(*managed, [](void* p) {
    auto* m = static_cast<DLManagedTensor*>(p);
    if (m->deleter) m->deleter(m);
  });
}

inline Tensor from_dlpack(const char* function, const char* name, const py::object& obj,
                   Producer producer) {
  Tensor t;
  t.value = obj;
  t.producer = producer;
  py::object capsule;
  if (producer == Producer::torch) {
    // torch exports no tensor that requires grad; the ops only read parameters (their
    // gradients are the backward's outputs), so a detached view of the same memory is right.
    static PyObject* to_dlpack = nullptr;
    if (!to_dlpack) to_dlpack = torch_attribute("torch.utils.dlpack", "to_dlpack");
    py::object source = obj;
    if (PyObject_IsTrue(obj.attr("requires_grad").ptr())) source = obj.attr("detach")();
    capsule = py::reinterpret_borrow<py::object>(to_dlpack)(source);
  } else {
    // Ask for the device first: a producer on another device may not export without a stream.
    const py::tuple device = obj.attr("__dlpack_device__")();
    if (device.size() < 1 || device[0].cast<int>() != kDLCPU)
      value_error(function, std::string(name) + " is on DLPack device " +
                                py::repr(device).cast<std::string>() +
                                "; normkit computes on the CPU (device type 1)");
    capsule = obj.attr("__dlpack__")();
  }
  DLManagedTensor* managed = nullptr;
  t.owner = consume_capsule(function, name, capsule, &managed);
  const DLTensor& dl = managed->dl_tensor;
  if (dl.device.device_type != kDLCPU)
    value_error(function, std::string(name) + " is on device " +
                              py::str(obj.attr("device")).cast<std::string>() +
                              "; normkit computes on the CPU: move it there first (.cpu())");
  for (const ElementType& e : kActivationTypes)
    if (dl.dtype.code == e.dlpack_code && dl.dtype.bits == e.bits && dl.dtype.lanes == 1)
      t.dtype = e.dtype;
  t.dlpack_dtype = dl.dtype;
  t.itemsize = std::max<py::ssize_t>(dl.dtype.bits / 8, 1) * dl.dtype.lanes;
  t.data = static_cast<char*>(dl.data) + dl.byte_offset;
  t.shape.assign(dl.shape, dl.shape + dl.ndim);
  t.strides.resize(dl.ndim);
  py::ssize_t step = t.itemsize;
  for (int d = dl.ndim - 1; d >= 0; --d) {
    t.strides[d] = dl.strides ? dl.strides[d] * t.itemsize : step;
    step *= t.shape[d];
  }
  t.aligned = reinterpret_cast<std::uintptr_t>(t.data) % t.itemsize == 0;
  return t;
}

inline std::string Tensor::dtype_name() const {
  return numpy_dtype ? py::str(numpy_dtype).cast<std::string>() : dlpack_type_name(dlpack_dtype);
}

inline Tensor tensor_arg(const char* function, const char* name, const py::object& obj) {
  if (py::isinstance<py::array>(obj)) return from_numpy(py::reinterpret_borrow<py::array>(obj));
  if (is_torch_tensor(obj)) return from_dlpack(function, name, obj, Producer::torch);
  if (py::hasattr(obj, "__dlpack__")) return from_dlpack(function, name, obj, Producer::dlpack);
  // What NumPy can make an array of (a nested list, a scalar), as NumPy arguments always were.
  py::array a = py::array::ensure(obj);
  if (!a)
    type_error(function, std::string(name) +
                             " must be a NumPy array or a tensor with __dlpack__ (e.g. a "
                             "torch.Tensor), got " +
                             py::str(py::type::handle_of(obj)).cast<std::string>());
  return from_numpy(a);
}

// ---------------------------------------------------------------------------------------------
// dtypes.

inline DType activation_dtype(const char* function, const char* name, const Tensor& t) {
  if (t.dtype) return *t.dtype;
  std::string supported;
  for (const ElementType& e : kActivationTypes)
    supported += std::string(supported.empty() ? "" : ", ") + normkit::to_string(e.dtype) +
                 (e.numpy_char ? "" : " (DLPack only)");
  type_error(function, std::string(name) + " has dtype " + t.dtype_name() + "; supported: " +
                           supported);
}

// Parameters and statistics are float32 whatever the activation dtype.
inline void require_float32(const char* function, const char* name, const Tensor& t) {
  if (t.dtype != DType::float32)
    type_error(function, std::string(name) + " has dtype " + t.dtype_name() + ", expected float32");
}

// ---------------------------------------------------------------------------------------------
// Memory formats.

// Dims from outermost to innermost in memory.
inline std::vector<int> dim_order(int rank, MemoryFormat format) {
  std::vector<int> order(rank);
  std::iota(order.begin(), order.end(), 0);
  if (format == MemoryFormat::channels_last && rank >= 3) {
    std::rotate(order.begin() + 1, order.begin() + 2, order.end());  // N, *spatial, C
  }
  return order;
}

// Byte strides of a dense tensor of `shape` in `format` (as torch computes them: a zero-size dim
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

// Whether `t` is laid out densely in `format`. `ignore_unit_dims`: a dim of extent 1 never
// moves, so its stride may be anything (NumPy and torch both produce such tensors).
inline bool dense_in(const Tensor& t, MemoryFormat format, bool ignore_unit_dims) {
  const Shape expected = dense_strides(t.shape, format, t.itemsize);
  for (py::ssize_t d = 0; d < t.ndim(); ++d) {
    if (ignore_unit_dims && t.shape[d] <= 1) continue;
    if (t.strides[d] != expected[d]) return false;
  }
  return true;
}

// The format `t` can be computed in without a copy, if any. Exact strides decide first, so a
// tensor that is dense in both (C == 1, or all spatial dims 1) keeps the strides it came with.
inline std::optional<MemoryFormat> dense_format(const Tensor& t) {
  if (!t.aligned) return std::nullopt;
  const bool may_be_last = t.ndim() >= 3;
  for (bool ignore_unit_dims : {false, true}) {
    if (dense_in(t, MemoryFormat::channels_first, ignore_unit_dims))
      return MemoryFormat::channels_first;
    if (may_be_last && dense_in(t, MemoryFormat::channels_last, ignore_unit_dims))
      return MemoryFormat::channels_last;
  }
  if (t.size() == 0) return MemoryFormat::channels_first;
  return std::nullopt;
}

inline std::string strides_string(const Tensor& t) { return shape_string(t.strides); }

// A DLPack tensor is never copied: one the kernels cannot read where it lies is an error.
[[noreturn]] inline void not_dense(const char* function, const char* name, const Tensor& t,
                            const std::string& wanted) {
  value_error(function, std::string(name) + " of shape " + shape_string(t.shape) +
                            " has byte strides " + strides_string(t) +
                            (t.aligned ? "" : " (unaligned)") + ", which are not " + wanted +
                            "; normkit does not copy DLPack tensors: make it so first (torch: "
                            ".contiguous() or .contiguous(memory_format=torch.channels_last))");
}

// ---------------------------------------------------------------------------------------------
// Outputs, of the kind x is.

// The test hook's fill of a new output: NaN in the output's dtype.
inline void poison(void* data, py::ssize_t count, py::ssize_t itemsize) {
  if (itemsize == 4) {
    std::fill_n(static_cast<uint32_t*>(data), count, 0x7fc00000u);
  } else {
    // float16 and bfloat16 NaNs differ; a pattern that is NaN in both: 0x7fff.
    std::fill_n(static_cast<uint16_t*>(data), count, uint16_t{0x7fff});
  }
}

// Memory the module allocated for a DLPack consumer, shared by every capsule made of it.
struct Storage {
  std::shared_ptr<void> memory;
  std::vector<int64_t> shape, strides;  // strides in elements
  DLDataType dtype;
};

struct ManagerContext {
  Storage storage;
  DLManagedTensor managed;
};

// A fresh "dltensor" capsule for `s`; a consumer that takes it calls the deleter when done.
inline py::object dlpack_capsule(const Storage& s) {
  auto* ctx = new ManagerContext{s, {}};
  DLTensor& dl = ctx->managed.dl_tensor;
  dl.data = s.memory.get();
  dl.device = {kDLCPU, 0};
  dl.ndim = static_cast<int32_t>(s.shape.size());
  dl.dtype = s.dtype;
  dl.shape = ctx->storage.shape.data();
  dl.strides = ctx->storage.strides.data();
  dl.byte_offset = 0;
  ctx->managed.manager_ctx = ctx;
  ctx->managed.deleter = [](DLManagedTensor* m) {
    delete static_cast<ManagerContext*>(m->manager_ctx);
  };
  PyObject* capsule = PyCapsule_New(&ctx->managed, "dltensor", [](PyObject* c) {
    if (PyCapsule_IsValid(c, "dltensor")) {  // never consumed
      auto* m = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
      m->deleter(m);
    }
  });
  if (!capsule) {
    delete ctx;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

// What other DLPack producers get back: a tensor any DLPack consumer takes
// (numpy.from_dlpack, torch.from_dlpack, jax.dlpack.from_dlpack, ...).
struct DLPackTensor {
  Storage storage;
};

// A new output of `shape` in `format`, dense; its contents are undefined (NaN when poisoned).
// `kind`: the tensor whose producer decides what the output is returned as.
struct Output {
  py::object value;
  void* data = nullptr;
};

inline Output new_output(const Tensor& kind, DType dtype, const Shape& shape, MemoryFormat format) {
  const ElementType& type = element_type(dtype);
  const int rank = static_cast<int>(shape.size());
  if (format == MemoryFormat::channels_last && rank < 3) format = MemoryFormat::channels_first;
  Output out;
  py::ssize_t count = 1;
  for (py::ssize_t d : shape)
    if (__builtin_mul_overflow(count, d, &count))
      throw py::value_error("shape " + shape_string(shape) + " has more elements than int64 holds");
  const py::ssize_t itemsize = type.bits / 8;
  py::ssize_t bytes = 0;
  if (__builtin_mul_overflow(count, itemsize, &bytes))
    throw py::value_error("shape " + shape_string(shape) + " has more bytes than int64 holds");
  if (kind.producer == Producer::numpy) {
    // NumPy's own allocations are 16-byte aligned, and the kernels stream a large channels-last
    // output only where every row starts on a vector boundary (cpu/simd.h): the output is a view
    // from the first 64-byte boundary of a NumPy byte buffer 63 bytes longer (its base).
    const py::dtype dt = dtype == DType::float32 ? py::dtype::of<float>() : py::dtype("e");
    if (bytes > PTRDIFF_MAX - 63)
      throw py::value_error("shape " + shape_string(shape) + " has more bytes than int64 holds");
    py::array_t<std::uint8_t> buffer(bytes + 63);
    std::uint8_t* start = buffer.mutable_data();
    std::uint8_t* aligned = start + (64 - reinterpret_cast<std::uintptr_t>(start) % 64) % 64;
    py::array a(dt, shape, dense_strides(shape, format, itemsize), aligned, buffer);
    out = {a, a.mutable_data()};
  } else {
    // 64-byte aligned, as torch's own allocations are at least and the NumPy outputs above are
    // (aligned_alloc wants a multiple of the alignment, and an empty tensor still a pointer of
    // its own).
    const std::size_t rounded = (static_cast<std::size_t>(bytes) + 63) / 64 * 64;
    void* memory = std::aligned_alloc(64, std::max<std::size_t>(rounded, 64));
    if (!memory) {
      PyErr_Format(PyExc_MemoryError, "Unable to allocate %.2f GiB for an output of shape %s",
                   static_cast<double>(bytes) / (1 << 30), shape_string(shape).c_str());
      throw py::error_already_set();
    }
    Storage s{std::shared_ptr<void>(memory, std::free), {}, {}, {type.dlpack_code, type.bits, 1}};
    s.shape.assign(shape.begin(), shape.end());
    for (py::ssize_t stride : dense_strides(shape, format, itemsize))
      s.strides.push_back(stride / itemsize);
    if (kind.producer == Producer::torch) {
      static PyObject* from_dlpack = nullptr;
      if (!from_dlpack) from_dlpack = torch_capsule_importer();
      out = {py::reinterpret_borrow<py::object>(from_dlpack)(dlpack_capsule(s)), memory};
    } else {
      out = {py::cast(DLPackTensor{s}), memory};
    }
  }
  if (g_poison_outputs) poison(out.data, count, itemsize);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Arguments.

// An activation and the view the kernels see; `tensor` keeps the data alive.
struct Activation {
  Tensor tensor;
  TensorView view;
};

inline TensorView view_of(const Tensor& t, void* data, DType dtype, MemoryFormat format) {
  std::vector<int64_t> shape(t.shape.begin(), t.shape.end());
  return TensorView(data, dtype, static_cast<int>(t.ndim()), shape.data(), format);
}

inline py::array numpy_copy_to_format(const Tensor& t, MemoryFormat format) {
  const Output out = new_output(t, *t.dtype, t.shape, format);
  py::module_::import("numpy").attr("copyto")(out.value, t.array());
  return py::reinterpret_borrow<py::array>(out.value);
}

// x-like input. With `format`, the tensor is brought to that format (dy follows x's); without,
// it keeps its own if it has one, else it is copied to channels-first. Only NumPy arrays are
// copied; a DLPack tensor that would need it is an error.
inline Activation activation_input(const char* function, const char* name, Tensor t,
                            std::optional<MemoryFormat> format = std::nullopt) {
  const DType dtype = activation_dtype(function, name, t);
  MemoryFormat chosen = MemoryFormat::channels_first;
  if (format) {
    chosen = t.ndim() >= 3 ? *format : MemoryFormat::channels_first;
    const bool usable = t.aligned && (t.size() == 0 || dense_in(t, chosen, true));
    if (!usable) {
      if (t.producer != Producer::numpy)
        not_dense(function, name, t,
                  std::string("dense ") + normkit::to_string(chosen) + " as x is");
      t = from_numpy(numpy_copy_to_format(t, chosen));
    }
  } else if (std::optional<MemoryFormat> own = dense_format(t)) {
    chosen = *own;
  } else {
    if (t.producer != Producer::numpy)
      not_dense(function, name, t, "dense in either memory format");
    t = from_numpy(numpy_copy_to_format(t, MemoryFormat::channels_first));
  }
  return {t, view_of(t, t.data, dtype, chosen)};
}

inline Activation activation_input(const char* function, const char* name, const py::object& obj,
                            std::optional<MemoryFormat> format = std::nullopt) {
  return activation_input(function, name, tensor_arg(function, name, obj), format);
}

// A new output like `like` (shape, dtype, memory format, kind).
inline Activation activation_output(const Activation& like) {
  const Output out = new_output(like.tensor, like.view.dtype, like.tensor.shape, like.view.format);
  Tensor t = like.tensor;
  t.value = t.owner = out.value;
  t.data = out.data;
  t.strides = dense_strides(t.shape, like.view.format, t.itemsize);
  t.writable = true;
  return {t, view_of(t, out.data, like.view.dtype, like.view.format)};
}

// An optional read-only float32 vector (weight, bias, saved statistics), or None. Read as
// contiguous float32: a NumPy array is copied to that when it is not, a DLPack tensor must be.
struct VectorIn {
  py::object owner;
  std::span<const float> span;  // data() == nullptr: absent
  bool present() const { return span.data() != nullptr; }
};

inline bool c_contiguous(const Tensor& t) {
  return t.aligned && (t.size() == 0 || dense_in(t, MemoryFormat::channels_first, true));
}

inline VectorIn float32_input(const char* function, const char* name, const Tensor& t) {
  if (c_contiguous(t))
    return {t.owner, {static_cast<const float*>(t.data), static_cast<std::size_t>(t.size())}};
  if (t.producer != Producer::numpy) not_dense(function, name, t, "contiguous");
  py::array c = py::array::ensure(
      t.array(), static_cast<int>(py::array::c_style) |
                     static_cast<int>(py::detail::npy_api::NPY_ARRAY_ALIGNED_));
  return {c, {static_cast<const float*>(c.data()), static_cast<std::size_t>(c.size())}};
}

inline VectorIn vector_input(const char* function, const char* name, const OptionalArray& a) {
  if (!a) return {};
  const Tensor t = tensor_arg(function, name, *a);
  require_float32(function, name, t);
  if (t.ndim() != 1)
    value_error(function, std::string(name) + " must be 1-D, got shape " + shape_string(t.shape));
  return float32_input(function, name, t);
}

// A saved statistic passed back to a backward: float32 of exactly `expected` shape (checked
// only once the op accepts x, so that a bad x is reported as such), read flattened.
inline VectorIn saved_stat(const char* function, const char* name, const py::object& obj,
                    const Shape& expected, const char* expected_name, bool check_shape) {
  const Tensor t = tensor_arg(function, name, obj);
  require_float32(function, name, t);
  if (check_shape && t.shape != expected)
    value_error(function, std::string(name) + " has shape " + shape_string(t.shape) +
                              ", expected " + expected_name + " = " + shape_string(expected));
  return float32_input(function, name, t);
}

// An optional running statistic the kernel updates in place: it must be the caller's own
// memory, so nothing is copied; anything else is an error.
struct RunningStat {
  py::object owner;
  std::span<float> span;
};

inline RunningStat running_stat(const char* function, const char* name, const OptionalArray& a,
                         bool written) {
  if (!a) return {};
  const Tensor t = tensor_arg(function, name, *a);
  require_float32(function, name, t);
  if (t.ndim() != 1)
    value_error(function, std::string(name) + " must be 1-D, got shape " + shape_string(t.shape));
  if (!t.aligned || (t.size() > 1 && t.strides[0] != t.itemsize))
    value_error(function, std::string(name) +
                              " must be contiguous (it is updated in place), got strides " +
                              strides_string(t));
  if (written && !t.writable)
    value_error(function, std::string(name) + " must be writable (it is updated in place)");
  return {t.owner, {static_cast<float*>(t.data), static_cast<std::size_t>(t.size())}};
}

// A new float32 statistic or parameter gradient, of the kind `kind` is.
struct VectorOut {
  py::object value;
  std::span<float> span;  // data() == nullptr: not asked for
};

inline VectorOut vector_output(const Tensor& kind, const Shape& shape) {
  const Output out = new_output(kind, DType::float32, shape, MemoryFormat::channels_first);
  const py::ssize_t count =
      std::accumulate(shape.begin(), shape.end(), py::ssize_t{1}, std::multiplies<>());
  return {out.value, {static_cast<float*>(out.data), static_cast<std::size_t>(count)}};
}

inline py::object or_none(const VectorOut& v) {
  return v.span.data() ? v.value : py::object(py::none());
}

inline int64_t channels_of(const TensorView& x) { return x.rank >= 2 ? x.shape[1] : 0; }
inline int64_t batch_of(const TensorView& x) { return x.rank >= 1 ? x.shape[0] : 0; }

// Run a kernel without the GIL: the tensors it touches are held by the caller's locals.
template <typename F> void without_gil(F&& kernel) {
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
