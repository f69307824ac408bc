#pragma once
// Helpers shared by the C++ tests: seeded random data, poison-filled outputs, error measures.
#include <cmath>
#include <cstdint>
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

}  // namespace normkit::test
