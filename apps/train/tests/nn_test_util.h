#pragma once
// Finite-difference gradient checks for the training engine's layers.
//
// Every check uses the scalar loss L = sum_i y_i * r_i with a fixed random r, so dL/dy = r, and
// compares the analytic gradient of an input or parameter with the central difference
// (L(v + h) - L(v - h)) / 2h, elementwise, accumulating L in double. Where the layer has ReLUs,
// a difference whose two evaluations see a different ReLU pattern than the unperturbed one
// straddles a kink and is skipped (and counted, so a test can assert most were checked).
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "nn/tensor.h"

namespace normkit::train::test {

inline std::vector<float> random_vector(size_t n, std::mt19937_64& rng, double scale = 1.0,
                                        double offset = 0.0) {
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<float> v(n);
  for (float& e : v) e = static_cast<float>(offset + scale * d(rng));
  return v;
}

inline Tensor random_tensor(int64_t n, int64_t h, int64_t w, int64_t c, std::mt19937_64& rng,
                            double scale = 1.0, double offset = 0.0) {
  Tensor t;
  t.resize(n, h, w, c);
  t.data = random_vector(static_cast<size_t>(t.numel()), rng, scale, offset);
  return t;
}

inline double dot(const Tensor& y, const std::vector<float>& r) {
  double s = 0;
  for (int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(y.data[i]) * r[i];
  return s;
}

struct FdResult {
  int checked = 0;
  int skipped = 0;
  double max_error = 0;     // max |analytic - numeric|
  double max_gradient = 0;  // max |numeric|
};

// loss(): runs the forward and returns L. pattern(): the ReLU sign pattern of the last forward
// (empty when the layer has none). Perturbs values[i] for each index in `indices` (all when
// empty) and compares with analytic[i]. Restores values.
inline FdResult finite_difference(const std::function<double()>& loss,
                                  const std::function<std::vector<uint8_t>()>& pattern,
                                  std::vector<float>& values, const std::vector<float>& analytic,
                                  double h, std::vector<size_t> indices = {}) {
  if (indices.empty())  // all of a small tensor, an evenly spread sample of about 400 of a large one
    for (size_t i = 0; i < values.size(); i += 1 + values.size() / 400) indices.push_back(i);
  loss();
  const std::vector<uint8_t> base = pattern ? pattern() : std::vector<uint8_t>{};
  FdResult r;
  for (size_t i : indices) {
    const float keep = values[i];
    values[i] = static_cast<float>(keep + h);
    const double hi = loss();
    const bool same_hi = !pattern || pattern() == base;
    values[i] = static_cast<float>(keep - h);
    const double lo = loss();
    const bool same_lo = !pattern || pattern() == base;
    // The step actually taken in float.
    const double step = static_cast<double>(static_cast<float>(keep + h)) -
                        static_cast<double>(static_cast<float>(keep - h));
    values[i] = keep;
    if (!same_hi || !same_lo) {
      ++r.skipped;
      continue;
    }
    const double numeric = (hi - lo) / step;
    r.max_error = std::max(r.max_error, std::fabs(numeric - analytic[i]));
    r.max_gradient = std::max(r.max_gradient, std::fabs(numeric));
    ++r.checked;
  }
  loss();  // leave the layer's state as for the unperturbed values
  return r;
}

// The sign pattern of ReLU outputs, for finite_difference.
inline void append_pattern(std::vector<uint8_t>& out, const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i) out.push_back(t.data[i] > 0.0f);
}

#define EXPECT_GRADIENT_CLOSE(result, rel_tol, what)                                       \
  do {                                                                                     \
    const auto& r_ = (result);                                                             \
    EXPECT_GT(r_.checked, 0) << what;                                                      \
    EXPECT_LE(r_.skipped, r_.checked / 10 + 1) << what << ": too many kinks straddled";    \
    EXPECT_GT(r_.max_gradient, 0.0) << what << ": gradient is identically zero";           \
    EXPECT_LE(r_.max_error, (rel_tol) * r_.max_gradient + 1e-4)                            \
        << what << ": max error " << r_.max_error << " vs max gradient " << r_.max_gradient; \
  } while (0)

}  // namespace normkit::train::test
