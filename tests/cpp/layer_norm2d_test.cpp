// LayerNorm2d: the CPU backend (layer_norm's rows for channels_last, the strided kernel for
// channels_first) against the reference and a direct float64 computation, in both formats, at
// odd sizes; the backward against finite differences; bitwise thread-count invariance;
// poison-filled outputs; and the argument errors.
#include <gtest/gtest.h>

#include "common/dtype.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "normkit/layer_norm2d.h"
#include "op_test_harness.h"
#include "ref/layer_norm2d.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

constexpr double kFloatEps = 1.1920929e-07;

struct Case {
  std::vector<int64_t> dims;  // (N, C, *spatial)
  MemoryFormat format;
  int64_t N() const { return dims[0]; }
  int64_t C() const { return dims[1]; }
  int64_t S() const {
    int64_t s = 1;
    for (std::size_t i = 2; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
  int64_t count() const { return N() * C() * S(); }
};

struct Outputs {
  std::vector<float> y, mean, rstd, dx, dw, db;
};

// x, dy logical (channels-first); results returned logical too.
Outputs run(const Case& k, const std::vector<float>& x, const std::vector<float>& w,
            const std::vector<float>& b, const std::vector<float>& dy, const Context& ctx) {
  const auto xs = to_format(x, k.N(), k.C(), k.S(), k.format);
  const auto dys = to_format(dy, k.N(), k.C(), k.S(), k.format);
  Outputs o{poisoned(std::size_t(k.count())), poisoned(std::size_t(k.N() * k.S())),
            poisoned(std::size_t(k.N() * k.S())), poisoned(std::size_t(k.count())),
            poisoned(std::size_t(k.C())), poisoned(std::size_t(k.C()))};
  layer_norm2d_forward(view_of(xs, k.dims, k.format), 1e-6, w, b, view_of(o.y, k.dims, k.format),
                       o.mean, o.rstd, ctx);
  layer_norm2d_backward(view_of(dys, k.dims, k.format), view_of(xs, k.dims, k.format), o.mean,
                        o.rstd, w, view_of(o.dx, k.dims, k.format), o.dw, o.db, ctx);
  o.y = from_format(o.y, k.N(), k.C(), k.S(), k.format);
  o.dx = from_format(o.dx, k.N(), k.C(), k.S(), k.format);
  return o;
}

// The float64 oracle: a direct per-position computation in logical order.
struct Oracle {
  std::vector<double> y, dx, dw, db;
};
Oracle oracle(const Case& k, const std::vector<double>& x, const std::vector<double>& w,
              const std::vector<double>& b, const std::vector<double>& dy, double eps) {
  const int64_t C = k.C(), S = k.S();
  Oracle o{std::vector<double>(x.size()), std::vector<double>(x.size()),
           std::vector<double>(std::size_t(C)), std::vector<double>(std::size_t(C))};
  for (int64_t n = 0; n < k.N(); ++n)
    for (int64_t s = 0; s < S; ++s) {
      auto at = [&](int64_t c) { return std::size_t((n * C + c) * S + s); };
      double m = 0, v = 0;
      for (int64_t c = 0; c < C; ++c) m += x[at(c)] / double(C);
      for (int64_t c = 0; c < C; ++c) v += (x[at(c)] - m) * (x[at(c)] - m) / double(C);
      const double r = 1 / std::sqrt(v + eps);
      double a = 0, bsum = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double xhat = (x[at(c)] - m) * r;
        o.y[at(c)] = xhat * w[std::size_t(c)] + b[std::size_t(c)];
        a += dy[at(c)] * w[std::size_t(c)] / double(C);
        bsum += dy[at(c)] * w[std::size_t(c)] * xhat / double(C);
        o.dw[std::size_t(c)] += dy[at(c)] * xhat;
        o.db[std::size_t(c)] += dy[at(c)];
      }
      for (int64_t c = 0; c < C; ++c) {
        const double xhat = (x[at(c)] - m) * r;
        o.dx[at(c)] = r * (dy[at(c)] * w[std::size_t(c)] - a - xhat * bsum);
      }
    }
  return o;
}

const std::vector<Case> kCases = {
    {{2, 5, 7, 3}, MemoryFormat::channels_first},   {{2, 5, 7, 3}, MemoryFormat::channels_last},
    {{3, 23, 11, 13}, MemoryFormat::channels_first}, {{3, 23, 11, 13}, MemoryFormat::channels_last},
    {{1, 96, 9, 9}, MemoryFormat::channels_first},  {{1, 96, 9, 9}, MemoryFormat::channels_last},
    {{4, 7}, MemoryFormat::channels_first},         {{2, 3, 5, 4, 3}, MemoryFormat::channels_first},
    {{2, 3, 5, 4, 3}, MemoryFormat::channels_last}, {{5, 1, 67}, MemoryFormat::channels_first},
    {{2, 29, 131}, MemoryFormat::channels_first},   {{2, 29, 131}, MemoryFormat::channels_last},
};

TEST(LayerNorm2d, MatchesFloat64AndReference) {
  std::mt19937_64 rng(2024);
  for (const Case& k : kCases) {
    const auto x = random_normal(std::size_t(k.count()), rng, 3.0, 2.0);
    const auto dy = random_normal(std::size_t(k.count()), rng);
    const auto w = random_normal(std::size_t(k.C()), rng, 1.0, 0.5);
    const auto b = random_normal(std::size_t(k.C()), rng);
    const Oracle o = oracle(k, to_double(x), to_double(w), to_double(b), to_double(dy), 1e-6);
    const Outputs cpu = run(k, x, w, b, dy, cpu_ctx());
    const Outputs ref = run(k, x, w, b, dy, reference_ctx());
    // The size of the terms that cancel in dx (all of them with one channel): dy * w * rstd.
    const double terms = max_abs(dy) * max_abs(w) * max_abs(cpu.rstd);
    // The backward starts from float32 statistics, whose rounding dx inherits (times C).
    for (const Outputs* out : {&cpu, &ref}) {
      const bool is_cpu = out == &cpu;
      const std::string where = std::string(is_cpu ? "cpu " : "ref ") + std::to_string(k.C()) +
                                " channels, " + to_string(k.format);
      EXPECT_LE(relative_error(out->y, o.y), (is_cpu ? 64 : 4) * kFloatEps) << where;
      EXPECT_LE(relative_error(out->dx, o.dx, terms), 256 * kFloatEps) << where;
      EXPECT_LE(relative_error(out->dw, o.dw, 1.0), 256 * kFloatEps) << where;
      EXPECT_LE(relative_error(out->db, o.db, 1.0), 256 * kFloatEps) << where;
      EXPECT_FALSE(contains_poison(out->mean) || contains_poison(out->rstd)) << where;
    }
    // Both backwards see the same float32 statistics: closer to each other than to float64.
    EXPECT_LE(relative_error(cpu.dx, to_double(ref.dx), terms), 64 * kFloatEps);
  }
}

TEST(LayerNorm2d, NoAffineIsUnitWeightZeroBias) {
  std::mt19937_64 rng(7);
  for (const Case& k : kCases) {
    const auto x = random_normal(std::size_t(k.count()), rng);
    const auto dy = random_normal(std::size_t(k.count()), rng);
    const std::vector<float> ones(std::size_t(k.C()), 1.0f), zeros(std::size_t(k.C()), 0.0f);
    const Outputs with = run(k, x, ones, zeros, dy, cpu_ctx());
    const Outputs without = run(k, x, {}, {}, dy, cpu_ctx());
    EXPECT_TRUE(bitwise_equal(with.y, without.y));
    EXPECT_TRUE(bitwise_equal(with.dx, without.dx));
  }
}

TEST(LayerNorm2d, BitwiseForAnyThreadCount) {
  std::mt19937_64 rng(11);
  for (const Case& k : {Case{{3, 96, 17, 19}, MemoryFormat::channels_first},
                        Case{{3, 96, 17, 19}, MemoryFormat::channels_last}}) {
    const auto x = random_normal(std::size_t(k.count()), rng, 1.0);
    const auto dy = random_normal(std::size_t(k.count()), rng);
    const auto w = random_normal(std::size_t(k.C()), rng), b = random_normal(std::size_t(k.C()), rng);
    const Outputs one = run(k, x, w, b, dy, cpu_ctx(1));
    for (int t : {2, 3, 4}) {
      const Outputs many = run(k, x, w, b, dy, cpu_ctx(t));
      EXPECT_TRUE(bitwise_equal(one.y, many.y) && bitwise_equal(one.mean, many.mean) &&
                  bitwise_equal(one.rstd, many.rstd) && bitwise_equal(one.dx, many.dx) &&
                  bitwise_equal(one.dw, many.dw) && bitwise_equal(one.db, many.db))
          << t << " threads, " << to_string(k.format);
    }
  }
}

// loss = sum(dy * y) in double through the reference's double loops; its central differences
// against the reference backward's dx, dweight, dbias.
TEST(LayerNorm2d, BackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(5);
  const ref::LayerNorm2dShape t{2, 6, 5};
  const std::size_t count = 60, positions = 10;
  std::vector<double> x = to_double(random_normal(count, rng, 0.5)),
                      dy = to_double(random_normal(count, rng)),
                      w = to_double(random_normal(6, rng, 1.0)), b = to_double(random_normal(6, rng));
  auto loss = [&] {
    std::vector<double> y(count), m(positions), r(positions);
    ref::layer_norm2d_forward<double>(t, 1e-3, x.data(), w.data(), b.data(), y.data(), m.data(),
                                      r.data());
    double l = 0;
    for (std::size_t i = 0; i < count; ++i) l += dy[i] * y[i];
    return l;
  };
  std::vector<double> y(count), m(positions), r(positions), dx(count), dw(6), db(6);
  ref::layer_norm2d_forward<double>(t, 1e-3, x.data(), w.data(), b.data(), y.data(), m.data(),
                                    r.data());
  ref::layer_norm2d_backward<double>(t, dy.data(), x.data(), m.data(), r.data(), w.data(),
                                     dx.data(), dw.data(), db.data());
  for (std::size_t i = 0; i < count; ++i)
    EXPECT_NEAR(central_difference(loss, x[i], 1e-5), dx[i], 1e-6) << i;
  for (std::size_t c = 0; c < 6; ++c) {
    EXPECT_NEAR(central_difference(loss, w[c], 1e-5), dw[c], 1e-6) << c;
    EXPECT_NEAR(central_difference(loss, b[c], 1e-5), db[c], 1e-6) << c;
  }
}


// Activations of type T: the CPU backend on every SIMD target against the reference on the same
// (rounded) values, both formats, sizes with and without vector tails; bitwise thread-count
// invariance on each target.
template <typename T>
void check_every_target(double tol) {
  std::mt19937_64 rng(17);
  const DType dtype = std::is_same_v<T, float> ? DType::float32
                      : std::is_same_v<T, bf16> ? DType::bfloat16 : DType::float16;
  for (const Case& k : {Case{{2, 37, 11, 13}, MemoryFormat::channels_first},
                        Case{{2, 37, 11, 13}, MemoryFormat::channels_last},
                        Case{{3, 64, 8, 16}, MemoryFormat::channels_first},
                        Case{{1, 5, 3}, MemoryFormat::channels_first}}) {
    const std::size_t count = std::size_t(k.count()), positions = std::size_t(k.N() * k.S());
    std::vector<T> x(count), dy(count);
    for (std::size_t i = 0; i < count; ++i) {
      x[i] = from_float<T>(float(1.5 + 2.0 * std::normal_distribution<double>()(rng)));
      dy[i] = from_float<T>(float(std::normal_distribution<double>()(rng)));
    }
    const auto w = random_normal(std::size_t(k.C()), rng, 1.0, 0.3);
    const auto b = random_normal(std::size_t(k.C()), rng);
    auto view = [&](const std::vector<T>& v) {
      return TensorView(v.data(), dtype, int(k.dims.size()), k.dims.data(), k.format);
    };
    struct Out {
      std::vector<T> y, dx;
      std::vector<float> mean, rstd, dw, db;
    };
    auto call = [&](const Context& ctx) {
      Out o{std::vector<T>(count, from_float<T>(kPoison)), std::vector<T>(count, from_float<T>(kPoison)),
            poisoned(positions), poisoned(positions), poisoned(std::size_t(k.C())),
            poisoned(std::size_t(k.C()))};
      layer_norm2d_forward(view(x), 1e-6, w, b, view(o.y), o.mean, o.rstd, ctx);
      layer_norm2d_backward(view(dy), view(x), o.mean, o.rstd, w, view(o.dx), o.dw, o.db, ctx);
      return o;
    };
    auto floats = [](const std::vector<T>& v) {
      std::vector<float> f(v.size());
      for (std::size_t i = 0; i < v.size(); ++i) f[i] = to_float(v[i]);
      return f;
    };
    const Out ref = call(reference_ctx());
    for_each_target([&] {
      const Out one = call(cpu_ctx(1));
      EXPECT_LE(relative_error(floats(one.y), to_double(floats(ref.y))), tol) << to_string(k.format);
      EXPECT_LE(relative_error(floats(one.dx), to_double(floats(ref.dx))), 4 * tol);
      EXPECT_LE(relative_error(one.mean, to_double(ref.mean), 1.0), 64 * kFloatEps);
      EXPECT_LE(relative_error(one.rstd, to_double(ref.rstd)), 64 * kFloatEps);
      EXPECT_LE(relative_error(one.dw, to_double(ref.dw), 1.0), 256 * kFloatEps);
      EXPECT_LE(relative_error(one.db, to_double(ref.db), 1.0), 256 * kFloatEps);
      const Out three = call(cpu_ctx(3));
      EXPECT_TRUE(floats(one.y) == floats(three.y) && floats(one.dx) == floats(three.dx) &&
                  bitwise_equal(one.dw, three.dw) && bitwise_equal(one.db, three.db) &&
                  bitwise_equal(one.rstd, three.rstd));
    });
  }
}

TEST(LayerNorm2d, EverySimdTargetAndDtypeMatchesReference) {
  check_every_target<float>(64 * kFloatEps);
  check_every_target<bf16>(2.0 / 256);  // a rounding of the output or two, relative to max |y|
  check_every_target<f16>(2.0 / 2048);
}

struct ForwardArgs {
  std::vector<int64_t> x_dims{2, 3, 4, 5}, y_dims{2, 3, 4, 5};
  std::vector<float> x = std::vector<float>(120, 0.5f), w = std::vector<float>(3, 1.0f),
                     b = std::vector<float>(3, 0.0f);
  std::vector<float> y = poisoned(120), mean = poisoned(40), rstd = poisoned(40);
  double eps = 1e-6;
  void run() {
    layer_norm2d_forward(view_of(x, x_dims), eps, w, b, view_of(y, y_dims), mean, rstd, cpu_ctx());
  }
  bool untouched() const {
    return y == poisoned(120) && mean == poisoned(mean.size()) && rstd == poisoned(rstd.size());
  }
};

TEST(LayerNorm2dErrors, ForwardArguments) {
  constexpr auto expect_forward_error = expect_edit_error<ForwardArgs>;
  expect_forward_error([](auto& a) { a.w.resize(4); },
                       {"layer_norm2d_forward", "weight has length 4", "C = 3"});
  expect_forward_error([](auto& a) { a.b.resize(2); }, {"bias has length 2", "C = 3"});
  expect_forward_error([](auto& a) { a.y_dims = {2, 3, 5, 4}; },
                       {"y shape (2, 3, 5, 4) != x shape (2, 3, 4, 5)"});
  expect_forward_error([](auto& a) { a.mean.resize(39, kPoison); },
                       {"mean has length 39", "N * spatial = 40"});
  expect_forward_error([](auto& a) { a.eps = std::nan(""); }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.x_dims = {120}; a.y_dims = {120}; },
                       {"layer_norm2d_forward", "x"});
}

TEST(LayerNorm2dErrors, BackwardArguments) {
  std::vector<float> x(24, 0.5f), dy(24, 1.0f), mean(8, 0.0f), rstd(8, 1.0f), w(3, 1.0f);
  std::vector<float> dx = poisoned(24), dw = poisoned(3);
  const std::vector<int64_t> dims{2, 3, 4};
  expect_error(
      [&] {
        layer_norm2d_backward(view_of(dy, {2, 3, 4}), view_of(x, dims), mean, rstd, w,
                              view_of(dx, {2, 4, 3}), dw, {}, cpu_ctx());
      },
      {"layer_norm2d_backward", "dx shape (2, 4, 3) != x shape (2, 3, 4)"});
  std::vector<float> short_rstd(7, 1.0f);
  expect_error(
      [&] {
        layer_norm2d_backward(view_of(dy, dims), view_of(x, dims), mean, short_rstd, w,
                              view_of(dx, dims), dw, {}, cpu_ctx());
      },
      {"rstd has length 7", "N * spatial = 8"});
  EXPECT_EQ(dx, poisoned(24));
  EXPECT_EQ(dw, poisoned(3));
}

}  // namespace
}  // namespace normkit::test
