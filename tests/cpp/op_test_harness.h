#pragma once
// What the op tests (BatchNorm, GroupNorm, LayerNorm, InstanceNorm and the layers) share: the
// backends' contexts, optional arguments from vectors, the check that a call is rejected with a
// normkit::Error naming what is wrong; and, for the ops whose forward saves a mean and an rstd
// per normalized set (GroupNorm, LayerNorm), their outputs, error measures and the checks
// whose only op-specific parts are the case and the calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "normkit/context.h"
#include "normkit/error.h"
#include "test_util.h"

namespace normkit::test {

inline constexpr double kFloatEps = 5.96e-8;  // 2^-24

inline Context reference_ctx() { return {Backend::reference, 1}; }
inline Context cpu_ctx(int threads = 0) { return {Backend::cpu, threads}; }

// An optional argument: absent (an empty span) when v is empty or not `present`.
inline std::span<const float> opt(const std::vector<float>& v, bool present = true) {
  return present && !v.empty() ? std::span<const float>(v) : std::span<const float>();
}
inline std::span<float> opt(std::vector<float>& v, bool present = true) {
  return present && !v.empty() ? std::span<float>(v) : std::span<float>();
}

// call() must throw normkit::Error whose message contains every needle.
inline void expect_error(const std::function<void()>& call,
                         const std::vector<std::string>& needles) {
  try {
    call();
    ADD_FAILURE() << "expected normkit::Error containing \"" << needles.front() << "\"";
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const auto& needle : needles)
      EXPECT_NE(what.find(needle), std::string::npos) << "message: " << what
                                                      << "\nexpected: " << needle;
  }
}

// The argument checks as edits of one valid call: Args holds the arguments with every output
// poison-filled, run() makes the call and untouched() says nothing was written. edit() breaks
// one argument; the call must then throw an Error with every needle and write nothing.
template <typename Args>
void expect_edit_error(const std::function<void(Args&)>& edit,
                       const std::vector<std::string>& needles) {
  Args a;
  edit(a);
  expect_error([&] { a.run(); }, needles);
  EXPECT_TRUE(a.untouched()) << "memory written before the throw: " << needles.front();
}

// The argument checks as calls on fresh Buffers (an op's arguments, every output poison-filled,
// comparable with ==) when the cases call different functions: each call must throw an Error with
// every needle and leave its Buffers equal to fresh ones. Validation precedes dispatch, so the
// default backend stands for both.
template <typename Buffers>
struct Rejected {
  std::function<void(Buffers&)> call;
  std::vector<std::string> needles;
};
template <typename Buffers>
void expect_rejected(const std::vector<Rejected<Buffers>>& cases) {
  for (std::size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    Buffers m;
    expect_error([&] { cases[i].call(m); }, cases[i].needles);
    EXPECT_TRUE(m == Buffers()) << "a rejected call wrote to caller memory";
  }
}

// ---- ops saving mean and rstd per normalized set: GroupNorm, LayerNorm ------------------------
//
// A Case describes one configuration: numel(), num_params() (length of weight and bias), the
// flags weight and bias, offset and scale (all make_inputs needs, so InstanceNorm draws its
// inputs here too); param_of(i) and stat_of(i) (the weight and the mean/rstd index of the
// element stored at memory index i) and str(). The checks take the op's forward(k, in, ctx)
// and backward(k, in, mean, rstd, ctx, want_dw, want_db) as arguments.

// Inputs in the memory order of the case's format; w, b empty when the case has none.
struct Inputs {
  std::vector<float> x, dy, w, b;
};

template <typename Case>
Inputs make_inputs(const Case& k, std::mt19937_64& rng) {
  Inputs in;
  in.x = random_normal(std::size_t(k.numel()), rng, k.offset, k.scale);
  in.dy = random_normal(std::size_t(k.numel()), rng);
  if (k.weight) in.w = random_normal(std::size_t(k.num_params()), rng, 0.5, 1.0);
  if (k.bias) in.b = random_normal(std::size_t(k.num_params()), rng);
  return in;
}

struct Forward {
  std::vector<float> y, mean, rstd;
};
struct Backward {
  std::vector<float> dx, dw, db;
};

// The whole computation in double from the same float inputs: the float64 truth.
struct Exact {
  std::vector<double> y, mean, rstd, dx, dw, db;
};

// Relative error measures of one configuration, each scaled by what float rounding can reach.
struct Errors {
  double y = 0, mean = 0, rstd = 0, dx = 0, dw = 0, db = 0;
};

template <typename Case>
Errors compare(const Case& k, const Inputs& in, const Forward& fc, const Forward& fr,
               const Backward& bc, const Backward& br) {
  Errors e;
  // y = xhat * w + b can cancel; its rounding scale is |xhat * w| + |b|.
  double y_scale = 0;
  for (int64_t i = 0; i < k.numel(); ++i) {
    const double b = in.b.empty() ? 0.0 : in.b[std::size_t(k.param_of(i))];
    y_scale = std::max(y_scale, std::fabs(fr.y[std::size_t(i)] - b) + std::fabs(b));
  }
  const double y_err = max_abs_diff(fc.y, fr.y);
  e.y = y_scale > 0 ? y_err / y_scale : (y_err == 0 ? 0 : 1e300);
  for (std::size_t i = 0; i < fr.mean.size(); ++i) {
    e.mean = std::max(e.mean, std::fabs(double(fc.mean[i]) - fr.mean[i]) /
                                  (std::fabs(double(fr.mean[i])) + k.scale));
    e.rstd = std::max(e.rstd, std::fabs(double(fc.rstd[i]) - fr.rstd[i]) / fr.rstd[i]);
    if (std::isnan(fc.mean[i]) || std::isnan(fc.rstd[i])) e.mean = e.rstd = 1e300;
  }
  // dx is a sum of terms of size rstd * |w * dy|: that, not |dx| (which can cancel to 0), is
  // the scale of its rounding.
  double dx_scale = max_abs(br.dx);
  const auto params = std::size_t(k.num_params());
  std::vector<double> dw_scale(params, 0.0), db_scale(params, 0.0);
  for (int64_t i = 0; i < k.numel(); ++i) {
    const auto u = std::size_t(i), j = std::size_t(k.param_of(i)), s = std::size_t(k.stat_of(i));
    const double w = in.w.empty() ? 1.0 : in.w[j], r = fr.rstd[s];
    dx_scale = std::max(dx_scale, std::fabs(r * w * in.dy[u]));
    dw_scale[j] += std::fabs(in.dy[u] * (in.x[u] - double(fr.mean[s])) * r);
    db_scale[j] += std::fabs(in.dy[u]);
  }
  const double dx_err = max_abs_diff(bc.dx, br.dx);
  e.dx = dx_scale > 0 ? dx_err / dx_scale : (dx_err == 0 ? 0 : 1e300);
  for (std::size_t j = 0; j < params; ++j) {
    if (!br.dw.empty())
      e.dw = std::max(e.dw, std::fabs(double(bc.dw[j]) - br.dw[j]) / std::max(dw_scale[j], 1e-300));
    if (!br.db.empty())
      e.db = std::max(e.db, std::fabs(double(bc.db[j]) - br.db[j]) / std::max(db_scale[j], 1e-300));
  }
  if (contains_poison(bc.dw) || contains_poison(bc.db)) e.dw = e.db = 1e300;
  return e;
}

// The CPU backend against the reference on `trials` random cases: a few ulps whatever the
// offset, since the statistics are centred and y = (x - m) * a + b subtracts before it scales
// (far tighter than the acceptance bound, which grows with |offset| / scale).
template <typename RandomCase, typename Fwd, typename Bwd>
void expect_cpu_matches_reference(std::mt19937_64& rng, int trials, RandomCase random_case,
                                  Fwd forward, Bwd backward) {
  Errors worst;
  int checked = 0;
  for (int trial = 0; trial < trials; ++trial) {
    const auto k = random_case(rng);
    const Inputs in = make_inputs(k, rng);
    const Forward fr = forward(k, in, reference_ctx());
    const Forward fc = forward(k, in, cpu_ctx(1 + trial % 3));
    ASSERT_FALSE(contains_poison(fr.y) || contains_poison(fr.mean) || contains_poison(fr.rstd))
        << k.str();
    const bool want_dw = trial % 5 != 1, want_db = trial % 5 != 2;
    // Both backwards get the same saved statistics: this compares the backward arithmetic.
    const Backward br = backward(k, in, fr.mean, fr.rstd, reference_ctx(), want_dw, want_db);
    const Backward bc =
        backward(k, in, fr.mean, fr.rstd, cpu_ctx(1 + trial % 3), want_dw, want_db);
    ASSERT_FALSE(contains_poison(br.dx) || contains_poison(br.dw) || contains_poison(br.db));
    const Errors e = compare(k, in, fc, fr, bc, br);
    EXPECT_LE(e.y, 16 * kFloatEps) << k.str();
    EXPECT_LE(e.mean, 8 * kFloatEps) << k.str();
    EXPECT_LE(e.rstd, 64 * kFloatEps) << k.str();
    EXPECT_LE(e.dx, 32 * kFloatEps) << k.str();
    EXPECT_LE(e.dw, 64 * kFloatEps) << k.str();
    EXPECT_LE(e.db, 64 * kFloatEps) << k.str();
    worst.y = std::max(worst.y, e.y);
    worst.mean = std::max(worst.mean, e.mean);
    worst.rstd = std::max(worst.rstd, e.rstd);
    worst.dx = std::max(worst.dx, e.dx);
    worst.dw = std::max(worst.dw, e.dw);
    worst.db = std::max(worst.db, e.db);
    ++checked;
    if (::testing::Test::HasFailure()) break;
  }
  EXPECT_EQ(checked, trials);
  std::printf("worst / float eps: y %.2f mean %.2f rstd %.2f dx %.2f dweight %.2f dbias %.2f\n",
              worst.y / kFloatEps, worst.mean / kFloatEps, worst.rstd / kFloatEps,
              worst.dx / kFloatEps, worst.dw / kFloatEps, worst.db / kFloatEps);
}

// The acceptance criterion for a case with offset = ratio * scale: max|y - y64| / max|y64| <=
// 1e-5 * (1 + |ratio|), backward 20x, against the float64 computation from the same inputs,
// which the reference backend gives rounded once.
template <typename Case, typename Fwd, typename Bwd>
void expect_accurate(const Case& k, const Inputs& in, const Exact& e, double ratio, Fwd forward,
                     Bwd backward) {
  const Forward f = forward(k, in, cpu_ctx());
  const Backward b = backward(k, in, f.mean, f.rstd, cpu_ctx(), true, true);
  const double tol = 1e-5 * (1 + std::fabs(ratio));
  EXPECT_LE(max_abs_diff(f.y, e.y) / max_abs(e.y), tol) << k.str();
  EXPECT_LE(max_abs_diff(b.dx, e.dx) / max_abs(e.dx), 20 * tol) << k.str();
  EXPECT_LE(max_abs_diff(b.dw, e.dw) / max_abs(e.dw), 20 * tol) << k.str();
  EXPECT_LE(max_abs_diff(b.db, e.db) / max_abs(e.db), 20 * tol) << k.str();
  const Forward r = forward(k, in, reference_ctx());
  for (std::size_t i = 0; i < r.y.size(); ++i) ASSERT_EQ(r.y[i], float(e.y[i]));
}

// Work is split by the shape only: 2 to 4 threads give the bits of one.
template <typename Case, typename Fwd, typename Bwd>
void expect_same_bits_for_any_thread_count(const Case& k, const Inputs& in, Fwd forward,
                                           Bwd backward) {
  const Forward f1 = forward(k, in, cpu_ctx(1));
  const Backward b1 = backward(k, in, f1.mean, f1.rstd, cpu_ctx(1), true, true);
  for (int threads = 2; threads <= 4; ++threads) {
    const Forward f = forward(k, in, cpu_ctx(threads));
    const Backward b = backward(k, in, f1.mean, f1.rstd, cpu_ctx(threads), true, true);
    EXPECT_TRUE(bitwise_equal(f.y, f1.y)) << k.str() << " threads " << threads;
    EXPECT_TRUE(bitwise_equal(f.mean, f1.mean)) << k.str() << " threads " << threads;
    EXPECT_TRUE(bitwise_equal(f.rstd, f1.rstd)) << k.str() << " threads " << threads;
    EXPECT_TRUE(bitwise_equal(b.dx, b1.dx)) << k.str() << " threads " << threads;
    EXPECT_TRUE(bitwise_equal(b.dw, b1.dw)) << k.str() << " threads " << threads;
    EXPECT_TRUE(bitwise_equal(b.db, b1.db)) << k.str() << " threads " << threads;
  }
}

}  // namespace normkit::test
