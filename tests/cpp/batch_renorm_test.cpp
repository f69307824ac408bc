// Batch Renorm: the reference against an independent float64 computation and finite differences
// (r and d held constant); the CPU backend (BatchNorm's kernels with an effective affine) against
// the reference, clipping active and inactive, both memory formats, odd sizes, epilogues, 16-bit
// activations; BatchNorm itself when r_max = 1 and d_max = 0; thread-count determinism; every
// rejected argument, with nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "normkit/batch_norm.h"
#include "normkit/batch_renorm.h"
#include "normkit/error.h"
#include "ref/batch_renorm.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit {
namespace {

using test::expect_error;
using test::kPoison;
using test::opt;
using test::poisoned;
using test::random_normal;

struct Case {
  int64_t n = 3, c = 5;
  std::vector<int64_t> spatial = {7, 3};
  MemoryFormat format = MemoryFormat::channels_first;
  double r_max = 3, d_max = 5, momentum = 0.01, eps = 1e-5;
  // The running statistics relative to the batch's (mean 0.5, std 2): far off clips r and d.
  double running_mean_offset = 0.3, running_var_scale = 1.5;
  Activation activation = Activation::none;
  bool residual = false, affine = true;

  std::vector<int64_t> dims() const {
    std::vector<int64_t> d = {n, c};
    d.insert(d.end(), spatial.begin(), spatial.end());
    return d;
  }
  int64_t s() const {
    int64_t r = 1;
    for (int64_t v : spatial) r *= v;
    return r;
  }
  int64_t numel() const { return n * c * s(); }
  plan::BatchNormShape shape() const { return {n, c, s(), format}; }
};

// Inputs and poison-filled outputs of one forward and backward.
struct Trial {
  std::vector<int64_t> dims;
  std::vector<float> x, weight, bias, running_mean, running_var, residual, dy;
  std::vector<float> y, mean, invstd, r, d, dx, dweight, dbias, dresidual;

  Trial(const Case& k, uint64_t seed) : dims(k.dims()) {
    std::mt19937_64 rng(seed);
    const auto C = std::size_t(k.c), M = std::size_t(k.numel());
    x = random_normal(M, rng, 0.5, 2.0);
    dy = random_normal(M, rng);
    if (k.residual) residual = random_normal(M, rng);
    if (k.affine) {
      weight = random_normal(C, rng, 1.0, 0.5);
      bias = random_normal(C, rng);
    }
    std::uniform_real_distribution<double> u(0.5, 1.5);
    for (std::size_t c = 0; c < C; ++c) {
      running_mean.push_back(float(0.5 + k.running_mean_offset * u(rng)));
      running_var.push_back(float(4.0 * k.running_var_scale * u(rng)));
    }
    y = dx = dresidual = poisoned(M);
    mean = invstd = r = d = dweight = dbias = poisoned(C);
  }
  TensorView view(const std::vector<float>& v, const Case& k) const {
    return TensorView(v.data(), DType::float32, int(dims.size()), dims.data(), k.format);
  }
  void forward(const Case& k, const Context& ctx) {
    BatchRenormParams p;
    p.eps = k.eps;
    p.momentum = k.momentum;
    p.r_max = k.r_max;
    p.d_max = k.d_max;
    p.epilogue.activation = k.activation;
    if (k.residual) p.epilogue.residual = view(residual, k);
    batch_renorm_forward_training(p, view(x, k), weight, bias, view(y, k), mean, invstd, r, d,
                                  running_mean, running_var, ctx);
  }
  void backward(const Case& k, const Context& ctx) {
    BatchNormBackwardParams p;
    p.epilogue.activation = k.activation;
    if (k.activation == Activation::relu) p.epilogue.y = view(y, k);
    if (k.activation == Activation::silu) {
      if (k.residual) p.epilogue.residual = view(residual, k);
      p.epilogue.bias = bias;
    }
    p.epilogue.dresidual = view(dresidual, k);
    batch_renorm_backward_training(p, view(dy, k), view(x, k), mean, invstd, r, d, weight,
                                   view(dx, k), dweight, dbias, ctx);
  }
};

Context reference() {
  Context ctx;
  ctx.backend = Backend::reference;
  return ctx;
}

// Relative max error with a floor of 1 on the scale (values are O(1)).
double error(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(double(a[i]) - double(b[i])) / std::max(1.0, std::fabs(double(b[i])));
    if (!(e == e)) return INFINITY;
    m = std::max(m, e);
  }
  return m;
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    Case k;
    k.format = f;
    out.push_back(k);  // r and d inside their bounds
    Case clipped = k;  // both clipped
    clipped.running_mean_offset = 40, clipped.running_var_scale = 100;
    clipped.r_max = 1.5, clipped.d_max = 0.25;
    out.push_back(clipped);
    Case odd = k;  // odd sizes, no spatial dims, long runs, no affine
    odd.n = 37, odd.c = 3, odd.spatial = {}, odd.affine = false;
    out.push_back(odd);
    Case big = k;
    big.n = 4, big.c = 19, big.spatial = {29, 31};
    big.residual = true, big.activation = Activation::silu;
    out.push_back(big);
    Case relu = k;
    relu.n = 2, relu.c = 23, relu.spatial = {25};
    relu.activation = Activation::relu, relu.running_var_scale = 0.01;
    out.push_back(relu);
  }
  return out;
}

// ---- the reference against an independent float64 computation ----

TEST(BatchRenorm, ReferenceMatchesFloat64Formula) {
  Case k;
  k.running_mean_offset = 2, k.running_var_scale = 30, k.r_max = 2, k.d_max = 0.5;
  for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    k.format = f;
    Trial run(k, 1);
    const std::vector<float> rm0 = run.running_mean, rv0 = run.running_var;
    run.forward(k, reference());
    const int64_t N = k.n, C = k.c, S = k.s();
    bool clipped_r = false, clipped_d = false;
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](int64_t n, int64_t s) {
        return f == MemoryFormat::channels_first ? (n * C + c) * S + s : (n * S + s) * C + c;
      };
      long double sum = 0, sq = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) sum += run.x[at(n, s)];
      const long double mu = sum / (N * S);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) sq += (run.x[at(n, s)] - mu) * (run.x[at(n, s)] - mu);
      const double var = double(sq / (N * S)), sigma = std::sqrt(var + k.eps);
      const double sigma_run = std::sqrt(double(rv0[c]) + k.eps);
      const double r_raw = sigma / sigma_run, d_raw = (double(mu) - rm0[c]) / sigma_run;
      const double r = std::min(std::max(r_raw, 1 / k.r_max), k.r_max);
      const double d = std::min(std::max(d_raw, -k.d_max), k.d_max);
      clipped_r |= r != r_raw, clipped_d |= d != d_raw;
      EXPECT_NEAR(run.r[c], r, 1e-6 * r);
      EXPECT_NEAR(run.d[c], d, 1e-6);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const double want =
              run.weight[c] * ((run.x[at(n, s)] - double(mu)) / sigma * r + d) + run.bias[c];
          EXPECT_NEAR(run.y[at(n, s)], want, 1e-5 * std::max(1.0, std::fabs(want)));
        }
      const double unbiased = double(sq / (N * S - 1));
      EXPECT_NEAR(run.running_mean[c], (1 - k.momentum) * rm0[c] + k.momentum * double(mu),
                  1e-6 * std::fabs(rm0[c]) + 1e-7);
      EXPECT_NEAR(run.running_var[c], (1 - k.momentum) * rv0[c] + k.momentum * unbiased,
                  1e-6 * rv0[c]);
    }
    EXPECT_TRUE(clipped_r || clipped_d) << "the case should exercise clipping";
  }
}

// Finite differences of L = sum(dy * y) with r and d held at the forward's values: the float64
// reference backward is the gradient of that function.
TEST(BatchRenorm, ReferenceBackwardMatchesFiniteDifferences) {
  const plan::BatchNormShape sh{3, 2, 5, MemoryFormat::channels_first};
  const int64_t M = 30;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd;
  std::vector<double> x(M), dy(M), w = {1.3, -0.7}, b = {0.2, 0.4}, rm = {0.1, -0.3},
                                    rv = {0.6, 2.5};
  for (auto& v : x) v = nd(rng);
  for (auto& v : dy) v = nd(rng);
  std::vector<double> y(M), mean(2), invstd(2), r(2), d(2), rm1 = rm, rv1 = rv;
  ref::batch_renorm_forward_training<double, double>(sh, 1e-5, 0.1, 1.2, 0.2, {}, x.data(),
                                                     w.data(), b.data(), y.data(), mean.data(),
                                                     invstd.data(), r.data(), d.data(),
                                                     rm1.data(), rv1.data());
  std::vector<double> dx(M), dw(2), db(2);
  ref::batch_renorm_backward_training<double, double>(sh, {}, dy.data(), x.data(), mean.data(),
                                                      invstd.data(), r.data(), d.data(), w.data(),
                                                      dx.data(), dw.data(), db.data());
  // The loss with r and d constant: BatchNorm's normalization, then the fixed affine.
  auto loss = [&] {
    double L = 0;
    for (int64_t c = 0; c < 2; ++c) {
      double mu = 0, var = 0;
      for (int64_t n = 0; n < 3; ++n)
        for (int64_t s = 0; s < 5; ++s) mu += x[(n * 2 + c) * 5 + s] / 15;
      for (int64_t n = 0; n < 3; ++n)
        for (int64_t s = 0; s < 5; ++s) var += std::pow(x[(n * 2 + c) * 5 + s] - mu, 2) / 15;
      for (int64_t n = 0; n < 3; ++n)
        for (int64_t s = 0; s < 5; ++s) {
          const int64_t i = (n * 2 + c) * 5 + s;
          L += dy[i] * (w[c] * ((x[i] - mu) / std::sqrt(var + 1e-5) * r[c] + d[c]) + b[c]);
        }
    }
    return L;
  };
  bool r_clipped = false;
  for (double v : r) r_clipped |= (v == 1.2 || v == 1 / 1.2);
  EXPECT_TRUE(r_clipped);
  for (int64_t i = 0; i < M; ++i)
    EXPECT_NEAR(dx[i], test::central_difference(loss, x[i], 1e-5), 1e-7) << i;
  for (int c = 0; c < 2; ++c) {
    EXPECT_NEAR(dw[c], test::central_difference(loss, w[c], 1e-5), 1e-7);
    EXPECT_NEAR(db[c], test::central_difference(loss, b[c], 1e-5), 1e-7);
  }
}

// ---- the CPU backend against the reference ----

TEST(BatchRenorm, CpuMatchesReference) {
  uint64_t seed = 100;
  for (const Case& k : cases()) {
    SCOPED_TRACE("C " + std::to_string(k.c) + " S " + std::to_string(k.s()) + " format " +
                 std::to_string(int(k.format)) + " act " + std::to_string(int(k.activation)));
    Trial fast(k, seed), slow(k, seed);
    ++seed;
    fast.forward(k, {});
    slow.forward(k, reference());
    EXPECT_LT(error(fast.mean, slow.mean), 1e-6);
    EXPECT_LT(error(fast.invstd, slow.invstd), 1e-6);
    EXPECT_LT(error(fast.r, slow.r), 1e-6);
    EXPECT_LT(error(fast.d, slow.d), 1e-6);
    EXPECT_LT(error(fast.running_mean, slow.running_mean), 1e-6);
    EXPECT_LT(error(fast.running_var, slow.running_var), 1e-6);
    EXPECT_LT(error(fast.y, slow.y), 1e-5);
    // Both backwards from the same saved statistics, so only the gradient kernels differ.
    fast.y = slow.y, fast.mean = slow.mean, fast.invstd = slow.invstd, fast.r = slow.r, fast.d = slow.d;
    fast.backward(k, {});
    slow.backward(k, reference());
    EXPECT_LT(error(fast.dx, slow.dx), 1e-5);
    EXPECT_LT(error(fast.dresidual, slow.dresidual), 1e-6);
    const double sum_scale = double(k.n * k.s());
    for (int64_t c = 0; c < int64_t(fast.dbias.size()); ++c) {
      EXPECT_NEAR(fast.dbias[c], slow.dbias[c], 1e-5 * sum_scale);
      EXPECT_NEAR(fast.dweight[c], slow.dweight[c], 1e-5 * sum_scale);
    }
  }
}

template <typename H>
void half_precision_case(DType dt, double tolerance) {
  Case k;
  k.format = MemoryFormat::channels_last;
  Trial run(k, 3);
  const std::size_t M = run.x.size();
  std::vector<H> x(M), y[2];
  for (std::size_t i = 0; i < M; ++i) x[i] = from_float<H>(run.x[i]);
  auto view = [&](const std::vector<H>& v) {
    return TensorView(v.data(), dt, int(run.dims.size()), run.dims.data(), k.format);
  };
  std::vector<float> outs[2][6];
  for (int b = 0; b < 2; ++b) {
    auto& o = outs[b];
    o[0] = o[1] = o[2] = o[3] = poisoned(k.c);
    o[4] = run.running_mean, o[5] = run.running_var;
    y[b].assign(M, from_float<H>(kPoison));
    batch_renorm_forward_training({}, view(x), run.weight, run.bias, view(y[b]), o[0], o[1],
                                  o[2], o[3], o[4], o[5], b ? reference() : Context{});
  }
  for (int i = 0; i < 6; ++i) EXPECT_LT(error(outs[0][i], outs[1][i]), 1e-5) << i;
  std::vector<float> yf[2];
  for (int b = 0; b < 2; ++b)
    for (const H& v : y[b]) yf[b].push_back(to_float(v));
  EXPECT_LT(error(yf[0], yf[1]), tolerance);
}

TEST(BatchRenorm, CpuHalfPrecisionMatchesReference) {
  half_precision_case<bf16>(DType::bfloat16, 1.6e-2);
  half_precision_case<f16>(DType::float16, 2e-3);
}

// ---- r_max = 1 and d_max = 0: BatchNorm ----

TEST(BatchRenorm, UnclippableIsBatchNorm) {
  for (Case k : cases()) {
    k.r_max = 1, k.d_max = 0;
    Trial brn(k, 11);
    brn.forward(k, {});
    std::vector<float> y = poisoned(brn.x.size()), mean = poisoned(k.c), invstd = poisoned(k.c);
    Trial bn(k, 11);
    BatchNormParams p;
    p.eps = k.eps, p.momentum = k.momentum, p.epilogue.activation = k.activation;
    if (k.residual) p.epilogue.residual = bn.view(bn.residual, k);
    batch_norm_forward_training(p, bn.view(bn.x, k), bn.weight, bn.bias, bn.view(y, k), mean,
                                invstd, bn.running_mean, bn.running_var);
    // The same statistics kernel: bitwise. y folds its affine from the float statistics rather
    // than the double ones: within a few float ulps.
    EXPECT_TRUE(test::bitwise_equal(brn.mean, mean));
    EXPECT_TRUE(test::bitwise_equal(brn.invstd, invstd));
    EXPECT_TRUE(test::bitwise_equal(brn.running_mean, bn.running_mean));
    EXPECT_TRUE(test::bitwise_equal(brn.running_var, bn.running_var));
    EXPECT_LT(error(brn.y, y), 4e-6);
    for (int64_t c = 0; c < k.c; ++c) {
      EXPECT_EQ(brn.r[c], 1.0f);
      EXPECT_EQ(brn.d[c], 0.0f);
    }
    // The backward is BatchNorm's with weight * 1, and dweight = 1 * dweight + 0 * dbias: bitwise.
    brn.backward(k, {});
    std::vector<float> dx = poisoned(brn.x.size()), dw = poisoned(k.c), db = poisoned(k.c);
    BatchNormBackwardParams bp;
    bp.epilogue.activation = k.activation;
    if (k.activation == Activation::relu) bp.epilogue.y = bn.view(brn.y, k);
    if (k.activation == Activation::silu) {
      if (k.residual) bp.epilogue.residual = bn.view(bn.residual, k);
      bp.epilogue.bias = bn.bias;
    }
    batch_norm_backward_training(bp, bn.view(bn.dy, k), bn.view(bn.x, k), brn.mean, brn.invstd,
                                 bn.weight, bn.view(dx, k), opt(dw, k.affine),
                                 opt(db, k.affine));
    EXPECT_TRUE(test::bitwise_equal(brn.dx, dx));
    if (k.affine) {
      EXPECT_TRUE(test::bitwise_equal(brn.dweight, dw));
      EXPECT_TRUE(test::bitwise_equal(brn.dbias, db));
    }
  }
}

// ---- determinism and the written outputs ----

TEST(BatchRenorm, BitwiseIndependentOfThreadCount) {
  for (const Case& k : cases()) {
    Trial one(k, 5);
    Context ctx1;
    ctx1.num_threads = 1;
    one.forward(k, ctx1);
    one.backward(k, ctx1);
    for (int threads : {2, 3, 8}) {
      Trial many(k, 5);
      Context ctx;
      ctx.num_threads = threads;
      many.forward(k, ctx);
      many.backward(k, ctx);
      EXPECT_TRUE(test::bitwise_equal(one.y, many.y));
      EXPECT_TRUE(test::bitwise_equal(one.r, many.r));
      EXPECT_TRUE(test::bitwise_equal(one.d, many.d));
      EXPECT_TRUE(test::bitwise_equal(one.running_var, many.running_var));
      EXPECT_TRUE(test::bitwise_equal(one.dx, many.dx));
      EXPECT_TRUE(test::bitwise_equal(one.dweight, many.dweight));
    }
    EXPECT_FALSE(test::contains_poison(one.y));
    EXPECT_FALSE(test::contains_poison(one.dx));
    EXPECT_FALSE(test::contains_poison(one.r));
  }
}

// ---- rejected arguments ----

TEST(BatchRenorm, RejectsBadArgumentsBeforeWriting) {
  Case k;
  auto expect_rejected = [&](auto mutate, const std::vector<std::string>& needles) {
    Trial run(k, 9);
    const Trial fresh = run;
    BatchRenormParams p;
    std::vector<float> short_r = poisoned(k.c - 1);
    std::span<float> r = run.r;
    std::vector<int64_t> other_dims = run.dims;
    TensorView y = run.view(run.y, k);
    mutate(p, r, short_r, y, other_dims);
    expect_error([&] {
      batch_renorm_forward_training(p, run.view(run.x, k), run.weight, run.bias, y, run.mean,
                                    run.invstd, r, run.d, run.running_mean, run.running_var);
    }, needles);
    EXPECT_EQ(run.y.size(), fresh.y.size());
    EXPECT_TRUE(test::bitwise_equal(run.y, fresh.y) && test::bitwise_equal(run.r, fresh.r) &&
                test::bitwise_equal(run.running_mean, fresh.running_mean) &&
                test::bitwise_equal(run.running_var, fresh.running_var) &&
                test::bitwise_equal(run.mean, fresh.mean))
        << "written before the throw: " << needles.front();
  };
  using V = std::vector<float>;
  using D = std::vector<int64_t>;
  expect_rejected([](BatchRenormParams& p, std::span<float>&, V&, TensorView&, D&) { p.r_max = 0.5; },
                  {"batch_renorm_forward_training", "r_max", "0.5"});
  expect_rejected([](BatchRenormParams& p, std::span<float>&, V&, TensorView&, D&) { p.r_max = NAN; },
                  {"r_max", "nan"});
  expect_rejected([](BatchRenormParams& p, std::span<float>&, V&, TensorView&, D&) { p.d_max = -1; },
                  {"d_max", "-1"});
  expect_rejected([](BatchRenormParams& p, std::span<float>&, V&, TensorView&, D&) { p.momentum = 1.5; },
                  {"momentum", "1.5"});
  expect_rejected([](BatchRenormParams& p, std::span<float>&, V&, TensorView&, D&) { p.eps = 0; },
                  {"eps", "> 0", "0"});
  expect_rejected([](BatchRenormParams&, std::span<float>& r, V& s, TensorView&, D&) { r = s; },
                  {"save_r", "4", "5"});
  expect_rejected([](BatchRenormParams&, std::span<float>&, V&, TensorView& y, D&) {
    y.dtype = DType::bfloat16;
  }, {"y"});
  expect_rejected([](BatchRenormParams&, std::span<float>&, V&, TensorView& y, D&) {
    y.format = MemoryFormat::channels_last;
  }, {"y"});

  // The backward: a short save_d, nothing written.
  Trial run(k, 9);
  std::vector<float> short_d = poisoned(k.c - 1);
  const Trial fresh = run;
  expect_error([&] {
    batch_renorm_backward_training({}, run.view(run.dy, k), run.view(run.x, k), run.mean,
                                   run.invstd, run.r, short_d, run.weight, run.view(run.dx, k),
                                   run.dweight, run.dbias);
  }, {"batch_renorm_backward_training", "save_d", "4"});
  EXPECT_TRUE(test::bitwise_equal(run.dx, fresh.dx) && test::bitwise_equal(run.dweight, fresh.dweight));
}

}  // namespace
}  // namespace normkit
