// A training step in which rank 1 fails in its own code while the other ranks have already
// entered synchronized BatchNorm's collective. Without help they would wait forever; with
// normkit::mpi::run_or_abort around each rank's work, the failing rank calls MPI_Abort and
// mpirun ends the whole job, printing "normkit: rank 1 of P: <message>". ctest runs it under
// a short timeout and looks for that line.
#include <mpi.h>

#include <stdexcept>
#include <vector>

#include "normkit/mpi.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  normkit::mpi::run_or_abort(MPI_COMM_WORLD, [&] {
    std::vector<float> x(4 * 3 * 5, 1.0f), y(x.size()), mean(3), invstd(3);
    if (rank == 1) throw std::runtime_error("the data loader failed (on purpose)");
    normkit::mpi::sync_batch_norm_forward_training(
        {}, normkit::TensorView(x.data(), {4, 3, 5}), {}, {},
        normkit::TensorView(y.data(), {4, 3, 5}), mean, invstd, {}, {}, MPI_COMM_WORLD);
  });
  MPI_Finalize();
  return 0;
}
