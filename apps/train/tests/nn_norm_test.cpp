// Norm wrapper: forward against float64 references for every kind and mode, backward by finite
// differences (with and without the fused ReLU), BN's running statistics, and clear errors.
#include <gtest/gtest.h>

#include "nn/norm.h"
#include "nn/parallel.h"
#include "nn_test_util.h"
#include "normkit/error.h"

namespace normkit::train::test {
namespace {

// Reference: normalize x (N, H, W, C) with statistics over the channels of each group of each
// sample (per_sample) or over the batch for each channel (BatchNorm), in double.
std::vector<double> reference(const Tensor& x, int groups, bool per_sample, const std::vector<float>& gamma,
                              const std::vector<float>& beta, bool relu) {
  const int64_t hw = x.h * x.w, c = x.c;
  std::vector<double> y(static_cast<size_t>(x.numel()));
  auto value = [&](int64_t n, int64_t p, int64_t j) { return static_cast<double>(x.data[(n * hw + p) * c + j]); };
  auto normalize = [&](const std::vector<int64_t>& samples, int64_t c0, int64_t c1) {
    double s = 0, count = 0;
    for (int64_t n : samples)
      for (int64_t p = 0; p < hw; ++p)
        for (int64_t j = c0; j < c1; ++j) s += value(n, p, j), ++count;
    const double mean = s / count;
    double v = 0;
    for (int64_t n : samples)
      for (int64_t p = 0; p < hw; ++p)
        for (int64_t j = c0; j < c1; ++j) v += (value(n, p, j) - mean) * (value(n, p, j) - mean);
    const double rstd = 1.0 / std::sqrt(v / count + 1e-5);
    for (int64_t n : samples)
      for (int64_t p = 0; p < hw; ++p)
        for (int64_t j = c0; j < c1; ++j) {
          double o = (value(n, p, j) - mean) * rstd * (gamma.empty() ? 1.0 : gamma[j]) + beta[j];
          y[(n * hw + p) * c + j] = relu ? std::max(o, 0.0) : o;
        }
  };
  if (per_sample) {
    for (int64_t n = 0; n < x.n; ++n)
      for (int g = 0; g < groups; ++g) normalize({n}, g * c / groups, (g + 1) * c / groups);
  } else {
    std::vector<int64_t> all;
    for (int64_t n = 0; n < x.n; ++n) all.push_back(n);
    for (int64_t j = 0; j < c; ++j) normalize(all, j, j + 1);
  }
  return y;
}

double max_diff(const Tensor& y, const std::vector<double>& want) {
  double m = 0;
  for (size_t i = 0; i < want.size(); ++i) m = std::max(m, std::fabs(y.data[i] - want[i]));
  return m;
}

struct Case {
  NormKind kind;
  bool relu;
};

class NormTest : public ::testing::TestWithParam<Case> {
 protected:
  // normkit's own tests cover its thread counts; these check the wrapper's math.
  void SetUp() override { set_threads(1); }
};

constexpr int kChannels = 6, kGroups = 3;

int groups_of(NormKind k) {
  switch (k) {
    case NormKind::group: return kGroups;
    case NormKind::layer: return 1;
    case NormKind::instance: return kChannels;
    default: return 0;
  }
}

TEST_P(NormTest, TrainingForwardMatchesReference) {
  const Case cs = GetParam();
  std::mt19937_64 rng(21);
  Norm norm("n", cs.kind, kChannels, kGroups, false, cs.relu);
  norm.bias.value = random_vector(kChannels, rng);
  if (cs.kind != NormKind::none) norm.weight.value = random_vector(kChannels, rng);
  const Tensor x = random_tensor(3, 5, 4, kChannels, rng, 2.0, 0.5);
  const Tensor& y = norm.forward(x, Mode::train);
  std::vector<double> want;
  if (cs.kind == NormKind::none) {
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double o = static_cast<double>(x.data[i]) + norm.bias.value[i % kChannels];
      want.push_back(cs.relu ? std::max(o, 0.0) : o);
    }
  } else {
    want = reference(x, groups_of(cs.kind), cs.kind != NormKind::batch, norm.weight.value,
                     norm.bias.value, cs.relu);
  }
  EXPECT_LT(max_diff(y, want), 1e-5);
}

TEST_P(NormTest, BackwardMatchesFiniteDifferences) {
  const Case cs = GetParam();
  std::mt19937_64 rng(22);
  Norm norm("n", cs.kind, kChannels, kGroups, false, cs.relu);
  norm.bias.value = random_vector(kChannels, rng, 0.5);
  if (cs.kind != NormKind::none) norm.weight.value = random_vector(kChannels, rng, 1.0, 0.5);
  Tensor x = random_tensor(2, 3, 5, kChannels, rng, 1.5, 0.3);
  const Tensor& y0 = norm.forward(x, Mode::train);
  const std::vector<float> r = random_vector(static_cast<size_t>(y0.numel()), rng);
  Tensor dy;
  dy.resize_like(y0);
  dy.data = r;
  std::fill(norm.weight.grad.begin(), norm.weight.grad.end(), 1e30f);
  std::fill(norm.bias.grad.begin(), norm.bias.grad.end(), 1e30f);
  const Tensor& dx = norm.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  const std::vector<float> dw = norm.weight.grad, db = norm.bias.grad;
  auto loss = [&] { return dot(norm.forward(x, Mode::train), r); };
  std::function<std::vector<uint8_t>()> pattern;
  if (cs.relu)
    pattern = [&] {
      std::vector<uint8_t> p;
      append_pattern(p, norm.forward(x, Mode::train));
      return p;
    };
  const double h = 1e-3;
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, x.data, dx_copy, h), 2e-2, "dx");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, norm.bias.value, db, h), 2e-2, "dbias");
  if (cs.kind != NormKind::none)
    EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, norm.weight.value, dw, h), 2e-2,
                          "dweight");
}

INSTANTIATE_TEST_SUITE_P(
    Kinds, NormTest,
    ::testing::Values(Case{NormKind::batch, false}, Case{NormKind::batch, true},
                      Case{NormKind::group, false}, Case{NormKind::group, true},
                      Case{NormKind::layer, false}, Case{NormKind::instance, false},
                      Case{NormKind::instance, true}, Case{NormKind::none, false},
                      Case{NormKind::none, true}),
    [](const auto& info) {
      return std::string(to_string(info.param.kind)) + (info.param.relu ? "_relu" : "");
    });

TEST(Norm, BatchNormRunningStatisticsAndEvaluationModes) {
  set_threads(1);
  std::mt19937_64 rng(23);
  Norm norm("bn", NormKind::batch, 4, 0, false, false);
  const Tensor x = random_tensor(4, 3, 3, 4, rng, 2.0, 1.0);
  norm.forward(x, Mode::train);
  // After one step from (0, 1) with momentum 0.1: 0.1 * mean and 0.9 + 0.1 * unbiased variance.
  const int64_t m = x.pixels();
  for (int j = 0; j < 4; ++j) {
    double s = 0, ss = 0;
    for (int64_t i = 0; i < m; ++i) s += x.data[i * 4 + j];
    const double mean = s / m;
    for (int64_t i = 0; i < m; ++i) ss += (x.data[i * 4 + j] - mean) * (x.data[i * 4 + j] - mean);
    EXPECT_NEAR(norm.running_mean()[j], 0.1 * mean, 1e-6);
    EXPECT_NEAR(norm.running_var()[j], 0.9 + 0.1 * ss / (m - 1), 1e-5);
  }
  const std::vector<float> rm = norm.running_mean(), rv = norm.running_var();
  // Eval uses the running statistics and changes nothing.
  const Tensor& y = norm.forward(x, Mode::eval);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int j = static_cast<int>(i % 4);
    EXPECT_NEAR(y.data[i], (x.data[i] - rm[j]) / std::sqrt(rv[j] + 1e-5), 1e-5);
  }
  EXPECT_EQ(norm.running_mean(), rm);
  EXPECT_EQ(norm.running_var(), rv);
  // Eval with batch statistics normalizes like training but leaves the running stats alone.
  const Tensor& yb = norm.forward(x, Mode::eval_batch_stats);
  EXPECT_LT(max_diff(yb, reference(x, 0, false, norm.weight.value, norm.bias.value, false)), 1e-5);
  EXPECT_EQ(norm.running_mean(), rm);
  EXPECT_EQ(norm.running_var(), rv);
  EXPECT_THROW(norm.backward(yb), normkit::Error);  // backward needs a training forward
}

TEST(Norm, ClearErrors) {
  try {
    Norm("stage2.block1.norm1", NormKind::group, 32, 6, false, false);
    FAIL() << "no error";
  } catch (const normkit::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("--groups 6"), std::string::npos) << msg;
    EXPECT_NE(msg.find("32 channels"), std::string::npos) << msg;
    EXPECT_NE(msg.find("stage2.block1.norm1"), std::string::npos) << msg;
  }
  EXPECT_THROW(parse_norm_kind("batchnorm"), normkit::Error);
  EXPECT_EQ(parse_norm_kind("gn"), NormKind::group);
  EXPECT_EQ(std::string(to_string(parse_norm_kind("none"))), "none");
}

}  // namespace
}  // namespace normkit::train::test
