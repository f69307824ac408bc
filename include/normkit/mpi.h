#pragma once
// normkit::mpi: synchronized BatchNorm over an MPI communicator (the optional `mpi` component:
// library normkit::normkit_mpi, find_package(normkit COMPONENTS mpi); the core library has no
// MPI dependency).
//
// Each rank passes its local x; rank r's samples are the r-th contiguous piece of the global
// batch, in rank order (a rank may hold zero samples, and the counts may differ). The functions
// are batch_norm_steps.h's steps with the exchange in between, so every result (save_mean,
// save_invstd, running statistics, y, dx, dweight, dbias) is bitwise identical for any number
// of ranks and any split of the same global batch, and for any thread count.
//
// Communication, per training forward and per training backward: two collectives on comm.
//   1. MPI_Allgather of a small header per rank (its sample count, channels, spatial size, and
//      whether its arguments passed validation);
//   2. MPI_Allgatherv of the packed partials (batch_norm_partials_size(offset, n, C) doubles
//      per rank: about 2 * log2(n) + 2 tree nodes of 2 * C + 2 doubles each).
// The inference forward communicates nothing.
//
// Errors. Every call is collective: all ranks of comm must call it with the same params.
// - An argument error detected on one rank (a bad length, a shape unlike x's, ...) is
//   exchanged in the header, so every rank throws normkit::Error from the same call: the
//   offending rank with its own message, the others with one naming that rank. No rank is
//   left waiting.
// - Global conditions (channel counts or spatial sizes that differ between ranks, a global
//   batch of one value per channel) are detected from the exchanged headers and thrown
//   identically on every rank.
// - An MPI failure throws normkit::Error with MPI's error string (comm's error handler must
//   then be MPI_ERRORS_RETURN; with the default MPI_ERRORS_ARE_FATAL, MPI aborts the job).
// - Anything a rank throws OUTSIDE these calls (its own code, I/O, a normkit::Error it does
//   not share) leaves the other ranks blocked in their next collective. A program must then
//   end the job: catch the exception and call MPI_Abort, as run_or_abort below does; mpirun
//   then stops every rank within seconds.
#include <mpi.h>

#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "normkit/batch_norm.h"
#include "normkit/batch_norm_steps.h"
#include "normkit/context.h"
#include "normkit/tensor.h"

namespace normkit::mpi {

// batch_norm_forward_training (batch_norm.h) over the global batch formed by the ranks' x.
// Same arguments, reads and writes as the single-process function, with the statistics of the
// global batch; plus comm. Every rank gets the same save_mean, save_invstd and running
// statistics. Throws as described above; a rank with x.batch() == 0 still takes part.
void sync_batch_norm_forward_training(const BatchNormParams& params, const TensorView& x,
                                      std::span<const float> weight, std::span<const float> bias,
                                      const TensorView& y, std::span<float> save_mean,
                                      std::span<float> save_invstd,
                                      std::span<float> running_mean,
                                      std::span<float> running_var, MPI_Comm comm,
                                      const Context& ctx = {});

// batch_norm_forward_inference on the local x: the running statistics are the same on every
// rank, so nothing is communicated (comm is not used; it is there so that the three functions
// take the same arguments).
void sync_batch_norm_forward_inference(const BatchNormParams& params, const TensorView& x,
                                       std::span<const float> weight,
                                       std::span<const float> bias,
                                       std::span<const float> running_mean,
                                       std::span<const float> running_var, const TensorView& y,
                                       MPI_Comm comm, const Context& ctx = {});

// batch_norm_backward_training over the global batch: save_mean and save_invstd are those of
// sync_batch_norm_forward_training on the same comm. Overwrites the local dx and
// epilogue.dresidual, and dweight and dbias with the sums over the GLOBAL batch (identical on
// every rank; unlike torch.nn.SyncBatchNorm's local parts, they must not be all-reduced again).
void sync_batch_norm_backward_training(const BatchNormBackwardParams& params,
                                       const TensorView& dy, const TensorView& x,
                                       std::span<const float> save_mean,
                                       std::span<const float> save_invstd,
                                       std::span<const float> weight, const TensorView& dx,
                                       std::span<float> dweight, std::span<float> dbias,
                                       MPI_Comm comm, const Context& ctx = {});

// The building block for callers with several pieces per rank (logical devices): returns the
// concatenation, in rank order, of every rank's `local` buffer (each may itself be the
// concatenation of several pieces' packed partials, and may be empty). Collective: one
// MPI_Allgather of the sizes (8 bytes per rank), one MPI_Allgatherv of the data. The result can
// go straight to batch_norm_merge_statistics / batch_norm_merge_gradients.
// Throws normkit::Error on an MPI failure (see above) or a total beyond the address space.
std::vector<double> allgather_partials(std::span<const double> local, MPI_Comm comm);

// For wrappers that check arguments of their own before calling sync_batch_norm_forward_training
// or sync_batch_norm_backward_training (the Python bindings do): stands in for that call on a
// rank whose arguments were rejected with `message`. Collective like the call it replaces: the
// other ranks' calls throw normkit::Error naming this rank and the message, and this one throws
// normkit::Error(message).
[[noreturn]] void reject_call(const std::string& message, MPI_Comm comm);

// Writes "normkit: rank R of P: <message>" to stderr and calls MPI_Abort(comm, 1), which ends
// every process of the job.
[[noreturn]] void abort_job(MPI_Comm comm, const char* message);

// Runs body(); if it throws, ends the whole job with abort_job and the exception's message, so
// that no other rank waits forever in a collective. Use it around each rank's work:
//   int main(int argc, char** argv) {
//     MPI_Init(&argc, &argv);
//     normkit::mpi::run_or_abort(MPI_COMM_WORLD, [&] { train(); });
//     MPI_Finalize();
//   }
template <class Body>
void run_or_abort(MPI_Comm comm, Body&& body) {
  try {
    std::forward<Body>(body)();
  } catch (const std::exception& e) {
    abort_job(comm, e.what());
  } catch (...) {
    abort_job(comm, "unknown exception");
  }
}

}  // namespace normkit::mpi
