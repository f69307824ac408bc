// GroupNorm: the optimized backend against the float64 reference over random configurations,
// the reference against a direct computation and finite differences, accuracy at large
// offsets, thread-count and memory-format invariance, and every argument error.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "normkit/error.h"
#include "normkit/group_norm.h"
#include "ref/group_norm.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit::test {
namespace {

struct Case {
  int64_t N = 1, C = 1, G = 1;
  std::vector<int64_t> spatial;
  MemoryFormat format = MemoryFormat::channels_first;
  bool weight = true, bias = true;
  double offset = 0, scale = 1, eps = 1e-5;

  int64_t S() const {
    int64_t s = 1;
    for (int64_t d : spatial) s *= d;
    return s;
  }
  int64_t numel() const { return N * C * S(); }
  std::vector<int64_t> dims() const {
    std::vector<int64_t> d = {N, C};
    d.insert(d.end(), spatial.begin(), spatial.end());
    return d;
  }
  GroupNormParams params() const { return {G, eps}; }
  GroupNormBackwardParams backward_params() const { return {G}; }
  ref::GroupNormShape shape() const { return {N, C, S(), G, format}; }
  // Sample and channel of the element stored at memory index i.
  int64_t channel_of(int64_t i) const {
    return format == MemoryFormat::channels_first ? (i / S()) % C : i % C;
  }
  int64_t sample_of(int64_t i) const { return i / (C * S()); }
  int64_t num_params() const { return C; }
  int64_t param_of(int64_t i) const { return channel_of(i); }
  int64_t stat_of(int64_t i) const { return sample_of(i) * G + channel_of(i) / (C / G); }
  std::string str() const {
    std::string s = "N=" + std::to_string(N) + " C=" + std::to_string(C) +
                    " G=" + std::to_string(G) + " spatial=(";
    for (int64_t d : spatial) s += std::to_string(d) + ",";
    return s + ") " + to_string(format) + (weight ? " w" : "") + (bias ? " b" : "") +
           " offset=" + std::to_string(offset) + " scale=" + std::to_string(scale) +
           " eps=" + std::to_string(eps);
  }
};

Forward forward(const Case& k, const Inputs& in, const Context& ctx) {
  Forward f{poisoned(in.x.size()), poisoned(std::size_t(k.N * k.G)),
            poisoned(std::size_t(k.N * k.G))};
  group_norm_forward(k.params(), view_of(in.x, k.dims(), k.format), opt(in.w), opt(in.b),
                     view_of(f.y, k.dims(), k.format), f.mean, f.rstd, ctx);
  return f;
}

Backward backward(const Case& k, const Inputs& in, const std::vector<float>& mean,
                  const std::vector<float>& rstd, const Context& ctx, bool want_dw = true,
                  bool want_db = true) {
  Backward b{poisoned(in.x.size()), want_dw ? poisoned(std::size_t(k.C)) : std::vector<float>(),
             want_db ? poisoned(std::size_t(k.C)) : std::vector<float>()};
  group_norm_backward(k.backward_params(), view_of(in.dy, k.dims(), k.format),
                      view_of(in.x, k.dims(), k.format), mean, rstd, opt(in.w),
                      view_of(b.dx, k.dims(), k.format), opt(b.dw), opt(b.db), ctx);
  return b;
}

Exact exact(const Case& k, const Inputs& in) {
  Exact e;
  const auto x = to_double(in.x), dy = to_double(in.dy), w = to_double(in.w),
             b = to_double(in.b);
  e.y.resize(x.size());
  e.mean.resize(std::size_t(k.N * k.G));
  e.rstd.resize(e.mean.size());
  e.dx.resize(x.size());
  e.dw.resize(std::size_t(k.C));
  e.db.resize(std::size_t(k.C));
  const double* wp = w.empty() ? nullptr : w.data();
  ref::group_norm_forward(k.shape(), k.eps, x.data(), wp, b.empty() ? nullptr : b.data(),
                          e.y.data(), e.mean.data(), e.rstd.data());
  ref::group_norm_backward(k.shape(), false, dy.data(), x.data(), e.mean.data(), e.rstd.data(),
                           wp, e.dx.data(), e.dw.data(), e.db.data());
  return e;
}

Case random_case(std::mt19937_64& rng) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  Case k;
  k.N = pick(0, 2) == 0 ? 1 : pick(1, 4);
  k.G = pick(1, 6);
  k.C = k.G * (pick(0, 3) == 0 ? 1 : pick(1, 5));  // G == C about a quarter of the time
  k.spatial = random_spatial(rng, 3, 7);
  k.format = pick(0, 1) ? MemoryFormat::channels_last : MemoryFormat::channels_first;
  k.weight = pick(0, 1);
  k.bias = pick(0, 1);
  k.scale = log_uniform(rng, 1e-3, 3e4);
  k.offset = pick(0, 2) == 0 ? 0.0 : (pick(0, 1) ? 1 : -1) * log_uniform(rng, 1e-3, 3e4);
  const double eps_choices[] = {1e-5, 1e-5, 1e-3, 0.1};
  k.eps = eps_choices[pick(0, 3)];
  return k;
}

TEST(GroupNorm, CpuMatchesReferenceOnRandomConfigs) {
  std::mt19937_64 rng(20240601);
  expect_cpu_matches_reference(rng, 1200, random_case, forward, backward);
}

// The acceptance criterion: x = offset + scale * randn with |offset| up to 3e4 * scale;
// max|y - y64| / max|y64| <= 1e-5 * (1 + |offset| / scale) on every layout, backward 20x, where
// y64 is the float64 computation from the same float32 inputs.
TEST(GroupNorm, AccuracyAtLargeOffsets) {
  std::mt19937_64 rng(7);
  const std::vector<std::vector<int64_t>> spatials = {{}, {37}, {13, 17}, {5, 6, 7}, {64, 64}};
  for (const auto& spatial : spatials)
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (double scale : {1e-3, 1.0, 3e4})
        for (double ratio : {0.0, 1.0, -1e2, 1e3, -1e4, 3e4}) {
          Case k;
          k.N = spatial.size() == 2 && spatial[0] == 64 ? 1 : 3;
          k.C = 8;
          k.G = 2;
          k.spatial = spatial;
          k.format = format;
          k.offset = ratio * scale;
          k.scale = scale;
          const Inputs in = make_inputs(k, rng);
          expect_accurate(k, in, exact(k, in), ratio, forward, backward);
          if (HasFatalFailure()) return;
        }
}

// Direct, independent double computation: statistics by definition, dx through the full
// Jacobian d xhat_j / d x_i = rstd * (delta_ij - 1/M - xhat_i * xhat_j / M).
TEST(GroupNorm, ReferenceMatchesDirectComputation) {
  std::mt19937_64 rng(11);
  const Case cases[] = {
      {2, 6, 3, {4}, MemoryFormat::channels_first, true, true, 1.0, 2.0},
      {1, 4, 4, {3, 2}, MemoryFormat::channels_last, true, false, -3.0, 0.5},
      {3, 5, 1, {}, MemoryFormat::channels_first, false, true, 0.0, 1.0},
      {2, 6, 2, {2, 1, 3}, MemoryFormat::channels_last, true, true, 10.0, 3.0},
  };
  for (const Case& k : cases) {
    const Inputs in = make_inputs(k, rng);
    const int64_t S = k.S(), D = k.C / k.G, M = D * S;
    const auto x = from_format(to_double(in.x), k.N, k.C, S, k.format);
    const auto dy = from_format(to_double(in.dy), k.N, k.C, S, k.format);
    std::vector<double> y(x.size()), dx(x.size()), dw(std::size_t(k.C), 0), db(std::size_t(k.C), 0);
    std::vector<double> mean(std::size_t(k.N * k.G)), rstd(mean.size());
    auto w = [&](int64_t c) { return in.w.empty() ? 1.0 : double(in.w[std::size_t(c)]); };
    auto b = [&](int64_t c) { return in.b.empty() ? 0.0 : double(in.b[std::size_t(c)]); };
    for (int64_t n = 0; n < k.N; ++n)
      for (int64_t g = 0; g < k.G; ++g) {
        const int64_t base = (n * k.C + g * D) * S;  // the group is contiguous channels-first
        double mu = 0, var = 0;
        for (int64_t i = 0; i < M; ++i) mu += x[std::size_t(base + i)] / double(M);
        for (int64_t i = 0; i < M; ++i) var += std::pow(x[std::size_t(base + i)] - mu, 2) / double(M);
        const double r = 1 / std::sqrt(var + k.eps);
        mean[std::size_t(n * k.G + g)] = mu;
        rstd[std::size_t(n * k.G + g)] = r;
        auto xhat = [&](int64_t i) { return (x[std::size_t(base + i)] - mu) * r; };
        for (int64_t i = 0; i < M; ++i) {
          const int64_t c = g * D + i / S;
          y[std::size_t(base + i)] = xhat(i) * w(c) + b(c);
          double sum = 0;
          for (int64_t j = 0; j < M; ++j) {
            const double jac = r * ((i == j) - 1.0 / double(M) - xhat(i) * xhat(j) / double(M));
            sum += dy[std::size_t(base + j)] * w(g * D + j / S) * jac;
          }
          dx[std::size_t(base + i)] = sum;
          dw[std::size_t(c)] += dy[std::size_t(base + i)] * xhat(i);
          db[std::size_t(c)] += dy[std::size_t(base + i)];
        }
      }
    const Forward f = forward(k, in, reference_ctx());
    const Backward bk = backward(k, in, f.mean, f.rstd, reference_ctx());
    const auto y_ref = from_format(f.y, k.N, k.C, S, k.format);
    const auto dx_ref = from_format(bk.dx, k.N, k.C, S, k.format);
    EXPECT_LE(max_abs_diff(y_ref, y), 1e-6 * max_abs(y)) << k.str();
    EXPECT_LE(max_abs_diff(f.mean, mean), 1e-6 * (max_abs(mean) + k.scale)) << k.str();
    EXPECT_LE(max_abs_diff(f.rstd, rstd), 1e-6 * max_abs(rstd)) << k.str();
    // The float backward used the float-rounded statistics: a few ulps of relative difference.
    EXPECT_LE(max_abs_diff(dx_ref, dx), 1e-5 * max_abs(dx)) << k.str();
    EXPECT_LE(max_abs_diff(bk.dw, dw), 1e-5 * max_abs(dw)) << k.str();
    EXPECT_LE(max_abs_diff(bk.db, db), 1e-6 * max_abs(db)) << k.str();
  }
}

// The double instantiation of the reference backward against central differences of its
// forward, for the loss L = sum(y * dy).
TEST(GroupNorm, ReferenceBackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(5);
  for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (bool stats_are_constants : {false, true}) {
      const ref::GroupNormShape sh{2, 6, 5, 3, format};
      const std::size_t n = 2 * 6 * 5;
      auto x = to_double(random_normal(n, rng, 0.5, 2.0));
      auto dy = to_double(random_normal(n, rng));
      auto w = to_double(random_normal(6, rng, 1.0, 0.5));
      auto b = to_double(random_normal(6, rng));
      const double eps = 1e-3;
      std::vector<double> y(n), mean(6), rstd(6);
      ref::group_norm_forward(sh, eps, x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data());
      const auto fixed_mean = mean, fixed_rstd = rstd;
      auto loss = [&]() {
        if (stats_are_constants)
          ref::group_norm_apply(sh, x.data(), fixed_mean.data(), fixed_rstd.data(), w.data(),
                                b.data(), y.data());
        else
          ref::group_norm_forward(sh, eps, x.data(), w.data(), b.data(), y.data(), mean.data(),
                                  rstd.data());
        double l = 0;
        for (std::size_t i = 0; i < n; ++i) l += y[i] * dy[i];
        return l;
      };
      std::vector<double> dx(n), dw(6), db(6);
      ref::group_norm_backward(sh, stats_are_constants, dy.data(), x.data(), fixed_mean.data(),
                               fixed_rstd.data(), w.data(), dx.data(), dw.data(), db.data());
      auto numeric = [&](double& v) {
        return central_difference(loss, v, 1e-6 * std::max(1.0, std::fabs(v)));
      };
      for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(dx[i], numeric(x[i]), 1e-6) << i;
      for (std::size_t c = 0; c < 6; ++c) {
        EXPECT_NEAR(dw[c], numeric(w[c]), 1e-6) << c;
        EXPECT_NEAR(db[c], numeric(b[c]), 1e-6) << c;
      }
    }
}

// Work is split by the shape only, so every thread count gives the same bits.
TEST(GroupNorm, ThreadCountDoesNotChangeResults) {
  std::mt19937_64 rng(3);
  const Case cases[] = {
      {1, 6, 3, {70, 70}, MemoryFormat::channels_first},
      {1, 6, 3, {70, 70}, MemoryFormat::channels_last},
      {3, 32, 8, {10, 11}, MemoryFormat::channels_first, true, false},
      {1, 300, 30, {41, 43}, MemoryFormat::channels_last, false, true},
      {2, 5, 5, {20000}, MemoryFormat::channels_last},
      {2, 12, 4, {5000}, MemoryFormat::channels_first, true, true, 1e3, 1.0},
      {3000, 8, 2, {}, MemoryFormat::channels_first},
  };
  for (const Case& k : cases)
    expect_same_bits_for_any_thread_count(k, make_inputs(k, rng), forward, backward);
}

// The same logical data in both memory formats gives the same logical result: bit for bit from
// the reference (its sums run in logical order), to rounding from the optimized backend.
TEST(GroupNorm, ChannelsLastMatchesChannelsFirst) {
  std::mt19937_64 rng(9);
  for (const auto& spatial : std::vector<std::vector<int64_t>>{{9}, {7, 5}, {3, 4, 5}, {50, 50}}) {
    Case cf{2, 12, 4, spatial, MemoryFormat::channels_first, true, true, 100.0, 2.0};
    Case cl = cf;
    cl.format = MemoryFormat::channels_last;
    const int64_t S = cf.S();
    const Inputs a = make_inputs(cf, rng);
    Inputs b = a;
    b.x = to_format(a.x, cf.N, cf.C, S, cl.format);
    b.dy = to_format(a.dy, cf.N, cf.C, S, cl.format);
    for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
      const Forward fa = forward(cf, a, ctx), fb = forward(cl, b, ctx);
      const Backward ba = backward(cf, a, fa.mean, fa.rstd, ctx);
      const Backward bb = backward(cl, b, fa.mean, fa.rstd, ctx);
      const auto yb = from_format(fb.y, cf.N, cf.C, S, cl.format);
      const auto dxb = from_format(bb.dx, cf.N, cf.C, S, cl.format);
      if (ctx.backend == Backend::reference) {
        EXPECT_TRUE(bitwise_equal(fa.y, yb));
        EXPECT_TRUE(bitwise_equal(fa.mean, fb.mean));
        EXPECT_TRUE(bitwise_equal(fa.rstd, fb.rstd));
        EXPECT_TRUE(bitwise_equal(ba.dx, dxb));
        EXPECT_TRUE(bitwise_equal(ba.dw, bb.dw));
        EXPECT_TRUE(bitwise_equal(ba.db, bb.db));
      } else {
        const double tol = 16 * kFloatEps;
        EXPECT_LE(max_abs_diff(fa.y, yb), tol * max_abs(fa.y));
        EXPECT_LE(max_abs_diff(fa.mean, fb.mean), 4 * kFloatEps * max_abs(fa.mean));
        EXPECT_LE(max_abs_diff(fa.rstd, fb.rstd), 16 * kFloatEps * max_abs(fa.rstd));
        EXPECT_LE(max_abs_diff(ba.dx, dxb), 4 * tol * max_abs(ba.dx));
        EXPECT_LE(max_abs_diff(ba.dw, bb.dw), 1e-5 * max_abs(ba.dw));
        EXPECT_LE(max_abs_diff(ba.db, bb.db), 1e-5 * max_abs(ba.db));
      }
    }
  }
}

TEST(GroupNorm, EmptyBatchIsValid) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    const Case k{0, 6, 3, {4}};
    std::vector<float> x, y, w(6, 1.0f), dw = poisoned(6), db = poisoned(6);
    EXPECT_NO_THROW(group_norm_forward(k.params(), view_of(x, k.dims()), w, {}, view_of(y, k.dims()),
                                       {}, {}, ctx));
    EXPECT_NO_THROW(group_norm_backward(k.backward_params(), view_of(x, k.dims()), view_of(x, k.dims()),
                                        {}, {}, w, view_of(y, k.dims()), dw, db, ctx));
    // Gradients of the parameters over an empty batch are zero sums.
    EXPECT_EQ(dw, std::vector<float>(6, 0.0f));
    EXPECT_EQ(db, std::vector<float>(6, 0.0f));
  }
}

TEST(GroupNorm, EmptyGroupsGiveZeroMeanAndNanRstdAsTorch) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()})
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      const Case k{2, 4, 2, {3, 0}, format};
      std::vector<float> x, y, mean = poisoned(4), rstd = poisoned(4);
      group_norm_forward(k.params(), view_of(x, k.dims(), format), {}, {},
                         view_of(y, k.dims(), format), mean, rstd, ctx);
      for (int i = 0; i < 4; ++i) {
        EXPECT_EQ(mean[i], 0.0f);
        EXPECT_TRUE(std::isnan(rstd[i]));
      }
    }
}

// Empty groups with a channel count no buffer could hold and no weight: nothing is allocated
// for the absent weight and bias (found by fuzz/fuzz_api: the reference backend widened C of
// them, 8 TiB here, and threw std::bad_alloc instead of returning).
TEST(GroupNorm, EmptyGroupsWithHugeChannelCountAllocateNothing) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    const std::vector<int64_t> dims{1, int64_t{1} << 40, 0};
    GroupNormParams params;
    std::vector<float> x, y, mean = poisoned(1), rstd = poisoned(1);
    EXPECT_NO_THROW(group_norm_forward(params, view_of(x, dims), {}, {}, view_of(y, dims), mean,
                                       rstd, ctx));
    EXPECT_EQ(mean[0], 0.0f);
    EXPECT_TRUE(std::isnan(rstd[0]));
  }
}

// A NaN or Inf in x only affects its own (n, g): every other group is computed bit for bit as
// without it.
TEST(GroupNorm, NonFiniteInputStaysInItsGroup) {
  std::mt19937_64 rng(13);
  for (const Context& ctx : {reference_ctx(), cpu_ctx(2)})
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
        const Case k{2, 6, 3, {5, 3}, format};
        const Inputs clean = make_inputs(k, rng);
        Inputs dirty = clean;
        // Sample 1, channel 2 (group 1), spatial position 4.
        const int64_t S = k.S(), at = format == MemoryFormat::channels_first
                                          ? (1 * k.C + 2) * S + 4 : (1 * S + 4) * k.C + 2;
        dirty.x[std::size_t(at)] = bad;
        const Forward fc = forward(k, clean, ctx), fd = forward(k, dirty, ctx);
        const Backward bc = backward(k, clean, fc.mean, fc.rstd, ctx);
        const Backward bd = backward(k, dirty, fd.mean, fd.rstd, ctx);
        for (int64_t i = 0; i < k.numel(); ++i) {
          const bool in_group = k.sample_of(i) == 1 && k.channel_of(i) / 2 == 1;
          const auto u = std::size_t(i);
          if (in_group) {
            EXPECT_TRUE(std::isnan(fd.y[u])) << i;
          } else {
            EXPECT_EQ(fd.y[u], fc.y[u]) << i;
            EXPECT_EQ(bd.dx[u], bc.dx[u]) << i;
          }
        }
        for (int64_t g = 0; g < k.N * k.G; ++g)
          if (g != 1 * k.G + 1) {
            EXPECT_EQ(fd.mean[std::size_t(g)], fc.mean[std::size_t(g)]);
            EXPECT_EQ(fd.rstd[std::size_t(g)], fc.rstd[std::size_t(g)]);
          }
      }
}

// ---- argument errors: normkit::Error naming the argument and values, nothing written ----------

struct ForwardArgs {
  GroupNormParams params{3, 1e-5};
  std::vector<int64_t> x_dims{2, 6, 3, 4}, y_dims{2, 6, 3, 4};
  MemoryFormat y_format = MemoryFormat::channels_first;
  DType x_dtype = DType::float32;
  bool x_null = false;
  std::vector<float> x = std::vector<float>(144, 1.5f), w = std::vector<float>(6, 1.0f),
                     b = std::vector<float>(6, 0.0f);
  std::vector<float> y = poisoned(144), mean = poisoned(6), rstd = poisoned(6);
  bool mean_absent = false;

  void run() {
    const TensorView xv(x_null ? nullptr : x.data(), x_dtype, int(x_dims.size()), x_dims.data());
    const TensorView yv(y.data(), DType::float32, int(y_dims.size()), y_dims.data(), y_format);
    group_norm_forward(params, xv, w, b, yv, mean_absent ? std::span<float>() : std::span<float>(mean),
                       rstd, cpu_ctx());
  }
  bool untouched() const {
    return y == poisoned(144) && mean == poisoned(mean.size()) && rstd == poisoned(rstd.size());
  }
};

constexpr auto expect_forward_error = expect_edit_error<ForwardArgs>;

TEST(GroupNormErrors, ForwardArguments) {
  {  // The valid baseline passes and writes every output.
    ForwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.y) || contains_poison(a.mean) || contains_poison(a.rstd));
  }
  expect_forward_error([](auto& a) { a.params.num_groups = 4; },
                       {"group_norm_forward", "num_groups = 4", "C = 6", "(2, 6, 3, 4)"});
  expect_forward_error([](auto& a) { a.params.num_groups = 0; }, {"num_groups must be > 0, got 0"});
  expect_forward_error([](auto& a) { a.params.num_groups = -3; }, {"num_groups must be > 0, got -3"});
  expect_forward_error([](auto& a) { a.w.resize(5); }, {"weight has length 5", "C = 6"});
  expect_forward_error([](auto& a) { a.b.resize(7); }, {"bias has length 7", "C = 6"});
  expect_forward_error([](auto& a) { a.y_dims = {2, 6, 4, 3}; },
                       {"y shape (2, 6, 4, 3) != x shape (2, 6, 3, 4)"});
  expect_forward_error([](auto& a) { a.y_format = MemoryFormat::channels_last; },
                       {"y memory format channels_last"});
  expect_forward_error([](auto& a) { a.mean.resize(5, kPoison); },
                       {"mean has length 5", "N * num_groups = 6"});
  expect_forward_error([](auto& a) { a.rstd.resize(12, kPoison); },
                       {"rstd has length 12", "N * num_groups = 6"});
  expect_forward_error([](auto& a) { a.mean_absent = true; }, {"mean is required"});
  expect_forward_error([](auto& a) { a.x_dims = {144}; }, {"x must have rank 2 to 5, got rank 1"});
  expect_forward_error([](auto& a) { a.x_dims = {1, 6, 2, 2, 3, 1}; },
                       {"x must have rank 2 to 5, got rank 6"});
  expect_forward_error([](auto& a) { a.params.eps = -1e-5; }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.params.eps = std::nan(""); }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.params.eps = INFINITY; }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {int64_t(1) << 31, 6, int64_t(1) << 31, 4}; },
                       {"more elements than int64"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {2, -6, 3, 4}; }, {"negative dimension"});
  expect_forward_error([](auto& a) { a.x_dtype = DType::bfloat16; },
                       {"y dtype float32 != x dtype bfloat16"});
  expect_forward_error([](auto& a) { a.x_dtype = DType(9); }, {"x has dtype"});
  expect_forward_error([](auto& a) { a.x_null = true; }, {"x has a null data pointer"});
}

struct BackwardArgs {
  GroupNormBackwardParams params{3};
  std::vector<int64_t> x_dims{2, 6, 5}, dy_dims{2, 6, 5}, dx_dims{2, 6, 5};
  std::vector<float> x = std::vector<float>(60, 0.5f), dy = std::vector<float>(60, 1.0f),
                     mean = std::vector<float>(6, 0.0f), rstd = std::vector<float>(6, 1.0f),
                     w = std::vector<float>(6, 1.0f);
  std::vector<float> dx = poisoned(60), dw = poisoned(6), db = poisoned(6);

  void run() {
    group_norm_backward(params, view_of(dy, dy_dims), view_of(x, x_dims), mean, rstd, w,
                        view_of(dx, dx_dims), dw, db, cpu_ctx());
  }
  bool untouched() const {
    return dx == poisoned(dx.size()) && dw == poisoned(dw.size()) && db == poisoned(db.size());
  }
};

constexpr auto expect_backward_error = expect_edit_error<BackwardArgs>;

TEST(GroupNormErrors, BackwardArguments) {
  {
    BackwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.dx) || contains_poison(a.dw) || contains_poison(a.db));
  }
  expect_backward_error([](auto& a) { a.dy_dims = {2, 6, 4}; },
                        {"group_norm_backward", "dy shape (2, 6, 4) != x shape (2, 6, 5)"});
  expect_backward_error([](auto& a) { a.dx_dims = {2, 3, 10}; }, {"dx shape (2, 3, 10)"});
  expect_backward_error([](auto& a) { a.mean.resize(3); }, {"mean has length 3", "N * num_groups = 6"});
  expect_backward_error([](auto& a) { a.rstd.resize(2); }, {"rstd has length 2"});
  expect_backward_error([](auto& a) { a.w.resize(3); }, {"weight has length 3", "C = 6"});
  expect_backward_error([](auto& a) { a.dw.resize(5, kPoison); }, {"dweight has length 5"});
  expect_backward_error([](auto& a) { a.db.resize(8, kPoison); }, {"dbias has length 8"});
  expect_backward_error([](auto& a) { a.params.num_groups = 5; }, {"num_groups = 5", "C = 6"});
  expect_backward_error([](auto& a) { a.params.num_groups = 0; }, {"num_groups must be > 0"});
  expect_backward_error([](auto& a) { a.x_dims = a.dy_dims = a.dx_dims = {60}; },
                        {"rank 2 to 5, got rank 1"});
}

TEST(GroupNormErrors, AreNormkitErrorsDerivedFromInvalidArgument) {
  ForwardArgs a;
  a.params.num_groups = 5;
  EXPECT_THROW(a.run(), Error);
  EXPECT_THROW(a.run(), std::invalid_argument);
}

}  // namespace
}  // namespace normkit::test
