// The shared statistics kernels (src/cpu/moments.h) on every SIMD target this machine runs,
// for each activation dtype: against float64 two-pass sums of the same (rounded) values, at
// every loop-tail remainder, piecewise merging, two runs side by side, and thread-count
// invariance.
#include <gtest/gtest.h>

#include <hwy/targets.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "cpu/moments.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

using cpu::Moments;

// Exact-ish moments of the n values at x (double, two passes).
template <typename T>
Moments exact(const T* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += to_float(x[i]);
  const double mean = s / double(n);
  double m2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = to_float(x[i]) - mean;
    m2 += d * d;
  }
  return {double(n), mean, m2};
}

bool same_bits(const Moments& a, const Moments& b) {
  return std::memcmp(&a, &b, sizeof(Moments)) == 0;
}

void expect_close(const Moments& got, const Moments& want, double spread, const std::string& what) {
  EXPECT_EQ(got.count, want.count) << what;
  // float32 accumulation of centred terms: relative error a few float eps of the spread.
  EXPECT_NEAR(got.mean, want.mean, 1e-6 * spread + 1e-12) << what;
  EXPECT_NEAR(got.m2, want.m2, 1e-5 * want.m2 + 1e-12) << what;
}

template <typename T>
void check_runs() {
  // Seeded per target (the one the kernels dispatch to): each target sees its own inputs.
  std::mt19937_64 rng(7 + cpu::simd_target());
  // Every remainder up to two full 4-vector strides of the widest target (16 lanes), then
  // sizes across piece boundaries.
  std::vector<int64_t> sizes;
  for (int64_t n = 1; n <= 2 * 64 + 1; ++n) sizes.push_back(n);
  for (int64_t n : {cpu::kRunChunk - 1, cpu::kRunChunk, cpu::kRunChunk + 1, 3 * cpu::kRunChunk + 17})
    sizes.push_back(n);
  for (int64_t n : sizes) {
    const double offset = (n % 3 == 0) ? 1000.0 : 0.0;  // large offsets must not cancel
    const auto x = rounded<T>(random_normal(std::size_t(n), rng, offset, 1.0));
    const Moments got = cpu::run_moments(x.data(), n);
    expect_close(got, exact(x.data(), n), 1.0, "n=" + std::to_string(n));
    // Equal, bitwise, to merging the pieces left to right.
    Moments merged;
    for (int64_t s = 0; s < n; s += cpu::kRunChunk)
      merged = cpu::merge(merged, cpu::run_moments(x.data() + s, std::min(cpu::kRunChunk, n - s)));
    EXPECT_TRUE(same_bits(got, merged)) << "n=" << n;
    // Two runs side by side: each gets its own bits, whichever position it takes.
    const auto y = rounded<T>(random_normal(std::size_t(n), rng, -offset, 3.0));
    const Moments want_y = cpu::run_moments(y.data(), n);
    Moments two[2];
    cpu::run_pair_moments(x.data(), y.data(), n, two);
    EXPECT_TRUE(same_bits(two[0], got)) << "n=" << n;
    EXPECT_TRUE(same_bits(two[1], want_y)) << "n=" << n;
    cpu::run_pair_moments(y.data(), x.data(), n, two);
    EXPECT_TRUE(same_bits(two[0], want_y)) << "n=" << n;
    EXPECT_TRUE(same_bits(two[1], got)) << "n=" << n;
  }
}

template <typename T>
void check_threads() {
  std::mt19937_64 rng(13 + cpu::simd_target());
  for (int64_t length : {int64_t(37), cpu::kRunChunk * 2 + 5}) {
    const int64_t runs = 7;
    const auto x = rounded<T>(random_normal(std::size_t(runs * length), rng, 3.0, 1.0));
    std::vector<Moments> one(static_cast<std::size_t>(runs));
    std::vector<Moments> scratch(std::size_t(cpu::runs_moments_scratch_size(runs, length)));
    cpu::runs_moments(x.data(), runs, length, one.data(), 1, scratch.data());
    for (int threads = 2; threads <= 4; ++threads) {
      std::vector<Moments> many(static_cast<std::size_t>(runs));
      cpu::runs_moments(x.data(), runs, length, many.data(), threads, scratch.data());
      for (int64_t r = 0; r < runs; ++r) {
        EXPECT_TRUE(same_bits(one[r], many[r])) << "threads=" << threads << " run " << r;
        EXPECT_TRUE(same_bits(one[r], cpu::run_moments(x.data() + r * length, length)));
      }
    }
  }
}

TEST(Moments, RunsOnEveryTargetAndDtype) {
  std::string names;
  for (int64_t t : hwy::SupportedAndGeneratedTargets()) names += std::string(hwy::TargetName(t)) + " ";
  RecordProperty("targets", names);
  std::printf("SIMD targets tested: %s\n", names.c_str());
  for_each_target([] {
    check_runs<float>();
    check_runs<bf16>();
    check_runs<f16>();
  });
}

TEST(Moments, BitwiseIdenticalForEveryThreadCount) {
  for_each_target([] {
    check_threads<float>();
    check_threads<bf16>();
    check_threads<f16>();
  });
}

TEST(Moments, Float16SquaresDoNotOverflow) {
  // 60000^2 overflows float16 but not the float32 accumulators.
  std::vector<f16> x(100);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = from_float<f16>(i % 2 ? 60000.f : -60000.f);
  for_each_target([&] {
    const Moments m = cpu::run_moments(x.data(), int64_t(x.size()));
    EXPECT_NEAR(m.mean, 0.0, 1e-3);
    EXPECT_NEAR(m.variance(), 3.6e9, 3.6e9 * 1e-6);
  });
}

TEST(Moments, ConversionsRoundToNearestEvenOnEveryTarget) {
  // Scalar conversions: ties to even, specials kept.
  EXPECT_EQ(from_float<bf16>(std::bit_cast<float>(0x3F808000u)).bits, 0x3F80);  // tie -> even
  EXPECT_EQ(from_float<bf16>(std::bit_cast<float>(0x3F818000u)).bits, 0x3F82);  // tie -> even
  EXPECT_EQ(from_float<bf16>(std::bit_cast<float>(0x3F808001u)).bits, 0x3F81);
  EXPECT_TRUE(std::isnan(to_float(from_float<bf16>(NAN))));
  EXPECT_TRUE(std::isinf(to_float(from_float<f16>(1e6f))));
  EXPECT_EQ(to_float(from_float<f16>(1.0f + 1.0f / 4096)), 1.0f);  // tie -> even
  EXPECT_EQ(to_float(from_float<f16>(6e-8f)), std::ldexp(1.0f, -24));  // subnormal
}

}  // namespace
}  // namespace normkit::test
