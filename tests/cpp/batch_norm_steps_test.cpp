// BatchNorm's training steps (normkit/batch_norm_steps.h): against the float64 reference on the
// whole batch and against single-process batch_norm_*; bitwise the same for every split of the
// batch into pieces (1, 2, 3, uneven, empty, shuffled), every thread count, both backends; the
// canonical merge exact at large means; every rejected argument, with nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/batch_norm_tree.h"
#include "normkit/batch_norm.h"
#include "normkit/batch_norm_steps.h"
#include "ref/batch_norm.h"
#include "batch_norm_steps_util.h"
#include "op_test_harness.h"
#include "simd_test_util.h"

namespace normkit {
namespace {

using test::Piece;
using test::pieces_of;
using test::relative_error;
using test::run_steps;
using test::SyncCase;
using test::SyncInputs;
using test::SyncResult;

std::string describe(const SyncCase& k) {
  std::string s = "shape (";
  for (std::size_t i = 0; i < k.shape.size(); ++i)
    s += (i ? "," : "") + std::to_string(k.shape[i]);
  return s + ") " + to_string(k.format) + " " + to_string(k.dtype) + (k.relu ? " relu" : "") +
         (k.residual ? " residual" : "") + (k.affine ? "" : " no-affine") +
         " offset " + std::to_string(k.offset);
}

// Odd sizes, both formats, every dtype, the epilogues; one case large enough for threads.
std::vector<SyncCase> cases() {
  std::vector<SyncCase> out;
  const std::vector<std::vector<int64_t>> shapes = {
      {7, 5, 9, 3}, {6, 3}, {9, 37, 23, 17}, {5, 11, 1}, {4, 600, 3}, {11, 2, 29}};
  int i = 0;
  for (const auto& shape : shapes)
    for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (DType d : {DType::float32, DType::bfloat16, DType::float16}) {
        SyncCase k;
        k.shape = shape;
        k.format = f;
        k.dtype = d;
        k.relu = i % 3 == 1;
        k.residual = i % 4 == 2;
        k.dresidual = i % 2 == 0;
        k.affine = i % 5 != 3;
        k.running = i % 7 != 4;
        k.offset = i % 3 == 0 ? 2.5 : 0.0;
        out.push_back(k);
        ++i;
      }
  return out;
}

// Splits of N samples: one piece, two, three, uneven, with empty pieces, and random ones.
std::vector<std::vector<int64_t>> splits(int64_t N, std::mt19937_64& rng) {
  std::vector<std::vector<int64_t>> out = {{N}, {1, N - 1}, {N - 1, 1}, {0, N}, {N, 0}};
  if (N >= 3) out.push_back({N / 3, N / 3, N - 2 * (N / 3)});
  if (N >= 4) out.push_back({2, 0, N - 3, 0, 1});
  for (int r = 0; r < 4; ++r) {
    const int pieces = std::uniform_int_distribution<int>(2, 6)(rng);
    std::vector<int64_t> cuts(std::size_t(pieces - 1));
    for (auto& c : cuts) c = std::uniform_int_distribution<int64_t>(0, N)(rng);
    std::sort(cuts.begin(), cuts.end());
    std::vector<int64_t> sizes;
    int64_t prev = 0;
    for (int64_t c : cuts) sizes.push_back(c - prev), prev = c;
    sizes.push_back(N - prev);
    out.push_back(sizes);
  }
  return out;
}

std::vector<int> shuffled_order(std::size_t n, std::mt19937_64& rng) {
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  return order;
}

TEST(BatchNormSteps, BitwiseIndependentOfSplitOrderAndThreads) {
  std::mt19937_64 rng(11);
  int seed = 0;
  for (const SyncCase& k : cases()) {
    const SyncInputs in = test::make_inputs(k, uint64_t(++seed));
    for (Backend backend : {Backend::cpu, Backend::reference}) {
      SCOPED_TRACE(describe(k) + (backend == Backend::cpu ? " cpu" : " reference"));
      const SyncResult whole = run_steps(k, in, pieces_of({k.n()}), {}, {backend, 1});
      for (const auto* v : {&whole.y, &whole.dx, &whole.mean, &whole.dweight})
        ASSERT_TRUE(std::none_of(v->begin(), v->end(), [](float e) { return std::isnan(e); }));
      int threads = 1;
      for (const auto& sizes : splits(k.n(), rng)) {
        const auto pieces = pieces_of(sizes);
        threads = threads % 3 + 1;
        const SyncResult split = run_steps(k, in, pieces, shuffled_order(pieces.size(), rng),
                                           {backend, threads});
        std::string s;
        for (int64_t z : sizes) s += std::to_string(z) + " ";
        EXPECT_TRUE(split == whole) << "split " << s << "threads " << threads;
      }
    }
  }
}

TEST(BatchNormSteps, ThreadCountsBitwise) {
  SyncCase k;
  k.shape = {13, 70, 31, 19};  // enough elements for threads in every phase
  for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
    k.format = f;
    const SyncInputs in = test::make_inputs(k, 5);
    const auto pieces = pieces_of({5, 8});
    const SyncResult one = run_steps(k, in, pieces, {}, test::cpu_ctx(1));
    for (int t : {2, 3, 4})
      EXPECT_TRUE(run_steps(k, in, pieces, {}, test::cpu_ctx(t)) == one)
          << to_string(f) << " threads " << t;
  }
}

// The float64 oracle: the reference BatchNorm on the whole batch in double.
struct Oracle {
  std::vector<double> mean, invstd, running_mean, running_var, y, dx, dresidual, dweight, dbias;
};

Oracle oracle(const SyncCase& k, const SyncInputs& in) {
  const ref::BatchNormShape sh{k.n(), k.c(), k.s(), k.format};
  const std::size_t total = in.x.size(), C = std::size_t(k.c());
  Oracle o;
  o.mean.resize(C), o.invstd.resize(C), o.y.resize(total), o.dx.resize(total);
  o.dresidual.resize(total), o.dweight.resize(C), o.dbias.resize(C);
  o.running_mean = test::to_double(in.running_mean);
  o.running_var = test::to_double(in.running_var);
  const auto x = test::to_double(in.x), dy = test::to_double(in.dy);
  const auto residual = test::to_double(in.residual);
  const auto w = test::to_double(in.weight), b = test::to_double(in.bias);
  plan::ForwardEpilogueOf<double> fe{k.relu ? Activation::relu : Activation::none, k.residual ? residual.data() : nullptr};
  ref::batch_norm_forward_training<double, double>(
      sh, k.eps, k.momentum, fe, x.data(), w.empty() ? nullptr : w.data(),
      b.empty() ? nullptr : b.data(), o.y.data(), o.mean.data(), o.invstd.data(),
      o.running_mean.empty() ? nullptr : o.running_mean.data(),
      o.running_var.empty() ? nullptr : o.running_var.data());
  plan::BackwardEpilogueOf<double> be{.activation = k.relu ? Activation::relu : Activation::none,
                                      .y = o.y.data(),
                                      .dresidual = o.dresidual.data()};
  ref::batch_norm_backward_training<double, double>(
      sh, be, dy.data(), x.data(), o.mean.data(), o.invstd.data(),
      w.empty() ? nullptr : w.data(), o.dx.data(), o.dweight.data(), o.dbias.data());
  return o;
}

// Tolerances by dtype: the outputs' rounding, plus float accumulation.
double activation_tolerance(DType d) {
  return d == DType::float32 ? 3e-5 : d == DType::float16 ? 3e-3 : 2e-2;
}

TEST(BatchNormSteps, MatchesFloat64ReferenceAndSingleProcess) {
  std::mt19937_64 rng(3);
  int seed = 100;
  for (const SyncCase& k : cases()) {
    SCOPED_TRACE(describe(k));
    const SyncInputs in = test::make_inputs(k, uint64_t(++seed));
    const Oracle o = oracle(k, in);
    const auto pieces = pieces_of(splits(k.n(), rng).back());
    const double M = double(k.n() * k.s());
    for (Backend backend : {Backend::cpu, Backend::reference}) {
      const SyncResult r = run_steps(k, in, pieces, {}, {backend, 2});
      const double tol = activation_tolerance(k.dtype);
      EXPECT_LT(relative_error(r.mean, o.mean, 1.0), 1e-6);
      EXPECT_LT(relative_error(r.invstd, o.invstd), 1e-6);
      if (k.running) {
        EXPECT_LT(relative_error(r.running_mean, o.running_mean, 1.0), 1e-6);
        EXPECT_LT(relative_error(r.running_var, o.running_var), 1e-6);
      } else {
        EXPECT_TRUE(r.running_mean.empty());
      }
      EXPECT_LT(relative_error(r.y, o.y, 1.0), tol);
      EXPECT_LT(relative_error(r.dx, o.dx, 1.0), 10 * tol);
      if (k.dresidual) {
        // dresidual is g: exact for float32, one rounding otherwise.
        EXPECT_LT(relative_error(r.dresidual, o.dresidual, 1.0), tol);
      }
      EXPECT_LT(relative_error(r.dweight, o.dweight, std::sqrt(M)), 1e-5);
      EXPECT_LT(relative_error(r.dbias, o.dbias, std::sqrt(M)), 1e-5);
    }

    // Single-process batch_norm on the same float32 batch (its own tiling: within tolerance).
    if (k.dtype != DType::float32) continue;
    const SyncResult r = run_steps(k, in, pieces, {}, test::cpu_ctx(2));
    const test::SingleProcessResult one = test::single_process_batch_norm(k, in);
    EXPECT_LT(relative_error(r.mean, test::to_double(one.mean), 1.0), 1e-6);
    EXPECT_LT(relative_error(r.invstd, test::to_double(one.invstd)), 1e-6);
    EXPECT_LT(relative_error(r.y, test::to_double(one.y), 1.0), 3e-5);
    EXPECT_LT(relative_error(r.dx, test::to_double(one.dx), 1.0), 3e-4);
    EXPECT_LT(relative_error(r.dweight, test::to_double(one.dweight), std::sqrt(M)), 1e-5);
    EXPECT_LT(relative_error(r.dbias, test::to_double(one.dbias), std::sqrt(M)), 1e-5);
  }
}

// Every SIMD target this machine has: the leaf loops of each are split-invariant and accurate.
TEST(BatchNormSteps, EveryTarget) {
  std::mt19937_64 rng(21);
  const auto all = cases();
  test::for_each_target([&] {
    int seed = 500;
    for (std::size_t i = 0; i < all.size(); i += 5) {
      const SyncCase& k = all[i];
      SCOPED_TRACE(describe(k));
      const SyncInputs in = test::make_inputs(k, uint64_t(++seed));
      const SyncResult whole = run_steps(k, in, pieces_of({k.n()}), {}, test::cpu_ctx(1));
      const auto pieces = pieces_of(splits(k.n(), rng).back());
      EXPECT_TRUE(run_steps(k, in, pieces, shuffled_order(pieces.size(), rng),
                            test::cpu_ctx(2)) == whole);
      const Oracle o = oracle(k, in);
      EXPECT_LT(relative_error(whole.invstd, o.invstd), 1e-6);
      EXPECT_LT(relative_error(whole.y, o.y, 1.0), activation_tolerance(k.dtype));
      EXPECT_LT(relative_error(whole.dx, o.dx, 1.0), 10 * activation_tolerance(k.dtype));
    }
  });
}

// At |mean| >> std the statistics stay exact: the leaves are centred sums and the merge is
// Chan's, never a sum of squares.
TEST(BatchNormSteps, LargeMeanIsExact) {
  for (double offset : {1e4, 3e4, 1e6}) {
    SyncCase k;
    k.shape = {16, 5, 10, 10};
    k.offset = offset;
    for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last}) {
      k.format = f;
      SCOPED_TRACE(describe(k));
      const SyncInputs in = test::make_inputs(k, 9);
      const Oracle o = oracle(k, in);
      const auto pieces = pieces_of({3, 0, 6, 7});
      const SyncResult r = run_steps(k, in, pieces, {3, 1, 0, 2}, test::cpu_ctx(2));
      EXPECT_LT(relative_error(r.invstd, o.invstd), 1e-5);
      // y is limited by float save_mean (a float at 1e6 is 1/16 apart), not by the statistics.
      if (offset <= 3e4) EXPECT_LT(relative_error(r.y, o.y, 1.0), 1e-3);

      // The root M2 of the reference backend's leaves (double two-pass) is exact to double
      // rounding; a sum / sum-of-squares merge of the same leaves loses (mean / std)^2 * 2^-53.
      std::vector<double> all;
      test::Activations x(k.dtype, in.x);
      for (const Piece& p : pieces) {
        const auto d = k.piece_shape(p.count);
        const TensorView v(x.at(p.offset * k.per_sample()), k.dtype, int(d.size()), d.data(), f);
        std::vector<double> part(batch_norm_partials_size(p.offset, p.count, k.c()));
        batch_norm_statistics_partials(p.offset, v, part, test::reference_ctx());
        all.insert(all.end(), part.begin(), part.end());
      }
      const auto parsed = detail::parse_partials("test", detail::PartialsKind::statistics,
                                                 k.n(), all);
      std::vector<double> mean, m2;
      detail::merge_partials(detail::PartialsKind::statistics, parsed, mean, m2);
      for (int64_t c = 0; c < k.c(); ++c) {
        long double sum = 0, squares = 0;
        for (int64_t n = 0; n < k.n(); ++n)
          for (int64_t s = 0; s < k.s(); ++s)
            sum += in.x[std::size_t(f == MemoryFormat::channels_first
                                        ? (n * k.c() + c) * k.s() + s
                                        : (n * k.s() + s) * k.c() + c)];
        const long double mu = sum / (k.n() * k.s());
        for (int64_t n = 0; n < k.n(); ++n)
          for (int64_t s = 0; s < k.s(); ++s) {
            const long double d = in.x[std::size_t(f == MemoryFormat::channels_first
                                                      ? (n * k.c() + c) * k.s() + s
                                                      : (n * k.s() + s) * k.c() + c)] - mu;
            squares += d * d;
          }
        // The same leaves merged as sum and sum of squares, in double.
        double s1 = 0, s2 = 0;
        for (int64_t n = 0; n < k.n(); ++n) {
          std::vector<double> leaf_mean(std::size_t(k.c())), leaf_m2(std::size_t(k.c()));
          const auto d = k.piece_shape(1);
          const TensorView v(x.at(n * k.per_sample()), k.dtype, int(d.size()), d.data(), f);
          ref::batch_norm_sample_statistics<float>({1, k.c(), k.s(), f}, v.as<const float>(),
                                                   leaf_mean.data(), leaf_m2.data());
          s1 += double(k.s()) * leaf_mean[std::size_t(c)];
          s2 += leaf_m2[std::size_t(c)] +
                double(k.s()) * leaf_mean[std::size_t(c)] * leaf_mean[std::size_t(c)];
        }
        const double count = double(k.n() * k.s());
        const double naive_squares = s2 - s1 * s1 / count;
        const double chan_error = std::fabs(double((m2[std::size_t(c)] - squares) / squares));
        const double naive_error = std::fabs(double((naive_squares - squares) / squares));
        EXPECT_LT(chan_error, 1e-11) << "channel " << c;
        if (offset >= 3e4) EXPECT_GT(naive_error, 1e3 * chan_error) << "channel " << c;
      }
    }
  }
}

TEST(BatchNormSteps, EmptyGlobalBatchWritesNothing) {
  SyncCase k;
  k.shape = {0, 4, 3};
  const SyncInputs in = test::make_inputs(k, 1);
  const SyncResult r = run_steps(k, in, pieces_of({0, 0}), {}, test::cpu_ctx());
  EXPECT_TRUE(std::all_of(r.mean.begin(), r.mean.end(), [](float v) { return std::isnan(v); }));
  EXPECT_TRUE(test::bitwise_equal(r.running_mean, in.running_mean));
  EXPECT_TRUE(test::bitwise_equal(r.running_var, in.running_var));
  for (float v : r.dweight) EXPECT_EQ(v, 0.0f);
  for (float v : r.dbias) EXPECT_EQ(v, 0.0f);
}

TEST(BatchNormSteps, PartialsSizeIsSmall) {
  // At most 2 * log2(n) + 2 nodes of 2 * C + 2 doubles, plus the header.
  for (int64_t offset : {0, 1, 5, 1000, 12345})
    for (int64_t n : {0, 1, 2, 7, 64, 1000, 100000}) {
      const int64_t nodes = detail::tree_node_count(offset, n);
      EXPECT_LE(nodes, n == 0 ? 0 : 2 * int64_t(std::log2(double(n))) + 2);
      EXPECT_EQ(batch_norm_partials_size(offset, n, 64), std::size_t(6 + nodes * 130));
    }
  EXPECT_EQ(batch_norm_partials_size(0, 32, 256), std::size_t(6 + 514));
}

// ---- rejected arguments: an Error naming the problem, and nothing written ----

struct Partials {
  SyncCase k;
  SyncInputs in;
  test::Activations x;
  std::vector<float> mean = test::poisoned(4), invstd = test::poisoned(4);
  std::vector<float> rm = test::poisoned(4), rv = test::poisoned(4);
  std::vector<double> sum_g = std::vector<double>(4, 7.0), sum_gx = std::vector<double>(4, 7.0);
  std::vector<float> dw = test::poisoned(4), db = test::poisoned(4);

  Partials() : k(make_case()), in(test::make_inputs(k, 2)), x(k.dtype, in.x) {}
  static SyncCase make_case() {
    SyncCase k;
    k.shape = {6, 4, 5};
    return k;
  }
  TensorView view(int64_t offset, int64_t count, int64_t channels = 4) {
    const std::vector<int64_t> d = {count, channels, 5};
    return TensorView(x.at(offset * 20), k.dtype, 3, d.data(), k.format);
  }
  std::vector<double> stats(int64_t offset, int64_t count, int64_t channels = 4) {
    std::vector<double> p(batch_norm_partials_size(offset, count, channels));
    batch_norm_statistics_partials(offset, view(offset, count, channels), p);
    return p;
  }
  std::vector<double> grads(int64_t offset, int64_t count) {
    std::vector<float> m(4, 0.0f);
    std::vector<double> p(batch_norm_partials_size(offset, count, 4));
    batch_norm_gradient_partials({}, offset, view(offset, count), view(offset, count), m, p);
    return p;
  }
  void merge(int64_t N, const std::vector<double>& all) {
    batch_norm_merge_statistics({}, N, all, mean, invstd, rm, rv);
  }
  bool untouched() const {
    for (const auto* v : {&mean, &invstd, &rm, &rv, &dw, &db})
      if (!std::all_of(v->begin(), v->end(), [](float e) { return e == test::kPoison; }))
        return false;
    return sum_g == std::vector<double>(4, 7.0) && sum_gx == std::vector<double>(4, 7.0);
  }
};

std::vector<double> cat(std::vector<std::vector<double>> parts) {
  std::vector<double> all;
  for (auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

void expect_merge_error(const std::function<void(Partials&)>& call,
                        const std::vector<std::string>& needles) {
  Partials p;
  test::expect_error([&] { call(p); }, needles);
  EXPECT_TRUE(p.untouched()) << needles.front();
}

TEST(BatchNormSteps, RejectsPiecesThatDoNotTile) {
  expect_merge_error([](Partials& p) { p.merge(6, cat({p.stats(0, 2), p.stats(3, 3)})); },
                     {"batch_norm_merge_statistics", "samples [2, 3)",
                      "global batch of 6 samples", "in no piece"});
  expect_merge_error([](Partials& p) { p.merge(6, cat({p.stats(0, 4), p.stats(2, 4)})); },
                     {"pieces overlap", "samples [2, 4)", "[0, 4)", "[2, 6)"});
  expect_merge_error([](Partials& p) { p.merge(6, cat({p.stats(3, 3), p.stats(0, 3),
                                                       p.stats(1, 1)})); },
                     {"pieces overlap", "samples [1, 2)"});
  expect_merge_error([](Partials& p) { p.merge(5, p.stats(0, 6)); },
                     {"piece [0, 6) lies beyond the end", "5 samples"});
  expect_merge_error([](Partials& p) { p.merge(6, p.stats(0, 4)); },
                     {"samples [4, 6)", "in no piece"});
  expect_merge_error([](Partials& p) { p.merge(6, {}); }, {"samples [0, 6)", "in no piece"});
  expect_merge_error([](Partials& p) { p.merge(-1, p.stats(0, 6)); },
                     {"global_batch must be in [0, 2^53], got -1"});
}

TEST(BatchNormSteps, RejectsMalformedPartials) {
  expect_merge_error([](Partials& p) { p.merge(6, cat({p.stats(0, 3, 3), p.stats(3, 3)})); },
                     {"different channel counts", "C = 3 in piece [0, 3)", "4 in piece [3, 6)"});
  expect_merge_error([](Partials& p) { p.merge(6, p.grads(0, 6)); },
                     {"partials hold gradient partials", "expected statistics partials"});
  expect_merge_error(
      [](Partials& p) {
        batch_norm_merge_gradients(6, p.stats(0, 6), p.invstd, p.sum_g, p.sum_gx, p.dw, p.db);
      },
      {"batch_norm_merge_gradients", "statistics partials", "expected gradient partials"});
  expect_merge_error(
      [](Partials& p) {
        auto all = p.stats(0, 6);
        all.pop_back();
        p.merge(6, all);
      },
      {"truncated"});
  expect_merge_error(
      [](Partials& p) {
        auto all = p.stats(0, 6);
        all.resize(3);
        p.merge(6, all);
      },
      {"inside a piece's header", "truncated"});
  expect_merge_error([](Partials& p) { p.merge(6, std::vector<double>(40, 0.0)); },
                     {"no piece header at double 0 of 40"});
  expect_merge_error(
      [](Partials& p) {
        auto all = p.stats(0, 6);
        all[3] = 0.5;  // the offset
        p.merge(6, all);
      },
      {"malformed piece header"});
}

TEST(BatchNormSteps, RejectsBadArguments) {
  // Lengths of the merge's outputs against the partials' C.
  expect_merge_error(
      [](Partials& p) {
        std::vector<float> short_mean(3);
        batch_norm_merge_statistics({}, 6, p.stats(0, 6), short_mean, p.invstd, p.rm, p.rv);
      },
      {"save_mean has length 3", "C (of the partials) = 4"});
  expect_merge_error(
      [](Partials& p) {
        batch_norm_merge_statistics({}, 6, p.stats(0, 6), p.mean, p.invstd, p.rm, {});
      },
      {"running_mean and running_var must be given together"});
  expect_merge_error(
      [](Partials& p) {
        BatchNormParams bad;
        bad.momentum = 1.5;
        batch_norm_merge_statistics(bad, 6, p.stats(0, 6), p.mean, p.invstd, p.rm, p.rv);
      },
      {"momentum must be in [0, 1], got 1.5"});
  expect_merge_error(
      [](Partials& p) {
        BatchNormParams bad;
        bad.eps = -1;
        batch_norm_merge_statistics(bad, 6, p.stats(0, 6), p.mean, p.invstd, p.rm, p.rv);
      },
      {"eps must be finite and >= 0"});
  expect_merge_error(
      [](Partials& p) {
        const std::vector<int64_t> d = {1, 4};
        std::vector<double> part(batch_norm_partials_size(0, 1, 4));
        batch_norm_statistics_partials(0, TensorView(p.x.at(0), DType::float32, 2, d.data()),
                                       part);
        p.merge(1, part);
      },
      {"Expected more than 1 value per channel when training"});
  expect_merge_error(
      [](Partials& p) {
        std::vector<double> short_sum(3);
        batch_norm_merge_gradients(6, p.grads(0, 6), p.invstd, short_sum, p.sum_gx, p.dw,
                                   p.db);
      },
      {"sum_g has length 3, expected C = 4"});

  // The local steps.
  Partials p;
  std::vector<double> part(batch_norm_partials_size(2, 3, 4), 9.0);
  const std::vector<double> fresh = part;
  test::expect_error([&] { batch_norm_statistics_partials(-1, p.view(0, 3), part); },
                     {"batch_norm_statistics_partials", "offset must be >= 0, got -1"});
  std::vector<double> wrong(part.size() + 1);
  test::expect_error([&] { batch_norm_statistics_partials(2, p.view(2, 3), wrong); },
                     {"partials has " + std::to_string(wrong.size()) + " doubles",
                      "batch_norm_partials_size(offset, N, C) = " + std::to_string(part.size())});
  test::expect_error([&] { batch_norm_statistics_partials(0, p.view(0, 4), part); },
                     {"partials has", "for offset 0, x shape (4, 4, 5)"});
  std::vector<std::byte> small(8);
  test::expect_error(
      [&] {
        batch_norm_statistics_partials(2, p.view(2, 3), part, {Backend::cpu, 1, small});
      },
      {"workspace has 8 bytes", "batch_norm_partials_workspace_size(x)"});
  std::vector<float> m3(3);
  test::expect_error(
      [&] { batch_norm_gradient_partials({}, 2, p.view(2, 3), p.view(2, 3), m3, part); },
      {"batch_norm_gradient_partials", "save_mean has length 3, expected C = 4"});
  test::expect_error(
      [&] { batch_norm_gradient_partials({}, 2, p.view(2, 2), p.view(2, 3), p.mean, part); },
      {"dy shape (2, 4, 5) != x shape (3, 4, 5)"});
  BatchNormBackwardParams relu;
  relu.epilogue.activation = Activation::relu;
  test::expect_error(
      [&] { batch_norm_gradient_partials(relu, 2, p.view(2, 3), p.view(2, 3), p.mean, part); },
      {"epilogue.y (the forward's output) is required with relu"});
  BatchNormBackwardParams silu;
  silu.epilogue.activation = Activation::silu;
  test::expect_error(
      [&] { batch_norm_gradient_partials(silu, 2, p.view(2, 3), p.view(2, 3), p.mean, part); },
      {"batch_norm_gradient_partials", "silu is not supported by the BatchNorm steps"});
  EXPECT_EQ(part, fresh);
  test::expect_error([] { batch_norm_partials_size(0, 4, 0); },
                     {"channels must be >= 1, got 0"});
  test::expect_error([] { batch_norm_partials_size(int64_t(1) << 53, 1, 4); },
                     {"exceeds 2^53"});

  // The elementwise steps.
  std::vector<float> y = test::poisoned(60), mean(4, 0.0f), invstd(4, 1.0f);
  const std::vector<int64_t> d = {3, 4, 5};
  const TensorView yv(y.data(), DType::float32, 3, d.data());
  test::expect_error(
      [&] { batch_norm_normalize({}, p.view(0, 3), {}, {}, m3, invstd, yv); },
      {"batch_norm_normalize", "mean has length 3, expected C = 4"});
  test::expect_error(
      [&] { batch_norm_normalize({}, p.view(0, 3), {}, {}, mean, {}, yv); },
      {"invstd is required"});
  test::expect_error(
      [&] { batch_norm_normalize({}, p.view(0, 2), {}, {}, mean, invstd, yv); },
      {"y shape (3, 4, 5) != x shape (2, 4, 5)"});
  std::vector<double> sums(4, 0.0), sums3(3, 0.0);
  test::expect_error(
      [&] {
        batch_norm_backward_dx({}, 2, p.view(0, 3), p.view(0, 3), mean, invstd, {}, sums, sums,
                               yv);
      },
      {"batch_norm_backward_dx", "global_batch = 2 is smaller than this piece's batch"});
  test::expect_error(
      [&] {
        batch_norm_backward_dx({}, 6, p.view(0, 3), p.view(0, 3), mean, invstd, {}, sums3, sums,
                               yv);
      },
      {"sum_g has length 3, expected C = 4"});
  test::expect_error(
      [&] {
        batch_norm_backward_dx({}, 6, p.view(0, 3), p.view(0, 3), mean, invstd, {}, sums, {},
                               yv);
      },
      {"sum_g_xmu is required"});
  EXPECT_TRUE(std::all_of(y.begin(), y.end(), [](float e) { return e == test::kPoison; }));
}

}  // namespace
}  // namespace normkit
