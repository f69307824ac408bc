#include "data.h"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <new>

namespace normkit::bench {

Buffer::Buffer(std::size_t bytes) : bytes_(bytes) {
  const std::size_t rounded = (std::max<std::size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (!p) throw std::bad_alloc();
  data_.reset(p);
}

void Buffer::Free::operator()(void* p) const { std::free(p); }

namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

float uniform_at(uint64_t seed, int64_t i, float lo, float hi) {
  const uint64_t r = splitmix64(seed * 0x100000001b3ull + static_cast<uint64_t>(i));
  const float u = static_cast<float>(r >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
  return lo + (hi - lo) * u;
}

uint16_t to_bfloat16(float f) {
  uint32_t u = std::bit_cast<uint32_t>(f);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace

void fill_uniform(void* data, DType dtype, int64_t count, float lo, float hi, uint64_t seed) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const float v = uniform_at(seed, i, lo, hi);
    switch (dtype) {
      case DType::float32: static_cast<float*>(data)[i] = v; break;
      case DType::bfloat16: static_cast<uint16_t*>(data)[i] = to_bfloat16(v); break;
      case DType::float16: static_cast<_Float16*>(data)[i] = static_cast<_Float16>(v); break;
    }
  }
}

void fill_uniform(std::vector<float>& v, float lo, float hi, uint64_t seed) {
  fill_uniform(v.data(), DType::float32, static_cast<int64_t>(v.size()), lo, hi, seed);
}

float load_as_float(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::float32: return static_cast<const float*>(data)[i];
    case DType::bfloat16:
      return std::bit_cast<float>(static_cast<uint32_t>(static_cast<const uint16_t*>(data)[i])
                                  << 16);
    case DType::float16: return static_cast<float>(static_cast<const _Float16*>(data)[i]);
  }
  return 0;
}

CaseData::CaseData(const Case& c) : x(c.bytes()), dy(c.bytes()) {
  // x with a nonzero mean and unit-ish spread; dy centred. Different seeds per set of values.
  fill_uniform(x.data(), c.dtype, c.numel(), -1.2f, 2.2f, 1);
  fill_uniform(dy.data(), c.dtype, c.numel(), -1.0f, 1.0f, 2);
  if (c.epilogue == Epilogue::add_relu) {
    residual = Buffer(c.bytes());
    fill_uniform(residual.data(), c.dtype, c.numel(), -1.0f, 1.0f, 7);
  }
  // Weight Standardization has no parameters: C_out (= batch()) unused ones.
  const int64_t params = c.rows() ? c.shape.back()
                         : c.family == Family::weight_std ? c.batch()
                                                          : c.channels();
  weight.resize(params);
  bias.resize(params);
  fill_uniform(weight, 0.5f, 1.5f, 3);
  fill_uniform(bias, -0.5f, 0.5f, 4);
  if (c.family == Family::batch_norm || c.family == Family::batch_renorm) {
    running_mean.resize(params);
    running_var.resize(params);
    fill_uniform(running_mean, 0.0f, 1.0f, 5);
    fill_uniform(running_var, 0.5f, 1.5f, 6);
  }
  // tau inside z's range, so the TLU picks both sides; v around 1, EvoNorm's initial value.
  if (c.family == Family::frn || c.family == Family::evonorm_s0) {
    extra.resize(params);
    if (c.family == Family::frn)
      fill_uniform(extra, -0.5f, 0.5f, 8);
    else
      fill_uniform(extra, 0.5f, 1.5f, 8);
  }
}

std::vector<int64_t> strides_of(const Case& c) {
  const std::size_t r = c.shape.size();
  std::vector<int64_t> s(r, 1);
  if (c.format == MemoryFormat::channels_first || r <= 2) {
    for (std::size_t i = r - 1; i-- > 0;) s[i] = s[i + 1] * c.shape[i + 1];
    return s;
  }
  // channels_last: C fastest, then the spatial dims from last to first, then N.
  s[1] = 1;
  int64_t step = c.shape[1];
  for (std::size_t i = r - 1; i >= 2; --i) {
    s[i] = step;
    step *= c.shape[i];
  }
  s[0] = step;
  return s;
}

TensorView view_of(const Case& c, const void* data) {
  return TensorView(data, c.dtype, static_cast<int>(c.shape.size()), c.shape.data(), c.format);
}

void Outputs::add(const std::string& name, const void* data, DType dtype, int64_t count) {
  Item item{name, std::vector<float>(static_cast<std::size_t>(count))};
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < count; ++i) item.values[i] = load_as_float(data, dtype, i);
  items.push_back(std::move(item));
}

const Outputs::Item* Outputs::find(const std::string& name) const {
  for (const auto& item : items)
    if (item.name == name) return &item;
  return nullptr;
}

CheckResult compare(const Outputs& candidate, const Outputs& reference, double base_tolerance,
                    bool relu_masked) {
  CheckResult r;
  for (const auto& ref : reference.items) {
    const Outputs::Item* got = candidate.find(ref.name);
    if (!got) continue;
    r.compared = true;
    const bool masked = relu_masked && (ref.name == "dx" || ref.name == "dresidual");
    const bool masked_sum = relu_masked && (ref.name == "dweight" || ref.name == "dbias" ||
                                            ref.name == "dtau");
    const double tolerance = masked_sum ? 50 * base_tolerance : base_tolerance;
    double error = 0;
    if (got->values.size() != ref.values.size()) {
      error = INFINITY;
    } else {
      const int64_t n = static_cast<int64_t>(ref.values.size());
      double max_ref = 0;
      bool nan = false;
#pragma omp parallel for reduction(max : max_ref) reduction(|| : nan)
      for (int64_t i = 0; i < n; ++i) {
        const double a = got->values[i], b = ref.values[i];
        if (std::isnan(a) != std::isnan(b)) nan = true;
        if (!std::isnan(b)) max_ref = std::max(max_ref, std::fabs(b));
      }
      const double scale = std::max(max_ref, 1e-12);
      // The largest error overall, and the largest among elements within tolerance.
      double max_diff = 0, max_within = 0;
      int64_t over = 0;
#pragma omp parallel for reduction(max : max_diff, max_within) reduction(+ : over)
      for (int64_t i = 0; i < n; ++i) {
        const double a = got->values[i], b = ref.values[i];
        if (std::isnan(a) || std::isnan(b)) continue;
        const double d = std::fabs(a - b) / scale;
        max_diff = std::max(max_diff, d);
        if (d > tolerance)
          ++over;
        else
          max_within = std::max(max_within, d);
      }
      const int64_t allowed = masked ? std::max<int64_t>(2, n / 100000) : 0;
      if (nan) {
        error = INFINITY;
      } else if (over > 0 && over <= allowed) {
        error = max_within;
        r.kink_flips += over;
      } else {
        error = max_diff;
      }
    }
    if (!(error <= r.max_error)) {
      r.max_error = error;
      r.worst = ref.name;
    }
    if (!(error <= tolerance)) r.ok = false;
  }
  return r;
}

}  // namespace normkit::bench
