// GroupNorm CPU kernels: threading and folding below (HWY_ONCE section), SIMD leaf loops per
// Highway target above it.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/group_norm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/group_norm.h"
#include "cpu/cache.h"
#include "cpu/scratch.h"
#include "cpu/moments.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/tiling.h"
#include "cpu/upstream.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <span>
#include <type_traits>
#include <memory>

#ifndef NORMKIT_CPU_GROUP_NORM_KERNELS_
#define NORMKIT_CPU_GROUP_NORM_KERNELS_
namespace normkit::cpu::gn {

// g from dy through the epilogue (cpu/upstream.h); silu's z = (x - m) * za + zb + residual?,
// with the forward's coefficients za, zb of each channel.
template <typename T>
using Upstream = cpu::Upstream<T>;

// The leaf loops of one SIMD target for activations of type T.
template <typename T>
struct Kernels {
  // y[i] = act((x[i] - m) * a + b + r?[i]), i < n. `stream`: y with non-temporal stores
  // where they apply (float32; see cpu/simd.h).
  void (*affine_run)(T* y, const T* x, const T* r, int64_t n, float m, float a, float b,
                     Activation act, bool stream);
  // The same over a channels-last block of `rows` rows of `channels`, coefficients per column.
  void (*affine_rows)(T* y, const T* x, const T* r, int64_t rows, int64_t channels,
                      const float* m, const float* a, const float* b, Activation act,
                      bool stream);
  // sum(g) and sum(g * (x - m)) over i < n <= kRunChunk; writes g to gout when not null.
  void (*grad_sums_run)(const T* dy, const Upstream<T>& up, const T* x, T* gout, int64_t n,
                        float m, float za, float zb, double* sum_g, double* sum_gxc);
  // Per column c < width of a channels-last block (row r at offset r * stride): adds sum(g) to
  // acc_g[c] and sum(g * (x - m[c])) to acc_gxc[c] (float accumulators: keep rows small);
  // writes g to gout when not null. za, zb: per column (read with silu only).
  void (*grad_sums_rows)(const T* dy, const Upstream<T>& up, const T* x, T* gout, int64_t rows,
                         int64_t width, int64_t stride, const float* m, const float* za,
                         const float* zb, float* acc_g, float* acc_gxc);
  // dx[i] = a * g[i] + b * (x[i] - m) + c; g from dy as above. `stream` as above.
  void (*dx_run)(T* dx, const T* dy, const Upstream<T>& up, const T* x, int64_t n, float a,
                 float b, float m, float c, float za, float zb, bool stream);
  void (*dx_rows)(T* dx, const T* dy, const Upstream<T>& up, const T* x, int64_t rows,
                  int64_t channels, const float* a, const float* b, const float* m,
                  const float* c, const float* za, const float* zb, bool stream);
  // Per column c < width <= kColumnBlock of a channels-last block of rows >= 1 rows (row r at
  // offset r * stride): the column's mean[c] and M2 m2[c] (see ColumnMoments below).
  void (*column_moments)(const T* x, int64_t rows, int64_t stride, int64_t width, double* mean,
                         double* m2);
};

// Columns (channels) one column_moments call covers at most: its sums live on the stack.
constexpr int64_t kColumnBlock = 256;
// Rows whose shifted sums accumulate in float before they are added in double: few enough that
// the float rounding stays near 1e-6 relative.
constexpr int64_t kSumRows = 16;
// The channels-last statistics' pivot of a column: the mean of its first kPivotRows values. The
// one pass around it is kept where (mean - pivot)^2 <= kPivotSpread * variance; other columns
// get a second pass (see ColumnMoments).
constexpr int64_t kPivotRows = 8;
constexpr double kPivotSpread = 2.0;

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

// g at dy + i from dy and up (gn::Upstream); xc = x - m there. kSilu (up.silu, decided once
// per call, outside the loops) recomputes the forward's z = xc * za + zb + residual
// (AffineStep's arithmetic); else relu's mask or none.
template <bool kSilu, class D, typename T>
HWY_INLINE hn::Vec<D> UpstreamGradient(D d, const T* HWY_RESTRICT dy, const gn::Upstream<T>& up,
                                       int64_t i, hn::Vec<D> xc, hn::Vec<D> za, hn::Vec<D> zb) {
  if constexpr (!kSilu) {
    (void)xc, (void)za, (void)zb;
    return Gradient(d, dy + i, up.mask ? up.mask + i : nullptr);
  } else {
    auto z = hn::MulAdd(xc, za, zb);
    if (up.residual) z = hn::Add(z, LoadF(d, up.residual + i));
    return hn::Mul(LoadF(d, dy + i), SiluDerivative(d, z));
  }
}

// f(std::bool_constant<silu>).
template <class F>
HWY_INLINE void WithSilu(bool silu, F&& f) {
  if (silu) return f(std::true_type());
  f(std::false_type());
}

template <bool kResidual, int kAct, bool kStream = false, class D, typename T>
HWY_INLINE void AffineStep(D d, T* HWY_RESTRICT y, const T* HWY_RESTRICT x,
                           const T* HWY_RESTRICT r, hn::Vec<D> m, hn::Vec<D> a, hn::Vec<D> b) {
  auto v = hn::MulAdd(hn::Sub(LoadF(d, x), m), a, b);
  if constexpr (kResidual) v = hn::Add(v, LoadF(d, r));
  StoreOut<kStream>(Activate<kAct>(d, v), d, y);
}

// kStream: y with non-temporal stores (see ForEachInRun).
template <bool kResidual, int kAct, bool kStream, typename T>
void AffineRunT(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, const T* HWY_RESTRICT r, int64_t n,
                float m, float a, float b) {
  ForEachInRun<kStream>(y, n, [&](auto d, int64_t i, auto stream) {
    AffineStep<kResidual, kAct, decltype(stream)::value>(d, y + i, x + i, kResidual ? r + i : r,
                                                         hn::Set(d, m), hn::Set(d, a),
                                                         hn::Set(d, b));
  });
}

template <typename T>
void AffineRun(T* y, const T* x, const T* r, int64_t n, float m, float a, float b,
               Activation act, bool stream) {
  WithStream<T>(stream, [&](auto kS) {
    WithActivation(act, [&](auto kA) {
      constexpr bool S = decltype(kS)::value;
      constexpr int A = decltype(kA)::value;
      r ? AffineRunT<true, A, S>(y, x, r, n, m, a, b) : AffineRunT<false, A, S>(y, x, r, n, m, a, b);
    });
  });
}

// kStream: y with non-temporal stores where its rows allow (see ForEachInRows).
template <bool kResidual, int kAct, bool kStream, typename T>
void AffineRowsT(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, const T* HWY_RESTRICT r,
                 int64_t rows, int64_t channels, const float* m, const float* a,
                 const float* b) {
  ForEachInRows<kStream>(y, rows, channels, [&](auto d, int64_t o, int64_t c, auto stream) {
    AffineStep<kResidual, kAct, decltype(stream)::value>(d, y + o + c, x + o + c,
                                                         kResidual ? r + o + c : r,
                                                         hn::LoadU(d, m + c), hn::LoadU(d, a + c),
                                                         hn::LoadU(d, b + c));
  });
}

template <typename T>
void AffineRows(T* y, const T* x, const T* r, int64_t rows, int64_t channels, const float* m,
                const float* a, const float* b, Activation act, bool stream) {
  WithStream<T>(stream, [&](auto kS) {
    WithActivation(act, [&](auto kA) {
      constexpr bool S = decltype(kS)::value;
      constexpr int A = decltype(kA)::value;
      r ? AffineRowsT<true, A, S>(y, x, r, rows, channels, m, a, b)
        : AffineRowsT<false, A, S>(y, x, r, rows, channels, m, a, b);
    });
  });
}

template <bool kSilu, typename T>
void GradSumsRunT(const T* HWY_RESTRICT dy, const gn::Upstream<T>& up, const T* HWY_RESTRICT x,
                  T* HWY_RESTRICT gout, int64_t n, float m, float za, float zb, double* sum_g,
                  double* sum_gxc) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto vm = hn::Set(d, m), va = hn::Set(d, za), vb = hn::Set(d, zb);
  auto g0 = hn::Zero(d), g1 = hn::Zero(d), x0 = hn::Zero(d), x1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto xa = hn::Sub(LoadF(d, x + i), vm), xb = hn::Sub(LoadF(d, x + i + N), vm);
    const auto ga = UpstreamGradient<kSilu>(d, dy, up, i, xa, va, vb);
    const auto gb = UpstreamGradient<kSilu>(d, dy, up, i + N, xb, va, vb);
    if (gout) StoreF(ga, d, gout + i), StoreF(gb, d, gout + i + N);
    g0 = hn::Add(g0, ga);
    g1 = hn::Add(g1, gb);
    x0 = hn::MulAdd(ga, xa, x0);
    x1 = hn::MulAdd(gb, xb, x1);
  }
  for (; i + N <= n; i += N) {
    const auto xa = hn::Sub(LoadF(d, x + i), vm);
    const auto ga = UpstreamGradient<kSilu>(d, dy, up, i, xa, va, vb);
    if (gout) StoreF(ga, d, gout + i);
    g0 = hn::Add(g0, ga);
    x0 = hn::MulAdd(ga, xa, x0);
  }
  auto tg = hn::Zero(d1), tx = hn::Zero(d1);
  for (; i < n; ++i) {
    const auto xa = hn::Sub(LoadF(d1, x + i), hn::Set(d1, m));
    const auto ga = UpstreamGradient<kSilu>(d1, dy, up, i, xa, hn::Set(d1, za), hn::Set(d1, zb));
    if (gout) StoreF(ga, d1, gout + i);
    tg = hn::Add(tg, ga);
    tx = hn::MulAdd(ga, xa, tx);
  }
  *sum_g = SumLanes(d, hn::Add(g0, g1)) + hn::GetLane(tg);
  *sum_gxc = SumLanes(d, hn::Add(x0, x1)) + hn::GetLane(tx);
}

template <typename T>
void GradSumsRun(const T* dy, const gn::Upstream<T>& up, const T* x, T* gout, int64_t n, float m,
                 float za, float zb, double* sum_g, double* sum_gxc) {
  WithSilu(up.silu, [&](auto kSilu) {
    GradSumsRunT<decltype(kSilu)::value>(dy, up, x, gout, n, m, za, zb, sum_g, sum_gxc);
  });
}

template <bool kSilu, class D, typename T>
HWY_INLINE void GradSumsStep(D d, const T* HWY_RESTRICT dy, const gn::Upstream<T>& up,
                             int64_t i, const T* HWY_RESTRICT x, T* HWY_RESTRICT gout,
                             const float* m, const float* za, const float* zb, float* acc_g,
                             float* acc_gxc) {
  const auto xc = hn::Sub(LoadF(d, x + i), hn::LoadU(d, m));
  hn::Vec<D> g;
  if constexpr (kSilu) g = UpstreamGradient<true>(d, dy, up, i, xc, hn::LoadU(d, za), hn::LoadU(d, zb));
  else g = UpstreamGradient<false>(d, dy, up, i, xc, xc, xc);
  if (gout) StoreF(g, d, gout + i);
  hn::StoreU(hn::Add(hn::LoadU(d, acc_g), g), d, acc_g);
  hn::StoreU(hn::MulAdd(g, xc, hn::LoadU(d, acc_gxc)), d, acc_gxc);
}

template <bool kSilu, typename T>
void GradSumsRowsT(const T* HWY_RESTRICT dy, const gn::Upstream<T>& up, const T* HWY_RESTRICT x,
                   T* HWY_RESTRICT gout, int64_t rows, int64_t width, int64_t stride,
                   const float* m, const float* za, const float* zb, float* acc_g,
                   float* acc_gxc) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t at = row * stride;
    int64_t c = 0;
    for (; c + N <= width; c += N)
      GradSumsStep<kSilu>(d, dy, up, at + c, x, gout, m + c, za + c, zb + c, acc_g + c,
                          acc_gxc + c);
    for (; c < width; ++c)
      GradSumsStep<kSilu>(d1, dy, up, at + c, x, gout, m + c, za + c, zb + c, acc_g + c,
                          acc_gxc + c);
  }
}

template <typename T>
void GradSumsRows(const T* dy, const gn::Upstream<T>& up, const T* x, T* gout, int64_t rows,
                  int64_t width, int64_t stride, const float* m, const float* za,
                  const float* zb, float* acc_g, float* acc_gxc) {
  WithSilu(up.silu, [&](auto kSilu) {
    GradSumsRowsT<decltype(kSilu)::value>(dy, up, x, gout, rows, width, stride, m, za, zb, acc_g,
                                          acc_gxc);
  });
}

template <bool kSilu, bool kStream = false, class D, typename T>
HWY_INLINE void DxStep(D d, T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy,
                       const gn::Upstream<T>& up, int64_t i, const T* HWY_RESTRICT x,
                       hn::Vec<D> a, hn::Vec<D> b, hn::Vec<D> m, hn::Vec<D> c, hn::Vec<D> za,
                       hn::Vec<D> zb) {
  const auto xc = hn::Sub(LoadF(d, x + i), m);
  const auto g = UpstreamGradient<kSilu>(d, dy, up, i, xc, za, zb);
  StoreOut<kStream>(hn::MulAdd(a, g, hn::MulAdd(b, xc, c)), d, dx + i);
}

// kStream: dx with non-temporal stores (see ForEachInRun).
template <bool kStream, bool kSilu, typename T>
void DxRunT(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const gn::Upstream<T>& up,
            const T* HWY_RESTRICT x, int64_t n, float a, float b, float m, float c, float za,
            float zb) {
  ForEachInRun<kStream>(dx, n, [&](auto d, int64_t i, auto stream) {
    DxStep<kSilu, decltype(stream)::value>(d, dx, dy, up, i, x, hn::Set(d, a), hn::Set(d, b),
                                    hn::Set(d, m), hn::Set(d, c), hn::Set(d, za), hn::Set(d, zb));
  });
}

template <typename T>
void DxRun(T* dx, const T* dy, const gn::Upstream<T>& up, const T* x, int64_t n, float a,
           float b, float m, float c, float za, float zb, bool stream) {
  WithStream<T>(stream, [&](auto kS) {
    WithSilu(up.silu, [&](auto kSilu) {
      DxRunT<decltype(kS)::value, decltype(kSilu)::value>(dx, dy, up, x, n, a, b, m, c, za, zb);
    });
  });
}

// kStream: dx with non-temporal stores where its rows allow (see ForEachInRows).
template <bool kStream, bool kSilu, typename T>
void DxRowsT(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const gn::Upstream<T>& up,
             const T* HWY_RESTRICT x, int64_t rows, int64_t channels, const float* a,
             const float* b, const float* m, const float* c, const float* za, const float* zb) {
  ForEachInRows<kStream>(dx, rows, channels, [&](auto d, int64_t o, int64_t k, auto stream) {
    const auto va = kSilu ? hn::LoadU(d, za + k) : hn::Zero(d);
    const auto vb = kSilu ? hn::LoadU(d, zb + k) : hn::Zero(d);
    DxStep<kSilu, decltype(stream)::value>(d, dx, dy, up, o + k, x, hn::LoadU(d, a + k),
                                    hn::LoadU(d, b + k), hn::LoadU(d, m + k), hn::LoadU(d, c + k),
                                    va, vb);
  });
}

template <typename T>
void DxRows(T* dx, const T* dy, const gn::Upstream<T>& up, const T* x, int64_t rows,
            int64_t channels, const float* a, const float* b, const float* m, const float* c,
            const float* za, const float* zb, bool stream) {
  WithStream<T>(stream, [&](auto kS) {
    WithSilu(up.silu, [&](auto kSilu) {
      DxRowsT<decltype(kS)::value, decltype(kSilu)::value>(dx, dy, up, x, rows, channels, a, b,
                                                           m, c, za, zb);
    });
  });
}

// s[i] += v[i] for the lanes of v, in double: the conversion is exact and the add IEEE at any
// vector width, so a column's sum does not depend on its lane or on the tail.
template <class D>
HWY_INLINE void AddToDouble(D d, hn::Vec<D> v, double* HWY_RESTRICT s) {
  if constexpr (std::is_same_v<D, D1>) {
    (void)d;
    s[0] += double(hn::GetLane(v));
  } else {
#if HWY_TARGET != HWY_SCALAR
    const hn::Half<D> dh;
    const hn::Repartition<double, D> dd;
    const int64_t H = int64_t(hn::Lanes(dd));
    hn::StoreU(hn::Add(hn::LoadU(dd, s), hn::PromoteTo(dd, hn::LowerHalf(dh, v))), dd, s);
    hn::StoreU(hn::Add(hn::LoadU(dd, s + H), hn::PromoteTo(dd, hn::UpperHalf(dh, v))), dd,
               s + H);
#endif
  }
}

// Adds to s1[j0 + i] and s2[j0 + i] the sums of x - center and (x - center)^2 over the rows of
// the K vectors (of d) of columns from j0: per kSumRows rows, 2K float accumulators held in
// registers through a walk of the rows in order, then added in double. The arithmetic of a
// column is the same in every lane, in the tail and in any stripe. Rows in order, in pieces of
// up to 16 vectors: this pass reads the block from memory, and long pieces of rows in order are
// what the hardware prefetchers stream (the shared column kernel's stripes of a few vectors per
// row stall on the loads).
template <int K, class D, typename T>
HWY_INLINE void PivotStripe(D d, const T* HWY_RESTRICT x, int64_t rows, int64_t stride,
                            int64_t j0, const float* HWY_RESTRICT center,
                            double* HWY_RESTRICT s1, double* HWY_RESTRICT s2) {
  const int64_t N = int64_t(hn::Lanes(d));
  hn::Vec<D> c[K];
  for (int k = 0; k < K; ++k) c[k] = hn::LoadU(d, center + j0 + k * N);
  for (int64_t r0 = 0; r0 < rows; r0 += gn::kSumRows) {
    hn::Vec<D> a[K], b[K];
    for (int k = 0; k < K; ++k) a[k] = hn::Zero(d), b[k] = hn::Zero(d);
    const int64_t r1 = std::min(r0 + gn::kSumRows, rows);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * stride + j0;
      for (int k = 0; k < K; ++k) {
        const auto v = hn::Sub(LoadF(d, row + k * N), c[k]);
        a[k] = hn::Add(a[k], v);
        b[k] = hn::MulAdd(v, v, b[k]);
      }
    }
    for (int k = 0; k < K; ++k) {
      AddToDouble(d, a[k], s1 + j0 + k * N);
      AddToDouble(d, b[k], s2 + j0 + k * N);
    }
  }
}

// s1[j] = sum(x - center[j]), s2[j] = sum((x - center[j])^2) over the rows of column j < width.
template <typename T>
void PivotColumnSums(const T* HWY_RESTRICT x, int64_t rows, int64_t stride, int64_t width,
                     const float* HWY_RESTRICT center, double* HWY_RESTRICT s1,
                     double* HWY_RESTRICT s2) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  std::fill(s1, s1 + width, 0.0);
  std::fill(s2, s2 + width, 0.0);
  // kSumRows rows at a time across the whole width: the stripes of a few kilobytes of rows
  // follow each other through the same lines, which stay close to the core.
  for (int64_t r0 = 0; r0 < rows; r0 += gn::kSumRows) {
    const T* xr = x + r0 * stride;
    const int64_t n = std::min(gn::kSumRows, rows - r0);
    int64_t j = 0;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
    // 16 vectors, a whole kColumnBlock: the longest pieces of rows, in order, are what the
    // prefetchers stream from memory (2x256x200x304: 0.92x the two-pass time with 16, 1.12x
    // with 8). Its 32 accumulators fill AVX-512's registers; the centers come from L1.
    for (; j + 16 * N <= width; j += 16 * N)
      PivotStripe<16>(d, xr, n, stride, j, center, s1, s2);
    // 8 centers and 16 accumulators: 24 of the 32 registers; other targets have 16.
    for (; j + 8 * N <= width; j += 8 * N) PivotStripe<8>(d, xr, n, stride, j, center, s1, s2);
#endif
    for (; j + 4 * N <= width; j += 4 * N) PivotStripe<4>(d, xr, n, stride, j, center, s1, s2);
    for (; j + N <= width; j += N) PivotStripe<1>(d, xr, n, stride, j, center, s1, s2);
    for (; j < width; ++j) PivotStripe<1>(d1, xr, n, stride, j, center, s1, s2);
  }
}

// center[j] = the mean of the first min(rows, kPivotRows) values of column j < width, in float
// (the sum of x / n in row order, which cannot overflow): near the column's mean, at the scale of
// its values.
template <typename T>
void ColumnPivots(const T* HWY_RESTRICT x, int64_t rows, int64_t stride, int64_t width,
                  float* HWY_RESTRICT center) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const int64_t n = std::min(rows, gn::kPivotRows);
  const float inv = 1.0f / float(n);
  auto pivots = [&](auto dd, int64_t j) {
    const auto vinv = hn::Set(dd, inv);
    auto sum = hn::Mul(LoadF(dd, x + j), vinv);
    for (int64_t r = 1; r < n; ++r) sum = hn::MulAdd(LoadF(dd, x + r * stride + j), vinv, sum);
    hn::StoreU(sum, dd, center + j);
  };
  int64_t j = 0;
  for (; j + N <= width; j += N) pivots(d, j);
  for (; j < width; ++j) pivots(d1, j);
}

// Whether a column's one-pass sums s1 = sum(x - p), s2 = sum((x - p)^2) of `count` values are
// kept: (mean - p)^2 <= kPivotSpread * variance, i.e. s1^2 <= kPivotSpread * count * M2. False
// for NaN.
inline bool NearPivot(double s1, double s2, double count) {
  return s1 * s1 <= gn::kPivotSpread * count * (s2 - s1 * s1 / count);
}

// A column's mean and M2 from its sums s1, s2 of `count` values around c.
inline void FinishColumn(double s1, double s2, double count, float c, double* HWY_RESTRICT mean,
                         double* HWY_RESTRICT m2) {
  const double v = s2 - s1 * s1 / count;
  *m2 = v < 0 ? 0.0 : v;  // below 0 by rounding only; NaN passes through
  *mean = double(c) + s1 / count;
}

// ColumnMoments's columns far from their pivots (s1, s2: their one-pass sums; mean: their
// one-pass means) again, from cache, a vector of columns at a time, around their float means:
// overwrites their mean and m2.
template <typename T>
HWY_NOINLINE void FarColumns(const T* HWY_RESTRICT x, int64_t rows, int64_t stride,
                             int64_t width, const double* HWY_RESTRICT s1,
                             const double* HWY_RESTRICT s2, double* HWY_RESTRICT mean,
                             double* HWY_RESTRICT m2) {
  const int64_t N = int64_t(hn::Lanes(DF()));
  const double count = double(rows);
  auto far = [&](int64_t j) { return !NearPivot(s1[j], s2[j], count); };
  float c[gn::kColumnBlock];
  double t1[gn::kColumnBlock], t2[gn::kColumnBlock];
  for (int64_t j0 = 0; j0 < width; j0 += N) {
    const int64_t w = std::min(N, width - j0);
    bool any = false;
    for (int64_t j = j0; j < j0 + w; ++j) any |= far(j);
    if (!any) continue;
    for (int64_t j = j0; j < j0 + w; ++j) c[j] = float(mean[j]);
    PivotColumnSums(x + j0, rows, stride, w, c + j0, t1 + j0, t2 + j0);
    for (int64_t j = j0; j < j0 + w; ++j)
      if (far(j)) FinishColumn(t1[j], t2[j], count, c[j], mean + j, m2 + j);
  }
}

// Per column of a channels-last block: one pass from memory sums d = x - p and d^2 around a
// pivot p near the column's mean (ColumnPivots), so mean = p + sum(d) / n and
// M2 = sum(d^2) - sum(d)^2 / n. The rounding of that M2 grows with 1 + (mean - p)^2 / variance
// (the sums of d^2 hold n * (mean - p)^2 besides M2), so a column whose mean lies further from
// its pivot than kPivotSpread allows (first values that are outliers, a drift, NaN or an
// infinity) gets a second pass while the block is in cache, around float(mean) (the corrected
// two-pass algorithm): every column's M2 is as accurate as one centred within sqrt(kPivotSpread)
// standard deviations of its mean, whatever the offset. A column's result depends on its own
// values only.
template <typename T>
void ColumnMoments(const T* HWY_RESTRICT x, int64_t rows, int64_t stride, int64_t width,
                   double* HWY_RESTRICT mean, double* HWY_RESTRICT m2) {
  float center[gn::kColumnBlock] = {};  // zeroed for -Wmaybe-uninitialized; [0, width) is set
  double s1[gn::kColumnBlock], s2[gn::kColumnBlock];
  ColumnPivots(x, rows, stride, width, center);
  PivotColumnSums(x, rows, stride, width, center, s1, s2);
  // Every column's one-pass result, and whether any is far: branch-free, so vectorized.
  const double count = double(rows);
  int any_far = 0;
  for (int64_t j = 0; j < width; ++j) {
    any_far |= !NearPivot(s1[j], s2[j], count);
    FinishColumn(s1[j], s2[j], count, center[j], mean + j, m2 + j);
  }
  if (any_far) FarColumns(x, rows, stride, width, s1, s2, mean, m2);
}

template <typename T>
const gn::Kernels<T>* KernelTable() {
  static const gn::Kernels<T> k{&AffineRun<T>,  &AffineRows<T>, &GradSumsRun<T>,
                                &GradSumsRows<T>, &DxRun<T>,    &DxRows<T>,
                                &ColumnMoments<T>};
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

using gn::kColumnBlock;

template <typename T>
const gn::Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(KernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(KernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(KernelsF16)();
}

constexpr int64_t kUnitElements = 32768;  // target size of a channels-last work unit
// Rows of a channels-last statistics unit, at least: the per-channel work of a unit (the
// merge into groups) is paid once per this many rows.
constexpr int64_t kMinStatisticsRows = 64;

// Channels-last work: per sample, `spatial` rows of `channels` values. A unit is a range of
// unit_rows rows, walked in blocks of block_rows (the in-cache chunk of the gradient sums).
struct RowBlocks {
  int64_t block, unit_rows, units_per_sample;
  RowBlocks(int64_t spatial, int64_t channels) {
    block = block_rows(channels);
    unit_rows = block * std::max<int64_t>(1, kUnitElements / (block * std::max<int64_t>(channels, 1)));
    units_per_sample = (spatial + unit_rows - 1) / unit_rows;
  }
};

// Channels-last statistics units: ranges of at least kMinStatisticsRows rows of one sample.
struct StatisticsUnits {
  int64_t unit_rows, units_per_sample;
  StatisticsUnits(int64_t spatial, int64_t channels) {
    unit_rows = std::max(RowBlocks(spatial, channels).unit_rows, kMinStatisticsRows);
    units_per_sample = (spatial + unit_rows - 1) / unit_rows;
  }
};

}  // namespace

// ---- scratch ----
GroupNormScratch group_norm_scratch(const GroupNormShape& t) {
  GroupNormScratch l;
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  if (N * C * S == 0) return l;  // nothing needs scratch (see the early returns below)
  const int64_t NC = N * C, NG = N * G;
  const bool channels_first = t.format == MemoryFormat::channels_first;
  ScratchLayout s;
  l.groups = s.add<Moments>(NG);
  l.pieces = s.add<Moments>(channels_first ? runs_moments_scratch_size(NG, (C / G) * S)
                                           : N * StatisticsUnits(S, C).units_per_sample * G);
  l.stats = s.add<double>(2, NG);
  l.forward_coef = s.add<float>(3, NC);
  s.rewind(0);
  l.sums = s.add<double>(2, NC);
  // One partial per (n, c) row piece (channels-first) or per (unit, channel) (channels-last).
  const int64_t units = channels_first ? NC : N * RowBlocks(S, C).units_per_sample;
  const int64_t per_unit = channels_first ? RowPieces(NC, S).stride : C;
  l.partial_dy = s.add<double>(units, per_unit);
  l.partial_xc = s.add<double>(units, per_unit);
  l.backward_coef = s.add<float>(4, NC);
  l.silu_coef = s.add<float>(2, NC);
  l.channel_mean = s.add<float>(channels_first ? 0 : NC);
  l.bytes = s.workspace_bytes();
  return l;
}

namespace {

struct ForwardScratch {
  Moments* groups;  // N*G
  Moments* pieces;  // per-piece (channels-first) or per-unit (channels-last) moments
  double* stats;    // 2*N*G: mean, rstd
  float* coef;      // 3*N*C: m, a, b
};
ForwardScratch carve_forward(const GroupNormScratch& l, std::span<std::byte> workspace) {
  std::byte* base = scratch_base(workspace, l.bytes);
  return {scratch_part<Moments>(base, l.groups), scratch_part<Moments>(base, l.pieces),
          scratch_part<double>(base, l.stats), scratch_part<float>(base, l.forward_coef)};
}

struct BackwardScratch {
  double* sums;     // 2*N*C: sum(g), sum(g * (x - mean))
  double* partial_dy;  // per-unit partials of the two sums
  double* partial_xc;
  float* coef;      // 4*N*C: dx coefficients
  float* silu_coef;  // 2*N*C: the forward's za, zb (silu)
  float* mean_c;    // N*C (channels-last): each channel's group mean
};
BackwardScratch carve_backward(const GroupNormScratch& l, std::span<std::byte> workspace) {
  std::byte* base = scratch_base(workspace, l.bytes);
  return {scratch_part<double>(base, l.sums), scratch_part<double>(base, l.partial_dy),
          scratch_part<double>(base, l.partial_xc), scratch_part<float>(base, l.backward_coef),
          scratch_part<float>(base, l.silu_coef), scratch_part<float>(base, l.channel_mean)};
}

// ---- statistics ----

// Moments of each of `groups` groups of k sets of `count` values each (group g's sets at
// mean + g * k, m2 + g * k) into out[g], from the sets' means and M2s: the mean of the means,
// and M2 = sum(m2) + count * sum((mean - overall mean)^2) (exact for equal counts; no division
// per set, unlike a chain of merges). The groups go side by side so that their dependent sums
// overlap; each group's operations and their order are the same whatever `groups` is.
inline void equal_count_moments(const double* mean, const double* m2, int64_t groups, int64_t k,
                                double count, Moments* out) {
  if (k == 1) {
    for (int64_t g = 0; g < groups; ++g) out[g] = {count, mean[g], m2[g]};
    return;
  }
  double mu[kColumnBlock], total[kColumnBlock];
  for (int64_t g = 0; g < groups; ++g) mu[g] = 0, total[g] = 0;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t g = 0; g < groups; ++g) mu[g] += mean[g * k + i];
  for (int64_t g = 0; g < groups; ++g) mu[g] /= double(k);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t g = 0; g < groups; ++g) {
      const double d = mean[g * k + i] - mu[g];
      total[g] += m2[g * k + i] + count * d * d;
    }
  for (int64_t g = 0; g < groups; ++g) out[g] = {count * double(k), mu[g], total[g]};
}

// Channels-last statistics. Per unit (a range of rows of one sample, small enough to stay in
// the per-core cache) and per block of up to kColumnBlock channels, the SIMD kernel
// column_moments gives each channel's mean and M2 (one pass over the block around a pivot; a
// second, from cache, for the channels whose pivot is far from their mean: ColumnMoments).
// Channels join their group in channel order, then the units of (n, g) merge in order: fixed by
// the shape, whatever the threads.

// The G group moments of unit u into gm.
template <typename T>
void unit_group_moments(const gn::Kernels<T>& k, const T* x, const GroupNormShape& t,
                        const StatisticsUnits& su, int64_t u, Moments* gm) {
  const int64_t C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  const int64_t n = u / su.units_per_sample, q = u % su.units_per_sample;
  const int64_t r_begin = q * su.unit_rows, rows = std::min(S - r_begin, su.unit_rows);
  const T* base = x + (n * S + r_begin) * C;
  const double count = double(rows);
  std::fill(gm, gm + G, Moments{});
  double mean[kColumnBlock], m2[kColumnBlock];
  for (int64_t c0 = 0; c0 < C; c0 += kColumnBlock) {
    const int64_t width = std::min(kColumnBlock, C - c0);
    k.column_moments(base + c0, rows, C, width, mean, m2);
    // The block's part of each group: the groups wholly inside it side by side (written over
    // their still empty moments: merge(empty, m) is m), the ones it cuts one by one.
    const int64_t c1 = c0 + width;
    const int64_t g_first = (c0 + per_group - 1) / per_group, g_end = c1 / per_group;
    int64_t c = c0;
    auto part = [&](int64_t end) {
      const int64_t g = c / per_group;
      Moments m;
      equal_count_moments(mean + (c - c0), m2 + (c - c0), 1, end - c, count, &m);
      gm[g] = merge(gm[g], m);
      c = end;
    };
    if (c < g_first * per_group) part(std::min(c1, g_first * per_group));
    if (g_end > g_first) {
      equal_count_moments(mean + (c - c0), m2 + (c - c0), g_end - g_first, per_group, count,
                          gm + g_first);
      c = g_end * per_group;
    }
    if (c < c1) part(c1);
  }
}

// Moments of group (n, g) from its units' moments, in unit order.
inline Moments merge_units(const Moments* unit_moments, const StatisticsUnits& su, int64_t G,
                           int64_t n, int64_t g) {
  Moments m;
  for (int64_t q = 0; q < su.units_per_sample; ++q)
    m = merge(m, unit_moments[(n * su.units_per_sample + q) * G + g]);
  return m;
}

// out: N*G group moments; unit_moments: N * units_per_sample * G of scratch.
template <typename T>
void channels_last_group_moments(const T* x, const GroupNormShape& t, Moments* out,
                                 Moments* unit_moments, int num_threads, bool parallel) {
  const int64_t G = t.groups;
  const StatisticsUnits su(t.spatial, t.channels);
  const int64_t units = t.batch * su.units_per_sample;
  const auto& k = kernels<T>();
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t u = 0; u < units; ++u) unit_group_moments(k, x, t, su, u, unit_moments + u * G);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
  for (int64_t i = 0; i < t.batch * G; ++i)
    out[i] = merge_units(unit_moments, su, G, i / G, i % G);
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

// Coefficients of sample n (C each of m, a, b) from its groups' mean and rstd.
inline void fold_sample(const double* mean, const double* rstd, const float* weight,
                        const float* bias, const GroupNormShape& t, int64_t n, float* m, float* a,
                        float* b) {
  const int64_t C = t.channels, G = t.groups, per_group = C / G;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t i = n * G + c / per_group;
    const Coef f = fold(mean[i], rstd[i], weight, bias, c);
    m[c] = f.m;
    a[c] = f.a;
    b[c] = f.b;
  }
}

// coef: 3 * N * C floats of scratch.
template <typename T>
void fold_and_apply(T* y, const T* x, const double* mean, const double* rstd,
                    const float* weight, const float* bias, const GroupNormShape& t,
                    int num_threads, bool parallel, const ForwardEpilogueOf<T>& epi,
                    float* coef) {
  const int64_t N = t.batch, C = t.channels, S = t.spatial;
  const auto& k = kernels<T>();
  float* m = coef;
  float* a = m + N * C;
  float* b = a + N * C;
  for (int64_t n = 0; n < N; ++n)
    fold_sample(mean, rstd, weight, bias, t, n, m + n * C, a + n * C, b + n * C);
  const T* r = epi.residual;
  const bool stream = streams_output<T>(N * C * S);
  if (t.format == MemoryFormat::channels_first) {
    const RowPieces p(N * C, S);
    parallel_for(p.units, num_threads, parallel, stream, [&](int64_t u) {
      p.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        const int64_t at = row * S + lo;
        k.affine_run(y + at, x + at, r ? r + at : nullptr, hi - lo, m[row], a[row], b[row],
                     epi.activation, stream);
      });
    });
  } else {
    const RowBlocks rb(S, C);
    parallel_for(N * rb.units_per_sample, num_threads, parallel, stream, [&](int64_t u) {
      const int64_t n = u / rb.units_per_sample, r0 = (u % rb.units_per_sample) * rb.unit_rows;
      const int64_t rows = std::min(S - r0, rb.unit_rows);
      const int64_t at = (n * S + r0) * C;
      k.affine_rows(y + at, x + at, r ? r + at : nullptr, rows, C, m + n * C, a + n * C,
                    b + n * C, epi.activation, stream);
    });
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

// The forward is a plan, chosen once per call (plan_group_norm, below), over three phases: the
// group statistics (channels-first runs, cut into kRunChunk pieces merged in order; or
// channels-last units of rows, their channels joined to groups in channel order and the units
// merged in order), the fold of each channel's coefficients, and the output pass. Every
// schedule computes them from the same pieces in the same order (run_moments equals the ordered
// merge of its pieces), so which one runs changes no bit.
namespace {

using ForwardSchedule = GroupNormForwardSchedule;

ForwardSchedule plan_forward(const GroupNormShape& t, int64_t value_bytes, int num_threads) {
  const int64_t group_bytes = (t.channels / t.groups) * t.spatial * value_bytes;
  const int64_t sample_bytes = t.channels * t.spatial * value_bytes;
  const int64_t threads = std::max(num_threads, 1);
  if (t.format == MemoryFormat::channels_first && t.batch * t.groups >= threads &&
      group_bytes <= cached_unit_bytes())
    return ForwardSchedule::cached_groups;
  if (t.format == MemoryFormat::channels_last && t.batch >= threads &&
      sample_bytes <= cached_unit_bytes())
    return ForwardSchedule::cached_samples;
  return ForwardSchedule::two_phase;
}

}  // namespace

template <typename T>
void group_norm_forward(const GroupNormPlan& plan, double eps, const ForwardEpilogueOf<T>& epi,
                        const T* x, const float* weight, const float* bias, T* y, float* mean,
                        float* rstd, float* variance, std::span<std::byte> workspace) {
  const GroupNormShape& t = plan.shape;
  const int num_threads = plan.num_threads;
  const bool parallel = plan.parallel;
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  if (N == 0) return;
  if (C * S == 0) {  // empty groups (y has no elements): mean 0, rstd NaN
    double mu, rs;
    for (int64_t i = 0; i < N * G; ++i)
      finish_stats(Moments{}, eps, &mu, &rs, mean + i, rstd + i, variance ? variance + i : nullptr);
    return;
  }
  const int64_t per_group = C / G;
  const int64_t group_len = per_group * S;
  const bool stream = streams_output<T>(N * C * S);  // y with non-temporal stores
  const auto& k = kernels<T>();
  const T* r = epi.residual;
  float* var = variance;
  auto finish = [&](const Moments& mo, double* mu, double* rs, int64_t i) {
    finish_stats(mo, eps, mu, rs, mean + i, rstd + i, var ? var + i : nullptr);
  };

  switch (plan.forward) {
    case ForwardSchedule::cached_groups:
      // Two groups' statistics side by side where they fit; a group's channels right after.
      for_each_run_moments(x, N * G, group_len, cached_unit_bytes(), num_threads, parallel, stream,
                           [&](int64_t i, const Moments& mo) {
        const int64_t n = i / G, g = i % G;
        double mu, rs;
        finish(mo, &mu, &rs, i);
        for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
          const Coef f = fold(mu, rs, weight, bias, c);
          const int64_t at = (n * C + c) * S;
          k.affine_run(y + at, x + at, r ? r + at : nullptr, S, f.m, f.a, f.b, epi.activation, stream);
        }
      });
      return;

    case ForwardSchedule::cached_samples: {
      const ForwardScratch s = carve_forward(plan.scratch, workspace);
      double* mu = s.stats;
      double* rs = mu + N * G;
      const StatisticsUnits su(S, C);
      parallel_for(N, num_threads, parallel, stream, [&](int64_t n) {
        for (int64_t q = 0; q < su.units_per_sample; ++q) {
          const int64_t u = n * su.units_per_sample + q;
          unit_group_moments(k, x, t, su, u, s.pieces + u * G);
        }
        for (int64_t i = n * G; i < (n + 1) * G; ++i)
          finish(merge_units(s.pieces, su, G, n, i % G), mu + i, rs + i, i);
        float* m = s.coef + n * C;
        float* a = m + N * C;
        float* b = a + N * C;
        fold_sample(mu, rs, weight, bias, t, n, m, a, b);
        const int64_t at = n * S * C;
        k.affine_rows(y + at, x + at, r ? r + at : nullptr, S, C, m, a, b, epi.activation, stream);
      });
      return;
    }

    case ForwardSchedule::two_phase: {
      const ForwardScratch s = carve_forward(plan.scratch, workspace);
      double* mu = s.stats;
      double* rs = mu + N * G;
      if (t.format == MemoryFormat::channels_first)
        runs_moments(x, N * G, group_len, s.groups, parallel ? num_threads : 1, s.pieces);
      else
        channels_last_group_moments(x, t, s.groups, s.pieces, num_threads, parallel);
      for (int64_t i = 0; i < N * G; ++i) finish(s.groups[i], mu + i, rs + i, i);
      fold_and_apply(y, x, mu, rs, weight, bias, t, num_threads, parallel, epi, s.coef);
      return;
    }
  }
}

template <typename T>
void group_norm_statistics(const GroupNormPlan& plan, double eps, const T* x, float* mean,
                           float* rstd, float* variance, std::span<std::byte> workspace) {
  const GroupNormShape& t = plan.shape;
  const int64_t N = t.batch, G = t.groups;
  if (N == 0) return;
  double mu, rs;
  if (t.channels * t.spatial == 0) {  // empty groups: mean 0, rstd NaN
    for (int64_t i = 0; i < N * G; ++i)
      finish_stats(Moments{}, eps, &mu, &rs, mean + i, rstd + i, variance ? variance + i : nullptr);
    return;
  }
  // The two-phase schedule's statistics: every schedule's, bitwise.
  const ForwardScratch s = carve_forward(plan.scratch, workspace);
  if (t.format == MemoryFormat::channels_first)
    runs_moments(x, N * G, (t.channels / G) * t.spatial, s.groups,
                 plan.parallel ? plan.num_threads : 1, s.pieces);
  else
    channels_last_group_moments(x, t, s.groups, s.pieces, plan.num_threads, plan.parallel);
  for (int64_t i = 0; i < N * G; ++i)
    finish_stats(s.groups[i], eps, &mu, &rs, mean + i, rstd + i, variance ? variance + i : nullptr);
}

template <typename T>
void group_norm_apply(const GroupNormPlan& plan, const ForwardEpilogueOf<T>& epi, const T* x,
                      const float* mean, const float* rstd, const float* weight,
                      const float* bias, T* y, std::span<std::byte> workspace) {
  const GroupNormShape& t = plan.shape;
  const int64_t NG = t.batch * t.groups;
  if (t.batch * t.channels * t.spatial == 0) return;  // y has no elements
  const ForwardScratch s = carve_forward(plan.scratch, workspace);
  double* mu = s.stats;
  double* rs = mu + NG;
  for (int64_t i = 0; i < NG; ++i) mu[i] = mean[i], rs[i] = rstd[i];
  fold_and_apply(y, x, mu, rs, weight, bias, t, plan.num_threads, plan.parallel, epi, s.coef);
}

// Per (n, g), over its M = (C/G) * S elements, with g_i = gin_i * w[c] (gin the incoming gradient
// after the epilogue: dy masked by relu, or dy * silu'(z)) and sum_dy[c] = sum_s gin, sum_dy_xc[c] = sum_s gin * (x - mean):
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//      = (rstd * w[c]) * gin + b * (x - mean) + c0, with
//   b  = -rstd^3 / M * sum_c w[c] * sum_dy_xc[c]     (through rstd)
//   c0 = -rstd / M * sum_c w[c] * sum_dy[c]          (through mean)
// and b = c0 = 0 when the statistics are constants.
//   dweight[c] = sum_n rstd[n, g] * sum_dy_xc[n, c],  dbias[c] = sum_n sum_dy[n, c].
//
// The backward is a plan, chosen once per call (plan_group_norm, below), over four phases: the
// per-(n, c) sums (of channels-first pieces or channels-last row blocks, each merged in a fixed
// order), the dx coefficients of each group, dweight and dbias, and dx. Every schedule runs the
// same phase functions on the same pieces, so which one runs changes no bit.
namespace {

using BackwardSchedule = GroupNormBackwardSchedule;

BackwardSchedule plan_backward(const GroupNormShape& t, bool need_sums, bool third_input,
                               int64_t value_bytes, int num_threads) {
  if (t.format == MemoryFormat::channels_last) return BackwardSchedule::channels_last;
  const int64_t group_bytes =
      (t.channels / t.groups) * t.spatial * value_bytes * (third_input ? 3 : 2);
  const bool enough_groups = t.batch * t.groups >= std::max(num_threads, 1);
  return need_sums && enough_groups && group_bytes <= cached_unit_bytes()
             ? BackwardSchedule::cached_groups
             : BackwardSchedule::two_phase;
}

// One backward call: its arguments, its scratch, and the phases over them.
template <typename T>
struct GroupNormBackward {
  // arguments
  T* dx;
  float* dweight;
  float* dbias;
  const T* dy;
  const T* x;
  const float* mean;
  const float* rstd;
  const float* weight;
  GroupNormShape t;
  bool stats_are_constants;
  gn::Upstream<T> up;  // how g is made from dy (relu's mask, or silu's z)
  const float* bias;   // silu: the forward's bias (null: none)
  T* gout;             // dresidual: receives g
  bool stream;         // dx with non-temporal stores
  // derived
  const gn::Kernels<T>& k = kernels<T>();
  int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  // With dresidual written, dx reads g back from it (one stream instead of dy and y or the
  // residual) where that is exact: g is dy or 0 (relu, none), or float32 (silu). A 16-bit g
  // would be a rounding the sums did not see, so silu then recomputes it.
  bool g_stored = gout && (!up.silu || std::is_same_v<T, float>);
  const T* gin = g_stored ? gout : dy;
  gn::Upstream<T> dx_up = g_stored ? gn::Upstream<T>{} : up;
  // scratch
  double* sum_dy;     // per (n, c): sum(g)
  double* sum_dy_xc;  // per (n, c): sum(g * (x - mean))
  double* partial_dy;  // per unit (a channels-first row piece, a channels-last block of rows)
  double* partial_xc;
  float *ca, *cb, *cc, *cm;  // dx = ca * g + cb * (x - cm) + cc, per (n, c)
  float *za, *zb;            // silu: the forward's z = (x - cm) * za + zb + residual, per (n, c)
  float* mean_c;             // channels-last: the mean of each channel's group

  GroupNormBackward(const GroupNormShape& shape, T* dx_, float* dweight_, float* dbias_,
                    const T* dy_, const T* x_, const float* mean_, const float* rstd_,
                    const float* weight_, bool constants, const BackwardEpilogueOf<T>& epi,
                    const BackwardScratch& s)
      : dx(dx_), dweight(dweight_), dbias(dbias_), dy(dy_), x(x_), mean(mean_), rstd(rstd_),
        weight(weight_), t(shape), stats_are_constants(constants),
        up{epi.relu() ? epi.y : nullptr, epi.silu(), epi.silu() ? epi.residual : nullptr},
        bias(epi.silu() ? epi.bias : nullptr), gout(epi.dresidual),
        stream(streams_output<T>(shape.batch * shape.channels * shape.spatial)),
        sum_dy(s.sums), sum_dy_xc(s.sums + N * C), partial_dy(s.partial_dy),
        partial_xc(s.partial_xc), ca(s.coef), cb(ca + N * C), cc(cb + N * C),
        cm(cc + N * C), za(s.silu_coef), zb(za + N * C), mean_c(s.mean_c) {}

  // ---- phase 0 (silu): the forward's coefficients of z for channel i = (n, c) ----
  // za as the dx coefficient ca (rstd * w), zb the bias: the saved float mean is m itself, so
  // the forward's fold (m, a, b) is this up to the rounding of rstd.
  void silu_coefficients(int64_t i) {
    const int64_t c = i % C;
    za[i] = float(double(rstd[(i / C) * G + c / per_group]) * (weight ? double(weight[c]) : 1.0));
    zb[i] = bias ? bias[c] : 0.0f;
  }

  // ---- phase 1: the per-(n, c) sums ----
  // Channels-first: the sums of piece `piece` = [lo, hi) of (n, c) row `row` (also writing
  // dresidual there), into its partial slot.
  void row_piece_sums(const RowPieces& p, int64_t row, int64_t piece, int64_t lo, int64_t hi) {
    const float m = mean[(row / C) * G + (row % C) / per_group];
    const int64_t at = row * S + lo;
    k.grad_sums_run(dy + at, up.at(at), x + at, gout ? gout + at : nullptr, hi - lo, m,
                    up.silu ? za[row] : 0.0f, up.silu ? zb[row] : 0.0f,
                    &partial_dy[row * p.stride + piece], &partial_xc[row * p.stride + piece]);
  }
  // A row's sums: its pieces' partials added in piece order.
  void merge_row_sums(const RowPieces& p, int64_t row) {
    double sd = 0, sx = 0;
    for (int64_t q = 0; q < p.stride; ++q)
      sd += partial_dy[row * p.stride + q], sx += partial_xc[row * p.stride + q];
    sum_dy[row] = sd;
    sum_dy_xc[row] = sx;
  }
  // Channels-last: unit u's partial sums of every channel over its blocks of rows.
  void block_sums(const RowBlocks& rb, int64_t u) {
    float ag[kColumnBlock], ax[kColumnBlock];
    const int64_t n = u / rb.units_per_sample, q = u % rb.units_per_sample;
    const int64_t r_end = std::min(S, (q + 1) * rb.unit_rows);
    double* pd = partial_dy + u * C;
    double* px = partial_xc + u * C;
    std::fill(pd, pd + C, 0.0);
    std::fill(px, px + C, 0.0);
    for (int64_t r0 = q * rb.unit_rows; r0 < r_end; r0 += rb.block) {
      const int64_t rows = std::min(rb.block, r_end - r0);
      // Blocks of columns: the float accumulators live on the stack.
      for (int64_t c0 = 0; c0 < C; c0 += kColumnBlock) {
        const int64_t width = std::min(kColumnBlock, C - c0);
        const int64_t at = (n * S + r0) * C + c0;
        std::fill(ag, ag + width, 0.0f);
        std::fill(ax, ax + width, 0.0f);
        k.grad_sums_rows(dy + at, up.at(at), x + at, gout ? gout + at : nullptr, rows, width, C,
                         mean_c + n * C + c0, za + n * C + c0, zb + n * C + c0, ag, ax);
        for (int64_t c = 0; c < width; ++c) pd[c0 + c] += ag[c], px[c0 + c] += ax[c];
      }
    }
  }
  // Channel i = (n, c)'s sums: its sample's units' partials added in unit order.
  void merge_block_sums(const RowBlocks& rb, int64_t i) {
    const int64_t n = i / C, c = i % C;
    double sd = 0, sx = 0;
    for (int64_t q = 0; q < rb.units_per_sample; ++q) {
      const int64_t at = (n * rb.units_per_sample + q) * C + c;
      sd += partial_dy[at];
      sx += partial_xc[at];
    }
    sum_dy[i] = sd;
    sum_dy_xc[i] = sx;
  }

  // ---- phase 2: the dx coefficients of group i = (n, g), from its channels' sums ----
  void group_coefficients(int64_t i) {
    const double r = rstd[i];
    const int64_t n = i / G, c0 = (i % G) * per_group;
    const double count = double(per_group * S);
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

  // ---- phase 3: dweight[c] and dbias[c] from the per-(n, c) sums, in sample order ----
  void weight_gradients(int64_t c) {
    double dw = 0, db = 0;
    for (int64_t n = 0; n < N; ++n) {
      dw += double(rstd[n * G + c / per_group]) * sum_dy_xc[n * C + c];
      db += sum_dy[n * C + c];
    }
    if (dweight) dweight[c] = float(dw);
    if (dbias) dbias[c] = float(db);
  }

  // ---- phase 4: dx ----
  // Channels-first: piece [lo, hi) of (n, c) row `row`.
  void row_dx(int64_t row, int64_t lo, int64_t hi) {
    const int64_t at = row * S + lo;
    k.dx_run(dx + at, gin + at, dx_up.at(at), x + at, hi - lo, ca[row], cb[row], cm[row],
             cc[row], dx_up.silu ? za[row] : 0.0f, dx_up.silu ? zb[row] : 0.0f, stream);
  }
  // Channels-last: unit u's rows.
  void block_dx(const RowBlocks& rb, int64_t u) {
    const int64_t n = u / rb.units_per_sample, r0 = (u % rb.units_per_sample) * rb.unit_rows;
    const int64_t at = (n * S + r0) * C;
    k.dx_rows(dx + at, gin + at, dx_up.at(at), x + at, std::min(S - r0, rb.unit_rows), C,
              ca + n * C, cb + n * C, cm + n * C, cc + n * C, za + n * C, zb + n * C, stream);
  }
};

// No elements: dx and dresidual are empty, every sum is 0 (dweight keeps rstd * 0, so a NaN rstd
// of an empty group still shows).
void empty_weight_gradients(float* dweight, float* dbias, const float* rstd,
                            const GroupNormShape& t) {
  if (!dweight && !dbias) return;
  const int64_t per_group = t.channels / t.groups;
  for (int64_t c = 0; c < t.channels; ++c) {
    double dw = 0, db = 0;
    for (int64_t n = 0; n < t.batch; ++n) {
      dw += double(rstd[n * t.groups + c / per_group]) * 0.0;
      db += 0.0;
    }
    if (dweight) dweight[c] = float(dw);
    if (dbias) dbias[c] = float(db);
  }
}

}  // namespace

template <typename T>
void group_norm_backward(const GroupNormPlan& plan, bool stats_are_constants,
                         const BackwardEpilogueOf<T>& epi, const T* dy, const T* x,
                         const float* mean, const float* rstd, const float* weight, T* dx,
                         float* dweight, float* dbias, std::span<std::byte> workspace) {
  const GroupNormShape& t = plan.shape;
  const int num_threads = plan.num_threads;
  const bool parallel = plan.parallel;
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups;
  if (N * C * S == 0) return empty_weight_gradients(dweight, dbias, rstd, t);
  const bool need_sums =
      GroupNormBackwardWork::of(stats_are_constants, dweight, dbias, epi.dresidual != nullptr,
                                epi.activation, epi.residual != nullptr)
          .sums;
  const bool weight_grads = dweight || dbias;
  const BackwardSchedule schedule = plan.backward;
  const RowPieces pieces(N * C, S);
  const RowBlocks blocks(S, C);
  GroupNormBackward<T> b(t, dx, dweight, dbias, dy, x, mean, rstd, weight, stats_are_constants,
                         epi, carve_backward(plan.scratch, workspace));
  if (epi.silu())
    for (int64_t i = 0; i < N * C; ++i) b.silu_coefficients(i);

  switch (schedule) {
    case BackwardSchedule::cached_groups:
      // Group by group; dweight and dbias after a barrier, in the same parallel region.
#pragma omp parallel num_threads(num_threads) if (parallel)
      {
        for_in_region(N * G, b.stream, [&](int64_t i) {
          const int64_t row0 = (i / G) * C + (i % G) * b.per_group;
          for (int64_t row = row0; row < row0 + b.per_group; ++row) {
            for (int64_t q = 0; q < pieces.pieces; ++q)
              b.row_piece_sums(pieces, row, q, q * kRunChunk, std::min(S, (q + 1) * kRunChunk));
            b.merge_row_sums(pieces, row);
          }
          b.group_coefficients(i);
          for (int64_t row = row0; row < row0 + b.per_group; ++row)
            for (int64_t q = 0; q < pieces.pieces; ++q)
              b.row_dx(row, q * kRunChunk, std::min(S, (q + 1) * kRunChunk));
        });
        if (weight_grads) {
#pragma omp for schedule(static)
          for (int64_t c = 0; c < C; ++c) b.weight_gradients(c);
        }
      }
      return;

    case BackwardSchedule::two_phase:
      if (need_sums) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
        for (int64_t u = 0; u < pieces.units; ++u)
          pieces.for_unit(u, [&](int64_t row, int64_t piece, int64_t lo, int64_t hi) {
            b.row_piece_sums(pieces, row, piece, lo, hi);
          });
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
        for (int64_t row = 0; row < N * C; ++row) b.merge_row_sums(pieces, row);
      }
      break;

    case BackwardSchedule::channels_last:
      if (need_sums) {
        for (int64_t i = 0; i < N * C; ++i) b.mean_c[i] = mean[(i / C) * G + (i % C) / b.per_group];
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
        for (int64_t u = 0; u < N * blocks.units_per_sample; ++u) b.block_sums(blocks, u);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
        for (int64_t i = 0; i < N * C; ++i) b.merge_block_sums(blocks, i);
      }
      break;
  }

  if (weight_grads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && C > 1)
    for (int64_t c = 0; c < C; ++c) b.weight_gradients(c);
  }
  for (int64_t i = 0; i < N * G; ++i) b.group_coefficients(i);
  if (schedule == BackwardSchedule::two_phase) {
    parallel_for(pieces.units, num_threads, parallel, b.stream, [&](int64_t u) {
      pieces.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) { b.row_dx(row, lo, hi); });
    });
  } else {
    parallel_for(N * blocks.units_per_sample, num_threads, parallel, b.stream,
                 [&](int64_t u) { b.block_dx(blocks, u); });
  }
}

GroupNormPlan plan_group_norm(const GroupNormShape& shape, int64_t value_bytes, int num_threads,
                              const GroupNormBackwardWork& backward) {
  GroupNormPlan plan;
  plan.shape = shape;
  plan.num_threads = num_threads;
  plan.parallel = runs_in_parallel(shape.batch * shape.channels * shape.spatial, num_threads);
  plan.forward = plan_forward(shape, value_bytes, num_threads);
  plan.backward =
      plan_backward(shape, backward.sums, backward.third_input, value_bytes, num_threads);
  plan.scratch = group_norm_scratch(shape);
  return plan;
}

#define NORMKIT_GROUP_NORM_INSTANTIATE(T)                                                       \
  template void group_norm_forward<T>(const GroupNormPlan&, double, const ForwardEpilogueOf<T>&, \
                                      const T*, const float*, const float*, T*, float*, float*,  \
                                      float*, std::span<std::byte>);                             \
  template void group_norm_statistics<T>(const GroupNormPlan&, double, const T*, float*, float*, \
                                         float*, std::span<std::byte>);                         \
  template void group_norm_apply<T>(const GroupNormPlan&, const ForwardEpilogueOf<T>&, const T*, \
                                    const float*, const float*, const float*, const float*, T*,  \
                                    std::span<std::byte>);                                       \
  template void group_norm_backward<T>(const GroupNormPlan&, bool, const BackwardEpilogueOf<T>&, \
                                       const T*, const T*,                                       \
                                       const float*, const float*, const float*, T*, float*,     \
                                       float*, std::span<std::byte>);
NORMKIT_GROUP_NORM_INSTANTIATE(float)
NORMKIT_GROUP_NORM_INSTANTIATE(bf16)
NORMKIT_GROUP_NORM_INSTANTIATE(f16)
#undef NORMKIT_GROUP_NORM_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
