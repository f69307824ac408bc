// InstanceNorm: the optimized backend against the float64 reference over random configurations,
// running statistics against a direct computation of torch's rule, the running-statistics mode,
// equality with group_norm at G = C, thread-count invariance, the caller's workspace, and every
// argument error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

#include "common/dtype.h"
#include "normkit/error.h"
#include "normkit/group_norm.h"
#include "normkit/instance_norm.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit::test {
namespace {

struct Case {
  int64_t N = 1, C = 1;
  std::vector<int64_t> spatial;
  MemoryFormat format = MemoryFormat::channels_first;
  bool weight = true, bias = true, running = true, use_input_stats = true;
  double offset = 0, scale = 1, eps = 1e-5, momentum = 0.1;

  int64_t S() const {
    int64_t s = 1;
    for (int64_t d : spatial) s *= d;
    return s;
  }
  int64_t numel() const { return N * C * S(); }
  int64_t num_params() const { return C; }
  std::vector<int64_t> dims() const {
    std::vector<int64_t> d = {N, C};
    d.insert(d.end(), spatial.begin(), spatial.end());
    return d;
  }
  InstanceNormParams params() const { return {use_input_stats, momentum, eps}; }
  int64_t channel_of(int64_t i) const {
    return format == MemoryFormat::channels_first ? (i / S()) % C : i % C;
  }
  int64_t sample_of(int64_t i) const { return i / (C * S()); }
  std::string str() const {
    std::string s = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " spatial=(";
    for (int64_t d : spatial) s += std::to_string(d) + ",";
    return s + ") " + to_string(format) + (weight ? " w" : "") + (bias ? " b" : "") +
           (running ? " running" : "") + (use_input_stats ? " input-stats" : " running-stats") +
           " offset=" + std::to_string(offset) + " scale=" + std::to_string(scale) +
           " momentum=" + std::to_string(momentum);
  }
};

// The inputs of every op, then running statistics near the data's when the case has them.
struct Inputs : test::Inputs {
  std::vector<float> running_mean, running_var;
};

Inputs make_inputs(const Case& k, std::mt19937_64& rng) {
  Inputs in{test::make_inputs(k, rng), {}, {}};
  if (k.running) {
    in.running_mean = random_normal(std::size_t(k.C), rng, k.offset, k.scale);
    std::uniform_real_distribution<double> u(0.2, 2.0);
    for (int64_t c = 0; c < k.C; ++c) in.running_var.push_back(float(u(rng) * k.scale * k.scale));
  }
  return in;
}

struct Result {
  std::vector<float> y, mean, rstd, running_mean, running_var, dx, dw, db;
};

// Forward (running stats updated on a copy), then backward from the forward's saved statistics.
Result run(const Case& k, const Inputs& in, const Context& ctx) {
  Result r{poisoned(in.x.size()), poisoned(std::size_t(k.N * k.C)), poisoned(std::size_t(k.N * k.C)),
           in.running_mean, in.running_var, poisoned(in.x.size()), poisoned(std::size_t(k.C)),
           poisoned(std::size_t(k.C))};
  instance_norm_forward(k.params(), view_of(in.x, k.dims(), k.format), opt(in.w), opt(in.b),
                        opt(r.running_mean), opt(r.running_var), view_of(r.y, k.dims(), k.format),
                        r.mean, r.rstd, ctx);
  instance_norm_backward({k.use_input_stats}, view_of(in.dy, k.dims(), k.format),
                         view_of(in.x, k.dims(), k.format), r.mean, r.rstd, opt(in.w),
                         view_of(r.dx, k.dims(), k.format), r.dw, r.db, ctx);
  return r;
}

Case random_case(std::mt19937_64& rng) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  Case k;
  k.N = pick(0, 2) == 0 ? 1 : pick(1, 4);
  k.C = pick(1, 8);
  k.use_input_stats = pick(0, 3) != 0;
  k.running = !k.use_input_stats || pick(0, 1);
  do k.spatial = random_spatial(rng, 3, 7);
  while (k.use_input_stats && k.S() == 1);
  k.format = pick(0, 1) ? MemoryFormat::channels_last : MemoryFormat::channels_first;
  k.weight = pick(0, 1);
  k.bias = pick(0, 1);
  k.scale = log_uniform(rng, 1e-3, 3e4);
  k.offset = pick(0, 2) == 0 ? 0.0 : (pick(0, 1) ? 1 : -1) * log_uniform(rng, 1e-3, 3e4);
  k.momentum = std::uniform_real_distribution<double>(0, 1)(rng);
  const double eps_choices[] = {1e-5, 1e-3, 0.1};
  k.eps = eps_choices[pick(0, 2)];
  return k;
}

TEST(InstanceNorm, CpuMatchesReferenceOnRandomConfigs) {
  std::mt19937_64 rng(99);
  int checked = 0;
  double worst = 0;
  for (int trial = 0; trial < 1000; ++trial) {
    const Case k = random_case(rng);
    const Inputs in = make_inputs(k, rng);
    const Result r = run(k, in, reference_ctx());
    const Result c = run(k, in, cpu_ctx(1 + trial % 3));
    ASSERT_FALSE(contains_poison(r.y) || contains_poison(r.dx) || contains_poison(r.mean)) << k.str();
    const double tol = 16 * kFloatEps;
    // dx is a sum of terms of size rstd * |w * dy|: the scale of its rounding.
    // y = xhat * w + b can cancel; its rounding scale is |xhat * w| + |b|.
    double dx_scale = 0, y_scale = 0;
    std::vector<double> dw_scale(std::size_t(k.C), 0.0), db_scale(std::size_t(k.C), 0.0);
    for (int64_t i = 0; i < k.numel(); ++i) {
      const auto u = std::size_t(i), ch = std::size_t(k.channel_of(i));
      const auto nc = std::size_t(k.sample_of(i) * k.C + k.channel_of(i));
      const double w = in.w.empty() ? 1.0 : in.w[ch], b = in.b.empty() ? 0.0 : in.b[ch];
      y_scale = std::max(y_scale, std::fabs(r.y[u] - b) + std::fabs(b));
      dx_scale = std::max(dx_scale, std::fabs(r.rstd[nc] * w * in.dy[u]));
      dw_scale[ch] += std::fabs(in.dy[u] * (in.x[u] - double(r.mean[nc])) * r.rstd[nc]);
      db_scale[ch] += std::fabs(in.dy[u]);
    }
    const double e_y = relative_error(c.y, r.y, y_scale), e_dx = relative_error(c.dx, r.dx, dx_scale);
    EXPECT_LE(e_y, tol) << k.str();
    EXPECT_LE(e_dx, 2 * tol) << k.str();
    for (int64_t i = 0; i < k.N * k.C; ++i) {
      const auto u = std::size_t(i);
      EXPECT_LE(std::fabs(c.mean[u] - double(r.mean[u])), 8 * kFloatEps * (std::fabs(r.mean[u]) + k.scale));
      EXPECT_LE(std::fabs(c.rstd[u] - double(r.rstd[u])), 4 * tol * r.rstd[u]) << k.str();
    }
    for (int64_t ch = 0; ch < k.C; ++ch) {
      const auto u = std::size_t(ch);
      EXPECT_LE(std::fabs(c.dw[u] - double(r.dw[u])), 4 * tol * std::max(dw_scale[u], 1e-300)) << k.str();
      EXPECT_LE(std::fabs(c.db[u] - double(r.db[u])), 4 * tol * std::max(db_scale[u], 1e-300)) << k.str();
      if (k.running) {
        EXPECT_LE(std::fabs(c.running_mean[u] - double(r.running_mean[u])),
                  8 * kFloatEps * (std::fabs(r.running_mean[u]) + k.scale)) << k.str();
        EXPECT_LE(std::fabs(c.running_var[u] - double(r.running_var[u])),
                  4 * tol * r.running_var[u]) << k.str();
      }
    }
    worst = std::max({worst, e_y, e_dx});
    ++checked;
    if (HasFailure()) break;
  }
  EXPECT_EQ(checked, 1000);
  std::printf("worst y/dx error / float eps: %.2f\n", worst / kFloatEps);
}

// torch: running <- (1 - momentum) * running + momentum * mean over n of the per-instance
// mean and of the per-instance unbiased variance; over several steps, both backends.
TEST(InstanceNorm, RunningStatisticsFollowTorchsRule) {
  std::mt19937_64 rng(101);
  for (const Context& ctx : {reference_ctx(), cpu_ctx()})
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      Case k{3, 4, {5, 6}, format};
      k.momentum = 0.3;
      k.offset = 2.0;
      k.scale = 1.5;
      Inputs in = make_inputs(k, rng);
      std::vector<double> rm(in.running_mean.begin(), in.running_mean.end());
      std::vector<double> rv(in.running_var.begin(), in.running_var.end());
      std::vector<float> running_mean = in.running_mean, running_var = in.running_var;
      for (int step = 0; step < 4; ++step) {
        in.x = random_normal(in.x.size(), rng, k.offset + step, k.scale);
        const auto x = from_format(to_double(in.x), k.N, k.C, k.S(), format);
        std::vector<float> y = poisoned(in.x.size()), mean = poisoned(12), rstd = poisoned(12);
        instance_norm_forward(k.params(), view_of(in.x, k.dims(), format), in.w, in.b, running_mean,
                              running_var, view_of(y, k.dims(), format), mean, rstd, ctx);
        const int64_t S = k.S();
        for (int64_t c = 0; c < k.C; ++c) {
          double avg_mean = 0, avg_var = 0;
          for (int64_t n = 0; n < k.N; ++n) {
            const double* v = &x[std::size_t((n * k.C + c) * S)];
            double mu = 0, ss = 0;
            for (int64_t s = 0; s < S; ++s) mu += v[s] / double(S);
            for (int64_t s = 0; s < S; ++s) ss += (v[s] - mu) * (v[s] - mu);
            avg_mean += mu / double(k.N);
            avg_var += ss / double(S - 1) / double(k.N);
          }
          rm[std::size_t(c)] = (1 - k.momentum) * rm[std::size_t(c)] + k.momentum * avg_mean;
          rv[std::size_t(c)] = (1 - k.momentum) * rv[std::size_t(c)] + k.momentum * avg_var;
        }
        EXPECT_LE(max_abs_diff(running_mean, rm), 1e-6 * max_abs(rm)) << "step " << step;
        EXPECT_LE(max_abs_diff(running_var, rv), 1e-6 * max_abs(rv)) << "step " << step;
      }
    }
}

// use_input_stats = false: y = (x - running_mean) / sqrt(running_var + eps) * w + b, the
// running statistics are left alone and the backward treats them as constants.
TEST(InstanceNorm, RunningStatisticsMode) {
  std::mt19937_64 rng(103);
  for (const Context& ctx : {reference_ctx(), cpu_ctx()})
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (const auto& spatial : std::vector<std::vector<int64_t>>{{}, {1}, {7}, {3, 5}}) {
        Case k{2, 5, spatial, format};
        k.use_input_stats = false;
        k.offset = 10.0;
        k.scale = 2.0;
        const Inputs in = make_inputs(k, rng);
        const Result r = run(k, in, ctx);
        EXPECT_TRUE(bitwise_equal(r.running_mean, in.running_mean));
        EXPECT_TRUE(bitwise_equal(r.running_var, in.running_var));
        std::vector<double> dw(std::size_t(k.C), 0), db(std::size_t(k.C), 0);
        for (int64_t i = 0; i < k.numel(); ++i) {
          const auto u = std::size_t(i), c = std::size_t(k.channel_of(i));
          const double rs = 1 / std::sqrt(double(in.running_var[c]) + k.eps);
          const double xhat = (in.x[u] - double(in.running_mean[c])) * rs;
          EXPECT_NEAR(r.y[u], xhat * in.w[c] + in.b[c], 1e-5 * (1 + std::fabs(xhat * in.w[c])));
          EXPECT_NEAR(r.dx[u], in.dy[u] * in.w[c] * rs, 1e-5 * std::fabs(in.w[c] * rs));
          dw[c] += in.dy[u] * xhat;
          db[c] += in.dy[u];
        }
        for (int64_t i = 0; i < k.N * k.C; ++i) {
          const auto c = std::size_t(i % k.C);
          EXPECT_EQ(r.mean[std::size_t(i)], in.running_mean[c]);
          EXPECT_NEAR(r.rstd[std::size_t(i)], 1 / std::sqrt(double(in.running_var[c]) + k.eps),
                      1e-6 * r.rstd[std::size_t(i)]);
        }
        EXPECT_LE(max_abs_diff(r.dw, dw), 1e-5 * (max_abs(dw) + 1));
        EXPECT_LE(max_abs_diff(r.db, db), 1e-5 * (max_abs(db) + 1));
      }
}

// With input statistics, instance_norm is group_norm with one channel per group, bit for bit.
TEST(InstanceNorm, EqualsGroupNormWithOneChannelPerGroup) {
  std::mt19937_64 rng(107);
  for (const Context& ctx : {reference_ctx(), cpu_ctx()})
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      Case k{3, 7, {9, 11}, format};
      k.running = false;
      const Inputs in = make_inputs(k, rng);
      const Result r = run(k, in, ctx);
      std::vector<float> y = poisoned(in.x.size()), mean = poisoned(21), rstd = poisoned(21);
      std::vector<float> dx = poisoned(in.x.size()), dw = poisoned(7), db = poisoned(7);
      const GroupNormParams gp{k.C, k.eps};
      group_norm_forward(gp, view_of(in.x, k.dims(), format), in.w, in.b,
                         view_of(y, k.dims(), format), mean, rstd, ctx);
      group_norm_backward({k.C}, view_of(in.dy, k.dims(), format), view_of(in.x, k.dims(), format),
                          mean, rstd, in.w, view_of(dx, k.dims(), format), dw, db, ctx);
      EXPECT_TRUE(bitwise_equal(r.y, y));
      EXPECT_TRUE(bitwise_equal(r.mean, mean));
      EXPECT_TRUE(bitwise_equal(r.rstd, rstd));
      EXPECT_TRUE(bitwise_equal(r.dx, dx));
      EXPECT_TRUE(bitwise_equal(r.dw, dw));
      EXPECT_TRUE(bitwise_equal(r.db, db));
    }
}

// The acceptance criterion of the statistics at large offsets, against float64 group norm
// (G = C) from the same inputs (the reference backend, which computes in double).
TEST(InstanceNorm, AccuracyAtLargeOffsets) {
  std::mt19937_64 rng(109);
  for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (double ratio : {0.0, -1e3, 3e4}) {
      Case k{2, 6, {40, 30}, format};
      k.scale = 0.01;
      k.offset = ratio * k.scale;
      const Inputs in = make_inputs(k, rng);
      const Result r = run(k, in, reference_ctx()), c = run(k, in, cpu_ctx());
      const double tol = 1e-5 * (1 + std::fabs(ratio));
      EXPECT_LE(relative_error(c.y, r.y), tol);
      EXPECT_LE(relative_error(c.dx, r.dx), 20 * tol);
      EXPECT_LE(relative_error(c.running_var, r.running_var), tol);
    }
}

TEST(InstanceNorm, ThreadCountDoesNotChangeResults) {
  std::mt19937_64 rng(113);
  for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (bool input_stats : {true, false}) {
      Case k{1, 3, {90, 100}, format};
      k.use_input_stats = input_stats;
      const Inputs in = make_inputs(k, rng);
      const Result one = run(k, in, cpu_ctx(1));
      for (int threads = 2; threads <= 4; ++threads) {
        const Result r = run(k, in, cpu_ctx(threads));
        EXPECT_TRUE(bitwise_equal(r.y, one.y) && bitwise_equal(r.dx, one.dx) &&
                    bitwise_equal(r.dw, one.dw) && bitwise_equal(r.db, one.db) &&
                    bitwise_equal(r.mean, one.mean) && bitwise_equal(r.rstd, one.rstd) &&
                    bitwise_equal(r.running_mean, one.running_mean) &&
                    bitwise_equal(r.running_var, one.running_var))
            << k.str() << " threads " << threads;
      }
    }
}

TEST(InstanceNorm, EmptyBatchLeavesRunningStatisticsAlone) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    std::vector<float> x, y, rm = {1, 2, 3}, rv = {4, 5, 6};
    const std::vector<int64_t> dims{0, 3, 4};
    EXPECT_NO_THROW(instance_norm_forward({}, view_of(x, dims), {}, {}, rm, rv, view_of(y, dims), {},
                                          {}, ctx));
    EXPECT_EQ(rm, (std::vector<float>{1, 2, 3}));
    EXPECT_EQ(rv, (std::vector<float>{4, 5, 6}));
  }
}

// No channels and a huge batch: nothing to compute, and it returns at once rather than looping
// over N (found by fuzz/fuzz_api: the running-statistics mode looped N times over no channels).
TEST(InstanceNorm, NoChannelsReturnsAtOnceWhateverN) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    for (bool use_input_stats : {false, true}) {
      InstanceNormParams params;
      params.use_input_stats = use_input_stats;
      std::vector<float> x, y;
      const std::vector<int64_t> dims{int64_t{1} << 60, 0, 4};
      EXPECT_NO_THROW(instance_norm_forward(params, view_of(x, dims), {}, {}, {}, {},
                                            view_of(y, dims), {}, {}, ctx));
    }
  }
}

// An empty x whose other dims multiply past int64 is refused, by the size query too: the ops
// multiply subsets of the dims (here the spatial size, 2^64), which must fit (found by
// fuzz/fuzz_api: signed overflow computing the spatial size).
TEST(InstanceNorm, EmptyXWhoseOtherDimsOverflowIsRefused) {
  std::vector<float> x, y;
  const std::vector<int64_t> dims{0, 1, int64_t{1} << 32, int64_t{1} << 32};
  const std::string expected = "x has more elements than int64 can count in its nonzero dims";
  try {
    instance_norm_workspace_size({}, view_of(x, dims));
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
  try {
    instance_norm_forward({}, view_of(x, dims), {}, {}, {}, {}, view_of(y, dims), {}, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
}

// ---- argument errors ----------------------------------------------------------------------

struct ForwardArgs {
  InstanceNormParams params;
  std::vector<int64_t> x_dims{2, 3, 4}, y_dims{2, 3, 4};
  std::vector<float> x = std::vector<float>(24, 1.0f), w = std::vector<float>(3, 1.0f),
                     b = std::vector<float>(3, 0.0f);
  std::vector<float> rm = std::vector<float>(3, 0.0f), rv = std::vector<float>(3, 1.0f);
  std::vector<float> y = poisoned(24), mean = poisoned(6), rstd = poisoned(6);
  bool rm_absent = false, rv_absent = false;

  void run() {
    instance_norm_forward(params, view_of(x, x_dims), w, b, rm_absent ? std::span<float>() : std::span<float>(rm),
                          rv_absent ? std::span<float>() : std::span<float>(rv), view_of(y, y_dims), mean,
                          rstd, cpu_ctx());
  }
  bool untouched() const {
    return y == poisoned(y.size()) && mean == poisoned(mean.size()) && rstd == poisoned(rstd.size()) &&
           rm == std::vector<float>(rm.size(), 0.0f) && rv == std::vector<float>(rv.size(), 1.0f);
  }
};

constexpr auto expect_forward_error = expect_edit_error<ForwardArgs>;

// bfloat16 / float16 activations and the fused epilogues, in both statistics modes and both
// formats: CPU against the reference (which widens to double), both backwards fed the
// reference forward's y, mean and rstd; then 1 vs 3 threads bitwise.
template <typename T>
void low_precision_and_epilogues(std::mt19937_64& rng) {
  const double ulp = std::is_same_v<T, bf16> ? 1.0 / 128 : std::is_same_v<T, f16> ? 1.0 / 1024 : 0.0;
  auto round_all = [](const std::vector<float>& v) {
    std::vector<T> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
    return out;
  };
  for (MemoryFormat fmt : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (bool use_input_stats : {true, false})
      for (int epi = 0; epi < 6; ++epi) {
        // 0: none, 1: relu, 2: residual, 3: relu + residual, 4: silu, 5: silu + residual.
        const bool silu = epi >= 4, relu = !silu && (epi & 1), residual = (epi & 2) || epi == 5;
        const Activation act = silu ? Activation::silu : relu ? Activation::relu : Activation::none;
        const std::vector<int64_t> dims{2, 5, 7, 9};
        const std::size_t n = 2 * 5 * 63;
        const auto x = round_all(random_normal(n, rng, 2.0, 1.5));
        const auto r = round_all(random_normal(n, rng));
        const auto dy = round_all(random_normal(n, rng));
        const auto w = random_normal(5, rng, 0.5, 1.0), b = random_normal(5, rng);
        auto view = [&](const std::vector<T>& v) {
          return TensorView(v.data(), dtype_of<T>(), int(dims.size()), dims.data(), fmt);
        };
        InstanceNormParams params;
        params.use_input_stats = use_input_stats;
        params.epilogue.activation = act;
        if (residual) params.epilogue.residual = view(r);
        struct Out {
          std::vector<T> y, dx, dres;
          std::vector<float> mean, rstd, dw, db, rm, rv;
        };
        auto run = [&](const Context& ctx, const Out* fwd) {
          Out o{std::vector<T>(n, from_float<T>(kPoison)), std::vector<T>(n, from_float<T>(kPoison)),
                std::vector<T>(n, from_float<T>(kPoison)), poisoned(10), poisoned(10), poisoned(5),
                poisoned(5), std::vector<float>(5, 0.25f), std::vector<float>(5, 2.0f)};
          instance_norm_forward(params, view(x), w, b, o.rm, o.rv, view(o.y), o.mean, o.rstd, ctx);
          const Out& f = fwd ? *fwd : o;
          BackwardEpilogue be;
          be.activation = act;
          if (relu) be.y = view(f.y);
          if (silu && residual) be.residual = view(r);
          if (silu) be.bias = b;
          if (residual) be.dresidual = view(o.dres);
          instance_norm_backward({params.use_input_stats, be}, view(dy), view(x), f.mean, f.rstd,
                                 w, view(o.dx), o.dw, o.db, ctx);
          return o;
        };
        const std::string what = std::string(to_string(fmt)) + (use_input_stats ? " input" : " running") +
                                 " stats, epilogue " + std::to_string(epi) + " " + to_string(dtype_of<T>());
        const Out want = run(reference_ctx(), nullptr);
        const Out got = run(cpu_ctx(3), &want);
        auto near = [&](const std::vector<T>& g, const std::vector<T>& e, double abs_tol, const char* name) {
          double worst = 0;
          for (std::size_t i = 0; i < g.size(); ++i) {
            const double a = to_float(g[i]), c = to_float(e[i]);
            const double excess = std::fabs(a - c) - (ulp * std::fabs(c) + abs_tol);
            worst = std::isnan(excess) ? INFINITY : std::max(worst, excess);
          }
          EXPECT_LE(worst, 0.0) << what << " " << name;
        };
        near(got.y, want.y, 1e-4, "y");
        near(got.dx, want.dx, 1e-4, "dx");
        // dy, or 0 (relu): exact; dy * silu'(z) with z in float: near.
        if (residual) near(got.dres, want.dres, silu ? 1e-5 : 0.0, "dresidual");
        EXPECT_LE(max_abs_diff(got.mean, want.mean), 1e-5 * (1 + max_abs(want.mean))) << what;
        EXPECT_LE(max_abs_diff(got.rstd, want.rstd), 1e-5 * (1 + max_abs(want.rstd))) << what;
        EXPECT_LE(max_abs_diff(got.dw, want.dw), 1e-4 * (1 + max_abs(want.dw))) << what;
        EXPECT_LE(max_abs_diff(got.db, want.db), 1e-4 * (1 + max_abs(want.db))) << what;
        EXPECT_LE(max_abs_diff(got.rm, want.rm), 1e-5 * (1 + max_abs(want.rm))) << what;
        EXPECT_LE(max_abs_diff(got.rv, want.rv), 1e-5 * (1 + max_abs(want.rv))) << what;
        const Out one = run(cpu_ctx(1), &want);
        EXPECT_EQ(std::memcmp(one.y.data(), got.y.data(), n * sizeof(T)), 0) << what;
        EXPECT_EQ(std::memcmp(one.dx.data(), got.dx.data(), n * sizeof(T)), 0) << what;
      }
}

TEST(InstanceNorm, LowPrecisionAndEpiloguesMatchReference) {
  std::mt19937_64 rng(31);
  low_precision_and_epilogues<float>(rng);
  low_precision_and_epilogues<bf16>(rng);
  low_precision_and_epilogues<f16>(rng);
}

// ---- caller workspace ---------------------------------------------------------------------

// One forward (running statistics updated on copies when use_input_stats, used otherwise) and
// its backward with a relu + residual epilogue or none, float32.
struct WorkspaceCase {
  std::vector<int64_t> dims;
  MemoryFormat format;
  bool use_input_stats, epilogue;
};
struct WorkspaceOut {
  std::vector<float> y, mean, rstd, rm, rv, dx, dres, dw, db;
};
struct WorkspaceRun {
  WorkspaceCase k;
  std::vector<float> x, r, dy, w, b, rm, rv;
  int64_t N() const { return k.dims[0]; }
  int64_t C() const { return k.dims[1]; }
  std::size_t n() const { return x.size(); }
  TensorView view(const std::vector<float>& v) const { return view_of(v, k.dims, k.format); }
  InstanceNormParams params() const {
    InstanceNormParams p;
    p.use_input_stats = k.use_input_stats;
    p.epilogue.activation = k.epilogue ? Activation::relu : Activation::none;
    if (k.epilogue) p.epilogue.residual = view(r);
    return p;
  }
  WorkspaceOut run(const Context& ctx) const {
    const auto nc = std::size_t(N() * C());
    WorkspaceOut o{poisoned(n()), poisoned(nc), poisoned(nc), rm, rv, poisoned(n()), poisoned(n()),
                   poisoned(std::size_t(C())), poisoned(std::size_t(C()))};
    const InstanceNormParams p = params();
    instance_norm_forward(p, view(x), w, b, o.rm, o.rv, view(o.y), o.mean, o.rstd, ctx);
    BackwardEpilogue be;
    if (k.epilogue)
      be = {.activation = Activation::relu, .y = view(o.y), .dresidual = view(o.dres)};
    instance_norm_backward({p.use_input_stats, be}, view(dy), view(x), o.mean, o.rstd, w,
                           view(o.dx), o.dw, o.db, ctx);
    return o;
  }
};
WorkspaceRun make_workspace_run(const WorkspaceCase& k, std::mt19937_64& rng) {
  int64_t n = 1;
  for (int64_t d : k.dims) n *= d;
  const auto C = std::size_t(k.dims[1]);
  WorkspaceRun r{k, random_normal(std::size_t(n), rng, 4.0, 2.0), random_normal(std::size_t(n), rng),
                 random_normal(std::size_t(n), rng), random_normal(C, rng, 0.5, 1.0),
                 random_normal(C, rng), random_normal(C, rng, 4.0, 1.0), std::vector<float>(C, 3.0f)};
  return r;
}

// A workspace of exactly instance_norm_workspace_size bytes, filled with NaN bytes beforehand,
// gives the bits of the per-thread buffer: forward (its running-statistics update reads
// variances kept in the workspace), the running-statistics mode, backward, with and without an
// epilogue, both formats, 1 to 4 threads; and the kernels do use it.
TEST(InstanceNormWorkspace, ExactSizeGivesTheSameBitsAsNone) {
  std::mt19937_64 rng(33);
  for (MemoryFormat fmt : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (const std::vector<int64_t>& dims : {std::vector<int64_t>{2, 13, 9, 7},
                                             std::vector<int64_t>{1, 40, 30, 30}})
      for (bool use_input_stats : {true, false})
        for (bool epilogue : {false, true}) {
          const WorkspaceRun r = make_workspace_run({dims, fmt, use_input_stats, epilogue}, rng);
          const std::size_t bytes = instance_norm_workspace_size(r.params(), r.view(r.x));
          ASSERT_GT(bytes, 0u);
          for (int threads = 1; threads <= 4; ++threads) {
            const std::string what = std::string(to_string(fmt)) + " C=" + std::to_string(r.C()) +
                                     (use_input_stats ? " input" : " running") + " stats" +
                                     (epilogue ? " relu+residual" : "") + " threads " +
                                     std::to_string(threads);
            // At any alignment: the queried size has room to align inside the caller's buffer.
            const std::size_t offset = std::size_t(threads - 1) * 3;
            std::vector<std::byte> buffer(bytes + offset, std::byte{0xff});
            const std::span<std::byte> ws(buffer.data() + offset, bytes);
            const WorkspaceOut plain = r.run(cpu_ctx(threads));
            const WorkspaceOut with = r.run({Backend::cpu, threads, ws});
            using Pair = std::pair<const std::vector<float>*, const std::vector<float>*>;
            for (const Pair& ab : std::initializer_list<Pair>{
                     {&with.y, &plain.y}, {&with.mean, &plain.mean}, {&with.rstd, &plain.rstd},
                     {&with.rm, &plain.rm}, {&with.rv, &plain.rv}, {&with.dx, &plain.dx},
                     {&with.dres, &plain.dres}, {&with.dw, &plain.dw}, {&with.db, &plain.db}})
              EXPECT_TRUE(bitwise_equal(*ab.first, *ab.second)) << what;
            EXPECT_FALSE(contains_poison(with.y)) << what;
            EXPECT_TRUE(std::any_of(ws.begin(), ws.end(),
                                    [](std::byte v) { return v != std::byte{0xff}; }))
                << what << ": workspace not used";
          }
        }
}

TEST(InstanceNormWorkspace, TooSmallThrowsBeforeWriting) {
  std::mt19937_64 rng(34);
  for (bool use_input_stats : {true, false}) {
    const WorkspaceRun r =
        make_workspace_run({{2, 5, 4, 3}, MemoryFormat::channels_last, use_input_stats, true}, rng);
    const std::size_t bytes = instance_norm_workspace_size(r.params(), r.view(r.x));
    ASSERT_GT(bytes, 0u);
    for (std::size_t size : {bytes - 1, std::size_t(0)}) {
      std::vector<std::byte> ws(bytes);
      const Context ctx{Backend::cpu, 2, std::span<std::byte>(ws.data(), size)};
      const std::string needle = "workspace has " + std::to_string(size) +
                                 " bytes, expected at least instance_norm_workspace_size(params, x) = " +
                                 std::to_string(bytes);
      WorkspaceOut o{poisoned(r.n()), poisoned(10), poisoned(10), r.rm, r.rv, poisoned(r.n()),
                     poisoned(r.n()), poisoned(5), poisoned(5)};
      expect_error([&] {
        instance_norm_forward(r.params(), r.view(r.x), r.w, r.b, o.rm, o.rv, r.view(o.y), o.mean,
                              o.rstd, ctx);
      }, {"instance_norm_forward: " + needle});
      const std::vector<float> m(10, 0.0f), s(10, 1.0f);
      expect_error([&] {
        instance_norm_backward({r.params().use_input_stats,
                                {.activation = Activation::relu, .y = r.view(r.x), .dresidual = r.view(o.dres)}},
                               r.view(r.dy),
                               r.view(r.x), m, s, r.w, r.view(o.dx), o.dw, o.db, ctx);
      }, {"instance_norm_backward: " + needle});
      EXPECT_TRUE(o.y == poisoned(r.n()) && o.mean == poisoned(10) && o.rstd == poisoned(10));
      EXPECT_TRUE(o.rm == r.rm && o.rv == r.rv);
      EXPECT_TRUE(o.dx == poisoned(r.n()) && o.dres == poisoned(r.n()) && o.dw == poisoned(5) &&
                  o.db == poisoned(5));
    }
  }
}

TEST(InstanceNormWorkspace, SizeQueryChecksItsArguments) {
  std::vector<float> x(2 * 3 * 4, 1.0f);
  const char* fn = "instance_norm_workspace_size: ";
  expect_error([&] { instance_norm_workspace_size({}, view_of(x, {2, 3, 1})); },
               {fn, "Expected more than 1 spatial element when training"});
  expect_error([&] { instance_norm_workspace_size({.eps = -1.0}, view_of(x, {2, 3, 4})); },
               {fn, "eps"});
  expect_error([&] { instance_norm_workspace_size({.momentum = 2.0}, view_of(x, {2, 3, 4})); },
               {fn, "momentum"});
  expect_error([&] { instance_norm_workspace_size({}, view_of(x, {24})); },
               {fn, "x must have rank 2 to 5"});
  // Running statistics at one spatial element are fine; an empty x needs nothing.
  EXPECT_GT(instance_norm_workspace_size({.use_input_stats = false}, view_of(x, {2, 12})), 0u);
  EXPECT_EQ(instance_norm_workspace_size({}, view_of(x, {0, 3, 4})), 0u);
  EXPECT_EQ(instance_norm_workspace_size({.use_input_stats = false}, view_of(x, {2, 3, 0})), 0u);
}

TEST(InstanceNormErrors, ForwardArguments) {
  {
    ForwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.y) || contains_poison(a.mean) || contains_poison(a.rstd));
    EXPECT_NE(a.rv, std::vector<float>(3, 1.0f));  // updated
  }
  const std::string spatial = "Expected more than 1 spatial element when training, got input size ";
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {2, 3, 1}; a.x.resize(6); a.y = poisoned(6); },
                       {"instance_norm_forward", spatial + "(2, 3, 1)"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {2, 3}; a.x.resize(6); a.y = poisoned(6); },
                       {spatial + "(2, 3)"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {0, 3, 1, 1}; }, {spatial + "(0, 3, 1, 1)"});
  expect_forward_error([](auto& a) { a.params.use_input_stats = false; a.rm_absent = a.rv_absent = true; },
                       {"running_mean is required"});
  expect_forward_error([](auto& a) { a.rv_absent = true; },
                       {"running_mean and running_var must be given together, got only running_mean"});
  expect_forward_error([](auto& a) { a.rv.resize(4, 1.0f); }, {"running_var has length 4", "C = 3"});
  expect_forward_error([](auto& a) { a.rm.resize(2); }, {"running_mean has length 2", "C = 3"});
  expect_forward_error([](auto& a) { a.w.resize(2); }, {"weight has length 2", "C = 3"});
  expect_forward_error([](auto& a) { a.b.resize(6); }, {"bias has length 6", "C = 3"});
  expect_forward_error([](auto& a) { a.y_dims = {2, 4, 3}; }, {"y shape (2, 4, 3) != x shape (2, 3, 4)"});
  expect_forward_error([](auto& a) { a.mean.resize(3, kPoison); }, {"mean has length 3", "N * C = 6"});
  expect_forward_error([](auto& a) { a.rstd.resize(7, kPoison); }, {"rstd has length 7", "N * C = 6"});
  expect_forward_error([](auto& a) { a.params.momentum = -0.1; }, {"momentum must be in [0, 1]"});
  expect_forward_error([](auto& a) { a.params.momentum = 1.5; }, {"momentum must be in [0, 1], got 1.5"});
  expect_forward_error([](auto& a) { a.params.momentum = std::nan(""); }, {"momentum must be in [0, 1]"});
  expect_forward_error([](auto& a) { a.params.eps = -1; }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.params.eps = INFINITY; }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {1, 3, 2, 2, 2, 1}; }, {"rank 2 to 5, got rank 6"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {int64_t(1) << 40, 3, int64_t(1) << 40}; },
                       {"more elements than int64"});
}

TEST(InstanceNormErrors, BackwardArguments) {
  std::vector<float> x(24, 1.0f), dy(24, 1.0f), mean(6, 0.0f), rstd(6, 1.0f), w(3, 1.0f);
  std::vector<float> dx = poisoned(24), dw = poisoned(3), db = poisoned(3);
  auto call = [&](const InstanceNormBackwardParams& p, std::vector<int64_t> dy_dims,
                  std::span<const float> m) {
    return [&, p, dy_dims, m] {
      instance_norm_backward(p, view_of(dy, dy_dims), view_of(x, {2, 3, 4}), m, rstd, w,
                             view_of(dx, {2, 3, 4}), dw, db, cpu_ctx());
    };
  };
  expect_error(call({}, {2, 3, 3}, mean), {"instance_norm_backward", "dy shape (2, 3, 3) != x shape (2, 3, 4)"});
  expect_error(call({}, {2, 3, 4}, std::span<const float>(mean).first(5)), {"mean has length 5", "N * C = 6"});
  EXPECT_TRUE(dx == poisoned(24) && dw == poisoned(3) && db == poisoned(3));
  call({}, {2, 3, 4}, mean)();
  EXPECT_FALSE(contains_poison(dx) || contains_poison(dw) || contains_poison(db));
}

}  // namespace
}  // namespace normkit::test
