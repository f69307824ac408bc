// GroupNorm CPU kernels: threading and folding below (HWY_ONCE section), SIMD leaf loops per
// Highway target above it.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/group_norm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/group_norm.h"
#include "cpu/moments.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cmath>
#include <vector>

#ifndef NORMKIT_CPU_GROUP_NORM_KERNELS_
#define NORMKIT_CPU_GROUP_NORM_KERNELS_
namespace normkit::cpu::gn {

// The leaf loops of one SIMD target for activations of type T. `mask` (null: none) is the
// forward output y whose sign gates the incoming gradient: g = mask > 0 ? dy : 0.
template <typename T>
struct Kernels {
  // y[i] = relu?((x[i] - m) * a + b + r?[i]), i < n.
  void (*affine_run)(T* y, const T* x, const T* r, int64_t n, float m, float a, float b,
                     bool relu);
  // The same over a channels-last block of `rows` rows of `channels`, coefficients per column.
  void (*affine_rows)(T* y, const T* x, const T* r, int64_t rows, int64_t channels,
                      const float* m, const float* a, const float* b, bool relu);
  // sum(g) and sum(g * (x - m)) over i < n <= kRunChunk; writes g to gout when not null.
  void (*grad_sums_run)(const T* dy, const T* mask, const T* x, T* gout, int64_t n, float m,
                        double* sum_g, double* sum_gxc);
  // Per column c of a channels-last block: adds sum(g) to acc_g[c] and sum(g * (x - m[c])) to
  // acc_gxc[c] (float accumulators: keep rows small); writes g to gout when not null.
  void (*grad_sums_rows)(const T* dy, const T* mask, const T* x, T* gout, int64_t rows,
                         int64_t channels, const float* m, float* acc_g, float* acc_gxc);
  // dx[i] = a * g[i] + b * (x[i] - m) + c; g = dy masked as above.
  void (*dx_run)(T* dx, const T* dy, const T* mask, const T* x, int64_t n, float a, float b,
                 float m, float c);
  void (*dx_rows)(T* dx, const T* dy, const T* mask, const T* x, int64_t rows, int64_t channels,
                  const float* a, const float* b, const float* m, const float* c);
  // Per column c of a channels-last block: adds sum(x - p[c]) to acc1[c] and sum((x - p[c])^2)
  // to acc2[c] (float accumulators: keep rows small).
  void (*shifted_sums_rows)(const T* x, int64_t rows, int64_t channels, const float* p,
                            float* acc1, float* acc2);
};

}  // namespace normkit::cpu::gn
#endif

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {

template <class D, typename T>
HWY_INLINE hn::Vec<D> Gradient(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask) {
  const auto g = LoadF(d, dy);
  if (!mask) return g;
  return hn::IfThenElseZero(hn::Gt(LoadF(d, mask), hn::Zero(d)), g);
}

// relu that keeps NaN (as torch): only values below zero become zero.
template <class D>
HWY_INLINE hn::Vec<D> Relu(D d, hn::Vec<D> v) {
  return hn::IfThenZeroElse(hn::Lt(v, hn::Zero(d)), v);
}

template <bool kResidual, bool kRelu, class D, typename T>
HWY_INLINE void AffineStep(D d, T* HWY_RESTRICT y, const T* HWY_RESTRICT x,
                           const T* HWY_RESTRICT r, hn::Vec<D> m, hn::Vec<D> a, hn::Vec<D> b) {
  auto v = hn::MulAdd(hn::Sub(LoadF(d, x), m), a, b);
  if constexpr (kResidual) v = hn::Add(v, LoadF(d, r));
  if constexpr (kRelu) v = Relu(d, v);
  StoreF(v, d, y);
}

template <bool kResidual, bool kRelu, typename T>
void AffineRunT(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, const T* HWY_RESTRICT r, int64_t n,
                float m, float a, float b) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto vm = hn::Set(d, m), va = hn::Set(d, a), vb = hn::Set(d, b);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    AffineStep<kResidual, kRelu>(d, y + i, x + i, r + i, vm, va, vb);
    AffineStep<kResidual, kRelu>(d, y + i + N, x + i + N, r + i + N, vm, va, vb);
  }
  for (; i + N <= n; i += N) AffineStep<kResidual, kRelu>(d, y + i, x + i, r + i, vm, va, vb);
  for (; i < n; ++i)
    AffineStep<kResidual, kRelu>(d1, y + i, x + i, r + i, hn::Set(d1, m), hn::Set(d1, a),
                                 hn::Set(d1, b));
}

template <typename T>
void AffineRun(T* y, const T* x, const T* r, int64_t n, float m, float a, float b, bool relu) {
  if (r)
    relu ? AffineRunT<true, true>(y, x, r, n, m, a, b) : AffineRunT<true, false>(y, x, r, n, m, a, b);
  else
    relu ? AffineRunT<false, true>(y, x, r, n, m, a, b) : AffineRunT<false, false>(y, x, r, n, m, a, b);
}

template <bool kResidual, bool kRelu, typename T>
void AffineRowsT(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, const T* HWY_RESTRICT r,
                 int64_t rows, int64_t channels, const float* m, const float* a,
                 const float* b) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t at = row * channels;
    int64_t c = 0;
    for (; c + N <= channels; c += N)
      AffineStep<kResidual, kRelu>(d, y + at + c, x + at + c, r + at + c, hn::LoadU(d, m + c),
                                   hn::LoadU(d, a + c), hn::LoadU(d, b + c));
    for (; c < channels; ++c)
      AffineStep<kResidual, kRelu>(d1, y + at + c, x + at + c, r + at + c, hn::LoadU(d1, m + c),
                                   hn::LoadU(d1, a + c), hn::LoadU(d1, b + c));
  }
}

template <typename T>
void AffineRows(T* y, const T* x, const T* r, int64_t rows, int64_t channels, const float* m,
                const float* a, const float* b, bool relu) {
  if (r)
    relu ? AffineRowsT<true, true>(y, x, r, rows, channels, m, a, b)
         : AffineRowsT<true, false>(y, x, r, rows, channels, m, a, b);
  else
    relu ? AffineRowsT<false, true>(y, x, r, rows, channels, m, a, b)
         : AffineRowsT<false, false>(y, x, r, rows, channels, m, a, b);
}

template <typename T>
void GradSumsRun(const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask, const T* HWY_RESTRICT x,
                 T* HWY_RESTRICT gout, int64_t n, float m, double* sum_g, double* sum_gxc) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto vm = hn::Set(d, m);
  auto g0 = hn::Zero(d), g1 = hn::Zero(d), x0 = hn::Zero(d), x1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto ga = Gradient(d, dy + i, mask ? mask + i : nullptr);
    const auto gb = Gradient(d, dy + i + N, mask ? mask + i + N : nullptr);
    if (gout) StoreF(ga, d, gout + i), StoreF(gb, d, gout + i + N);
    g0 = hn::Add(g0, ga);
    g1 = hn::Add(g1, gb);
    x0 = hn::MulAdd(ga, hn::Sub(LoadF(d, x + i), vm), x0);
    x1 = hn::MulAdd(gb, hn::Sub(LoadF(d, x + i + N), vm), x1);
  }
  for (; i + N <= n; i += N) {
    const auto ga = Gradient(d, dy + i, mask ? mask + i : nullptr);
    if (gout) StoreF(ga, d, gout + i);
    g0 = hn::Add(g0, ga);
    x0 = hn::MulAdd(ga, hn::Sub(LoadF(d, x + i), vm), x0);
  }
  auto tg = hn::Zero(d1), tx = hn::Zero(d1);
  for (; i < n; ++i) {
    const auto ga = Gradient(d1, dy + i, mask ? mask + i : nullptr);
    if (gout) StoreF(ga, d1, gout + i);
    tg = hn::Add(tg, ga);
    tx = hn::MulAdd(ga, hn::Sub(LoadF(d1, x + i), hn::Set(d1, m)), tx);
  }
  *sum_g = SumLanes(d, hn::Add(g0, g1)) + hn::GetLane(tg);
  *sum_gxc = SumLanes(d, hn::Add(x0, x1)) + hn::GetLane(tx);
}

template <class D, typename T>
HWY_INLINE void GradSumsStep(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask,
                             const T* HWY_RESTRICT x, T* HWY_RESTRICT gout, const float* m,
                             float* acc_g, float* acc_gxc) {
  const auto g = Gradient(d, dy, mask);
  if (gout) StoreF(g, d, gout);
  hn::StoreU(hn::Add(hn::LoadU(d, acc_g), g), d, acc_g);
  hn::StoreU(hn::MulAdd(g, hn::Sub(LoadF(d, x), hn::LoadU(d, m)), hn::LoadU(d, acc_gxc)), d,
             acc_gxc);
}

template <typename T>
void GradSumsRows(const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask, const T* HWY_RESTRICT x,
                  T* HWY_RESTRICT gout, int64_t rows, int64_t channels, const float* m,
                  float* acc_g, float* acc_gxc) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t at = row * channels;
    const T* mrow = mask ? mask + at : nullptr;
    T* grow = gout ? gout + at : nullptr;
    int64_t c = 0;
    for (; c + N <= channels; c += N)
      GradSumsStep(d, dy + at + c, mrow ? mrow + c : nullptr, x + at + c,
                   grow ? grow + c : nullptr, m + c, acc_g + c, acc_gxc + c);
    for (; c < channels; ++c)
      GradSumsStep(d1, dy + at + c, mrow ? mrow + c : nullptr, x + at + c,
                   grow ? grow + c : nullptr, m + c, acc_g + c, acc_gxc + c);
  }
}

template <class D, typename T>
HWY_INLINE void DxStep(D d, T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy,
                       const T* HWY_RESTRICT mask, const T* HWY_RESTRICT x, hn::Vec<D> a,
                       hn::Vec<D> b, hn::Vec<D> m, hn::Vec<D> c) {
  const auto g = Gradient(d, dy, mask);
  StoreF(hn::MulAdd(a, g, hn::MulAdd(b, hn::Sub(LoadF(d, x), m), c)), d, dx);
}

template <typename T>
void DxRun(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask,
           const T* HWY_RESTRICT x, int64_t n, float a, float b, float m, float c) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto va = hn::Set(d, a), vb = hn::Set(d, b), vm = hn::Set(d, m), vc = hn::Set(d, c);
  int64_t i = 0;
  for (; i + N <= n; i += N) DxStep(d, dx + i, dy + i, mask ? mask + i : nullptr, x + i, va, vb, vm, vc);
  for (; i < n; ++i)
    DxStep(d1, dx + i, dy + i, mask ? mask + i : nullptr, x + i, hn::Set(d1, a), hn::Set(d1, b),
           hn::Set(d1, m), hn::Set(d1, c));
}

template <typename T>
void DxRows(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask,
            const T* HWY_RESTRICT x, int64_t rows, int64_t channels, const float* a,
            const float* b, const float* m, const float* c) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t at = row * channels;
    const T* mrow = mask ? mask + at : nullptr;
    int64_t k = 0;
    for (; k + N <= channels; k += N)
      DxStep(d, dx + at + k, dy + at + k, mrow ? mrow + k : nullptr, x + at + k,
             hn::LoadU(d, a + k), hn::LoadU(d, b + k), hn::LoadU(d, m + k), hn::LoadU(d, c + k));
    for (; k < channels; ++k)
      DxStep(d1, dx + at + k, dy + at + k, mrow ? mrow + k : nullptr, x + at + k,
             hn::LoadU(d1, a + k), hn::LoadU(d1, b + k), hn::LoadU(d1, m + k),
             hn::LoadU(d1, c + k));
  }
}

template <class D, typename T>
HWY_INLINE void ShiftedStep(D d, const T* HWY_RESTRICT x, const float* p, float* acc1,
                            float* acc2) {
  const auto v = hn::Sub(LoadF(d, x), hn::LoadU(d, p));
  hn::StoreU(hn::Add(hn::LoadU(d, acc1), v), d, acc1);
  hn::StoreU(hn::MulAdd(v, v, hn::LoadU(d, acc2)), d, acc2);
}

template <typename T>
void ShiftedSumsRows(const T* HWY_RESTRICT x, int64_t rows, int64_t channels, const float* p,
                     float* acc1, float* acc2) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t row = 0; row < rows; ++row) {
    const T* xr = x + row * channels;
    int64_t c = 0;
    for (; c + N <= channels; c += N) ShiftedStep(d, xr + c, p + c, acc1 + c, acc2 + c);
    for (; c < channels; ++c) ShiftedStep(d1, xr + c, p + c, acc1 + c, acc2 + c);
  }
}

template <typename T>
const gn::Kernels<T>* KernelTable() {
  static const gn::Kernels<T> k{&AffineRun<T>,  &AffineRows<T>, &GradSumsRun<T>,
                                &GradSumsRows<T>, &DxRun<T>,    &DxRows<T>,
                                &ShiftedSumsRows<T>};
  return &k;
}
const gn::Kernels<float>* KernelsF32() { return KernelTable<float>(); }
const gn::Kernels<bf16>* KernelsBF16() { return KernelTable<bf16>(); }
const gn::Kernels<f16>* KernelsF16() { return KernelTable<f16>(); }

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(KernelsF32);
HWY_EXPORT(KernelsBF16);
HWY_EXPORT(KernelsF16);

namespace {

template <typename T>
const gn::Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(KernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(KernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(KernelsF16)();
}

constexpr int64_t kUnitElements = 32768;  // target size of a channels-last work unit
constexpr int64_t kParallelMin = 8192;    // smaller tensors are not worth waking threads
// Channels-first groups up to this many elements are normalized right after their statistics,
// while they are still in the per-core cache (L2 is 2 MiB here; leave room for y).
constexpr int64_t kCachedGroupBytes = 1 << 20;

// Per-call buffers reused across calls on the calling thread (no allocation once warm).
template <typename U>
U* scratch(std::vector<U>& v, int64_t n) {
  if (v.size() < std::size_t(n)) v.resize(std::size_t(n));
  return v.data();
}

// Channels-first work: `rows` contiguous rows of `len` elements, cut into kRunChunk pieces.
// A unit is one piece of a long row, or several whole short rows.
struct RowPieces {
  int64_t rows, len, pieces, stride, rows_per_unit, units;
  RowPieces(int64_t rows_, int64_t len_) : rows(rows_), len(len_) {
    pieces = run_piece_count(len);
    stride = std::max<int64_t>(pieces, 1);
    rows_per_unit = pieces > 1 ? 1 : std::max<int64_t>(1, kRunChunk / std::max<int64_t>(len, 1));
    units = pieces > 1 ? rows * pieces : (rows + rows_per_unit - 1) / rows_per_unit;
  }
  // f(row, piece, begin, end) for each piece in unit u.
  template <typename F>
  void for_unit(int64_t u, F&& f) const {
    if (pieces > 1) {
      const int64_t row = u / pieces, k = u % pieces, lo = k * kRunChunk;
      f(row, k, lo, std::min(len, lo + kRunChunk));
      return;
    }
    const int64_t end = std::min(rows, (u + 1) * rows_per_unit);
    for (int64_t row = u * rows_per_unit; row < end; ++row) f(row, int64_t(0), int64_t(0), len);
  }
};

// Channels-last work: per sample, `spatial` rows of `channels` values. A unit is a range of
// unit_rows rows, walked in blocks of block_rows (the in-cache chunk of the statistics).
struct RowBlocks {
  int64_t block, unit_rows, units_per_sample;
  RowBlocks(int64_t spatial, int64_t channels) {
    block = block_rows(channels);
    unit_rows = block * std::max<int64_t>(1, kUnitElements / (block * std::max<int64_t>(channels, 1)));
    units_per_sample = (spatial + unit_rows - 1) / unit_rows;
  }
};

// Channels-last statistics, per unit (a range of rows of one sample, small enough to stay in
// the per-core cache), per channel, in sequential row order: the sum of x - p around a pivot p
// (the channel's value in the unit's first row: the terms are at the scale of the spread, not
// of the offset) gives a float mean m; a second pass, from cache, sums d = x - m and d^2, so
// mean = m + sum(d) / n and M2 = sum(d^2) - sum(d)^2 / n (the corrected two-pass algorithm).
// Float sums over blocks of 16 rows, added in double. Channels merge into their group in
// channel order, then the units of (n, g) in order: fixed by the shape, whatever the threads.
template <typename T>
void channels_last_group_moments(const T* x, const GroupNormShape& t, Moments* out,
                                 int num_threads, bool parallel) {
  const int64_t C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  const RowBlocks rb(S, C);
  const int64_t units = t.batch * rb.units_per_sample;
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(16, rb.unit_rows));
  const auto& k = kernels<T>();
  thread_local std::vector<Moments> unit_buf;
  Moments* unit_moments = scratch(unit_buf, units * G);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < units; ++u) {
    thread_local std::vector<float> fbuf;
    thread_local std::vector<double> dbuf;
    float* pivot = scratch(fbuf, 3 * C);
    float* a1 = pivot + C;
    float* a2 = a1 + C;
    double* s1 = scratch(dbuf, 2 * C);
    double* s2 = s1 + C;
    const int64_t n = u / rb.units_per_sample, q = u % rb.units_per_sample;
    const int64_t r_begin = q * rb.unit_rows, r_end = std::min(S, r_begin + rb.unit_rows);
    const T* base = x + (n * S + r_begin) * C;
    for (int64_t c = 0; c < C; ++c) pivot[c] = to_float(base[c]);
    const double count = double(r_end - r_begin);
    // Pass over the unit: blockwise float sums added in double.
    auto sums = [&] {
      std::fill(s1, s1 + 2 * C, 0.0);
      for (int64_t r0 = r_begin; r0 < r_end; r0 += block) {
        std::fill(a1, a1 + 2 * C, 0.0f);
        k.shifted_sums_rows(x + (n * S + r0) * C, std::min(block, r_end - r0), C, pivot, a1, a2);
        for (int64_t c = 0; c < C; ++c) s1[c] += a1[c], s2[c] += a2[c];
      }
    };
    sums();  // around the sample pivot: the mean
    for (int64_t c = 0; c < C; ++c) pivot[c] = float(double(pivot[c]) + s1[c] / count);
    sums();  // around the float mean, from cache: sum(d) corrects its rounding, sum(d^2) is M2
    Moments* gm = unit_moments + u * G;
    for (int64_t g = 0; g < G; ++g) {
      Moments m;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        double m2 = s2[c] - s1[c] * s1[c] / count;
        if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
        m = merge(m, Moments{count, double(pivot[c]) + s1[c] / count, m2});
      }
      gm[g] = m;
    }
  }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t i = 0; i < t.batch * G; ++i) {
    const int64_t n = i / G, g = i % G;
    Moments m;
    for (int64_t q = 0; q < rb.units_per_sample; ++q)
      m = merge(m, unit_moments[(n * rb.units_per_sample + q) * G + g]);
    out[i] = m;
  }
}

// m = float(mean), a = rstd * w[c], b = bias[c] - (mean - m) * a. Subtracting m first makes
// x - m exact (or nearly) whatever the offset, and b carries the part of the mean that float m
// cannot hold, so y is accurate to a few ulps of |y| even for groups whose |mean| is many times
// their spread; x * a + (b - mean * a) would cancel.
struct Coef {
  float m, a, b;
};
inline Coef fold(double mean, double rstd, const float* weight, const float* bias, int64_t c) {
  const float mf = float(mean);
  const double scale = rstd * (weight ? double(weight[c]) : 1.0);
  return {mf, float(scale), float((bias ? double(bias[c]) : 0.0) - (mean - double(mf)) * scale)};
}

template <typename T>
void fold_and_apply(T* y, const T* x, const double* mean, const double* rstd,
                    const float* weight, const float* bias, const GroupNormShape& t,
                    int num_threads, bool parallel, const GroupNormForwardEpilogue<T>& epi) {
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  const int64_t per_group = C / G;
  const auto& k = kernels<T>();
  thread_local std::vector<float> coef_buf;
  float* m = scratch(coef_buf, 3 * N * C);
  float* a = m + N * C;
  float* b = a + N * C;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * G + c / per_group;
      const Coef f = fold(mean[i], rstd[i], weight, bias, c);
      m[n * C + c] = f.m;
      a[n * C + c] = f.a;
      b[n * C + c] = f.b;
    }
  const T* r = epi.residual;
  if (t.format == MemoryFormat::channels_first) {
    const RowPieces p(N * C, S);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u)
      p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        const int64_t at = row * S + lo;
        k.affine_run(y + at, x + at, r ? r + at : nullptr, hi - lo, m[row], a[row], b[row],
                     epi.relu);
      });
  } else {
    const RowBlocks rb(S, C);
    const int64_t units = N * rb.units_per_sample;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / rb.units_per_sample, r0 = (u % rb.units_per_sample) * rb.unit_rows;
      const int64_t rows = std::min(S - r0, rb.unit_rows);
      const int64_t at = (n * S + r0) * C;
      k.affine_rows(y + at, x + at, r ? r + at : nullptr, rows, C, m + n * C, a + n * C,
                    b + n * C, epi.relu);
    }
  }
}

// Statistics of one group as doubles, with the outputs of the forward.
inline void finish_stats(const Moments& gm, double eps, double* mu, double* rs, float* mean,
                         float* rstd, float* variance) {
  const double var = gm.variance();  // NaN for an empty group, as torch's rstd
  *mu = gm.mean;                     // 0 for an empty group
  *rs = 1.0 / std::sqrt(var + eps);
  *mean = float(*mu);
  *rstd = float(*rs);
  if (variance) *variance = float(var);
}

}  // namespace

template <typename T>
void group_norm_forward(T* y, float* mean, float* rstd, const T* x, const float* weight,
                        const float* bias, const GroupNormShape& t, double eps, int num_threads,
                        float* variance, const GroupNormForwardEpilogue<T>& epi) {
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  if (N == 0) return;
  const bool parallel = num_threads > 1 && N * C * S >= kParallelMin;
  const int64_t group_len = per_group * S;

  // Channels-first with enough cache-sized groups for every thread: each group is normalized
  // right after its statistics, from cache. Bitwise the same as the two-phase path below
  // (run_moments == the ordered merge of its pieces; the same fold and loops).
  if (t.format == MemoryFormat::channels_first && N * G >= std::max(num_threads, 1) &&
      group_len * int64_t(sizeof(T)) <= kCachedGroupBytes) {
    const auto& k = kernels<T>();
    const T* r = epi.residual;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t i = 0; i < N * G; ++i) {
      const int64_t n = i / G, g = i % G;
      double mu, rs;
      finish_stats(run_moments(x + i * group_len, group_len), eps, &mu, &rs, mean + i, rstd + i,
                   variance ? variance + i : nullptr);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const Coef f = fold(mu, rs, weight, bias, c);
        const int64_t at = (n * C + c) * S;
        k.affine_run(y + at, x + at, r ? r + at : nullptr, S, f.m, f.a, f.b, epi.relu);
      }
    }
    return;
  }

  thread_local std::vector<Moments> moments_buf;
  Moments* gm = scratch(moments_buf, N * G);
  if (t.format == MemoryFormat::channels_first)
    runs_moments(x, N * G, group_len, gm, parallel ? num_threads : 1);
  else
    channels_last_group_moments(x, t, gm, num_threads, parallel);
  thread_local std::vector<double> stat_buf;
  double* mu = scratch(stat_buf, 2 * N * G);
  double* rs = mu + N * G;
  for (int64_t i = 0; i < N * G; ++i)
    finish_stats(gm[i], eps, mu + i, rs + i, mean + i, rstd + i, variance ? variance + i : nullptr);
  fold_and_apply(y, x, mu, rs, weight, bias, t, num_threads, parallel, epi);
}

template <typename T>
void group_norm_apply(T* y, const T* x, const float* mean, const float* rstd,
                      const float* weight, const float* bias, const GroupNormShape& t,
                      int num_threads, const GroupNormForwardEpilogue<T>& epi) {
  const int64_t NG = t.batch * t.groups;
  if (t.batch == 0) return;
  thread_local std::vector<double> stat_buf;
  double* mu = scratch(stat_buf, 2 * NG);
  double* rs = mu + NG;
  for (int64_t i = 0; i < NG; ++i) mu[i] = mean[i], rs[i] = rstd[i];
  const bool parallel = num_threads > 1 && t.batch * t.channels * t.spatial >= kParallelMin;
  fold_and_apply(y, x, mu, rs, weight, bias, t, num_threads, parallel, epi);
}

// Per (n, g), over its M = (C/G) * S elements, with g_i = gin_i * w[c] (gin the incoming
// gradient after the epilogue's mask) and sum_dy[c] = sum_s gin, sum_dy_xc[c] = sum_s gin * (x - mean):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//      = (rstd * w[c]) * gin + b * (x - mean) + c0, with
//   b  = -rstd^3 / M * sum_c w[c] * sum_dy_xc[c]     (through rstd)
//   c0 = -rstd / M * sum_c w[c] * sum_dy[c]          (through mean)
// and b = c0 = 0 when the statistics are constants.
//   dweight[c] = sum_n rstd[n, g] * sum_dy_xc[n, c],  dbias[c] = sum_n sum_dy[n, c].
template <typename T>
void group_norm_backward(T* dx, float* dweight, float* dbias, const T* dy, const T* x,
                         const float* mean, const float* rstd, const float* weight,
                         const GroupNormShape& t, bool stats_are_constants, int num_threads,
                         const GroupNormBackwardEpilogue<T>& epi) {
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  const int64_t per_group = C / G;
  const bool parallel = num_threads > 1 && N * C * S >= kParallelMin;
  const bool channels_first = t.format == MemoryFormat::channels_first;
  const auto& k = kernels<T>();
  const T* mask = epi.relu ? epi.y : nullptr;
  T* gout = epi.dresidual;

  // Per-(n, c) reductions (the pass that also writes dresidual).
  thread_local std::vector<double> sums_buf;
  double* sum_dy = scratch(sums_buf, 2 * N * C);
  double* sum_dy_xc = sum_dy + N * C;
  const bool need_sums = !stats_are_constants || dweight || dbias || gout;
  if (need_sums && N * C > 0) {
    thread_local std::vector<double> partial_buf;
    if (channels_first) {
      const RowPieces p(N * C, S);
      double* pd = scratch(partial_buf, 2 * N * C * p.stride);
      double* px = pd + N * C * p.stride;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t u = 0; u < p.units; ++u)
        p.for_unit(u, [&](int64_t row, int64_t piece, int64_t lo, int64_t hi) {
          const float m = mean[(row / C) * G + (row % C) / per_group];
          const int64_t at = row * S + lo;
          k.grad_sums_run(dy + at, mask ? mask + at : nullptr, x + at, gout ? gout + at : nullptr,
                          hi - lo, m, &pd[row * p.stride + piece], &px[row * p.stride + piece]);
        });
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t row = 0; row < N * C; ++row) {
        double sd = 0, sx = 0;
        for (int64_t q = 0; q < p.stride; ++q) sd += pd[row * p.stride + q], sx += px[row * p.stride + q];
        sum_dy[row] = sd;
        sum_dy_xc[row] = sx;
      }
    } else {
      const RowBlocks rb(S, C);
      const int64_t units = N * rb.units_per_sample;
      thread_local std::vector<float> mean_buf;
      float* mean_c = scratch(mean_buf, N * C);  // mean of each channel's group
      for (int64_t i = 0; i < N * C; ++i) mean_c[i] = mean[(i / C) * G + (i % C) / per_group];
      double* pd = scratch(partial_buf, 2 * units * C);
      double* px = pd + units * C;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t u = 0; u < units; ++u) {
        thread_local std::vector<float> acc_buf;
        float* ag = scratch(acc_buf, 2 * C);
        float* ax = ag + C;
        const int64_t n = u / rb.units_per_sample, q = u % rb.units_per_sample;
        const int64_t r_end = std::min(S, (q + 1) * rb.unit_rows);
        std::fill(pd + u * C, pd + (u + 1) * C, 0.0);
        std::fill(px + u * C, px + (u + 1) * C, 0.0);
        for (int64_t r0 = q * rb.unit_rows; r0 < r_end; r0 += rb.block) {
          const int64_t at = (n * S + r0) * C;
          std::fill(ag, ag + 2 * C, 0.0f);
          k.grad_sums_rows(dy + at, mask ? mask + at : nullptr, x + at,
                           gout ? gout + at : nullptr, std::min(rb.block, r_end - r0), C,
                           mean_c + n * C, ag, ax);
          for (int64_t c = 0; c < C; ++c) pd[u * C + c] += ag[c], px[u * C + c] += ax[c];
        }
      }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t i = 0; i < N * C; ++i) {
        const int64_t n = i / C, c = i % C;
        double sd = 0, sx = 0;
        for (int64_t q = 0; q < rb.units_per_sample; ++q) {
          const int64_t at = (n * rb.units_per_sample + q) * C + c;
          sd += pd[at];
          sx += px[at];
        }
        sum_dy[i] = sd;
        sum_dy_xc[i] = sx;
      }
    }
  }

  if (dweight || dbias) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && C > 1)
    for (int64_t c = 0; c < C; ++c) {
      double dw = 0, db = 0;
      for (int64_t n = 0; n < N; ++n) {
        dw += double(rstd[n * G + c / per_group]) * sum_dy_xc[n * C + c];
        db += sum_dy[n * C + c];
      }
      if (dweight) dweight[c] = float(dw);
      if (dbias) dbias[c] = float(db);
    }
  }
  if (N * C * S == 0) return;

  // Coefficients of dx per (n, c).
  thread_local std::vector<float> coef_buf;
  float* ca = scratch(coef_buf, 4 * N * C);
  float* cb = ca + N * C;
  float* cc = cb + N * C;
  float* cm = cc + N * C;
  const double count = double(per_group * S);
  for (int64_t i = 0; i < N * G; ++i) {
    const double r = rstd[i];
    const int64_t n = i / G, c0 = (i % G) * per_group;
    double b = 0, c = 0;
    if (!stats_are_constants) {
      double sum_g = 0, sum_g_xc = 0;
      for (int64_t ch = c0; ch < c0 + per_group; ++ch) {
        const double w = weight ? double(weight[ch]) : 1.0;
        sum_g += w * sum_dy[n * C + ch];
        sum_g_xc += w * sum_dy_xc[n * C + ch];
      }
      b = -r * r * r * sum_g_xc / count;
      c = -r * sum_g / count;
    }
    for (int64_t ch = c0; ch < c0 + per_group; ++ch) {
      ca[n * C + ch] = float(r * (weight ? double(weight[ch]) : 1.0));
      cb[n * C + ch] = float(b);
      cc[n * C + ch] = float(c);
      cm[n * C + ch] = mean[i];
    }
  }

  // With dresidual written, g is read back from it (one stream instead of dy and y; exact, as
  // g is dy or 0).
  const T* gin = gout ? gout : dy;
  const T* gmask = gout ? nullptr : mask;
  if (channels_first) {
    const RowPieces p(N * C, S);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < p.units; ++u)
      p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        const int64_t at = row * S + lo;
        k.dx_run(dx + at, gin + at, gmask ? gmask + at : nullptr, x + at, hi - lo, ca[row],
                 cb[row], cm[row], cc[row]);
      });
  } else {
    const RowBlocks rb(S, C);
    const int64_t units = N * rb.units_per_sample;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t n = u / rb.units_per_sample, r0 = (u % rb.units_per_sample) * rb.unit_rows;
      const int64_t at = (n * S + r0) * C;
      k.dx_rows(dx + at, gin + at, gmask ? gmask + at : nullptr, x + at,
                std::min(S - r0, rb.unit_rows), C, ca + n * C, cb + n * C, cm + n * C,
                cc + n * C);
    }
  }
}

#define NORMKIT_GROUP_NORM_INSTANTIATE(T)                                                      \
  template void group_norm_forward<T>(T*, float*, float*, const T*, const float*, const float*, \
                                      const GroupNormShape&, double, int, float*,               \
                                      const GroupNormForwardEpilogue<T>&);                      \
  template void group_norm_apply<T>(T*, const T*, const float*, const float*, const float*,     \
                                    const float*, const GroupNormShape&, int,                   \
                                    const GroupNormForwardEpilogue<T>&);                        \
  template void group_norm_backward<T>(T*, float*, float*, const T*, const T*, const float*,    \
                                       const float*, const float*, const GroupNormShape&, bool, \
                                       int, const GroupNormBackwardEpilogue<T>&);
NORMKIT_GROUP_NORM_INSTANTIATE(float)
NORMKIT_GROUP_NORM_INSTANTIATE(bf16)
NORMKIT_GROUP_NORM_INSTANTIATE(f16)
#undef NORMKIT_GROUP_NORM_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
