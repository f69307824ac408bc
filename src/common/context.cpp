#include "normkit/context.h"

#include <omp.h>

#include <atomic>

#include "normkit/error.h"

namespace normkit {
namespace {
std::atomic<int> g_num_threads{0};  // 0: OpenMP's default (all cores)
}

void set_num_threads(int n) {
  if (n < 1) throw Error("set_num_threads: n must be >= 1, got " + std::to_string(n));
  g_num_threads = n;
}

int get_num_threads() {
  int n = g_num_threads;
  return n > 0 ? n : omp_get_max_threads();
}

}  // namespace normkit
