// Statistics kernels (see moments.h), written once with Highway and compiled for every SIMD
// target; the best one the CPU supports is chosen at run time.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/moments.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/moments.h"
#include "cpu/simd.h"

#include <algorithm>
#include <vector>

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {

// One chunk (n <= kRunChunk) of a run: shifted sum for the mean, then (from cache) the centred
// sums of d and d^2. Four vector accumulators per sum, combined in a fixed order.
template <typename T>
Moments ChunkMomentsT(const T* HWY_RESTRICT x, int64_t n) {
  if (n <= 0) return {};
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const double count = double(n);

  // Pass 1: the pivot keeps the float terms at the scale of the spread, not of the offset.
  const float pivot = to_float(x[0]);
  const auto vp = hn::Set(d, pivot);
  auto a0 = hn::Zero(d), a1 = hn::Zero(d), a2 = hn::Zero(d), a3 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    a0 = hn::Add(a0, hn::Sub(LoadF(d, x + i), vp));
    a1 = hn::Add(a1, hn::Sub(LoadF(d, x + i + N), vp));
    a2 = hn::Add(a2, hn::Sub(LoadF(d, x + i + 2 * N), vp));
    a3 = hn::Add(a3, hn::Sub(LoadF(d, x + i + 3 * N), vp));
  }
  for (; i + N <= n; i += N) a0 = hn::Add(a0, hn::Sub(LoadF(d, x + i), vp));
  auto t = hn::Zero(d1);
  const auto vp1 = hn::Set(d1, pivot);
  for (; i < n; ++i) t = hn::Add(t, hn::Sub(LoadF(d1, x + i), vp1));
  const double sum = SumLanes(d, hn::Add(hn::Add(a0, a1), hn::Add(a2, a3))) + hn::GetLane(t);
  const float mean0 = float(double(pivot) + sum / count);

  // Pass 2: centred sums; sum(d) corrects the rounding of mean0.
  const auto vm = hn::Set(d, mean0);
  auto s1a = hn::Zero(d), s1b = hn::Zero(d), s2a = hn::Zero(d), s2b = hn::Zero(d);
  i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto da = hn::Sub(LoadF(d, x + i), vm);
    const auto db = hn::Sub(LoadF(d, x + i + N), vm);
    s1a = hn::Add(s1a, da);
    s1b = hn::Add(s1b, db);
    s2a = hn::MulAdd(da, da, s2a);
    s2b = hn::MulAdd(db, db, s2b);
  }
  for (; i + N <= n; i += N) {
    const auto da = hn::Sub(LoadF(d, x + i), vm);
    s1a = hn::Add(s1a, da);
    s2a = hn::MulAdd(da, da, s2a);
  }
  auto t1 = hn::Zero(d1), t2 = hn::Zero(d1);
  const auto vm1 = hn::Set(d1, mean0);
  for (; i < n; ++i) {
    const auto da = hn::Sub(LoadF(d1, x + i), vm1);
    t1 = hn::Add(t1, da);
    t2 = hn::MulAdd(da, da, t2);
  }
  const double sum_d = SumLanes(d, hn::Add(s1a, s1b)) + hn::GetLane(t1);
  const double sum_d2 = SumLanes(d, hn::Add(s2a, s2b)) + hn::GetLane(t2);
  double m2 = sum_d2 - sum_d * sum_d / count;
  if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
  return {count, double(mean0) + sum_d / count, m2};
}

// Moments of the Lanes(d) adjacent columns starting at x over `rows` rows.
template <class D, typename T>
HWY_INLINE void StripMoments(D d, const T* HWY_RESTRICT x, int64_t rows, int64_t row_stride,
                             Moments* out) {
  constexpr size_t kMax = hn::MaxLanes(D());
  const size_t lanes = hn::Lanes(d);
  const double count = double(rows);
  const auto pivot = LoadF(d, x);
  auto acc = hn::Zero(d);
  for (int64_t r = 0; r < rows; ++r) acc = hn::Add(acc, hn::Sub(LoadF(d, x + r * row_stride), pivot));
  HWY_ALIGN float pb[kMax], ab[kMax], mb[kMax];
  hn::Store(pivot, d, pb);
  hn::Store(acc, d, ab);
  for (size_t j = 0; j < lanes; ++j) mb[j] = float(double(pb[j]) + double(ab[j]) / count);
  const auto m0 = hn::Load(d, mb);
  auto s1 = hn::Zero(d), s2 = hn::Zero(d);
  for (int64_t r = 0; r < rows; ++r) {
    const auto dd = hn::Sub(LoadF(d, x + r * row_stride), m0);
    s1 = hn::Add(s1, dd);
    s2 = hn::MulAdd(dd, dd, s2);
  }
  hn::Store(s1, d, ab);
  hn::Store(s2, d, pb);
  for (size_t j = 0; j < lanes; ++j) {
    const double sum_d = ab[j];
    double m2 = double(pb[j]) - sum_d * sum_d / count;
    if (m2 < 0) m2 = 0;
    out[j] = {count, double(mb[j]) + sum_d / count, m2};
  }
}

template <typename T>
void BlockMomentsT(const T* HWY_RESTRICT x, int64_t rows, int64_t channels, int64_t row_stride,
                   Moments* out) {
  if (rows <= 0) {
    for (int64_t c = 0; c < channels; ++c) out[c] = {};
    return;
  }
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t c = 0;
  for (; c + N <= channels; c += N) StripMoments(d, x + c, rows, row_stride, out + c);
  for (; c < channels; ++c) StripMoments(d1, x + c, rows, row_stride, out + c);
}

int64_t TargetOfThisCode() { return HWY_TARGET; }

Moments ChunkMomentsF32(const float* x, int64_t n) { return ChunkMomentsT(x, n); }
Moments ChunkMomentsBF16(const bf16* x, int64_t n) { return ChunkMomentsT(x, n); }
Moments ChunkMomentsF16(const f16* x, int64_t n) { return ChunkMomentsT(x, n); }
void BlockMomentsF32(const float* x, int64_t r, int64_t c, int64_t s, Moments* o) {
  BlockMomentsT(x, r, c, s, o);
}
void BlockMomentsBF16(const bf16* x, int64_t r, int64_t c, int64_t s, Moments* o) {
  BlockMomentsT(x, r, c, s, o);
}
void BlockMomentsF16(const f16* x, int64_t r, int64_t c, int64_t s, Moments* o) {
  BlockMomentsT(x, r, c, s, o);
}

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(TargetOfThisCode);
HWY_EXPORT(ChunkMomentsF32);
HWY_EXPORT(ChunkMomentsBF16);
HWY_EXPORT(ChunkMomentsF16);
HWY_EXPORT(BlockMomentsF32);
HWY_EXPORT(BlockMomentsBF16);
HWY_EXPORT(BlockMomentsF16);

namespace {

Moments chunk_moments(const float* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMomentsF32)(x, n); }
Moments chunk_moments(const bf16* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMomentsBF16)(x, n); }
Moments chunk_moments(const f16* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(ChunkMomentsF16)(x, n); }

}  // namespace

int64_t simd_target() { return HWY_DYNAMIC_DISPATCH(TargetOfThisCode)(); }

template <typename T>
Moments run_moments(const T* x, int64_t n) {
  Moments m;
  for (int64_t start = 0; start < n; start += kRunChunk)
    m = merge(m, chunk_moments(x + start, std::min(kRunChunk, n - start)));
  return m;
}

template <typename T>
void block_moments(const T* x, int64_t rows, int64_t channels, int64_t row_stride, Moments* out) {
  if constexpr (std::is_same_v<T, float>)
    HWY_DYNAMIC_DISPATCH(BlockMomentsF32)(x, rows, channels, row_stride, out);
  else if constexpr (std::is_same_v<T, bf16>)
    HWY_DYNAMIC_DISPATCH(BlockMomentsBF16)(x, rows, channels, row_stride, out);
  else
    HWY_DYNAMIC_DISPATCH(BlockMomentsF16)(x, rows, channels, row_stride, out);
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
  thread_local std::vector<Moments> own;
  if (!scratch) {
    own.resize(std::size_t(runs * pieces));
    scratch = own.data();
  }
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
  template void block_moments<T>(const T*, int64_t, int64_t, int64_t, Moments*);        \
  template void runs_moments<T>(const T*, int64_t, int64_t, Moments*, int, Moments*);
NORMKIT_MOMENTS_INSTANTIATE(float)
NORMKIT_MOMENTS_INSTANTIATE(bf16)
NORMKIT_MOMENTS_INSTANTIATE(f16)
#undef NORMKIT_MOMENTS_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
