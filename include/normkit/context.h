#pragma once
// Context: where and how an op runs. Passed explicitly; the default is the process-wide one.
#include <cstddef>
#include <span>

namespace normkit {

enum class Backend {
  reference,  // src/ref: plain loops, double accumulation; the truth the tests compare to
  cpu,        // src/cpu: the optimized kernels
};

struct Context {
  Backend backend = Backend::cpu;
  int num_threads = 0;  // 0: the process-wide setting (see set_num_threads)
  // Optional scratch memory for the CPU kernels, at least the op's *_workspace_size(...) bytes
  // (see each op's header); empty: each calling thread keeps a buffer of its own, allocated on
  // first use and reused. Only one call may use a given workspace at a time.
  std::span<std::byte> workspace;
};

// Process-wide thread count used when Context::num_threads == 0. Initially all cores
// (OpenMP's default). Results are bitwise identical for every thread count.
void set_num_threads(int n);
int get_num_threads();

}  // namespace normkit
