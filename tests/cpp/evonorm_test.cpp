// EvoNorm-S0: a direct float64 computation (logical layout) against finite differences; the
// reference against it; the optimized backend against the reference for every SIMD target,
// dtype, memory format and thread count (bitwise across thread counts), its statistics bitwise
// GroupNorm's, with poison-filled outputs; zero-size inputs, the workspace contract and every
// argument error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "common/dtype.h"
#include "normkit/error.h"
#include "normkit/evonorm.h"
#include "normkit/group_norm.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

// Logical (N, C, S) data, channels-first order, in double.
struct Oracle {
  int64_t N, C, S, G;
  double eps;
  std::vector<double> x, v, w, b;

  int64_t per_group() const { return C / G; }
  // mean and rstd of group (n, g), two-pass.
  std::pair<double, double> stats(int64_t n, int64_t g) const {
    const int64_t M = per_group() * S;
    const double* p = x.data() + (n * C + g * per_group()) * S;
    double mu = 0;
    for (int64_t i = 0; i < M; ++i) mu += p[i];
    mu /= double(M);
    double var = 0;
    for (int64_t i = 0; i < M; ++i) var += (p[i] - mu) * (p[i] - mu);
    return {mu, 1.0 / std::sqrt(var / double(M) + eps)};
  }
  static double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
  std::vector<double> forward() const {
    std::vector<double> y(x.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const double r = stats(n, c / per_group()).second;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (n * C + c) * S + s;
          y[i] = x[i] * sigmoid(v[c] * x[i]) * r * w[c] + b[c];
        }
      }
    return y;
  }
  double loss(const std::vector<double>& dy) const {
    const auto y = forward();
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += dy[i] * y[i];
    return l;
  }
  // The header's formulas.
  struct Grads {
    std::vector<double> dx, dv, dw, db;
  };
  Grads backward(const std::vector<double>& dy) const {
    const auto Cs = static_cast<std::size_t>(C);
    Grads g{std::vector<double>(x.size()), std::vector<double>(Cs), std::vector<double>(Cs),
            std::vector<double>(Cs)};
    for (int64_t n = 0; n < N; ++n)
      for (int64_t gr = 0; gr < G; ++gr) {
        const auto [mu, r] = stats(n, gr);
        double through = 0;
        for (int64_t c = gr * per_group(); c < (gr + 1) * per_group(); ++c)
          for (int64_t s = 0; s < S; ++s) {
            const int64_t i = (n * C + c) * S + s;
            const double sg = sigmoid(v[c] * x[i]);
            through += dy[i] * w[c] * x[i] * sg;
            g.db[c] += dy[i];
            g.dw[c] += dy[i] * x[i] * sg * r;
            g.dv[c] += dy[i] * w[c] * r * x[i] * x[i] * sg * (1 - sg);
          }
        const double M = double(per_group() * S);
        for (int64_t c = gr * per_group(); c < (gr + 1) * per_group(); ++c)
          for (int64_t s = 0; s < S; ++s) {
            const int64_t i = (n * C + c) * S + s;
            const double sg = sigmoid(v[c] * x[i]);
            g.dx[i] = dy[i] * w[c] * r * sg * (1 + v[c] * x[i] * (1 - sg)) -
                      r * r * r * (x[i] - mu) / M * through;
          }
      }
    return g;
  }
};

Oracle make_oracle(int64_t N, int64_t C, int64_t S, int64_t G, std::mt19937_64& rng,
                   double eps = 1e-5) {
  Oracle o{N, C, S, G, eps};
  o.x = to_double(random_normal(std::size_t(N * C * S), rng, 0.3, 1.5));
  o.v = to_double(random_normal(std::size_t(C), rng, 1.0, 0.5));
  o.w = to_double(random_normal(std::size_t(C), rng, 0.8, 0.5));
  o.b = to_double(random_normal(std::size_t(C), rng, 0.0, 0.5));
  return o;
}

TEST(EvoNormOracle, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(11);
  for (auto [N, C, S, G] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{2, 6, 7, 3},
                            {1, 4, 1, 2}, {3, 3, 5, 1}, {2, 2, 2, 2}}) {
    Oracle o = make_oracle(N, C, S, G, rng, 1e-3);
    const auto dy = to_double(random_normal(o.x.size(), rng));
    const auto g = o.backward(dy);
    const double h = 1e-6;
    auto loss = [&] { return o.loss(dy); };
    for (std::size_t i = 0; i < o.x.size(); ++i)
      EXPECT_NEAR(g.dx[i], central_difference(loss, o.x[i], h), 1e-6) << "dx " << i;
    for (std::size_t c = 0; c < std::size_t(C); ++c) {
      EXPECT_NEAR(g.dv[c], central_difference(loss, o.v[c], h), 1e-6) << "dv " << c;
      EXPECT_NEAR(g.dw[c], central_difference(loss, o.w[c], h), 1e-6) << "dweight " << c;
      EXPECT_NEAR(g.db[c], central_difference(loss, o.b[c], h), 1e-6) << "dbias " << c;
    }
  }
}

template <typename T>
struct Problem {
  Oracle o;
  MemoryFormat format;
  std::vector<int64_t> dims;
  std::vector<T> x, dy;
  std::vector<float> v, w, b;

  TensorView view(const std::vector<T>& t) const {
    return TensorView(t.data(), dtype_of<T>(), int(dims.size()), dims.data(), format);
  }
};

template <typename T>
Problem<T> make_problem(std::vector<int64_t> dims, int64_t G, MemoryFormat format,
                        std::mt19937_64& rng) {
  int64_t S = 1;
  for (std::size_t i = 2; i < dims.size(); ++i) S *= dims[i];
  Problem<T> p{make_oracle(dims[0], dims[1], S, G, rng), format, dims};
  auto xs = rounded<T>(std::vector<float>(p.o.x.begin(), p.o.x.end()));
  const auto xw = wide_f(xs);
  p.o.x.assign(xw.begin(), xw.end());
  p.x = to_format(xs, p.o.N, p.o.C, S, format);
  p.dy = to_format(rounded<T>(random_normal(p.o.x.size(), rng)), p.o.N, p.o.C, S, format);
  for (auto pair : {std::make_pair(&p.v, &p.o.v), std::make_pair(&p.w, &p.o.w),
                     std::make_pair(&p.b, &p.o.b)}) {
    pair.first->assign(pair.second->begin(), pair.second->end());
    pair.second->assign(pair.first->begin(), pair.first->end());
  }
  return p;
}

template <typename T>
struct Out {
  std::vector<T> y, dx;
  std::vector<float> mean, rstd, dv, dw, db;
};

template <typename T>
Out<T> run(const Problem<T>& p, const Context& ctx) {
  const std::size_t n = p.x.size(), ng = std::size_t(p.o.N * p.o.G), C = std::size_t(p.o.C);
  Out<T> o{poisoned_as<T>(n), poisoned_as<T>(n), poisoned(ng), poisoned(ng),
           poisoned(C),       poisoned(C),       poisoned(C)};
  evonorm_s0_forward({p.o.G, p.o.eps}, p.view(p.x), p.v, p.w, p.b, p.view(o.y), o.mean, o.rstd,
                     ctx);
  evonorm_s0_backward(p.o.G, p.view(p.dy), p.view(p.x), o.mean, o.rstd, p.v, p.w, p.view(o.dx),
                      o.dv, o.dw, o.db, ctx);
  return o;
}

const std::vector<std::pair<std::vector<int64_t>, int64_t>> kShapes = {
    {{2, 6, 7, 5}, 3},   {{3, 5, 1, 1}, 5},  {{1, 8, 29}, 2},       {{2, 4, 3, 5, 2}, 1},
    {{4, 6}, 2},         {{1, 261, 3, 3}, 3}, {{2, 6, 2100}, 2},    {{2, 3, 45, 47}, 3}};

template <typename T>
void check_against_oracle(const Problem<T>& p, const Out<T>& o, double tol, const char* what) {
  const int64_t S = int64_t(p.x.size()) / std::max<int64_t>(p.o.N * p.o.C, 1);
  const auto d = wide_f(from_format(p.dy, p.o.N, p.o.C, S, p.format));
  const std::vector<double> dyd(d.begin(), d.end());
  const auto y = p.o.forward();
  const auto g = p.o.backward(dyd);
  EXPECT_LE(relative_error(wide_f(from_format(o.y, p.o.N, p.o.C, S, p.format)), y, 1.0), tol)
      << what << " y";
  // dx: its two terms cancel where the gate is flat; relative to the gradient's size.
  EXPECT_LE(relative_error(wide_f(from_format(o.dx, p.o.N, p.o.C, S, p.format)), g.dx, 1.0), tol)
      << what << " dx";
  EXPECT_LE(relative_error(o.dv, g.dv, 1.0), tol) << what << " dv";
  EXPECT_LE(relative_error(o.dw, g.dw, 1.0), tol) << what << " dweight";
  EXPECT_LE(relative_error(o.db, g.db, 1.0), tol) << what << " dbias";
  for (int64_t n = 0; n < p.o.N; ++n)
    for (int64_t gr = 0; gr < p.o.G; ++gr) {
      const auto [mu, r] = p.o.stats(n, gr);
      EXPECT_NEAR(o.mean[n * p.o.G + gr], mu, 1e-6 * (std::fabs(mu) + 1 / r)) << what;
      EXPECT_NEAR(o.rstd[n * p.o.G + gr], r, 1e-6 * r) << what;
    }
}

TEST(EvoNorm, ReferenceMatchesFloat64) {
  std::mt19937_64 rng(3);
  for (const auto& [dims, G] : kShapes)
    for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      SCOPED_TRACE(::testing::PrintToString(dims) + " " + to_string(format));
      const auto p = make_problem<float>(dims, G, format, rng);
      check_against_oracle(p, run(p, Context{Backend::reference}), 2e-6, "reference");
    }
}

template <typename T>
void cpu_matches_reference(double tol) {
  std::mt19937_64 rng(5);
  for_each_target([&] {
    for (const auto& [dims, G] : kShapes)
      for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
        SCOPED_TRACE(::testing::PrintToString(dims) + " " + to_string(format) + " " +
                     to_string(dtype_of<T>()));
        const auto p = make_problem<T>(dims, G, format, rng);
        const auto want = run(p, Context{Backend::reference});
        const auto one = run(p, Context{Backend::cpu, 1});
        check_against_oracle(p, one, tol, "cpu");
        expect_near_t(one.y, want.y, 8, 1e-6, "y vs reference");
        // The statistics are GroupNorm's, bitwise.
        std::vector<T> gy = poisoned_as<T>(p.x.size());
        std::vector<float> gm = poisoned(one.mean.size()), gr = poisoned(one.rstd.size());
        group_norm_forward({p.o.G, p.o.eps}, p.view(p.x), {}, {}, p.view(gy), gm, gr,
                           Context{Backend::cpu, 1});
        EXPECT_TRUE(bitwise_equal(gm, one.mean));
        EXPECT_TRUE(bitwise_equal(gr, one.rstd));
        for (int threads : {2, 3}) {
          const auto many = run(p, Context{Backend::cpu, threads});
          EXPECT_TRUE(bitwise_equal(many.y, one.y)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.dx, one.dx)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.mean, one.mean)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.rstd, one.rstd)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.dv, one.dv)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.dw, one.dw)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.db, one.db)) << threads << " threads";
        }
      }
  });
}

TEST(EvoNorm, CpuMatchesReferenceFloat32) { cpu_matches_reference<float>(2e-5); }
TEST(EvoNorm, CpuMatchesReferenceBFloat16) { cpu_matches_reference<bf16>(6 * ulp1<bf16>()); }
TEST(EvoNorm, CpuMatchesReferenceFloat16) { cpu_matches_reference<f16>(6 * ulp1<f16>()); }

TEST(EvoNorm, EmptySpatialGivesGroupNormStatisticsAndZeroGradients) {
  const std::vector<int64_t> dims{2, 4, 0};
  const std::vector<float> none, w{1, 1, 1, 1};
  for (auto backend : {Backend::reference, Backend::cpu}) {
    auto mean = poisoned(4), rstd = poisoned(4), dv = poisoned(4), dw = poisoned(4),
         db = poisoned(4);
    const Context ctx{backend};
    evonorm_s0_forward({2, 1e-5}, view_of(none, dims), w, w, w, view_of(none, dims), mean, rstd,
                       ctx);
    for (float m : mean) EXPECT_EQ(m, 0.0f);
    for (float r : rstd) EXPECT_TRUE(std::isnan(r));
    evonorm_s0_backward(2, view_of(none, dims), view_of(none, dims), mean, rstd, w, w,
                        view_of(none, dims), dv, dw, db, ctx);
    for (const auto* g : {&dv, &dw, &db})
      for (float e : *g) EXPECT_EQ(e, 0.0f);
  }
}

TEST(EvoNorm, CallerWorkspaceOfTheQueriedSize) {
  std::mt19937_64 rng(9);
  for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    const auto p = make_problem<float>({3, 6, 40, 30}, 3, format, rng);
    const std::size_t bytes = evonorm_s0_workspace_size({3, 1e-5}, p.view(p.x));
    std::vector<std::byte> ws(bytes);
    const auto a = run(p, Context{Backend::cpu, 2, ws}), b = run(p, Context{Backend::cpu, 2});
    EXPECT_TRUE(bitwise_equal(a.y, b.y));
    EXPECT_TRUE(bitwise_equal(a.dx, b.dx));
    EXPECT_TRUE(bitwise_equal(a.dv, b.dv));
    EXPECT_THROW(run(p, Context{Backend::cpu, 2, std::span<std::byte>(ws.data(), bytes - 1)}),
                 Error);
  }
}

void expect_error(const std::function<void()>& f, const std::string& want) {
  try {
    f();
    ADD_FAILURE() << "no error, expected " << want;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
}

TEST(EvoNorm, ErrorsNameTheArgumentAndWriteNothing) {
  const std::vector<int64_t> dims{2, 4, 3};
  const std::vector<float> x(24, 1.0f), w(4, 1.0f), w3(3, 1.0f);
  auto y = poisoned(24), mean = poisoned(4), rstd = poisoned(4), dx = poisoned(24),
       dv = poisoned(4);
  const auto xv = view_of(x, dims), yv = view_of(y, dims), dxv = view_of(dx, dims);
  const EvoNormS0Params params{2, 1e-5};
  expect_error([&] { evonorm_s0_forward({3, 1e-5}, xv, w, w, w, yv, mean, rstd); },
               "evonorm_s0_forward: num_groups");
  expect_error([&] { evonorm_s0_forward(params, xv, w3, w, w, yv, mean, rstd); }, "v");
  expect_error([&] { evonorm_s0_forward(params, xv, w, w3, w, yv, mean, rstd); }, "weight");
  expect_error([&] { evonorm_s0_forward(params, xv, w, w, {}, yv, mean, rstd); }, "bias");
  expect_error([&] { evonorm_s0_forward({2, -1.0}, xv, w, w, w, yv, mean, rstd); }, "eps");
  expect_error(
      [&] { evonorm_s0_forward(params, xv, w, w, w, yv, std::span<float>(mean).first(3), rstd); },
      "mean");
  for (float e : y) EXPECT_EQ(e, kPoison);
  for (float e : mean) EXPECT_EQ(e, kPoison);
  const std::span<float> dv3 = std::span<float>(dv).first(3), mean2 = std::span<float>(mean).first(2);
  expect_error([&] { evonorm_s0_backward(2, xv, xv, mean, rstd, w, w, dxv, dv3, {}, {}); },
               "evonorm_s0_backward: dv");
  const std::vector<int64_t> other{2, 4, 1, 3};
  const auto dy_other = view_of(y, other);
  expect_error([&] { evonorm_s0_backward(2, dy_other, xv, mean, rstd, w, w, dxv, dv, {}, {}); },
               "dy");
  expect_error([&] { evonorm_s0_backward(2, xv, xv, mean2, rstd, w, w, dxv, dv, {}, {}); },
               "mean");
  for (float e : dx) EXPECT_EQ(e, kPoison);
  for (float e : dv) EXPECT_EQ(e, kPoison);
}

}  // namespace
}  // namespace normkit::test
