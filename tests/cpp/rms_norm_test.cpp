// RMSNorm: the optimized backend against the reference for every SIMD target, dtype, epilogue,
// fused residual add and thread count; the reference against a direct float64 computation
// (full Jacobian) and finite differences; accuracy at large means; bitwise thread-count
// invariance; poison-filled outputs; and every argument error.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "normkit/error.h"
#include "normkit/rms_norm.h"
#include "ref/rms_norm.h"
#include "op_test_harness.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

struct Shape {
  std::vector<int64_t> dims;
  int k = 1;  // normalized_ndim
  MemoryFormat format = MemoryFormat::channels_first;

  int rank() const { return int(dims.size()); }
  int64_t rows() const {
    int64_t p = 1;
    for (int i = 0; i < rank() - k; ++i) p *= dims[std::size_t(i)];
    return p;
  }
  int64_t cols() const {
    int64_t p = 1;
    for (int i = rank() - k; i < rank(); ++i) p *= dims[std::size_t(i)];
    return p;
  }
  int64_t numel() const { return rows() * cols(); }
  bool channels_last() const { return format == MemoryFormat::channels_last && rank() > 2; }
  ref::LayerNormShape shape() const { return {rows(), cols(), channels_last() ? dims[1] : 0}; }
  std::string str() const {
    std::string s = "dims=(";
    for (int64_t d : dims) s += std::to_string(d) + ",";
    return s + ") k=" + std::to_string(k) + " " + to_string(format);
  }
};
Shape first(std::vector<int64_t> dims, int k) { return {std::move(dims), k}; }
Shape last(std::vector<int64_t> dims) {
  const int k = int(dims.size()) - 1;
  return {std::move(dims), k, MemoryFormat::channels_last};
}

// One problem: the epilogue, and whether the fused residual add (residual_in, sum_out) and the
// gradient of the sum (dsum_out) take part.
template <typename T>
struct Problem {
  Shape sh;
  Epi epi = kNone;
  bool add = false;
  double eps = 1e-5;
  std::vector<T> x, r, res_in, dy, dsum;
  std::vector<float> w;

  TensorView view(const std::vector<T>& v) const {
    return TensorView(v.empty() ? nullptr : v.data(), dtype_of<T>(), sh.rank(), sh.dims.data(),
                      sh.format);
  }
  std::string str() const {
    return sh.str() + " " + epi_name(epi) + (add ? " +residual_in" : "") +
           (w.empty() ? "" : " w") + " " + to_string(dtype_of<T>());
  }
};

template <typename T>
Problem<T> make_problem(const Shape& sh, Epi epi, bool add, std::mt19937_64& rng,
                        double offset = 0, double scale = 1, bool weight = true) {
  Problem<T> p{sh, epi, add};
  const auto n = std::size_t(sh.numel());
  p.x = rounded<T>(random_normal(n, rng, offset, scale));
  if (has_residual(epi)) p.r = rounded<T>(random_normal(n, rng, 0.0, 0.5));
  if (add) {
    p.res_in = rounded<T>(random_normal(n, rng, 0.0, scale));
    p.dsum = rounded<T>(random_normal(n, rng));
  }
  p.dy = rounded<T>(random_normal(n, rng));
  if (weight) p.w = random_normal(std::size_t(sh.cols()), rng, 0.5, 1.0);
  return p;
}

template <typename T>
struct Out {
  std::vector<T> y, sum, dx, dres;
  std::vector<float> rstd, dw;
};

// Every output poison-filled, the forward, then the backward of `forward_in` (this call's own
// forward when null), on what the forward normalized (sum_out with the residual add).
template <typename T>
Out<T> run(const Problem<T>& p, const Context& ctx, const Out<T>* forward_in = nullptr) {
  const auto n = std::size_t(p.sh.numel());
  Out<T> o;
  o.y = poisoned_as<T>(n);
  o.dx = poisoned_as<T>(n);
  o.rstd = poisoned(std::size_t(p.sh.rows()));
  o.dw = poisoned(std::size_t(p.sh.cols()));
  RmsNormParams params{p.sh.k, p.eps};
  params.epilogue.activation = activation_of(p.epi);
  if (has_residual(p.epi)) params.epilogue.residual = p.view(p.r);
  if (p.add) {
    o.sum = poisoned_as<T>(n);
    params.residual_in = p.view(p.res_in);
    params.sum_out = p.view(o.sum);
  }
  rms_norm_forward(params, p.view(p.x), opt(p.w), p.view(o.y), o.rstd, ctx);

  const Out<T>& f = forward_in ? *forward_in : o;
  RmsNormBackwardParams bp{p.sh.k};
  bp.epilogue.activation = activation_of(p.epi);
  if (has_relu(p.epi)) bp.epilogue.y = p.view(f.y);
  if (has_silu(p.epi) && has_residual(p.epi)) bp.epilogue.residual = p.view(p.r);
  if (has_residual(p.epi)) {
    o.dres = poisoned_as<T>(n);
    bp.epilogue.dresidual = p.view(o.dres);
  }
  if (p.add) bp.dsum_out = p.view(p.dsum);
  rms_norm_backward(bp, p.view(p.dy), p.view(p.add ? f.sum : p.x), f.rstd, opt(p.w),
                    p.view(o.dx), o.dw, ctx);
  return o;
}

// The CPU backend against the reference, both backwards from the reference forward's outputs
// (a ReLU mask never differs by rounding). `widen` loosens the bounds for large means.
template <typename T>
void compare_cpu_to_reference(const Problem<T>& p, int threads, const std::string& what) {
  const Out<T> want = run(p, reference_ctx());
  const Out<T> got = run(p, cpu_ctx(threads), &want);
  // h = x + residual_in is one rounded addition in both.
  if (p.add) EXPECT_TRUE(bitwise_equal(got.sum, want.sum)) << what << " sum_out";
  expect_near_t(got.y, want.y, 1.0, 2e-5 * (1 + max_abs_t(want.y)), what + " y");
  expect_near_f(got.rstd, want.rstd, 1e-5, what + " rstd");
  const double dx_terms =
      max_abs(want.rstd) * (p.w.empty() ? 1.0 : max_abs(p.w)) * max_abs_t(p.dy);
  expect_near_t(got.dx, want.dx, 1.0, 1e-4 * (1 + max_abs_t(want.dx)) + 1e-6 * dx_terms,
                what + " dx");
  expect_near_f(got.dw, want.dw, 1e-4, what + " dweight");
  if (has_residual(p.epi))
    expect_near_t(got.dres, want.dres, has_silu(p.epi) ? 1.0 : 0.0,
                  has_silu(p.epi) ? 2e-5 * (1 + max_abs_t(p.dy)) : 0.0, what + " dresidual");
}

// Row lengths 1 .. 33 (every remainder of every target's vector loops), channels-first and
// channels-last rows, every epilogue, with and without the residual add and the weight.
template <typename T>
void tails_on_this_target(std::mt19937_64& rng) {
  for (Epi e : kEpilogues)
    for (int64_t n = 1; n <= 33; ++n) {
      const Shape cf = first({3, n}, 1);
      const Problem<T> a = make_problem<T>(cf, e, n % 2 == 0, rng, 0, 1, n % 3 != 0);
      compare_cpu_to_reference(a, 2, a.str());
      const Problem<T> b = make_problem<T>(last({2, n, 3}), e, n % 2 == 1, rng);
      compare_cpu_to_reference(b, 2, b.str());
    }
}

TEST(RmsNormSimd, EveryTargetTailDtypeAndEpilogue) {
  std::mt19937_64 rng(61);
  for_each_target([&] {
    tails_on_this_target<float>(rng);
    tails_on_this_target<bf16>(rng);
    tails_on_this_target<f16>(rng);
  });
}

// Rows of several pieces, the cached and the two-phase schedules, every rank and layout, one
// row and many rows, rows of one value, 1 and 3 threads.
const Shape kLarge[] = {
    first({3, 5000}, 1),   first({300, 70}, 1),    first({260, 2100}, 1),
    first({2, 6, 4, 5}, 2), first({3, 4, 5, 6, 7}, 3), first({5, 3, 7}, 3),
    first({700, 1}, 1),    first({1, 9001}, 1),    last({2, 7, 6, 5, 3}),
    last({1, 3, 70, 50}),  last({9, 5, 4}),
};

template <typename T>
void large_against_reference(std::mt19937_64& rng) {
  int i = 0;
  for (const Shape& sh : kLarge)
    for (Epi e : kEpilogues)
      for (int threads : {1, 3}) {
        ++i;
        const Problem<T> p = make_problem<T>(sh, e, i % 2 == 0, rng, i % 3 == 0 ? 100.0 : 0.0,
                                             1, i % 5 != 0);
        compare_cpu_to_reference(p, threads, p.str() + " threads " + std::to_string(threads));
      }
}

TEST(RmsNormSimd, LargeShapesMatchReferenceForEveryDtypeAndEpilogue) {
  std::mt19937_64 rng(62);
  large_against_reference<float>(rng);
  large_against_reference<bf16>(rng);
  large_against_reference<f16>(rng);
}

// Work is split by the shape only: 2 to 4 threads give the bits of one, on every target.
TEST(RmsNormSimd, BitwiseIdenticalForAnyThreadCount) {
  std::mt19937_64 rng(63);
  const Shape shapes[] = {first({4096, 24}, 1), first({3, 70001}, 1), first({300, 2100}, 1),
                          last({2, 16, 30, 30})};
  for_each_target([&] {
    int i = 0;
    for (const Shape& sh : shapes)
      for (Epi e : {kNone, kResidualSilu, kRelu}) {
        const Problem<float> p = make_problem<float>(sh, e, ++i % 2 == 0, rng, 3.0);
        const Out<float> one = run(p, cpu_ctx(1));
        for (int threads = 2; threads <= 4; ++threads) {
          const Out<float> many = run(p, cpu_ctx(threads));
          const std::string what = p.str() + " threads " + std::to_string(threads);
          EXPECT_TRUE(bitwise_equal(many.y, one.y)) << what;
          EXPECT_TRUE(bitwise_equal(many.sum, one.sum)) << what;
          EXPECT_TRUE(bitwise_equal(many.rstd, one.rstd)) << what;
          EXPECT_TRUE(bitwise_equal(many.dx, one.dx)) << what;
          EXPECT_TRUE(bitwise_equal(many.dw, one.dw)) << what;
          EXPECT_TRUE(bitwise_equal(many.dres, one.dres)) << what;
        }
      }
  });
}

// Both backends against the float64 computation from the same float inputs: RMSNorm has no
// mean to subtract, so a large mean costs no accuracy (unlike LayerNorm's bound, which grows
// with |mean| / spread): y within 1e-5 of max|y|, dx and dweight 20x.
TEST(RmsNorm, AccurateAtLargeMeans) {
  std::mt19937_64 rng(64);
  const Shape shapes[] = {first({6, 768}, 1), first({2, 3, 4097}, 1), last({3, 5, 7, 9}),
                          first({1000}, 1), first({64, 1}, 1)};
  for (const Shape& sh : shapes)
    for (double scale : {1e-3, 1.0, 3e4})
      for (double ratio : {0.0, 1.0, -1e2, 1e3, -3e4}) {
        const Problem<float> p = make_problem<float>(sh, kNone, false, rng, ratio * scale, scale);
        const auto x = to_double(p.x), dy = to_double(p.dy), w = to_double(p.w);
        std::vector<double> y(x.size()), rstd(std::size_t(sh.rows())), dx(x.size()),
            dw(std::size_t(sh.cols()));
        ref::rms_norm_forward<double>(sh.shape(), p.eps, x.data(), w.data(), y.data(), rstd.data());
        ref::rms_norm_backward<double>(sh.shape(), dy.data(), x.data(), rstd.data(), w.data(),
                                       dx.data(), dw.data());
        double dx_terms = 0;
        for (std::size_t i = 0; i < x.size(); ++i)
          dx_terms = std::max(dx_terms, rstd[i / std::size_t(sh.cols())] *
                                            std::fabs(w[i % std::size_t(sh.cols())] * dy[i]));
        for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
          const Out<float> o = run(p, ctx);
          const std::string what = p.str() + " mean/spread " + std::to_string(ratio);
          EXPECT_LE(max_abs_diff(o.y, y), 1e-5 * max_abs(y)) << what;
          // A row of one value cancels dx to ~eps / x^2 of its terms rstd * |w * dy|.
          EXPECT_LE(max_abs_diff(o.dx, dx), 2e-4 * max_abs(dx) + 4 * kFloatEps * dx_terms) << what;
          EXPECT_LE(max_abs_diff(o.dw, dw), 2e-4 * max_abs(dw)) << what;
          for (std::size_t i = 0; i < rstd.size(); ++i)
            EXPECT_NEAR(o.rstd[i], rstd[i], 1e-6 * rstd[i]) << what;
        }
      }
}

// Direct double computation: rstd by definition, dx through the full Jacobian, weight by logical
// position (channels-last rows are permuted in memory).
TEST(RmsNorm, ReferenceMatchesDirectComputation) {
  std::mt19937_64 rng(65);
  const Shape shapes[] = {first({3, 5}, 1), last({2, 3, 2, 2}), first({2, 3, 4}, 2), first({7}, 1),
                          first({4, 1}, 1)};
  for (const Shape& sh : shapes)
    for (bool weight : {true, false}) {
      const Problem<float> p = make_problem<float>(sh, kNone, false, rng, 0.7, 1.5, weight);
      const int64_t R = sh.rows(), M = sh.cols();
      const int64_t C = sh.channels_last() ? sh.dims[1] : 1, S = M / C;
      const MemoryFormat f = sh.channels_last() ? MemoryFormat::channels_last : MemoryFormat::channels_first;
      const auto x = from_format(to_double(p.x), R, C, S, f);
      const auto dy = from_format(to_double(p.dy), R, C, S, f);
      auto w = [&](int64_t j) { return p.w.empty() ? 1.0 : double(p.w[std::size_t(j)]); };
      std::vector<double> y(x.size()), dx(x.size()), dw(std::size_t(M), 0), rstd(static_cast<std::size_t>(R));
      for (int64_t r = 0; r < R; ++r) {
        const auto at = [&](int64_t j) { return std::size_t(r * M + j); };
        double ms = 0;
        for (int64_t j = 0; j < M; ++j) ms += x[at(j)] * x[at(j)] / double(M);
        const double rs = 1 / std::sqrt(ms + p.eps);
        rstd[std::size_t(r)] = rs;
        for (int64_t i = 0; i < M; ++i) {
          y[at(i)] = x[at(i)] * rs * w(i);
          // d(x_i * rs) / dx_j = rs * (i == j) - x_i * rs^3 * x_j / M
          double sum = 0;
          for (int64_t j = 0; j < M; ++j)
            sum += dy[at(j)] * w(j) * (rs * (i == j) - x[at(j)] * rs * rs * rs * x[at(i)] / double(M));
          dx[at(i)] = sum;
          dw[std::size_t(i)] += dy[at(i)] * x[at(i)] * rs;
        }
      }
      const Out<float> o = run(p, reference_ctx());
      EXPECT_LE(max_abs_diff(from_format(o.y, R, C, S, f), y), 1e-6 * max_abs(y)) << p.str();
      EXPECT_LE(max_abs_diff(o.rstd, rstd), 1e-6 * max_abs(rstd)) << p.str();
      // dx's rounding scale is its terms rstd * |w * dy| (a row of one value cancels them).
      const double dx_terms = max_abs(rstd) * (p.w.empty() ? 1.0 : max_abs(p.w)) * max_abs(p.dy);
      EXPECT_LE(max_abs_diff(from_format(o.dx, R, C, S, f), dx),
                1e-5 * max_abs(dx) + 4 * kFloatEps * dx_terms) << p.str();
      if (weight) EXPECT_LE(max_abs_diff(o.dw, dw), 1e-5 * max_abs(dw)) << p.str();
    }
}

TEST(RmsNorm, ReferenceBackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(66);
  for (int64_t channels : {0, 3}) {
    const ref::LayerNormShape sh{3, 6, channels};
    const std::size_t n = 18;
    auto x = to_double(random_normal(n, rng, -0.5, 2.0));
    auto dy = to_double(random_normal(n, rng));
    auto w = to_double(random_normal(6, rng, 1.0, 0.5));
    const double eps = 1e-3;
    std::vector<double> y(n), rstd(3);
    auto loss = [&]() {
      ref::rms_norm_forward(sh, eps, x.data(), w.data(), y.data(), rstd.data());
      double l = 0;
      for (std::size_t i = 0; i < n; ++i) l += y[i] * dy[i];
      return l;
    };
    loss();
    std::vector<double> dx(n), dw(6);
    ref::rms_norm_backward(sh, dy.data(), x.data(), rstd.data(), w.data(), dx.data(), dw.data());
    auto numeric = [&](double& v) {
      return central_difference(loss, v, 1e-6 * std::max(1.0, std::fabs(v)));
    };
    for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(dx[i], numeric(x[i]), 1e-6) << i;
    for (std::size_t j = 0; j < 6; ++j) EXPECT_NEAR(dw[j], numeric(w[j]), 1e-6) << j;
  }
}

// The fused residual add: sum_out = x + residual_in exactly as one rounded addition, y the norm
// of it, and the backward dh = d(norm) + dsum_out: the same call without the add, on h, plus
// dsum_out (in float64 through the reference; for the CPU within rounding).
TEST(RmsNorm, ResidualAddIsNormOfTheSumAndItsGradientAddsDsum) {
  std::mt19937_64 rng(67);
  for (const Context& ctx : {reference_ctx(), cpu_ctx(2)})
    for (const Shape& sh : {first({37, 129}, 1), last({2, 5, 3, 7})}) {
      const Problem<float> p = make_problem<float>(sh, kResidualSilu, true, rng, 1.0, 2.0);
      const Out<float> fused = run(p, ctx);
      Problem<float> plain = p;
      plain.add = false;
      for (std::size_t i = 0; i < p.x.size(); ++i) plain.x[i] = p.x[i] + p.res_in[i];
      const Out<float> o = run(plain, ctx);
      EXPECT_TRUE(bitwise_equal(fused.sum, plain.x)) << p.str();
      EXPECT_TRUE(bitwise_equal(fused.y, o.y)) << p.str();
      EXPECT_TRUE(bitwise_equal(fused.rstd, o.rstd)) << p.str();
      EXPECT_TRUE(bitwise_equal(fused.dw, o.dw)) << p.str();
      EXPECT_TRUE(bitwise_equal(fused.dres, o.dres)) << p.str();
      std::vector<double> want(o.dx.size());
      for (std::size_t i = 0; i < want.size(); ++i) want[i] = double(o.dx[i]) + double(p.dsum[i]);
      EXPECT_LE(max_abs_diff(fused.dx, want), 4 * kFloatEps * (1 + max_abs(want))) << p.str();
    }
}

// sum_out may be x's memory or residual_in's (the usual in-place residual stream); dx may be
// dsum_out's.
TEST(RmsNorm, InPlaceResidualStream) {
  std::mt19937_64 rng(68);
  const Shape sh = first({33, 300}, 1);
  const Problem<float> p = make_problem<float>(sh, kNone, true, rng);
  for (const Context& ctx : {reference_ctx(), cpu_ctx(2)}) {
    const Out<float> want = run(p, ctx);
    for (int into : {0, 1}) {
      std::vector<float> x = p.x, r = p.res_in, y = poisoned(x.size()), rstd = poisoned(33);
      RmsNormParams params{1, p.eps};
      params.residual_in = view_of(r, sh.dims);
      params.sum_out = view_of(into == 0 ? x : r, sh.dims);
      rms_norm_forward(params, view_of(x, sh.dims), p.w, view_of(y, sh.dims), rstd, ctx);
      EXPECT_EQ(into == 0 ? x : r, want.sum);
      EXPECT_EQ(y, want.y);
      std::vector<float> d = p.dsum, dw = poisoned(300);
      RmsNormBackwardParams bp{1};
      bp.dsum_out = view_of(d, sh.dims);
      rms_norm_backward(bp, view_of(p.dy, sh.dims), view_of(want.sum, sh.dims), want.rstd, p.w,
                        view_of(d, sh.dims), dw, ctx);
      EXPECT_EQ(d, want.dx);
      EXPECT_EQ(dw, want.dw);
    }
  }
}

TEST(RmsNorm, EmptyRowsAndColumns) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    {  // No rows: the weight gradient is an empty sum.
      std::vector<float> x, y, w(4, 1.0f), dw = poisoned(4);
      const std::vector<int64_t> dims{0, 3, 4};
      EXPECT_NO_THROW(rms_norm_forward({1, 1e-5}, view_of(x, dims), w, view_of(y, dims), {}, ctx));
      EXPECT_NO_THROW(rms_norm_backward({1}, view_of(x, dims), view_of(x, dims), {}, w,
                                        view_of(y, dims), dw, ctx));
      EXPECT_EQ(dw, std::vector<float>(4, 0.0f));
    }
    {  // Empty rows: rstd NaN, as mean(x^2) of nothing.
      std::vector<float> x, y, rstd = poisoned(3);
      const std::vector<int64_t> dims{3, 0};
      rms_norm_forward({1, 1e-5}, view_of(x, dims), {}, view_of(y, dims), rstd, ctx);
      for (int i = 0; i < 3; ++i) EXPECT_TRUE(std::isnan(rstd[i]));
    }
  }
}

// A row of zeros: rstd = 1/sqrt(eps), y = 0, dx = rstd * w * dy (no division by zero).
TEST(RmsNorm, ZeroRows) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    const std::vector<int64_t> dims{2, 5};
    std::vector<float> x(10, 0.0f), y = poisoned(10), rstd = poisoned(2), dy(10, 1.0f),
                       dx = poisoned(10), w(5, 2.0f);
    rms_norm_forward({1, 1e-4}, view_of(x, dims), w, view_of(y, dims), rstd, ctx);
    EXPECT_FLOAT_EQ(rstd[0], 100.0f);
    EXPECT_EQ(y, std::vector<float>(10, 0.0f));
    rms_norm_backward({1}, view_of(dy, dims), view_of(x, dims), rstd, w, view_of(dx, dims), {}, ctx);
    for (float v : dx) EXPECT_FLOAT_EQ(v, 200.0f);
  }
}

// ---- argument errors ----------------------------------------------------------------------

struct ForwardArgs {
  RmsNormParams params{2, 1e-5};
  std::vector<int64_t> x_dims{2, 3, 4, 5}, y_dims{2, 3, 4, 5}, r_dims{2, 3, 4, 5};
  std::vector<float> x = std::vector<float>(120, 2.0f), w = std::vector<float>(20, 1.0f),
                     r = std::vector<float>(120, 1.0f);
  std::vector<float> y = poisoned(120), rstd = poisoned(6), sum = poisoned(120);
  bool with_r = true, with_sum = true;
  DType r_dtype = DType::float32;

  void run() {
    params.residual_in = with_r ? TensorView(r.data(), r_dtype, int(r_dims.size()), r_dims.data())
                                : TensorView();
    params.sum_out = with_sum ? view_of(sum, x_dims) : TensorView();
    rms_norm_forward(params, view_of(x, x_dims), w, view_of(y, y_dims), rstd, cpu_ctx());
  }
  bool untouched() const {
    return y == poisoned(120) && rstd == poisoned(rstd.size()) && sum == poisoned(120);
  }
};

TEST(RmsNormErrors, ForwardArguments) {
  {
    ForwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.y) || contains_poison(a.rstd) || contains_poison(a.sum));
  }
  constexpr auto expect_forward_error = expect_edit_error<ForwardArgs>;
  expect_forward_error([](auto& a) { a.params.normalized_ndim = 0; },
                       {"rms_norm_forward", "normalized_ndim must be in [1, rank of x] = [1, 4], got 0"});
  expect_forward_error([](auto& a) { a.w.resize(19); },
                       {"rms_norm_forward", "weight has length 19", "product of the normalized dims = 20"});
  expect_forward_error([](auto& a) { a.y_dims = {2, 3, 5, 4}; }, {"y shape (2, 3, 5, 4) != x shape (2, 3, 4, 5)"});
  expect_forward_error([](auto& a) { a.rstd.resize(5, kPoison); },
                       {"rstd has length 5", "product of the leading dims = 6"});
  expect_forward_error([](auto& a) { a.params.eps = -1; }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.with_sum = false; },
                       {"rms_norm_forward", "residual_in is given without sum_out"});
  expect_forward_error([](auto& a) { a.with_r = false; }, {"sum_out is given without residual_in"});
  expect_forward_error([](auto& a) { a.r_dims = {2, 3, 5, 4}; },
                       {"residual_in shape (2, 3, 5, 4) != x shape (2, 3, 4, 5)"});
  expect_forward_error([](auto& a) { a.r_dtype = DType::bfloat16; },
                       {"residual_in dtype bfloat16 != x dtype float32"});
  expect_forward_error([](auto& a) { a.params.epilogue.activation = Activation(7); },
                       {"rms_norm_forward", "activation"});
}

struct BackwardArgs {
  RmsNormBackwardParams params{1};
  std::vector<int64_t> x_dims{4, 6}, dy_dims{4, 6}, dx_dims{4, 6}, ds_dims{4, 6};
  std::vector<float> x = std::vector<float>(24, 0.5f), dy = std::vector<float>(24, 1.0f),
                     rstd = std::vector<float>(4, 1.0f), w = std::vector<float>(6, 1.0f),
                     ds = std::vector<float>(24, 1.0f), bias = std::vector<float>(6, 0.0f);
  std::vector<float> dx = poisoned(24), dw = poisoned(6);
  bool with_bias = false;

  void run() {
    params.dsum_out = view_of(ds, ds_dims);
    if (with_bias) params.epilogue.bias = bias;
    rms_norm_backward(params, view_of(dy, dy_dims), view_of(x, x_dims), rstd, w,
                      view_of(dx, dx_dims), dw, cpu_ctx());
  }
  bool untouched() const { return dx == poisoned(dx.size()) && dw == poisoned(dw.size()); }
};

TEST(RmsNormErrors, BackwardArguments) {
  {
    BackwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.dx) || contains_poison(a.dw));
  }
  constexpr auto expect_backward_error = expect_edit_error<BackwardArgs>;
  expect_backward_error([](auto& a) { a.dy_dims = {6, 4}; }, {"rms_norm_backward", "dy shape (6, 4) != x shape (4, 6)"});
  expect_backward_error([](auto& a) { a.dx_dims = {24}; }, {"dx shape (24,)"});
  expect_backward_error([](auto& a) { a.ds_dims = {4, 3, 2}; }, {"dsum_out shape (4, 3, 2) != x shape (4, 6)"});
  expect_backward_error([](auto& a) { a.rstd.resize(6); }, {"rstd has length 6", "= 4"});
  expect_backward_error([](auto& a) { a.w.resize(4); }, {"weight has length 4", "= 6"});
  expect_backward_error([](auto& a) { a.dw.resize(5, kPoison); }, {"dweight has length 5"});
  expect_backward_error([](auto& a) { a.params.normalized_ndim = 3; }, {"normalized_ndim", "got 3"});
  expect_backward_error([](auto& a) { a.with_bias = true; },
                        {"rms_norm_backward", "epilogue.bias must be empty", "got 6 values"});
  expect_backward_error([](auto& a) { a.params.epilogue.activation = Activation::relu; },
                        {"rms_norm_backward", "relu"});
}

TEST(RmsNormWorkspace, ExactSizeGivesTheSameBitsAsNone) {
  std::mt19937_64 rng(69);
  const Problem<float> p = make_problem<float>(first({300, 2100}, 1), kResidual, true, rng);
  const std::size_t bytes = rms_norm_workspace_size({1, 1e-5}, p.view(p.x));
  ASSERT_GT(bytes, 0u);
  std::vector<std::byte> ws(bytes + 1);
  Context ctx = cpu_ctx(2);
  ctx.workspace = std::span<std::byte>(ws.data() + 1, bytes);  // misaligned on purpose
  const Out<float> a = run(p, cpu_ctx(2)), b = run(p, ctx);
  EXPECT_TRUE(bitwise_equal(a.y, b.y) && bitwise_equal(a.dx, b.dx) && bitwise_equal(a.dw, b.dw));
}

}  // namespace
}  // namespace normkit::test
