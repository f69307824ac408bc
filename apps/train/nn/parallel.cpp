#include "nn/parallel.h"

#include <cblas.h>
#include <omp.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "normkit/context.h"
#include "normkit/error.h"

namespace normkit::train {
namespace {
int g_threads = 1;

void blas(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}
}  // namespace

void set_threads(int threads) {
  if (threads < 1) throw Error("set_threads: threads must be >= 1, got " + std::to_string(threads));
  g_threads = threads;
  omp_set_num_threads(threads);
  normkit::set_num_threads(threads);
  openblas_set_num_threads(1);
}

int threads() { return g_threads; }

void ensure_fast_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  if (std::strcmp(openblas_get_corename(), "Prescott") != 0) return;  // the CPU was recognized
  __builtin_cpu_init();
  const char* core = nullptr;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    core = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    core = "Haswell";
  if (core == nullptr) return;
  setenv("OPENBLAS_CORETYPE", core, 1);
  execv("/proc/self/exe", argv);  // returns only on failure: then run on with the slow kernels
}

std::string blas_description() {
  return std::string(openblas_get_config()) + " (kernels: " + openblas_get_corename() + ")";
}

void gemm_serial(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m > 0 && n > 0) blas(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace normkit::train
