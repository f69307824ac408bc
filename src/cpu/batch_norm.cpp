// BatchNorm CPU kernels (see batch_norm.h): SIMD leaf loops per Highway target first, then the
// plan, the phases and the drivers (HWY_ONCE section), written once for every target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/batch_norm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/batch_norm.h"
#include "cpu/cache.h"
#include "cpu/scratch.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/upstream.h"
#include "cpu/column_sums-inl.h"

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>

#ifndef NORMKIT_CPU_BATCH_NORM_KERNELS_
#define NORMKIT_CPU_BATCH_NORM_KERNELS_
namespace normkit::cpu::bn {

// Values each float accumulator of a contiguous run's sums adds up before its lanes are added to
// a double: short enough that float rounding stays near 1e-6 relative on every target.
constexpr int64_t kChunk = 512;

// Two sums over a set of values of one channel, each in double:
//   statistics: first = sum(x - pivot), second = sum((x - pivot)^2)
//   gradients:  first = sum(g),         second = sum(g * (x - mean))
// Partial sums of pieces fixed by the shape are added in a fixed order: no division per piece.
struct PairSums {
  double first = 0;
  double second = 0;
};

// The float accumulators of one channel's run sums between calls of the run-sums kernels: two
// vectors per sum, one lane for the runs' tails, and the count of values not yet added to the
// PairSums. Zero-initialized ({}) before a channel's first run.
struct RunAccumulators {
  static constexpr int kMaxLanes = 16;  // floats of the widest x86 vector
  float a0[kMaxLanes], a1[kMaxLanes], b0[kMaxLanes], b1[kMaxLanes];
  float at, bt;
  int64_t pending;
};

// The leaf loops of one SIMD target for activations of type T. `up` makes the incoming gradient
// g from dy through the epilogue (cpu/upstream.h): relu's mask, or silu's z = x * za + zb + r?
// recomputed with the forward's coefficients (za, zb: a and b of y = x * a + b). `stream`: the
// output (y or dx) with non-temporal stores where they apply (float32; see cpu/simd.h).
template <typename T>
struct Kernels {
  // ---- forward: y = act(x * a + b + r?) ----
  // Over a run of n values with one channel's a, b.
  void (*affine_run)(T* y, const T* x, const T* r, int64_t n, float a, float b, Activation act,
                     bool stream);
  // Over `rows` channels-last rows of `channels` values, a[c], b[c] per column.
  void (*affine_rows)(T* y, const T* x, const T* r, int64_t rows, int64_t channels,
                      const float* a, const float* b, Activation act, bool stream);
  // Over a slab of n values with coefficients a[i], b[i] per value (the per-channel ones
  // spread over a block of planes); streams whatever the slab's length when `stream`.
  void (*affine_slab)(T* y, const T* x, const T* r, int64_t n, const float* a, const float* b,
                      Activation act, bool stream);

  // ---- backward: dx = g * p + (x - m) * q + r, or g * p when x is null; dres = g (if not
  // null; never streamed). silu reads zx (x; null otherwise) for z. ----
  void (*dx_run)(T* dx, T* dres, const T* dy, const Upstream<T>& up, const T* zx, const T* x,
                 int64_t n, float p, float q, float r, float m, float za, float zb, bool stream);
  void (*dx_rows)(T* dx, T* dres, const T* dy, const Upstream<T>& up, const T* zx, const T* x,
                  int64_t rows, int64_t channels, const float* p, const float* q, const float* r,
                  const float* m, const float* za, const float* zb, bool stream);

  // ---- sums of a run: add to acc, and from acc to `out` in double whenever kChunk values are
  // pending (where depends only on the run lengths) ----
  // Statistics: x - center and its square.
  void (*stat_run_sums)(const T* x, int64_t n, float center, RunAccumulators* acc,
                        PairSums* out);
  // Gradients: g and g * (x - center).
  void (*grad_run_sums)(const T* x, const T* dy, const Upstream<T>& up, int64_t n, float center,
                        float za, float zb, RunAccumulators* acc, PairSums* out);
  // Adds what acc holds to out (nothing when no value is pending) and clears it.
  void (*flush_run_sums)(RunAccumulators* acc, PairSums* out);

  // ---- sums of a block of columns (cpu/column_sums-inl.h): over `rows` rows (row k at offset
  // k * stride) of `width` columns, overwrites s1[j], s2[j] with column j's float sums ----
  void (*stat_column_sums)(const T* x, int64_t rows, int64_t width, int64_t stride,
                           const float* centers, float* s1, float* s2);
  void (*grad_column_sums)(const T* x, const T* dy, const Upstream<T>& up, int64_t rows,
                           int64_t width, int64_t stride, const float* centers, const float* za,
                           const float* zb, float* s1, float* s2);

  // ---- per-channel folds, for channels i < n (every pointer at the first one's) ----
  // From the shifted sums over `count` values and the pivots: overwrites mean, invstd and the
  // coefficients a, b of y = x * a + b; updates running_mean and running_var when not null.
  // Per target like the loops: there the compiler fuses their multiply-adds where the target
  // has FMA, and target-independent code would round them differently.
  void (*fold_batch)(int64_t n, const PairSums* sums, const float* pivot, double count,
                     double eps, double momentum, const float* weight, const float* bias,
                     float* mean, float* invstd, float* running_mean, float* running_var,
                     float* a, float* b);
  // From the running statistics: overwrites a, b.
  void (*fold_running)(int64_t n, const float* running_mean, const float* running_var,
                       double eps, const float* weight, const float* bias, float* a, float* b);
  // From saved mean and invstd (silu's backward: the training forward's a, b up to the
  // rounding of the saved statistics): overwrites a, b.
  void (*fold_saved)(int64_t n, const float* mean, const float* invstd, const float* weight,
                     const float* bias, float* a, float* b);
};

}  // namespace normkit::cpu::bn
#endif  // NORMKIT_CPU_BATCH_NORM_KERNELS_

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {
namespace {

using bn::kChunk;
using bn::PairSums;
using bn::RunAccumulators;

template <class D>
using V = hn::Vec<D>;

template <typename T>
const T* at(const T* p, int64_t i) {
  return p ? p + i : nullptr;
}
template <typename T>
T* at(T* p, int64_t i) {
  return p ? p + i : nullptr;
}

// ---- elementwise steps, the same for a full vector and a one-lane tail ----

// y = act(x * a + b + residual?)
template <bool kResidual, int kAct, bool kStream = false, class D, typename T>
HWY_INLINE void ForwardStep(D d, const T* HWY_RESTRICT x, const T* HWY_RESTRICT r,
                            T* HWY_RESTRICT y, V<D> a, V<D> b) {
  auto v = hn::MulAdd(LoadF(d, x), a, b);
  if constexpr (kResidual) v = hn::Add(v, LoadF(d, r));
  StoreOut<kStream>(Activate<kAct>(d, v), d, y);
}

// The gradient the normalization sees: dy, zeroed where the ReLU's output was not positive.
template <bool kRelu, class D, typename T>
HWY_INLINE V<D> MaskedGradient(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT y) {
  const auto g = LoadF(d, dy);
  if constexpr (kRelu) return hn::IfThenElseZero(hn::Gt(LoadF(d, y), hn::Zero(d)), g);
  return g;
}

// silu's g = dy * silu'(z), z = x * za + zb + residual? (ForwardStep's arithmetic).
template <class D, typename T>
HWY_INLINE V<D> SiluGradient(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x,
                             const T* HWY_RESTRICT residual, V<D> za, V<D> zb) {
  auto z = hn::MulAdd(LoadF(d, x), za, zb);
  if (residual) z = hn::Add(z, LoadF(d, residual));
  return hn::Mul(LoadF(d, dy), SiluDerivative(d, z));
}

// dx = g * p + (x - m) * q + r (kX), or g * p (no x: the inference backward); dresidual = g.
// g through kAct (an Activation as int): relu's mask, silu's z (from zx), or dy.
// kStream: dx (not dresidual, whose alignment may differ) with non-temporal stores.
template <int kAct, bool kDresidual, bool kX, bool kStream = false, class D, typename T>
HWY_INLINE void BackwardStep(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x,
                             const Upstream<T>& up, int64_t i, const T* HWY_RESTRICT zx,
                             T* HWY_RESTRICT dx, T* HWY_RESTRICT dres, V<D> p, V<D> q, V<D> r,
                             V<D> m, V<D> za, V<D> zb) {
  constexpr bool kRelu = kAct == int(Activation::relu);
  V<D> g;
  if constexpr (kAct == int(Activation::silu))
    g = SiluGradient(d, dy, zx + i, up.residual ? up.residual + i : nullptr, za, zb);
  else
    g = MaskedGradient<kRelu>(d, dy, kRelu ? up.mask + i : nullptr);
  if constexpr (kDresidual) StoreF(g, d, dres);
  if constexpr (kX)
    StoreOut<kStream>(hn::MulAdd(g, p, hn::MulAdd(hn::Sub(LoadF(d, x), m), q, r)), d, dx);
  else
    StoreOut<kStream>(hn::Mul(g, p), d, dx);
}

// ---- elementwise loops: one run (one channel), a slab, or a block of rows (all channels) ----

template <bool kResidual, int kRelu, bool kStream, typename T>
void ForwardRunT(T* y, const T* x, const T* r, int64_t n, float a, float b) {
  ForEachInRun<kStream>(y, n, [&](auto d, int64_t i, auto stream) {
    ForwardStep<kResidual, kRelu, decltype(stream)::value>(d, x + i, at(r, i), y + i,
                                                           hn::Set(d, a), hn::Set(d, b));
  });
}

// Each value's arithmetic is ForwardRunT's.
template <bool kResidual, int kRelu, bool kStream, typename T>
void ForwardSlabT(T* y, const T* x, const T* r, int64_t n, const float* a, const float* b) {
  ForEachInRun<kStream, true>(y, n, [&](auto d, int64_t i, auto stream) {
    ForwardStep<kResidual, kRelu, decltype(stream)::value>(
        d, x + i, at(r, i), y + i, hn::LoadU(d, a + i), hn::LoadU(d, b + i));
  });
}

template <bool kResidual, int kRelu, bool kStream, typename T>
void ForwardRowsT(T* y, const T* x, const T* r, int64_t rows, int64_t C, const float* a,
                  const float* b) {
  ForEachInRows<kStream>(y, rows, C, [&](auto d, int64_t o, int64_t j, auto stream) {
    ForwardStep<kResidual, kRelu, decltype(stream)::value>(
        d, x + o + j, at(r, o + j), y + o + j, hn::LoadU(d, a + j), hn::LoadU(d, b + j));
  });
}

// f(std::bool_constant<kResidual>, std::integral_constant<int, activation>,
// std::bool_constant<kStream>).
template <typename T, class F>
void VisitForward(bool residual, Activation act, bool stream, const F& f) {
  WithStream<T>(stream, [&](auto s) {
    WithActivation(act, [&](auto a) {
      if (residual) f(std::true_type(), a, s);
      else f(std::false_type(), a, s);
    });
  });
}

template <typename T>
void AffineRun(T* y, const T* x, const T* r, int64_t n, float a, float b,
               Activation relu, bool stream) {
  VisitForward<T>(r != nullptr, relu, stream, [&](auto kR, auto kU, auto kS) {
    ForwardRunT<kR.value, kU.value, kS.value>(y, x, r, n, a, b);
  });
}

template <typename T>
void AffineSlab(T* y, const T* x, const T* r, int64_t n, const float* a, const float* b,
                Activation relu, bool stream) {
  VisitForward<T>(r != nullptr, relu, stream, [&](auto kR, auto kU, auto kS) {
    ForwardSlabT<kR.value, kU.value, kS.value>(y, x, r, n, a, b);
  });
}

template <typename T>
void AffineRows(T* y, const T* x, const T* r, int64_t rows, int64_t C, const float* a,
                const float* b, Activation relu, bool stream) {
  VisitForward<T>(r != nullptr, relu, stream, [&](auto kR, auto kU, auto kS) {
    ForwardRowsT<kR.value, kU.value, kS.value>(y, x, r, rows, C, a, b);
  });
}

template <int kRelu, bool kDresidual, bool kX, bool kStream, typename T>
void BackwardRunT(T* dx, T* dres, const T* dy, const Upstream<T>& up, const T* zx, const T* x,
                  int64_t n, float p, float q, float r, float m, float za, float zb) {
  ForEachInRun<kStream>(dx, n, [&](auto d, int64_t i, auto stream) {
    BackwardStep<kRelu, kDresidual, kX, decltype(stream)::value>(
        d, dy + i, at(x, i), up, i, zx, dx + i, at(dres, i), hn::Set(d, p), hn::Set(d, q),
        hn::Set(d, r), hn::Set(d, m), hn::Set(d, za), hn::Set(d, zb));
  });
}

template <int kRelu, bool kDresidual, bool kX, bool kStream, typename T>
void BackwardRowsT(T* dx, T* dres, const T* dy, const Upstream<T>& up, const T* zx, const T* x,
                   int64_t rows, int64_t C, const float* p, const float* q, const float* r,
                   const float* m, const float* za, const float* zb) {
  ForEachInRows<kStream>(dx, rows, C, [&](auto d, int64_t o, int64_t j, auto stream) {
    constexpr bool kSilu = kRelu == int(Activation::silu);
    const auto va = kSilu ? hn::LoadU(d, za + j) : hn::Zero(d);
    const auto vb = kSilu ? hn::LoadU(d, zb + j) : hn::Zero(d);
    BackwardStep<kRelu, kDresidual, kX, decltype(stream)::value>(
        d, dy + o + j, at(x, o + j), up, o + j, zx, dx + o + j, at(dres, o + j),
        hn::LoadU(d, p + j), hn::LoadU(d, q + j), hn::LoadU(d, r + j), hn::LoadU(d, m + j), va,
        vb);
  });
}

// f(kAct, kDresidual, kX, kStream): an std::integral_constant<int, activation>, then
// std::bool_constants.
template <typename T, class F>
void VisitBackward(Activation act, bool dres, bool with_x, bool stream, const F& f) {
  const auto visit_x = [&](auto kU, auto kD) {
    WithStream<T>(stream, [&](auto kS) {
      if (with_x) f(kU, kD, std::true_type(), kS);
      else f(kU, kD, std::false_type(), kS);
    });
  };
  WithActivation(act, [&](auto kU) {
    if (dres) visit_x(kU, std::true_type());
    else visit_x(kU, std::false_type());
  });
}

template <typename T>
Activation activation_of(const Upstream<T>& up) {
  return up.mask ? Activation::relu : up.silu ? Activation::silu : Activation::none;
}

template <typename T>
void DxRun(T* dx, T* dres, const T* dy, const Upstream<T>& up, const T* zx, const T* x,
           int64_t n, float p, float q, float r, float m, float za, float zb, bool stream) {
  VisitBackward<T>(activation_of(up), dres != nullptr, x != nullptr, stream,
                   [&](auto kU, auto kD, auto kX, auto kS) {
                     BackwardRunT<kU.value, kD.value, kX.value, kS.value>(
                         dx, dres, dy, up, zx, x, n, p, q, r, m, za, zb);
                   });
}

template <typename T>
void DxRows(T* dx, T* dres, const T* dy, const Upstream<T>& up, const T* zx, const T* x,
            int64_t rows, int64_t C, const float* p, const float* q, const float* r,
            const float* m, const float* za, const float* zb, bool stream) {
  VisitBackward<T>(activation_of(up), dres != nullptr, x != nullptr, stream,
                   [&](auto kU, auto kD, auto kX, auto kS) {
                     BackwardRowsT<kU.value, kD.value, kX.value, kS.value>(
                         dx, dres, dy, up, zx, x, rows, C, p, q, r, m, za, zb);
                   });
}

// ---- sums ----

// The gradient terms of the two sums (see PairSums): g and g * (x - center), g the masked dy.
template <bool kRelu>
struct GradTerms {
  template <class D, typename T>
  HWY_INLINE static void Step(D d, const T* HWY_RESTRICT x, const T* HWY_RESTRICT dy,
                              const T* HWY_RESTRICT y, V<D> center, V<D>& s1, V<D>& s2, V<D>,
                              V<D>) {
    const auto g = MaskedGradient<kRelu>(d, dy, y);
    s1 = hn::Add(s1, g);
    s2 = hn::MulAdd(g, hn::Sub(LoadF(d, x), center), s2);
  }
};

// The same with silu's g (SiluGradient); the mask argument is the forward's residual (null:
// none), za and zb the forward's coefficients.
struct SiluGradTerms {
  template <class D, typename T>
  HWY_INLINE static void Step(D d, const T* HWY_RESTRICT x, const T* HWY_RESTRICT dy,
                              const T* HWY_RESTRICT residual, V<D> center, V<D>& s1, V<D>& s2,
                              V<D> za, V<D> zb) {
    const auto g = SiluGradient(d, dy, x, residual, za, zb);
    s1 = hn::Add(s1, g);
    s2 = hn::MulAdd(g, hn::Sub(LoadF(d, x), center), s2);
  }
};

// The accumulators of RunAccumulators in registers.
struct RunRegisters {
  V<DF> a0, a1, b0, b1;
  V<D1> at, bt;
};

void FlushRun(RunRegisters& v, int64_t& pending, PairSums* out) {
  if (pending == 0) return;
  const DF d;
  out->first += SumLanes(d, hn::Add(v.a0, v.a1)) + double(hn::GetLane(v.at));
  out->second += SumLanes(d, hn::Add(v.b0, v.b1)) + double(hn::GetLane(v.bt));
  v.a0 = v.a1 = v.b0 = v.b1 = hn::Zero(d);
  v.at = v.bt = hn::Zero(D1());
  pending = 0;
}

// Sums over contiguous runs added one after another: float vector accumulators (two per sum,
// and one-lane ones for each run's tail) carried from run to run in acc and added to `out` in
// double once kChunk values are pending. Where the flushes fall depends only on the run lengths,
// so both schedules get the same bits.
template <class Terms, typename T>
void RunSumsT(const T* x, const T* dy, const T* mask, int64_t n, float center,
              RunAccumulators* acc, PairSums* out, float za = 0, float zb = 0) {
  const DF d;
  const D1 d1;
  static_assert(hn::MaxLanes(DF()) <= RunAccumulators::kMaxLanes);
  const int64_t N = int64_t(hn::Lanes(d));
  RunRegisters v{hn::LoadU(d, acc->a0), hn::LoadU(d, acc->a1), hn::LoadU(d, acc->b0),
                 hn::LoadU(d, acc->b1), hn::LoadU(d1, &acc->at), hn::LoadU(d1, &acc->bt)};
  const auto vc = hn::Set(d, center);
  const auto vc1 = hn::Set(d1, center);
  const auto va = hn::Set(d, za), vb = hn::Set(d, zb);
  const auto va1 = hn::Set(d1, za), vb1 = hn::Set(d1, zb);
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t len = std::min(kChunk, n - start);
    const T* xs = x + start;
    const T* g = at(dy, start);
    const T* w = at(mask, start);
    int64_t i = 0;
    for (; i + 2 * N <= len; i += 2 * N) {
      Terms::Step(d, xs + i, at(g, i), at(w, i), vc, v.a0, v.b0, va, vb);
      Terms::Step(d, xs + i + N, at(g, i + N), at(w, i + N), vc, v.a1, v.b1, va, vb);
    }
    for (; i + N <= len; i += N)
      Terms::Step(d, xs + i, at(g, i), at(w, i), vc, v.a0, v.b0, va, vb);
    for (; i < len; ++i) Terms::Step(d1, xs + i, at(g, i), at(w, i), vc1, v.at, v.bt, va1, vb1);
    acc->pending += len;
    if (acc->pending >= kChunk) FlushRun(v, acc->pending, out);
  }
  hn::StoreU(v.a0, d, acc->a0), hn::StoreU(v.a1, d, acc->a1);
  hn::StoreU(v.b0, d, acc->b0), hn::StoreU(v.b1, d, acc->b1);
  hn::StoreU(v.at, d1, &acc->at), hn::StoreU(v.bt, d1, &acc->bt);
}

template <typename T>
void StatRunSums(const T* x, int64_t n, float center, RunAccumulators* acc, PairSums* out) {
  const T* none = nullptr;
  RunSumsT<ShiftedTerms>(x, none, none, n, center, acc, out);
}

template <typename T>
void GradRunSums(const T* x, const T* dy, const Upstream<T>& up, int64_t n, float center,
                 float za, float zb, RunAccumulators* acc, PairSums* out) {
  if (up.silu) RunSumsT<SiluGradTerms>(x, dy, up.residual, n, center, acc, out, za, zb);
  else if (up.mask) RunSumsT<GradTerms<true>>(x, dy, up.mask, n, center, acc, out);
  else RunSumsT<GradTerms<false>>(x, dy, up.mask, n, center, acc, out);
}

void FlushRunSums(RunAccumulators* acc, PairSums* out) {
  const DF d;
  const D1 d1;
  RunRegisters v{hn::LoadU(d, acc->a0), hn::LoadU(d, acc->a1), hn::LoadU(d, acc->b0),
                 hn::LoadU(d, acc->b1), hn::LoadU(d1, &acc->at), hn::LoadU(d1, &acc->bt)};
  FlushRun(v, acc->pending, out);
  hn::StoreU(v.a0, d, acc->a0), hn::StoreU(v.a1, d, acc->a1);
  hn::StoreU(v.b0, d, acc->b0), hn::StoreU(v.b1, d, acc->b1);
  hn::StoreU(v.at, d1, &acc->at), hn::StoreU(v.bt, d1, &acc->bt);
}

template <class Terms, typename T>
void ColumnSumsT(const T* x, const T* dy, const T* mask, int64_t rows, int64_t width,
                 int64_t stride, const float* centers, float* s1, float* s2,
                 const float* za = nullptr, const float* zb = nullptr) {
  ColumnSums<Terms>(
      x, dy, mask, rows, width, stride, centers,
      [&](auto d, int64_t j, auto a, auto b) {
        hn::StoreU(a, d, s1 + j);
        hn::StoreU(b, d, s2 + j);
      },
      za, zb);
}

template <typename T>
void StatColumnSums(const T* x, int64_t rows, int64_t width, int64_t stride,
                    const float* centers, float* s1, float* s2) {
  const T* none = nullptr;
  ColumnSumsT<ShiftedTerms>(x, none, none, rows, width, stride, centers, s1, s2);
}

template <typename T>
void GradColumnSums(const T* x, const T* dy, const Upstream<T>& up, int64_t rows, int64_t width,
                    int64_t stride, const float* centers, const float* za, const float* zb,
                    float* s1, float* s2) {
  if (up.silu)
    ColumnSumsT<SiluGradTerms>(x, dy, up.residual, rows, width, stride, centers, s1, s2, za, zb);
  else if (up.mask)
    ColumnSumsT<GradTerms<true>>(x, dy, up.mask, rows, width, stride, centers, s1, s2);
  else
    ColumnSumsT<GradTerms<false>>(x, dy, up.mask, rows, width, stride, centers, s1, s2);
}

// ---- per-channel folds ----

// y = x * a + b: b uses the rounded a, so that x == mean maps to bias up to the rounding of the
// two float operations.
inline void Fold(double mean, double invstd, const float* weight, const float* bias, int64_t c,
                 float& a, float& b) {
  a = float(invstd * (weight ? weight[c] : 1.0f));
  b = float((bias ? bias[c] : 0.0f) - mean * double(a));
}

void FoldBatch(int64_t n, const PairSums* sums, const float* pivot, double count, double eps,
               double momentum, const float* weight, const float* bias, float* mean,
               float* invstd, float* running_mean, float* running_var, float* a, float* b) {
  for (int64_t c = 0; c < n; ++c) {
    const PairSums& s = sums[c];
    double m2 = s.second - s.first * (s.first / count);
    if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
    const double mu = double(pivot[c]) + s.first / count;
    const double variance = m2 / count, unbiased = m2 / (count - 1);
    const double is = 1.0 / std::sqrt(variance + eps);
    mean[c] = float(mu);
    invstd[c] = float(is);
    if (running_mean) {
      running_mean[c] = float((1 - momentum) * running_mean[c] + momentum * mu);
      running_var[c] = float((1 - momentum) * running_var[c] + momentum * unbiased);
    }
    Fold(mu, is, weight, bias, c, a[c], b[c]);
  }
}

void FoldSaved(int64_t n, const float* mean, const float* invstd, const float* weight,
               const float* bias, float* a, float* b) {
  for (int64_t c = 0; c < n; ++c) Fold(mean[c], invstd[c], weight, bias, c, a[c], b[c]);
}

void FoldRunning(int64_t n, const float* running_mean, const float* running_var, double eps,
                 const float* weight, const float* bias, float* a, float* b) {
  for (int64_t c = 0; c < n; ++c)
    Fold(running_mean[c], 1.0 / std::sqrt(double(running_var[c]) + eps), weight, bias, c, a[c],
         b[c]);
}

}  // namespace

template <typename T>
const bn::Kernels<T>* KernelTable() {
  static const bn::Kernels<T> k{&AffineRun<T>,     &AffineRows<T>,     &AffineSlab<T>,
                                &DxRun<T>,         &DxRows<T>,         &StatRunSums<T>,
                                &GradRunSums<T>,   &FlushRunSums,      &StatColumnSums<T>,
                                &GradColumnSums<T>, &FoldBatch,        &FoldRunning,
                                &FoldSaved};
  return &k;
}
const bn::Kernels<float>* BatchNormKernelsF32() { return KernelTable<float>(); }
const bn::Kernels<bf16>* BatchNormKernelsBF16() { return KernelTable<bf16>(); }
const bn::Kernels<f16>* BatchNormKernelsF16() { return KernelTable<f16>(); }

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(BatchNormKernelsF32);
HWY_EXPORT(BatchNormKernelsBF16);
HWY_EXPORT(BatchNormKernelsF16);

namespace {

using bn::Kernels;
using bn::PairSums;
using bn::RunAccumulators;

template <typename T>
const Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(BatchNormKernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(BatchNormKernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(BatchNormKernelsF16)();
}

// Elements a unit of reduction work covers, about: large enough to amortize the merge, small
// enough that a few hundred thousand elements still spread over every core.
constexpr int64_t kUnitElements = int64_t(1) << 15;
// Partial results per channel are capped near this (more units than threads buy nothing).
constexpr int64_t kMaxSlots = 64;
// Channels-first runs shorter than this are read as columns of a (N, C*S) matrix instead.
constexpr int64_t kMinRunLength = 16;
// Columns one column-form unit covers, at most: whole channels of cols_per_channel columns
// (< kMinRunLength <= kBlockColumns, so at least one channel fits).
constexpr int64_t kBlockColumns = 512;
// Rows of a column-form block whose sums accumulate in float before going to double.
constexpr int64_t kColumnRows = 64;
// In the cached schedule a thread takes channels one at a time when a channel's runs are at
// least kBlockRunBytes long; shorter ones in blocks of channels whose runs of one sample make
// about that many contiguous bytes: one stream for the prefetchers instead of a short run per
// channel (a run of 7x7 floats is three cache lines). A channel at a time keeps the second pass
// in L1 where it can.
constexpr int64_t kBlockRunBytes = 4096;
constexpr int64_t kMaxBlockChannels = 64;
// Streamed forward passes (outputs of kStreamBytes and more) over channels-first planes shorter
// than kMinStreamRun values (cpu/streaming.h), for at least kSlabMinBatch samples, go slab by slab:
// the planes of a block of channels of one sample are contiguous, so with the per-channel
// coefficients spread over the slab's values one vector loop covers them (whole vectors to
// stream, no one-lane tail per plane), the spread paid once per block for all samples. Not for
// outputs that stay in cache: there the two loads of spread coefficients per vector cost more
// than the tails. A slab holds at most kSlabValues values.
constexpr int64_t kSlabValues = 4096;
constexpr int64_t kSlabMinBatch = 4;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

inline bool empty(const BatchNormShape& sh) { return sh.batch * sh.channels * sh.spatial == 0; }

inline bool reads_as_rows(const BatchNormShape& sh) {
  return sh.format == MemoryFormat::channels_last || sh.spatial == 1;
}

BatchNormTiling make_tiling(const BatchNormShape& sh) {
  BatchNormTiling p;
  p.channels = sh.channels;
  if (reads_as_rows(sh) || sh.spatial < kMinRunLength) {
    p.column_form = true;
    const bool rows = reads_as_rows(sh);
    p.rows = rows ? sh.batch * sh.spatial : sh.batch;
    p.row_stride = rows ? sh.channels : sh.channels * sh.spatial;
    p.cols_per_channel = rows ? 1 : sh.spatial;
    p.channels_per_block =
        std::min(sh.channels, std::max<int64_t>(1, kBlockColumns / p.cols_per_channel));
    p.channel_blocks = ceil_div(sh.channels, p.channels_per_block);
    const int64_t width = p.channels_per_block * p.cols_per_channel;
    p.block_rows = kColumnRows;
    p.rows_per_group = std::max(round_up(ceil_div(kUnitElements, width), p.block_rows),
                                round_up(ceil_div(p.rows, kMaxSlots), p.block_rows));
    p.slots = ceil_div(p.rows, p.rows_per_group);
    p.units = p.slots * p.channel_blocks;
  } else {
    p.column_form = false;
    p.batch = sh.batch;
    p.spatial = sh.spatial;
    if (sh.spatial <= kUnitElements) {
      p.segment_length = sh.spatial;
      p.segments = 1;
      p.samples_per_unit = std::max(kUnitElements / sh.spatial, ceil_div(sh.batch, kMaxSlots));
      p.slots = ceil_div(sh.batch, p.samples_per_unit);
    } else {
      p.segment_length = kUnitElements;  // a multiple of kChunk
      p.segments = ceil_div(sh.spatial, kUnitElements);
      p.samples_per_unit = 1;
      p.slots = sh.batch * p.segments;
    }
    p.units = p.slots * sh.channels;
  }
  return p;
}

// Calls f(n, begin, length) for the pieces of channel-first runs that run-form slot k covers,
// in order; offsets are within run (n, c).
template <class F>
void for_each_run_piece(const BatchNormTiling& p, int64_t k, F f) {
  if (p.segments == 1) {
    const int64_t n1 = std::min(p.batch, (k + 1) * p.samples_per_unit);
    for (int64_t n = k * p.samples_per_unit; n < n1; ++n) f(n, int64_t(0), p.spatial);
  } else {
    const int64_t n = k / p.segments, begin = (k % p.segments) * p.segment_length;
    f(n, begin, std::min(p.segment_length, p.spatial - begin));
  }
}

// Row range [r0, r1) and channel range [c0, c1) of column-form unit u.
struct Block {
  int64_t slot, r0, r1, c0, c1;
};
inline Block column_block(const BatchNormTiling& p, int64_t u) {
  Block b;
  b.slot = u / p.channel_blocks;
  const int64_t cb = u % p.channel_blocks;
  b.r0 = b.slot * p.rows_per_group;
  b.r1 = std::min(p.rows, b.r0 + p.rows_per_group);
  b.c0 = cb * p.channels_per_block;
  b.c1 = std::min(p.channels, b.c0 + p.channels_per_block);
  return b;
}

inline bool worth_threads(int num_threads, int64_t elements) {
  return num_threads > 1 && elements >= 2 * kUnitElements;
}

// Whether an output of `elements` values of T goes with non-temporal stores (float32 only).
template <typename T>
bool streams(int64_t elements) {
  return std::is_same_v<T, float> && streams_output<T>(elements);
}

// ---- the plan ----

enum class Schedule {
  cached_channels,  // channels-first: each block of channels' sums, then its pass, from cache
  two_phase,        // every sum, then every merge, then the elementwise pass
};

// The schedule of a call whose second pass re-reads `reread_tensors` inputs shaped like x:
// cached channels for channels-first runs, enough channels to share among the threads, and a
// channel's re-read inputs within cached_unit_bytes(). Either gives the same bits, so this may
// depend on the thread count and the cache.
Schedule plan_schedule(const BatchNormPlan& plan, int64_t reread_tensors) {
  const BatchNormShape& sh = plan.shape;
  const int64_t bytes = plan.value_bytes * reread_tensors;
  return !plan.tiling.column_form && sh.channels >= 2 * int64_t(plan.num_threads) &&
                 sh.batch * sh.spatial * bytes <= cached_unit_bytes()
             ? Schedule::cached_channels
             : Schedule::two_phase;
}

// Channels per block of the cached schedule (see kBlockRunBytes): at least one; at most as many
// as fit in cached_block_bytes() together, leaving two blocks per thread.
int64_t block_channels(const BatchNormPlan& plan, int64_t reread_tensors) {
  const BatchNormShape& sh = plan.shape;
  const int64_t want = ceil_div(kBlockRunBytes, sh.spatial * plan.value_bytes);
  const int64_t fit =
      cached_block_bytes() / (sh.batch * sh.spatial * plan.value_bytes * reread_tensors);
  const int64_t share = ceil_div(sh.channels, 2 * int64_t(std::max(plan.num_threads, 1)));
  return std::max<int64_t>(1, std::min({want, kMaxBlockChannels, fit, share}));
}

// Whether the forward's elementwise pass goes slab by slab (see kSlabValues).
inline bool by_slabs(const BatchNormShape& sh, bool stream) {
  return stream && !reads_as_rows(sh) && sh.spatial < kMinStreamRun &&
         sh.batch >= kSlabMinBatch;
}

// ---- scratch ----

struct Scratch {
  PairSums* partial;    // slots * C
  float* coefficients;  // 6 * C
};

Scratch carve(const BatchNormPlan& plan, std::span<std::byte> workspace) {
  std::byte* base = scratch_base(workspace, plan.scratch.bytes);
  return {scratch_part<PairSums>(base, plan.scratch.partial),
          scratch_part<float>(base, plan.scratch.coefficients)};
}

// Room for up to kCap objects of type U on the stack, each constructed only when used: an
// array of kCap would construct (zero) every one of them on every call.
template <typename U, int64_t kCap>
class StackSlots {
 public:
  U& emplace(int64_t i) { return *new (raw_ + i * sizeof(U)) U(); }
  U& operator[](int64_t i) { return *std::launder(reinterpret_cast<U*>(raw_ + i * sizeof(U))); }

 private:
  alignas(U) unsigned char raw_[kCap * sizeof(U)];
};

// The statistics' shift for channel c: the float mean of its first (up to) 16 values in (n, s)
// order. Near the channel's mean, so that x - pivot is small and exact where x has a large
// offset, and a function of the data and shape only.
template <typename T>
float channel_pivot(const T* x, const BatchNormShape& sh, int64_t c) {
  const int64_t count = std::min<int64_t>(16, sh.batch * sh.spatial);
  double sum = 0;
  int64_t i = 0;
  for (int64_t n = 0; i < count; ++n)
    for (int64_t s = 0; s < sh.spatial && i < count; ++s, ++i)
      sum += to_float(x[sh.format == MemoryFormat::channels_first
                            ? (n * sh.channels + c) * sh.spatial + s
                            : (n * sh.spatial + s) * sh.channels + c]);
  return float(sum / double(count));
}

// ---- phase: the per-channel sums, the same pieces in the same order for both schedules ----

// The two sums of every channel: statistics of x around center[c] (dy null), or gradients
// g = dy masked, sum(g) and sum(g * (x - center[c])).
template <typename T>
struct ChannelSums {
  const Kernels<T>& k;
  const BatchNormTiling& p;
  const T* x;
  const T* dy;     // null: statistics
  Upstream<T> up;  // with dy: g through the epilogue
  const float* center;
  int64_t C;
  const float* za = nullptr;  // silu: the forward's a and b per channel
  const float* zb = nullptr;

  // total[i] += the sums of channel c0 + i over run-form slot s, for the channels [c0, c1)
  // of a block (one channel, in the two-phase schedule), centers[i] its center. Sample by
  // sample; each channel has its own accumulators, so its runs are added in slot order with the
  // same flushes whatever the block, and each channel's sums are the same bits in both
  // schedules.
  void slot_sums(int64_t c0, int64_t c1, int64_t s, const float* centers,
                 PairSums* total) const {
    StackSlots<PairSums, kMaxBlockChannels> part;
    RunAccumulators acc[kMaxBlockChannels];
    for (int64_t i = 0; i < c1 - c0; ++i) {
      part.emplace(i);
      acc[i] = {};
    }
    for_each_run_piece(p, s, [&](int64_t n, int64_t begin, int64_t length) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t o = (n * C + c) * p.spatial + begin;
        if (dy)
          k.grad_run_sums(x + o, dy + o, up.at(o), length, centers[c - c0], za ? za[c] : 0.0f,
                          zb ? zb[c] : 0.0f, &acc[c - c0], &part[c - c0]);
        else
          k.stat_run_sums(x + o, length, centers[c - c0], &acc[c - c0], &part[c - c0]);
      }
    });
    for (int64_t i = 0; i < c1 - c0; ++i) {
      k.flush_run_sums(&acc[i], &part[i]);
      total[i].first += part[i].first;
      total[i].second += part[i].second;
    }
  }

  // partial[slot * C + c] for the channels of unit u (two-phase schedule).
  void unit_sums(int64_t u, PairSums* partial) const {
    if (!p.column_form) {
      const int64_t c = u / p.slots, s = u % p.slots;
      PairSums& out = partial[s * C + c];
      out = {};
      slot_sums(c, c + 1, s, center + c, &out);
      return;
    }
    const Block b = column_block(p, u);
    const int64_t cps = p.cols_per_channel, width = (b.c1 - b.c0) * cps;
    float centers[kBlockColumns], cza[kBlockColumns], czb[kBlockColumns];
    for (int64_t c = b.c0; c < b.c1; ++c)
      for (int64_t j = 0; j < cps; ++j) {
        centers[(c - b.c0) * cps + j] = center[c];
        cza[(c - b.c0) * cps + j] = za ? za[c] : 0.0f;
        czb[(c - b.c0) * cps + j] = zb ? zb[c] : 0.0f;
      }
    PairSums* acc = partial + b.slot * C;
    for (int64_t c = b.c0; c < b.c1; ++c) acc[c] = {};
    float s1[kBlockColumns], s2[kBlockColumns];
    for (int64_t r = b.r0; r < b.r1; r += p.block_rows) {
      const int64_t rows = std::min(p.block_rows, b.r1 - r);
      const int64_t o = r * p.row_stride + b.c0 * cps;
      if (dy)
        k.grad_column_sums(x + o, dy + o, up.at(o), rows, width, p.row_stride, centers, cza, czb,
                           s1, s2);
      else
        k.stat_column_sums(x + o, rows, width, p.row_stride, centers, s1, s2);
      for (int64_t c = b.c0; c < b.c1; ++c)
        for (int64_t j = 0; j < cps; ++j) {
          acc[c].first += s1[(c - b.c0) * cps + j];
          acc[c].second += s2[(c - b.c0) * cps + j];
        }
    }
  }

  // Channel c's sums: its slots' partials added in slot order.
  PairSums merge(const PairSums* partial, int64_t c) const {
    PairSums s;
    for (int64_t slot = 0; slot < p.slots; ++slot) {
      s.first += partial[slot * C + c].first;
      s.second += partial[slot * C + c].second;
    }
    return s;
  }

  // Two-phase, inside a parallel region (every thread calls it): every unit's partials, then
  // done(c, sums) for each channel on the thread that merged it; each loop ends with a barrier.
  template <class Done>
  void reduce(PairSums* partial, const Done& done) const {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < p.units; ++u) unit_sums(u, partial);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) done(c, merge(partial, c));
  }

  // Cached schedule: total[i] += the sums of channel c0 + i, i < c1 - c0, centers[i] its
  // center.
  void block_sums(int64_t c0, int64_t c1, const float* centers, PairSums* total) const {
    for (int64_t s = 0; s < p.slots; ++s) slot_sums(c0, c1, s, centers, total);
  }
};

// ---- phase: elementwise passes over the whole tensor (two-phase schedule) ----

// Calls run(c, offset, length) over channels-first runs (pieces of one (n, c) plane), or
// rows(offset, row_count) over blocks of channels-last rows; pieces fixed by the shape, shared
// among the threads of the region (barrier included). `stream`: the calls may write with
// non-temporal stores, which each thread fences after its share.
template <class RunFn, class RowsFn>
void for_each_piece(const BatchNormShape& sh, bool stream, RunFn run, RowsFn rows) {
  if (reads_as_rows(sh)) {
    const int64_t n_rows = sh.batch * sh.spatial;
    const int64_t per_piece = std::max<int64_t>(1, kUnitElements / sh.channels);
    for_in_region(ceil_div(n_rows, per_piece), stream, [&](int64_t k) {
      const int64_t r0 = k * per_piece;
      rows(r0 * sh.channels, std::min(per_piece, n_rows - r0));
    });
  } else {
    const int64_t planes = sh.batch * sh.channels;
    if (sh.spatial < kUnitElements) {
      // Several whole planes per piece, so that short planes do not each cost a piece.
      const int64_t per_piece = kUnitElements / sh.spatial;
      for_in_region(ceil_div(planes, per_piece), stream, [&](int64_t k) {
        for (int64_t plane = k * per_piece; plane < std::min(planes, (k + 1) * per_piece); ++plane)
          run(plane % sh.channels, plane * sh.spatial, sh.spatial);
      });
    } else {
      const int64_t per_plane = ceil_div(sh.spatial, kUnitElements);
      for_in_region(planes * per_plane, stream, [&](int64_t k) {
        const int64_t plane = k / per_plane, begin = (k % per_plane) * kUnitElements;
        run(plane % sh.channels, plane * sh.spatial + begin,
            std::min(kUnitElements, sh.spatial - begin));
      });
    }
  }
}

// ---- the forward's phases ----

// One forward call: its arguments and the phases over them.
template <typename T>
struct BatchNormForward {
  const Kernels<T>& k;
  const BatchNormShape& sh;
  const T* x;
  const T* r;  // residual, or null
  Activation relu;
  T* y;
  bool stream = streams<T>(sh.batch * sh.channels * sh.spatial);

  // y for channels [c0, c1) of every sample (c1 - c0 <= kMaxBlockChannels), a[c - c0] and
  // b[c - c0] channel c's coefficients: slab by slab where that applies, else plane by plane.
  void apply_block(int64_t c0, int64_t c1, const float* a, const float* b) const {
    const int64_t S = sh.spatial, C = sh.channels;
    if (c1 - c0 > 1 && (c1 - c0) * S <= kSlabValues && by_slabs(sh, stream))
      return apply_slabs(c0, c1, a, b);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t o = (n * C + c) * S;
        k.affine_run(y + o, x + o, r ? r + o : nullptr, S, a[c - c0], b[c - c0], relu, stream);
      }
  }

  // The same slab by slab ((c1 - c0) * S <= kSlabValues): the coefficients spread over the
  // block's values once, then one slab per sample.
  void apply_slabs(int64_t c0, int64_t c1, const float* a, const float* b) const {
    const int64_t S = sh.spatial, n_values = (c1 - c0) * S;
    float sa[kSlabValues], sb[kSlabValues];  // read with unaligned loads
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(sa + (c - c0) * S, sa + (c - c0 + 1) * S, a[c - c0]);
      std::fill(sb + (c - c0) * S, sb + (c - c0 + 1) * S, b[c - c0]);
    }
    for (int64_t n = 0; n < sh.batch; ++n) {
      const int64_t o = (n * sh.channels + c0) * S;
      k.affine_slab(y + o, x + o, r ? r + o : nullptr, n_values, sa, sb, relu, stream);
    }
  }

  // Inside a parallel region: y from the per-channel coefficients a, b (C each).
  void apply(const float* a, const float* b) const {
    const int64_t C = sh.channels;
    if (by_slabs(sh, stream)) {
      const int64_t per = std::max<int64_t>(1, kSlabValues / sh.spatial);
      for_in_region(ceil_div(C, per), stream, [&](int64_t block) {
        const int64_t c0 = block * per;
        apply_slabs(c0, std::min(C, c0 + per), a + c0, b + c0);
      });
      return;
    }
    for_each_piece(
        sh, stream,
        [&](int64_t c, int64_t o, int64_t length) {
          k.affine_run(y + o, x + o, r ? r + o : nullptr, length, a[c], b[c], relu, stream);
        },
        [&](int64_t o, int64_t rows) {
          k.affine_rows(y + o, x + o, r ? r + o : nullptr, rows, C, a, b, relu, stream);
        });
  }
};

// ---- the backward's phases ----

// With g the masked dy, xhat = (x - mean) * invstd, M values per channel, p = weight * invstd:
//   dbias = sum(g), dweight = sum(g * xhat) = invstd * sum(g * (x - mean))
//   dx = p * (g - sum(g) / M - xhat * sum(g * xhat) / M)
//      = g * p + (x - mean) * q + r,   q = -p * invstd^2 * sum(g * (x - mean)) / M
//                                      r = -p * sum(g) / M
// the q term being the gradient through the variance and r the one through the mean.
template <typename T>
struct BatchNormBackward {
  const Kernels<T>& k;
  const BatchNormShape& sh;
  const T* dy;
  Upstream<T> up;  // g through the epilogue (relu's mask, silu's z)
  const T* zx;     // silu: x, for z
  const float* za;  // silu: the forward's a, b per channel
  const float* zb;
  const T* x;     // null: the inference backward (dx = g * p)
  const float* weight;
  T* dx;
  T* dres;  // receives g, or null
  float* dweight;
  float* dbias;
  bool stream = streams<T>(sh.batch * sh.channels * sh.spatial);

  // Channel c's dx coefficients from its sums over `count` values; writes dweight[c] and
  // dbias[c] when wanted.
  void coefficients(int64_t c, const PairSums& s, double invstd, double count, float& p,
                    float& q, float& r) const {
    const double pc = (weight ? weight[c] : 1.0f) * invstd;
    if (dbias) dbias[c] = float(s.first);
    if (dweight) dweight[c] = float(s.second * invstd);
    p = float(pc);
    q = float(-pc * invstd * invstd * s.second / count);
    r = float(-pc * s.first / count);
  }

  // dx for channels [c0, c1) of every sample; p[c - c0] etc. channel c's (cached schedule).
  void dx_block(int64_t c0, int64_t c1, const float* p, const float* q, const float* r,
                const float* m) const {
    const int64_t S = sh.spatial, C = sh.channels;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t o = (n * C + c) * S;
        k.dx_run(dx + o, dres ? dres + o : nullptr, dy + o, up.at(o), zx ? zx + o : nullptr,
                 x + o, S, p[c - c0], q[c - c0], r[c - c0], m[c - c0], za ? za[c] : 0.0f,
                 zb ? zb[c] : 0.0f, stream);
      }
  }

  // Inside a parallel region: dx from the per-channel coefficients (C each; q, r and m are
  // not read without x). `streamed`: dx may go with non-temporal stores.
  void dx_all(const float* p, const float* q, const float* r, const float* m,
              bool streamed) const {
    const T* xs = x;
    for_each_piece(
        sh, streamed,
        [&](int64_t c, int64_t o, int64_t length) {
          k.dx_run(dx + o, dres ? dres + o : nullptr, dy + o, up.at(o), zx ? zx + o : nullptr,
                   xs ? xs + o : nullptr, length, p[c], q[c], r[c], m[c], za ? za[c] : 0.0f,
                   zb ? zb[c] : 0.0f, streamed);
        },
        [&](int64_t o, int64_t rows) {
          k.dx_rows(dx + o, dres ? dres + o : nullptr, dy + o, up.at(o), zx ? zx + o : nullptr,
                    xs ? xs + o : nullptr, rows, sh.channels, p, q, r, m, za, zb, streamed);
        });
  }
};

}  // namespace

BatchNormPlan plan_batch_norm(const BatchNormShape& shape, int64_t value_bytes,
                              int num_threads) {
  BatchNormPlan plan;
  plan.shape = shape;
  plan.value_bytes = value_bytes;
  plan.num_threads = std::max(num_threads, 1);
  if (empty(shape)) return plan;
  plan.tiling = make_tiling(shape);
  ScratchLayout l;
  plan.scratch.partial = l.add<PairSums>(plan.tiling.slots, shape.channels);
  plan.scratch.coefficients = l.add<float>(6, shape.channels);
  plan.scratch.bytes = l.workspace_bytes();
  return plan;
}

std::size_t workspace_size(const BatchNormShape& shape) {
  return plan_batch_norm(shape, sizeof(float), 1).scratch.bytes;
}

template <typename T>
void batch_norm_forward_training(const BatchNormPlan& plan, double eps, double momentum,
                                 const ForwardEpilogueOf<T>& epilogue, const T* x,
                                 const float* weight, const float* bias, T* y, float* save_mean,
                                 float* save_invstd, float* running_mean, float* running_var,
                                 std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels;
  const int num_threads = plan.num_threads;
  const bool parallel = worth_threads(num_threads, sh.batch * C * sh.spatial);
  const double count = double(sh.batch * sh.spatial);
  const BatchNormForward<T> f{kernels<T>(), sh, x, epilogue.residual, epilogue.activation, y};
  auto at = [](float* p, int64_t c) { return p ? p + c : nullptr; };
  auto cat = [](const float* p, int64_t c) { return p ? p + c : nullptr; };
  // Statistics and coefficients of channels [c0, c0 + n) from their sums.
  auto fold = [&](int64_t c0, int64_t n, const PairSums* sums, const float* pivot, float* a,
                  float* b) {
    f.k.fold_batch(n, sums, pivot, count, eps, momentum, cat(weight, c0), cat(bias, c0),
                   save_mean + c0, save_invstd + c0, at(running_mean, c0), at(running_var, c0),
                   a, b);
  };

  const int64_t reread = epilogue.residual ? 2 : 1;
  if (plan_schedule(plan, reread) == Schedule::cached_channels) {
    // Each block of channels: its statistics, then its elementwise pass while its runs are in
    // cache.
    const int64_t B = block_channels(plan, reread);
    parallel_for(ceil_div(C, B), num_threads, parallel, f.stream, [&](int64_t block) {
      const int64_t c0 = block * B, c1 = std::min(C, c0 + B);
      float pivot[kMaxBlockChannels], a[kMaxBlockChannels], b[kMaxBlockChannels];
      StackSlots<PairSums, kMaxBlockChannels> sums;
      for (int64_t c = c0; c < c1; ++c) {
        pivot[c - c0] = channel_pivot(x, sh, c);
        sums.emplace(c - c0);
      }
      const ChannelSums<T> s{f.k, plan.tiling, x, nullptr, {}, nullptr, C};
      s.block_sums(c0, c1, pivot, &sums[0]);
      fold(c0, c1 - c0, &sums[0], pivot, a, b);
      f.apply_block(c0, c1, a, b);
    });
    return;
  }

  const Scratch scratch = carve(plan, workspace);
  float* a = scratch.coefficients;
  float* b = a + C;
  float* pivot = b + C;
  const ChannelSums<T> s{f.k, plan.tiling, x, nullptr, {}, pivot, C};
  // One parallel region: pivots, partial sums, per-channel merge and fold, output pass.
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) pivot[c] = channel_pivot(x, sh, c);
    s.reduce(scratch.partial, [&](int64_t c, const PairSums& sums) {
      fold(c, 1, &sums, pivot + c, a + c, b + c);
    });
    f.apply(a, b);
  }
}

template <typename T>
void batch_norm_statistics(const BatchNormPlan& plan, double eps, double momentum, const T* x,
                           float* save_mean, float* save_invstd, float* running_mean,
                           float* running_var, std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels;
  const double count = double(sh.batch * sh.spatial);
  const Kernels<T>& k = kernels<T>();
  auto at = [](float* p, int64_t c) { return p ? p + c : nullptr; };
  // The two-phase schedule's sums: both schedules sum the same pieces in the same order.
  const Scratch scratch = carve(plan, workspace);
  float* a = scratch.coefficients;
  float* b = a + C;
  float* pivot = b + C;
  const ChannelSums<T> s{k, plan.tiling, x, nullptr, {}, pivot, C};
#pragma omp parallel num_threads(plan.num_threads) \
    if (worth_threads(plan.num_threads, sh.batch * C * sh.spatial))
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) pivot[c] = channel_pivot(x, sh, c);
    s.reduce(scratch.partial, [&](int64_t c, const PairSums& sums) {
      k.fold_batch(1, &sums, pivot + c, count, eps, momentum, nullptr, nullptr, save_mean + c,
                   save_invstd + c, at(running_mean, c), at(running_var, c), a + c, b + c);
    });
  }
}

template <typename T>
void batch_norm_forward_inference(const BatchNormPlan& plan, double eps,
                                  const ForwardEpilogueOf<T>& epilogue, const T* x,
                                  const float* weight, const float* bias,
                                  const float* running_mean, const float* running_var, T* y,
                                  std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels;
  const BatchNormForward<T> f{kernels<T>(), sh, x, epilogue.residual, epilogue.activation, y};
  const Scratch scratch = carve(plan, workspace);
  float* a = scratch.coefficients;
  float* b = a + C;
#pragma omp parallel num_threads(plan.num_threads) \
    if (worth_threads(plan.num_threads, sh.batch * C * sh.spatial))
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c)
      f.k.fold_running(1, running_mean + c, running_var + c, eps, weight ? weight + c : nullptr,
                       bias ? bias + c : nullptr, a + c, b + c);
    f.apply(a, b);
  }
}

namespace {

template <typename T>
Upstream<T> upstream_of(const BackwardEpilogueOf<T>& e) {
  return {e.relu() ? e.y : nullptr, e.silu(), e.silu() ? e.residual : nullptr};
}

}  // namespace

template <typename T>
void batch_norm_backward_training(const BatchNormPlan& plan, const BackwardEpilogueOf<T>& epilogue,
                                  const T* dy, const T* x, const float* save_mean,
                                  const float* save_invstd, const float* weight, T* dx,
                                  float* dweight, float* dbias, std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels, count = sh.batch * sh.spatial;
  const int num_threads = plan.num_threads;
  const bool parallel = worth_threads(num_threads, count * C);
  const Upstream<T> up = upstream_of(epilogue);
  const Scratch scratch = carve(plan, workspace);
  float* za = epilogue.silu() ? scratch.coefficients + 4 * C : nullptr;
  float* zb = epilogue.silu() ? za + C : nullptr;
  if (epilogue.silu())
    kernels<T>().fold_saved(C, save_mean, save_invstd, weight, epilogue.bias, za, zb);
  const BatchNormBackward<T> bw{kernels<T>(), sh,     dy,      up, epilogue.silu() ? x : nullptr,
                                za,           zb,     x,       weight,  dx,
                                epilogue.dresidual, dweight, dbias};
  const ChannelSums<T> s{bw.k, plan.tiling, x, dy, up, save_mean, C, za, zb};

  const int64_t reread = up.mask || up.residual ? 3 : 2;
  if (plan_schedule(plan, reread) == Schedule::cached_channels) {
    const int64_t B = block_channels(plan, reread);
    parallel_for(ceil_div(C, B), num_threads, parallel, bw.stream, [&](int64_t block) {
      const int64_t c0 = block * B, c1 = std::min(C, c0 + B);
      StackSlots<PairSums, kMaxBlockChannels> sums;
      float p[kMaxBlockChannels], q[kMaxBlockChannels], r[kMaxBlockChannels];
      for (int64_t c = c0; c < c1; ++c) sums.emplace(c - c0);
      s.block_sums(c0, c1, save_mean + c0, &sums[0]);
      for (int64_t c = c0; c < c1; ++c)
        bw.coefficients(c, sums[c - c0], save_invstd[c], double(count), p[c - c0], q[c - c0],
                        r[c - c0]);
      bw.dx_block(c0, c1, p, q, r, save_mean + c0);
    });
    return;
  }

  float* p = scratch.coefficients;
  float* q = p + C;
  float* r = q + C;
  // One parallel region: partial sums, per-channel merge and coefficients, dx pass.
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    s.reduce(scratch.partial, [&](int64_t c, const PairSums& sums) {
      bw.coefficients(c, sums, save_invstd[c], double(count), p[c], q[c], r[c]);
    });
    bw.dx_all(p, q, r, save_mean, bw.stream);
  }
}

template <typename T>
void batch_norm_backward_inference(const BatchNormPlan& plan, double eps,
                                   const BackwardEpilogueOf<T>& epilogue, const T* dy,
                                   const T* x, const float* running_mean,
                                   const float* running_var, const float* weight, T* dx,
                                   float* dweight, float* dbias, std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels;
  const Upstream<T> up = upstream_of(epilogue);
  const Scratch scratch = carve(plan, workspace);
  float* p = scratch.coefficients;
  // silu: z with the inference forward's own coefficients (the same bits as its z).
  float* za = epilogue.silu() ? p + 4 * C : nullptr;
  float* zb = epilogue.silu() ? za + C : nullptr;
  if (epilogue.silu())
    kernels<T>().fold_running(C, running_mean, running_var, eps, weight, epilogue.bias, za, zb);
  const BatchNormBackward<T> bw{kernels<T>(), sh,     dy,      up, epilogue.silu() ? x : nullptr,
                                za,           zb,     nullptr, weight,  dx,
                                epilogue.dresidual, dweight, dbias};
  const ChannelSums<T> s{bw.k, plan.tiling, x, dy, up, running_mean, C, za, zb};
#pragma omp parallel num_threads(plan.num_threads) \
    if (worth_threads(plan.num_threads, sh.batch * C * sh.spatial))
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c)
      p[c] = float((weight ? weight[c] : 1.0f) / std::sqrt(double(running_var[c]) + eps));
    if (dweight || dbias)
      s.reduce(scratch.partial, [&](int64_t c, const PairSums& sums) {
        if (dbias) dbias[c] = float(sums.first);
        if (dweight) dweight[c] = float(sums.second / std::sqrt(double(running_var[c]) + eps));
      });
    bw.dx_all(p, p, p, p, /*streamed=*/false);
  }
}

#define NORMKIT_BATCH_NORM_INSTANTIATE(T)                                                        \
  template void batch_norm_forward_training<T>(                                                 \
      const BatchNormPlan&, double, double, const ForwardEpilogueOf<T>&, const T*, const float*, \
      const float*, T*, float*, float*, float*, float*, std::span<std::byte>);                  \
  template void batch_norm_statistics<T>(const BatchNormPlan&, double, double, const T*, float*, \
                                         float*, float*, float*, std::span<std::byte>);         \
  template void batch_norm_forward_inference<T>(                                                \
      const BatchNormPlan&, double, const ForwardEpilogueOf<T>&, const T*, const float*,        \
      const float*, const float*, const float*, T*, std::span<std::byte>);                      \
  template void batch_norm_backward_training<T>(                                                \
      const BatchNormPlan&, const BackwardEpilogueOf<T>&, const T*, const T*, const float*,     \
      const float*, const float*, T*, float*, float*, std::span<std::byte>);                    \
  template void batch_norm_backward_inference<T>(                                               \
      const BatchNormPlan&, double, const BackwardEpilogueOf<T>&, const T*, const T*,           \
      const float*, const float*, const float*, T*, float*, float*, std::span<std::byte>);
NORMKIT_BATCH_NORM_INSTANTIATE(float)
NORMKIT_BATCH_NORM_INSTANTIATE(bf16)
NORMKIT_BATCH_NORM_INSTANTIATE(f16)
#undef NORMKIT_BATCH_NORM_INSTANTIATE

// ---- the steps (see batch_norm.h) ----

namespace {

// Channels of one leaf unit: a unit is (sample, block of channels); a channel's leaf is
// computed alone, so the block changes no bit. Channels-first: about kUnitElements values.
// Rows: as wide as the column kernel takes, since a narrower block would read every row's
// cache lines once per block.
int64_t leaf_block_channels(const BatchNormShape& sh) {
  if (reads_as_rows(sh)) return std::min(sh.channels, kBlockColumns);
  const int64_t by_size = std::max<int64_t>(1, kUnitElements / std::max<int64_t>(sh.spatial, 1));
  return std::min({sh.channels, by_size, kBlockColumns});
}

// Calls leaf(n, c0, c1) for every unit, shared among the threads.
template <class F>
void for_each_leaf_unit(const BatchNormShape& sh, int num_threads, const F& leaf) {
  const int64_t B = leaf_block_channels(sh), blocks = ceil_div(sh.channels, B);
  parallel_for(sh.batch * blocks, num_threads,
               worth_threads(num_threads, sh.batch * sh.channels * sh.spatial), false,
               [&](int64_t u) {
                 const int64_t n = u / blocks, c0 = (u % blocks) * B;
                 leaf(n, c0, std::min(sh.channels, c0 + B));
               });
}

// A leaf's pivot: the float mean of its first (up to) 16 values, at p with the given stride.
template <typename T>
float leaf_pivot(const T* p, int64_t spatial, int64_t stride) {
  const int64_t count = std::min<int64_t>(16, spatial);
  double sum = 0;
  for (int64_t s = 0; s < count; ++s) sum += to_float(p[s * stride]);
  return float(sum / double(count));
}

// (mean, M2) of a leaf from its shifted sums over `count` values around `pivot`.
inline void leaf_moments(const PairSums& s, float pivot, double count, double& mean,
                         double& m2) {
  mean = double(pivot) + s.first / count;
  m2 = s.second - s.first * (s.first / count);
  if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
}

// The two sums of the channels [c0, c1) of sample n: runs (channels-first), else the column
// sums over blocks of kColumnRows rows added in double. dy null: statistics around centers.
template <typename T>
void leaf_sums(const Kernels<T>& k, const BatchNormShape& sh, int64_t n, int64_t c0, int64_t c1,
               const T* x, const T* dy, const Upstream<T>& up, const float* centers,
               PairSums* sums) {
  const int64_t C = sh.channels, S = sh.spatial;
  if (!reads_as_rows(sh)) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = (n * C + c) * S;
      RunAccumulators acc{};
      PairSums& out = sums[c - c0];
      out = {};
      // The steps refuse silu: no z coefficients.
      if (dy) k.grad_run_sums(x + o, dy + o, up.at(o), S, centers[c - c0], 0.0f, 0.0f, &acc,
                              &out);
      else k.stat_run_sums(x + o, S, centers[c - c0], &acc, &out);
      k.flush_run_sums(&acc, &out);
    }
    return;
  }
  const int64_t width = c1 - c0;
  for (int64_t c = 0; c < width; ++c) sums[c] = {};
  float s1[kBlockColumns], s2[kBlockColumns];
  for (int64_t r = 0; r < S; r += kColumnRows) {
    const int64_t rows = std::min(kColumnRows, S - r);
    const int64_t o = (n * S + r) * C + c0;
    if (dy) k.grad_column_sums(x + o, dy + o, up.at(o), rows, width, C, centers, nullptr,
                               nullptr, s1, s2);
    else k.stat_column_sums(x + o, rows, width, C, centers, s1, s2);
    for (int64_t c = 0; c < width; ++c) {
      sums[c].first += s1[c];
      sums[c].second += s2[c];
    }
  }
}

}  // namespace

template <typename T>
void batch_norm_sample_statistics(const BatchNormShape& sh, int num_threads, const T* x,
                                  double* mean, double* m2) {
  if (empty(sh)) return;
  const Kernels<T>& k = kernels<T>();
  const int64_t C = sh.channels, S = sh.spatial;
  for_each_leaf_unit(sh, num_threads, [&](int64_t n, int64_t c0, int64_t c1) {
    float pv[kBlockColumns];
    PairSums sm[kBlockColumns];
    for (int64_t c = c0; c < c1; ++c)
      pv[c - c0] = reads_as_rows(sh) ? leaf_pivot(x + n * S * C + c, S, C)
                                     : leaf_pivot(x + (n * C + c) * S, S, 1);
    leaf_sums<T>(k, sh, n, c0, c1, x, nullptr, Upstream<T>{}, pv, sm);
    for (int64_t c = c0; c < c1; ++c)
      leaf_moments(sm[c - c0], pv[c - c0], double(S), mean[n * C + c], m2[n * C + c]);
  });
}

template <typename T>
void batch_norm_sample_gradients(const BatchNormShape& sh, int num_threads,
                                 const BackwardEpilogueOf<T>& epilogue, const T* dy, const T* x,
                                 const float* mean, double* sum_g, double* sum_g_xmu) {
  if (sh.batch * sh.channels == 0) return;
  const int64_t C = sh.channels;
  if (sh.spatial == 0) {
    std::fill(sum_g, sum_g + sh.batch * C, 0.0);
    std::fill(sum_g_xmu, sum_g_xmu + sh.batch * C, 0.0);
    return;
  }
  const Kernels<T>& k = kernels<T>();
  const T* mask = epilogue.relu() ? epilogue.y : nullptr;
  for_each_leaf_unit(sh, num_threads, [&](int64_t n, int64_t c0, int64_t c1) {
    PairSums sm[kBlockColumns];
    leaf_sums<T>(k, sh, n, c0, c1, x, dy, Upstream<T>{mask}, mean + c0, sm);
    for (int64_t c = c0; c < c1; ++c) {
      sum_g[n * C + c] = sm[c - c0].first;
      sum_g_xmu[n * C + c] = sm[c - c0].second;
    }
  });
}

template <typename T>
void batch_norm_normalize(const BatchNormPlan& plan, const ForwardEpilogueOf<T>& epilogue,
                          const T* x, const float* weight, const float* bias, const float* mean,
                          const float* invstd, T* y, std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels;
  const BatchNormForward<T> f{kernels<T>(), sh, x, epilogue.residual, epilogue.activation, y};
  const Scratch scratch = carve(plan, workspace);
  float* a = scratch.coefficients;
  float* b = a + C;
  // As the training forward's fold: b uses the rounded a.
  for (int64_t c = 0; c < C; ++c) {
    a[c] = float(double(invstd[c]) * (weight ? weight[c] : 1.0f));
    b[c] = float((bias ? bias[c] : 0.0f) - double(mean[c]) * double(a[c]));
  }
#pragma omp parallel num_threads(plan.num_threads) \
    if (worth_threads(plan.num_threads, sh.batch * C * sh.spatial))
  f.apply(a, b);
}

template <typename T>
void batch_norm_backward_dx(const BatchNormPlan& plan, const BackwardEpilogueOf<T>& epilogue,
                            double count, const T* dy, const T* x, const float* save_mean,
                            const float* save_invstd, const float* weight, const double* sum_g,
                            const double* sum_g_xmu, T* dx, std::span<std::byte> workspace) {
  const BatchNormShape& sh = plan.shape;
  if (empty(sh)) return;
  const int64_t C = sh.channels;
  const T* mask = epilogue.relu() ? epilogue.y : nullptr;
  // The steps take none or relu (the api refuses silu), so g needs no z.
  const BatchNormBackward<T> bw{kernels<T>(), sh,      dy,      Upstream<T>{mask}, nullptr,
                                nullptr,      nullptr, x,       weight,            dx,
                                epilogue.dresidual,    nullptr, nullptr};
  const Scratch scratch = carve(plan, workspace);
  float* p = scratch.coefficients;
  float* q = p + C;
  float* r = q + C;
  for (int64_t c = 0; c < C; ++c)
    bw.coefficients(c, PairSums{sum_g[c], sum_g_xmu[c]}, save_invstd[c], count, p[c], q[c],
                    r[c]);
#pragma omp parallel num_threads(plan.num_threads) \
    if (worth_threads(plan.num_threads, sh.batch * C * sh.spatial))
  bw.dx_all(p, q, r, save_mean, bw.stream);
}

#define NORMKIT_BATCH_NORM_STEPS_INSTANTIATE(T)                                                  \
  template void batch_norm_sample_statistics<T>(const BatchNormShape&, int, const T*, double*,  \
                                                double*);                                       \
  template void batch_norm_sample_gradients<T>(const BatchNormShape&, int,                      \
                                               const BackwardEpilogueOf<T>&, const T*, const T*, \
                                               const float*, double*, double*);                 \
  template void batch_norm_normalize<T>(const BatchNormPlan&, const ForwardEpilogueOf<T>&,      \
                                        const T*, const float*, const float*, const float*,     \
                                        const float*, T*, std::span<std::byte>);                \
  template void batch_norm_backward_dx<T>(const BatchNormPlan&, const BackwardEpilogueOf<T>&,   \
                                          double, const T*, const T*, const float*,             \
                                          const float*, const float*, const double*,            \
                                          const double*, T*, std::span<std::byte>);
NORMKIT_BATCH_NORM_STEPS_INSTANTIATE(float)
NORMKIT_BATCH_NORM_STEPS_INSTANTIATE(bf16)
NORMKIT_BATCH_NORM_STEPS_INSTANTIATE(f16)
#undef NORMKIT_BATCH_NORM_STEPS_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
