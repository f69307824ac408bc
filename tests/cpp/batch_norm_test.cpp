// BatchNorm: the reference against a direct long-double computation and finite differences; the
// CPU backend against the reference over random configurations; accuracy at large offsets against
// the float64 result; identical results for any thread count and either memory format; every
// rejected argument.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <hwy/targets.h>

#include "common/dtype.h"
#include "normkit/batch_norm.h"
#include "normkit/error.h"
#include "ref/batch_norm.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit {
namespace {

using test::expect_error;
using test::expect_rejected;
using test::kPoison;
using test::opt;
using test::poisoned;
using test::random_normal;
using test::relative_error;
using test::to_double;

// ---- configurations ----

struct Config {
  std::vector<int64_t> shape;  // N, C, spatial...
  MemoryFormat format = MemoryFormat::channels_first;
  bool has_weight = true, has_bias = true, has_running = true;
  double offset = 0, scale = 1, eps = 1e-5, momentum = 0.1;

  int64_t n() const { return shape[0]; }
  int64_t c() const { return shape[1]; }
  int64_t s() const {
    int64_t r = 1;
    for (std::size_t i = 2; i < shape.size(); ++i) r *= shape[i];
    return r;
  }
  int64_t numel() const { return n() * c() * s(); }
  ref::BatchNormShape ref_shape() const { return {n(), c(), s(), format}; }
  TensorView view(const float* p) const {
    return TensorView(p, DType::float32, int(shape.size()), shape.data(), format);
  }
  std::string str() const {
    std::ostringstream o;
    o << "shape (";
    for (std::size_t i = 0; i < shape.size(); ++i) o << (i ? "," : "") << shape[i];
    o << ") " << to_string(format) << " weight " << has_weight << " bias " << has_bias
      << " running " << has_running << " offset " << offset << " scale " << scale << " eps "
      << eps << " momentum " << momentum;
    return o.str();
  }
};

// Physical offset of each logical element, logical order (n, c, s) row-major; written from the
// strides of the full shape, independently of the library's indexing.
std::vector<int64_t> physical_offsets(const Config& cfg) {
  const int64_t N = cfg.n(), C = cfg.c(), S = cfg.s();
  std::vector<int64_t> out(std::size_t(N * C * S));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s)
        out[std::size_t((n * C + c) * S + s)] =
            cfg.format == MemoryFormat::channels_first ? (n * C + c) * S + s
                                                       : n * S * C + s * C + c;
  return out;
}

struct Data {
  std::vector<float> x, weight, bias, running_mean, running_var, dy;
};

Data make_data(const Config& cfg, std::mt19937_64& rng) {
  Data d;
  const auto C = std::size_t(cfg.c());
  d.x = random_normal(std::size_t(cfg.numel()), rng, cfg.offset, cfg.scale);
  d.dy = random_normal(std::size_t(cfg.numel()), rng);
  std::uniform_real_distribution<double> u(0.5, 2.0);
  std::bernoulli_distribution sign(0.3);
  if (cfg.has_weight)
    for (std::size_t c = 0; c < C; ++c) d.weight.push_back(float(u(rng) * (sign(rng) ? -1 : 1)));
  if (cfg.has_bias) d.bias = random_normal(C, rng);
  // Running statistics near the data's, so that inference outputs are O(1).
  d.running_mean = random_normal(C, rng, cfg.offset, 0.3 * cfg.scale);
  for (std::size_t c = 0; c < C; ++c)
    d.running_var.push_back(float(cfg.scale * cfg.scale * u(rng)));
  return d;
}

Config random_config(std::mt19937_64& rng) {
  auto pick = [&](std::initializer_list<int64_t> values) {
    std::uniform_int_distribution<std::size_t> i(0, values.size() - 1);
    return values.begin()[i(rng)];
  };
  std::uniform_real_distribution<double> u(0, 1);
  Config cfg;
  for (;;) {
    cfg.shape = {pick({1, 1, 2, 3, 4, 5, 7, 16}), pick({1, 1, 2, 3, 5, 7, 8, 13, 32})};
    const int spatial_rank = int(pick({0, 1, 2, 3}));
    for (int i = 0; i < spatial_rank; ++i)
      cfg.shape.push_back(u(rng) < 0.1 ? pick({63, 64, 100, 257, 2100})
                                       : pick({1, 2, 3, 4, 5, 7, 9, 11, 16}));
    if (cfg.numel() <= 60000) break;
  }
  if (cfg.n() * cfg.s() == 1) cfg.shape[0] = 2;  // training needs two values per channel
  cfg.format = u(rng) < 0.5 ? MemoryFormat::channels_first : MemoryFormat::channels_last;
  cfg.has_weight = u(rng) < 0.7;
  cfg.has_bias = u(rng) < 0.7;
  cfg.has_running = u(rng) < 0.8;
  cfg.scale = std::pow(10.0, -3 + u(rng) * 7.5);  // 1e-3 .. 3e4
  const double ratio = pick({0, 1, 10, 1000, 30000});
  cfg.offset = (u(rng) < 0.5 ? -1 : 1) * ratio * cfg.scale * (0.5 + u(rng));
  cfg.eps = pick({0, 1, 2}) == 0 ? 1e-3 : 1e-5;
  cfg.momentum = pick({0, 1, 2, 3}) == 0 ? 1.0 : (u(rng) < 0.5 ? 0.1 : u(rng));
  return cfg;
}

// Outputs of every op for one backend.
struct Results {
  std::vector<float> y, save_mean, save_invstd, running_mean, running_var;
  std::vector<float> y_inf;
  std::vector<float> dx, dweight, dbias;          // training backward
  std::vector<float> dx_inf, dweight_inf, dbias_inf;  // inference backward
};

Results run_all(const Config& cfg, const Data& d, const Context& ctx) {
  Results r;
  const auto total = std::size_t(cfg.numel()), C = std::size_t(cfg.c());
  const BatchNormParams params{.eps = cfg.eps, .momentum = cfg.momentum};
  r.y = poisoned(total);
  r.save_mean = poisoned(C);
  r.save_invstd = poisoned(C);
  r.running_mean = d.running_mean;
  r.running_var = d.running_var;
  batch_norm_forward_training(params, cfg.view(d.x.data()), opt(d.weight), opt(d.bias),
                              cfg.view(r.y.data()), r.save_mean, r.save_invstd,
                              opt(r.running_mean, cfg.has_running),
                              opt(r.running_var, cfg.has_running), ctx);
  r.y_inf = poisoned(total);
  batch_norm_forward_inference(params, cfg.view(d.x.data()), opt(d.weight), opt(d.bias),
                               d.running_mean, d.running_var, cfg.view(r.y_inf.data()), ctx);
  r.dx = poisoned(total);
  r.dweight = poisoned(C);
  r.dbias = poisoned(C);
  batch_norm_backward_training({}, cfg.view(d.dy.data()), cfg.view(d.x.data()), r.save_mean,
                               r.save_invstd, opt(d.weight), cfg.view(r.dx.data()), r.dweight,
                               r.dbias, ctx);
  r.dx_inf = poisoned(total);
  r.dweight_inf = poisoned(C);
  r.dbias_inf = poisoned(C);
  batch_norm_backward_inference({.eps = params.eps}, cfg.view(d.dy.data()), cfg.view(d.x.data()),
                                d.running_mean, d.running_var, opt(d.weight),
                                cfg.view(r.dx_inf.data()), r.dweight_inf, r.dbias_inf, ctx);
  return r;
}

// Elementwise |a - b| <= rel * |b| + abs.
::testing::AssertionResult close_each(const char* what, const std::vector<float>& a,
                                      const std::vector<float>& b, double rel, double abs) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << what << ": sizes differ";
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(double(a[i]) - double(b[i]));
    if (!(e <= rel * std::fabs(double(b[i])) + abs))
      return ::testing::AssertionFailure() << what << "[" << i << "] = " << a[i] << " vs " << b[i]
                                           << " (rel " << rel << ", abs " << abs << ")";
  }
  return ::testing::AssertionSuccess();
}

// ---- the reference against a direct long-double computation ----

TEST(BatchNormReference, MatchesDirectComputation) {
  std::mt19937_64 rng(11);
  const std::vector<Config> configs = {
      {{3, 4, 5}, MemoryFormat::channels_first},
      {{2, 3, 4, 5}, MemoryFormat::channels_last},
      {{5, 2}, MemoryFormat::channels_first, true, false},
      {{2, 3, 2, 3, 2}, MemoryFormat::channels_last, false, true},
      {{1, 3, 7}, MemoryFormat::channels_last, true, true, true, 1e3, 0.5},
  };
  for (const Config& cfg : configs) {
    SCOPED_TRACE(cfg.str());
    const Data d = make_data(cfg, rng);
    const Context ctx{.backend = Backend::reference};
    const Results r = run_all(cfg, d, ctx);
    const auto at = physical_offsets(cfg);
    const int64_t N = cfg.n(), C = cfg.c(), S = cfg.s(), M = N * S;
    for (int64_t c = 0; c < C; ++c) {
      long double sum = 0, sq = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) sum += d.x[at[(n * C + c) * S + s]];
      const long double mean = sum / M;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const long double v = d.x[at[(n * C + c) * S + s]] - mean;
          sq += v * v;
        }
      const long double var = sq / M, invstd = 1 / std::sqrt(var + cfg.eps);
      const long double w = cfg.has_weight ? d.weight[c] : 1, b = cfg.has_bias ? d.bias[c] : 0;
      const long double rinv = 1 / std::sqrt((long double)d.running_var[c] + cfg.eps);
      EXPECT_NEAR(r.save_mean[c], double(mean), 1e-6 * (std::fabs(double(mean)) + 1));
      EXPECT_NEAR(r.save_invstd[c], double(invstd), 1e-6 * double(invstd));
      const long double m = cfg.momentum;
      EXPECT_NEAR(r.running_mean[c], double((1 - m) * d.running_mean[c] + m * mean),
                  1e-6 * (std::fabs(double(mean)) + std::fabs(d.running_mean[c]) + 1));
      const long double rv = (1 - m) * d.running_var[c] + m * sq / (M - 1);
      EXPECT_NEAR(r.running_var[c], double(rv), 1e-6 * double(rv));
      // Backward written from the per-element chain rule rather than the folded formula, with
      // the statistics the forward saved (float), as the backward's contract says.
      const long double bmean = r.save_mean[c], binvstd = r.save_invstd[c];
      long double g_sum = 0, g_xhat = 0, g_inf_xhat = 0;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = at[(n * C + c) * S + s];
          g_sum += d.dy[i];
          g_xhat += d.dy[i] * (d.x[i] - bmean) * binvstd;
          g_inf_xhat += d.dy[i] * (d.x[i] - d.running_mean[c]) * rinv;
        }
      EXPECT_NEAR(r.dbias[c], double(g_sum), 1e-5 * (std::fabs(double(g_sum)) + 1));
      EXPECT_NEAR(r.dweight[c], double(g_xhat), 1e-5 * (std::fabs(double(g_xhat)) + 1));
      EXPECT_NEAR(r.dbias_inf[c], double(g_sum), 1e-5 * (std::fabs(double(g_sum)) + 1));
      EXPECT_NEAR(r.dweight_inf[c], double(g_inf_xhat), 1e-5 * (std::fabs(double(g_inf_xhat)) + 1));
      for (int64_t n = 0; n < N; ++n)
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = at[(n * C + c) * S + s];
          const long double xhat = (d.x[i] - mean) * invstd;
          const long double y = xhat * w + b;
          EXPECT_NEAR(r.y[i], double(y), 1e-5 * (std::fabs(double(y)) + 1));
          const long double y_inf = (d.x[i] - d.running_mean[c]) * rinv * w + b;
          EXPECT_NEAR(r.y_inf[i], double(y_inf), 1e-5 * (std::fabs(double(y_inf)) + 1));
          // d xhat_j / d x_i = invstd * (delta_ij - 1/M - xhat_i xhat_j / M)
          const long double bxhat = (d.x[i] - bmean) * binvstd;
          const long double dx = w * binvstd * (d.dy[i] - g_sum / M - bxhat * g_xhat / M);
          EXPECT_NEAR(r.dx[i], double(dx), 1e-5 * (std::fabs(double(dx)) + invstd));
          const long double dx_inf = d.dy[i] * w * rinv;
          EXPECT_NEAR(r.dx_inf[i], double(dx_inf), 1e-6 * (std::fabs(double(dx_inf)) + 1e-30));
        }
    }
  }
}

// ---- finite differences on the reference run in double ----

struct DoubleProblem {
  Config cfg;
  std::vector<double> x, weight, bias, running_mean, running_var, g;
};

// L = sum(g * y) for the training (batch statistics) or inference forward.
double loss(const DoubleProblem& p, bool training) {
  const auto sh = p.cfg.ref_shape();
  const auto C = std::size_t(p.cfg.c());
  std::vector<double> y(p.x.size()), mean(C), invstd(C);
  const double* w = p.cfg.has_weight ? p.weight.data() : nullptr;
  const double* b = p.cfg.has_bias ? p.bias.data() : nullptr;
  if (training)
    ref::batch_norm_forward_training<double, double>(sh, p.cfg.eps, 0.0, {}, p.x.data(), w, b,
                                                     y.data(), mean.data(), invstd.data(),
                                                     nullptr, nullptr);
  else
    ref::batch_norm_forward_inference<double, double>(
        sh, p.cfg.eps, {}, p.x.data(), w, b, p.running_mean.data(), p.running_var.data(),
        y.data());
  double l = 0;
  for (std::size_t i = 0; i < y.size(); ++i) l += p.g[i] * y[i];
  return l;
}

// Central difference of the loss along one coordinate.
double numeric_grad(DoubleProblem& p, std::vector<double>& v, std::size_t i, bool training) {
  return test::central_difference([&] { return loss(p, training); }, v[i],
                                  1e-5 * std::max(1.0, std::fabs(v[i])));
}

TEST(BatchNormReference, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(12);
  const std::vector<Config> configs = {
      {{2, 3, 4}, MemoryFormat::channels_first},
      {{3, 2, 2, 3}, MemoryFormat::channels_last},
      {{4, 3}, MemoryFormat::channels_first, false, true},
      {{1, 2, 5}, MemoryFormat::channels_last, true, false},
      {{2, 2, 2, 2, 2}, MemoryFormat::channels_first},
  };
  for (const Config& cfg : configs) {
    SCOPED_TRACE(cfg.str());
    DoubleProblem p{cfg};
    std::normal_distribution<double> nd;
    const auto total = std::size_t(cfg.numel()), C = std::size_t(cfg.c());
    for (std::size_t i = 0; i < total; ++i) p.x.push_back(nd(rng)), p.g.push_back(nd(rng));
    for (std::size_t c = 0; c < C; ++c) {
      p.weight.push_back(1 + 0.5 * nd(rng));
      p.bias.push_back(nd(rng));
      p.running_mean.push_back(0.3 * nd(rng));
      p.running_var.push_back(0.5 + std::fabs(nd(rng)));
    }
    const auto sh = cfg.ref_shape();
    const double* w = cfg.has_weight ? p.weight.data() : nullptr;
    for (bool training : {true, false}) {
      SCOPED_TRACE(training ? "training" : "inference");
      std::vector<double> y(total), mean(C), invstd(C), dx(total), dw(C), db(C);
      if (training) {
        ref::batch_norm_forward_training<double, double>(sh, cfg.eps, 0.0, {}, p.x.data(), w,
                                                         nullptr, y.data(), mean.data(),
                                                         invstd.data(), nullptr, nullptr);
        ref::batch_norm_backward_training<double, double>(sh, {}, p.g.data(), p.x.data(),
                                                          mean.data(), invstd.data(), w,
                                                          dx.data(), dw.data(), db.data());
      } else {
        ref::batch_norm_backward_inference<double, double>(
            sh, cfg.eps, {}, p.g.data(), p.x.data(), p.running_mean.data(), p.running_var.data(),
            w, dx.data(), dw.data(), db.data());
      }
      for (std::size_t i = 0; i < total; ++i)
        EXPECT_NEAR(dx[i], numeric_grad(p, p.x, i, training), 1e-7 * (1 + std::fabs(dx[i])))
            << "dx[" << i << "]";
      for (std::size_t c = 0; c < C; ++c) {
        if (cfg.has_weight)
          EXPECT_NEAR(dw[c], numeric_grad(p, p.weight, c, training), 1e-7 * (1 + std::fabs(dw[c])))
              << "dweight[" << c << "]";
        if (cfg.has_bias)
          EXPECT_NEAR(db[c], numeric_grad(p, p.bias, c, training), 1e-7 * (1 + std::fabs(db[c])))
              << "dbias[" << c << "]";
      }
    }
  }
}

// ---- the CPU backend against the reference ----

// Sizes the errors of one configuration are measured against. A float32 result cannot be more
// accurate than its conditioning allows; these capture it:
// - the offset-to-spread ratio, nominal or of the sample (two values per channel may lie much
//   closer than `scale`), since x * a + b rounds at the size of x;
// - the size of the terms of each sum (sum(dy) of a single channel may nearly cancel);
// - the size of the terms of dx = weight * invstd * (dy - projection of dy), which nearly
//   cancel when there are few values per channel (always for M = 2).
struct Conditioning {
  double ratio = 0;
  double dx_terms = 0;          // max |dy * weight * invstd|
  double sum_dy = 0;            // max over channels of sum |dy|
  double sum_dy_xhat = 0;       // ... sum |dy * xhat| (batch statistics)
  double sum_dy_xhat_inf = 0;   // ... sum |dy * xhat| (running statistics)
};

Conditioning conditioning(const Config& cfg, const Data& d, const Results& want) {
  Conditioning k;
  k.ratio = std::fabs(cfg.offset) / cfg.scale;
  const auto at = physical_offsets(cfg);
  const int64_t N = cfg.n(), C = cfg.c(), S = cfg.s();
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, sq = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) sum += d.x[at[(n * C + c) * S + s]];
    const double mean = sum / double(N * S);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) sq += std::pow(d.x[at[(n * C + c) * S + s]] - mean, 2);
    const double spread = std::sqrt(sq / double(N * S));
    if (spread > 0) k.ratio = std::max(k.ratio, std::fabs(mean) / spread);
    const double w = cfg.has_weight ? d.weight[c] : 1.0;
    const double rinv = 1 / std::sqrt(double(d.running_var[c]) + cfg.eps);
    double a = 0, b = 0, e = 0;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = at[(n * C + c) * S + s];
        k.dx_terms = std::max(k.dx_terms, std::fabs(d.dy[i] * w * want.save_invstd[c]));
        a += std::fabs(d.dy[i]);
        b += std::fabs(d.dy[i] * (d.x[i] - want.save_mean[c]) * want.save_invstd[c]);
        e += std::fabs(d.dy[i] * (d.x[i] - d.running_mean[c]) * rinv);
      }
    k.sum_dy = std::max(k.sum_dy, a);
    k.sum_dy_xhat = std::max(k.sum_dy_xhat, b);
    k.sum_dy_xhat_inf = std::max(k.sum_dy_xhat_inf, e);
  }
  return k;
}

TEST(BatchNormCpu, MatchesReferenceOnRandomConfigurations) {
  std::mt19937_64 rng(2024);
  const int kConfigs = 1200;
  for (int k = 0; k < kConfigs; ++k) {
    const Config cfg = random_config(rng);
    SCOPED_TRACE("config " + std::to_string(k) + ": " + cfg.str());
    const Data d = make_data(cfg, rng);
    const Results want = run_all(cfg, d, {.backend = Backend::reference});
    const Results got = run_all(cfg, d, {.backend = Backend::cpu, .num_threads = 1 + k % 3});
    const Conditioning cond = conditioning(cfg, d, want);
    const double tol = 1e-5 * (1 + cond.ratio);
    ASSERT_LE(relative_error(got.y, want.y), tol);
    ASSERT_LE(relative_error(got.y_inf, want.y_inf), tol);
    ASSERT_TRUE(close_each("save_mean", got.save_mean, want.save_mean, 1e-6, 1e-6 * cfg.scale));
    ASSERT_TRUE(close_each("save_invstd", got.save_invstd, want.save_invstd, 1e-5, 0));
    if (cfg.has_running) {
      ASSERT_TRUE(
          close_each("running_mean", got.running_mean, want.running_mean, 1e-6, 1e-6 * cfg.scale));
      ASSERT_TRUE(close_each("running_var", got.running_var, want.running_var, 1e-5, 0));
    } else {
      // Not given: the vectors of the test must be untouched.
      ASSERT_EQ(got.running_mean, d.running_mean);
      ASSERT_EQ(got.running_var, d.running_var);
    }
    ASSERT_LE(relative_error(got.dx, want.dx, cond.dx_terms), 20 * tol);
    ASSERT_LE(relative_error(got.dweight, want.dweight, cond.sum_dy_xhat), 20 * tol);
    ASSERT_LE(relative_error(got.dbias, want.dbias, cond.sum_dy), 20 * tol);
    ASSERT_LE(relative_error(got.dx_inf, want.dx_inf), tol);
    ASSERT_LE(relative_error(got.dweight_inf, want.dweight_inf, cond.sum_dy_xhat_inf), 20 * tol);
    ASSERT_LE(relative_error(got.dbias_inf, want.dbias_inf, cond.sum_dy), 20 * tol);
  }
}

TEST(BatchNormCpu, OptionalOutputsAndAbsentAffine) {
  // dweight and dbias each optional; absent ones are not written, present ones are.
  std::mt19937_64 rng(3);
  Config cfg{{3, 5, 7, 3}, MemoryFormat::channels_last};
  const Data d = make_data(cfg, rng);
  const Results full = run_all(cfg, d, {});
  for (int which = 0; which < 3; ++which) {
    std::vector<float> dx = poisoned(d.x.size()), dw = poisoned(5), db = poisoned(5);
    batch_norm_backward_training({}, cfg.view(d.dy.data()), cfg.view(d.x.data()), full.save_mean,
                                 full.save_invstd, d.weight, cfg.view(dx.data()),
                                 which == 1 ? std::span<float>{} : std::span<float>(dw),
                                 which == 2 ? std::span<float>{} : std::span<float>(db));
    EXPECT_EQ(dx, full.dx);
    if (which == 1) EXPECT_EQ(dw, poisoned(5)); else EXPECT_EQ(dw, full.dweight);
    if (which == 2) EXPECT_EQ(db, poisoned(5)); else EXPECT_EQ(db, full.dbias);
  }
}

// ---- accuracy at large offsets against the float64 result of the same float32 inputs ----

TEST(BatchNormAccuracy, LargeOffsetsOnEveryLayout) {
  std::mt19937_64 rng(7);
  const std::vector<std::vector<int64_t>> shapes = {
      {64, 5},              // rank 2
      {4, 6, 77},           // short runs... and long rows
      {3, 4, 9, 11},        // column form in channels-first (S = 99 runs)
      {2, 3, 4, 5, 6},      // rank 5
      {2, 3, 70, 70},       // runs of several chunks
      {1, 2, 40000},        // runs longer than one unit
      {5, 7, 5, 3},         // short channels-first runs (S = 15): read as columns
      {16, 2, 100, 100},    // many partial results per channel, merged in order
      {4000, 3, 5, 5},      // the same for short runs read as columns
  };
  const std::vector<std::pair<double, double>> offset_scale = {
      {0, 1}, {1e3, 1}, {-3e4, 1}, {3e4 * 1e-3, 1e-3}, {-2e3 * 5, 5}, {3e4 * 3e4, 3e4}};
  double worst = 0;
  for (const auto& shape : shapes)
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (const auto& [offset, scale] : offset_scale) {
        Config cfg{shape, format, true, true, true, offset, scale};
        SCOPED_TRACE(cfg.str());
        const Data d = make_data(cfg, rng);
        const auto sh = cfg.ref_shape();
        const auto total = std::size_t(cfg.numel()), C = std::size_t(cfg.c());
        // float64 result from the same float32 inputs.
        const auto x64 = to_double(d.x), w64 = to_double(d.weight), b64 = to_double(d.bias);
        const auto dy64 = to_double(d.dy), rm64 = to_double(d.running_mean),
                   rv64 = to_double(d.running_var);
        std::vector<double> y64(total), mean64(C), invstd64(C), yinf64(total), dx64(total),
            dw64(C), db64(C), dxinf64(total), dwinf64(C), dbinf64(C);
        ref::batch_norm_forward_training<double, double>(sh, cfg.eps, 0.1, {}, x64.data(),
                                                         w64.data(), b64.data(), y64.data(),
                                                         mean64.data(), invstd64.data(), nullptr,
                                                         nullptr);
        ref::batch_norm_forward_inference<double, double>(sh, cfg.eps, {}, x64.data(), w64.data(),
                                                          b64.data(), rm64.data(), rv64.data(),
                                                          yinf64.data());
        ref::batch_norm_backward_training<double, double>(sh, {}, dy64.data(), x64.data(),
                                                          mean64.data(), invstd64.data(),
                                                          w64.data(), dx64.data(), dw64.data(),
                                                          db64.data());
        ref::batch_norm_backward_inference<double, double>(
            sh, cfg.eps, {}, dy64.data(), x64.data(), rm64.data(), rv64.data(), w64.data(),
            dxinf64.data(), dwinf64.data(), dbinf64.data());
        const double tol = 1e-5 * (1 + std::fabs(offset) / scale);
        for (Backend backend : {Backend::cpu, Backend::reference}) {
          // The reference backend too, where it is quick.
          if (backend == Backend::reference && total > 100000) continue;
          SCOPED_TRACE(backend == Backend::cpu ? "cpu" : "reference");
          const Results r = run_all(cfg, d, {.backend = backend});
          const double e = relative_error(r.y, y64);
          worst = std::max(worst, e / tol);
          EXPECT_LE(e, tol);
          EXPECT_LE(relative_error(r.y_inf, yinf64), tol);
          EXPECT_LE(relative_error(r.dx, dx64), 20 * tol);
          EXPECT_LE(relative_error(r.dweight, dw64), 20 * tol);
          EXPECT_LE(relative_error(r.dbias, db64), 20 * tol);
          EXPECT_LE(relative_error(r.dx_inf, dxinf64), 20 * tol);
          EXPECT_LE(relative_error(r.dweight_inf, dwinf64), 20 * tol);
          EXPECT_LE(relative_error(r.dbias_inf, dbinf64), 20 * tol);
        }
      }
  RecordProperty("worst_forward_error_over_tolerance", std::to_string(worst));
}

// ---- determinism and formats ----

TEST(BatchNormCpu, BitwiseIdenticalForAnyThreadCount) {
  std::mt19937_64 rng(5);
  const std::vector<Config> configs = {
      {{3, 5, 130, 131}, MemoryFormat::channels_first},
      {{3, 5, 130, 131}, MemoryFormat::channels_last, true, true, true, 100, 2},
      {{1, 3, 50000}, MemoryFormat::channels_first, false, false},
      {{600, 300}, MemoryFormat::channels_first},
      {{300, 40, 7}, MemoryFormat::channels_first},
      {{2, 700, 9, 11}, MemoryFormat::channels_last},
      {{1, 1, 300, 301}, MemoryFormat::channels_last},
  };
  for (const Config& cfg : configs) {
    SCOPED_TRACE(cfg.str());
    const Data d = make_data(cfg, rng);
    const Results one = run_all(cfg, d, {.backend = Backend::cpu, .num_threads = 1});
    for (int threads : {2, 3, 4}) {
      SCOPED_TRACE(threads);
      const Results r = run_all(cfg, d, {.backend = Backend::cpu, .num_threads = threads});
      EXPECT_TRUE(test::bitwise_equal(r.y, one.y));
      EXPECT_TRUE(test::bitwise_equal(r.save_mean, one.save_mean));
      EXPECT_TRUE(test::bitwise_equal(r.save_invstd, one.save_invstd));
      EXPECT_TRUE(test::bitwise_equal(r.running_mean, one.running_mean));
      EXPECT_TRUE(test::bitwise_equal(r.running_var, one.running_var));
      EXPECT_TRUE(test::bitwise_equal(r.y_inf, one.y_inf));
      EXPECT_TRUE(test::bitwise_equal(r.dx, one.dx));
      EXPECT_TRUE(test::bitwise_equal(r.dweight, one.dweight));
      EXPECT_TRUE(test::bitwise_equal(r.dbias, one.dbias));
      EXPECT_TRUE(test::bitwise_equal(r.dx_inf, one.dx_inf));
      EXPECT_TRUE(test::bitwise_equal(r.dweight_inf, one.dweight_inf));
      EXPECT_TRUE(test::bitwise_equal(r.dbias_inf, one.dbias_inf));
    }
  }
}

// The same logical tensor stored channels-last gives the same outputs as stored channels-first.
TEST(BatchNormCpu, ChannelsLastEqualsChannelsFirst) {
  std::mt19937_64 rng(9);
  const std::vector<std::vector<int64_t>> shapes = {
      {2, 3, 5}, {4, 7, 3, 5}, {2, 3, 2, 3, 4}, {3, 16, 33, 17}, {1, 3, 90}, {8, 2, 70, 3}};
  for (const auto& shape : shapes) {
    Config first{shape, MemoryFormat::channels_first, true, true, true, 50, 3};
    Config last = first;
    last.format = MemoryFormat::channels_last;
    SCOPED_TRACE(first.str());
    const Data d_first = make_data(first, rng);
    // Permute x and dy into channels-last storage.
    const auto at_first = physical_offsets(first), at_last = physical_offsets(last);
    auto permute = [&](const std::vector<float>& v) {
      std::vector<float> out(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) out[at_last[i]] = v[at_first[i]];
      return out;
    };
    Data d_last = d_first;
    d_last.x = permute(d_first.x);
    d_last.dy = permute(d_first.dy);
    const Results a = run_all(first, d_first, {});
    const Results b = run_all(last, d_last, {});
    const double tol = 1e-5 * (1 + 50 / 3.0);
    EXPECT_LE(relative_error(permute(a.y), b.y), tol);
    EXPECT_LE(relative_error(permute(a.y_inf), b.y_inf), 1e-6);
    EXPECT_LE(relative_error(permute(a.dx), b.dx), 20 * tol);
    EXPECT_LE(relative_error(permute(a.dx_inf), b.dx_inf), 1e-6);
    EXPECT_TRUE(close_each("save_mean", b.save_mean, a.save_mean, 1e-6, 1e-5));
    EXPECT_TRUE(close_each("save_invstd", b.save_invstd, a.save_invstd, 1e-5, 0));
    EXPECT_TRUE(close_each("running_var", b.running_var, a.running_var, 1e-5, 0));
    EXPECT_LE(relative_error(b.dweight, a.dweight), 20 * tol);
    EXPECT_LE(relative_error(b.dbias, a.dbias), 20 * tol);
  }
}

// ---- empty batches, NaN containment ----

TEST(BatchNorm, EmptyBatchWritesNothingAndZeroesParameterGradients) {
  for (Backend backend : {Backend::cpu, Backend::reference}) {
    for (std::vector<int64_t> shape : {std::vector<int64_t>{0, 3, 4}, {0, 3}, {2, 3, 0, 5}}) {
      const Context ctx{.backend = backend};
      Config cfg{shape};
      std::vector<float> x(1), y = poisoned(1), mean = poisoned(3), invstd = poisoned(3);
      std::vector<float> rm = {1, 2, 3}, rv = {4, 5, 6};
      batch_norm_forward_training({}, cfg.view(x.data()), {}, {}, cfg.view(y.data()), mean,
                                  invstd, rm, rv, ctx);
      EXPECT_EQ(y, poisoned(1));
      EXPECT_EQ(mean, poisoned(3));
      EXPECT_EQ(invstd, poisoned(3));
      EXPECT_EQ(rm, (std::vector<float>{1, 2, 3}));
      EXPECT_EQ(rv, (std::vector<float>{4, 5, 6}));
      batch_norm_forward_inference({}, cfg.view(x.data()), {}, {}, rm, rv, cfg.view(y.data()),
                                   ctx);
      EXPECT_EQ(y, poisoned(1));
      // As torch: the gradient of the parameters is an empty sum.
      std::vector<float> dx = poisoned(1), dw = poisoned(3), db = poisoned(3);
      batch_norm_backward_training({}, cfg.view(x.data()), cfg.view(x.data()), mean, invstd, {},
                                   cfg.view(dx.data()), dw, db, ctx);
      EXPECT_EQ(dx, poisoned(1));
      EXPECT_EQ(dw, std::vector<float>(3, 0.0f));
      EXPECT_EQ(db, std::vector<float>(3, 0.0f));
      dw = poisoned(3), db = poisoned(3);
      batch_norm_backward_inference({}, cfg.view(x.data()), cfg.view(x.data()), rm, rv, {},
                                    cfg.view(dx.data()), dw, db, ctx);
      EXPECT_EQ(dw, std::vector<float>(3, 0.0f));
      EXPECT_EQ(db, std::vector<float>(3, 0.0f));
    }
  }
}

TEST(BatchNorm, NonFiniteInputStaysInItsChannel) {
  for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    std::mt19937_64 rng(4);
    Config cfg{{4, 3, 100}, format};
    Data d = make_data(cfg, rng);
    const auto at = physical_offsets(cfg);
    d.x[at[(2 * 3 + 1) * 100 + 17]] = std::numeric_limits<float>::quiet_NaN();  // channel 1
    const Results r = run_all(cfg, d, {});
    for (int64_t n = 0; n < 4; ++n)
      for (int64_t c = 0; c < 3; ++c)
        for (int64_t s = 0; s < 100; ++s) {
          const float v = r.y[at[(n * 3 + c) * 100 + s]];
          EXPECT_EQ(std::isnan(v), c == 1) << n << "," << c << "," << s;
        }
    EXPECT_TRUE(std::isnan(r.running_mean[1]));
    EXPECT_FALSE(std::isnan(r.running_mean[0]) || std::isnan(r.running_mean[2]));
  }
}

// ---- rejected arguments: normkit::Error naming the argument, nothing written ----

// Every output poison-filled and running statistics with known values, so that a rejected call
// can be shown to have left all of them as they were.
struct Buffers {
  static constexpr int64_t N = 2, C = 3, H = 4;
  std::vector<float> x, y, mean, invstd, rm, rv, w, b, dy, dx, dw, db;
  Buffers()
      : x(std::size_t(N * C * H), 1.5f), y(poisoned(N * C * H)), mean(poisoned(C)),
        invstd(poisoned(C)), rm(std::size_t(C), 0.25f), rv(std::size_t(C), 2.0f),
        w(std::size_t(C), 1.0f), b(std::size_t(C), 0.0f), dy(std::size_t(N * C * H), 1.0f),
        dx(poisoned(N * C * H)), dw(poisoned(C)), db(poisoned(C)) {}
  bool operator==(const Buffers&) const = default;
  TensorView vx(std::initializer_list<int64_t> dims = {N, C, H}) const {
    return TensorView(x.data(), dims);
  }
  TensorView vy(std::initializer_list<int64_t> dims = {N, C, H}) const {
    return TensorView(y.data(), dims);
  }
};

constexpr int64_t N = Buffers::N, C = Buffers::C, H = Buffers::H;

void train(Buffers& m, TensorView x, TensorView y, BatchNormParams params = {}) {
  batch_norm_forward_training(params, x, m.w, m.b, y, m.mean, m.invstd, m.rm, m.rv);
}

TEST(BatchNormErrors, ForwardTraining) {
  const auto cl = MemoryFormat::channels_last;
  const int64_t big = int64_t(1) << 40;
  const float* null = nullptr;
  expect_rejected<Buffers>({
      {[](Buffers& m) { train(m, m.vx({24}), m.vy({24})); },
       {"batch_norm_forward_training", "x must have rank 2 to 5, got rank 1"}},
      {[](Buffers& m) { train(m, m.vx({1, 3, 1, 1, 1, 2}), m.vy({1, 3, 1, 1, 1, 2})); },
       {"x must have rank 2 to 5, got rank 6"}},
      {[](Buffers& m) { train(m, m.vx({2, -3, 4}), m.vy({2, -3, 4})); },
       {"x has a negative dimension", "(2, -3, 4)"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), std::span<const float>(m.w).first(2), m.b,
                                     m.vy(), m.mean, m.invstd, m.rm, m.rv);
       },
       {"weight has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, std::span<const float>(m.b).first(1),
                                     m.vy(), m.mean, m.invstd, m.rm, m.rv);
       },
       {"bias has length 1, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, m.b, m.vy(), m.mean, m.invstd,
                                     std::span<float>(m.rm).first(2), m.rv);
       },
       {"running_mean has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, m.b, m.vy(), m.mean, m.invstd, m.rm,
                                     std::span<float>(m.rv).subspan(1));
       },
       {"running_var has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, m.b, m.vy(), m.mean, m.invstd, m.rm, {});
       },
       {"running_mean and running_var must be given together, got only running_mean"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, m.b, m.vy(), m.mean, m.invstd, {}, m.rv);
       },
       {"got only running_var"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, m.b, m.vy(),
                                     std::span<float>(m.mean).first(2), m.invstd, m.rm, m.rv);
       },
       {"save_mean has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_forward_training({}, m.vx(), m.w, m.b, m.vy(), m.mean, {}, m.rm, m.rv);
       },
       {"save_invstd is required"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy(), {.eps = -1e-5}); },
       {"eps must be finite and >= 0, got -1e-05"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy(), {.eps = std::nan("")}); }, {"eps", "nan"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy(), {.eps = INFINITY}); }, {"eps", "inf"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy(), {.momentum = 1.5}); },
       {"momentum must be in [0, 1], got 1.5"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy(), {.momentum = -0.1}); },
       {"momentum", "got -0.1"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy(), {.momentum = std::nan("")}); },
       {"momentum", "nan"}},
      {[](Buffers& m) { train(m, m.vx({1, C}), m.vy({1, C})); },
       {"Expected more than 1 value per channel when training, got input size (1, 3)"}},
      {[](Buffers& m) { train(m, m.vx({1, C, 1, 1}), m.vy({1, C, 1, 1})); },
       {"Expected more than 1 value per channel when training, got input size (1, 3, 1, 1)"}},
      {[](Buffers& m) { train(m, m.vx(), m.vy({N, C, 3})); },
       {"y shape (2, 3, 3) != x shape (2, 3, 4)"}},
      {[cl](Buffers& m) {
         train(m, TensorView(m.x.data(), {N, C, 2, 2}, cl), m.vy({N, C, 2, 2}));
       },
       {"y memory format channels_first != x memory format channels_last"}},
      {[](Buffers& m) { train(m, m.vx(), TensorView(m.y.data(), DType::float16, {N, C, H})); },
       {"y dtype float16 != x dtype float32"}},
      {[big](Buffers& m) { train(m, m.vx({big, C, big}), m.vy({big, C, big})); },
       {"x has more elements than int64 can count"}},
      {[null](Buffers& m) { train(m, TensorView(null, {N, C, H}), m.vy()); },
       {"x has a null data pointer"}},
      {[null](Buffers& m) { train(m, m.vx(), TensorView(null, {N, C, H})); },
       {"y has a null data pointer"}},
  });
}

TEST(BatchNormErrors, ForwardInference) {
  auto infer = [](Buffers& m, TensorView x, TensorView y, BatchNormParams params = {}) {
    batch_norm_forward_inference(params, x, m.w, m.b, m.rm, m.rv, y);
  };
  expect_rejected<Buffers>({
      {[=](Buffers& m) { infer(m, m.vx({24}), m.vy({24})); },
       {"batch_norm_forward_inference", "rank 1"}},
      {[](Buffers& m) {
         batch_norm_forward_inference({}, m.vx(), m.w, m.b, {}, {}, m.vy());
       },
       {"running_mean is required"}},
      {[](Buffers& m) {
         batch_norm_forward_inference({}, m.vx(), m.w, m.b, m.rm,
                                      std::span<const float>(m.rv).first(2), m.vy());
       },
       {"running_var has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_forward_inference({}, m.vx(), std::span<const float>(m.w).first(1), m.b,
                                      m.rm, m.rv, m.vy());
       },
       {"weight has length 1"}},
      {[=](Buffers& m) { infer(m, m.vx(), m.vy({N, C + 1, H - 1})); },
       {"y shape (2, 4, 3) != x shape (2, 3, 4)"}},
      {[=](Buffers& m) { infer(m, m.vx(), m.vy(), {.eps = -1}); }, {"eps", "-1"}},
  });
  // One value per channel is fine at inference.
  Buffers m;
  batch_norm_forward_inference({}, m.vx({1, C}), m.w, m.b, m.rm, m.rv, m.vy({1, C}));
  EXPECT_NEAR(m.y[0], (1.5 - 0.25) / std::sqrt(2.0 + 1e-5), 1e-6);
}

TEST(BatchNormErrors, Backward) {
  const auto cl = MemoryFormat::channels_last;
  expect_rejected<Buffers>({
      {[](Buffers& m) {
         batch_norm_backward_training({}, m.vx({N, C, 3}), m.vx(), m.mean, m.invstd, m.w,
                                      TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"batch_norm_backward_training", "dy shape (2, 3, 3) != x shape (2, 3, 4)"}},
      {[cl](Buffers& m) {
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, 2, 2}, cl),
                                      m.vx({N, C, 2, 2}), m.mean, m.invstd, m.w,
                                      TensorView(m.dx.data(), {N, C, 2, 2}), m.dw, m.db);
       },
       {"dy memory format channels_last != x memory format channels_first"}},
      {[](Buffers& m) {
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean,
                                      m.invstd, m.w, TensorView(m.dx.data(), {N, C}), m.dw, m.db);
       },
       {"dx shape (2, 3) != x shape (2, 3, 4)"}},
      {[](Buffers& m) {
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, H}), m.vx(),
                                      std::span<const float>(m.mean).first(2), m.invstd, m.w,
                                      TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"save_mean has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean, {},
                                      m.w, TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"save_invstd is required"}},
      {[](Buffers& m) {
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean,
                                      m.invstd, m.w, TensorView(m.dx.data(), {N, C, H}),
                                      std::span<float>(m.dw).first(2), m.db);
       },
       {"dweight has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean,
                                      m.invstd, std::span<const float>(m.w).first(2),
                                      TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"weight has length 2"}},
      {[](Buffers& m) {
         batch_norm_backward_inference({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), m.rm,
                                       m.rv, m.w, TensorView(m.dx.data(), {N, C, H}), m.dw,
                                       std::span<float>(m.db).first(1));
       },
       {"batch_norm_backward_inference", "dbias has length 1, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_backward_inference({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), {}, {},
                                       m.w, TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"running_mean is required"}},
      {[](Buffers& m) {
         batch_norm_backward_inference({.eps = std::nan("")}, TensorView(m.dy.data(), {N, C, H}),
                                       m.vx(), m.rm, m.rv, m.w,
                                       TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"eps", "nan"}},
      {[](Buffers& m) {
         batch_norm_backward_inference({}, TensorView(m.dy.data(), {N, C, H}), m.vx({N, C}), m.rm,
                                       m.rv, m.w, TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"dy shape (2, 3, 4) != x shape (2, 3)"}},
  });
}


// ---- bfloat16 / float16 activations, fused epilogues, every SIMD target ----

// Activations stored in a dtype; decoded to float for comparisons.
struct Stored {
  DType dtype = DType::float32;
  std::vector<std::byte> bytes;
  void* data() { return bytes.data(); }
};

Stored encode(const std::vector<float>& v, DType dtype) {
  Stored s{dtype, std::vector<std::byte>(v.size() * element_size(dtype))};
  visit_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* p = reinterpret_cast<T*>(s.bytes.data());
    for (std::size_t i = 0; i < v.size(); ++i) p[i] = from_float<T>(v[i]);
  });
  return s;
}

std::vector<float> decode(const Stored& s) {
  std::vector<float> v(s.bytes.size() / element_size(s.dtype));
  visit_dtype(s.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* p = reinterpret_cast<const T*>(s.bytes.data());
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = to_float(p[i]);
  });
  return v;
}

// The values a tensor of `dtype` holds for v.
std::vector<float> rounded(const std::vector<float>& v, DType dtype) {
  return decode(encode(v, dtype));
}

// silu replaces relu when both are set.
struct Epilogues {
  bool relu = false, residual = false, dresidual = false, silu = false;
  Activation activation() const {
    return silu ? Activation::silu : relu ? Activation::relu : Activation::none;
  }
  std::string str() const {
    return std::string("relu ") + (relu ? "1" : "0") + " residual " + (residual ? "1" : "0") +
           " dresidual " + (dresidual ? "1" : "0") + " silu " + (silu ? "1" : "0");
  }
};

// Inputs of the epilogue tests, already rounded to the dtype under test. mask_y is the output
// the backward reads for the ReLU mask (the same for every backend compared, so that a value
// rounding to either side of 0 cannot flip the mask of one of them).
struct EpilogueData {
  Data d;
  std::vector<float> residual, mask_y, mask_y_inf;
};

struct EpilogueResults {
  std::vector<float> y, save_mean, save_invstd, running_mean, running_var, y_inf;
  std::vector<float> dx, dweight, dbias, dres, dx_inf, dweight_inf, dbias_inf, dres_inf;
};

EpilogueResults run_epilogue(const Config& cfg, const EpilogueData& e, DType dtype, Epilogues ep,
                             const Context& ctx) {
  EpilogueResults r;
  const auto total = std::size_t(cfg.numel()), C = std::size_t(cfg.c());
  const auto view = [&](Stored& s) {
    return TensorView(s.data(), dtype, int(cfg.shape.size()), cfg.shape.data(), cfg.format);
  };
  const Data& d = e.d;
  Stored x = encode(d.x, dtype), dy = encode(d.dy, dtype), res = encode(e.residual, dtype);
  Stored my = encode(e.mask_y, dtype), my_inf = encode(e.mask_y_inf, dtype);
  Stored y = encode(poisoned(total), dtype), y_inf = y, dx = y, dx_inf = y, dres = y, dres_inf = y;
  BatchNormParams params{.eps = cfg.eps, .momentum = cfg.momentum};
  params.epilogue = {ep.activation(), ep.residual ? view(res) : TensorView{}};
  r.save_mean = poisoned(C);
  r.save_invstd = poisoned(C);
  r.running_mean = d.running_mean;
  r.running_var = d.running_var;
  batch_norm_forward_training(params, view(x), opt(d.weight), opt(d.bias), view(y), r.save_mean,
                              r.save_invstd, opt(r.running_mean, cfg.has_running),
                              opt(r.running_var, cfg.has_running), ctx);
  batch_norm_forward_inference(params, view(x), opt(d.weight), opt(d.bias), d.running_mean,
                               d.running_var, view(y_inf), ctx);
  r.dweight = poisoned(C), r.dbias = poisoned(C), r.dweight_inf = poisoned(C),
  r.dbias_inf = poisoned(C);
  // silu recomputes z: it gets the forward's residual and bias.
  const bool relu = ep.activation() == Activation::relu;
  const TensorView silu_residual = ep.silu && ep.residual ? view(res) : TensorView{};
  const std::span<const float> silu_bias = ep.silu ? opt(d.bias) : std::span<const float>();
  const BackwardEpilogue be{ep.activation(), relu ? view(my) : TensorView{}, silu_residual,
                            silu_bias, ep.dresidual ? view(dres) : TensorView{}};
  batch_norm_backward_training({.epilogue = be}, view(dy), view(x), r.save_mean, r.save_invstd,
                               opt(d.weight), view(dx), r.dweight, r.dbias, ctx);
  const BackwardEpilogue be_inf{ep.activation(), relu ? view(my_inf) : TensorView{},
                                silu_residual, silu_bias,
                                ep.dresidual ? view(dres_inf) : TensorView{}};
  batch_norm_backward_inference({.eps = params.eps, .epilogue = be_inf}, view(dy), view(x),
                                d.running_mean, d.running_var, opt(d.weight), view(dx_inf),
                                r.dweight_inf, r.dbias_inf, ctx);
  r.y = decode(y), r.y_inf = decode(y_inf), r.dx = decode(dx), r.dx_inf = decode(dx_inf);
  if (ep.dresidual) r.dres = decode(dres), r.dres_inf = decode(dres_inf);
  return r;
}

// Inputs rounded to dtype, with the reference's own outputs as the ReLU masks.
EpilogueData make_epilogue_data(const Config& cfg, std::mt19937_64& rng, DType dtype) {
  EpilogueData e;
  e.d = make_data(cfg, rng);
  e.d.x = rounded(e.d.x, dtype);
  e.d.dy = rounded(e.d.dy, dtype);
  e.residual = rounded(random_normal(std::size_t(cfg.numel()), rng, 0, 0.5), dtype);
  e.mask_y = e.mask_y_inf = std::vector<float>(std::size_t(cfg.numel()), 0.0f);
  const EpilogueResults plain =
      run_epilogue(cfg, e, dtype, {.residual = true}, {.backend = Backend::reference});
  e.mask_y = plain.y, e.mask_y_inf = plain.y_inf;
  return e;
}

// Relative size of one unit in the last place of a dtype's outputs (float32: the test data's
// float rounding, well above its ulp).
double output_unit(DType dtype) {
  switch (dtype) {
    case DType::bfloat16: return std::ldexp(1.0, -7);
    case DType::float16: return std::ldexp(1.0, -10);
    default: return 1e-5;
  }
}

// got and want: the same inputs through two computations whose float arithmetic may differ; both
// outputs rounded to dtype. Elementwise: one output unit relative, plus the float error of the
// computation relative to the size of its terms.
void expect_epilogue_close(const Config& cfg, const EpilogueData& e, const EpilogueResults& got,
                           const EpilogueResults& want, DType dtype, Epilogues ep) {
  const double u = output_unit(dtype), f = 2e-5;
  // silu scales dy by silu'(z), at most 1.0998 in size.
  const double act_gain = ep.silu ? 1.1 : 1.0;
  // dx = w * invstd * (g - projections): its terms are of size |g| * |w * invstd|.
  double dx_terms = 0, dx_inf_terms = 0;
  const auto at = physical_offsets(cfg);
  for (int64_t c = 0; c < cfg.c(); ++c) {
    const double w = cfg.has_weight ? std::fabs(e.d.weight[c]) : 1.0;
    const double rinv = 1 / std::sqrt(double(e.d.running_var[c]) + cfg.eps);
    for (int64_t n = 0; n < cfg.n(); ++n)
      for (int64_t s = 0; s < cfg.s(); ++s) {
        const double g = act_gain * std::fabs(e.d.dy[at[(n * cfg.c() + c) * cfg.s() + s]]);
        dx_terms = std::max(dx_terms, g * w * want.save_invstd[c]);
        dx_inf_terms = std::max(dx_inf_terms, g * w * rinv);
      }
  }
  const double y_max = test::max_abs(want.y), y_inf_max = test::max_abs(want.y_inf);
  EXPECT_TRUE(close_each("y", got.y, want.y, u, f * (1 + y_max)));
  EXPECT_TRUE(close_each("y_inf", got.y_inf, want.y_inf, u, f * (1 + y_inf_max)));
  EXPECT_TRUE(close_each("save_mean", got.save_mean, want.save_mean, 1e-5, 1e-5));
  EXPECT_TRUE(close_each("save_invstd", got.save_invstd, want.save_invstd, 1e-5, 0));
  EXPECT_TRUE(close_each("running_var", got.running_var, want.running_var, 1e-5, 0));
  EXPECT_TRUE(close_each("dx", got.dx, want.dx, u, 20 * f * dx_terms + 1e-30));
  EXPECT_TRUE(close_each("dx_inf", got.dx_inf, want.dx_inf, u, f * dx_inf_terms + 1e-30));
  const double m = double(cfg.n() * cfg.s());
  EXPECT_TRUE(close_each("dbias", got.dbias, want.dbias, 1e-4, 1e-4 * m * test::max_abs(e.d.dy)));
  EXPECT_TRUE(close_each("dweight", got.dweight, want.dweight, 1e-4,
                         1e-4 * m * test::max_abs(e.d.dy)));
  EXPECT_TRUE(close_each("dbias_inf", got.dbias_inf, want.dbias_inf, 1e-4,
                         1e-4 * m * test::max_abs(e.d.dy)));
  EXPECT_TRUE(close_each("dweight_inf", got.dweight_inf, want.dweight_inf, 1e-4,
                         1e-3 * m * test::max_abs(e.d.dy)));
  if (ep.dresidual && !ep.silu) {
    // The masked dy: exact.
    EXPECT_EQ(got.dres, want.dres);
    EXPECT_EQ(got.dres_inf, want.dres_inf);
  }
  if (ep.dresidual && ep.silu) {
    // dy * silu'(z): z in float (the forward's arithmetic) against double.
    const double g = act_gain * test::max_abs(e.d.dy);
    EXPECT_TRUE(close_each("dres", got.dres, want.dres, u, f * g + 1e-30));
    EXPECT_TRUE(close_each("dres_inf", got.dres_inf, want.dres_inf, u, f * g + 1e-30));
  }
  if (ep.silu) {  // silu(z) >= its minimum, -0.27846, up to the output's rounding
    const float lowest = float(-0.27847 * (1 + u));
    for (float v : got.y) ASSERT_GE(v, lowest);
    for (float v : got.y_inf) ASSERT_GE(v, lowest);
  }
  if (ep.activation() == Activation::relu) {
    for (float v : got.y) ASSERT_GE(v, 0.0f);
    for (float v : got.y_inf) ASSERT_GE(v, 0.0f);
  }
}

const DType kDtypes[] = {DType::float32, DType::bfloat16, DType::float16};

// Tails of every vector loop: channels 1..33 (rows of channels-last data), runs of 64..97 and
// 1..33 values (channels-first), and runs over one statistics chunk, for every dtype, epilogue
// and thread count, on every SIMD target compiled in and supported by this CPU.
TEST(BatchNormCpu, EveryTargetTailDtypeAndEpilogue) {
  std::vector<Config> configs;
  for (int64_t c = 1; c <= 33; ++c) configs.push_back({{2, c, 3}, MemoryFormat::channels_last});
  for (int64_t s = 64; s <= 97; ++s) configs.push_back({{2, 3, s}, MemoryFormat::channels_first});
  for (int64_t s = 1; s <= 33; ++s) configs.push_back({{3, 2, s}, MemoryFormat::channels_first});
  configs.push_back({{2, 5, 2100}, MemoryFormat::channels_first});
  configs.push_back({{2, 3, 7, 11}, MemoryFormat::channels_last, false, false, false});
  const auto targets = hwy::SupportedAndGeneratedTargets();
  ASSERT_FALSE(targets.empty());
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    std::mt19937_64 rng(77);
    for (std::size_t k = 0; k < configs.size(); ++k) {
      const Config& cfg = configs[k];
      const Epilogues ep{k % 3 == 1, k % 4 >= 2, k % 5 != 0, k % 3 == 2};
      for (DType dtype : kDtypes) {
        SCOPED_TRACE(cfg.str() + " " + to_string(dtype) + " " + ep.str());
        const EpilogueData e = make_epilogue_data(cfg, rng, dtype);
        const auto want = run_epilogue(cfg, e, dtype, ep, {.backend = Backend::reference});
        const auto got = run_epilogue(cfg, e, dtype, ep, {.num_threads = int(1 + k % 4)});
        expect_epilogue_close(cfg, e, got, want, dtype, ep);
        if (HasFailure()) break;
      }
      if (HasFailure()) break;
    }
  }
  hwy::SetSupportedTargetsForTest(0);  // back to what the CPU supports
}

// Every epilogue on random configurations, both modes and formats, against the reference.
TEST(BatchNormCpu, EpiloguesMatchReference) {
  std::mt19937_64 rng(31);
  for (int k = 0; k < 160; ++k) {
    Config cfg = random_config(rng);
    cfg.offset = 0, cfg.scale = 1;  // conditioning is the business of the tests above
    const Epilogues ep{k % 3 == 1, (k / 3) % 2 == 1, (k / 6) % 2 == 1, k % 3 == 2};
    const DType dtype = kDtypes[(k / 12) % 3];
    SCOPED_TRACE(cfg.str() + " " + to_string(dtype) + " " + ep.str());
    const EpilogueData e = make_epilogue_data(cfg, rng, dtype);
    const auto want = run_epilogue(cfg, e, dtype, ep, {.backend = Backend::reference});
    const auto got = run_epilogue(cfg, e, dtype, ep, {.num_threads = 1 + k % 3});
    expect_epilogue_close(cfg, e, got, want, dtype, ep);
    if (HasFailure()) break;
  }
}

// Float32 outputs of 16 MiB and more are written with non-temporal stores, one-lane steps up to
// the first aligned vector of each run: runs that start misaligned (odd planes), both
// schedules (channels of 5.6 MB, and of 262 KB read channel-local), channels-last rows whose
// vectors are all aligned (C = 64) and rows that are not (C = 50), short planes (the forward
// by slabs of several channels), each epilogue; against the reference, and bitwise the same for
// 2 and 3 threads.
TEST(BatchNormCpu, LargeOutputsMatchReference) {
  std::mt19937_64 rng(1717);
  const std::vector<Config> configs = {
      {{2, 3, 700, 1001}, MemoryFormat::channels_first},
      {{8, 65, 8191}, MemoryFormat::channels_first},
      {{2, 64, 32769}, MemoryFormat::channels_last},
      {{2, 50, 42000}, MemoryFormat::channels_last},
      {{22, 1000, 14, 14}, MemoryFormat::channels_first},  // short planes: by slabs
      {{6, 2001, 7, 50}, MemoryFormat::channels_first},    // odd slabs, misaligned
      {{900, 16, 300}, MemoryFormat::channels_first},      // by slabs after two phases
  };
  for (std::size_t k = 0; k < configs.size(); ++k) {
    const Config& cfg = configs[k];
    ASSERT_GE(cfg.numel() * 4, int64_t(16) << 20);
    const Epilogues ep{k % 3 == 1, k >= 2, k >= 2, k % 3 == 2};
    SCOPED_TRACE(cfg.str() + " " + ep.str());
    const EpilogueData e = make_epilogue_data(cfg, rng, DType::float32);
    const auto want = run_epilogue(cfg, e, DType::float32, ep, {.backend = Backend::reference});
    const auto got = run_epilogue(cfg, e, DType::float32, ep, {.num_threads = 2});
    expect_epilogue_close(cfg, e, got, want, DType::float32, ep);
    const auto three = run_epilogue(cfg, e, DType::float32, ep, {.num_threads = 3});
    EXPECT_TRUE(test::bitwise_equal(three.y, got.y));
    EXPECT_TRUE(test::bitwise_equal(three.dx, got.dx));
    EXPECT_TRUE(test::bitwise_equal(three.dres, got.dres));
  }
}

// bfloat16 and float16 against the float32 path on the same (rounded) inputs: equal up to the
// output's rounding. Inputs up to 3e2 in float16 have squares far beyond its range (6.5e4): the
// statistics must not overflow.
TEST(BatchNormCpu, LowPrecisionMatchesFloat32OnRoundedInputs) {
  std::mt19937_64 rng(41);
  for (int k = 0; k < 120; ++k) {
    Config cfg = random_config(rng);
    cfg.scale = k % 5 == 0 ? 100 : 1;
    cfg.offset = k % 5 == 0 ? 200 : (k % 3) * cfg.scale;
    const DType dtype = k % 2 ? DType::bfloat16 : DType::float16;
    const Epilogues ep{k % 3 == 1, k % 4 == 1, k % 5 == 1, k % 3 == 2};
    SCOPED_TRACE(cfg.str() + " " + to_string(dtype) + " " + ep.str());
    const EpilogueData e = make_epilogue_data(cfg, rng, dtype);
    const auto low = run_epilogue(cfg, e, dtype, ep, {.num_threads = 2});
    auto f32 = run_epilogue(cfg, e, DType::float32, ep, {.num_threads = 2});
    // What the float32 results become when stored in dtype.
    for (auto* v : {&f32.y, &f32.y_inf, &f32.dx, &f32.dx_inf, &f32.dres, &f32.dres_inf})
      *v = rounded(*v, dtype);
    // The same inputs and float32 statistics: the outputs differ only by their rounding, and by
    // float32 arithmetic in different orders.
    expect_epilogue_close(cfg, e, low, f32, dtype, ep);
    for (float v : low.save_invstd) ASSERT_TRUE(std::isfinite(v));
    if (HasFailure()) break;
  }
}

// Bitwise identical results for 1..4 threads with 16-bit activations and every epilogue, on
// shapes where the channel-at-a-time schedule runs for some thread counts and not others.
TEST(BatchNormCpu, LowPrecisionAndEpiloguesBitwiseIdenticalForAnyThreadCount) {
  std::mt19937_64 rng(43);
  const std::vector<Config> configs = {
      {{3, 5, 130, 131}, MemoryFormat::channels_first},
      {{4, 6, 1000}, MemoryFormat::channels_first},
      {{2, 70, 9, 11}, MemoryFormat::channels_last},
      {{1, 2, 300, 301}, MemoryFormat::channels_first},
  };
  for (const Config& cfg : configs)
    for (DType dtype : kDtypes)
    for (bool silu : {false, true}) {
      const Epilogues ep{!silu, dtype != DType::float32 || silu, true, silu};
      SCOPED_TRACE(cfg.str() + " " + to_string(dtype) + " " + ep.str());
      const EpilogueData e = make_epilogue_data(cfg, rng, dtype);
      const auto one = run_epilogue(cfg, e, dtype, ep, {.num_threads = 1});
      for (int threads : {2, 3, 4}) {
        const auto r = run_epilogue(cfg, e, dtype, ep, {.num_threads = threads});
        EXPECT_TRUE(test::bitwise_equal(r.y, one.y)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.save_mean, one.save_mean)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.save_invstd, one.save_invstd)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.y_inf, one.y_inf)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.dx, one.dx)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.dweight, one.dweight)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.dbias, one.dbias)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.dres, one.dres)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.dx_inf, one.dx_inf)) << threads;
        EXPECT_TRUE(test::bitwise_equal(r.dweight_inf, one.dweight_inf)) << threads;
      }
    }
}

// A caller's workspace of exactly batch_norm_workspace_size(x) bytes, at any alignment, gives
// the same bits as the internal one; one byte less is rejected before anything is written.
TEST(BatchNormCpu, CallerWorkspace) {
  std::mt19937_64 rng(47);
  for (const Config& cfg : {Config{{3, 5, 130, 131}, MemoryFormat::channels_first},
                            Config{{4, 7, 9, 11}, MemoryFormat::channels_last},
                            Config{{2, 3, 5}, MemoryFormat::channels_first}}) {
    SCOPED_TRACE(cfg.str());
    const Data d = make_data(cfg, rng);
    const std::size_t bytes = batch_norm_workspace_size(cfg.view(d.x.data()));
    std::vector<std::byte> ws(bytes + 16);
    const Results plain = run_all(cfg, d, {.num_threads = 2});
    // Any alignment of the caller's buffer: the queried size has room to align inside it.
    for (std::size_t offset : {0, 1, 3, 8}) {
      SCOPED_TRACE(offset);
      std::fill(ws.begin(), ws.end(), std::byte{0xA5});
      const Results with =
          run_all(cfg, d, {.num_threads = 2, .workspace = {ws.data() + offset, bytes}});
      EXPECT_TRUE(test::bitwise_equal(with.y, plain.y));
      EXPECT_TRUE(test::bitwise_equal(with.dx, plain.dx));
      EXPECT_TRUE(test::bitwise_equal(with.dweight, plain.dweight));
      EXPECT_TRUE(test::bitwise_equal(with.dx_inf, plain.dx_inf));
    }
    if (bytes == 0) continue;
    std::vector<float> y = poisoned(d.x.size()), mean = poisoned(5), invstd = poisoned(5);
    expect_error(
        [&] {
          batch_norm_forward_inference({}, cfg.view(d.x.data()), {}, {}, d.running_mean,
                                       d.running_var, cfg.view(y.data()),
                                       {.workspace = {ws.data(), bytes - 1}});
        },
        {"workspace has " + std::to_string(bytes - 1) + " bytes, expected at least"});
    EXPECT_EQ(y, poisoned(d.x.size()));
  }
}

// The vectorized silu and its derivative alone, on every target: an inference forward and
// backward whose normalization is the identity (running mean 0, running variance 1, eps 0, no
// weight or bias: z = x * 1 + 0 exactly), so y = silu(x) and dx = dresidual = dy * silu'(x)
// against double, on x in [-80, 80] (e^-|x| down to 2e-35) and around 0: y within 3e-7
// relative (a few float ulps) plus 1e-37; dy * silu'(x) within 3e-7 relative plus 1e-7 of the
// size of its terms, |dy| s (1 + |x| (1 - s)) (silu' cancels to 0 near x = -1.28).
TEST(BatchNormCpu, SiluIsAccurateOnEveryTarget) {
  std::vector<float> x;
  for (int i = -8000; i <= 8000; ++i) x.push_back(float(i) / 100.0f);
  for (float v : {1e-30f, -1e-30f, 1e-6f, -1e-6f, 0.0f, -0.0f, 88.5f, -88.5f}) x.push_back(v);
  const auto n = int64_t(x.size());
  std::vector<float> dy(x.size(), 1.0f);
  for (std::size_t i = 0; i < dy.size(); i += 2) dy[i] = -0.75f;
  const std::vector<float> zero(1, 0.0f), one(1, 1.0f);
  const TensorView xv(x.data(), {1, 1, n}), dyv(dy.data(), {1, 1, n});
  const auto targets = hwy::SupportedAndGeneratedTargets();
  for (int64_t target : targets) {
    hwy::SetSupportedTargetsForTest(target);
    SCOPED_TRACE(hwy::TargetName(target));
    std::vector<float> y = poisoned(x.size()), dx = poisoned(x.size()), dres = poisoned(x.size());
    BatchNormParams params{.eps = 0.0};
    params.epilogue.activation = Activation::silu;
    batch_norm_forward_inference(params, xv, {}, {}, zero, one, TensorView(y.data(), {1, 1, n}));
    batch_norm_backward_inference(
        {.eps = 0.0,
         .epilogue = {.activation = Activation::silu,
                      .dresidual = TensorView(dres.data(), {1, 1, n})}},
        dyv, xv, zero, one, {}, TensorView(dx.data(), {1, 1, n}), {}, {});
    int reported = 0;
    for (std::size_t i = 0; i < x.size() && reported < 5; ++i) {
      const double z = x[i], s = 1 / (1 + std::exp(-z));
      const double want_y = z * s, want_g = double(dy[i]) * s * (1 + z * (1 - s));
      const double g_terms = std::fabs(double(dy[i])) * s * (1 + std::fabs(z) * (1 - s));
      const bool ok = std::fabs(y[i] - want_y) <= 3e-7 * std::fabs(want_y) + 1e-37 &&
                      std::fabs(dx[i] - want_g) <= 3e-7 * std::fabs(want_g) + 1e-7 * g_terms + 1e-37 &&
                      dres[i] == dx[i];
      if (!ok) {
        ADD_FAILURE() << "x = " << z << ": y " << y[i] << " vs " << want_y << ", dx " << dx[i]
                      << " vs " << want_g << ", dresidual " << dres[i];
        ++reported;
      }
    }
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Finite differences of the float64 reference through the epilogue y = act(bn(x) + r), act relu
// or silu: dx, dresidual, dweight and dbias, for both modes and formats, at points whose
// pre-activations are all away from the ReLU's kink. silu's backward recomputes z from x, the
// statistics, weight, bias and r (bias float32, as the api's: the test's are floats).
TEST(BatchNormReference, EpilogueGradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(53);
  const std::vector<Config> configs = {{{3, 2, 5}, MemoryFormat::channels_first},
                                       {{2, 3, 2, 2}, MemoryFormat::channels_last}};
  for (const Config& cfg : configs)
    for (bool training : {true, false})
    for (Activation act : {Activation::relu, Activation::silu}) {
      const bool relu = act == Activation::relu;
      SCOPED_TRACE(cfg.str() + (training ? " training" : " inference") + (relu ? " relu" : " silu"));
      const auto sh = cfg.ref_shape();
      const auto total = std::size_t(cfg.numel()), C = std::size_t(cfg.c());
      std::normal_distribution<double> nd;
      std::vector<double> x(total), r(total), g(total), w(C), b(C), rm(C), rv(C);
      // y of the forward with the epilogue, and the pre-activation bn(x) + r.
      auto forward = [&](std::vector<double>& y, Activation a) {
        std::vector<double> mean(C), invstd(C);
        const plan::ForwardEpilogueOf<double> e{a, r.data()};
        if (training)
          ref::batch_norm_forward_training<double, double>(sh, cfg.eps, 0.0, e, x.data(),
                                                           w.data(), b.data(), y.data(),
                                                           mean.data(), invstd.data(), nullptr,
                                                           nullptr);
        else
          ref::batch_norm_forward_inference<double, double>(sh, cfg.eps, e, x.data(), w.data(),
                                                            b.data(), rm.data(), rv.data(),
                                                            y.data());
        return std::pair(mean, invstd);
      };
      std::vector<double> pre(total), y(total);
      for (int attempt = 0;; ++attempt) {
        ASSERT_LT(attempt, 1000) << "no point away from the kink";
        for (auto* v : {&x, &r, &g}) for (double& e : *v) e = nd(rng);
        for (std::size_t c = 0; c < C; ++c)
          w[c] = 1 + 0.5 * nd(rng), b[c] = double(float(0.3 * nd(rng))), rm[c] = 0.3 * nd(rng),
          rv[c] = 0.5 + std::fabs(nd(rng));
        forward(pre, Activation::none);
        double closest = INFINITY, positive = 0;
        for (double v : pre) closest = std::min(closest, std::fabs(v)), positive += v > 0;
        if (!relu || (closest > 0.05 && positive > 0 && positive < double(total))) break;
      }
      const auto [mean, invstd] = forward(y, act);
      std::vector<double> dx(total), dres(total), dw(C), db(C);
      const std::vector<float> bias_f(b.begin(), b.end());
      const plan::BackwardEpilogueOf<double> be{act, relu ? y.data() : nullptr,
                                                relu ? nullptr : r.data(),
                                                relu ? nullptr : bias_f.data(), dres.data()};
      if (training)
        ref::batch_norm_backward_training<double, double>(sh, be, g.data(), x.data(), mean.data(),
                                                          invstd.data(), w.data(), dx.data(),
                                                          dw.data(), db.data());
      else
        ref::batch_norm_backward_inference<double, double>(sh, cfg.eps, be, g.data(), x.data(),
                                                           rm.data(), rv.data(), w.data(),
                                                           dx.data(), dw.data(), db.data());
      auto loss = [&] {
        std::vector<double> out(total);
        forward(out, act);
        double l = 0;
        for (std::size_t i = 0; i < total; ++i) l += g[i] * out[i];
        return l;
      };
      auto numeric = [&](std::vector<double>& v, std::size_t i) {
        return test::central_difference(loss, v[i], 1e-6);
      };
      for (std::size_t i = 0; i < total; ++i) {
        EXPECT_NEAR(dx[i], numeric(x, i), 1e-6 * (1 + std::fabs(dx[i]))) << "dx[" << i << "]";
        EXPECT_NEAR(dres[i], numeric(r, i), 1e-6 * (1 + std::fabs(dres[i]))) << "dres[" << i << "]";
      }
      for (std::size_t c = 0; c < C; ++c) {
        EXPECT_NEAR(dw[c], numeric(w, c), 1e-6 * (1 + std::fabs(dw[c]))) << "dweight[" << c << "]";
        EXPECT_NEAR(db[c], numeric(b, c), 1e-6 * (1 + std::fabs(db[c]))) << "dbias[" << c << "]";
      }
    }
}

TEST(BatchNormErrors, Epilogues) {
  const auto cl = MemoryFormat::channels_last;
  expect_rejected<Buffers>({
      {[](Buffers& m) {
         BatchNormParams p;
         p.epilogue.residual = TensorView(m.dy.data(), {N, C, 3});
         train(m, m.vx(), m.vy(), p);
       },
       {"batch_norm_forward_training", "epilogue.residual shape (2, 3, 3) != x shape (2, 3, 4)"}},
      {[cl](Buffers& m) {
         BatchNormParams p;
         p.epilogue.residual = TensorView(m.dy.data(), {N, C, 2, 2}, cl);
         train(m, m.vx({N, C, 2, 2}), m.vy({N, C, 2, 2}), p);
       },
       {"epilogue.residual memory format channels_last != x memory format channels_first"}},
      {[](Buffers& m) {
         BatchNormParams p;
         p.epilogue.residual = TensorView(m.dy.data(), DType::bfloat16, {N, C, H});
         batch_norm_forward_inference(p, m.vx(), m.w, m.b, m.rm, m.rv, m.vy());
       },
       {"batch_norm_forward_inference", "epilogue.residual dtype bfloat16 != x dtype float32"}},
      {[](Buffers& m) {
         batch_norm_backward_training({.epilogue = {.activation = Activation::relu}},
                                      TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean,
                                      m.invstd, m.w, TensorView(m.dx.data(), {N, C, H}), m.dw,
                                      m.db);
       },
       {"batch_norm_backward_training", "epilogue.y (the forward's output) is required"}},
      {[](Buffers& m) {
         batch_norm_backward_training({.epilogue = {.activation = Activation::relu, .y = m.vy({N, C})}},
                                      TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean,
                                      m.invstd, m.w, TensorView(m.dx.data(), {N, C, H}), m.dw,
                                      m.db);
       },
       {"epilogue.y shape (2, 3) != x shape (2, 3, 4)"}},
      {[](Buffers& m) {
         // silu recomputes z with the forward's bias: one of another length is refused.
         batch_norm_backward_training(
             {.epilogue = {.activation = Activation::silu,
                           .bias = std::span<const float>(m.w).first(2)}},
             TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean, m.invstd, m.w,
             TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"batch_norm_backward_training", "epilogue.bias has length 2, expected C = 3"}},
      {[](Buffers& m) {
         batch_norm_backward_inference(
             {.epilogue = {.activation = Activation::silu,
                           .residual = TensorView(m.y.data(), {N, C, H - 1})}},
             TensorView(m.dy.data(), {N, C, H}), m.vx(), m.rm, m.rv, m.w,
             TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"batch_norm_backward_inference", "epilogue.residual shape (2, 3, 3) != x shape (2, 3, 4)"}},
      {[](Buffers& m) {
         BatchNormParams p;
         p.epilogue.activation = static_cast<Activation>(7);
         train(m, m.vx(), m.vy(), p);
       },
       {"batch_norm_forward_training", "epilogue.activation must be none, relu or silu, got 7"}},
      {[](Buffers& m) {
         batch_norm_backward_inference(
             {.epilogue = {.dresidual = TensorView(m.y.data(), DType::float16, {N, C, H})}},
             TensorView(m.dy.data(), {N, C, H}), m.vx(), m.rm, m.rv, m.w,
             TensorView(m.dx.data(), {N, C, H}), m.dw, m.db);
       },
       {"batch_norm_backward_inference", "epilogue.dresidual dtype float16 != x dtype float32"}},
      {[](Buffers& m) {
         std::vector<std::byte> ws(1);
         batch_norm_backward_training({}, TensorView(m.dy.data(), {N, C, H}), m.vx(), m.mean,
                                      m.invstd, m.w, TensorView(m.dx.data(), {N, C, H}), m.dw,
                                      m.db, {.workspace = ws});
       },
       {"batch_norm_backward_training", "workspace has 1 bytes, expected at least"}},
  });
}

}  // namespace
}  // namespace normkit
