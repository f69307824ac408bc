#pragma once
// Argument checks shared by every public op. Each public function runs all of its checks before
// it writes any output, so a thrown normkit::Error leaves caller memory untouched.
// Messages start with the function's name and name the argument and the values.
#include <cstddef>
#include <span>
#include <string>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/error.h"
#include "normkit/tensor.h"

namespace normkit::detail {

// "1e-09", "-0.5", "nan": short and exact enough for messages.
std::string format_number(double v);

[[noreturn]] void fail(const char* function, const std::string& message);

// A set of activation dtypes: what an op implements.
struct DTypeSet {
  unsigned bits = 0;
  constexpr bool has(DType d) const { return unsigned(d) < 32 && ((bits >> unsigned(d)) & 1u); }
};
inline constexpr DTypeSet kFloat32Only{1u << unsigned(DType::float32)};
inline constexpr DTypeSet kActivationDTypes{(1u << unsigned(DType::float32)) |
                                            (1u << unsigned(DType::bfloat16)) |
                                            (1u << unsigned(DType::float16))};

// rank in [min_rank, 5], no negative dim, element count fits in int64, non-null data when not
// empty, dtype in `supported` (what the calling op implements).
void check_tensor(const char* function, const char* name, const TensorView& t, int min_rank = 2,
                  DTypeSet supported = kFloat32Only);

// `t` has x's shape, memory format and dtype.
void check_like(const char* function, const char* name, const TensorView& t, const char* x_name,
                const TensorView& x);

// An optional vector is absent (data() == nullptr) or has exactly `expected` elements;
// a required one must be present. `what` describes expected, e.g. "C" or "N * num_groups".
void check_length(const char* function, const char* name, std::span<const float> v,
                  int64_t expected, const char* what, bool required);

// One of the enum's values (a cast int may not be).
void check_activation(const char* function, Activation a);

// Fused-epilogue tensors: the activation is one of the enum's; each present tensor (data !=
// nullptr) must look like x; a backward with relu needs y (its sign is the mask) unless x is
// empty; a present epilogue.bias has bias_length values (`bias_what` names that length, e.g.
// "C"). Nothing can tell a residual or bias the silu backward lacks from one the forward did
// not have: the header contracts say to pass what the forward got.
void check_forward_epilogue(const char* function, const ForwardEpilogue& e, const TensorView& x);
void check_backward_epilogue(const char* function, const BackwardEpilogue& e, const TensorView& x,
                             int64_t bias_length, const char* bias_what);

void check_eps(const char* function, double eps);
// num_groups > 0 and dividing `channels` (GroupNorm's rule, for the op and its layer alike);
// `where` (may be empty) is appended to a message, e.g. " (x shape (2, 6, 5))".
void check_num_groups(const char* function, int64_t num_groups, int64_t channels,
                      const std::string& where);
void check_momentum(const char* function, double momentum);

// ctx.workspace as the CPU kernels will use it: empty when none was given or the reference
// backend runs (it uses none), else the caller's, which must hold at least `need` bytes; a
// smaller one throws, naming `query` (the op's size function) and both sizes.
std::span<std::byte> checked_workspace(const char* function, const char* query, std::size_t need,
                                       const Context& ctx);

// Threads to use for this call.
int thread_count(const Context& ctx);

}  // namespace normkit::detail
