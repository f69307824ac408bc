// Statistics kernels (see moments.h), written once with Highway and compiled for every SIMD
// target; the best one the CPU supports is chosen at run time.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/moments.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/moments.h"
#include "cpu/simd.h"

#include <algorithm>

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {

// K chunks of the same length n (n <= kRunChunk), each as its own run: shifted sum for the mean,
// then (from cache) the centred sums of d and d^2. Four vector accumulators per sum, combined
// in a fixed order. The K chunks go through the loops side by side, so their loads and their
// dependent sums overlap; each chunk's own operations and their order do not depend on K, so
// out[k] is the same bits for any K.
template <int K, typename T>
HWY_INLINE void ChunksMomentsT(const T* const* xs, int64_t n, Moments* out) {
  if (n <= 0) {
    for (int k = 0; k < K; ++k) out[k] = {};
    return;
  }
  const DF d;
  const D1 d1;
  using V = hn::Vec<DF>;
  using V1 = hn::Vec<D1>;
  const int64_t N = int64_t(hn::Lanes(d));
  const double count = double(n);

  // Pass 1: the pivot keeps the float terms at the scale of the spread, not of the offset.
  float pivot[K], mean0[K];
  V vp[K], a0[K], a1[K], a2[K], a3[K];
  V1 t[K];
  for (int k = 0; k < K; ++k) {
    pivot[k] = to_float(xs[k][0]);
    vp[k] = hn::Set(d, pivot[k]);
    a0[k] = a1[k] = a2[k] = a3[k] = hn::Zero(d);
    t[k] = hn::Zero(d1);
  }
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    for (int k = 0; k < K; ++k) {
      a0[k] = hn::Add(a0[k], hn::Sub(LoadF(d, xs[k] + i), vp[k]));
      a1[k] = hn::Add(a1[k], hn::Sub(LoadF(d, xs[k] + i + N), vp[k]));
      a2[k] = hn::Add(a2[k], hn::Sub(LoadF(d, xs[k] + i + 2 * N), vp[k]));
      a3[k] = hn::Add(a3[k], hn::Sub(LoadF(d, xs[k] + i + 3 * N), vp[k]));
    }
  }
  for (; i + N <= n; i += N)
    for (int k = 0; k < K; ++k) a0[k] = hn::Add(a0[k], hn::Sub(LoadF(d, xs[k] + i), vp[k]));
  for (; i < n; ++i)
    for (int k = 0; k < K; ++k)
      t[k] = hn::Add(t[k], hn::Sub(LoadF(d1, xs[k] + i), hn::Set(d1, pivot[k])));
  for (int k = 0; k < K; ++k) {
    const double sum =
        SumLanes(d, hn::Add(hn::Add(a0[k], a1[k]), hn::Add(a2[k], a3[k]))) + hn::GetLane(t[k]);
    mean0[k] = float(double(pivot[k]) + sum / count);
  }

  // Pass 2: centred sums; sum(d) corrects the rounding of mean0.
  V vm[K], s1a[K], s1b[K], s2a[K], s2b[K];
  V1 t1[K], t2[K];
  for (int k = 0; k < K; ++k) {
    vm[k] = hn::Set(d, mean0[k]);
    s1a[k] = s1b[k] = s2a[k] = s2b[k] = hn::Zero(d);
    t1[k] = t2[k] = hn::Zero(d1);
  }
  i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    for (int k = 0; k < K; ++k) {
      const auto da = hn::Sub(LoadF(d, xs[k] + i), vm[k]);
      const auto db = hn::Sub(LoadF(d, xs[k] + i + N), vm[k]);
      s1a[k] = hn::Add(s1a[k], da);
      s1b[k] = hn::Add(s1b[k], db);
      s2a[k] = hn::MulAdd(da, da, s2a[k]);
      s2b[k] = hn::MulAdd(db, db, s2b[k]);
    }
  }
  for (; i + N <= n; i += N) {
    for (int k = 0; k < K; ++k) {
      const auto da = hn::Sub(LoadF(d, xs[k] + i), vm[k]);
      s1a[k] = hn::Add(s1a[k], da);
      s2a[k] = hn::MulAdd(da, da, s2a[k]);
    }
  }
  for (; i < n; ++i) {
    for (int k = 0; k < K; ++k) {
      const auto da = hn::Sub(LoadF(d1, xs[k] + i), hn::Set(d1, mean0[k]));
      t1[k] = hn::Add(t1[k], da);
      t2[k] = hn::MulAdd(da, da, t2[k]);
    }
  }
  for (int k = 0; k < K; ++k) {
    const double sum_d = SumLanes(d, hn::Add(s1a[k], s1b[k])) + hn::GetLane(t1[k]);
    const double sum_d2 = SumLanes(d, hn::Add(s2a[k], s2b[k])) + hn::GetLane(t2[k]);
    double m2 = sum_d2 - sum_d * sum_d / count;
    if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
    out[k] = {count, double(mean0[k]) + sum_d / count, m2};
  }
}

template <typename T>
Moments ChunkMomentsT(const T* HWY_RESTRICT x, int64_t n) {
  const T* xs[1] = {x};
  Moments m;
  ChunksMomentsT<1>(xs, n, &m);
  return m;
}

// Two chunks of length n at a and b.
template <typename T>
void ChunkPairMomentsT(const T* a, const T* b, int64_t n, Moments* out) {
  const T* xs[2] = {a, b};
  ChunksMomentsT<2>(xs, n, out);
}

int64_t TargetOfThisCode() { return HWY_TARGET; }

Moments ChunkMomentsF32(const float* x, int64_t n) { return ChunkMomentsT(x, n); }
Moments ChunkMomentsBF16(const bf16* x, int64_t n) { return ChunkMomentsT(x, n); }
Moments ChunkMomentsF16(const f16* x, int64_t n) { return ChunkMomentsT(x, n); }
void ChunkPairMomentsF32(const float* a, const float* b, int64_t n, Moments* out) {
  ChunkPairMomentsT(a, b, n, out);
}
void ChunkPairMomentsBF16(const bf16* a, const bf16* b, int64_t n, Moments* out) {
  ChunkPairMomentsT(a, b, n, out);
}
void ChunkPairMomentsF16(const f16* a, const f16* b, int64_t n, Moments* out) {
  ChunkPairMomentsT(a, b, n, out);
}

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(TargetOfThisCode);
HWY_EXPORT(ChunkMomentsF32);
HWY_EXPORT(ChunkMomentsBF16);
HWY_EXPORT(ChunkMomentsF16);
HWY_EXPORT(ChunkPairMomentsF32);
HWY_EXPORT(ChunkPairMomentsBF16);
HWY_EXPORT(ChunkPairMomentsF16);

namespace {

Moments chunk_moments(const float* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMomentsF32)(x, n); }
Moments chunk_moments(const bf16* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMomentsBF16)(x, n); }
Moments chunk_moments(const f16* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMomentsF16)(x, n); }
void chunk_pair_moments(const float* a, const float* b, int64_t n, Moments* out) {
  HWY_DYNAMIC_DISPATCH(ChunkPairMomentsF32)(a, b, n, out);
}
void chunk_pair_moments(const bf16* a, const bf16* b, int64_t n, Moments* out) {
  HWY_DYNAMIC_DISPATCH(ChunkPairMomentsBF16)(a, b, n, out);
}
void chunk_pair_moments(const f16* a, const f16* b, int64_t n, Moments* out) {
  HWY_DYNAMIC_DISPATCH(ChunkPairMomentsF16)(a, b, n, out);
}

}  // namespace

int64_t simd_target() { return HWY_DYNAMIC_DISPATCH(TargetOfThisCode)(); }

template <typename T>
Moments run_moments(const T* x, int64_t n) {
  Moments m;
  int64_t start = 0;
  // Two whole chunks at a time, merged in order.
  for (; start + 2 * kRunChunk <= n; start += 2 * kRunChunk) {
    Moments two[2];
    chunk_pair_moments(x + start, x + start + kRunChunk, kRunChunk, two);
    m = merge(merge(m, two[0]), two[1]);
  }
  for (; start < n; start += kRunChunk)
    m = merge(m, chunk_moments(x + start, std::min(kRunChunk, n - start)));
  return m;
}

template <typename T>
void run_pair_moments(const T* a, const T* b, int64_t n, Moments* out) {
  Moments ma, mb;
  for (int64_t start = 0; start < n; start += kRunChunk) {
    Moments two[2];
    chunk_pair_moments(a + start, b + start, std::min(kRunChunk, n - start), two);
    ma = merge(ma, two[0]);
    mb = merge(mb, two[1]);
  }
  out[0] = ma;
  out[1] = mb;
}

template <typename T>
void runs_moments(const T* x, int64_t runs, int64_t length, Moments* out, int num_threads,
                  Moments* scratch) {
  if (runs <= 0) return;
  const int64_t pieces = run_piece_count(length);
  const bool parallel = num_threads > 1 && runs * length >= 2 * kRunChunk;
  if (pieces <= 1) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t r = 0; r < runs; ++r) out[r] = chunk_moments(x + r * length, length);
    return;
  }
  // Several pieces per run: compute every piece, then merge each run's pieces in order.
  Moments* piece = scratch;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < runs * pieces; ++u) {
    const int64_t r = u / pieces, k = u % pieces;
    const int64_t start = k * kRunChunk;
    piece[u] = chunk_moments(x + r * length + start, std::min(kRunChunk, length - start));
  }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && runs > 1)
  for (int64_t r = 0; r < runs; ++r) {
    Moments m;
    for (int64_t k = 0; k < pieces; ++k) m = merge(m, piece[r * pieces + k]);
    out[r] = m;
  }
}

#define NORMKIT_MOMENTS_INSTANTIATE(T)                                                  \
  template Moments run_moments<T>(const T*, int64_t);                                   \
  template void run_pair_moments<T>(const T*, const T*, int64_t, Moments*);             \
  template void runs_moments<T>(const T*, int64_t, int64_t, Moments*, int, Moments*);
NORMKIT_MOMENTS_INSTANTIATE(float)
NORMKIT_MOMENTS_INSTANTIATE(bf16)
NORMKIT_MOMENTS_INSTANTIATE(f16)
#undef NORMKIT_MOMENTS_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
