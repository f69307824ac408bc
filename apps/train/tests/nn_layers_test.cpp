// Global average pooling, the linear layer and softmax cross-entropy: forward against float64
// formulas, backward by finite differences.
#include <gtest/gtest.h>

#include "nn/layers.h"
#include "nn/parallel.h"
#include "nn_test_util.h"
#include "normkit/error.h"

namespace normkit::train::test {
namespace {

TEST(GlobalAvgPool, ForwardAndFiniteDifferences) {
  std::mt19937_64 rng(31);
  GlobalAvgPool pool;
  Tensor x = random_tensor(3, 5, 7, 4, rng);
  const Tensor& y = pool.forward(x);
  ASSERT_EQ(y.numel(), 12);
  for (int n = 0; n < 3; ++n)
    for (int c = 0; c < 4; ++c) {
      double s = 0;
      for (int p = 0; p < 35; ++p) s += x.data[(n * 35 + p) * 4 + c];
      EXPECT_NEAR(y.data[n * 4 + c], s / 35, 1e-6);
    }
  const std::vector<float> r = random_vector(12, rng);
  Tensor dy;
  dy.resize(3, 1, 1, 4);
  dy.data = r;
  const Tensor& dx = pool.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  auto loss = [&] { return dot(pool.forward(x), r); };
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, x.data, dx_copy, 1e-2), 1e-3, "dx");
}

TEST(Linear, ForwardAndFiniteDifferences) {
  std::mt19937_64 rng(32);
  Linear fc("fc", 7, 5);
  Rng init_rng(3);
  fc.init(init_rng);
  for (float w : fc.weight.value) EXPECT_LE(std::fabs(w), 1.0 / std::sqrt(7.0));
  Tensor x = random_tensor(3, 1, 1, 7, rng);
  const Tensor& y = fc.forward(x);
  for (int n = 0; n < 3; ++n)
    for (int o = 0; o < 5; ++o) {
      double s = fc.bias.value[o];
      for (int i = 0; i < 7; ++i) s += static_cast<double>(x.data[n * 7 + i]) * fc.weight.value[o * 7 + i];
      EXPECT_NEAR(y.data[n * 5 + o], s, 1e-6);
    }
  const std::vector<float> r = random_vector(15, rng);
  Tensor dy;
  dy.resize(3, 1, 1, 5);
  dy.data = r;
  const Tensor& dx = fc.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  const std::vector<float> dw = fc.weight.grad, db = fc.bias.grad;
  auto loss = [&] { return dot(fc.forward(x), r); };
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, x.data, dx_copy, 1e-2), 1e-3, "dx");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, fc.weight.value, dw, 1e-2), 1e-3, "dweight");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, fc.bias.value, db, 1e-2), 1e-3, "dbias");
  Tensor bad;
  bad.resize(3, 1, 1, 6);
  EXPECT_THROW(fc.forward(bad), normkit::Error);
}

TEST(SoftmaxCrossEntropy, LossAccuracyAndFiniteDifferences) {
  std::mt19937_64 rng(33);
  Tensor logits = random_tensor(4, 1, 1, 6, rng, 3.0);
  const uint8_t labels[4] = {0, 5, 2, 2};
  SoftmaxCrossEntropy ce;
  const double loss = ce.forward(logits, labels);
  double want = 0;
  int64_t correct = 0;
  for (int n = 0; n < 4; ++n) {
    double s = 0;
    int arg = 0;
    for (int j = 0; j < 6; ++j) {
      s += std::exp(static_cast<double>(logits.data[n * 6 + j]));
      if (logits.data[n * 6 + j] > logits.data[n * 6 + arg]) arg = j;
    }
    want += std::log(s) - logits.data[n * 6 + labels[n]];
    correct += arg == labels[n];
  }
  EXPECT_NEAR(loss, want / 4, 1e-9);
  EXPECT_EQ(ce.correct(), correct);
  const std::vector<float> grad(ce.gradient().data.begin(), ce.gradient().data.begin() + 24);
  auto f = [&] { return ce.forward(logits, labels); };
  EXPECT_GRADIENT_CLOSE(finite_difference(f, {}, logits.data, grad, 1e-3), 1e-3, "dlogits");
  // Large logits do not overflow.
  Tensor big;
  big.resize(1, 1, 1, 3);
  big.data = {1000.0f, -1000.0f, 999.0f};
  const uint8_t label = 2;
  EXPECT_NEAR(ce.forward(big, &label), std::log(1 + std::exp(-1.0)) + 1.0, 1e-9);
  const uint8_t bad = 3;
  EXPECT_THROW(ce.forward(big, &bad), normkit::Error);
}

}  // namespace
}  // namespace normkit::train::test
