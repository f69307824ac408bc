// GroupNorm's SIMD, low-precision and fused-epilogue paths: each SIMD target available here
// against the float64 reference at every loop-tail remainder (the channels-last statistics pass
// included, at a large offset), each dtype against the float32 path on the same rounded inputs,
// each epilogue forward and backward, bitwise thread-count invariance, finite differences of the
// reference with epilogues, and the caller's workspace (same bits, size checks).
#include <gtest/gtest.h>

#include <hwy/targets.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "cpu/moments.h"
#include "normkit/error.h"
#include "normkit/group_norm.h"
#include "op_test_harness.h"
#include "simd_test_util.h"
#include "test_util.h"

namespace normkit::test {
namespace {

struct Shape {
  int64_t N, C, G;
  std::vector<int64_t> spatial;
  MemoryFormat format;
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
  std::string str() const {
    std::string s = "N=" + std::to_string(N) + " C=" + std::to_string(C) + " G=" + std::to_string(G) + " S=(";
    for (int64_t d : spatial) s += std::to_string(d) + ",";
    return s + ") " + to_string(format);
  }
};

std::vector<int64_t> dims_of(const Shape& sh) { return sh.dims(); }

template <typename T>
using Problem = EpilogueProblem<T, Shape>;

template <typename T>
Problem<T> make_problem(const Shape& sh, Epi epi, std::mt19937_64& rng, double offset = 0) {
  return draw_problem<T>(sh, sh.C, epi, rng, offset, 1.0, true);
}

// Forward with the problem's epilogue, then the backward (run_forward_backward).
template <typename T>
Result<T> run(const Problem<T>& p, const Context& ctx, const Result<T>* forward_in = nullptr) {
  GroupNormParams params{p.sh.G, 1e-5};
  return run_forward_backward(
      p, std::size_t(p.sh.N * p.sh.G), std::size_t(p.sh.C), forward_in,
      [&](const ForwardEpilogue& fe, Result<T>& o) {
        params.epilogue = fe;
        group_norm_forward(params, p.view(p.x), p.w, p.b, p.view(o.y), o.mean, o.rstd, ctx);
      },
      [&](const BackwardEpilogue& be, const Result<T>& f, Result<T>& o) {
        group_norm_backward({params.num_groups, be}, p.view(p.dy), p.view(p.x), f.mean, f.rstd,
                            p.w, p.view(o.dx), o.dw, o.db, ctx);
      });
}

// CPU against the reference: both backwards from the reference forward's outputs, so a ReLU
// mask never differs by rounding.
template <typename T>
void compare_cpu_to_reference(const Problem<T>& p, int threads, const std::string& what) {
  const Context ref = reference_ctx(), cpu = cpu_ctx(threads);
  const Result<T> want = run(p, ref);
  const Result<T> got = run(p, cpu, &want);
  // y: rounded once to T by both; one ulp of T apart at most, plus float32 error.
  expect_near_t(got.y, want.y, 1.0, 2e-5 * (1 + max_abs_t(want.y)), what + " y");
  expect_near_f(got.mean, want.mean, 1e-5, what + " mean");
  expect_near_f(got.rstd, want.rstd, 1e-5, what + " rstd");
  expect_near_t(got.dx, want.dx, 1.0, 1e-4 * (1 + max_abs_t(want.dx)), what + " dx");
  expect_near_f(got.dw, want.dw, 1e-4, what + " dweight");
  expect_near_f(got.db, want.db, 1e-4, what + " dbias");
  if (has_residual(p.epi) && !has_silu(p.epi)) {
    // dresidual = dy masked: exact.
    expect_near_t(got.dres, want.dres, 0.0, 0.0, what + " dresidual");
  }
  if (has_residual(p.epi) && has_silu(p.epi)) {
    // dy * silu'(z), z recomputed in float (vectorized sigmoid) against double.
    expect_near_t(got.dres, want.dres, 1.0, 2e-5 * (1 + max_abs_t(p.dy)), what + " dresidual");
  }
}

template <typename T>
void tails_on_this_target(std::mt19937_64& rng) {
  // Sizes 1 .. 2 * lanes + 1 of the widest target (16 float lanes) along the contiguous loop:
  // the spatial run for channels-first, the channel row for channels-last.
  for (Epi e : kEpilogues)
    for (int64_t k = 1; k <= 33; ++k) {
      const Shape cf{2, 4, 2, {k}, MemoryFormat::channels_first};
      compare_cpu_to_reference(make_problem<T>(cf, e, rng), 2,
                               cf.str() + " " + epi_name(e));
      const Shape cl{2, k, k % 2 == 0 ? 2 : 1, {3}, MemoryFormat::channels_last};
      compare_cpu_to_reference(make_problem<T>(cl, e, rng), 2,
                               cl.str() + " " + epi_name(e));
    }
}

TEST(GroupNormSimd, EveryTargetTailDtypeAndEpilogue) {
  std::mt19937_64 rng(21);
  for_each_target([&] {
    tails_on_this_target<float>(rng);
    tails_on_this_target<bf16>(rng);
    tails_on_this_target<f16>(rng);
  });
}

// Larger shapes: several kRunChunk pieces per group, cached and two-phase forwards, channels-last
// units, InstanceNorm-like G = C, both formats, every dtype and epilogue, 1 to 4 threads.
const Shape kLarge[] = {
    {1, 4, 2, {3001}, MemoryFormat::channels_first},   // group of 6002: pieces, N*G = 2
    {3, 6, 3, {17, 19}, MemoryFormat::channels_first},
    {2, 10, 10, {31, 9}, MemoryFormat::channels_first},
    {2, 48, 4, {9, 23}, MemoryFormat::channels_last},
    {1, 19, 1, {400}, MemoryFormat::channels_last},
    {2, 40, 8, {3, 3, 5}, MemoryFormat::channels_last},
};

template <typename T>
void large_against_reference(std::mt19937_64& rng) {
  for (const Shape& sh : kLarge)
    for (Epi e : kEpilogues)
      for (int threads : {1, 3})
        compare_cpu_to_reference(make_problem<T>(sh, e, rng, sh.C % 3 ? 0.0 : 100.0), threads,
                                 sh.str() + " " + epi_name(e) + " threads " + std::to_string(threads));
}

TEST(GroupNormSimd, LargeShapesMatchReferenceForEveryDtypeAndEpilogue) {
  std::mt19937_64 rng(22);
  large_against_reference<float>(rng);
  large_against_reference<bf16>(rng);
  large_against_reference<f16>(rng);
}

// Float32 outputs of 16 MiB and more are written with non-temporal stores (one-lane steps up to
// the first aligned vector of a run): two-phase and cached channels-first forwards and
// backwards with runs that start misaligned, channels-last rows whose vectors are all aligned
// (C = 64, 48) and not (C = 50); against the reference, and bitwise the same for 2 and 3 threads.
TEST(GroupNormSimd, LargeOutputsMatchReference) {
  std::mt19937_64 rng(23);
  const Shape shapes[] = {
      {1, 4, 2, {1048577}, MemoryFormat::channels_first},  // groups of 8 MB: two-phase
      {64, 64, 32, {1025}, MemoryFormat::channels_first},  // groups of 8 KB: cached
      {2, 64, 8, {32769}, MemoryFormat::channels_last},
      {1100, 48, 4, {80}, MemoryFormat::channels_last},    // cached samples
      {2, 50, 5, {42000}, MemoryFormat::channels_last},
  };
  int k = 0;
  for (const Shape& sh : shapes) {
    const Epi e = kEpilogues[k++ % std::size(kEpilogues)];
    const std::string what = sh.str() + " " + epi_name(e);
    const Problem<float> p = make_problem<float>(sh, e, rng);
    ASSERT_GE(int64_t(p.x.size()) * 4, int64_t(16) << 20) << what;
    compare_cpu_to_reference(p, 2, what);
    const Result<float> two = run(p, cpu_ctx(2));
    const Result<float> three = run(p, cpu_ctx(3));
    expect_same_bits(three, two, what + " threads 3 vs 2");
  }
}

// full: every epilogue and 2, 3, 4 threads; else (the other targets, to keep the run short on
// a small machine) the plain and the residual+relu epilogues against 3 threads.
template <typename T>
void threads_invariant(std::mt19937_64& rng, bool full) {
  const Shape shapes[] = {
      {1, 4, 2, {3001}, MemoryFormat::channels_first},  // cached with <= 2 threads, else two-phase
      {2, 12, 4, {1000}, MemoryFormat::channels_first},
      {1, 6, 3, {70, 70}, MemoryFormat::channels_last},
      {3, 32, 8, {10, 11}, MemoryFormat::channels_last},
  };
  for (const Shape& sh : shapes)
    for (Epi e : kEpilogues) {
      if (!full && e != kNone && e != kResidualRelu) continue;
      const Problem<T> p = make_problem<T>(sh, e, rng);
      const Result<T> one = run(p, cpu_ctx(1));
      for (int threads = full ? 2 : 3; threads <= (full ? 4 : 3); ++threads) {
        const Result<T> many = run(p, cpu_ctx(threads), &one);
        const std::string what = sh.str() + " " + epi_name(e) + " threads " + std::to_string(threads);
        expect_same_bits(many, one, what);
      }
    }
}

TEST(GroupNormSimd, BitwiseIdenticalForAnyThreadCountOnEveryTarget) {
  std::mt19937_64 rng(23);
  const int64_t best = cpu::simd_target();
  for_each_target([&] {
    const bool full = cpu::simd_target() == best;
    threads_invariant<float>(rng, full);
    threads_invariant<bf16>(rng, full);
    threads_invariant<f16>(rng, full);
  });
}

// bf16/f16 against the float32 path on the same (rounded) inputs: outputs within one ulp of the
// output dtype of the rounded float32 result; statistics and weight gradients as float32.
template <typename T>
void low_precision_vs_float32(std::mt19937_64& rng) {
  const Shape shapes[] = {
      {2, 32, 8, {17, 19}, MemoryFormat::channels_first},
      {2, 32, 8, {17, 19}, MemoryFormat::channels_last},
      {1, 6, 6, {50, 41}, MemoryFormat::channels_first},
  };
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
      // Half an ulp: the rounding of the 16-bit store is to nearest (a truncation would fail).
      expect_near_t(rt.y, rounded<T>(rf.y), 0.5, 1e-6, what + " y");
      EXPECT_LE(max_abs_diff(rt.mean, rf.mean), 1e-6 * (1 + max_abs(rf.mean))) << what;
      EXPECT_LE(max_abs_diff(rt.rstd, rf.rstd), 1e-6 * (1 + max_abs(rf.rstd))) << what;
      expect_near_t(rt.dx, rounded<T>(rf.dx), 0.5, 1e-6, what + " dx");
      EXPECT_LE(max_abs_diff(rt.dw, rf.dw), 1e-5 * (1 + max_abs(rf.dw))) << what;
      EXPECT_LE(max_abs_diff(rt.db, rf.db), 1e-5 * (1 + max_abs(rf.db))) << what;
      if (has_residual(e)) expect_near_t(rt.dres, rounded<T>(rf.dres), 0.0, 0.0, what + " dres");
    }
}

TEST(GroupNormSimd, LowPrecisionMatchesFloat32OnRoundedInputs) {
  std::mt19937_64 rng(24);
  low_precision_vs_float32<bf16>(rng);
  low_precision_vs_float32<f16>(rng);
}

TEST(GroupNormSimd, Float16InputsWhoseSquaresOverflowFloat16) {
  // |x| ~ 3e4: x^2 ~ 1e9 overflows float16 (max 65504); statistics in float32 do not.
  std::mt19937_64 rng(25);
  const Shape sh{2, 4, 2, {300}, MemoryFormat::channels_first};
  Problem<f16> p = make_problem<f16>(sh, kNone, rng);
  for (auto& v : p.x) v = from_float<f16>(to_float(v) * 15000.0f);
  const Result<f16> want = run(p, reference_ctx());
  const Result<f16> got = run(p, cpu_ctx(2), &want);
  expect_near_t(got.y, want.y, 1.0, 1e-4, "y");
  for (float r : got.rstd) EXPECT_TRUE(std::isfinite(r) && r > 0);
}

// Finite differences of the reference with each epilogue, at points away from the ReLU kink:
// the residual is chosen so every pre-activation is at least 0.3 away from zero. silu's
// backward recomputes z from x, the statistics, weight, bias and the residual.
TEST(GroupNormSimd, ReferenceEpilogueGradientsMatchFiniteDifferences) {
  std::mt19937_64 rng(26);
  const Context ref = reference_ctx();
  for (MemoryFormat fmt : {MemoryFormat::channels_first, MemoryFormat::channels_last})
    for (Epi e : {kRelu, kResidual, kResidualRelu, kSilu, kResidualSilu}) {
      const Shape sh{2, 4, 2, {5}, fmt};
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
      // L = sum(dy * y): dL/dx = dx, dL/dr = dresidual.
      auto loss = [&](const Problem<float>& q) {
        const Result<float> o = run(q, ref);
        double L = 0;
        for (std::size_t i = 0; i < o.y.size(); ++i) L += double(q.dy[i]) * o.y[i];
        return L;
      };
      const double h = 1e-2;
      for (std::size_t i = 0; i < p.x.size(); i += 3) {
        Problem<float> hi = p, lo = p;
        hi.x[i] += float(h);
        lo.x[i] -= float(h);
        const double fd = (loss(hi) - loss(lo)) / (2 * h);
        EXPECT_NEAR(an.dx[i], fd, 2e-3 * (1 + std::fabs(fd))) << epi_name(e) << " dx[" << i << "]";
        if (has_residual(e)) {
          hi = p, lo = p;
          hi.r[i] += float(h);
          lo.r[i] -= float(h);
          const double fr = (loss(hi) - loss(lo)) / (2 * h);
          EXPECT_NEAR(an.dres[i], fr, 2e-3 * (1 + std::fabs(fr))) << epi_name(e) << " dres[" << i << "]";
        }
      }
    }
}

// The channels-last statistics pass alone (forward: mean, rstd, y) against the float64
// reference. The mean is held to two float ulps, rstd to 1e-5 relative: at an offset of 3e4
// standard deviations a sum of squares around 0 would lose every digit.
template <typename T>
void check_channels_last_statistics(const Shape& sh, double offset, std::mt19937_64& rng) {
  const Problem<T> p = make_problem<T>(sh, kNone, rng, offset);
  const auto n = std::size_t(sh.numel()), ng = std::size_t(sh.N * sh.G);
  const GroupNormParams params{sh.G, 1e-5};
  Result<T> want, got;
  for (auto [out, ctx] : {std::pair{&want, reference_ctx()},
                          std::pair{&got, cpu_ctx(2)}}) {
    out->y = poisoned_as<T>(n);
    out->mean = poisoned(ng);
    out->rstd = poisoned(ng);
    group_norm_forward(params, p.view(p.x), p.w, p.b, p.view(out->y), out->mean, out->rstd, ctx);
  }
  const std::string what = sh.str() + " offset " + std::to_string(offset);
  for (std::size_t i = 0; i < ng; ++i) {
    EXPECT_LE(std::fabs(double(got.mean[i]) - want.mean[i]), 2.4e-7 * std::fabs(want.mean[i]) + 1e-6)
        << what << " mean[" << i << "]";
    EXPECT_LE(std::fabs(double(got.rstd[i]) - want.rstd[i]), 1e-5 * want.rstd[i])
        << what << " rstd[" << i << "]";
  }
  expect_near_t(got.y, want.y, 1.0, 2e-5 * (1 + max_abs_t(want.y)), what + " y");
}

// Channel counts 1 .. 81 cover every remainder of the pass's loops on the widest target (four
// vectors of 16 lanes, one vector, one lane); 37 rows end in a partial block of 16; 300 channels
// cross a block of 256 columns (with groups of 100 across its edge) and split 101 rows into two
// units.
TEST(GroupNormSimd, ChannelsLastStatisticsOnEveryTargetAtEveryTail) {
  std::mt19937_64 rng(27);
  const auto cl = MemoryFormat::channels_last;
  for_each_target([&] {
    for (int64_t C = 1; C <= 81; ++C)
      check_channels_last_statistics<float>({1, C, C % 3 == 0 ? 3 : 1, {37}, cl}, 3e4, rng);
    check_channels_last_statistics<float>({2, 300, 3, {101}, cl}, 3e4, rng);
    check_channels_last_statistics<float>({1, 300, 300, {101}, cl}, -3e4, rng);
    for (int64_t C : {1, 15, 17, 63, 64, 65, 79})
      check_channels_last_statistics<bf16>({2, C, 1, {37}, cl}, 3.0, rng);
    check_channels_last_statistics<f16>({1, 300, 3, {101}, cl}, 3.0, rng);
  });
}

// Columns whose first values are far from the rest: the channels-last statistics take their
// pivot from a column's first values, and one pass around a pivot far from the mean would lose
// digits of the variance (here about 1e-5 of it, at 64 standard deviations over 4000 rows); the
// columns found far get a second pass around their mean. One group per channel, so every
// column's mean and variance is an output; the other columns are plain. rstd is held to 1e-6,
// ten times tighter than the test above.
TEST(GroupNormSimd, ChannelsLastStatisticsOfColumnsWithFarFirstValues) {
  std::mt19937_64 rng(28);
  const auto cl = MemoryFormat::channels_last;
  for_each_target([&] {
    for (int64_t C : {1, 2, 37}) {
      const Shape sh{1, C, C, {4000}, cl};
      Problem<float> p = make_problem<float>(sh, kNone, rng, 3e4);
      for (int64_t r = 0; r < 8; ++r)
        for (int64_t c = 0; c < C; c += 2) p.x[std::size_t(r * C + c)] += 64.0f;
      const auto n = std::size_t(sh.numel()), ng = std::size_t(C);
      const GroupNormParams params{sh.G, 1e-5};
      Result<float> want, got;
      for (auto [out, ctx] : {std::pair{&want, reference_ctx()}, std::pair{&got, cpu_ctx(2)}}) {
        out->y = poisoned(n);
        out->mean = poisoned(ng);
        out->rstd = poisoned(ng);
        group_norm_forward(params, p.view(p.x), p.w, p.b, p.view(out->y), out->mean, out->rstd,
                           ctx);
      }
      for (std::size_t i = 0; i < ng; ++i) {
        EXPECT_LE(std::fabs(double(got.mean[i]) - want.mean[i]), 2.4e-7 * std::fabs(want.mean[i]))
            << sh.str() << " mean[" << i << "]";
        EXPECT_LE(std::fabs(double(got.rstd[i]) - want.rstd[i]), 1e-6 * want.rstd[i])
            << sh.str() << " rstd[" << i << "]";
      }
    }
  });
}

// ---- caller workspace ---------------------------------------------------------------------

// A workspace of exactly group_norm_workspace_size bytes, at any alignment, filled with NaN
// bytes beforehand, gives the bits of the per-thread buffer, forward and backward, every epilogue, both formats,
// 1 to 4 threads; and the kernels do use it.
template <typename T>
void caller_workspace_gives_the_same_bits(std::mt19937_64& rng) {
  const Shape shapes[] = {
      {2, 6, 3, {5, 7}, MemoryFormat::channels_first},     // forward from cache
      {1, 4, 2, {3001}, MemoryFormat::channels_first},     // pieces, two-phase forward
      {2, 10, 5, {31, 9}, MemoryFormat::channels_first},
      {2, 300, 3, {10, 20}, MemoryFormat::channels_last},  // column blocks, several units
      {3, 20, 5, {7, 3}, MemoryFormat::channels_last},
  };
  for (const Shape& sh : shapes)
    for (Epi e : kEpilogues) {
      const Problem<T> p = make_problem<T>(sh, e, rng, 5.0);
      const std::size_t bytes = group_norm_workspace_size({sh.G, 1e-5}, p.view(p.x));
      ASSERT_GT(bytes, 0u) << sh.str();
      for (int threads = 1; threads <= 4; ++threads) {
        const std::string what = sh.str() + " " + epi_name(e) + " threads " + std::to_string(threads);
        // At any alignment: the queried size has room to align inside the caller's buffer.
        const std::size_t offset = std::size_t(threads - 1) * 3;
        std::vector<std::byte> buffer(bytes + offset, std::byte{0xff});
        const std::span<std::byte> ws(buffer.data() + offset, bytes);
        const Result<T> plain = run(p, cpu_ctx(threads));
        const Result<T> with = run(p, Context{Backend::cpu, threads, ws});
        expect_same_bits(with, plain, what);
        EXPECT_TRUE(std::any_of(ws.begin(), ws.end(), [](std::byte b) { return b != std::byte{0xff}; }))
            << what << ": workspace not used";
      }
    }
}

TEST(GroupNormWorkspace, ExactSizeGivesTheSameBitsAsNone) {
  std::mt19937_64 rng(28);
  caller_workspace_gives_the_same_bits<float>(rng);
  caller_workspace_gives_the_same_bits<bf16>(rng);
}

TEST(GroupNormWorkspace, TooSmallThrowsBeforeWriting) {
  std::mt19937_64 rng(29);
  for (MemoryFormat fmt : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    const Shape sh{2, 6, 3, {5, 7}, fmt};
    const Problem<float> p = make_problem<float>(sh, kResidualRelu, rng);
    GroupNormParams params{sh.G, 1e-5};
    params.epilogue.activation = Activation::relu;
    params.epilogue.residual = p.view(p.r);
    const std::size_t bytes = group_norm_workspace_size(params, p.view(p.x));
    ASSERT_GT(bytes, 0u);
    const auto n = std::size_t(sh.numel());
    std::vector<float> y = poisoned(n), mean = poisoned(6), rstd = poisoned(6), dx = poisoned(n),
                       dres = poisoned(n), dw = poisoned(6), db = poisoned(6);
    const std::vector<float> m(6, 0.0f), s(6, 1.0f);
    for (std::size_t size : {bytes - 1, std::size_t(0)}) {
      std::vector<std::byte> ws(bytes);
      const Context ctx{Backend::cpu, 2, std::span<std::byte>(ws.data(), size)};
      const std::string needle = "workspace has " + std::to_string(size) +
                                 " bytes, expected at least group_norm_workspace_size(params, x) = " +
                                 std::to_string(bytes);
      expect_error([&] { group_norm_forward(params, p.view(p.x), p.w, p.b, p.view(y), mean, rstd, ctx); },
                   {"group_norm_forward: " + needle});
      BackwardEpilogue be{.activation = Activation::relu, .y = p.view(p.x), .dresidual = p.view(dres)};
      expect_error([&] {
        group_norm_backward({sh.G, be}, p.view(p.dy), p.view(p.x), m, s, p.w, p.view(dx), dw, db,
                            ctx);
      }, {"group_norm_backward: " + needle});
      expect_error([&] {
        group_norm_backward({sh.G}, p.view(p.dy), p.view(p.x), m, s, p.w, p.view(dx), dw, db, ctx);
      }, {"group_norm_backward: " + needle});
    }
    EXPECT_TRUE(y == poisoned(n) && mean == poisoned(6) && rstd == poisoned(6));
    EXPECT_TRUE(dx == poisoned(n) && dres == poisoned(n) && dw == poisoned(6) && db == poisoned(6));
  }
}

TEST(GroupNormWorkspace, SizeQueryChecksItsArguments) {
  std::vector<float> x(2 * 6 * 5, 1.0f);
  std::vector<bf16> xb(x.size());
  const TensorView xv = view_of(x, {2, 6, 5});
  expect_error([&] { group_norm_workspace_size({4, 1e-5}, xv); },
               {"group_norm_workspace_size: num_groups = 4 must divide the number of channels C = 6"});
  expect_error([&] { group_norm_workspace_size({0, 1e-5}, xv); },
               {"group_norm_workspace_size: num_groups must be > 0, got 0"});
  expect_error([&] { group_norm_workspace_size({3, -1.0}, xv); }, {"group_norm_workspace_size: eps"});
  expect_error([&] { group_norm_workspace_size({3, 1e-5}, view_of(x, {60})); },
               {"group_norm_workspace_size: x must have rank 2 to 5"});
  expect_error([&] { group_norm_workspace_size({3, 1e-5}, TensorView(x.data(), DType(9), {2, 6, 5})); },
               {"group_norm_workspace_size: x has dtype"});
  // Shape and format only: the same size for every dtype; nothing to do for an empty x.
  EXPECT_EQ(group_norm_workspace_size({3, 1e-5}, xv),
            group_norm_workspace_size({3, 1e-5}, TensorView(xb.data(), DType::bfloat16, {2, 6, 5})));
  EXPECT_EQ(group_norm_workspace_size({3, 1e-5}, view_of(x, {0, 6, 5})), 0u);
  EXPECT_EQ(group_norm_workspace_size({3, 1e-5}, view_of(x, {2, 6, 0})), 0u);
}

// ---- epilogue and dtype argument errors ---------------------------------------------------

TEST(GroupNormSimd, EpilogueAndDtypeErrorsWriteNothing) {
  const std::vector<int64_t> dims{2, 4, 3};
  std::vector<float> x(24, 1.0f), r(24, 0.5f), y = poisoned(24), mean = poisoned(4),
                     rstd = poisoned(4), dx = poisoned(24), dres = poisoned(24);
  std::vector<bf16> rb(24), xb(24);
  const TensorView xv = view_of(x, dims), yv = view_of(y, dims), dxv = view_of(dx, dims);
  GroupNormParams params{2, 1e-5};
  params.epilogue.residual = view_of(r, {2, 4, 4});
  expect_error([&] { group_norm_forward(params, xv, {}, {}, yv, mean, rstd); },
               {"epilogue.residual shape (2, 4, 4) != x shape (2, 4, 3)"});
  params.epilogue.residual = TensorView(rb.data(), DType::bfloat16, {2, 4, 3});
  expect_error([&] { group_norm_forward(params, xv, {}, {}, yv, mean, rstd); },
               {"epilogue.residual dtype bfloat16 != x dtype float32"});
  params.epilogue.residual = view_of(r, dims, MemoryFormat::channels_last);
  expect_error([&] { group_norm_forward(params, xv, {}, {}, yv, mean, rstd); },
               {"epilogue.residual memory format channels_last"});
  params.epilogue = {};
  expect_error([&] {
    group_norm_forward(params, TensorView(xb.data(), DType::bfloat16, {2, 4, 3}), {}, {}, yv, mean, rstd);
  }, {"y dtype float32 != x dtype bfloat16"});
  expect_error([&] {
    group_norm_forward(params, TensorView(x.data(), DType(9), {2, 4, 3}), {}, {}, yv, mean, rstd);
  }, {"x has dtype"});
  EXPECT_TRUE(y == poisoned(24) && mean == poisoned(4) && rstd == poisoned(4));

  std::vector<float> m(4, 0.0f), s(4, 1.0f);
  BackwardEpilogue be;
  be.activation = Activation::relu;
  auto backward = [&] {
    group_norm_backward({params.num_groups, be}, xv, xv, m, s, {}, dxv, {}, {});
  };
  expect_error(backward, {"epilogue.y (the forward's output) is required with relu"});
  // silu: the forward's bias and residual, as long as the forward's.
  be = {.activation = Activation::silu, .bias = std::span<const float>(m).first(3)};
  expect_error(backward, {"group_norm_backward", "epilogue.bias has length 3, expected C = 4"});
  be = {.activation = Activation::silu, .residual = view_of(y, {2, 4, 2})};
  expect_error(backward, {"epilogue.residual shape (2, 4, 2) != x shape (2, 4, 3)"});
  be = {.activation = static_cast<Activation>(3)};
  expect_error(backward, {"epilogue.activation must be none, relu or silu, got 3"});
  be = {.activation = Activation::relu};
  be.y = view_of(y, {2, 4, 2});
  expect_error(backward, {"epilogue.y shape (2, 4, 2) != x shape (2, 4, 3)"});
  be.y = view_of(r, dims);
  be.dresidual = TensorView(rb.data(), DType::bfloat16, {2, 4, 3});
  expect_error(backward, {"epilogue.dresidual dtype bfloat16 != x dtype float32"});
  EXPECT_TRUE(dx == poisoned(24));
}

}  // namespace
}  // namespace normkit::test
