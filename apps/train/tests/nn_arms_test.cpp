// The arms on normkit's newer ops: FRN (+ TLU), EvoNorm-S0 (and its variant without the
// nonlinearity) in the Norm wrapper against float64 references and finite differences, with and
// without a residual; Weight Standardization in Conv2d against a plain convolution with weights
// standardized in double, and its gradient into the raw weights by finite differences; a tiny
// training run per arm whose loss falls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "nn/conv.h"
#include "nn/norm.h"
#include "nn/parallel.h"
#include "nn_test_util.h"
#include "normkit/error.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train::test {
namespace {

constexpr int kChannels = 6, kGroups = 3;

double max_diff(const Tensor& y, const std::vector<double>& want) {
  double m = 0;
  for (size_t i = 0; i < want.size(); ++i) m = std::max(m, std::fabs(y.data[i] - want[i]));
  return m;
}

// y = relu?(op(x) + residual?) in double, with op FRN (+ TLU when fused) or EvoNorm-S0 (with
// its sigmoid gate when fused, else x / std * gamma + beta).
std::vector<double> reference(NormKind kind, const Tensor& x, const Norm& norm, bool fused,
                              bool relu, const Tensor* residual) {
  const int64_t hw = x.h * x.w, c = x.c;
  std::vector<double> y(static_cast<size_t>(x.numel()));
  auto at = [&](int64_t n, int64_t p, int64_t j) { return (n * hw + p) * c + j; };
  const int64_t width = kind == NormKind::frn ? 1 : c / kGroups;
  for (int64_t n = 0; n < x.n; ++n)
    for (int64_t c0 = 0; c0 < c; c0 += width) {
      double s = 0, ss = 0, count = 0;
      for (int64_t p = 0; p < hw; ++p)
        for (int64_t j = c0; j < c0 + width; ++j) {
          const double v = x.data[at(n, p, j)];
          s += v, ss += v * v, ++count;
        }
      double rstd;
      if (kind == NormKind::frn) {
        rstd = 1.0 / std::sqrt(ss / count + 1e-6);
      } else {
        const double mean = s / count;
        double var = 0;
        for (int64_t p = 0; p < hw; ++p)
          for (int64_t j = c0; j < c0 + width; ++j)
            var += (x.data[at(n, p, j)] - mean) * (x.data[at(n, p, j)] - mean);
        rstd = 1.0 / std::sqrt(var / count + 1e-5);
      }
      for (int64_t p = 0; p < hw; ++p)
        for (int64_t j = c0; j < c0 + width; ++j) {
          const double v = x.data[at(n, p, j)];
          double o;
          if (kind == NormKind::frn) {
            o = v * rstd * norm.weight.value[j] + norm.bias.value[j];
            if (fused) o = std::max(o, static_cast<double>(norm.extra.value[j]));
          } else {
            const double gate = fused ? 1.0 / (1.0 + std::exp(-norm.extra.value[j] * v)) : 1.0;
            o = v * gate * rstd * norm.weight.value[j] + norm.bias.value[j];
          }
          if (residual) o += residual->data[at(n, p, j)];
          if (residual && relu) o = std::max(o, 0.0);
          y[at(n, p, j)] = o;
        }
    }
  return y;
}

struct Case {
  NormKind kind;
  bool relu, residual;
};

class ArmNormTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { set_threads(1); }
};

// A Norm of the case with random parameters; tau and v of either sign.
Norm make(const Case& cs, std::mt19937_64& rng) {
  Norm norm("n", cs.kind, kChannels, kGroups, false, cs.relu, cs.residual);
  norm.bias.value = random_vector(kChannels, rng, 0.5);
  norm.weight.value = random_vector(kChannels, rng, 1.0, 0.5);
  if (norm.extra.size() > 0) norm.extra.value = random_vector(kChannels, rng, 0.5);
  return norm;
}

TEST_P(ArmNormTest, ParametersAreTheKindsOwn) {
  const Case cs = GetParam();
  std::mt19937_64 rng(30);
  Norm norm = make(cs, rng);
  const bool fused = cs.relu && !cs.residual;
  ASSERT_EQ(norm.params().size(), fused ? 3u : 2u);
  if (fused) {
    EXPECT_EQ(norm.extra.name, cs.kind == NormKind::frn ? "n.tau" : "n.v");
    EXPECT_EQ(norm.params()[2], &norm.extra);
    Norm fresh("n", cs.kind, kChannels, kGroups, false, true);
    // tau starts at 0 (a ReLU), v at 1.
    for (float v : fresh.extra.value) EXPECT_EQ(v, cs.kind == NormKind::frn ? 0.0f : 1.0f);
  }
  EXPECT_TRUE(norm.buffers().empty());
}

TEST_P(ArmNormTest, ForwardMatchesReferenceInEveryMode) {
  const Case cs = GetParam();
  std::mt19937_64 rng(31);
  Norm norm = make(cs, rng);
  const Tensor x = random_tensor(3, 5, 3, kChannels, rng, 2.0, 0.5);
  const Tensor r = random_tensor(3, 5, 3, kChannels, rng);
  const Tensor* residual = cs.residual ? &r : nullptr;
  const std::vector<double> want =
      reference(cs.kind, x, norm, cs.relu && !cs.residual, cs.relu, residual);
  for (Mode mode : {Mode::train, Mode::eval, Mode::eval_batch_stats}) {
    EXPECT_LT(max_diff(norm.forward(x, mode, residual), want), 2e-5);
  }
}

TEST_P(ArmNormTest, BackwardMatchesFiniteDifferences) {
  const Case cs = GetParam();
  std::mt19937_64 rng(32);
  Norm norm = make(cs, rng);
  Tensor x = random_tensor(2, 3, 5, kChannels, rng, 1.5, 0.3);
  Tensor res = random_tensor(2, 3, 5, kChannels, rng);
  const Tensor* residual = cs.residual ? &res : nullptr;
  const Tensor& y0 = norm.forward(x, Mode::train, residual);
  const std::vector<float> r = random_vector(static_cast<size_t>(y0.numel()), rng);
  Tensor dy;
  dy.resize_like(y0);
  dy.data = r;
  for (Param* p : norm.params()) std::fill(p->grad.begin(), p->grad.end(), NAN);
  const Tensor& dx = norm.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  const std::vector<float> dres = norm.residual_grad().data;
  const std::vector<float> dw = norm.weight.grad, db = norm.bias.grad, de = norm.extra.grad;
  auto loss = [&] { return dot(norm.forward(x, Mode::train, residual), r); };
  // Which side of the TLU's or the ReLU's kink each output is on.
  std::function<std::vector<uint8_t>()> pattern;
  const bool tlu = cs.kind == NormKind::frn && cs.relu && !cs.residual;
  if (tlu || (cs.relu && cs.residual))
    pattern = [&] {
      std::vector<uint8_t> p;
      const Tensor& y = norm.forward(x, Mode::train, residual);
      for (int64_t i = 0; i < y.numel(); ++i)
        p.push_back(tlu ? y.data[i] > norm.extra.value[i % kChannels] : y.data[i] > 0.0f);
      return p;
    };
  const double h = 1e-3;
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, x.data, dx_copy, h), 2e-2, "dx");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, norm.bias.value, db, h), 2e-2, "dbias");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, norm.weight.value, dw, h), 2e-2,
                        "dweight");
  if (norm.extra.size() > 0) {
    const FdResult fd = finite_difference(loss, pattern, norm.extra.value, de, h);
    EXPECT_GT(fd.checked, 0);
    EXPECT_LE(fd.max_error, 2e-2 * fd.max_gradient + 1e-4) << "dtau / dv";
  }
  if (cs.residual)
    EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, res.data, dres, h), 2e-2, "dresidual");
}

INSTANTIATE_TEST_SUITE_P(
    Arms, ArmNormTest,
    ::testing::Values(Case{NormKind::frn, true, false}, Case{NormKind::frn, false, false},
                      Case{NormKind::frn, true, true}, Case{NormKind::evonorm, true, false},
                      Case{NormKind::evonorm, false, false}, Case{NormKind::evonorm, true, true}),
    [](const auto& info) {
      const Case& c = info.param;
      return std::string(to_string(c.kind)) + (c.relu ? "_relu" : "") +
             (c.residual ? "_residual" : "");
    });

TEST(ArmNorm, EvoNormRefusesGroupsThatDoNotDivideAndNamesTheOption) {
  try {
    Norm("stage2.block1.norm1", NormKind::evonorm, 32, 6, false, true);
    FAIL() << "no error";
  } catch (const normkit::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("--groups 6"), std::string::npos) << msg;
    EXPECT_NE(msg.find("stage2.block1.norm1"), std::string::npos) << msg;
  }
  EXPECT_THROW(Norm("n", NormKind::group_ws, 32, 6, false, true), normkit::Error);
  for (const char* name : {"gn+ws", "frn", "evonorm"})
    EXPECT_EQ(std::string(to_string(parse_norm_kind(name))), name);
  EXPECT_THROW(parse_norm_kind("gn+frn"), normkit::Error);
}

// Each output channel's row standardized in double.
std::vector<float> standardized(const std::vector<float>& w, int out) {
  const size_t k = w.size() / static_cast<size_t>(out);
  std::vector<float> o(w.size());
  for (size_t co = 0; co < static_cast<size_t>(out); ++co) {
    double s = 0, v = 0;
    for (size_t i = 0; i < k; ++i) s += w[co * k + i];
    const double mean = s / static_cast<double>(k);
    for (size_t i = 0; i < k; ++i) v += (w[co * k + i] - mean) * (w[co * k + i] - mean);
    const double rstd = 1.0 / std::sqrt(v / static_cast<double>(k) + 1e-5);
    for (size_t i = 0; i < k; ++i) o[co * k + i] = static_cast<float>((w[co * k + i] - mean) * rstd);
  }
  return o;
}

struct ConvCase {
  int in, out, kernel, stride;
};

class StandardizedConvTest : public ::testing::TestWithParam<ConvCase> {
 protected:
  void SetUp() override { set_threads(1); }
};

TEST_P(StandardizedConvTest, ForwardIsThePlainConvOfStandardizedWeights) {
  const ConvCase cc = GetParam();
  std::mt19937_64 rng(40);
  Conv2d ws("c", cc.in, cc.out, cc.kernel, cc.stride), plain("p", cc.in, cc.out, cc.kernel, cc.stride);
  ws.set_standardize(true);
  ws.weight.value = random_vector(ws.weight.size(), rng, 0.3, 0.1);
  plain.weight.value = standardized(ws.weight.value, cc.out);
  const Tensor x = random_tensor(3, 7, 5, cc.in, rng);
  const Tensor& y = ws.forward(x);
  const Tensor& want = plain.forward(x);
  ASSERT_TRUE(y.same_shape(want));
  double m = 0, scale = 0;
  for (int64_t i = 0; i < y.numel(); ++i) {
    m = std::max(m, static_cast<double>(std::fabs(y.data[i] - want.data[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want.data[i])));
  }
  EXPECT_LT(m, 1e-5 * scale + 1e-6);
  // The raw weights stay the parameter.
  EXPECT_NE(ws.weight.value, plain.weight.value);
}

TEST_P(StandardizedConvTest, BackwardReachesTheRawWeights) {
  const ConvCase cc = GetParam();
  std::mt19937_64 rng(41);
  Conv2d conv("c", cc.in, cc.out, cc.kernel, cc.stride);
  conv.set_standardize(true);
  conv.weight.value = random_vector(conv.weight.size(), rng, 0.3, 0.1);
  Tensor x = random_tensor(2, 5, 6, cc.in, rng);
  const Tensor& y0 = conv.forward(x);
  const std::vector<float> r = random_vector(static_cast<size_t>(y0.numel()), rng);
  Tensor dy;
  dy.resize_like(y0);
  dy.data = r;
  std::fill(conv.weight.grad.begin(), conv.weight.grad.end(), NAN);
  const Tensor& dx = conv.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  const std::vector<float> dw = conv.weight.grad;
  auto loss = [&] { return dot(conv.forward(x), r); };
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, nullptr, x.data, dx_copy, 1e-3), 2e-2, "dx");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, nullptr, conv.weight.value, dw, 1e-3), 2e-2,
                        "dweight");
  // Standardization makes the loss blind to a row's shift and scale: dw is orthogonal to both.
  const size_t k = dw.size() / static_cast<size_t>(cc.out);
  for (size_t co = 0; co < static_cast<size_t>(cc.out); ++co) {
    double s = 0, sw = 0, norm = 0;
    for (size_t i = 0; i < k; ++i) {
      s += dw[co * k + i];
      sw += static_cast<double>(dw[co * k + i]) * conv.weight.value[co * k + i];
      norm += std::fabs(dw[co * k + i]);
    }
    EXPECT_LT(std::fabs(s), 1e-3 * norm + 1e-6) << "row " << co;
    EXPECT_LT(std::fabs(sw), 1e-3 * norm + 1e-6) << "row " << co;
  }
}

// The tap-by-tap route (3x3 stride 1, >= 4 inputs), im2col (stride 2; 1 input) and a 1x1
// shortcut.
INSTANTIATE_TEST_SUITE_P(Routes, StandardizedConvTest,
                         ::testing::Values(ConvCase{5, 7, 3, 1}, ConvCase{5, 6, 3, 2},
                                           ConvCase{1, 4, 3, 1}, ConvCase{5, 6, 1, 2}));

class ArmTrainingTest : public ::testing::TestWithParam<NormKind> {};

TEST_P(ArmTrainingTest, TinyRunLossFalls) {
  const TrainOutcome o = train_run(tiny_config(GetParam(), ""), tiny_data());
  ASSERT_TRUE(o.finished);
  ASSERT_EQ(o.run.history.size(), 3u);
  EXPECT_EQ(o.run.norm, to_string(GetParam()));
  EXPECT_EQ(o.run.groups, uses_groups(GetParam()) ? 2 : 0);
  EXPECT_TRUE(std::isfinite(o.run.history.back().train_loss));
  EXPECT_LT(o.run.history.back().train_loss, o.run.history.front().train_loss);
}

INSTANTIATE_TEST_SUITE_P(Arms, ArmTrainingTest,
                         ::testing::Values(NormKind::group_ws, NormKind::frn, NormKind::evonorm,
                                           NormKind::batch_renorm),
                         [](const auto& info) {
                           return std::string(info.param == NormKind::group_ws
                                                  ? "gn_ws"
                                                  : to_string(info.param));
                         });


// ---- brn: Batch Renormalization -------------------------------------------------------------

// A bn and a brn Norm with the same random affine and running statistics.
struct BnPair {
  Norm bn, brn;
};
BnPair make_pair(bool relu, bool residual, std::mt19937_64& rng) {
  BnPair p{Norm("n", NormKind::batch, kChannels, 0, false, relu, residual),
           Norm("n", NormKind::batch_renorm, kChannels, 0, false, relu, residual)};
  p.bn.weight.value = p.brn.weight.value = random_vector(kChannels, rng, 1.0, 0.5);
  p.bn.bias.value = p.brn.bias.value = random_vector(kChannels, rng, 0.5);
  const std::vector<float> mean = random_vector(kChannels, rng, 1.0);
  std::vector<float> var = random_vector(kChannels, rng, 0.5);
  for (float& v : var) v = 0.3f + v * v;
  for (Norm* n : {&p.bn, &p.brn}) {
    *n->buffers()[0].values = mean;
    *n->buffers()[1].values = var;
  }
  return p;
}

class BrnTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {
 protected:
  void SetUp() override { set_threads(1); }
};

TEST_P(BrnTest, UnitLimitsAreBatchNormForwardAndBackward) {
  const auto [relu, residual] = GetParam();
  std::mt19937_64 rng(40);
  BnPair p = make_pair(relu, residual, rng);
  p.brn.set_renorm_limits(1.0, 0.0);
  const Tensor x = random_tensor(3, 5, 3, kChannels, rng, 2.0, 0.5);
  const Tensor r = random_tensor(3, 5, 3, kChannels, rng);
  const Tensor dy = random_tensor(3, 5, 3, kChannels, rng);
  const Tensor* res = residual ? &r : nullptr;
  const Tensor& yb = p.bn.forward(x, Mode::train, res);
  const Tensor& yr = p.brn.forward(x, Mode::train, res);
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_NEAR(yr.data[i], yb.data[i], 2e-6) << i;
  // The running statistics: bn's update (momentum 0.1, unbiased variance), bit for bit.
  EXPECT_EQ(p.brn.running_mean(), p.bn.running_mean());
  EXPECT_EQ(p.brn.running_var(), p.bn.running_var());
  const Tensor& db = p.bn.backward(dy);
  const Tensor& dr = p.brn.backward(dy);
  for (int64_t i = 0; i < x.numel(); ++i) ASSERT_NEAR(dr.data[i], db.data[i], 2e-5) << i;
  for (int j = 0; j < kChannels; ++j) {
    EXPECT_NEAR(p.brn.weight.grad[j], p.bn.weight.grad[j], 2e-4) << j;
    EXPECT_NEAR(p.brn.bias.grad[j], p.bn.bias.grad[j], 2e-4) << j;
  }
  if (residual)
    for (int64_t i = 0; i < x.numel(); ++i)
      ASSERT_EQ(p.brn.residual_grad().data[i], p.bn.residual_grad().data[i]) << i;
  // Evaluation is bn's with the running statistics, bit for bit.
  const Tensor& eb = p.bn.forward(x, Mode::eval, res);
  const std::vector<float> eval_bn = eb.data;
  EXPECT_EQ(p.brn.forward(x, Mode::eval, res).data, eval_bn);
}

// r and d clipped for some channels and not for others, against the paper's formula in double:
// y = relu?(w (xhat r + d) + b + residual?), dx = w r invstd (g - mean g - xhat mean(g xhat)),
// dw = sum g (xhat r + d), db = sum g, g = dy masked by the ReLU.
TEST_P(BrnTest, ActiveRenormMatchesTheFormulaInDouble) {
  const auto [relu, residual] = GetParam();
  std::mt19937_64 rng(41);
  BnPair p = make_pair(relu, residual, rng);
  Norm& norm = p.brn;
  const double r_max = 1.4, d_max = 1.2;
  norm.set_renorm_limits(r_max, d_max);
  const Tensor x = random_tensor(4, 3, 5, kChannels, rng, 1.5, 0.3);
  const Tensor rt = random_tensor(4, 3, 5, kChannels, rng);
  const Tensor dy = random_tensor(4, 3, 5, kChannels, rng);
  const Tensor* res = residual ? &rt : nullptr;
  const std::vector<float> rm = norm.running_mean(), rv = norm.running_var();
  const std::vector<float> y = norm.forward(x, Mode::train, res).data;
  const Tensor& dx = norm.backward(dy);
  const int64_t m = x.n * x.h * x.w, c = kChannels;
  int clipped_r = 0, clipped_d = 0;
  for (int64_t j = 0; j < c; ++j) {
    double s = 0;
    for (int64_t i = 0; i < m; ++i) s += x.data[i * c + j];
    const double mean = s / m;
    double var = 0;
    for (int64_t i = 0; i < m; ++i) var += (x.data[i * c + j] - mean) * (x.data[i * c + j] - mean);
    const double unbiased = var / (m - 1);
    var /= m;
    const double sigma = std::sqrt(var + 1e-5), sigma_run = std::sqrt(rv[j] + 1e-5);
    const double r = std::clamp(sigma / sigma_run, 1 / r_max, r_max);
    const double d = std::clamp((mean - rm[j]) / sigma_run, -d_max, d_max);
    clipped_r += r == r_max || r == 1 / r_max;
    clipped_d += std::fabs(d) == d_max;
    const double w = norm.weight.value[j], b = norm.bias.value[j];
    std::vector<double> g(static_cast<size_t>(m)), xhat(static_cast<size_t>(m));
    double sg = 0, sgx = 0, dw = 0;
    for (int64_t i = 0; i < m; ++i) {
      xhat[i] = (x.data[i * c + j] - mean) / sigma;
      double o = w * (xhat[i] * r + d) + b + (res ? rt.data[i * c + j] : 0.0);
      if (relu) o = std::max(o, 0.0);
      ASSERT_NEAR(y[i * c + j], o, 2e-5 * (1 + std::fabs(o))) << "channel " << j;
      g[i] = !relu || o > 0 ? dy.data[i * c + j] : 0.0;
      sg += g[i], sgx += g[i] * xhat[i], dw += g[i] * (xhat[i] * r + d);
    }
    EXPECT_NEAR(norm.bias.grad[j], sg, 1e-4 * (1 + std::fabs(sg)));
    EXPECT_NEAR(norm.weight.grad[j], dw, 1e-4 * (1 + std::fabs(dw)));
    for (int64_t i = 0; i < m; ++i) {
      const double want = w * r / sigma * (g[i] - sg / m - xhat[i] * sgx / m);
      ASSERT_NEAR(dx.data[i * c + j], want, 1e-4 * (1 + std::fabs(want))) << "channel " << j;
    }
    // The running statistics move towards the batch's by bn's momentum 0.1.
    EXPECT_NEAR(norm.running_mean()[j], 0.9 * rm[j] + 0.1 * mean, 1e-5);
    EXPECT_NEAR(norm.running_var()[j], 0.9 * rv[j] + 0.1 * unbiased, 1e-5);
  }
  // The case exercises both sides of each clip.
  EXPECT_GT(clipped_r, 0);
  EXPECT_LT(clipped_r, c);
  EXPECT_GT(clipped_d, 0);
  EXPECT_LT(clipped_d, c);
}

INSTANTIATE_TEST_SUITE_P(Epilogues, BrnTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

TEST(Brn, RefusesBadLimitsAndSyncNamingTheValue) {
  Norm norm("n", NormKind::batch_renorm, kChannels, 0, false, true);
  auto message = [&](double r_max, double d_max) -> std::string {
    try {
      norm.set_renorm_limits(r_max, d_max);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_NE(message(0.5, 1).find("r_max 0.5"), std::string::npos) << message(0.5, 1);
  EXPECT_NE(message(2, -1).find("d_max -1"), std::string::npos) << message(2, -1);
  EXPECT_NE(message(NAN, 1).find("r_max nan"), std::string::npos) << message(NAN, 1);
  EXPECT_EQ(message(1, 0), "");
  // Only BatchNorm synchronizes.
  struct Nobody : DeviceExchange {
    std::span<const double> exchange(std::span<const double> mine) override { return mine; }
  } nobody;
  EXPECT_THROW(norm.set_sync({&nobody, 0, 4}), Error);
  EXPECT_EQ(norm.buffers().size(), 2u);
  EXPECT_EQ(norm.buffers()[0].name, "n.running_mean");
  EXPECT_EQ(norm.buffers()[1].name, "n.running_var");
}

TEST(Brn, WarmupRelaxesTheLimitsLinearlyOnTheGlobalStep) {
  TrainConfig c;
  c.model.norm = NormKind::batch_renorm;
  c.renorm_r_max = 3, c.renorm_d_max = 5, c.renorm_warmup = 0.25;
  // 400 steps: the limits reach theirs at step 100.
  auto at = [&](int64_t step) { return renorm_limits(c, step, 400); };
  EXPECT_EQ(at(0), std::make_pair(1.0, 0.0));
  EXPECT_DOUBLE_EQ(at(25).first, 1.5);
  EXPECT_DOUBLE_EQ(at(25).second, 1.25);
  EXPECT_DOUBLE_EQ(at(50).first, 2.0);
  EXPECT_DOUBLE_EQ(at(50).second, 2.5);
  EXPECT_DOUBLE_EQ(at(99).first, 1 + 2 * 0.99);
  EXPECT_EQ(at(100), std::make_pair(3.0, 5.0));
  EXPECT_EQ(at(399), std::make_pair(3.0, 5.0));
  c.renorm_warmup = 0;
  EXPECT_EQ(at(0), std::make_pair(3.0, 5.0));
  c.renorm_warmup = 1;
  EXPECT_DOUBLE_EQ(at(200).first, 2.0);
  EXPECT_DOUBLE_EQ(at(200).second, 2.5);
}

TEST(Brn, ValidateNamesTheOptionAndValue) {
  auto message = [](const TrainConfig& c) -> std::string {
    try {
      validate(c);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  TrainConfig c;
  c.model.norm = NormKind::batch_renorm;
  EXPECT_EQ(message(c), "");
  c.renorm_r_max = 0.9;
  EXPECT_NE(message(c).find("--renorm-r-max 0.9"), std::string::npos) << message(c);
  c.renorm_r_max = 3, c.renorm_d_max = -0.5;
  EXPECT_NE(message(c).find("--renorm-d-max -0.5"), std::string::npos) << message(c);
  c.renorm_d_max = 5, c.renorm_warmup = 1.5;
  EXPECT_NE(message(c).find("--renorm-warmup 1.5"), std::string::npos) << message(c);
  c.renorm_warmup = 0.25, c.sync_bn = true, c.devices = 2;
  EXPECT_NE(message(c).find("--sync-bn with --norm brn"), std::string::npos) << message(c);
  TrainConfig g;
  g.model.norm = NormKind::group;
  g.renorm_d_max = 2;
  EXPECT_NE(message(g).find("--renorm-d-max 2 with --norm gn"), std::string::npos) << message(g);
}

}  // namespace
}  // namespace normkit::train::test
