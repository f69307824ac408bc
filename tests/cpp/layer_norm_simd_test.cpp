// LayerNorm's SIMD, low-precision, fused-epilogue and workspace paths: each SIMD target available
// here against the float64 reference at every loop-tail remainder, each dtype against the
// float32 path on the same rounded inputs, each epilogue forward and backward, bitwise
// thread-count invariance, the cached and the streaming orders against each other, the caller's
// workspace, and finite differences of the reference with epilogues.
#include <gtest/gtest.h>

#include <hwy/targets.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "cpu/moments.h"
#include "normkit/error.h"
#include "normkit/layer_norm.h"
#include "op_test_harness.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

// x's dims, how many trailing dims are normalized, and the memory format.
struct Shape {
  std::vector<int64_t> dims;
  int k = 1;
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
  std::string str() const {
    std::string s = "dims=(";
    for (int64_t d : dims) s += std::to_string(d) + ",";
    return s + ") k=" + std::to_string(k) + " " + to_string(format);
  }
};

Shape first(std::vector<int64_t> dims, int k) { return {std::move(dims), k, MemoryFormat::channels_first}; }
Shape last(std::vector<int64_t> dims) {
  const int k = int(dims.size()) - 1;
  return {std::move(dims), k, MemoryFormat::channels_last};
}

std::vector<int64_t> dims_of(const Shape& sh) { return sh.dims; }

template <typename T>
using Problem = EpilogueProblem<T, Shape>;

template <typename T>
Problem<T> make_problem(const Shape& sh, Epi epi, std::mt19937_64& rng, double offset = 0,
                        double scale = 1, bool affine = true) {
  return draw_problem<T>(sh, sh.cols(), epi, rng, offset, scale, affine);
}

LayerNormParams params_of(const Shape& sh) { return LayerNormParams{sh.k, 1e-5}; }

// Forward with the problem's epilogue, then the backward (run_forward_backward).
template <typename T>
Result<T> run(const Problem<T>& p, const Context& ctx, const Result<T>* forward_in = nullptr) {
  LayerNormParams params = params_of(p.sh);
  return run_forward_backward(
      p, std::size_t(p.sh.rows()), std::size_t(p.sh.cols()), forward_in,
      [&](const ForwardEpilogue& fe, Result<T>& o) {
        params.epilogue = fe;
        layer_norm_forward(params, p.view(p.x), opt(p.w), opt(p.b), p.view(o.y), o.mean,
                           o.rstd, ctx);
      },
      [&](const BackwardEpilogue& be, const Result<T>& f, Result<T>& o) {
        layer_norm_backward({params.normalized_ndim, be}, p.view(p.dy), p.view(p.x), f.mean,
                            f.rstd, opt(p.w), p.view(o.dx), o.dw, o.db, ctx);
      });
}

// CPU against the reference: both backwards from the reference forward's outputs, so a ReLU
// mask never differs by rounding. `offset_ratio` widens the bounds as the accuracy criterion
// does (error relative to the spread grows with |offset| / scale).
template <typename T>
void compare_cpu_to_reference(const Problem<T>& p, int threads, const std::string& what,
                              double offset_ratio = 0) {
  const Context ref = reference_ctx(), cpu = cpu_ctx(threads);
  const Result<T> want = run(p, ref);
  const Result<T> got = run(p, cpu, &want);
  const double widen = 1 + offset_ratio;
  // y: rounded once to T by both; one ulp of T apart at most, plus float32 error.
  expect_near_t(got.y, want.y, 1.0, 2e-5 * widen * (1 + max_abs_t(want.y)), what + " y");
  expect_near_f(got.mean, want.mean, 1e-6, what + " mean");
  expect_near_f(got.rstd, want.rstd, 1e-5, what + " rstd");
  // dx is a sum of terms up to rstd * |w * dy| (a row of one value: rstd = 1 / sqrt(eps), dx 0).
  const double dx_terms = max_abs(want.rstd) * (p.w.empty() ? 1.0 : max_abs(p.w)) * max_abs_t(p.dy);
  expect_near_t(got.dx, want.dx, 1.0, 1e-4 * widen * (1 + max_abs_t(want.dx)) + 1e-6 * dx_terms,
                what + " dx");
  expect_near_f(got.dw, want.dw, 1e-4 * widen, what + " dweight");
  expect_near_f(got.db, want.db, 1e-4, what + " dbias");
  // dresidual = dy masked: exact; dy * silu'(z) with z in float: near.
  if (has_residual(p.epi))
    expect_near_t(got.dres, want.dres, has_silu(p.epi) ? 1.0 : 0.0,
                  has_silu(p.epi) ? 2e-5 * widen * (1 + max_abs_t(p.dy)) : 0.0, what + " dresidual");
}

// Row lengths 1 .. 2 * 16 + 1 (16 float lanes on the widest target): every remainder of every
// target's vector loops, channels-first rows and channels-last rows (3 * C: 3 is odd, so every
// remainder appears there too).
template <typename T>
void tails_on_this_target(std::mt19937_64& rng) {
  for (Epi e : kEpilogues)
    for (int64_t n = 1; n <= 33; ++n) {
      const Shape cf = first({3, n}, 1);
      compare_cpu_to_reference(make_problem<T>(cf, e, rng, 0, 1, n % 3 != 0), 2,
                               cf.str() + " " + epi_name(e));
      const Shape cl = last({2, n, 3});
      compare_cpu_to_reference(make_problem<T>(cl, e, rng), 2, cl.str() + " " + epi_name(e));
    }
}

TEST(LayerNormSimd, EveryTargetTailDtypeAndEpilogue) {
  std::mt19937_64 rng(51);
  for_each_target([&] {
    tails_on_this_target<float>(rng);
    tails_on_this_target<bf16>(rng);
    tails_on_this_target<f16>(rng);
  });
}

// Larger shapes: rows of several kRunChunk pieces, the cached and the streaming orders of both
// passes, channels-first of every rank with any normalized_ndim, channels-last, every dtype and
// epilogue, 1 and 3 threads.
const Shape kLarge[] = {
    first({3, 5000}, 1),         // pieces, too few rows to cache: streaming forward and backward
    first({300, 70}, 1),         // cached forward and backward
    first({260, 2100}, 1),       // cached, rows of two pieces
    first({2, 6, 4, 5}, 2),
    first({3, 4, 5, 6, 7}, 3),
    first({5, 3, 7}, 3),         // one row
    first({4, 3, 5, 7}, 1),
    first({2, 3, 2, 3, 5}, 4),
    last({2, 7, 6, 5, 3}),
    last({1, 3, 70, 50}),        // one long channels-last row
    last({9, 5, 4}),
};

template <typename T>
void large_against_reference(std::mt19937_64& rng) {
  int i = 0;
  for (const Shape& sh : kLarge)
    for (Epi e : kEpilogues)
      for (int threads : {1, 3}) {
        const double offset = (i++ % 3 == 0) ? 100.0 : 0.0;
        compare_cpu_to_reference(make_problem<T>(sh, e, rng, offset, 1, i % 5 != 0), threads,
                                 sh.str() + " " + epi_name(e) + " threads " + std::to_string(threads),
                                 std::is_same_v<T, float> ? offset : 0);
      }
}

TEST(LayerNormSimd, LargeShapesMatchReferenceForEveryDtypeAndEpilogue) {
  std::mt19937_64 rng(52);
  large_against_reference<float>(rng);
  large_against_reference<bf16>(rng);
  large_against_reference<f16>(rng);
}

// Float32 outputs of 16 MiB and more are written with non-temporal stores (one-lane steps up to
// the first aligned vector of a row): rows from cache with misaligned starts, long rows in
// pieces, and short rows (stored normally); against the reference, and bitwise the same for 2
// and 3 threads.
TEST(LayerNormSimd, LargeOutputsMatchReference) {
  std::mt19937_64 rng(54);
  const Shape shapes[] = {first({1025, 4097}, 1), first({3, 1400001}, 1),
                          first({5000, 7, 121}, 2)};
  int k = 0;
  for (const Shape& sh : shapes) {
    const Epi e = kEpilogues[k++ % std::size(kEpilogues)];
    const std::string what = sh.str() + " " + epi_name(e);
    ASSERT_GE(sh.numel() * 4, int64_t(16) << 20) << what;
    const Problem<float> p = make_problem<float>(sh, e, rng);
    compare_cpu_to_reference(p, 2, what);
    const Result<float> two = run(p, cpu_ctx(2));
    const Result<float> three = run(p, cpu_ctx(3));
    expect_same_bits(three, two, what + " threads 3 vs 2");
  }
}

// Large offsets with the epilogues (float32): y and dx stay within the acceptance bound
// 1e-5 * (1 + |offset| / scale) of max|y| (20x for dx), as without an epilogue.
TEST(LayerNormSimd, EpiloguesStayAccurateAtLargeOffsets) {
  std::mt19937_64 rng(53);
  const Context ref = reference_ctx(), cpu = cpu_ctx(2);
  for (const Shape& sh : {first({6, 768}, 1), first({2, 3, 4097}, 1), last({3, 5, 7, 9})})
    for (double ratio : {1e3, -3e4})
      for (Epi e : {kResidual, kResidualRelu}) {
        const double scale = 0.25;
        const Problem<float> p = make_problem<float>(sh, e, rng, ratio * scale, scale);
        const Result<float> want = run(p, ref);
        const Result<float> got = run(p, cpu, &want);
        const double tol = 1e-5 * (1 + std::fabs(ratio));
        const std::string what = sh.str() + " " + epi_name(e) + " ratio " + std::to_string(ratio);
        EXPECT_LE(max_abs_diff(got.y, want.y), tol * max_abs(want.y)) << what;
        EXPECT_LE(max_abs_diff(got.dx, want.dx), 20 * tol * max_abs(want.dx)) << what;
        EXPECT_LE(max_abs_diff(got.dw, want.dw), 20 * tol * max_abs(want.dw)) << what;
        EXPECT_TRUE(bitwise_equal(got.dres, want.dres)) << what;
      }
}

// full: every epilogue and 2, 3, 4 threads (and the same with a workspace); else (the other
// targets, to keep the run short) the plain and the residual+relu epilogues against 3 threads.
template <typename T>
void threads_invariant(std::mt19937_64& rng, bool full) {
  const Shape shapes[] = {
      first({3, 5000}, 1),  first({1, 70000}, 1), first({300, 70}, 1),
      first({260, 2100}, 1), last({1, 3, 100, 100}), first({4096, 24}, 1),
  };
  for (const Shape& sh : shapes)
    for (Epi e : kEpilogues) {
      if (!full && e != kNone && e != kResidualRelu) continue;
      const Problem<T> p = make_problem<T>(sh, e, rng);
      const Result<T> one = run(p, cpu_ctx(1));
      std::vector<std::byte> ws(layer_norm_workspace_size(params_of(sh), p.view(p.x)));
      for (int threads = full ? 2 : 3; threads <= (full ? 4 : 3); ++threads)
        for (bool with_workspace : {false, true}) {
          if (with_workspace && !full) continue;
          Context ctx = cpu_ctx(threads);
          if (with_workspace) ctx.workspace = ws;
          const Result<T> many = run(p, ctx, &one);
          const std::string what = sh.str() + " " + epi_name(e) + " threads " +
                                   std::to_string(threads) + (with_workspace ? " workspace" : "");
          expect_same_bits(many, one, what);
        }
    }
}

TEST(LayerNormSimd, BitwiseIdenticalForAnyThreadCountOnEveryTarget) {
  std::mt19937_64 rng(54);
  const int64_t best = cpu::simd_target();
  for_each_target([&] {
    const bool full = cpu::simd_target() == best;
    threads_invariant<float>(rng, full);
    threads_invariant<bf16>(rng, full);
    threads_invariant<f16>(rng, full);
  });
}

// The cached order (each row normalized, or given its dx, right after its own sums) and the
// streaming one (all statistics or sums first) are chosen by the shape; the rows they share
// must come out the same bits. A tensor of few rows streams; the same rows followed by many
// more take the cached order.
template <typename T>
void cached_equals_streaming(std::mt19937_64& rng) {
  for (int64_t cols : {70, 2100, 5000})
    for (Epi e : {kNone, kResidualRelu}) {
      const Shape few = first({3, cols}, 1), many = first({300, cols}, 1);
      const Problem<T> big = make_problem<T>(many, e, rng, 10.0);
      Problem<T> small{few, e};
      const auto n = std::size_t(few.numel());
      small.x.assign(big.x.begin(), big.x.begin() + long(n));
      if (has_residual(e)) small.r.assign(big.r.begin(), big.r.begin() + long(n));
      small.dy.assign(big.dy.begin(), big.dy.begin() + long(n));
      small.w = big.w;
      small.b = big.b;
      const Context ctx = cpu_ctx(2);
      const Result<T> a = run(small, ctx), b = run(big, ctx);
      auto head = [&](const std::vector<T>& v) { return std::vector<T>(v.begin(), v.begin() + long(n)); };
      auto head_f = [&](const std::vector<float>& v) { return std::vector<float>(v.begin(), v.begin() + 3); };
      const std::string what = "cols " + std::to_string(cols) + " " + epi_name(e);
      EXPECT_TRUE(bitwise_equal(a.y, head(b.y))) << what;
      EXPECT_TRUE(bitwise_equal(a.mean, head_f(b.mean))) << what;
      EXPECT_TRUE(bitwise_equal(a.rstd, head_f(b.rstd))) << what;
      EXPECT_TRUE(bitwise_equal(a.dx, head(b.dx))) << what;
      if (has_residual(e)) EXPECT_TRUE(bitwise_equal(a.dres, head(b.dres))) << what;
    }
}

TEST(LayerNormSimd, CachedAndStreamingOrdersGiveTheSameBits) {
  std::mt19937_64 rng(55);
  cached_equals_streaming<float>(rng);
  cached_equals_streaming<bf16>(rng);
  cached_equals_streaming<f16>(rng);
}

// bf16/f16 against the float32 path on the same (rounded) inputs: outputs within half an ulp of
// the output dtype of the float32 result (the 16-bit store rounds to nearest; a truncation
// would fail); statistics and weight gradients as float32.
template <typename T>
void low_precision_vs_float32(std::mt19937_64& rng) {
  const Shape shapes[] = {first({40, 97}, 1), first({2, 6, 17, 19}, 2), last({2, 32, 17, 19}),
                          first({3, 4100}, 1)};
  for (const Shape& sh : shapes)
    for (Epi e : kEpilogues) {
      const Problem<T> p = make_problem<T>(sh, e, rng, 3.0);
      Problem<float> pf{sh, e, wide_f(p.x), wide_f(p.r), wide_f(p.dy), p.w, p.b};
      const Context cpu = cpu_ctx(2);
      const Result<float> rf = run(pf, cpu);
      // The T backward consumes the float32 forward's statistics and (rounded) y.
      Result<T> fin;
      fin.y = rounded<T>(rf.y);
      fin.mean = rf.mean;
      fin.rstd = rf.rstd;
      const Result<T> rt = run(p, cpu, &fin);
      const std::string what = sh.str() + " " + epi_name(e);
      expect_near_t(rt.y, rounded<T>(rf.y), 0.5, 1e-6, what + " y");
      EXPECT_TRUE(bitwise_equal(rt.mean, rf.mean)) << what;
      EXPECT_TRUE(bitwise_equal(rt.rstd, rf.rstd)) << what;
      expect_near_t(rt.dx, rounded<T>(rf.dx), 0.5, 1e-6, what + " dx");
      EXPECT_TRUE(bitwise_equal(rt.dw, rf.dw)) << what;
      EXPECT_TRUE(bitwise_equal(rt.db, rf.db)) << what;
      if (has_residual(e)) expect_near_t(rt.dres, rounded<T>(rf.dres), 0.0, 0.0, what + " dres");
    }
}

TEST(LayerNormSimd, LowPrecisionMatchesFloat32OnRoundedInputs) {
  std::mt19937_64 rng(56);
  low_precision_vs_float32<bf16>(rng);
  low_precision_vs_float32<f16>(rng);
}

TEST(LayerNormSimd, Float16InputsWhoseSquaresOverflowFloat16) {
  // |x| ~ 3e4: x^2 ~ 1e9 overflows float16 (max 65504); statistics in float32 do not.
  std::mt19937_64 rng(57);
  Problem<f16> p = make_problem<f16>(first({6, 300}, 1), kNone, rng);
  for (auto& v : p.x) v = from_float<f16>(to_float(v) * 15000.0f);
  const Result<f16> want = run(p, reference_ctx());
  const Result<f16> got = run(p, cpu_ctx(2), &want);
  expect_near_t(got.y, want.y, 1.0, 1e-4, "y");
  for (float r : got.rstd) EXPECT_TRUE(std::isfinite(r) && r > 0);
}

// Finite differences of the reference with each epilogue, at points away from the ReLU kink:
// the residual is chosen so every pre-activation is at least 0.3 away from zero. silu's
// backward recomputes z from x, the statistics, weight, bias and the residual.
TEST(LayerNormSimd, ReferenceEpilogueGradientsMatchFiniteDifferences) {
  // silu draws from its own generator: the relu cases keep their points (no kink near them).
  std::mt19937_64 relu_rng(58), silu_rng(59);
  const Context ref = reference_ctx();
  for (const Shape& sh : {first({3, 7}, 1), last({2, 3, 4})})
    for (Epi e : {kRelu, kResidual, kResidualRelu, kSilu, kResidualSilu}) {
      std::mt19937_64& rng = has_silu(e) ? silu_rng : relu_rng;
      Problem<float> p = make_problem<float>(sh, e, rng);
      if (has_residual(e)) {
        Problem<float> plain = p;
        plain.epi = kNone;
        const Result<float> base = run(plain, ref);
        std::uniform_real_distribution<double> u(0.0, 1.0);
        for (std::size_t i = 0; i < p.r.size(); ++i) {
          const double target = (u(rng) < 0.5 ? -1 : 1) * (0.3 + u(rng));
          p.r[i] = float(target - base.y[i]);
        }
      }
      const Result<float> an = run(p, ref);
      // L = sum(dy * y): dL/dx = dx, dL/dr = dresidual, dL/dw = dweight.
      auto loss = [&](const Problem<float>& q) {
        const Result<float> o = run(q, ref);
        double L = 0;
        for (std::size_t i = 0; i < o.y.size(); ++i) L += double(q.dy[i]) * o.y[i];
        return L;
      };
      const double h = 1e-2;
      auto numeric = [&](auto field, std::size_t i) {
        Problem<float> hi = p, lo = p;
        (hi.*field)[i] += float(h);
        (lo.*field)[i] -= float(h);
        return (loss(hi) - loss(lo)) / (2 * h);
      };
      for (std::size_t i = 0; i < p.x.size(); i += 2) {
        const double fd = numeric(&Problem<float>::x, i);
        EXPECT_NEAR(an.dx[i], fd, 2e-3 * (1 + std::fabs(fd))) << epi_name(e) << " dx[" << i << "]";
        if (has_residual(e)) {
          const double fr = numeric(&Problem<float>::r, i);
          EXPECT_NEAR(an.dres[i], fr, 2e-3 * (1 + std::fabs(fr))) << epi_name(e) << " dres[" << i << "]";
        }
      }
      if (has_residual(e))
        for (std::size_t j = 0; j < p.w.size(); ++j) {
          const double fw = numeric(&Problem<float>::w, j);
          EXPECT_NEAR(an.dw[j], fw, 2e-3 * (1 + std::fabs(fw))) << epi_name(e) << " dw[" << j << "]";
        }
    }
}

// ---- workspace ------------------------------------------------------------------------------

// The exact size is enough, any alignment works, its previous contents do not matter, and the
// results equal those of the call without a workspace bit for bit.
TEST(LayerNormWorkspace, ExactSizeGivesTheSameBitsAsNone) {
  std::mt19937_64 rng(61);
  const Shape shapes[] = {first({3, 5000}, 1), first({300, 70}, 1), first({260, 2100}, 1),
                          last({2, 7, 6, 5}), first({7}, 1), first({2, 3, 0}, 1)};
  for (const Shape& sh : shapes)
    for (Epi e : {kNone, kResidualRelu}) {
      const Problem<bf16> p = make_problem<bf16>(sh, e, rng);
      const std::size_t size = layer_norm_workspace_size(params_of(sh), p.view(p.x));
      if (sh.numel() == 0) EXPECT_EQ(size, 0u) << sh.str();
      const Result<bf16> none = run(p, cpu_ctx(2));
      for (std::size_t misalign : {0, 1, 3}) {
        std::vector<std::byte> buffer(size + misalign, std::byte{0xFF});  // NaN-filled floats
        Context ctx = cpu_ctx(2);
        ctx.workspace = std::span<std::byte>(buffer).subspan(misalign);
        if (size == 0) ctx.workspace = {};
        const Result<bf16> with = run(p, ctx);
        const std::string what = sh.str() + " " + epi_name(e) + " misalign " + std::to_string(misalign);
        expect_same_bits(with, none, what);
      }
    }
}

TEST(LayerNormWorkspace, TooSmallThrowsBeforeWritingAnything) {
  for (const Shape& sh : {first({3, 5000}, 1), first({300, 70}, 1), last({2, 7, 6, 5})}) {
    std::mt19937_64 rng(62);
    const Problem<float> p = make_problem<float>(sh, kResidual, rng);
    const std::size_t size = layer_norm_workspace_size(params_of(sh), p.view(p.x));
    ASSERT_GT(size, 0u);
    std::vector<std::byte> buffer(size - 1);
    Context ctx = cpu_ctx(2);
    ctx.workspace = buffer;
    const auto n = std::size_t(sh.numel()), rows = std::size_t(sh.rows()), cols = std::size_t(sh.cols());
    std::vector<float> y = poisoned(n), mean = poisoned(rows), rstd = poisoned(rows);
    LayerNormParams params = params_of(sh);
    params.epilogue.residual = p.view(p.r);
    const std::vector<std::string> needles = {
        "workspace has " + std::to_string(size - 1) + " bytes",
        "expected at least layer_norm_workspace_size(params, x) = " + std::to_string(size)};
    expect_error([&] {
      layer_norm_forward(params, p.view(p.x), p.w, p.b, p.view(y), mean, rstd, ctx);
    }, {"layer_norm_forward", needles[0], needles[1]});
    EXPECT_TRUE(y == poisoned(n) && mean == poisoned(rows) && rstd == poisoned(rows)) << sh.str();

    std::vector<float> m(rows, 0.0f), s(rows, 1.0f), dx = poisoned(n), dw = poisoned(cols),
                       db = poisoned(cols), dres = poisoned(n);
    BackwardEpilogue be;
    be.dresidual = p.view(dres);
    expect_error([&] {
      layer_norm_backward({params.normalized_ndim, be}, p.view(p.dy), p.view(p.x), m, s, p.w,
                          p.view(dx), dw, db, ctx);
    }, {"layer_norm_backward", needles[0], needles[1]});
    EXPECT_TRUE(dx == poisoned(n) && dw == poisoned(cols) && db == poisoned(cols) &&
                dres == poisoned(n))
        << sh.str();
  }
}

TEST(LayerNormWorkspace, SizeChecksItsArguments) {
  std::vector<float> x(24, 1.0f);
  expect_error([&] { layer_norm_workspace_size({3, 1e-5}, view_of(x, {4, 6})); },
               {"layer_norm_workspace_size", "normalized_ndim must be in [1, rank of x] = [1, 2], got 3"});
  expect_error([&] { layer_norm_workspace_size({1, 1e-5}, view_of(x, {2, 3, 4}, MemoryFormat::channels_last)); },
               {"layer_norm_workspace_size", "channels_last x needs normalized_ndim = rank - 1 = 2"});
  // The same size for every dtype of x: the scratch is float32 and wider only.
  std::vector<bf16> xb(24);
  EXPECT_EQ(layer_norm_workspace_size({1, 1e-5}, view_of(x, {4, 6})),
            layer_norm_workspace_size({1, 1e-5}, TensorView(xb.data(), DType::bfloat16, {4, 6})));
}

// ---- epilogue and dtype argument errors ---------------------------------------------------

TEST(LayerNormSimd, EpilogueAndDtypeErrorsWriteNothing) {
  const std::vector<int64_t> dims{2, 4, 3};
  std::vector<float> x(24, 1.0f), r(24, 0.5f), y = poisoned(24), mean = poisoned(2),
                     rstd = poisoned(2), dx = poisoned(24);
  std::vector<bf16> rb(24), xb(24);
  const TensorView xv = view_of(x, dims), yv = view_of(y, dims), dxv = view_of(dx, dims);
  LayerNormParams params{2, 1e-5};
  params.epilogue.residual = view_of(r, {2, 4, 4});
  expect_error([&] { layer_norm_forward(params, xv, {}, {}, yv, mean, rstd); },
               {"layer_norm_forward", "epilogue.residual shape (2, 4, 4) != x shape (2, 4, 3)"});
  params.epilogue.residual = TensorView(rb.data(), DType::bfloat16, {2, 4, 3});
  expect_error([&] { layer_norm_forward(params, xv, {}, {}, yv, mean, rstd); },
               {"epilogue.residual dtype bfloat16 != x dtype float32"});
  params.epilogue.residual = view_of(r, dims, MemoryFormat::channels_last);
  expect_error([&] { layer_norm_forward(params, xv, {}, {}, yv, mean, rstd); },
               {"epilogue.residual memory format channels_last"});
  params.epilogue = {};
  expect_error([&] {
    layer_norm_forward(params, TensorView(xb.data(), DType::bfloat16, {2, 4, 3}), {}, {}, yv, mean, rstd);
  }, {"y dtype float32 != x dtype bfloat16"});
  EXPECT_TRUE(y == poisoned(24) && mean == poisoned(2) && rstd == poisoned(2));

  std::vector<float> m(2, 0.0f), s(2, 1.0f);
  BackwardEpilogue be;
  be.activation = Activation::relu;
  auto backward = [&] {
    layer_norm_backward({params.normalized_ndim, be}, xv, xv, m, s, {}, dxv, {}, {});
  };
  expect_error(backward, {"layer_norm_backward", "epilogue.y (the forward's output) is required with relu"});
  be = {.activation = Activation::silu, .bias = std::span<const float>(m)};
  expect_error(backward, {"layer_norm_backward",
                          "epilogue.bias has length 2, expected product of the normalized dims = 12"});
  be = {.activation = Activation::relu};
  be.y = view_of(y, {2, 4, 2});
  expect_error(backward, {"epilogue.y shape (2, 4, 2) != x shape (2, 4, 3)"});
  be.y = view_of(r, dims);
  be.dresidual = TensorView(rb.data(), DType::bfloat16, {2, 4, 3});
  expect_error(backward, {"epilogue.dresidual dtype bfloat16 != x dtype float32"});
  expect_error([&] {
    layer_norm_backward({params.normalized_ndim}, TensorView(xb.data(), DType::bfloat16, {2, 4, 3}),
                        xv, m, s, {}, dxv, {}, {});
  }, {"dy dtype bfloat16 != x dtype float32"});
  EXPECT_TRUE(dx == poisoned(24));
}

}  // namespace
}  // namespace normkit::test
