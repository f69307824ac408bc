#pragma once
// How the engine uses the machine's threads, and the one matrix product it is built on.
//
// One thread pool for everything: OpenBLAS runs single-threaded, called from inside the
// engine's own OpenMP regions (a convolution splits its batch over the threads), and normkit's
// kernels use the same OpenMP threads. OpenBLAS's own pthreads pool next to OpenMP's would
// oversubscribe the cores (see bench/train_speed.md).
#include <algorithm>
#include <cstdint>
#include <string>

namespace normkit::train {

// Sets the threads used by the engine and normkit's kernels (OpenBLAS: 1). threads >= 1.
void set_threads(int threads);
int threads();
std::string blas_description();  // OpenBLAS's build configuration and kernels, for reports

// OpenBLAS picks its kernels once, when it is loaded. A release that does not know the CPU
// (Debian's 0.3.21 on Sapphire/Emerald Rapids, for one) falls back to its SSE3 "Prescott"
// kernels, several times slower than the AVX-512 or AVX2 ones the CPU runs. When that happened
// and OPENBLAS_CORETYPE is unset, this sets it to the best family the CPU supports (SkylakeX or
// Haswell) and re-executes the program with the same argv; otherwise it returns. Call it first
// thing in main. Linux only (/proc/self/exe).
void ensure_fast_blas_kernels(char** argv);

// Row-major C[M, N] = op(A)[M, K] * op(B)[K, N] + beta * C, with op = transpose when trans_*,
// on the calling thread. lda/ldb/ldc are the row strides of A, B and C as stored. beta = 0
// overwrites C. Each output element is summed over K in OpenBLAS's fixed order.
void gemm_serial(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// Calls f(begin, end) on contiguous pieces of [0, n) in parallel (pieces of at least 16K
// elements, so small tensors stay on one thread).
template <typename F> void parallel_chunks(int64_t n, F&& f) {
  constexpr int64_t kMin = 16 * 1024;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(threads(), n / kMin));
  if (pieces == 1) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel for num_threads(static_cast<int>(pieces)) schedule(static, 1)
  for (int64_t p = 0; p < pieces; ++p) f(n * p / pieces, n * (p + 1) / pieces);
}

}  // namespace normkit::train
