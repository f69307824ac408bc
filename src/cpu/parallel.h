#pragma once
// Work-sharing loops whose bodies may write with non-temporal stores (cpu/simd.h).
//
// Non-temporal stores are weakly ordered: before another thread may read what they wrote (past
// a barrier) or the call returns, the thread that issued them fences them (hwy::FlushStream,
// an sfence on x86). The elementwise loops of cpu/simd.h do not fence each run they stream —
// after every 4 KB LayerNorm row it took up to a fifth of the call — so the loops below fence
// once per thread, after its share and before the barrier. Every streamed pass runs inside one.
#include <hwy/cache_control.h>

#include <cstdint>

namespace normkit::cpu {

// As `#pragma omp parallel for schedule(static) if (parallel)` over i in [0, n), calling
// body(i); with `stream`, each thread fences its non-temporal stores once after its share.
template <class F>
void parallel_for(int64_t n, int num_threads, bool parallel, bool stream, const F& body) {
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) body(i);
    if (stream) hwy::FlushStream();
  }
}

// Inside a parallel region (called by every thread of the team), as `#pragma omp for
// schedule(static)` over i in [0, n), barrier included; with `stream`, each thread fences its
// non-temporal stores before the barrier.
template <class F>
void for_in_region(int64_t n, bool stream, const F& body) {
#pragma omp for schedule(static) nowait
  for (int64_t i = 0; i < n; ++i) body(i);
  if (stream) hwy::FlushStream();
#pragma omp barrier
}

}  // namespace normkit::cpu
