#pragma once
// Buffers, the inputs of a case, and the outputs a candidate hands back for checking.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_case.h"
#include "normkit/tensor.h"

namespace normkit::bench {

// 64-byte aligned, uninitialized bytes.
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(std::size_t bytes);
  void* data() const { return data_.get(); }
  std::size_t bytes() const { return bytes_; }
  template <typename T> T* as() const { return static_cast<T*>(data()); }

 private:
  struct Free {
    void operator()(void* p) const;
  };
  std::unique_ptr<void, Free> data_;
  std::size_t bytes_ = 0;
};

// Fills `count` elements of type `dtype` with a deterministic pseudo-random uniform value in
// [lo, hi), in parallel (which also spreads first touch over the threads that use it).
void fill_uniform(void* data, DType dtype, int64_t count, float lo, float hi, uint64_t seed);
void fill_uniform(std::vector<float>& v, float lo, float hi, uint64_t seed);

// Element `i` of an activation buffer of `dtype`, as float.
float load_as_float(const void* data, DType dtype, int64_t i);

// The inputs of one case, in the case's memory format and dtype.
struct CaseData {
  Buffer x, dy;
  Buffer residual;                                // with Epilogue::add_relu
  std::vector<float> weight, bias;                // C (layer norm: cols)
  std::vector<float> running_mean, running_var;   // batch norm only: C
  std::vector<float> extra;  // C: FRN's tau, EvoNorm-S0's v; empty for the others

  explicit CaseData(const Case& c);
};

// Logical strides (in elements) of the case's tensor in its memory format, in (N, C, *spatial)
// order, as PyTorch and oneDNN take them.
std::vector<int64_t> strides_of(const Case& c);

// A view of a case-shaped activation buffer.
TensorView view_of(const Case& c, const void* data);

// Named float copies of a candidate's results, element order that of the case's format.
struct Outputs {
  struct Item {
    std::string name;
    std::vector<float> values;
  };
  std::vector<Item> items;
  void add(const std::string& name, const void* data, DType dtype, int64_t count);
  void add(const std::string& name, const std::vector<float>& v) {
    add(name, v.data(), DType::float32, static_cast<int64_t>(v.size()));
  }
  const Item* find(const std::string& name) const;
};

struct CheckResult {
  bool compared = false;  // at least one output in common with the reference
  bool ok = true;
  double max_error = 0;   // max over outputs of max|a - ref| / max(max|ref|, 1e-12)
  std::string worst;      // the output with that error
  int64_t kink_flips = 0; // elements of ReLU-masked outputs let through (see compare)
};

// Compares every output the candidate has in common with the reference.
// A NaN anywhere, or an error above `tolerance`, fails. With `relu_masked` (the case ends in a
// ReLU, or in FRN's TLU), dx and dresidual may differ in a few elements, at most 1e-5 of them:
// where the pre-activation is within rounding of the kink (0, or tau), two correct
// implementations can disagree on the mask. Each such element also moves its channel's dweight,
// dbias (and dtau) sums by one term, so those are held to 50x the tolerance (one flipped term of
// a few thousand).
CheckResult compare(const Outputs& candidate, const Outputs& reference, double tolerance,
                    bool relu_masked = false);

}  // namespace normkit::bench
