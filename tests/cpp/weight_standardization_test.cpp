// Weight Standardization: the CPU backend (layer_norm's kernels) and the reference against a
// direct float64 computation at conv weight shapes (odd ones included, both memory formats);
// the backward against finite differences; bitwise thread-count invariance; poison-filled
// outputs; and the argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "normkit/weight_standardization.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit::test {
namespace {

constexpr double kFloatEps = 1.1920929e-07;

struct Result {
  std::vector<float> w_hat, mean, rstd, dw;
};

Result run(const std::vector<int64_t>& dims, MemoryFormat format, const std::vector<float>& w,
           const std::vector<float>& dw_hat, double eps, const Context& ctx) {
  const std::size_t out = std::size_t(dims[0]);
  Result r{poisoned(w.size()), poisoned(out), poisoned(out), poisoned(w.size())};
  weight_standardization_forward(view_of(w, dims, format), eps, view_of(r.w_hat, dims, format),
                                 r.mean, r.rstd, ctx);
  weight_standardization_backward(view_of(dw_hat, dims, format), view_of(w, dims, format), r.mean,
                                  r.rstd, view_of(r.dw, dims, format), ctx);
  return r;
}

// Per output channel over the rest, in double: timm's StdConv2d, and its gradient.
void oracle(const std::vector<double>& w, const std::vector<double>& g, int64_t out, double eps,
            std::vector<double>& w_hat, std::vector<double>& dw) {
  const int64_t cols = int64_t(w.size()) / out;
  w_hat.assign(w.size(), 0.0);
  dw.assign(w.size(), 0.0);
  for (int64_t o = 0; o < out; ++o) {
    const std::size_t base = std::size_t(o * cols);
    double m = 0, v = 0;
    for (int64_t j = 0; j < cols; ++j) m += w[base + j] / double(cols);
    for (int64_t j = 0; j < cols; ++j) v += (w[base + j] - m) * (w[base + j] - m) / double(cols);
    const double r = 1 / std::sqrt(v + eps);
    double mg = 0, mgx = 0;
    for (int64_t j = 0; j < cols; ++j) {
      w_hat[base + j] = (w[base + j] - m) * r;
      mg += g[base + j] / double(cols);
      mgx += g[base + j] * w_hat[base + j] / double(cols);
    }
    for (int64_t j = 0; j < cols; ++j)
      dw[base + j] = r * (g[base + j] - mg - w_hat[base + j] * mgx);
  }
}

TEST(WeightStandardization, MatchesFloat64AndReference) {
  std::mt19937_64 rng(3);
  const std::vector<std::vector<int64_t>> shapes = {
      {64, 3, 7, 7}, {23, 5, 3, 3}, {17, 29, 1, 1}, {8, 13}, {5, 3, 3, 3, 3}, {1, 1, 1, 1}};
  for (const auto& dims : shapes)
    for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      std::size_t count = 1;
      for (int64_t d : dims) count *= std::size_t(d);
      // Conv weights are small and offset: the statistics must not lose them.
      const auto w = random_normal(count, rng, 0.01, 0.05);
      const auto g = random_normal(count, rng);
      std::vector<double> w_hat, dw;
      // Memory order within an output channel does not change its statistics, and the oracle
      // and the kernels read the same memory.
      oracle(to_double(w), to_double(g), dims[0], 1e-5, w_hat, dw);
      const std::string where = std::to_string(count) + " values, " + to_string(f);
      const Result cpu = run(dims, f, w, g, 1e-5, cpu_ctx());
      const Result ref = run(dims, f, w, g, 1e-5, reference_ctx());
      for (const Result* r : {&cpu, &ref}) {
        EXPECT_LE(relative_error(r->w_hat, w_hat, 1.0), 64 * kFloatEps) << where;
        EXPECT_LE(relative_error(r->dw, dw, 1.0), 256 * kFloatEps) << where;
        EXPECT_FALSE(contains_poison(r->mean) || contains_poison(r->rstd)) << where;
      }
    }
}

TEST(WeightStandardization, BitwiseForAnyThreadCount) {
  std::mt19937_64 rng(9);
  const std::vector<int64_t> dims{256, 128, 3, 3};
  const auto w = random_normal(256 * 128 * 9, rng, 0.0, 0.02);
  const auto g = random_normal(w.size(), rng);
  const Result one = run(dims, MemoryFormat::channels_first, w, g, 1e-5, cpu_ctx(1));
  for (int t : {2, 3, 4}) {
    const Result many = run(dims, MemoryFormat::channels_first, w, g, 1e-5, cpu_ctx(t));
    EXPECT_TRUE(bitwise_equal(one.w_hat, many.w_hat) && bitwise_equal(one.dw, many.dw) &&
                bitwise_equal(one.mean, many.mean) && bitwise_equal(one.rstd, many.rstd))
        << t;
  }
}

// loss = sum(g * w_hat) in double; central differences against the oracle's dw.
TEST(WeightStandardization, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(4);
  std::vector<double> w = to_double(random_normal(3 * 10, rng, 0.1, 0.3));
  const std::vector<double> g = to_double(random_normal(w.size(), rng));
  std::vector<double> w_hat, dw;
  oracle(w, g, 3, 1e-3, w_hat, dw);
  auto loss = [&] {
    std::vector<double> h, unused;
    oracle(w, g, 3, 1e-3, h, unused);
    double l = 0;
    for (std::size_t i = 0; i < h.size(); ++i) l += g[i] * h[i];
    return l;
  };
  const std::vector<double> dw_expected = dw;
  for (std::size_t i = 0; i < w.size(); ++i)
    EXPECT_NEAR(central_difference(loss, w[i], 1e-6), dw_expected[i], 1e-6) << i;
  // And the library's float32 backward against the same derivative.
  std::vector<float> wf(w.begin(), w.end()), gf(g.begin(), g.end());
  const Result r = run({3, 10}, MemoryFormat::channels_first, wf, gf, 1e-3, cpu_ctx());
  EXPECT_LE(relative_error(r.dw, dw_expected), 64 * kFloatEps);
}

TEST(WeightStandardizationErrors, Arguments) {
  std::vector<float> w(24, 0.5f), g(24, 1.0f), w_hat = poisoned(24), dw = poisoned(24);
  std::vector<float> mean = poisoned(4), rstd = poisoned(4), short_mean = poisoned(3);
  const std::vector<int64_t> dims{4, 2, 3};
  auto untouched = [&] {
    return w_hat == poisoned(24) && dw == poisoned(24) && mean == poisoned(4) &&
           rstd == poisoned(4);
  };
  expect_error([&] { weight_standardization_forward(view_of(w, {24}), 1e-5, view_of(w_hat, {24}), mean, rstd); },
               {"weight_standardization_forward", "w"});
  expect_error([&] { weight_standardization_forward(view_of(w, dims), -1, view_of(w_hat, dims), mean, rstd); },
               {"eps must be finite and >= 0"});
  expect_error([&] { weight_standardization_forward(view_of(w, dims), 1e-5, view_of(w_hat, {4, 3, 2}), mean, rstd); },
               {"w_hat shape (4, 3, 2) != w shape (4, 2, 3)"});
  expect_error([&] { weight_standardization_forward(view_of(w, dims), 1e-5, view_of(w_hat, dims), short_mean, rstd); },
               {"mean has length 3", "C_out = 4"});
  EXPECT_TRUE(untouched());
  std::vector<float> m(4, 0.0f), r(4, 1.0f);
  expect_error([&] { weight_standardization_backward(view_of(g, {4, 6}), view_of(w, dims), m, r, view_of(dw, dims)); },
               {"weight_standardization_backward", "dw_hat shape (4, 6) != w shape (4, 2, 3)"});
  expect_error([&] { weight_standardization_backward(view_of(g, dims), view_of(w, dims), m, short_mean, view_of(dw, dims)); },
               {"rstd has length 3", "C_out = 4"});
  EXPECT_TRUE(untouched());
}

}  // namespace
}  // namespace normkit::test
