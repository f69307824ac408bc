// fold_batch_norm: every folded value against a long-double computation of the formula (it must
// be the float32 rounding of it, within one rounding), the folded layer against the layer then
// normkit's inference BatchNorm on random inputs, in place against out of place, and rejected
// arguments leaving the outputs untouched.
#include "normkit/fold_batch_norm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <span>
#include <vector>

#include "normkit/batch_norm.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit {
namespace {

using test::expect_error;
using test::poisoned;
using test::random_normal;

// A BatchNorm after a layer: its statistics and affine parameters, each optional one present
// or not, and the layer's weight (out_channels x per_channel) and optional bias.
struct Case {
  int64_t out_channels = 0, per_channel = 0;
  double eps = 1e-5;
  std::vector<float> weight, bias, mean, var, gamma, beta;

  Case(std::mt19937_64& rng, int64_t c, int64_t k, bool with_bias, bool with_gamma,
       bool with_beta, double eps_ = 1e-5)
      : out_channels(c), per_channel(k), eps(eps_) {
    weight = random_normal(c * k, rng, 0.0, 0.3);
    if (with_bias) bias = random_normal(c, rng, 0.0, 0.5);
    mean = random_normal(c, rng, 0.2, 1.0);
    std::uniform_real_distribution<double> u(0.0, 3.0);
    var.resize(c);
    for (auto& v : var) v = float(u(rng) * u(rng));  // near-zero variances included
    if (with_gamma) gamma = random_normal(c, rng, 1.0, 0.5);
    if (with_beta) beta = random_normal(c, rng, 0.0, 0.5);
  }
  static std::span<const float> opt(const std::vector<float>& v) {
    return v.empty() ? std::span<const float>{} : std::span<const float>(v);
  }
  void fold(std::vector<float>& w_out, std::vector<float>& b_out) const {
    fold_batch_norm({.eps = eps}, weight, out_channels, opt(bias), mean, var, opt(gamma),
                    opt(beta), w_out, b_out);
  }
  long double scale(int64_t c) const {
    const long double g = gamma.empty() ? 1.0L : gamma[c];
    return g / std::sqrt(static_cast<long double>(var[c]) + eps);
  }
};

// got is the float32 rounding of `want` (within one rounding: either neighbour).
void expect_rounding_of(float got, long double want, const char* what, int64_t i) {
  const float nearest = static_cast<float>(want);
  const float ulp = std::nextafter(std::fabs(nearest), std::numeric_limits<float>::infinity()) -
                    std::fabs(nearest);
  EXPECT_LE(std::fabs(static_cast<long double>(got) - want), ulp)
      << what << "[" << i << "] = " << got << ", expected " << double(want);
}

TEST(FoldBatchNorm, IsTheFormulaRoundedOnce) {
  std::mt19937_64 rng(7);
  const int64_t channels[] = {1, 3, 7, 29};
  const int64_t per_channel[] = {0, 1, 5, 27, 75};  // linear, 3x3x3 and 5x5x3 convs
  for (int64_t c : channels)
    for (int64_t k : per_channel)
      for (int optional = 0; optional < 8; ++optional) {
        const Case cs(rng, c, k, optional & 1, optional & 2, optional & 4,
                      optional == 5 ? 0.0 : 1e-3);
        std::vector<float> w = poisoned(c * k), b = poisoned(c);
        cs.fold(w, b);
        for (int64_t o = 0; o < c; ++o) {
          const long double s = cs.scale(o);
          for (int64_t j = 0; j < k; ++j)
            expect_rounding_of(w[o * k + j], cs.weight[o * k + j] * s, "weight", o * k + j);
          const long double bias = cs.bias.empty() ? 0.0L : cs.bias[o];
          const long double beta = cs.beta.empty() ? 0.0L : cs.beta[o];
          expect_rounding_of(b[o], (bias - cs.mean[o]) * s + beta, "bias", o);
        }
      }
}

// A linear layer (out_channels x in_features) then BatchNorm in eval mode is the folded linear
// layer: the layer's output in double, rounded once, through normkit's BatchNorm, against the
// folded layer in double.
TEST(FoldBatchNorm, FoldedLinearLayerIsLayerThenInferenceBatchNorm) {
  std::mt19937_64 rng(11);
  for (int64_t c : {1, 6, 23})
    for (int64_t in : {1, 9, 31}) {
      const Case cs(rng, c, in, true, true, true);
      const int64_t n = 5;
      const std::vector<float> x = random_normal(n * in, rng, 0.5, 1.0);
      std::vector<float> z(n * c);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t o = 0; o < c; ++o) {
          double acc = cs.bias[o];
          for (int64_t j = 0; j < in; ++j) acc += double(cs.weight[o * in + j]) * x[i * in + j];
          z[i * c + o] = float(acc);
        }
      std::vector<float> bn = poisoned(n * c);
      batch_norm_forward_inference({.eps = cs.eps}, TensorView(z.data(), {n, c}), cs.gamma,
                                   cs.beta, cs.mean, cs.var, TensorView(bn.data(), {n, c}));
      std::vector<float> w = poisoned(c * in), b = poisoned(c);
      cs.fold(w, b);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t o = 0; o < c; ++o) {
          double folded = b[o];
          double magnitude = std::fabs(b[o]);
          for (int64_t j = 0; j < in; ++j) {
            folded += double(w[o * in + j]) * x[i * in + j];
            magnitude += std::fabs(double(w[o * in + j]) * x[i * in + j]);
          }
          // Both sides round a few float32 values of this size.
          EXPECT_NEAR(bn[i * c + o], folded, 1e-5 * (magnitude + std::fabs(folded)) + 1e-6)
              << "sample " << i << ", channel " << o;
        }
    }
}

TEST(FoldBatchNorm, InPlaceIsOutOfPlace) {
  std::mt19937_64 rng(3);
  const Case cs(rng, 13, 9, true, true, true);
  std::vector<float> w = poisoned(cs.weight.size()), b = poisoned(13);
  cs.fold(w, b);

  // Weight over the layer's weight, bias over the layer's bias.
  std::vector<float> w_in = cs.weight, b_in = cs.bias;
  fold_batch_norm({.eps = cs.eps}, w_in, 13, b_in, cs.mean, cs.var, cs.gamma, cs.beta, w_in,
                  b_in);
  EXPECT_TRUE(test::bitwise_equal(w_in, w));
  EXPECT_TRUE(test::bitwise_equal(b_in, b));

  // Bias over each of the other per-channel inputs.
  for (int which = 0; which < 4; ++which) {
    std::vector<float> mean = cs.mean, var = cs.var, gamma = cs.gamma, beta = cs.beta;
    std::vector<float>* target[] = {&mean, &var, &gamma, &beta};
    std::vector<float> w_out = poisoned(cs.weight.size());
    fold_batch_norm({.eps = cs.eps}, cs.weight, 13, cs.bias, mean, var, gamma, beta, w_out,
                    *target[which]);
    EXPECT_TRUE(test::bitwise_equal(w_out, w)) << which;
    EXPECT_TRUE(test::bitwise_equal(*target[which], b)) << which;
  }
}

TEST(FoldBatchNorm, NoOutputChannelsIsNothingToDo) {
  std::vector<float> w, b;
  fold_batch_norm({}, {}, 0, {}, {}, {}, {}, {}, w, b);
}

TEST(FoldBatchNorm, RejectsBadArgumentsBeforeWriting) {
  std::mt19937_64 rng(5);
  const Case cs(rng, 4, 6, true, true, true);
  std::vector<float> w = poisoned(24), b = poisoned(4);
  std::vector<float> short_vector(3, 1.0f);
  auto untouched = [&] {
    for (float v : w) EXPECT_EQ(v, test::kPoison);
    for (float v : b) EXPECT_EQ(v, test::kPoison);
  };
  auto call = [&](double eps, std::span<const float> weight, int64_t c,
                  std::span<const float> bias, std::span<const float> mean,
                  std::span<const float> var, std::span<const float> gamma,
                  std::span<const float> beta, std::span<float> w_out, std::span<float> b_out) {
    return [=] {
      fold_batch_norm({.eps = eps}, weight, c, bias, mean, var, gamma, beta, w_out, b_out);
    };
  };
  const double e = 1e-5;
  expect_error(call(e, cs.weight, -1, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta, w, b),
               {"fold_batch_norm", "out_channels must be >= 0, got -1"});
  expect_error(call(e, cs.weight, 5, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta, w, b),
               {"layer_weight has 24 elements", "multiple of out_channels = 5"});
  expect_error(call(e, cs.weight, 0, {}, {}, {}, {}, {}, w, b),
               {"layer_weight has 24 elements", "out_channels = 0"});
  expect_error(call(e, cs.weight, 4, short_vector, cs.mean, cs.var, cs.gamma, cs.beta, w, b),
               {"layer_bias has length 3, expected out_channels = 4"});
  expect_error(call(e, cs.weight, 4, cs.bias, short_vector, cs.var, cs.gamma, cs.beta, w, b),
               {"running_mean has length 3"});
  expect_error(call(e, cs.weight, 4, cs.bias, {}, cs.var, cs.gamma, cs.beta, w, b),
               {"running_mean is required"});
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, short_vector, cs.gamma, cs.beta, w, b),
               {"running_var has length 3"});
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, cs.var, short_vector, cs.beta, w, b),
               {"bn_weight has length 3"});
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, cs.var, cs.gamma, short_vector, w, b),
               {"bn_bias has length 3"});
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta,
                    std::span<float>(w).first(20), b),
               {"folded_weight has 20 elements, expected layer_weight's 24"});
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta, w, {}),
               {"folded_bias is required"});
  expect_error(call(-1e-3, cs.weight, 4, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta, w, b),
               {"eps must be finite and >= 0, got -0.001"});
  expect_error(call(std::nan(""), cs.weight, 4, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta, w,
                    b),
               {"eps must be finite and >= 0, got nan"});
  std::vector<float> bad_var = cs.var;
  bad_var[2] = -0.25f;
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, bad_var, cs.gamma, cs.beta, w, b),
               {"running_var[2] = -0.25, expected >= 0"});
  bad_var[2] = std::nanf("");
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, bad_var, cs.gamma, cs.beta, w, b),
               {"running_var[2] = nan"});
  bad_var[2] = 0.0f;
  expect_error(call(0.0, cs.weight, 4, cs.bias, cs.mean, bad_var, cs.gamma, cs.beta, w, b),
               {"running_var[2] + eps = 0"});
  // Overlaps other than exact in-place ones.
  std::vector<float> both = poisoned(28);
  expect_error(call(e, cs.weight, 4, cs.bias, cs.mean, cs.var, cs.gamma, cs.beta,
                    std::span<float>(both).first(24), std::span<float>(both).subspan(22, 4)),
               {"folded_weight overlaps folded_bias"});
  std::vector<float> shifted = cs.weight;
  shifted.push_back(0.0f);
  expect_error(call(e, std::span<const float>(shifted).first(24), 4, cs.bias, cs.mean, cs.var,
                    cs.gamma, cs.beta, std::span<float>(shifted).subspan(1), b),
               {"folded_weight overlaps layer_weight without being the same memory"});
  std::vector<float> stats = cs.mean;
  stats.insert(stats.end(), cs.var.begin(), cs.var.end());
  expect_error(call(e, cs.weight, 4, cs.bias, std::span<const float>(stats).first(4),
                    std::span<const float>(stats).subspan(4), cs.gamma, cs.beta, w,
                    std::span<float>(stats).subspan(2, 4)),
               {"folded_bias overlaps running_mean without being the same memory"});
  untouched();
}

}  // namespace
}  // namespace normkit
