#pragma once
// The processes of one training run: one, or P started by an MPI launcher (mpirun -np P). With
// P > 1 the run's K logical devices are split into P runs of K / P consecutive devices; every
// process trains the same model and exchanges, each step, what its devices computed (trainer.h).
//
// MPI is optional at build time (NORMKIT_TRAIN_WITH_MPI): without it, a process that a launcher
// started as one of several refuses to run (start() throws), since P copies that do not talk
// to each other would each train the whole run and overwrite each other's outputs. MPI is
// started only when a launcher announces more than one process, so an ordinary run, the
// golden-bits runs and a sweep's children never touch it.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace normkit::train::dist {

// Whether this build of normkit-train can run as several processes.
bool built_with_mpi();

// The process count a launcher announced in the environment (Open MPI's OMPI_COMM_WORLD_SIZE,
// MPICH's PMI_SIZE, PMIx's PMIX_SIZE), 1 when none did.
int launcher_size();

// Starts MPI when launcher_size() > 1. Throws normkit::Error saying what to change when the
// build has no MPI. Call once, before any other function here.
void start(int* argc, char*** argv);
// Ends MPI when start() started it (after every process's last exchange).
void finish();

int rank();   // 0 when not started
int size();   // 1 when not started

// Every process's `bytes` bytes (the same count on each), concatenated in rank order into
// `out` (size() * bytes bytes) on every process. With one process, a copy.
void allgather(const void* in, size_t bytes, void* out);
// Every process's doubles (any count on each, 0 included), concatenated in rank order.
std::vector<double> allgather_doubles(const std::vector<double>& in);
// Rank `root`'s `bytes` bytes into `data` on every process.
void broadcast(void* data, size_t bytes, int root);

// Ends every process of the job at once with `code` (MPI_Abort when started, else exit): the
// error path of a process whose peers may be waiting in an exchange for it.
[[noreturn]] void abort_job(int code);

// For the failure tests only: NORMKIT_TRAIN_TEST_FAIL=RANK:STEP[:kill] makes process RANK
// throw (or SIGKILL itself) when it reaches global step STEP. Does nothing otherwise.
void test_failure_point(int64_t global_step);

}  // namespace normkit::train::dist
