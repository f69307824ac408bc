// FRN + TLU: a direct float64 computation (logical layout) against finite differences in x, the
// vectors and eps; the reference against it; the optimized backend against the reference for
// every SIMD target, dtype, memory format and thread count (bitwise across thread counts), with
// poison-filled outputs; zero-size inputs, the workspace contract and every argument error.
#include <gtest/gtest.h>

#include <cmath>
#include <cstddef>
#include <functional>
#include <tuple>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "normkit/error.h"
#include "normkit/frn.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

// Logical (N, C, S) data, channels-first order, in double.
struct Oracle {
  int64_t N, C, S;
  double eps;
  std::vector<double> x, w, b, t;

  double r(int64_t n, int64_t c) const {
    double q = 0;
    for (int64_t s = 0; s < S; ++s) q += x[(n * C + c) * S + s] * x[(n * C + c) * S + s];
    return 1.0 / std::sqrt(q / double(S) + eps);
  }
  std::vector<double> forward() const {
    std::vector<double> y(x.size());
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const double rr = r(n, c);
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (n * C + c) * S + s;
          y[i] = std::max(x[i] * rr * w[c] + b[c], t[c]);
        }
      }
    return y;
  }
  // sum(dy * y): its gradients are the backward's outputs.
  double loss(const std::vector<double>& dy) const {
    const auto y = forward();
    double l = 0;
    for (std::size_t i = 0; i < y.size(); ++i) l += dy[i] * y[i];
    return l;
  }
  // The backward written from the header's formulas: dx, dweight, dbias, dtau, deps.
  struct Grads {
    std::vector<double> dx, dw, db, dt, de;
  };
  Grads backward(const std::vector<double>& dy) const {
    const std::vector<double> zeros(static_cast<std::size_t>(C));
    Grads g{std::vector<double>(x.size()), zeros, zeros, zeros, zeros};
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) {
        const double rr = r(n, c);
        std::vector<double> gg(static_cast<std::size_t>(S)), xhat(gg);
        double mean_gx = 0;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t i = (n * C + c) * S + s;
          xhat[s] = x[i] * rr;
          const bool to_tau = xhat[s] * w[c] + b[c] < t[c];
          gg[s] = to_tau ? 0.0 : dy[i];
          g.dt[c] += to_tau ? dy[i] : 0.0;
          g.db[c] += gg[s];
          g.dw[c] += gg[s] * xhat[s];
          mean_gx += gg[s] * xhat[s] / double(S);
        }
        for (int64_t s = 0; s < S; ++s)
          g.dx[(n * C + c) * S + s] = w[c] * rr * (gg[s] - xhat[s] * mean_gx);
        g.de[c] += -0.5 * w[c] * rr * rr * mean_gx * double(S);
      }
    return g;
  }
};

Oracle make_oracle(int64_t N, int64_t C, int64_t S, std::mt19937_64& rng, double eps = 1e-6) {
  Oracle o{N, C, S, eps};
  o.x = to_double(random_normal(std::size_t(N * C * S), rng, 0.3, 1.5));
  o.w = to_double(random_normal(std::size_t(C), rng, 0.8, 0.5));
  o.b = to_double(random_normal(std::size_t(C), rng, 0.0, 0.5));
  o.t = to_double(random_normal(std::size_t(C), rng, -0.2, 0.5));
  return o;
}

TEST(FrnOracle, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(11);
  for (auto [N, C, S] : {std::tuple<int64_t, int64_t, int64_t>{2, 3, 7}, {1, 5, 1}, {3, 2, 13}}) {
    Oracle o = make_oracle(N, C, S, rng, 1e-3);
    const auto dy = to_double(random_normal(o.x.size(), rng));
    const auto g = o.backward(dy);
    const double h = 1e-6;
    auto loss = [&] { return o.loss(dy); };
    for (std::size_t i = 0; i < o.x.size(); ++i)
      EXPECT_NEAR(g.dx[i], central_difference(loss, o.x[i], h), 1e-6) << "dx " << i;
    for (std::size_t c = 0; c < std::size_t(C); ++c) {
      EXPECT_NEAR(g.dw[c], central_difference(loss, o.w[c], h), 1e-6) << "dweight " << c;
      EXPECT_NEAR(g.db[c], central_difference(loss, o.b[c], h), 1e-6) << "dbias " << c;
      EXPECT_NEAR(g.dt[c], central_difference(loss, o.t[c], h), 1e-6) << "dtau " << c;
    }
  }
}

// deps per channel against central differences in eps moved for that channel alone (its part of
// the loss, with its own copy of eps), and their sum against eps moved for the whole layer; TLU
// active and inactive.
TEST(FrnOracle, DepsMatchesFiniteDifferencesInEps) {
  std::mt19937_64 rng(13);
  for (bool tlu : {true, false})
    for (auto shape :
         {std::tuple<int64_t, int64_t, int64_t>{2, 3, 7}, {1, 5, 1}, {3, 2, 13}}) {
      // Plain variables, not a structured binding: the lambdas below capture them.
      const int64_t N = std::get<0>(shape), C = std::get<1>(shape), S = std::get<2>(shape);
      SCOPED_TRACE(std::to_string(N) + " " + std::to_string(C) + " " + std::to_string(S) +
                   (tlu ? " tlu" : " no tlu"));
      // eps large enough to move rstd visibly.
      Oracle o = make_oracle(N, C, S, rng, 0.05);
      if (!tlu) o.t.assign(o.t.size(), -1e300);
      const auto dy = to_double(random_normal(o.x.size(), rng));
      const auto g = o.backward(dy);
      if (tlu) {
        double to_tau = 0;
        for (double v : g.dt) to_tau += std::abs(v);
        EXPECT_GT(to_tau, 0.0) << "the TLU takes some elements";
      }
      Oracle moved = o;
      double total = 0;
      for (int64_t c = 0; c < C; ++c) {
        const auto channel_loss = [&] {
          const auto y = moved.forward();
          double l = 0;
          for (int64_t n = 0; n < N; ++n)
            for (int64_t s = 0; s < S; ++s) {
              const int64_t i = (n * C + c) * S + s;
              l += dy[i] * y[i];
            }
          return l;
        };
        const double fd = central_difference(channel_loss, moved.eps, 1e-7);
        EXPECT_NEAR(g.de[c], fd, 1e-6 * std::max(1.0, std::abs(fd))) << "deps " << c;
        total += g.de[c];
      }
      const double fd_layer = central_difference([&] { return moved.loss(dy); }, moved.eps, 1e-7);
      EXPECT_NEAR(total, fd_layer, 1e-6 * std::max(1.0, std::abs(fd_layer))) << "sum of deps";
    }
}

// One problem in a memory format: inputs of T and float vectors, stored in that format.
template <typename T>
struct Problem {
  Oracle o;
  MemoryFormat format;
  std::vector<int64_t> dims;
  std::vector<T> x, dy;
  std::vector<float> w, b, t;

  TensorView view(const std::vector<T>& v) const {
    return TensorView(v.data(), dtype_of<T>(), int(dims.size()), dims.data(), format);
  }
};

template <typename T>
Problem<T> make_problem(std::vector<int64_t> dims, MemoryFormat format, std::mt19937_64& rng) {
  int64_t S = 1;
  for (std::size_t i = 2; i < dims.size(); ++i) S *= dims[i];
  Problem<T> p{make_oracle(dims[0], dims[1], S, rng), format, dims};
  // The inputs as T, and the oracle on exactly those values.
  auto xs = rounded<T>(std::vector<float>(p.o.x.begin(), p.o.x.end()));
  const auto xw = wide_f(xs);
  p.o.x.assign(xw.begin(), xw.end());
  p.x = to_format(xs, p.o.N, p.o.C, S, format);
  p.dy = to_format(rounded<T>(random_normal(p.o.x.size(), rng)), p.o.N, p.o.C, S, format);
  p.w.assign(p.o.w.begin(), p.o.w.end());
  p.b.assign(p.o.b.begin(), p.o.b.end());
  p.t.assign(p.o.t.begin(), p.o.t.end());
  for (int64_t c = 0; c < p.o.C; ++c)
    p.o.w[c] = p.w[c], p.o.b[c] = p.b[c], p.o.t[c] = p.t[c];
  return p;
}

template <typename T>
struct Out {
  std::vector<T> y, dx;
  std::vector<float> rstd, dw, db, dt, de;
};

// Every output poison-filled, then forward and backward (with deps, then without: the other
// outputs must not change a bit).
template <typename T>
Out<T> run(const Problem<T>& p, const Context& ctx) {
  const std::size_t n = p.x.size(), nc = std::size_t(p.o.N * p.o.C), C = std::size_t(p.o.C);
  Out<T> o{poisoned_as<T>(n), poisoned_as<T>(n), poisoned(nc), poisoned(C), poisoned(C),
           poisoned(C), poisoned(C)};
  frn_forward(p.o.eps, p.view(p.x), p.w, p.b, p.t, p.view(o.y), o.rstd, ctx);
  frn_backward(p.view(p.dy), p.view(p.x), o.rstd, p.w, p.b, p.t, p.view(o.dx), o.dw, o.db, o.dt,
               o.de, ctx);
  auto dx = poisoned_as<T>(n);
  auto dw = poisoned(C), db = poisoned(C), dt = poisoned(C);
  frn_backward(p.view(p.dy), p.view(p.x), o.rstd, p.w, p.b, p.t, p.view(dx), dw, db, dt, ctx);
  EXPECT_TRUE(bitwise_equal(dx, o.dx) && bitwise_equal(dw, o.dw) && bitwise_equal(db, o.db) &&
              bitwise_equal(dt, o.dt))
      << "deps changes other outputs";
  return o;
}

const std::vector<std::vector<int64_t>> kShapes = {
    {2, 3, 7, 5}, {3, 5, 1, 1}, {1, 7, 29}, {2, 1, 3, 5, 2}, {4, 3}, {1, 261, 3, 3}, {2, 6, 2100}};

template <typename T>
void check_against_oracle(const Problem<T>& p, const Out<T>& o, double tol, const char* what) {
  const int64_t S = int64_t(p.x.size()) / std::max<int64_t>(p.o.N * p.o.C, 1);
  std::vector<double> dyd;
  {
    const auto d = wide_f(from_format(p.dy, p.o.N, p.o.C, S, p.format));
    dyd.assign(d.begin(), d.end());
  }
  const auto y = p.o.forward();
  const auto g = p.o.backward(dyd);
  const auto yl = wide_f(from_format(o.y, p.o.N, p.o.C, S, p.format));
  const auto dxl = wide_f(from_format(o.dx, p.o.N, p.o.C, S, p.format));
  EXPECT_LE(relative_error(yl, y, 1.0), tol) << what << " y";
  EXPECT_LE(relative_error(dxl, g.dx, 1.0), tol) << what << " dx";
  EXPECT_LE(relative_error(o.dw, g.dw, 1.0), tol) << what << " dweight";
  EXPECT_LE(relative_error(o.db, g.db, 1.0), tol) << what << " dbias";
  EXPECT_LE(relative_error(o.dt, g.dt, 1.0), tol) << what << " dtau";
  EXPECT_LE(relative_error(o.de, g.de, 1.0), tol) << what << " deps";
  for (int64_t n = 0; n < p.o.N; ++n)
    for (int64_t c = 0; c < p.o.C; ++c)
      EXPECT_NEAR(o.rstd[n * p.o.C + c], p.o.r(n, c), 1e-6 * p.o.r(n, c)) << what << " rstd";
}

TEST(Frn, ReferenceMatchesFloat64) {
  std::mt19937_64 rng(3);
  for (const auto& dims : kShapes)
    for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      SCOPED_TRACE(::testing::PrintToString(dims) + " " + to_string(format));
      const auto p = make_problem<float>(dims, format, rng);
      check_against_oracle(p, run(p, Context{Backend::reference}), 2e-6, "reference");
    }
}

template <typename T>
void cpu_matches_reference(double tol) {
  std::mt19937_64 rng(5);
  for_each_target([&] {
    for (const auto& dims : kShapes)
      for (auto format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
        SCOPED_TRACE(::testing::PrintToString(dims) + " " + to_string(format) + " " +
                     to_string(dtype_of<T>()));
        const auto p = make_problem<T>(dims, format, rng);
        const auto want = run(p, Context{Backend::reference});
        const auto one = run(p, Context{Backend::cpu, 1});
        check_against_oracle(p, one, tol, "cpu");
        expect_near_t(one.y, want.y, 4, 1e-6, "y vs reference");
        EXPECT_LE(relative_error(one.de, to_double(want.de), 1.0), tol) << "deps vs reference";
        // Bitwise the same for any thread count.
        for (int threads : {2, 3}) {
          const auto many = run(p, Context{Backend::cpu, threads});
          EXPECT_TRUE(bitwise_equal(many.y, one.y)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.dx, one.dx)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.rstd, one.rstd)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.dw, one.dw)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.db, one.db)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.dt, one.dt)) << threads << " threads";
          EXPECT_TRUE(bitwise_equal(many.de, one.de)) << threads << " threads";
        }
      }
  });
}

// Tolerances relative to the largest value: the dtype's rounding of x and of the outputs.
TEST(Frn, CpuMatchesReferenceFloat32) { cpu_matches_reference<float>(2e-5); }
TEST(Frn, CpuMatchesReferenceBFloat16) { cpu_matches_reference<bf16>(4 * ulp1<bf16>()); }
TEST(Frn, CpuMatchesReferenceFloat16) { cpu_matches_reference<f16>(4 * ulp1<f16>()); }

TEST(Frn, TluTakesTauWhereBelowAndTiesGoToX) {
  // C = 1, S = 2: x = (1, -1) gives rstd = 1/sqrt(1 + eps) ~ 1, z = x with w = 1, b = 0.
  const std::vector<int64_t> dims{1, 1, 2};
  for (auto backend : {Backend::reference, Backend::cpu}) {
    const std::vector<float> x{1.0f, -1.0f}, dy{2.0f, 3.0f};
    const std::vector<float> w{1}, b{0}, t{0};
    std::vector<float> y(2), rstd(1), dx(2), dw(1), db(1), dt(1);
    const Context ctx{backend};
    frn_forward(0.0, view_of(x, dims), w, b, t, view_of(y, dims), rstd, ctx);
    EXPECT_EQ(y[0], 1.0f);
    EXPECT_EQ(y[1], 0.0f);
    frn_backward(view_of(dy, dims), view_of(x, dims), rstd, w, b, t, view_of(dx, dims), dw, db,
                 dt, ctx);
    EXPECT_EQ(dt[0], 3.0f);  // the second element's dy: z = -1 < tau
    EXPECT_EQ(db[0], 2.0f);
    // A tie: tau = z of the first element exactly (z = 1 * rstd * 1 + 0 with rstd = 1).
    const std::vector<float> tie{1.0f};
    frn_backward(view_of(dy, dims), view_of(x, dims), rstd, w, b, tie, view_of(dx, dims), dw, db,
                 dt, ctx);
    EXPECT_EQ(db[0], 2.0f) << "a tie goes to x's side";
    EXPECT_EQ(dt[0], 3.0f);
  }
}

TEST(Frn, EmptySpatialGivesNanRstdAndZeroGradients) {
  const std::vector<int64_t> dims{2, 3, 0};
  const std::vector<float> none, w{1, 1, 1};
  for (auto backend : {Backend::reference, Backend::cpu}) {
    auto rstd = poisoned(6), dw = poisoned(3), db = poisoned(3), dt = poisoned(3),
         de = poisoned(3);
    const Context ctx{backend};
    frn_forward(1e-6, view_of(none, dims), w, w, w, view_of(none, dims), rstd, ctx);
    for (float r : rstd) EXPECT_TRUE(std::isnan(r));
    frn_backward(view_of(none, dims), view_of(none, dims), rstd, w, w, w, view_of(none, dims), dw,
                 db, dt, de, ctx);
    for (const auto* v : {&dw, &db, &dt, &de})
      for (float e : *v) EXPECT_EQ(e, 0.0f);
  }
}

TEST(Frn, CallerWorkspaceOfTheQueriedSize) {
  std::mt19937_64 rng(9);
  const auto p = make_problem<float>({3, 5, 4, 3}, MemoryFormat::channels_last, rng);
  const std::size_t bytes = frn_workspace_size(p.view(p.x));
  EXPECT_GE(bytes, 3 * 15 * sizeof(double));
  std::vector<std::byte> ws(bytes);
  Context with{Backend::cpu, 2, ws};
  const auto a = run(p, with), b = run(p, Context{Backend::cpu, 2});
  EXPECT_TRUE(bitwise_equal(a.dx, b.dx));
  EXPECT_TRUE(bitwise_equal(a.dw, b.dw));
  Context small{Backend::cpu, 2, std::span<std::byte>(ws.data(), bytes - 1)};
  EXPECT_THROW(run(p, small), Error);
}

// The message names the function and the argument; nothing is written.
void expect_error(const std::function<void()>& f, const std::string& want) {
  try {
    f();
    ADD_FAILURE() << "no error, expected " << want;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
  }
}

TEST(Frn, ErrorsNameTheArgumentAndWriteNothing) {
  const std::vector<int64_t> dims{2, 3, 4};
  const std::vector<float> x(24, 1.0f), w(3, 1.0f), w2(2, 1.0f);
  auto y = poisoned(24), rstd = poisoned(6), dx = poisoned(24), dw = poisoned(3);
  const auto xv = view_of(x, dims), yv = view_of(y, dims), dxv = view_of(dx, dims);
  expect_error([&] { frn_forward(1e-6, xv, w2, w, w, yv, rstd); }, "frn_forward: weight");
  expect_error([&] { frn_forward(1e-6, xv, w, w2, w, yv, rstd); }, "bias");
  expect_error([&] { frn_forward(1e-6, xv, w, w, w2, yv, rstd); }, "tau");
  expect_error([&] { frn_forward(1e-6, xv, w, w, {}, yv, rstd); }, "tau");
  expect_error([&] { frn_forward(-1.0, xv, w, w, w, yv, rstd); }, "eps");
  expect_error([&] { frn_forward(1e-6, xv, w, w, w, yv, std::span<float>(rstd).first(5)); },
               "rstd");
  const std::vector<int64_t> other{2, 3, 2, 2};
  expect_error([&] { frn_forward(1e-6, xv, w, w, w, view_of(y, other), rstd); }, "y");
  EXPECT_TRUE(contains_poison(y) && contains_poison(rstd));
  for (float e : y) EXPECT_EQ(e, kPoison);
  expect_error([&] { frn_backward(view_of(y, other), xv, rstd, w, w, w, dxv, dw, {}, {}); },
               "frn_backward: dy");
  const std::span<float> dw2 = std::span<float>(dw).first(2), dw1 = dw2.first(1);
  expect_error([&] { frn_backward(xv, xv, rstd, w, w, w, dxv, dw2, {}, {}); }, "dweight");
  expect_error([&] { frn_backward(xv, xv, rstd, w, w, w, dxv, dw, {}, dw1); }, "dtau");
  auto de = poisoned(4);
  expect_error([&] { frn_backward(xv, xv, rstd, w, w, w, dxv, dw, {}, {}, de); },
               "frn_backward: deps has length 4, expected C = 3");
  expect_error([&] { frn_backward(xv, xv, rstd, w, w, w, dxv, dw, {}, {}, dw1); }, "deps");
  for (float e : dx) EXPECT_EQ(e, kPoison);
  for (float e : dw) EXPECT_EQ(e, kPoison);
  for (float e : de) EXPECT_EQ(e, kPoison);
}

}  // namespace
}  // namespace normkit::test
