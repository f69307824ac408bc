// normkit::mpi (normkit/mpi.h): batch_norm_steps.h's steps with two MPI collectives in between.
// Every argument is checked on every rank before the first collective, and the outcome travels
// in it, so an argument error anywhere makes every rank throw from the same call instead of
// leaving the others waiting.
#include "normkit/mpi.h"

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "api/batch_norm_checks.h"
#include "common/validate.h"
#include "normkit/error.h"

namespace normkit::mpi {
namespace {

using detail::fail;

// What every rank tells the others first: its piece and whether its arguments passed.
struct RankHeader {
  int64_t count = 0, channels = 0, spatial = 0, ok = 1;
};

// Bytes of a rank's message in the error path's exchange.
constexpr int kMessageBytes = 512;

void check_mpi(const char* fn, int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  fail(fn, std::string(what) + " failed: " + std::string(text, std::size_t(length)));
}

struct World {
  int rank = 0, size = 1;
};

World world_of(const char* fn, MPI_Comm comm) {
  World w;
  check_mpi(fn, MPI_Comm_rank(comm, &w.rank), "MPI_Comm_rank");
  check_mpi(fn, MPI_Comm_size(comm, &w.size), "MPI_Comm_size");
  return w;
}

// The pieces of all ranks, in rank order, after the first collective.
struct Pieces {
  World world;
  std::vector<RankHeader> headers;
  int64_t offset = 0;        // this rank's first sample
  int64_t global_batch = 0;  // N
  int64_t channels = 0, spatial = 0;
};

// Collective 1: every rank's header. Throws the same kind of Error on every rank when any rank
// failed its checks (`local_error` holds this rank's message, empty when it passed) or when the
// pieces do not fit together; on an error one more allgather carries the messages, so that
// every rank can say which rank failed and why.
Pieces exchange_headers(const char* fn, MPI_Comm comm, const RankHeader& mine,
                        const std::string& local_error) {
  Pieces p;
  p.world = world_of(fn, comm);
  p.headers.resize(std::size_t(p.world.size));
  check_mpi(fn,
            MPI_Allgather(&mine, 4, MPI_INT64_T, p.headers.data(), 4, MPI_INT64_T, comm),
            "MPI_Allgather of the ranks' headers");
  int failed = -1;
  for (int r = 0; r < p.world.size && failed < 0; ++r)
    if (!p.headers[std::size_t(r)].ok) failed = r;
  if (failed >= 0) {
    std::vector<char> messages(std::size_t(p.world.size) * kMessageBytes);
    char own[kMessageBytes] = {};
    std::strncpy(own, local_error.c_str(), kMessageBytes - 1);
    check_mpi(fn,
              MPI_Allgather(own, kMessageBytes, MPI_CHAR, messages.data(), kMessageBytes,
                            MPI_CHAR, comm),
              "MPI_Allgather of the ranks' errors");
    if (!local_error.empty()) throw Error(local_error);
    const char* theirs = messages.data() + std::size_t(failed) * kMessageBytes;
    fail(fn, "rank " + std::to_string(failed) + " of " + std::to_string(p.world.size) +
                 " rejected its arguments, so no rank computed anything: " +
                 std::string(theirs, strnlen(theirs, kMessageBytes)));
  }

  // Global conditions: the same headers on every rank give the same verdict everywhere.
  const RankHeader& first = p.headers.front();
  for (int r = 1; r < p.world.size; ++r) {
    const RankHeader& h = p.headers[std::size_t(r)];
    if (h.channels != first.channels)
      fail(fn, "channel counts differ between ranks: C = " + std::to_string(first.channels) +
                   " on rank 0, C = " + std::to_string(h.channels) + " on rank " +
                   std::to_string(r));
    if (h.spatial != first.spatial)
      fail(fn, "spatial sizes differ between ranks: S = " + std::to_string(first.spatial) +
                   " on rank 0, S = " + std::to_string(h.spatial) + " on rank " +
                   std::to_string(r));
  }
  for (int r = 0; r < p.world.size; ++r) {
    if (r == p.world.rank) p.offset = p.global_batch;
    const int64_t count = p.headers[std::size_t(r)].count;
    if (count > (int64_t(1) << 53) - p.global_batch)
      fail(fn, "the ranks' samples add up beyond 2^53");
    p.global_batch += count;
  }
  p.channels = first.channels;
  p.spatial = first.spatial;
  return p;
}

RankHeader header_of(const TensorView& x) {
  RankHeader h;
  h.count = x.batch();
  h.channels = x.channels();
  h.spatial = x.spatial_size();
  return h;
}

// Collective 2 (and the size exchange of allgather_partials): the ranks' buffers of the given
// sizes, concatenated in rank order. MPI counts are int: a size beyond that is an Error on every
// rank (every rank knows every size) before any data moves.
std::vector<double> allgather_sized(const char* fn, MPI_Comm comm, std::span<const double> local,
                                    const std::vector<int64_t>& sizes) {
  std::vector<int> counts(sizes.size()), displacements(sizes.size());
  int64_t total = 0;
  for (std::size_t r = 0; r < sizes.size(); ++r) {
    if (sizes[r] > INT_MAX || total > INT_MAX - sizes[r])
      fail(fn, "the ranks' partials (" + std::to_string(total + sizes[r]) +
                   " doubles so far) exceed the int counts of MPI_Allgatherv");
    counts[r] = int(sizes[r]);
    displacements[r] = int(total);
    total += sizes[r];
  }
  std::vector<double> all(static_cast<std::size_t>(total));
  check_mpi(fn,
            MPI_Allgatherv(local.data(), int(local.size()), MPI_DOUBLE, all.data(),
                           counts.data(), displacements.data(), MPI_DOUBLE, comm),
            "MPI_Allgatherv of the partials");
  return all;
}

// Collective 2 for the sync functions: the sizes follow from the headers.
std::vector<double> allgather_pieces(const char* fn, MPI_Comm comm, const Pieces& p,
                                     std::span<const double> local) {
  std::vector<int64_t> sizes;
  int64_t offset = 0;
  for (const RankHeader& h : p.headers) {
    sizes.push_back(int64_t(batch_norm_partials_size(offset, h.count, p.channels)));
    offset += h.count;
  }
  return allgather_sized(fn, comm, local, sizes);
}

// The steps' own calls get no workspace: theirs is sized differently, and a too-small one
// would throw after the first collective, on one rank only.
Context without_workspace(const Context& ctx) {
  Context c = ctx;
  c.workspace = {};
  return c;
}

}  // namespace

void sync_batch_norm_forward_training(const BatchNormParams& params, const TensorView& x,
                                      std::span<const float> weight, std::span<const float> bias,
                                      const TensorView& y, std::span<float> save_mean,
                                      std::span<float> save_invstd,
                                      std::span<float> running_mean,
                                      std::span<float> running_var, MPI_Comm comm,
                                      const Context& ctx) {
  const char* fn = "sync_batch_norm_forward_training";
  std::string local_error;
  try {  // batch_norm_forward_training's checks, but the global one-value check
    detail::check_batch_norm_input(fn, x, weight, bias);
    if (x.channels() < 1) fail(fn, "x must have at least one channel, got shape " + shape_string(x));
    detail::check_like(fn, "y", y, "x", x);
    detail::check_forward_epilogue(fn, params.epilogue, x);
    detail::check_steps_activation(fn, params.epilogue.activation);
    detail::check_length(fn, "save_mean", save_mean, x.channels(), "C", true);
    detail::check_length(fn, "save_invstd", save_invstd, x.channels(), "C", true);
    detail::check_running_stats(fn, x.channels(), running_mean, running_var, false);
    detail::check_eps(fn, params.eps);
    detail::check_momentum(fn, params.momentum);
    detail::plan_call(fn, x, ctx);
  } catch (const Error& e) {
    local_error = e.what();
  }
  RankHeader mine = local_error.empty() ? header_of(x) : RankHeader{};
  mine.ok = local_error.empty();
  const Pieces p = exchange_headers(fn, comm, mine, local_error);
  if (double(p.global_batch) * double(p.spatial) == 1)
    detail::fail_one_value_per_channel(
        fn, "a global batch of 1 sample of 1 value per channel over " +
                std::to_string(p.world.size) + " ranks");

  const Context local = without_workspace(ctx);
  std::vector<double> partials(batch_norm_partials_size(p.offset, x.batch(), x.channels()));
  batch_norm_statistics_partials(p.offset, x, partials, local);
  const std::vector<double> all = allgather_pieces(fn, comm, p, partials);
  batch_norm_merge_statistics(params, p.global_batch, all, save_mean, save_invstd, running_mean,
                              running_var);
  batch_norm_normalize(params, x, weight, bias, save_mean, save_invstd, y, ctx);
}

void sync_batch_norm_forward_inference(const BatchNormParams& params, const TensorView& x,
                                       std::span<const float> weight,
                                       std::span<const float> bias,
                                       std::span<const float> running_mean,
                                       std::span<const float> running_var, const TensorView& y,
                                       MPI_Comm, const Context& ctx) {
  batch_norm_forward_inference(params, x, weight, bias, running_mean, running_var, y, ctx);
}

void sync_batch_norm_backward_training(const BatchNormBackwardParams& params,
                                       const TensorView& dy, const TensorView& x,
                                       std::span<const float> save_mean,
                                       std::span<const float> save_invstd,
                                       std::span<const float> weight, const TensorView& dx,
                                       std::span<float> dweight, std::span<float> dbias,
                                       MPI_Comm comm, const Context& ctx) {
  const char* fn = "sync_batch_norm_backward_training";
  std::string local_error;
  try {  // batch_norm_backward_training's checks
    detail::check_batch_norm_input(fn, x, weight, {});
    if (x.channels() < 1) fail(fn, "x must have at least one channel, got shape " + shape_string(x));
    detail::check_like(fn, "dy", dy, "x", x);
    detail::check_like(fn, "dx", dx, "x", x);
    detail::check_backward_epilogue(fn, params.epilogue, x, x.channels(), "C");
    detail::check_steps_activation(fn, params.epilogue.activation);
    detail::check_length(fn, "dweight", dweight, x.channels(), "C", false);
    detail::check_length(fn, "dbias", dbias, x.channels(), "C", false);
    detail::check_length(fn, "save_mean", save_mean, x.channels(), "C", true);
    detail::check_length(fn, "save_invstd", save_invstd, x.channels(), "C", true);
    detail::plan_call(fn, x, ctx);
  } catch (const Error& e) {
    local_error = e.what();
  }
  RankHeader mine = local_error.empty() ? header_of(x) : RankHeader{};
  mine.ok = local_error.empty();
  const Pieces p = exchange_headers(fn, comm, mine, local_error);

  const Context local = without_workspace(ctx);
  std::vector<double> partials(batch_norm_partials_size(p.offset, x.batch(), x.channels()));
  batch_norm_gradient_partials(params, p.offset, dy, x, save_mean, partials, local);
  const std::vector<double> all = allgather_pieces(fn, comm, p, partials);
  const std::size_t C = std::size_t(x.channels());
  std::vector<double> sum_g(C), sum_g_xmu(C);
  batch_norm_merge_gradients(p.global_batch, all, save_invstd, sum_g, sum_g_xmu, dweight, dbias);
  batch_norm_backward_dx(params, p.global_batch, dy, x, save_mean, save_invstd, weight, sum_g,
                         sum_g_xmu, dx, ctx);
}

void reject_call(const std::string& message, MPI_Comm comm) {
  RankHeader rejected;
  rejected.ok = 0;
  exchange_headers("reject_call", comm, rejected, message.empty() ? "rejected" : message);
  throw Error(message);  // not reached: exchange_headers throws this rank's message
}

std::vector<double> allgather_partials(std::span<const double> local, MPI_Comm comm) {
  const char* fn = "allgather_partials";
  const World w = world_of(fn, comm);
  std::vector<int64_t> sizes(std::size_t(w.size));
  const int64_t mine = int64_t(local.size());
  check_mpi(fn, MPI_Allgather(&mine, 1, MPI_INT64_T, sizes.data(), 1, MPI_INT64_T, comm),
            "MPI_Allgather of the sizes");
  return allgather_sized(fn, comm, local, sizes);
}

void abort_job(MPI_Comm comm, const char* message) {
  int initialized = 0, finalized = 0, rank = -1, size = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) {
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
  }
  std::fprintf(stderr, "normkit: rank %d of %d: %s\n", rank, size, message);
  std::fflush(stderr);
  if (initialized && !finalized) MPI_Abort(comm, 1);
  std::abort();  // MPI_Abort does not return; without MPI, end this process at least
}

}  // namespace normkit::mpi
