// Synchronized BatchNorm through the installed MPI component, on however many ranks it runs.
#include <cmath>
#include <cstdio>
#include <vector>

#include "normkit/mpi.h"

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // Rank r holds the samples {r, r + 10}: the global mean is the mean over ranks.
  std::vector<float> x = {float(rank), float(rank + 10)}, y(2), mean(1), invstd(1);
  bool ok = false;
  normkit::mpi::run_or_abort(MPI_COMM_WORLD, [&] {
    normkit::mpi::sync_batch_norm_forward_training({}, normkit::TensorView(x.data(), {2, 1}), {},
                                                   {}, normkit::TensorView(y.data(), {2, 1}),
                                                   mean, invstd, {}, {}, MPI_COMM_WORLD);
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    ok = std::fabs(mean[0] - (float(size - 1) / 2 + 5)) < 1e-5f;
  });
  if (rank == 0) std::printf("consumer_mpi: %s\n", ok ? "ok" : "WRONG");
  MPI_Finalize();
  return ok ? 0 : 1;
}
