#include "common/validate.h"

#include <cmath>
#include <cstdio>
#include <limits>

namespace normkit::detail {

std::string format_number(double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.9g", v);
  return buffer;
}

void fail(const char* function, const std::string& message) {
  throw Error(std::string(function) + ": " + message);
}

void check_tensor(const char* function, const char* name, const TensorView& t, int min_rank,
                  DTypeSet supported) {
  if (t.rank < min_rank || t.rank > kMaxRank)
    fail(function, std::string(name) + " must have rank " + std::to_string(min_rank) + " to " +
                       std::to_string(kMaxRank) + ", got rank " + std::to_string(t.rank));
  // The product of the nonzero dims must fit, even when a zero dim makes the tensor empty: the
  // ops multiply subsets of the dims (N * C, the spatial size, a row length), and each of those
  // then fits too.
  int64_t count = 1;
  bool overflow = false, has_zero = false;
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] < 0)
      fail(function, std::string(name) + " has a negative dimension: shape " + shape_string(t));
    if (t.shape[i] == 0) has_zero = true;
    else if (count > std::numeric_limits<int64_t>::max() / t.shape[i]) overflow = true;
    else count *= t.shape[i];
  }
  if (overflow)
    fail(function, std::string(name) + " has more elements than int64 can count" +
                       (has_zero ? " in its nonzero dims" : "") + ": shape " + shape_string(t));
  if (!has_zero && t.data == nullptr)
    fail(function, std::string(name) + " has a null data pointer for shape " + shape_string(t));
  if (!supported.has(t.dtype)) {
    std::string list;
    for (DType d : {DType::float32, DType::bfloat16, DType::float16})
      if (supported.has(d)) list += std::string(list.empty() ? "" : ", ") + to_string(d);
    fail(function, std::string(name) + " has dtype " + to_string(t.dtype) +
                       ", which this function does not support (expected " + list + ")");
  }
}

void check_like(const char* function, const char* name, const TensorView& t, const char* x_name,
                const TensorView& x) {
  if (!t.same_shape(x))
    fail(function, std::string(name) + " shape " + shape_string(t) + " != " + x_name + " shape " +
                       shape_string(x));
  if (t.format != x.format && x.rank > 2)
    fail(function, std::string(name) + " memory format " + to_string(t.format) + " != " + x_name +
                       " memory format " + to_string(x.format));
  if (t.dtype != x.dtype)
    fail(function, std::string(name) + " dtype " + to_string(t.dtype) + " != " + x_name +
                       " dtype " + to_string(x.dtype));
  bool empty = false;  // by dims, not numel(): the product of the others may overflow
  for (int i = 0; i < t.rank && i < kMaxRank; ++i) empty |= t.shape[i] == 0;
  if (!empty && t.data == nullptr)
    fail(function, std::string(name) + " has a null data pointer for shape " + shape_string(t));
}

void check_length(const char* function, const char* name, std::span<const float> v,
                  int64_t expected, const char* what, bool required) {
  if (v.data() == nullptr) {
    if (required && expected > 0) fail(function, std::string(name) + " is required");
    return;
  }
  if (static_cast<int64_t>(v.size()) != expected)
    fail(function, std::string(name) + " has length " + std::to_string(v.size()) +
                       ", expected " + what + " = " + std::to_string(expected));
}

void check_activation(const char* function, Activation a) {
  if (a != Activation::none && a != Activation::relu && a != Activation::silu)
    fail(function, "epilogue.activation must be none, relu or silu, got " +
                       std::to_string(static_cast<int>(a)));
}

void check_forward_epilogue(const char* function, const ForwardEpilogue& e, const TensorView& x) {
  check_activation(function, e.activation);
  if (e.residual.data != nullptr) check_like(function, "epilogue.residual", e.residual, "x", x);
}

void check_backward_epilogue(const char* function, const BackwardEpilogue& e, const TensorView& x,
                             int64_t bias_length, const char* bias_what) {
  check_activation(function, e.activation);
  bool empty = false;  // by dims, not numel(): the product of the others may overflow
  for (int i = 0; i < x.rank && i < kMaxRank; ++i) empty |= x.shape[i] == 0;
  if (e.activation == Activation::relu && e.y.data == nullptr && !empty)
    fail(function, "epilogue.y (the forward's output) is required with relu");
  if (e.y.data != nullptr) check_like(function, "epilogue.y", e.y, "x", x);
  if (e.residual.data != nullptr) check_like(function, "epilogue.residual", e.residual, "x", x);
  check_length(function, "epilogue.bias", e.bias, bias_length, bias_what, false);
  if (e.dresidual.data != nullptr)
    check_like(function, "epilogue.dresidual", e.dresidual, "x", x);
}

void check_eps(const char* function, double eps) {
  if (!(std::isfinite(eps) && eps >= 0))
    fail(function, "eps must be finite and >= 0, got " + format_number(eps));
}

std::span<std::byte> checked_workspace(const char* function, const char* query, std::size_t need,
                                       const Context& ctx) {
  const std::span<std::byte> ws = ctx.workspace;
  if (ws.data() == nullptr || ctx.backend == Backend::reference) return {};
  if (ws.size() < need)
    fail(function, "workspace has " + std::to_string(ws.size()) + " bytes, expected at least " +
                       query + " = " + std::to_string(need));
  return ws;
}

void check_num_groups(const char* function, int64_t num_groups, int64_t channels,
                      const std::string& where) {
  if (num_groups <= 0)
    fail(function, "num_groups must be > 0, got " + std::to_string(num_groups));
  if (channels % num_groups != 0)
    fail(function, "num_groups = " + std::to_string(num_groups) +
                       " must divide the number of channels C = " + std::to_string(channels) +
                       where);
}

void check_momentum(const char* function, double momentum) {
  if (!(momentum >= 0 && momentum <= 1))
    fail(function, "momentum must be in [0, 1], got " + format_number(momentum));
}

int thread_count(const Context& ctx) {
  return ctx.num_threads > 0 ? ctx.num_threads : get_num_threads();
}

}  // namespace normkit::detail
