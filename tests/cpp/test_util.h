#pragma once
// Helpers shared by the C++ tests: seeded random data, poison-filled outputs, error measures.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "normkit/tensor.h"

namespace normkit::test {

// A value no correct kernel writes: an unwritten output element shows up as a mismatch.
inline constexpr float kPoison = -7.77e30f;

inline std::vector<float> poisoned(std::size_t n) { return std::vector<float>(n, kPoison); }

// offset + scale * N(0, 1), as float32.
inline std::vector<float> random_normal(std::size_t n, std::mt19937_64& rng, double offset = 0.0,
                                        double scale = 1.0) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<float> v(n);
  for (auto& e : v) e = static_cast<float>(offset + scale * d(rng));
  return v;
}

inline double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float e : v) m = std::max(m, std::fabs(static_cast<double>(e)));
  return m;
}

// max |a - b|; NaN anywhere (a poison survivor turns into a huge value) gives +inf.
inline double max_abs_diff(const float* a, const float* b, std::size_t n) {
  double m = 0;
  for (std::size_t i = 0; i < n; ++i) {
    double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return m;
}
inline double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() != b.size() ? std::numeric_limits<double>::infinity()
                              : max_abs_diff(a.data(), b.data(), a.size());
}

// ---- layouts, views and comparisons shared by the normalization tests ----------------------

// A float32 TensorView over v with a runtime shape.
inline TensorView view_of(const std::vector<float>& v, const std::vector<int64_t>& dims,
                          MemoryFormat format = MemoryFormat::channels_first) {
  return TensorView(v.data(), DType::float32, int(dims.size()), dims.data(), format);
}

// Logical (N, C, S) data in channels-first order, rearranged to the memory order of `format`.
template <typename T>
std::vector<T> to_format(const std::vector<T>& logical, int64_t N, int64_t C, int64_t S,
                         MemoryFormat format) {
  if (format == MemoryFormat::channels_first) return logical;
  std::vector<T> out(logical.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) out[(n * S + s) * C + c] = logical[(n * C + c) * S + s];
  return out;
}

// The inverse of to_format: memory order of `format` back to channels-first.
template <typename T>
std::vector<T> from_format(const std::vector<T>& stored, int64_t N, int64_t C, int64_t S,
                           MemoryFormat format) {
  if (format == MemoryFormat::channels_first) return stored;
  std::vector<T> out(stored.size());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) out[(n * C + c) * S + s] = stored[(n * S + s) * C + c];
  return out;
}

inline std::vector<double> to_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// max |a - b| against a double result; NaN anywhere gives +inf.
inline double max_abs_diff(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - b[i]);
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return m;
}

inline double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double e : v) m = std::max(m, std::fabs(e));
  return m;
}

// max |a - b| / max(max |b|, floor): the error relative to the size of b, or to a floor where
// b can cancel below the size of the terms it sums. NaN or a surviving poison value gives
// +inf; any difference from an all-zero b with no floor is huge.
template <typename T>
double relative_error(const std::vector<float>& a, const std::vector<T>& b, double floor = 0) {
  return max_abs_diff(a, b) / std::max({max_abs(b), floor, std::numeric_limits<double>::min()});
}

// Same bytes (NaN payloads included); memcmp never sees the null data() of an empty vector.
template <typename T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

inline bool contains_poison(const std::vector<float>& v) {
  for (float e : v)
    if (e == kPoison) return true;
  return false;
}

// 0 to max_dims spatial sizes, each in [1, max_size].
inline std::vector<int64_t> random_spatial(std::mt19937_64& rng, int max_dims, int64_t max_size) {
  std::vector<int64_t> dims(std::uniform_int_distribution<int>(0, max_dims)(rng));
  for (auto& d : dims) d = std::uniform_int_distribution<int64_t>(1, max_size)(rng);
  return dims;
}

// Central difference (loss(v + h) - loss(v - h)) / 2h, where loss() reads v; v is restored.
template <typename Loss>
double central_difference(Loss&& loss, double& v, double h) {
  const double keep = v;
  v = keep + h;
  const double up = loss();
  v = keep - h;
  const double down = loss();
  v = keep;
  return (up - down) / (2 * h);
}

// 10^u with u uniform in [log10(lo), log10(hi)].
inline double log_uniform(std::mt19937_64& rng, double lo, double hi) {
  return std::pow(10.0, std::uniform_real_distribution<double>(std::log10(lo), std::log10(hi))(rng));
}

}  // namespace normkit::test
