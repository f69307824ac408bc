// FRN + TLU CPU kernels: the plan and the threading below (HWY_ONCE section), SIMD leaf loops per
// Highway target above it.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/frn.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/frn.h"
#include "cpu/cache.h"
#include "cpu/moments.h"
#include "cpu/parallel.h"
#include "cpu/scratch.h"
#include "cpu/simd.h"
#include "cpu/column_sums-inl.h"
#include "cpu/tiling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#ifndef NORMKIT_CPU_FRN_KERNELS_
#define NORMKIT_CPU_FRN_KERNELS_
namespace normkit::cpu::frn {

// The leaf loops of one SIMD target for activations of type T. z = x * a + b; the TLU's max
// takes tau exactly where z < tau (so a NaN z stays on x's side, in every lane and target).
template <typename T>
struct Kernels {
  // y[i] = max(x[i] * a + b, t), i < n.
  void (*tlu_run)(T* y, const T* x, int64_t n, float a, float b, float t);
  // The same over `rows` rows of `width` columns (row r at offset r * stride), per column a, b, t.
  void (*tlu_rows)(T* y, const T* x, int64_t rows, int64_t width, int64_t stride, const float* a,
                   const float* b, const float* t);
  // Adds sum(x^2) of each column j < width <= kColumnBlock to squares[j], over `rows` rows.
  void (*square_columns)(const T* x, int64_t rows, int64_t width, int64_t stride,
                         double* squares);
  // Over i < n: sums[0] = sum(g), sums[1] = sum(g * x), sums[2] = sum(dy - g) (overwritten),
  // g = dy where z >= t, else 0.
  void (*grad_sums_run)(const T* dy, const T* x, int64_t n, float a, float b, float t,
                        double* sums);
  // The same per column j < width <= kColumnBlock over `rows` rows, added to sums[k * width + j].
  void (*grad_sums_rows)(const T* dy, const T* x, int64_t rows, int64_t width, int64_t stride,
                         const float* a, const float* b, const float* t, double* sums);
  // dx[i] = ga * g[i] + gb * x[i].
  void (*dx_run)(T* dx, const T* dy, const T* x, int64_t n, float a, float b, float t, float ga,
                 float gb);
  void (*dx_rows)(T* dx, const T* dy, const T* x, int64_t rows, int64_t width, int64_t stride,
                  const float* a, const float* b, const float* t, const float* ga,
                  const float* gb);
};

// Columns one channels-last unit covers at most: its sums live on the stack.
constexpr int64_t kColumnBlock = 256;
// Rows whose float sums are added in double: few enough that float rounding stays small.
constexpr int64_t kSumRows = 16;

}  // namespace normkit::cpu::frn
#endif

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {

template <class D, typename T>
HWY_INLINE hn::Vec<D> FrnTlu(D d, const T* HWY_RESTRICT x, hn::Vec<D> a, hn::Vec<D> b,
                             hn::Vec<D> t) {
  const auto z = hn::MulAdd(LoadF(d, x), a, b);
  return hn::IfThenElse(hn::Lt(z, t), t, z);
}

template <typename T>
void FrnTluRun(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, int64_t n, float a, float b,
               float t) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    StoreF(FrnTlu(d, x + i, hn::Set(d, a), hn::Set(d, b), hn::Set(d, t)), d, y + i);
  for (; i < n; ++i)
    StoreF(FrnTlu(d1, x + i, hn::Set(d1, a), hn::Set(d1, b), hn::Set(d1, t)), d1, y + i);
}

template <typename T>
void FrnTluRows(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, int64_t rows, int64_t width,
                int64_t stride, const float* a, const float* b, const float* t) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    int64_t j = 0;
    for (; j + N <= width; j += N)
      StoreF(FrnTlu(d, x + o + j, hn::LoadU(d, a + j), hn::LoadU(d, b + j), hn::LoadU(d, t + j)),
             d, y + o + j);
    for (; j < width; ++j)
      StoreF(FrnTlu(d1, x + o + j, hn::LoadU(d1, a + j), hn::LoadU(d1, b + j),
                    hn::LoadU(d1, t + j)),
             d1, y + o + j);
  }
}

template <typename T>
void FrnSquareColumns(const T* HWY_RESTRICT x, int64_t rows, int64_t width, int64_t stride,
                      double* squares) {
  // Centers of zero: ShiftedTerms' second sum is then sum(x^2).
  static const float kZeros[frn::kColumnBlock] = {};
  for (int64_t r0 = 0; r0 < rows; r0 += frn::kSumRows) {
    const int64_t block = std::min(frn::kSumRows, rows - r0);
    ColumnSums<ShiftedTerms>(x + r0 * stride, static_cast<const T*>(nullptr),
                             static_cast<const T*>(nullptr), block, width, stride, kZeros,
                             [&](auto dd, int64_t j, auto, auto s2) {
                               HWY_ALIGN float buf[hn::MaxLanes(DF())];
                               hn::StoreU(s2, dd, buf);
                               for (size_t l = 0; l < hn::Lanes(dd); ++l)
                                 squares[j + int64_t(l)] += double(buf[l]);
                             });
  }
}

// One step of the gradient sums: g = dy where z >= t, else 0; adds g, g * x and dy - g.
template <class D, typename T>
HWY_INLINE void FrnGradStep(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, hn::Vec<D> a,
                            hn::Vec<D> b, hn::Vec<D> t, hn::Vec<D>& sg, hn::Vec<D>& sgx,
                            hn::Vec<D>& st) {
  const auto xv = LoadF(d, x), dyv = LoadF(d, dy);
  const auto below = hn::Lt(hn::MulAdd(xv, a, b), t);
  const auto g = hn::IfThenZeroElse(below, dyv);
  sg = hn::Add(sg, g);
  sgx = hn::MulAdd(g, xv, sgx);
  st = hn::Add(st, hn::IfThenElseZero(below, dyv));
}

template <typename T>
void FrnGradSumsRun(const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, int64_t n, float a,
                    float b, float t, double* sums) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  sums[0] = sums[1] = sums[2] = 0;
  // Pieces of kRunChunk summed in float, added in double.
  for (int64_t p = 0; p < n; p += kRunChunk) {
    const int64_t end = std::min(n, p + kRunChunk);
    auto sg = hn::Zero(d), sgx = sg, st = sg;
    auto tg = hn::Zero(d1), tgx = tg, tt = tg;
    int64_t i = p;
    for (; i + N <= end; i += N)
      FrnGradStep(d, dy + i, x + i, hn::Set(d, a), hn::Set(d, b), hn::Set(d, t), sg, sgx, st);
    for (; i < end; ++i)
      FrnGradStep(d1, dy + i, x + i, hn::Set(d1, a), hn::Set(d1, b), hn::Set(d1, t), tg, tgx, tt);
    sums[0] += SumLanes(d, sg) + double(hn::GetLane(tg));
    sums[1] += SumLanes(d, sgx) + double(hn::GetLane(tgx));
    sums[2] += SumLanes(d, st) + double(hn::GetLane(tt));
  }
}

template <typename T>
void FrnGradSumsRows(const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, int64_t rows,
                     int64_t width, int64_t stride, const float* a, const float* b,
                     const float* t, double* sums) {
  ThreeColumnSums(rows, width, stride, frn::kSumRows, sums, [&](auto dd, int64_t j) {
    const auto va = hn::LoadU(dd, a + j), vb = hn::LoadU(dd, b + j), vt = hn::LoadU(dd, t + j);
    return [=](int64_t o, auto& sg, auto& sgx, auto& st) {
      FrnGradStep(dd, dy + o, x + o, va, vb, vt, sg, sgx, st);
    };
  });
}

template <class D, typename T>
HWY_INLINE void FrnDxStep(D d, T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy,
                          const T* HWY_RESTRICT x, hn::Vec<D> a, hn::Vec<D> b, hn::Vec<D> t,
                          hn::Vec<D> ga, hn::Vec<D> gb) {
  const auto xv = LoadF(d, x);
  const auto g = hn::IfThenZeroElse(hn::Lt(hn::MulAdd(xv, a, b), t), LoadF(d, dy));
  StoreF(hn::MulAdd(g, ga, hn::Mul(xv, gb)), d, dx);
}

template <typename T>
void FrnDxRun(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, int64_t n,
              float a, float b, float t, float ga, float gb) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    FrnDxStep(d, dx + i, dy + i, x + i, hn::Set(d, a), hn::Set(d, b), hn::Set(d, t),
              hn::Set(d, ga), hn::Set(d, gb));
  for (; i < n; ++i)
    FrnDxStep(d1, dx + i, dy + i, x + i, hn::Set(d1, a), hn::Set(d1, b), hn::Set(d1, t),
              hn::Set(d1, ga), hn::Set(d1, gb));
}

template <typename T>
void FrnDxRows(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x,
               int64_t rows, int64_t width, int64_t stride, const float* a, const float* b,
               const float* t, const float* ga, const float* gb) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    int64_t j = 0;
    for (; j + N <= width; j += N)
      FrnDxStep(d, dx + o + j, dy + o + j, x + o + j, hn::LoadU(d, a + j), hn::LoadU(d, b + j),
                hn::LoadU(d, t + j), hn::LoadU(d, ga + j), hn::LoadU(d, gb + j));
    for (; j < width; ++j)
      FrnDxStep(d1, dx + o + j, dy + o + j, x + o + j, hn::LoadU(d1, a + j),
                hn::LoadU(d1, b + j), hn::LoadU(d1, t + j), hn::LoadU(d1, ga + j),
                hn::LoadU(d1, gb + j));
  }
}

template <typename T>
const frn::Kernels<T>* FrnKernelTable() {
  static const frn::Kernels<T> k{&FrnTluRun<T>,       &FrnTluRows<T>,      &FrnSquareColumns<T>,
                                 &FrnGradSumsRun<T>,  &FrnGradSumsRows<T>, &FrnDxRun<T>,
                                 &FrnDxRows<T>};
  return &k;
}
const frn::Kernels<float>* FrnKernelsF32() { return FrnKernelTable<float>(); }
const frn::Kernels<bf16>* FrnKernelsBF16() { return FrnKernelTable<bf16>(); }
const frn::Kernels<f16>* FrnKernelsF16() { return FrnKernelTable<f16>(); }

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(FrnKernelsF32);
HWY_EXPORT(FrnKernelsBF16);
HWY_EXPORT(FrnKernelsF16);

namespace {

using frn::kColumnBlock;

template <typename T>
const frn::Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(FrnKernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(FrnKernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(FrnKernelsF16)();
}

// Channels-last work units: (n, block of kColumnBlock channels).
int64_t column_blocks(int64_t channels) { return (channels + kColumnBlock - 1) / kColumnBlock; }

// z's factor a = rstd * weight, from the saved float rstd: the backward recomputes the forward's
// z, and so its TLU decisions, bit for bit.
float scale(float rstd, float weight) { return rstd * weight; }

// The backward's coefficients of dx = ga * g + gb * x for one (n, c), from its sum(g * x):
// ga = w r, gb = -w r^3 sum(g x) / S (d rstd / d x_s = -rstd^3 x_s / S).
void dx_coefficients(double w, double r, double sum_gx, int64_t spatial, float* ga, float* gb) {
  *ga = float(w * r);
  *gb = float(-w * r * r * r * sum_gx / double(spatial));
}

}  // namespace

std::size_t frn_scratch_bytes(const plan::GroupNormShape& shape) {
  ScratchLayout layout;
  layout.add<double>(3, shape.batch, shape.channels);
  return layout.workspace_bytes();
}

template <typename T>
void frn_forward(const plan::GroupNormShape& t, double eps, const T* x, const float* weight,
                 const float* bias, const float* tau, T* y, float* rstd, int num_threads) {
  const auto& k = kernels<T>();
  const int64_t C = t.channels, S = t.spatial;
  const bool parallel = runs_in_parallel(t.batch * C * S, num_threads);
  if (t.format == MemoryFormat::channels_first) {
    for_each_run_moments(x, t.batch * C, S, cached_unit_bytes(), num_threads, parallel, false,
                         [&](int64_t i, const Moments& m) {
                           const int64_t c = i % C;
                           const double r =
                               1.0 / std::sqrt(m.variance() + m.mean * m.mean + eps);
                           rstd[i] = float(r);
                           k.tlu_run(y + i * S, x + i * S, S, scale(rstd[i], weight[c]),
                                     bias[c], tau[c]);
                         });
    return;
  }
  const int64_t blocks = column_blocks(C);
  parallel_for(t.batch * blocks, num_threads, parallel, false, [&](int64_t unit) {
    const int64_t n = unit / blocks, c0 = (unit % blocks) * kColumnBlock;
    const int64_t width = std::min(kColumnBlock, C - c0);
    const T* xn = x + n * S * C + c0;
    double squares[kColumnBlock] = {};
    k.square_columns(xn, S, width, C, squares);
    float a[kColumnBlock];
    for (int64_t j = 0; j < width; ++j) {
      const double r = 1.0 / std::sqrt(squares[j] / double(S) + eps);
      rstd[n * C + c0 + j] = float(r);
      a[j] = scale(rstd[n * C + c0 + j], weight[c0 + j]);
    }
    k.tlu_rows(y + n * S * C + c0, xn, S, width, C, a, bias + c0, tau + c0);
  });
}

template <typename T>
void frn_backward(const plan::GroupNormShape& t, const T* dy, const T* x, const float* rstd,
                  const float* weight, const float* bias, const float* tau, T* dx,
                  float* dweight, float* dbias, float* dtau, float* deps, int num_threads,
                  std::span<std::byte> workspace) {
  const auto& k = kernels<T>();
  const int64_t N = t.batch, C = t.channels, S = t.spatial;
  const bool parallel = runs_in_parallel(N * C * S, num_threads);
  // Per (n, c): sum(g), sum(g * x), sum(dy - g) at sums[3 * (n * C + c) + k].
  double* sums = scratch_part<double>(scratch_base(workspace, frn_scratch_bytes(t)), 0);
  if (t.format == MemoryFormat::channels_first) {
    // dx right after the run's sums, while the run is in cache.
    parallel_for(N * C, num_threads, parallel, false, [&](int64_t i) {
      const int64_t c = i % C;
      const float a = scale(rstd[i], weight[c]);
      double* s = sums + 3 * i;
      k.grad_sums_run(dy + i * S, x + i * S, S, a, bias[c], tau[c], s);
      float ga, gb;
      dx_coefficients(weight[c], rstd[i], s[1], S, &ga, &gb);
      k.dx_run(dx + i * S, dy + i * S, x + i * S, S, a, bias[c], tau[c], ga, gb);
    });
  } else {
    const int64_t blocks = column_blocks(C);
    parallel_for(N * blocks, num_threads, parallel, false, [&](int64_t unit) {
      const int64_t n = unit / blocks, c0 = (unit % blocks) * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, C - c0), o = n * S * C + c0;
      float a[kColumnBlock], ga[kColumnBlock], gb[kColumnBlock];
      for (int64_t j = 0; j < width; ++j) a[j] = scale(rstd[n * C + c0 + j], weight[c0 + j]);
      double block_sums[3 * kColumnBlock] = {};
      k.grad_sums_rows(dy + o, x + o, S, width, C, a, bias + c0, tau + c0, block_sums);
      for (int64_t j = 0; j < width; ++j) {
        double* s = sums + 3 * (n * C + c0 + j);
        for (int q = 0; q < 3; ++q) s[q] = block_sums[q * width + j];
        dx_coefficients(weight[c0 + j], rstd[n * C + c0 + j], s[1], S, &ga[j], &gb[j]);
      }
      k.dx_rows(dx + o, dy + o, x + o, S, width, C, a, bias + c0, tau + c0, ga, gb);
    });
  }
  if (!dweight && !dbias && !dtau && !deps) return;
  // Over n in order: the same bits for any thread count. d rstd / d eps = -rstd^3 / 2, so
  // deps[c] = -w/2 * sum over n of rstd^3 * sum(g * x), from the sums dx already used.
  for (int64_t c = 0; c < C; ++c) {
    double g = 0, gx = 0, rest = 0, cubed = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double* s = sums + 3 * (n * C + c);
      const double r = rstd[n * C + c];
      g += s[0];
      gx += s[1] * r;
      rest += s[2];
      cubed += s[1] * (r * r * r);
    }
    if (dweight) dweight[c] = float(gx);
    if (dbias) dbias[c] = float(g);
    if (dtau) dtau[c] = float(rest);
    if (deps) deps[c] = float(-0.5 * double(weight[c]) * cubed);
  }
}

#define NORMKIT_FRN_INSTANTIATE(T)                                                            \
  template void frn_forward<T>(const plan::GroupNormShape&, double, const T*, const float*,     \
                               const float*, const float*, T*, float*, int);                   \
  template void frn_backward<T>(const plan::GroupNormShape&, const T*, const T*, const float*, \
                                const float*, const float*, const float*, T*, float*, float*,  \
                                float*, float*, int, std::span<std::byte>);
NORMKIT_FRN_INSTANTIATE(float)
NORMKIT_FRN_INSTANTIATE(bf16)
NORMKIT_FRN_INSTANTIATE(f16)
#undef NORMKIT_FRN_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
