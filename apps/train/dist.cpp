#include "dist.h"

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "normkit/error.h"

#ifdef NORMKIT_TRAIN_WITH_MPI
#include <mpi.h>
#endif

namespace normkit::train::dist {
namespace {
bool g_started = false;
int g_rank = 0, g_size = 1;

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  return std::atoi(v);
}

#ifdef NORMKIT_TRAIN_WITH_MPI
// MPI's error path: an exchange that fails ends the job rather than returning into a loop that
// would wait for peers forever.
void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw Error(std::string(what) + " failed on rank " + std::to_string(g_rank) + ": " +
              std::string(text, static_cast<size_t>(len)));
}
#endif
}  // namespace

bool built_with_mpi() {
#ifdef NORMKIT_TRAIN_WITH_MPI
  return true;
#else
  return false;
#endif
}

int launcher_size() {
  for (const char* name : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"})
    if (const int n = env_int(name); n > 0) return n;
  return 1;
}

void start(int* argc, char*** argv) {
  const int announced = launcher_size();
  if (announced <= 1) return;
  // The tests' way to see the refusal of a build without MPI from a build with it.
  const bool without_mpi = !built_with_mpi() || std::getenv("NORMKIT_TRAIN_TEST_WITHOUT_MPI");
#ifdef NORMKIT_TRAIN_WITH_MPI
  if (!without_mpi) {
    int provided = 0;
    // One thread at a time calls MPI: the main thread, or the device thread that completes an
    // exchange of synchronized BatchNorm while the others wait (devices.h).
    MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    g_started = true;
    return;
  }
#endif
  (void)argc;
  (void)argv;
  (void)without_mpi;
  throw Error("started as one of " + std::to_string(announced) +
              " processes (mpirun -np " + std::to_string(announced) +
              "), but this build has no MPI support: run it without mpirun (--devices K trains "
              "K devices in one process), or install Open MPI (libopenmpi-dev, "
              "scripts/install-deps.sh) and rebuild");
}

void finish() {
#ifdef NORMKIT_TRAIN_WITH_MPI
  if (g_started) MPI_Finalize();
#endif
  g_started = false;
}

int rank() { return g_rank; }
int size() { return g_size; }

void allgather(const void* in, size_t bytes, void* out) {
  if (!g_started) {
    if (bytes) std::memcpy(out, in, bytes);
    return;
  }
#ifdef NORMKIT_TRAIN_WITH_MPI
  check(MPI_Allgather(in, static_cast<int>(bytes), MPI_BYTE, out, static_cast<int>(bytes),
                      MPI_BYTE, MPI_COMM_WORLD),
        "MPI_Allgather");
#endif
}

std::vector<double> allgather_doubles(const std::vector<double>& in) {
  if (!g_started) return in;
  std::vector<double> out;
#ifdef NORMKIT_TRAIN_WITH_MPI
  const int mine = static_cast<int>(in.size());
  std::vector<int> counts(static_cast<size_t>(g_size)), offsets(static_cast<size_t>(g_size));
  check(MPI_Allgather(&mine, 1, MPI_INT, counts.data(), 1, MPI_INT, MPI_COMM_WORLD),
        "MPI_Allgather");
  int total = 0;
  for (int r = 0; r < g_size; ++r) {
    offsets[r] = total;
    total += counts[r];
  }
  out.resize(static_cast<size_t>(total));
  check(MPI_Allgatherv(in.data(), mine, MPI_DOUBLE, out.data(), counts.data(), offsets.data(),
                       MPI_DOUBLE, MPI_COMM_WORLD),
        "MPI_Allgatherv");
#endif
  return out;
}

void broadcast(void* data, size_t bytes, int root) {
  if (!g_started) return;
#ifdef NORMKIT_TRAIN_WITH_MPI
  check(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, MPI_COMM_WORLD), "MPI_Bcast");
#else
  (void)data;
  (void)bytes;
  (void)root;
#endif
}

void abort_job(int code) {
#ifdef NORMKIT_TRAIN_WITH_MPI
  if (g_started) MPI_Abort(MPI_COMM_WORLD, code);
#endif
  std::exit(code);
}

void test_failure_point(int64_t global_step) {
  const char* v = std::getenv("NORMKIT_TRAIN_TEST_FAIL");
  if (v == nullptr) return;
  int fail_rank = -1;
  long long step = -1;
  char how[16] = "";
  if (std::sscanf(v, "%d:%lld:%15s", &fail_rank, &step, how) < 2) return;
  if (fail_rank != g_rank || step != global_step) return;
  if (std::strcmp(how, "kill") == 0) std::raise(SIGKILL);
  throw Error("NORMKIT_TRAIN_TEST_FAIL: a failure made on purpose at step " +
              std::to_string(global_step));
}

}  // namespace normkit::train::dist
