// Layer objects: running statistics over several steps against hand-computed expectations
// (momentum and the cumulative average), train/eval behaviour, forward/backward equal to the
// free functions they wrap (with and without the fused epilogue), the gradient contract, and
// rejected arguments.
#include "normkit/layers.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "normkit/normkit.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit {
namespace {

using test::expect_error;
using test::poisoned;
using test::random_normal;

// Per-channel batch mean and biased variance of an (N, C, S) channels-first tensor, in double.
struct ChannelStats {
  std::vector<double> mean, var;
};
ChannelStats channel_stats(const std::vector<float>& x, int64_t N, int64_t C, int64_t S) {
  ChannelStats st{std::vector<double>(C), std::vector<double>(C)};
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) sum += x[(n * C + c) * S + s];
    const double mean = sum / double(N * S);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) sq += std::pow(x[(n * C + c) * S + s] - mean, 2);
    st.mean[c] = mean;
    st.var[c] = sq / double(N * S);
  }
  return st;
}

void expect_close(const std::vector<float>& got, const std::vector<double>& want, double rel,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], want[i], rel * (std::fabs(want[i]) + 1e-3)) << what << "[" << i << "]";
}

// ---- BatchNorm ----

TEST(BatchNormLayer, StartsAsTorchDoes) {
  BatchNorm bn(3);
  EXPECT_TRUE(bn.is_training());
  EXPECT_EQ(bn.weight, std::vector<float>(3, 1.0f));
  EXPECT_EQ(bn.bias, std::vector<float>(3, 0.0f));
  EXPECT_EQ(bn.running_mean, std::vector<float>(3, 0.0f));
  EXPECT_EQ(bn.running_var, std::vector<float>(3, 1.0f));
  EXPECT_EQ(bn.num_batches_tracked, 0);
  EXPECT_EQ(bn.options.momentum, 0.1);
  EXPECT_EQ(bn.options.eps, 1e-5);
  BatchNorm plain(3, {.affine = false, .track_running_stats = false});
  EXPECT_TRUE(plain.weight.empty() && plain.bias.empty() && plain.weight_grad.empty());
  EXPECT_TRUE(plain.running_mean.empty() && plain.running_var.empty());
}

// Running statistics after several steps, with momentum and with the cumulative average.
TEST(BatchNormLayer, RunningStatisticsOverSeveralSteps) {
  const int64_t N = 4, C = 3, S = 6;
  for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>(0.7),
                                         std::optional<double>()}) {
    SCOPED_TRACE(momentum ? "momentum " + std::to_string(*momentum) : "cumulative average");
    BatchNorm bn(C, {.momentum = momentum});
    bn.context.num_threads = 2;
    std::vector<double> rm(C, 0.0), rv(C, 1.0);
    std::vector<double> sum_means(C, 0.0), sum_vars(C, 0.0);
    std::mt19937_64 rng(1);
    for (int step = 1; step <= 5; ++step) {
      const auto x = random_normal(N * C * S, rng, 3.0 * step, 1.0 + step);
      std::vector<float> y = poisoned(x.size());
      bn.forward(TensorView(x.data(), {N, C, 2, 3}), TensorView(y.data(), {N, C, 2, 3}));
      const ChannelStats st = channel_stats(x, N, C, S);
      for (int64_t c = 0; c < C; ++c) {
        const double unbiased = st.var[c] * double(N * S) / double(N * S - 1);
        sum_means[c] += st.mean[c];
        sum_vars[c] += unbiased;
        if (momentum) {
          rm[c] = (1 - *momentum) * rm[c] + *momentum * st.mean[c];
          rv[c] = (1 - *momentum) * rv[c] + *momentum * unbiased;
        } else {
          // The running statistics are the plain averages of every batch's statistics.
          rm[c] = sum_means[c] / step;
          rv[c] = sum_vars[c] / step;
        }
        // Training normalizes with the batch statistics (biased variance).
        for (int64_t n = 0; n < N; ++n)
          for (int64_t s = 0; s < S; ++s) {
            const std::size_t i = std::size_t((n * C + c) * S + s);
            EXPECT_NEAR(y[i], (x[i] - st.mean[c]) / std::sqrt(st.var[c] + 1e-5), 2e-5);
          }
      }
      EXPECT_EQ(bn.num_batches_tracked, step);
      expect_close(bn.running_mean, rm, 1e-5, "running_mean after step " + std::to_string(step));
      expect_close(bn.running_var, rv, 1e-5, "running_var after step " + std::to_string(step));
    }
  }
}

TEST(BatchNormLayer, EvalUsesRunningStatisticsAndUpdatesNothing) {
  const int64_t N = 3, C = 4, H = 5;
  std::mt19937_64 rng(2);
  BatchNorm bn(C);
  bn.weight = random_normal(C, rng, 1.0, 0.3);
  bn.bias = random_normal(C, rng);
  const auto x0 = random_normal(N * C * H, rng, 2, 3);
  std::vector<float> y(x0.size());
  bn.forward(TensorView(x0.data(), {N, C, H}), TensorView(y.data(), {N, C, H}));
  const auto rm = bn.running_mean, rv = bn.running_var;

  bn.eval();
  EXPECT_FALSE(bn.is_training());
  const auto x = random_normal(N * C * H, rng, -1, 2);
  y = poisoned(x.size());
  bn.forward(TensorView(x.data(), {N, C, H}), TensorView(y.data(), {N, C, H}));
  EXPECT_EQ(bn.running_mean, rm);
  EXPECT_EQ(bn.running_var, rv);
  EXPECT_EQ(bn.num_batches_tracked, 1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < H; ++h) {
        const std::size_t i = std::size_t((n * C + c) * H + h);
        const double want =
            (x[i] - rm[c]) / std::sqrt(double(rv[c]) + 1e-5) * bn.weight[c] + bn.bias[c];
        EXPECT_NEAR(y[i], want, 1e-5 * (1 + std::fabs(want)));
      }
  // One sample is fine in eval mode (no batch statistics are needed)...
  std::vector<float> y1(C);
  bn.forward(TensorView(x.data(), {1, C}), TensorView(y1.data(), {1, C}));
  // ...and rejected in training mode, with torch's message, changing nothing.
  bn.train();
  expect_error([&] { bn.forward(TensorView(x.data(), {1, C}), TensorView(y1.data(), {1, C})); },
               {"Expected more than 1 value per channel when training, got input size (1, 4)"});
  EXPECT_EQ(bn.num_batches_tracked, 1);
  EXPECT_EQ(bn.running_mean, rm);
}

TEST(BatchNormLayer, WithoutRunningStatisticsEvalUsesTheBatch) {
  const int64_t N = 5, C = 2, S = 4;
  std::mt19937_64 rng(3);
  BatchNorm bn(C, {.track_running_stats = false});
  bn.eval();
  const auto x = random_normal(N * C * S, rng, 4, 2);
  std::vector<float> y = poisoned(x.size());
  bn.forward(TensorView(x.data(), {N, C, S}), TensorView(y.data(), {N, C, S}));
  const ChannelStats st = channel_stats(x, N, C, S);
  for (std::size_t i = 0; i < x.size(); ++i) {
    const auto c = (i / S) % C;
    EXPECT_NEAR(y[i], (x[i] - st.mean[c]) / std::sqrt(st.var[c] + 1e-5), 1e-5);
  }
  EXPECT_EQ(bn.num_batches_tracked, 0);
}

// eval_batch_stats: eval normalizes as training does (bitwise) but leaves the running statistics
// and the count alone; its backward goes through the batch statistics, as training's.
TEST(BatchNormLayer, EvalWithBatchStatisticsUpdatesNothing) {
  const int64_t N = 4, C = 3, S = 5;
  std::mt19937_64 rng(13);
  const auto x = random_normal(N * C * S, rng, 2, 3), dy = random_normal(N * C * S, rng);
  const TensorView xv(x.data(), {N, C, S}), dyv(dy.data(), {N, C, S});
  BatchNorm bn(C), trained(C);
  bn.weight = trained.weight = random_normal(C, rng, 1, 0.5);
  bn.bias = trained.bias = random_normal(C, rng);
  std::vector<float> y = poisoned(x.size()), yt = poisoned(x.size());
  bn.forward(xv, TensorView(y.data(), {N, C, S}));  // running statistics move off (0, 1)
  const auto rm = bn.running_mean, rv = bn.running_var;
  bn.eval();
  bn.options.eval_batch_stats = true;
  y = poisoned(x.size());
  bn.forward(xv, TensorView(y.data(), {N, C, S}));
  trained.forward(xv, TensorView(yt.data(), {N, C, S}));
  EXPECT_TRUE(test::bitwise_equal(y, yt));
  EXPECT_EQ(bn.running_mean, rm);
  EXPECT_EQ(bn.running_var, rv);
  EXPECT_EQ(bn.num_batches_tracked, 1);
  std::vector<float> dx = poisoned(x.size()), dxt = poisoned(x.size());
  bn.backward(dyv, TensorView(dx.data(), {N, C, S}));
  trained.backward(dyv, TensorView(dxt.data(), {N, C, S}));
  EXPECT_TRUE(test::bitwise_equal(dx, dxt));
  EXPECT_TRUE(test::bitwise_equal(bn.weight_grad, trained.weight_grad));
  // Switched off again, eval uses the running statistics.
  bn.options.eval_batch_stats = false;
  bn.forward(xv, TensorView(y.data(), {N, C, S}));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const auto c = (i / S) % C;
    EXPECT_NEAR(y[i], (x[i] - rm[c]) / std::sqrt(double(rv[c]) + 1e-5) * bn.weight[c] + bn.bias[c],
                1e-5 * (1 + std::fabs(y[i])));
  }
}

// forward/backward equal the free functions, in both modes; gradients are overwritten.
TEST(BatchNormLayer, BackwardIsTheFunctionalBackwardAndOverwritesGradients) {
  const int64_t N = 3, C = 5, H = 4, W = 3;
  std::mt19937_64 rng(4);
  const auto cl = MemoryFormat::channels_last;
  for (bool training : {true, false}) {
    SCOPED_TRACE(training ? "train" : "eval");
    BatchNorm bn(C);
    bn.weight = random_normal(C, rng, 1, 0.5);
    bn.bias = random_normal(C, rng);
    bn.running_mean = random_normal(C, rng);
    bn.running_var = random_normal(C, rng, 2, 0.2);
    const auto rm0 = bn.running_mean, rv0 = bn.running_var;
    bn.train(training);
    const auto x = random_normal(N * C * H * W, rng, 1, 2);
    const auto dy = random_normal(x.size(), rng);
    const TensorView xv(x.data(), {N, C, H, W}, cl), dyv(dy.data(), {N, C, H, W}, cl);
    std::vector<float> y = poisoned(x.size()), dx = poisoned(x.size());
    bn.forward(xv, TensorView(y.data(), {N, C, H, W}, cl));
    bn.backward(dyv, TensorView(dx.data(), {N, C, H, W}, cl));

    // The same through the free functions.
    std::vector<float> fy = poisoned(x.size()), fdx = poisoned(x.size()), mean(C), invstd(C);
    std::vector<float> dw = poisoned(C), db = poisoned(C), rm = rm0, rv = rv0;
    if (training) {
      batch_norm_forward_training({}, xv, bn.weight, bn.bias, TensorView(fy.data(), {N, C, H, W}, cl),
                                  mean, invstd, rm, rv);
      batch_norm_backward_training({}, dyv, xv, mean, invstd, bn.weight,
                                   TensorView(fdx.data(), {N, C, H, W}, cl), dw, db);
    } else {
      batch_norm_forward_inference({}, xv, bn.weight, bn.bias, rm, rv,
                                   TensorView(fy.data(), {N, C, H, W}, cl));
      batch_norm_backward_inference({}, dyv, xv, rm, rv, bn.weight,
                                    TensorView(fdx.data(), {N, C, H, W}, cl), dw, db);
    }
    EXPECT_EQ(y, fy);
    EXPECT_EQ(dx, fdx);
    EXPECT_EQ(bn.weight_grad, dw);
    EXPECT_EQ(bn.bias_grad, db);
    EXPECT_EQ(bn.running_mean, rm);
    EXPECT_EQ(bn.running_var, rv);
    // A second backward gives the same gradients: they are overwritten, not added to.
    bn.backward(dyv, TensorView(dx.data(), {N, C, H, W}, cl));
    EXPECT_EQ(bn.weight_grad, dw);
    EXPECT_EQ(bn.bias_grad, db);
  }
}

// backward follows the mode of the forward it belongs to, not the current one.
TEST(BatchNormLayer, BackwardUsesTheModeOfItsForward) {
  const int64_t N = 4, C = 2, S = 3;
  std::mt19937_64 rng(5);
  const auto x = random_normal(N * C * S, rng), dy = random_normal(N * C * S, rng);
  BatchNorm a(C), b(C);
  std::vector<float> y(x.size()), dxa(x.size()), dxb(x.size());
  a.forward(TensorView(x.data(), {N, C, S}), TensorView(y.data(), {N, C, S}));
  b.forward(TensorView(x.data(), {N, C, S}), TensorView(y.data(), {N, C, S}));
  a.eval();
  a.backward(TensorView(dy.data(), {N, C, S}), TensorView(dxa.data(), {N, C, S}));
  b.backward(TensorView(dy.data(), {N, C, S}), TensorView(dxb.data(), {N, C, S}));
  EXPECT_EQ(dxa, dxb);
}

TEST(BatchNormLayer, EmptyBatchCountsButLeavesStatisticsAsTorch) {
  BatchNorm bn(3);
  std::vector<float> x(1), y(1);
  bn.forward(TensorView(x.data(), {0, 3, 4}), TensorView(y.data(), {0, 3, 4}));
  EXPECT_EQ(bn.num_batches_tracked, 1);  // torch 1.13 counts it too
  EXPECT_EQ(bn.running_mean, std::vector<float>(3, 0.0f));
  EXPECT_EQ(bn.running_var, std::vector<float>(3, 1.0f));
  bn.backward(TensorView(x.data(), {0, 3, 4}), TensorView(y.data(), {0, 3, 4}));
  EXPECT_EQ(bn.weight_grad, std::vector<float>(3, 0.0f));
}

// The fused epilogue is, bit for bit, the plain layer followed by the residual add and the ReLU
// (the same float operations in the same order); its backward is the plain backward of the
// masked dy, and dresidual is that masked dy.
TEST(BatchNormLayer, FusedEpilogueIsThePlainLayerThenAddAndRelu) {
  std::mt19937_64 rng(21);
  const int64_t N = 3, C = 5, H = 6, W = 7, total = N * C * H * W;
  for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (bool training : {true, false}) {
      SCOPED_TRACE(std::string(to_string(format)) + (training ? " training" : " eval"));
      const auto x = random_normal(total, rng), r = random_normal(total, rng);
      const auto dy = random_normal(total, rng);
      auto view = [&](const std::vector<float>& v) {
        return TensorView(v.data(), {N, C, H, W}, format);
      };
      BatchNorm fused(C), plain(C);
      for (int64_t c = 0; c < C; ++c) {
        fused.weight[c] = plain.weight[c] = float(0.5 + 0.1 * double(c));
        fused.bias[c] = plain.bias[c] = float(0.2 * double(c) - 0.3);
        fused.running_mean[c] = plain.running_mean[c] = float(0.1 * double(c));
      }
      if (!training) fused.eval(), plain.eval();
      std::vector<float> y = poisoned(total), y_plain = poisoned(total);
      fused.forward(view(x), {.activation = Activation::relu, .residual = view(r)}, view(y));
      plain.forward(view(x), view(y_plain));
      std::vector<float> want(total), masked(total);
      for (int64_t i = 0; i < total; ++i) {
        const float v = y_plain[i] + r[i];
        want[i] = v < 0 ? 0.0f : v;
        masked[i] = want[i] > 0 ? dy[i] : 0.0f;
      }
      EXPECT_TRUE(test::bitwise_equal(y, want));
      EXPECT_EQ(fused.running_mean, plain.running_mean);
      EXPECT_EQ(fused.running_var, plain.running_var);

      std::vector<float> dx = poisoned(total), dres = poisoned(total), dx_plain = poisoned(total);
      fused.backward(view(dy), view(dx), view(dres));
      plain.backward(view(masked), view(dx_plain));
      EXPECT_TRUE(test::bitwise_equal(dx, dx_plain));
      EXPECT_TRUE(test::bitwise_equal(dres, masked));
      EXPECT_EQ(fused.weight_grad, plain.weight_grad);
      EXPECT_EQ(fused.bias_grad, plain.bias_grad);
      // The two-argument backward after a fused forward still applies the ReLU's mask.
      std::vector<float> dx2 = poisoned(total);
      fused.backward(view(dy), view(dx2));
      EXPECT_TRUE(test::bitwise_equal(dx2, dx_plain));
    }
}

TEST(BatchNormLayer, RejectsBadArguments) {
  expect_error([] { BatchNorm(3, {.momentum = 1.5}); }, {"momentum must be in [0, 1]"});
  expect_error([] { BatchNorm(3, {.eps = -1}); }, {"eps"});
  expect_error([] { BatchNorm(-2); }, {"BatchNorm: num_channels must be >= 0, got -2"});
  BatchNorm bn(3);
  std::vector<float> x(40), y(40);
  expect_error([&] { bn.backward(TensorView(x.data(), {2, 3, 4}), TensorView(y.data(), {2, 3, 4})); },
               {"BatchNorm.backward: called before any forward"});
  expect_error([&] { bn.forward(TensorView(x.data(), {2, 4, 5}), TensorView(y.data(), {2, 4, 5})); },
               {"BatchNorm.forward: x has 4 channels (shape (2, 4, 5)), expected num_channels = 3"});
  expect_error([&] { bn.forward(TensorView(x.data(), {40}), TensorView(y.data(), {40})); },
               {"rank 1"});
  EXPECT_EQ(bn.num_batches_tracked, 0);
  bn.forward(TensorView(x.data(), {2, 3, 4}), TensorView(y.data(), {2, 3, 4}));
  expect_error([&] { bn.backward(TensorView(x.data(), {2, 3, 5}), TensorView(y.data(), {2, 3, 4})); },
               {"dy shape (2, 3, 5) != the last forward's x shape (2, 3, 4)"});
  // A bad option set after construction is caught at forward, before anything changes.
  bn.options.momentum = -1;
  expect_error([&] { bn.forward(TensorView(x.data(), {2, 3, 4}), TensorView(y.data(), {2, 3, 4})); },
               {"momentum"});
  EXPECT_EQ(bn.num_batches_tracked, 1);
}

// ---- GroupNorm and LayerNorm ----

TEST(GroupNormLayer, IsTheFunctionalGroupNormInEveryMode) {
  const int64_t N = 2, C = 6, G = 3, H = 5, W = 3;
  std::mt19937_64 rng(6);
  GroupNorm gn(G, C);
  EXPECT_EQ(gn.num_groups(), G);
  gn.weight = random_normal(C, rng, 1, 0.5);
  gn.bias = random_normal(C, rng);
  const auto x = random_normal(N * C * H * W, rng, 3, 2), dy = random_normal(x.size(), rng);
  const auto cl = MemoryFormat::channels_last;
  const TensorView xv(x.data(), {N, C, H, W}, cl), dyv(dy.data(), {N, C, H, W}, cl);
  std::vector<float> fy = poisoned(x.size()), fdx = poisoned(x.size()), mean(N * G), rstd(N * G);
  std::vector<float> dw = poisoned(C), db = poisoned(C);
  group_norm_forward({.num_groups = G}, xv, gn.weight, gn.bias,
                     TensorView(fy.data(), {N, C, H, W}, cl), mean, rstd);
  group_norm_backward({.num_groups = G}, dyv, xv, mean, rstd, gn.weight,
                      TensorView(fdx.data(), {N, C, H, W}, cl), dw, db);
  for (bool training : {true, false}) {
    gn.train(training);
    std::vector<float> y = poisoned(x.size()), dx = poisoned(x.size());
    gn.forward(xv, TensorView(y.data(), {N, C, H, W}, cl));
    gn.backward(dyv, TensorView(dx.data(), {N, C, H, W}, cl));
    EXPECT_EQ(y, fy);
    EXPECT_EQ(dx, fdx);
    EXPECT_EQ(gn.weight_grad, dw);
    EXPECT_EQ(gn.bias_grad, db);
  }
  expect_error([] { GroupNorm(4, 6); }, {"GroupNorm", "num_groups = 4 must divide the number of channels C = 6"});
  expect_error([] { GroupNorm(0, 6); }, {"num_groups must be > 0, got 0"});
}

// With no workspace in the context the layer passes one of its own (sized on the first call,
// grown for a larger input): the results are the functional op's. A workspace the caller put in
// the context is passed through as is, so a too-small one is rejected before anything changes.
TEST(GroupNormLayer, OwnWorkspaceOrTheCallers) {
  std::mt19937_64 rng(12);
  const auto cl = MemoryFormat::channels_last;
  GroupNorm gn(3, 6);
  InstanceNorm in(6, {.affine = true, .track_running_stats = true});
  for (const std::vector<int64_t>& dims :
       {std::vector<int64_t>{2, 6, 3, 4}, std::vector<int64_t>{3, 6, 17, 9}}) {
    const int64_t N = dims[0], S = dims[2] * dims[3];
    const auto x = random_normal(std::size_t(N * 6 * S), rng, 2, 3);
    const auto dy = random_normal(x.size(), rng);
    auto view = [&](const std::vector<float>& v) {
      return TensorView(v.data(), DType::float32, 4, dims.data(), cl);
    };
    std::vector<float> y = poisoned(x.size()), dx = poisoned(x.size());
    std::vector<float> fy = poisoned(x.size()), fdx = poisoned(x.size());
    std::vector<float> mean(N * 6), rstd(N * 6), dw = poisoned(6), db = poisoned(6);
    gn.forward(view(x), view(y));
    gn.backward(view(dy), view(dx));
    group_norm_forward({.num_groups = 3}, view(x), gn.weight, gn.bias, view(fy), std::span(mean).first(N * 3),
                       std::span(rstd).first(N * 3));
    group_norm_backward({.num_groups = 3}, view(dy), view(x), std::span(mean).first(N * 3),
                        std::span(rstd).first(N * 3), gn.weight, view(fdx), dw, db);
    EXPECT_EQ(y, fy);
    EXPECT_EQ(dx, fdx);
    EXPECT_EQ(gn.weight_grad, dw);

    std::vector<float> rm = in.running_mean, rv = in.running_var;
    in.forward(view(x), view(y));
    in.backward(view(dy), view(dx));
    instance_norm_forward({}, view(x), in.weight, in.bias, rm, rv, view(fy), mean, rstd);
    instance_norm_backward({}, view(dy), view(x), mean, rstd, in.weight, view(fdx), dw, db);
    EXPECT_EQ(y, fy);
    EXPECT_EQ(dx, fdx);
    EXPECT_EQ(in.running_mean, rm);
    EXPECT_EQ(in.running_var, rv);
  }
  std::vector<std::byte> ws(1);
  const std::vector<float> x(2 * 6 * 5, 1.0f);
  std::vector<float> y = poisoned(x.size());
  gn.context.workspace = ws;
  in.context.workspace = ws;
  expect_error([&] { gn.forward(TensorView(x.data(), {2, 6, 5}), TensorView(y.data(), {2, 6, 5})); },
               {"group_norm_forward: workspace has 1 bytes"});
  const std::vector<float> rm = in.running_mean;
  expect_error([&] { in.forward(TensorView(x.data(), {2, 6, 5}), TensorView(y.data(), {2, 6, 5})); },
               {"instance_norm_forward: workspace has 1 bytes"});
  EXPECT_EQ(y, poisoned(x.size()));
  EXPECT_EQ(in.running_mean, rm);
}

// The paper's LayerNorm: every sample normalized over all of (C, H, W), affine per channel.
TEST(LayerNormLayer, NormalizesEachSampleOverEverything) {
  const int64_t N = 3, C = 4, S = 7;
  std::mt19937_64 rng(7);
  LayerNorm ln(C);
  EXPECT_EQ(ln.num_groups(), 1);
  const auto x = random_normal(N * C * S, rng, -5, 3);
  std::vector<float> y = poisoned(x.size());
  NormLayer& layer = ln;  // usable through the common interface
  layer.forward(TensorView(x.data(), {N, C, S}), TensorView(y.data(), {N, C, S}));
  for (int64_t n = 0; n < N; ++n) {
    double sum = 0, sq = 0;
    for (int64_t i = 0; i < C * S; ++i) sum += x[n * C * S + i];
    const double mean = sum / double(C * S);
    for (int64_t i = 0; i < C * S; ++i) sq += std::pow(x[n * C * S + i] - mean, 2);
    const double rstd = 1 / std::sqrt(sq / double(C * S) + 1e-5);
    for (int64_t i = 0; i < C * S; ++i)
      EXPECT_NEAR(y[n * C * S + i], (x[n * C * S + i] - mean) * rstd, 1e-5);
  }
  std::vector<float> x5(40), y5(40);
  expect_error([&] { ln.forward(TensorView(x5.data(), {2, 5, 4}), TensorView(y5.data(), {2, 5, 4})); },
               {"LayerNorm.forward: x has 5 channels"});
}

// ---- InstanceNorm ----

TEST(InstanceNormLayer, DefaultsAreTorchsAndModesAgreeWithoutTracking) {
  const int64_t N = 2, C = 3, S = 8;
  InstanceNorm in(C);
  EXPECT_FALSE(in.affine());
  EXPECT_TRUE(in.weight.empty() && in.running_mean.empty());
  std::mt19937_64 rng(8);
  const auto x = random_normal(N * C * S, rng, 2, 3);
  std::vector<float> y_train = poisoned(x.size()), y_eval = poisoned(x.size());
  in.forward(TensorView(x.data(), {N, C, S}), TensorView(y_train.data(), {N, C, S}));
  in.eval();
  in.forward(TensorView(x.data(), {N, C, S}), TensorView(y_eval.data(), {N, C, S}));
  EXPECT_EQ(y_train, y_eval);
  for (int64_t i = 0; i < N * C; ++i) {  // each (n, c) has mean 0 and variance ~1
    double sum = 0, sq = 0;
    for (int64_t s = 0; s < S; ++s) sum += y_train[i * S + s], sq += y_train[i * S + s] * y_train[i * S + s];
    EXPECT_NEAR(sum / S, 0, 1e-5);
    EXPECT_NEAR(sq / S, 1, 1e-3);
  }
}

TEST(InstanceNormLayer, TrackedRunningStatisticsAndEval) {
  const int64_t N = 3, C = 2, S = 5;
  for (std::optional<double> momentum : {std::optional<double>(0.3), std::optional<double>()}) {
    SCOPED_TRACE(momentum ? "momentum" : "cumulative average");
    InstanceNorm in(C, {.momentum = momentum, .affine = true, .track_running_stats = true});
    std::vector<double> rm(C, 0.0), rv(C, 1.0), sum_m(C, 0.0), sum_v(C, 0.0);
    std::mt19937_64 rng(9);
    for (int step = 1; step <= 3; ++step) {
      const auto x = random_normal(N * C * S, rng, step, 2);
      std::vector<float> y(x.size());
      in.forward(TensorView(x.data(), {N, C, S}), TensorView(y.data(), {N, C, S}));
      for (int64_t c = 0; c < C; ++c) {
        // The batch average of the per-instance mean and unbiased variance.
        double batch_mean = 0, batch_var = 0;
        for (int64_t n = 0; n < N; ++n) {
          double sum = 0, sq = 0;
          for (int64_t s = 0; s < S; ++s) sum += x[(n * C + c) * S + s];
          const double mean = sum / S;
          for (int64_t s = 0; s < S; ++s) sq += std::pow(x[(n * C + c) * S + s] - mean, 2);
          batch_mean += mean / N;
          batch_var += sq / (S - 1) / N;
        }
        sum_m[c] += batch_mean;
        sum_v[c] += batch_var;
        const double f = momentum ? *momentum : 1.0 / step;
        rm[c] = momentum ? (1 - f) * rm[c] + f * batch_mean : sum_m[c] / step;
        rv[c] = momentum ? (1 - f) * rv[c] + f * batch_var : sum_v[c] / step;
      }
      EXPECT_EQ(in.num_batches_tracked, step);
      expect_close(in.running_mean, rm, 1e-5, "running_mean");
      expect_close(in.running_var, rv, 1e-5, "running_var");
    }
    // Eval normalizes with the running statistics and leaves them alone; backward treats them
    // as constants: dx = dy * weight * rstd.
    in.eval();
    in.weight = {2.0f, -1.0f};
    const auto keep_mean = in.running_mean;
    std::mt19937_64 rng2(10);
    const auto x = random_normal(N * C * S, rng2), dy = random_normal(N * C * S, rng2);
    std::vector<float> y = poisoned(x.size()), dx = poisoned(x.size());
    in.forward(TensorView(x.data(), {N, C, S}), TensorView(y.data(), {N, C, S}));
    in.backward(TensorView(dy.data(), {N, C, S}), TensorView(dx.data(), {N, C, S}));
    EXPECT_EQ(in.running_mean, keep_mean);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const auto c = (i / S) % C;
      const double rstd = 1 / std::sqrt(double(in.running_var[c]) + 1e-5);
      EXPECT_NEAR(y[i], (x[i] - in.running_mean[c]) * rstd * in.weight[c], 1e-5);
      EXPECT_NEAR(dx[i], dy[i] * in.weight[c] * rstd, 1e-5);
    }
  }
}

TEST(InstanceNormLayer, BackwardIsTheFunctionalBackward) {
  const int64_t N = 2, C = 3, H = 4, W = 5;
  std::mt19937_64 rng(11);
  InstanceNorm in(C, {.affine = true});
  in.weight = random_normal(C, rng, 1, 0.4);
  const auto x = random_normal(N * C * H * W, rng), dy = random_normal(x.size(), rng);
  const TensorView xv(x.data(), {N, C, H, W}), dyv(dy.data(), {N, C, H, W});
  std::vector<float> y(x.size()), dx = poisoned(x.size()), fy(x.size()), fdx = poisoned(x.size());
  std::vector<float> mean(N * C), rstd(N * C), dw = poisoned(C), db = poisoned(C);
  in.forward(xv, TensorView(y.data(), {N, C, H, W}));
  in.backward(dyv, TensorView(dx.data(), {N, C, H, W}));
  instance_norm_forward({}, xv, in.weight, in.bias, {}, {}, TensorView(fy.data(), {N, C, H, W}),
                        mean, rstd);
  instance_norm_backward({}, dyv, xv, mean, rstd, in.weight, TensorView(fdx.data(), {N, C, H, W}),
                         dw, db);
  EXPECT_EQ(y, fy);
  EXPECT_EQ(dx, fdx);
  EXPECT_EQ(in.weight_grad, dw);
  EXPECT_EQ(in.bias_grad, db);
  std::vector<float> x1(6), y1(6);
  expect_error([&] { in.forward(TensorView(x1.data(), {2, 3, 1}), TensorView(y1.data(), {2, 3, 1})); },
               {"Expected more than 1 spatial element when training"});
  expect_error([] { InstanceNorm(3, {.momentum = 2.0}); }, {"InstanceNorm: momentum"});
}


// ---- The fused epilogue on every layer ----

// GroupNorm, LayerNorm and InstanceNorm (tracked, in both modes) with an epilogue give, bit for
// bit, what the free functions give with the same epilogue, through the common interface.
TEST(NormLayerEpilogue, IsTheFunctionalEpilogueOfGroupLayerAndInstanceNorm) {
  const int64_t N = 3, C = 6, H = 5, W = 4, total = N * C * H * W;
  std::mt19937_64 rng(31);
  for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (Activation act : {Activation::none, Activation::relu, Activation::silu})
      for (bool with_residual : {false, true}) {
        const bool relu = act == Activation::relu, silu = act == Activation::silu;
        SCOPED_TRACE(std::string(to_string(format)) + (relu ? " relu" : "") +
                     (silu ? " silu" : "") + (with_residual ? " residual" : ""));
        const auto x = random_normal(total, rng, 1, 2), r = random_normal(total, rng);
        const auto dy = random_normal(total, rng);
        auto view = [&](const std::vector<float>& v) {
          return TensorView(v.data(), {N, C, H, W}, format);
        };
        auto maybe = [&](bool on, const std::vector<float>& v) {
          return on ? view(v) : TensorView{};
        };
        const ForwardEpilogue fe{.activation = act, .residual = maybe(with_residual, r)};
        std::vector<float> y = poisoned(total), dx = poisoned(total), dres = poisoned(total);
        std::vector<float> fy = poisoned(total), fdx = poisoned(total), fdres = poisoned(total);
        std::vector<float> dw = poisoned(C), db = poisoned(C);
        auto expect_same = [&](const NormLayer& layer) {
          EXPECT_TRUE(test::bitwise_equal(y, fy));
          EXPECT_TRUE(test::bitwise_equal(dx, fdx));
          // Without a dresidual to write, the residual's gradient goes nowhere.
          EXPECT_TRUE(test::bitwise_equal(dres, with_residual ? fdres : poisoned(total)));
          EXPECT_TRUE(test::bitwise_equal(layer.weight_grad, dw));
          EXPECT_TRUE(test::bitwise_equal(layer.bias_grad, db));
        };

        for (int64_t G : {int64_t(3), int64_t(1)}) {
          SCOPED_TRACE(G == 1 ? "LayerNorm" : "GroupNorm");
          std::unique_ptr<GroupNorm> gn = G == 1 ? std::make_unique<LayerNorm>(C)
                                                 : std::make_unique<GroupNorm>(G, C);
          gn->weight = random_normal(C, rng, 1, 0.5);
          gn->bias = random_normal(C, rng);
          NormLayer& layer = *gn;
          y = poisoned(total), dx = poisoned(total), dres = poisoned(total);
          layer.forward(view(x), fe, view(y));
          layer.backward(view(dy), view(dx), maybe(with_residual, dres));

          fy = poisoned(total), fdx = poisoned(total), fdres = poisoned(total);
          dw = poisoned(C), db = poisoned(C);
          std::vector<float> mean(N * G), rstd(N * G);
          const GroupNormParams p{.num_groups = G, .epilogue = fe};
          group_norm_forward(p, view(x), gn->weight, gn->bias, view(fy), mean, rstd);
          group_norm_backward({.num_groups = G,
                               .epilogue = {.activation = act, .y = maybe(relu, fy),
                                            .residual = maybe(silu && with_residual, r),
                                            .bias = silu ? std::span<const float>(gn->bias)
                                                         : std::span<const float>(),
                                            .dresidual = maybe(with_residual, fdres)}},
                              view(dy), view(x), mean, rstd, gn->weight, view(fdx), dw, db);
          expect_same(layer);
        }

        for (bool training : {true, false}) {
          SCOPED_TRACE(training ? "InstanceNorm train" : "InstanceNorm eval");
          InstanceNorm in(C, {.affine = true, .track_running_stats = true});
          in.weight = random_normal(C, rng, 1, 0.5);
          in.bias = random_normal(C, rng);
          in.running_mean = random_normal(C, rng);
          in.running_var = random_normal(C, rng, 2, 0.2);
          std::vector<float> rm = in.running_mean, rv = in.running_var;
          in.train(training);
          y = poisoned(total), dx = poisoned(total), dres = poisoned(total);
          in.forward(view(x), fe, view(y));
          in.backward(view(dy), view(dx), maybe(with_residual, dres));

          fy = poisoned(total), fdx = poisoned(total), fdres = poisoned(total);
          dw = poisoned(C), db = poisoned(C);
          std::vector<float> mean(N * C), rstd(N * C);
          const InstanceNormParams p{
              .use_input_stats = training, .momentum = training ? 0.1 : 0.0, .epilogue = fe};
          instance_norm_forward(p, view(x), in.weight, in.bias, rm, rv, view(fy), mean, rstd);
          instance_norm_backward({.use_input_stats = training,
                                  .epilogue = {.activation = act, .y = maybe(relu, fy),
                                               .residual = maybe(silu && with_residual, r),
                                               .bias = silu ? std::span<const float>(in.bias)
                                                            : std::span<const float>(),
                                               .dresidual = maybe(with_residual, fdres)}},
                                 view(dy), view(x), mean, rstd, in.weight, view(fdx), dw, db);
          expect_same(in);
          EXPECT_TRUE(test::bitwise_equal(in.running_mean, rm));
          EXPECT_TRUE(test::bitwise_equal(in.running_var, rv));
        }
      }
}

// The ReLU's mask belongs to the forward it came from: after a plain forward, backward masks
// nothing, even if the forward before had a ReLU.
TEST(NormLayerEpilogue, BackwardFollowsTheLastForwardsEpilogue) {
  const int64_t N = 2, C = 4, S = 9, total = N * C * S;
  std::mt19937_64 rng(32);
  const auto x = random_normal(total, rng, 0.5, 1), dy = random_normal(total, rng);
  const TensorView xv(x.data(), {N, C, S}), dyv(dy.data(), {N, C, S});
  GroupNorm a(2, C), b(2, C);
  std::vector<float> ya = poisoned(total), yb = poisoned(total);
  std::vector<float> dxa = poisoned(total), dxb = poisoned(total);
  std::vector<float> ga = poisoned(total), gb = poisoned(total);
  a.forward(xv, {.activation = Activation::relu}, TensorView(ya.data(), {N, C, S}));
  a.forward(xv, TensorView(ya.data(), {N, C, S}));
  b.forward(xv, TensorView(yb.data(), {N, C, S}));
  a.backward(dyv, TensorView(dxa.data(), {N, C, S}), TensorView(ga.data(), {N, C, S}));
  b.backward(dyv, TensorView(dxb.data(), {N, C, S}), TensorView(gb.data(), {N, C, S}));
  EXPECT_TRUE(test::bitwise_equal(dxa, dxb));
  EXPECT_TRUE(test::bitwise_equal(ga, dy));  // g = dy: no mask
  EXPECT_TRUE(test::bitwise_equal(gb, dy));
}

// The same checks, with the layer's name, on every layer and in both memory formats; a rejected
// call changes nothing the caller can see (a failed forward leaves no forward to go back to).
TEST(NormLayerEpilogue, RejectsBadArgumentsOnEveryLayer) {
  const int64_t N = 2, C = 4, H = 3, W = 5, total = N * C * H * W;
  std::mt19937_64 rng(33);
  const auto x = random_normal(total, rng), dy = random_normal(total, rng);
  for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    const auto other = format == MemoryFormat::channels_first ? MemoryFormat::channels_last
                                                              : MemoryFormat::channels_first;
    std::vector<std::pair<std::string, std::unique_ptr<NormLayer>>> layers;
    layers.emplace_back("BatchNorm", std::make_unique<BatchNorm>(C));
    layers.emplace_back("GroupNorm", std::make_unique<GroupNorm>(2, C));
    layers.emplace_back("LayerNorm", std::make_unique<LayerNorm>(C));
    layers.emplace_back("InstanceNorm",
                        std::make_unique<InstanceNorm>(C, InstanceNormOptions{.affine = true}));
    layers.emplace_back("NoNorm", std::make_unique<NoNorm>(C));
    for (auto& named : layers) {
      // Plain references, not a structured binding: clang before 16 cannot capture those.
      const std::string& name = named.first;
      auto& layer = named.second;
      SCOPED_TRACE(name + " " + to_string(format));
      auto shaped = [&](const std::vector<float>& v, std::initializer_list<int64_t> dims,
                        MemoryFormat f) { return TensorView(v.data(), dims, f); };
      auto view = [&](const std::vector<float>& v) { return shaped(v, {N, C, H, W}, format); };
      std::vector<float> y = poisoned(total), dx = poisoned(total), dres = poisoned(total);
      std::vector<float> short_residual(N * C * H * (W - 1));
      const std::vector<float> w0 = layer->weight_grad;

      // A ReLU backward with no forward before it.
      expect_error([&] { layer->backward(view(dy), view(dx), view(dres)); },
                   {name + ".backward: called before any forward"});
      // A residual unlike x is the op's error; the failed forward keeps nothing.
      expect_error(
          [&] {
            layer->forward(view(x), {.activation = Activation::relu, .residual = shaped(short_residual, {N, C, H, W - 1}, format)},
                           view(y));
          },
          {"epilogue.residual shape (2, 4, 3, 4) != x shape (2, 4, 3, 5)"});
      EXPECT_TRUE(test::bitwise_equal(y, poisoned(total)));
      expect_error([&] { layer->backward(view(dy), view(dx), view(dres)); },
                   {name + ".backward: called before any forward"});

      layer->forward(view(x), {.activation = Activation::relu}, view(y));
      // dresidual unlike the forward's x: its shape, then its memory format.
      expect_error(
          [&] { layer->backward(view(dy), view(dx), shaped(dres, {N, C, W, H}, format)); },
          {name + ".backward: dresidual shape (2, 4, 5, 3) != the last forward's x shape (2, 4, 3, 5)"});
      expect_error([&] { layer->backward(view(dy), view(dx), shaped(dres, {N, C, H, W}, other)); },
                   {name + ".backward: dresidual memory format"});
      expect_error([&] { layer->backward(shaped(dy, {N, C, H * W}, format), view(dx), view(dres)); },
                   {name + ".backward: dy shape"});
      EXPECT_TRUE(test::bitwise_equal(dx, poisoned(total)));
      EXPECT_TRUE(test::bitwise_equal(dres, poisoned(total)));
      EXPECT_TRUE(test::bitwise_equal(layer->weight_grad, w0));
      // ...and a good call still works after the rejected ones: dresidual is dy masked by y > 0.
      layer->backward(view(dy), view(dx), view(dres));
      for (int64_t i = 0; i < total; ++i)
        ASSERT_EQ(dres[i], y[i] > 0 ? dy[i] : 0.0f) << i;
    }
  }
}


// ---- NoNorm ----

// y = act((x + bias) + residual?) bit for bit (float operations done the obvious way, in that
// order; silu in double, rounded once); backward: dx = dresidual = dy masked by y > 0 (relu) or
// times silu'(z) (silu, z = x + bias + residual? recomputed), bias_grad the per-channel sum of
// that (checked against a double sum), the same bits for 1 and 3 threads, in both formats.
TEST(NoNormLayer, AddsTheBiasWithTheEpilogue) {
  const int64_t N = 3, C = 5, H = 7, W = 11, S = H * W, total = N * C * S;
  std::mt19937_64 rng(41);
  for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (Activation act : {Activation::none, Activation::relu, Activation::silu})
      for (bool with_residual : {false, true}) {
        const bool relu = act == Activation::relu, silu = act == Activation::silu;
        SCOPED_TRACE(std::string(to_string(format)) + (relu ? " relu" : "") +
                     (silu ? " silu" : "") + (with_residual ? " residual" : ""));
        const auto x = random_normal(total, rng), r = random_normal(total, rng);
        const auto dy = random_normal(total, rng);
        auto view = [&](const std::vector<float>& v) {
          return TensorView(v.data(), {N, C, H, W}, format);
        };
        // Channel of flat index i in this format.
        auto channel = [&](int64_t i) {
          return format == MemoryFormat::channels_last ? i % C : (i / S) % C;
        };
        std::vector<float> prev_y, prev_dx, prev_bias_grad;
        for (int threads : {1, 3}) {
          NoNorm layer(C);
          EXPECT_FALSE(layer.affine());
          EXPECT_TRUE(layer.weight.empty() && layer.weight_grad.empty());
          EXPECT_EQ(layer.bias, std::vector<float>(C, 0.0f));
          std::mt19937_64 bias_rng(42);  // the same bias for both thread counts
          layer.bias = random_normal(C, bias_rng);
          layer.context.num_threads = threads;
          std::vector<float> y = poisoned(total), dx = poisoned(total), dres = poisoned(total);
          layer.forward(view(x), {.activation = act, .residual = with_residual ? view(r) : TensorView{}},
                        view(y));
          layer.backward(view(dy), view(dx), with_residual ? view(dres) : TensorView{});
          std::vector<double> want_db(C, 0.0);
          for (int64_t i = 0; i < total; ++i) {
            float v = x[i] + layer.bias[channel(i)];
            if (with_residual) v = v + r[i];
            const double s = 1.0 / (1.0 + std::exp(-double(v)));
            const float want_y = relu && v < 0 ? 0.0f : silu ? float(double(v) * s) : v;
            ASSERT_NEAR(y[i], want_y, 1e-6 * std::fabs(want_y)) << i;
            const float g = relu && !(want_y > 0) ? 0.0f
                            : silu ? float(double(dy[i]) * s * (1.0 + double(v) * (1.0 - s)))
                                   : dy[i];
            ASSERT_EQ(dx[i], g) << i;
            ASSERT_EQ(dres[i], with_residual ? g : test::kPoison) << i;
            want_db[channel(i)] += g;
          }
          expect_close(layer.bias_grad, want_db, 1e-6, "bias_grad");
          if (!prev_y.empty()) {
            EXPECT_TRUE(test::bitwise_equal(y, prev_y));
            EXPECT_TRUE(test::bitwise_equal(dx, prev_dx));
            EXPECT_TRUE(test::bitwise_equal(layer.bias_grad, prev_bias_grad));
          }
          prev_y = y, prev_dx = dx, prev_bias_grad = layer.bias_grad;
        }
      }
  expect_error([] { NoNorm(-1); }, {"NoNorm: num_channels must be >= 0, got -1"});
  NoNorm layer(3);
  std::vector<float> x(24), y = poisoned(24);
  expect_error([&] { layer.forward(TensorView(x.data(), {2, 3, 4}), TensorView(y.data(), {2, 3, 3})); },
               {"NoNorm.forward: y shape (2, 3, 3) != x shape (2, 3, 4)"});
  EXPECT_TRUE(test::bitwise_equal(y, poisoned(24)));
}

}  // namespace
}  // namespace normkit
