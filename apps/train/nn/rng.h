#pragma once
// Random numbers whose sequence is the same on every platform for a given seed: std::mt19937_64
// is fully specified by the standard, but std::*_distribution and std::shuffle are not, so the
// distributions and the shuffle are written out here.
#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <vector>

namespace normkit::train {

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  // Uniform integer in [0, bound), bound > 0, without modulo bias (rejection).
  uint64_t below(uint64_t bound) {
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r;
    do r = engine_();
    while (r >= limit);
    return r % bound;
  }

  // Standard normal by Box-Muller (one value per call; the partner is dropped so that the
  // stream position never depends on how many values were drawn before).
  double normal() {
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2);
  }

  // Fisher-Yates shuffle of v in place.
  template <typename T> void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(i)]);
  }

 private:
  std::mt19937_64 engine_;
};

}  // namespace normkit::train
