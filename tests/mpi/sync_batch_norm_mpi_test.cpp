// normkit::mpi under mpirun (ctest runs it on 1, 2 and 3 ranks). Every rank builds the same
// global batch; rank r passes its contiguous piece. Each result must equal, bitwise, the steps
// run over the whole batch as one piece in this process (so results are bitwise the same for
// any number of ranks), and single-process batch_norm within tolerance; splits even, uneven and
// with a rank holding no sample; errors thrown on every rank, never a hang.
#include <gtest/gtest.h>

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "normkit/batch_norm.h"
#include "normkit/batch_norm_steps.h"
#include "normkit/mpi.h"
#include "batch_norm_steps_util.h"
#include "op_test_harness.h"

namespace normkit {
namespace {

using test::Piece;
using test::SyncCase;
using test::SyncInputs;
using test::SyncResult;

int rank_of() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int size_of() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

enum class Split { even, uneven, rank_without_samples };

// The ranks' sample counts for N samples.
std::vector<int64_t> counts(int64_t N, int P, Split how) {
  std::vector<int64_t> c(std::size_t(P), 0);
  if (how == Split::even) {
    for (int r = 0; r < P; ++r) c[std::size_t(r)] = N / P + (r < N % P ? 1 : 0);
  } else if (how == Split::uneven) {  // weights 1, 3, 2, 1, 3, 2, ...
    std::vector<int64_t> w(static_cast<std::size_t>(P));
    for (int r = 0; r < P; ++r) w[std::size_t(r)] = std::array<int64_t, 3>{1, 3, 2}[r % 3];
    const int64_t total = std::accumulate(w.begin(), w.end(), int64_t(0));
    int64_t given = 0;
    for (int r = 0; r < P; ++r) given += c[std::size_t(r)] = N * w[std::size_t(r)] / total;
    c.back() += N - given;
  } else {  // the middle rank (or the only one's neighbour) holds none
    const int empty = P / 2;
    int64_t given = 0;
    for (int r = 0; r < P; ++r)
      if (r != empty) given += c[std::size_t(r)] = N / std::max(P - 1, 1);
    c[std::size_t(P == 1 ? 0 : (empty == 0 ? 1 : 0))] += N - given;
  }
  return c;
}

struct RankResult {
  std::vector<float> mean, invstd, running_mean, running_var, y, dx, dweight, dbias;
};

// The sync functions on this rank's piece of the global batch.
RankResult run_sync(const SyncCase& k, const SyncInputs& in, const Piece& mine) {
  const int64_t per = k.per_sample(), C = k.c();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const auto slice = [&](const std::vector<float>& v) {
    return v.empty() ? v
                     : std::vector<float>(v.begin() + mine.offset * per,
                                          v.begin() + (mine.offset + mine.count) * per);
  };
  test::Activations x(k.dtype, slice(in.x)), dy(k.dtype, slice(in.dy)),
      residual(k.dtype, slice(in.residual));
  const std::size_t n = std::size_t(mine.count * per);
  test::Activations y(k.dtype, n, nan), dx(k.dtype, n, nan);
  const std::vector<int64_t> d = k.piece_shape(mine.count);
  const auto view = [&](test::Activations& a) {
    return TensorView(a.at(0), k.dtype, int(d.size()), d.data(), k.format);
  };
  RankResult r;
  r.mean.assign(std::size_t(C), nan);
  r.invstd.assign(std::size_t(C), nan);
  r.dweight.assign(std::size_t(C), nan);
  r.dbias.assign(std::size_t(C), nan);
  r.running_mean = in.running_mean;
  r.running_var = in.running_var;
  BatchNormParams p;
  p.eps = k.eps;
  p.momentum = k.momentum;
  p.epilogue.activation = k.relu ? Activation::relu : Activation::none;
  if (k.residual) p.epilogue.residual = view(residual);
  mpi::sync_batch_norm_forward_training(p, view(x), test::opt(in.weight), test::opt(in.bias),
                                        view(y), r.mean, r.invstd, test::opt(r.running_mean),
                                        test::opt(r.running_var), MPI_COMM_WORLD);
  BatchNormBackwardParams bp;
  bp.epilogue.activation = k.relu ? Activation::relu : Activation::none;
  if (k.relu) bp.epilogue.y = view(y);
  mpi::sync_batch_norm_backward_training(bp, view(dy), view(x), r.mean, r.invstd,
                                         test::opt(in.weight), view(dx), r.dweight, r.dbias,
                                         MPI_COMM_WORLD);
  r.y = y.values();
  r.dx = dx.values();
  return r;
}

std::vector<SyncCase> cases() {
  std::vector<SyncCase> out;
  const std::vector<std::vector<int64_t>> shapes = {{13, 5, 7, 3}, {9, 3}, {10, 37, 23, 17}};
  int i = 0;
  for (const auto& shape : shapes)
    for (MemoryFormat f : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (DType d : {DType::float32, DType::float16}) {
        SyncCase k;
        k.shape = shape;
        k.format = f;
        k.dtype = d;
        k.relu = i % 2 == 1;
        k.residual = i % 3 == 0;
        k.offset = i % 4 == 0 ? 100.0 : 0.0;
        out.push_back(k);
        ++i;
      }
  return out;
}

TEST(SyncBatchNormMpi, BitwiseEqualToOnePieceForEverySplit) {
  const int P = size_of(), me = rank_of();
  int seed = 0;
  for (const SyncCase& k : cases())
    for (Split how : {Split::even, Split::uneven, Split::rank_without_samples}) {
      const auto c = counts(k.n(), P, how);
      SCOPED_TRACE("rank " + std::to_string(me) + " of " + std::to_string(P) + ", split " +
                   std::to_string(int(how)) + ", case " + std::to_string(seed));
      const SyncInputs in = test::make_inputs(k, uint64_t(++seed));
      const SyncResult whole = test::run_steps(k, in, test::pieces_of({k.n()}), {},
                                               test::cpu_ctx(1));
      const auto pieces = test::pieces_of(c);
      const Piece mine = pieces[std::size_t(me)];
      const RankResult r = run_sync(k, in, mine);
      const int64_t per = k.per_sample();
      const auto slice = [&](const std::vector<float>& v) {
        return std::vector<float>(v.begin() + mine.offset * per,
                                  v.begin() + (mine.offset + mine.count) * per);
      };
      EXPECT_TRUE(test::bitwise_equal(r.mean, whole.mean));
      EXPECT_TRUE(test::bitwise_equal(r.invstd, whole.invstd));
      EXPECT_TRUE(test::bitwise_equal(r.running_mean, whole.running_mean));
      EXPECT_TRUE(test::bitwise_equal(r.running_var, whole.running_var));
      EXPECT_TRUE(test::bitwise_equal(r.y, slice(whole.y)));
      EXPECT_TRUE(test::bitwise_equal(r.dx, slice(whole.dx)));
      EXPECT_TRUE(test::bitwise_equal(r.dweight, whole.dweight));
      EXPECT_TRUE(test::bitwise_equal(r.dbias, whole.dbias));

      // Single-process BatchNorm on the whole float32 batch: the same within float tolerance.
      if (k.dtype != DType::float32) continue;
      const test::SingleProcessResult one = test::single_process_batch_norm(k, in);
      const double M = double(k.n() * k.s());
      EXPECT_LT(test::relative_error(r.mean, test::to_double(one.mean), 1.0), 1e-6);
      EXPECT_LT(test::relative_error(r.invstd, test::to_double(one.invstd)), 1e-6);
      EXPECT_LT(test::relative_error(r.running_var, test::to_double(one.running_var)), 1e-6);
      EXPECT_LT(test::relative_error(r.y, test::to_double(slice(one.y)), 1.0), 3e-5);
      EXPECT_LT(test::relative_error(r.dx, test::to_double(slice(one.dx)), 1.0), 3e-4);
      EXPECT_LT(test::relative_error(r.dweight, test::to_double(one.dweight), std::sqrt(M)),
                1e-5);
      EXPECT_LT(test::relative_error(r.dbias, test::to_double(one.dbias), std::sqrt(M)), 1e-5);
    }
}

// Several pieces per rank (logical devices): each rank packs its pieces, allgather_partials
// concatenates every rank's buffer, and the merge gives the same bits.
TEST(SyncBatchNormMpi, AllgatherPartialsWithSeveralPiecesPerRank) {
  const int P = size_of(), me = rank_of();
  SyncCase k;
  k.shape = {17, 6, 5, 4};
  const SyncInputs in = test::make_inputs(k, 77);
  const SyncResult whole =
      test::run_steps(k, in, test::pieces_of({k.n()}), {}, test::cpu_ctx(1));
  const auto ranks = test::pieces_of(counts(k.n(), P, Split::uneven));
  const Piece mine = ranks[std::size_t(me)];
  // Two logical devices on this rank: the first takes a third of its samples.
  const std::vector<Piece> devices = {{mine.offset, mine.count / 3},
                                      {mine.offset + mine.count / 3, mine.count - mine.count / 3}};
  test::Activations x(k.dtype, in.x);
  std::vector<double> local;
  for (const Piece& d : devices) {
    const auto dims = k.piece_shape(d.count);
    std::vector<double> part(batch_norm_partials_size(d.offset, d.count, k.c()));
    batch_norm_statistics_partials(
        d.offset, TensorView(x.at(d.offset * k.per_sample()), k.dtype, int(dims.size()),
                             dims.data(), k.format),
        part);
    local.insert(local.end(), part.begin(), part.end());
  }
  const std::vector<double> all = mpi::allgather_partials(local, MPI_COMM_WORLD);
  std::vector<float> mean(6), invstd(6), rm = in.running_mean, rv = in.running_var;
  batch_norm_merge_statistics({}, k.n(), all, mean, invstd, rm, rv);
  EXPECT_TRUE(test::bitwise_equal(mean, whole.mean));
  EXPECT_TRUE(test::bitwise_equal(invstd, whole.invstd));
  EXPECT_TRUE(test::bitwise_equal(rv, whole.running_var));
}

// Errors: every rank throws from the same call, nothing is written, and the communicator
// stays usable.
TEST(SyncBatchNormMpi, ErrorsAreThrownOnEveryRank) {
  const int P = size_of(), me = rank_of();
  const int64_t C = 4;
  std::vector<float> x(3 * 5 * 5, 1.5f), y(x.size()), weight(C, 1.0f), short_weight(C - 1);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(i % 7) + float(me);
  std::vector<float> mean = test::poisoned(C), invstd = test::poisoned(C);
  const TensorView xv(x.data(), {3, C, 5}), yv(y.data(), {3, C, 5});

  // One rank's bad argument: that rank says what, the others name it.
  const int bad = P - 1;
  test::expect_error(
      [&] {
        mpi::sync_batch_norm_forward_training({}, xv, me == bad ? short_weight : weight, {}, yv,
                                              mean, invstd, {}, {}, MPI_COMM_WORLD);
      },
      me == bad ? std::vector<std::string>{"sync_batch_norm_forward_training",
                                           "weight has length 3, expected C = 4"}
                : std::vector<std::string>{"rank " + std::to_string(bad) + " of " +
                                               std::to_string(P) + " rejected its arguments",
                                           "weight has length 3, expected C = 4"});
  EXPECT_EQ(mean, test::poisoned(C));

  // Channel counts that differ between ranks: the same message everywhere.
  if (P > 1) {
    std::vector<float> x5(3 * 5 * 5, 1.0f), y5(x5.size()), m5 = test::poisoned(5),
        s5 = test::poisoned(5);
    const bool odd = me == 1;
    test::expect_error(
        [&] {
          mpi::sync_batch_norm_forward_training(
              {}, odd ? TensorView(x5.data(), {3, 5, 5}) : xv, {}, {},
              odd ? TensorView(y5.data(), {3, 5, 5}) : yv, odd ? m5 : mean, odd ? s5 : invstd,
              {}, {}, MPI_COMM_WORLD);
        },
        {"channel counts differ between ranks: C = 4 on rank 0, C = 5 on rank 1"});
    EXPECT_EQ(mean, test::poisoned(C));
  }

  // One value per channel over the whole world: torch's message on every rank.
  std::vector<float> one(C, 2.0f), out(C);
  test::expect_error(
      [&] {
        mpi::sync_batch_norm_forward_training(
            {}, TensorView(one.data(), {me == 0 ? 1 : 0, C}), {}, {},
            TensorView(out.data(), {me == 0 ? 1 : 0, C}), mean, invstd, {}, {}, MPI_COMM_WORLD);
      },
      {"Expected more than 1 value per channel when training"});

  // The backward's checks travel the same way.
  std::vector<float> dx(x.size());
  test::expect_error(
      [&] {
        mpi::sync_batch_norm_backward_training(
            {}, me == bad ? TensorView(y.data(), {2, C, 5}) : yv, xv, weight, weight, {},
            TensorView(dx.data(), {3, C, 5}), {}, {}, MPI_COMM_WORLD);
      },
      {"dy shape (2, 4, 5) != x shape (3, 4, 5)"});

  // And after all that, a good call still works on every rank.
  mpi::sync_batch_norm_forward_training({}, xv, weight, {}, yv, mean, invstd, {}, {},
                                        MPI_COMM_WORLD);
  EXPECT_FALSE(test::contains_poison(mean));
}

}  // namespace
}  // namespace normkit

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any;
}
