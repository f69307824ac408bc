// LayerNorm: the optimized backend against the float64 reference over random configurations,
// the reference against a direct computation and finite differences, accuracy at large
// offsets, thread-count and memory-format invariance, and every argument error.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "normkit/error.h"
#include "normkit/layer_norm.h"
#include "ref/layer_norm.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit::test {
namespace {

struct Case {
  std::vector<int64_t> dims;
  int k = 1;  // normalized_ndim
  MemoryFormat format = MemoryFormat::channels_first;
  bool weight = true, bias = true;
  double offset = 0, scale = 1, eps = 1e-5;

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
  LayerNormParams params() const { return {k, eps}; }
  LayerNormBackwardParams backward_params() const { return {k}; }
  ref::LayerNormShape shape() const { return {rows(), cols(), channels_last() ? dims[1] : 0}; }
  int64_t num_params() const { return cols(); }
  // Logical (weight) index of the element stored at memory index i, and its row.
  int64_t param_of(int64_t i) const { return ref::layer_norm_logical_index(shape(), i % cols()); }
  int64_t stat_of(int64_t i) const { return i / cols(); }
  std::string str() const {
    std::string s = "dims=(";
    for (int64_t d : dims) s += std::to_string(d) + ",";
    return s + ") k=" + std::to_string(k) + " " + to_string(format) + (weight ? " w" : "") +
           (bias ? " b" : "") + " offset=" + std::to_string(offset) +
           " scale=" + std::to_string(scale) + " eps=" + std::to_string(eps);
  }
};

Forward forward(const Case& k, const Inputs& in, const Context& ctx) {
  Forward f{poisoned(in.x.size()), poisoned(std::size_t(k.rows())), poisoned(std::size_t(k.rows()))};
  layer_norm_forward(k.params(), view_of(in.x, k.dims, k.format), opt(in.w), opt(in.b),
                     view_of(f.y, k.dims, k.format), f.mean, f.rstd, ctx);
  return f;
}

Backward backward(const Case& k, const Inputs& in, const std::vector<float>& mean,
                  const std::vector<float>& rstd, const Context& ctx, bool want_dw = true,
                  bool want_db = true) {
  Backward b{poisoned(in.x.size()), want_dw ? poisoned(std::size_t(k.cols())) : std::vector<float>(),
             want_db ? poisoned(std::size_t(k.cols())) : std::vector<float>()};
  layer_norm_backward(k.backward_params(), view_of(in.dy, k.dims, k.format), view_of(in.x, k.dims, k.format),
                      mean, rstd, opt(in.w), view_of(b.dx, k.dims, k.format), opt(b.dw), opt(b.db),
                      ctx);
  return b;
}

Exact exact(const Case& k, const Inputs& in) {
  Exact e;
  const auto x = to_double(in.x), dy = to_double(in.dy), w = to_double(in.w), b = to_double(in.b);
  e.y.resize(x.size());
  e.dx.resize(x.size());
  e.mean.resize(std::size_t(k.rows()));
  e.rstd.resize(e.mean.size());
  e.dw.resize(std::size_t(k.cols()));
  e.db.resize(std::size_t(k.cols()));
  const double* wp = w.empty() ? nullptr : w.data();
  ref::layer_norm_forward(k.shape(), k.eps, x.data(), wp, b.empty() ? nullptr : b.data(),
                          e.y.data(), e.mean.data(), e.rstd.data());
  ref::layer_norm_backward(k.shape(), dy.data(), x.data(), e.mean.data(), e.rstd.data(), wp,
                           e.dx.data(), e.dw.data(), e.db.data());
  return e;
}

Case random_case(std::mt19937_64& rng) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  Case k;
  k.dims.resize(std::size_t(pick(1, 5)));
  int64_t budget = 1500;  // keep the tensors small
  for (auto& d : k.dims) {
    d = std::min<int64_t>(pick(1, 9), std::max<int64_t>(1, budget));
    budget /= d;
  }
  if (pick(0, 3) == 0) k.dims[0] = 1;
  k.k = int(pick(1, k.rank()));
  if (k.rank() >= 3 && pick(0, 1)) {
    k.format = MemoryFormat::channels_last;
    k.k = k.rank() - 1;
  }
  k.weight = pick(0, 1);
  k.bias = pick(0, 1);
  k.scale = log_uniform(rng, 1e-3, 3e4);
  k.offset = pick(0, 2) == 0 ? 0.0 : (pick(0, 1) ? 1 : -1) * log_uniform(rng, 1e-3, 3e4);
  const double eps_choices[] = {1e-5, 1e-5, 1e-3, 0.1};
  k.eps = eps_choices[pick(0, 3)];
  return k;
}

TEST(LayerNorm, CpuMatchesReferenceOnRandomConfigs) {
  std::mt19937_64 rng(424242);
  expect_cpu_matches_reference(rng, 1200, random_case, forward, backward);
}

// The acceptance criterion: max|y - y64| / max|y64| <= 1e-5 * (1 + |offset| / scale) for
// x = offset + scale * randn, |offset| up to 3e4 * scale, every layout; backward 20x.
TEST(LayerNorm, AccuracyAtLargeOffsets) {
  std::mt19937_64 rng(17);
  const Case layouts[] = {
      {{6, 768}, 1},
      {{2, 3, 4097}, 1},                                        // rows longer than a chunk
      {{3, 5, 7, 9}, 3, MemoryFormat::channels_first},
      {{3, 5, 7, 9}, 3, MemoryFormat::channels_last},
      {{2, 6, 4, 5, 3}, 2},
      {{2, 6, 4, 5, 3}, 4, MemoryFormat::channels_last},
      {{1000}, 1},
  };
  for (Case k : layouts)
    for (double scale : {1e-3, 1.0, 3e4})
      for (double ratio : {0.0, 1.0, -1e2, 1e3, -1e4, 3e4}) {
        k.scale = scale;
        k.offset = ratio * scale;
        const Inputs in = make_inputs(k, rng);
        expect_accurate(k, in, exact(k, in), ratio, forward, backward);
        if (HasFatalFailure()) return;
      }
}

// Direct double computation: statistics by definition, dx through the full Jacobian, weight
// looked up by logical position (channels-last rows are permuted in memory).
TEST(LayerNorm, ReferenceMatchesDirectComputation) {
  std::mt19937_64 rng(23);
  const Case cases[] = {
      {{3, 5}, 1, MemoryFormat::channels_first, true, true, 2.0, 1.5},
      {{2, 3, 2, 2}, 3, MemoryFormat::channels_last, true, true, -1.0, 0.5},
      {{2, 3, 4}, 2, MemoryFormat::channels_first, true, false, 0.0, 1.0},
      {{7}, 1, MemoryFormat::channels_first, false, true, 5.0, 2.0},
  };
  for (const Case& k : cases) {
    const Inputs in = make_inputs(k, rng);
    const int64_t R = k.rows(), M = k.cols();
    // Logical order of each row: channels-last data (N, S, C) back to (N, C, S).
    const int64_t C = k.channels_last() ? k.dims[1] : 1, S = M / C;
    const MemoryFormat f = k.channels_last() ? MemoryFormat::channels_last : MemoryFormat::channels_first;
    const auto x = from_format(to_double(in.x), R, C, S, f);
    const auto dy = from_format(to_double(in.dy), R, C, S, f);
    auto w = [&](int64_t j) { return in.w.empty() ? 1.0 : double(in.w[std::size_t(j)]); };
    auto b = [&](int64_t j) { return in.b.empty() ? 0.0 : double(in.b[std::size_t(j)]); };
    std::vector<double> y(x.size()), dx(x.size()), dw(std::size_t(M), 0), db(std::size_t(M), 0);
    std::vector<double> mean(static_cast<std::size_t>(R)), rstd(static_cast<std::size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      const auto at = [&](int64_t j) { return std::size_t(r * M + j); };
      double mu = 0, var = 0;
      for (int64_t j = 0; j < M; ++j) mu += x[at(j)] / double(M);
      for (int64_t j = 0; j < M; ++j) var += std::pow(x[at(j)] - mu, 2) / double(M);
      const double rs = 1 / std::sqrt(var + k.eps);
      mean[std::size_t(r)] = mu;
      rstd[std::size_t(r)] = rs;
      auto xhat = [&](int64_t j) { return (x[at(j)] - mu) * rs; };
      for (int64_t i = 0; i < M; ++i) {
        y[at(i)] = xhat(i) * w(i) + b(i);
        double sum = 0;
        for (int64_t j = 0; j < M; ++j)
          sum += dy[at(j)] * w(j) * rs * ((i == j) - 1.0 / double(M) - xhat(i) * xhat(j) / double(M));
        dx[at(i)] = sum;
        dw[std::size_t(i)] += dy[at(i)] * xhat(i);
        db[std::size_t(i)] += dy[at(i)];
      }
    }
    const Forward fw = forward(k, in, reference_ctx());
    const Backward bk = backward(k, in, fw.mean, fw.rstd, reference_ctx());
    EXPECT_LE(max_abs_diff(from_format(fw.y, R, C, S, f), y), 1e-6 * max_abs(y)) << k.str();
    EXPECT_LE(max_abs_diff(fw.mean, mean), 1e-6 * (max_abs(mean) + k.scale)) << k.str();
    EXPECT_LE(max_abs_diff(fw.rstd, rstd), 1e-6 * max_abs(rstd)) << k.str();
    EXPECT_LE(max_abs_diff(from_format(bk.dx, R, C, S, f), dx), 1e-5 * max_abs(dx)) << k.str();
    EXPECT_LE(max_abs_diff(bk.dw, dw), 1e-5 * max_abs(dw)) << k.str();
    EXPECT_LE(max_abs_diff(bk.db, db), 1e-6 * max_abs(db)) << k.str();
  }
}

TEST(LayerNorm, ReferenceBackwardMatchesFiniteDifferences) {
  std::mt19937_64 rng(29);
  for (int64_t channels : {0, 3}) {
    const ref::LayerNormShape sh{3, 6, channels};
    const std::size_t n = 18;
    auto x = to_double(random_normal(n, rng, -0.5, 2.0));
    auto dy = to_double(random_normal(n, rng));
    auto w = to_double(random_normal(6, rng, 1.0, 0.5));
    auto b = to_double(random_normal(6, rng));
    const double eps = 1e-3;
    std::vector<double> y(n), mean(3), rstd(3);
    auto loss = [&]() {
      ref::layer_norm_forward(sh, eps, x.data(), w.data(), b.data(), y.data(), mean.data(), rstd.data());
      double l = 0;
      for (std::size_t i = 0; i < n; ++i) l += y[i] * dy[i];
      return l;
    };
    loss();
    std::vector<double> dx(n), dw(6), db(6);
    ref::layer_norm_backward(sh, dy.data(), x.data(), mean.data(), rstd.data(), w.data(),
                             dx.data(), dw.data(), db.data());
    auto numeric = [&](double& v) {
      return central_difference(loss, v, 1e-6 * std::max(1.0, std::fabs(v)));
    };
    for (std::size_t i = 0; i < n; ++i) EXPECT_NEAR(dx[i], numeric(x[i]), 1e-6) << i;
    for (std::size_t j = 0; j < 6; ++j) {
      EXPECT_NEAR(dw[j], numeric(w[j]), 1e-6) << j;
      EXPECT_NEAR(db[j], numeric(b[j]), 1e-6) << j;
    }
  }
}

TEST(LayerNorm, ThreadCountDoesNotChangeResults) {
  std::mt19937_64 rng(31);
  const Case cases[] = {
      {{4096, 24}, 1},
      {{3, 5000}, 1, MemoryFormat::channels_first, true, false, 1e3, 1.0},
      {{1, 3, 100, 100}, 3, MemoryFormat::channels_last},
      {{8, 16, 9, 9}, 2, MemoryFormat::channels_first, false, true},
      {{1, 70000}, 1},
  };
  for (const Case& k : cases)
    expect_same_bits_for_any_thread_count(k, make_inputs(k, rng), forward, backward);
}

// A channels-last (N, C, *spatial) tensor normalized over all but N equals the channels-first
// one on the same logical data, weight indexed in logical (C, *spatial) order.
TEST(LayerNorm, ChannelsLastMatchesChannelsFirst) {
  std::mt19937_64 rng(37);
  for (const auto& dims : std::vector<std::vector<int64_t>>{{2, 5, 7}, {3, 4, 3, 5}, {2, 3, 2, 3, 4}, {1, 16, 40, 40}}) {
    Case cf{dims, int(dims.size()) - 1, MemoryFormat::channels_first, true, true, 50.0, 3.0};
    Case cl = cf;
    cl.format = MemoryFormat::channels_last;
    const int64_t N = dims[0], C = dims[1], S = cf.cols() / C;
    const Inputs a = make_inputs(cf, rng);
    Inputs b = a;
    b.x = to_format(a.x, N, C, S, cl.format);
    b.dy = to_format(a.dy, N, C, S, cl.format);
    for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
      const Forward fa = forward(cf, a, ctx), fb = forward(cl, b, ctx);
      const Backward ba = backward(cf, a, fa.mean, fa.rstd, ctx);
      const Backward bb = backward(cl, b, fa.mean, fa.rstd, ctx);
      const auto yb = from_format(fb.y, N, C, S, cl.format);
      const auto dxb = from_format(bb.dx, N, C, S, cl.format);
      const double tol = 16 * kFloatEps;
      EXPECT_LE(max_abs_diff(fa.y, yb), tol * max_abs(fa.y));
      EXPECT_LE(max_abs_diff(fa.mean, fb.mean), 4 * kFloatEps * max_abs(fa.mean));
      EXPECT_LE(max_abs_diff(fa.rstd, fb.rstd), tol * max_abs(fa.rstd));
      EXPECT_LE(max_abs_diff(ba.dx, dxb), 2 * tol * max_abs(ba.dx));
      EXPECT_LE(max_abs_diff(ba.dw, bb.dw), 1e-5 * max_abs(ba.dw));
      EXPECT_LE(max_abs_diff(ba.db, bb.db), 1e-5 * max_abs(ba.db));
    }
  }
}

TEST(LayerNorm, EmptyRowsAndColumns) {
  for (const Context& ctx : {reference_ctx(), cpu_ctx()}) {
    {  // No rows: nothing to write; the parameter gradients are empty sums.
      std::vector<float> x, y, w(4, 1.0f), dw = poisoned(4), db = poisoned(4);
      const std::vector<int64_t> dims{0, 3, 4};
      EXPECT_NO_THROW(layer_norm_forward({1, 1e-5}, view_of(x, dims), w, {}, view_of(y, dims), {}, {}, ctx));
      EXPECT_NO_THROW(layer_norm_backward({1}, view_of(x, dims), view_of(x, dims), {}, {}, w,
                                          view_of(y, dims), dw, db, ctx));
      EXPECT_EQ(dw, std::vector<float>(4, 0.0f));
      EXPECT_EQ(db, std::vector<float>(4, 0.0f));
    }
    {  // Empty rows: mean 0 and rstd NaN, as torch.
      std::vector<float> x, y, mean = poisoned(3), rstd = poisoned(3);
      const std::vector<int64_t> dims{3, 0};
      layer_norm_forward({1, 1e-5}, view_of(x, dims), {}, {}, view_of(y, dims), mean, rstd, ctx);
      for (int i = 0; i < 3; ++i) {
        EXPECT_EQ(mean[i], 0.0f);
        EXPECT_TRUE(std::isnan(rstd[i]));
      }
    }
  }
}

TEST(LayerNorm, NonFiniteInputStaysInItsRow) {
  std::mt19937_64 rng(41);
  for (const Context& ctx : {reference_ctx(), cpu_ctx(2)})
    for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      const Case k{{5, 3000}, 1};
      const Inputs clean = make_inputs(k, rng);
      Inputs dirty = clean;
      dirty.x[2 * 3000 + 2500] = bad;
      const Forward fc = forward(k, clean, ctx), fd = forward(k, dirty, ctx);
      const Backward bc = backward(k, clean, fc.mean, fc.rstd, ctx, false, false);
      const Backward bd = backward(k, dirty, fd.mean, fd.rstd, ctx, false, false);
      for (std::size_t i = 0; i < clean.x.size(); ++i) {
        if (i / 3000 == 2) {
          EXPECT_TRUE(std::isnan(fd.y[i])) << i;
        } else {
          EXPECT_EQ(fd.y[i], fc.y[i]) << i;
          EXPECT_EQ(bd.dx[i], bc.dx[i]) << i;
        }
      }
    }
}

// ---- argument errors ----------------------------------------------------------------------

struct ForwardArgs {
  LayerNormParams params{2, 1e-5};
  std::vector<int64_t> x_dims{2, 3, 4, 5}, y_dims{2, 3, 4, 5};
  MemoryFormat x_format = MemoryFormat::channels_first, y_format = MemoryFormat::channels_first;
  DType x_dtype = DType::float32;
  std::vector<float> x = std::vector<float>(120, 2.0f), w = std::vector<float>(20, 1.0f),
                     b = std::vector<float>(20, 0.0f);
  std::vector<float> y = poisoned(120), mean = poisoned(6), rstd = poisoned(6);
  bool rstd_absent = false, y_null = false;

  void run() {
    const TensorView xv(x.data(), x_dtype, int(x_dims.size()), x_dims.data(), x_format);
    const TensorView yv(y_null ? nullptr : y.data(), DType::float32, int(y_dims.size()), y_dims.data(),
                        y_format);
    layer_norm_forward(params, xv, w, b, yv, mean, rstd_absent ? std::span<float>() : std::span<float>(rstd),
                       cpu_ctx());
  }
  bool untouched() const {
    return y == poisoned(120) && mean == poisoned(mean.size()) && rstd == poisoned(rstd.size());
  }
};

constexpr auto expect_forward_error = expect_edit_error<ForwardArgs>;

TEST(LayerNormErrors, ForwardArguments) {
  {
    ForwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.y) || contains_poison(a.mean) || contains_poison(a.rstd));
  }
  expect_forward_error([](auto& a) { a.params.normalized_ndim = 0; },
                       {"layer_norm_forward", "normalized_ndim must be in [1, rank of x] = [1, 4], got 0"});
  expect_forward_error([](auto& a) { a.params.normalized_ndim = 5; }, {"got 5", "(2, 3, 4, 5)"});
  expect_forward_error([](auto& a) { a.x_format = a.y_format = MemoryFormat::channels_last; },
                       {"channels_last x needs normalized_ndim = rank - 1 = 3", "got 2"});
  expect_forward_error([](auto& a) { a.w.resize(19); },
                       {"weight has length 19", "product of the normalized dims = 20"});
  expect_forward_error([](auto& a) { a.b.resize(60); }, {"bias has length 60", "= 20"});
  expect_forward_error([](auto& a) { a.y_dims = {2, 3, 5, 4}; }, {"y shape (2, 3, 5, 4) != x shape (2, 3, 4, 5)"});
  expect_forward_error([](auto& a) { a.y_format = MemoryFormat::channels_last; }, {"y memory format"});
  expect_forward_error([](auto& a) { a.mean.resize(5, kPoison); },
                       {"mean has length 5", "product of the leading dims = 6"});
  expect_forward_error([](auto& a) { a.rstd_absent = true; }, {"rstd is required"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {1, 2, 3, 4, 5, 1}; }, {"x must have rank 1 to 5, got rank 6"});
  expect_forward_error([](auto& a) { a.params.eps = -1; }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.params.eps = std::nan(""); }, {"eps must be finite and >= 0"});
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {int64_t(1) << 40, int64_t(1) << 30, 1 << 10, 1}; },
                       {"more elements than int64"});
  // A zero dim hides the overflow from the element count, not from the row length.
  expect_forward_error([](auto& a) { a.x_dims = a.y_dims = {0, 3, int64_t(1) << 62, int64_t(1) << 62}; },
                       {"more elements than int64"});
  expect_forward_error([](auto& a) { a.x_dtype = DType::float16; }, {"y dtype float32 != x dtype float16"});
  expect_forward_error([](auto& a) { a.x_dtype = DType(9); }, {"x has dtype unknown"});
  expect_forward_error([](auto& a) { a.y_null = true; }, {"y has a null data pointer"});
  // Rank 1: the null-output check still applies.
  expect_forward_error(
      [](auto& a) {
        a.x_dims = a.y_dims = {120};
        a.params.normalized_ndim = 1;
        a.mean.resize(1, kPoison);
        a.rstd.resize(1, kPoison);
        a.w.resize(120, 1.0f);
        a.b.resize(120, 0.0f);
        a.y_null = true;
      },
      {"y has a null data pointer"});
}

struct BackwardArgs {
  LayerNormBackwardParams params{1};
  std::vector<int64_t> x_dims{4, 6}, dy_dims{4, 6}, dx_dims{4, 6};
  std::vector<float> x = std::vector<float>(24, 0.5f), dy = std::vector<float>(24, 1.0f),
                     mean = std::vector<float>(4, 0.0f), rstd = std::vector<float>(4, 1.0f),
                     w = std::vector<float>(6, 1.0f);
  std::vector<float> dx = poisoned(24), dw = poisoned(6), db = poisoned(6);

  void run() {
    layer_norm_backward(params, view_of(dy, dy_dims), view_of(x, x_dims), mean, rstd, w,
                        view_of(dx, dx_dims), dw, db, cpu_ctx());
  }
  bool untouched() const {
    return dx == poisoned(dx.size()) && dw == poisoned(dw.size()) && db == poisoned(db.size());
  }
};

constexpr auto expect_backward_error = expect_edit_error<BackwardArgs>;

TEST(LayerNormErrors, BackwardArguments) {
  {
    BackwardArgs a;
    a.run();
    EXPECT_FALSE(contains_poison(a.dx) || contains_poison(a.dw) || contains_poison(a.db));
  }
  expect_backward_error([](auto& a) { a.dy_dims = {6, 4}; }, {"layer_norm_backward", "dy shape (6, 4) != x shape (4, 6)"});
  expect_backward_error([](auto& a) { a.dx_dims = {24}; }, {"dx shape (24,)"});
  expect_backward_error([](auto& a) { a.mean.resize(3); }, {"mean has length 3", "= 4"});
  expect_backward_error([](auto& a) { a.rstd.resize(6); }, {"rstd has length 6"});
  expect_backward_error([](auto& a) { a.w.resize(4); }, {"weight has length 4", "= 6"});
  expect_backward_error([](auto& a) { a.dw.resize(5, kPoison); }, {"dweight has length 5"});
  expect_backward_error([](auto& a) { a.db.resize(7, kPoison); }, {"dbias has length 7"});
  expect_backward_error([](auto& a) { a.params.normalized_ndim = 3; }, {"normalized_ndim", "got 3"});
}

}  // namespace
}  // namespace normkit::test
