#pragma once
// Scaffolding shared by the SIMD / low-precision / epilogue tests of the GroupNorm family:
// a loop over every SIMD target this machine has, dtype conversions and tolerances, and the
// fused epilogues as a test parameter.
#include <gtest/gtest.h>

#include <hwy/targets.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "cpu/moments.h"
#include "normkit/epilogue.h"
#include "normkit/tensor.h"
#include "test_util.h"

namespace normkit::test {

// Runs body() once per SIMD target compiled in and supported here, with the kernels forced to
// dispatch to it (checked), then restores the normal dispatch.
template <typename F>
void for_each_target(F&& body) {
  for (int64_t target : hwy::SupportedAndGeneratedTargets()) {
    hwy::SetSupportedTargetsForTest(target);
    ASSERT_EQ(cpu::simd_target(), target);
    SCOPED_TRACE(hwy::TargetName(target));
    body();
  }
  hwy::SetSupportedTargetsForTest(0);
}

// Relative spacing of the dtype's values (one ulp at 1).
template <typename T>
constexpr double ulp1() {
  if constexpr (std::is_same_v<T, bf16>) return 1.0 / 128;
  else if constexpr (std::is_same_v<T, f16>) return 1.0 / 1024;
  else return 1.0 / 8388608;
}

template <typename T>
std::vector<T> rounded(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}
template <typename T>
std::vector<float> wide_f(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}
template <typename T>
std::vector<T> poisoned_as(std::size_t n) {
  return std::vector<T>(n, from_float<T>(kPoison));
}
template <typename T>
double max_abs_t(const std::vector<T>& v) {
  double m = 0;
  for (const T& e : v) m = std::max(m, std::fabs(double(to_float(e))));
  return m;
}

// |got - want| <= ulps of T at |want| + abs_tol, elementwise (NaN/poison fail).
template <typename T>
void expect_near_t(const std::vector<T>& got, const std::vector<T>& want, double ulps,
                   double abs_tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int reported = 0;
  for (std::size_t i = 0; i < got.size() && reported < 5; ++i) {
    const double g = to_float(got[i]), w = to_float(want[i]);
    const double tol = ulps * ulp1<T>() * std::fabs(w) + abs_tol;
    if (!(std::fabs(g - w) <= tol)) {
      ADD_FAILURE() << what << " [" << i << "]: " << g << " vs " << w << " (tol " << tol << ")";
      ++reported;
    }
  }
}

inline void expect_near_f(const std::vector<float>& got, const std::vector<float>& want, double rel,
                          const std::string& what) {
  const double tol = rel * (1.0 + max_abs(want));
  EXPECT_LE(max_abs_diff(got, want), tol) << what;
}

// What a forward + backward run of one op leaves: activations in T, statistics and parameter
// gradients in float; dres only with a residual epilogue.
template <typename T>
struct Result {
  std::vector<T> y, dx, dres;
  std::vector<float> mean, rstd, dw, db;
};

// Every output of two runs is the same bits.
template <typename T>
void expect_same_bits(const Result<T>& a, const Result<T>& b, const std::string& what) {
  EXPECT_TRUE(bitwise_equal(a.y, b.y)) << what;
  EXPECT_TRUE(bitwise_equal(a.mean, b.mean)) << what;
  EXPECT_TRUE(bitwise_equal(a.rstd, b.rstd)) << what;
  EXPECT_TRUE(bitwise_equal(a.dx, b.dx)) << what;
  EXPECT_TRUE(bitwise_equal(a.dw, b.dw)) << what;
  EXPECT_TRUE(bitwise_equal(a.db, b.db)) << what;
  EXPECT_TRUE(bitwise_equal(a.dres, b.dres)) << what;
}

// The fused epilogues: none, relu, residual add, residual add then relu, silu, residual add
// then silu.
enum Epi { kNone, kRelu, kResidual, kResidualRelu, kSilu, kResidualSilu };
inline constexpr Epi kEpilogues[] = {kNone, kRelu, kResidual, kResidualRelu, kSilu, kResidualSilu};
inline bool has_relu(Epi e) { return e == kRelu || e == kResidualRelu; }
inline bool has_silu(Epi e) { return e == kSilu || e == kResidualSilu; }
inline bool has_residual(Epi e) { return e == kResidual || e == kResidualRelu || e == kResidualSilu; }
inline Activation activation_of(Epi e) {
  return has_relu(e) ? Activation::relu : has_silu(e) ? Activation::silu : Activation::none;
}
inline const char* epi_name(Epi e) {
  switch (e) {
    case kRelu: return "relu";
    case kResidual: return "residual";
    case kResidualRelu: return "residual+relu";
    case kSilu: return "silu";
    case kResidualSilu: return "residual+silu";
    default: return "none";
  }
}

// One problem of an op with activations of type T (x, residual, dy) and float32 weight and bias
// (empty: absent). Shape is the op's: format, numel(), and dims_of(shape) found beside it.
template <typename T, class Shape>
struct EpilogueProblem {
  Shape sh;
  Epi epi = kNone;
  std::vector<T> x, r, dy;
  std::vector<float> w, b;

  TensorView view(const std::vector<T>& v) const {
    const std::vector<int64_t> d = dims_of(sh);
    return TensorView(v.data(), dtype_of<T>(), int(d.size()), d.data(), sh.format);
  }
};

// x ~ N(offset, scale), r ~ N(0, 0.5) when the epilogue adds one, dy ~ N(0, 1), all rounded to
// T; with `affine`, `params` weights ~ N(0.5, 1) and biases ~ N(0, 1).
template <typename T, class Shape>
EpilogueProblem<T, Shape> draw_problem(const Shape& sh, int64_t params, Epi epi,
                                       std::mt19937_64& rng, double offset, double scale,
                                       bool affine) {
  EpilogueProblem<T, Shape> p{sh, epi};
  const auto n = std::size_t(sh.numel());
  p.x = rounded<T>(random_normal(n, rng, offset, scale));
  if (has_residual(epi)) p.r = rounded<T>(random_normal(n, rng, 0.0, 0.5));
  p.dy = rounded<T>(random_normal(n, rng));
  if (affine) {
    p.w = random_normal(std::size_t(params), rng, 0.5, 1.0);
    p.b = random_normal(std::size_t(params), rng);
  }
  return p;
}

// Every output poison-filled (`stats` means and rstds, `params` dweights and dbiases), then the
// forward with the problem's epilogue, forward(epilogue, out), and the backward of the forward
// given (or this call's own when null), backward(epilogue, forward, out), with the matching
// epilogue: dresidual requested when the forward had a residual.
template <typename T, class Shape, class Forward, class Backward>
Result<T> run_forward_backward(const EpilogueProblem<T, Shape>& p, std::size_t stats,
                               std::size_t params, const Result<T>* forward_in,
                               const Forward& forward, const Backward& backward) {
  const auto n = std::size_t(p.sh.numel());
  Result<T> o;
  o.y = poisoned_as<T>(n);
  o.dx = poisoned_as<T>(n);
  o.mean = poisoned(stats);
  o.rstd = poisoned(stats);
  o.dw = poisoned(params);
  o.db = poisoned(params);
  ForwardEpilogue fe;
  fe.activation = activation_of(p.epi);
  if (has_residual(p.epi)) fe.residual = p.view(p.r);
  forward(fe, o);

  const Result<T>& f = forward_in ? *forward_in : o;
  BackwardEpilogue be;
  be.activation = activation_of(p.epi);
  if (has_relu(p.epi)) be.y = p.view(f.y);
  // silu recomputes z: the forward's residual and bias.
  if (has_silu(p.epi)) {
    if (has_residual(p.epi)) be.residual = p.view(p.r);
    be.bias = p.b;
  }
  if (has_residual(p.epi)) {
    o.dres = poisoned_as<T>(n);
    be.dresidual = p.view(o.dres);
  }
  backward(be, f, o);
  return o;
}

}  // namespace normkit::test
