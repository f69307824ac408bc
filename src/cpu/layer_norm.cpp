// LayerNorm and RMSNorm (LayerNorm without the mean: m = 0, no bias, no term through the mean)
// CPU kernels, one set for both: threading, scratch and folding below (HWY_ONCE section), SIMD leaf loops
// per Highway target above it.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/layer_norm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/layer_norm.h"
#include "cpu/cache.h"
#include "cpu/scratch.h"
#include "cpu/moments.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"
#include "cpu/upstream.h"
#include "cpu/tiling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#ifndef NORMKIT_CPU_LAYER_NORM_KERNELS_
#define NORMKIT_CPU_LAYER_NORM_KERNELS_
namespace normkit::cpu::ln {

// The leaf loops of one SIMD target for activations of type T. w and b are in the order the row
// is stored (already offset to the piece). `up` makes g from dy through the epilogue
// (cpu/upstream.h); silu recomputes z = (x - m) * r * w[i] + bias[i] + residual?.
template <typename T>
struct Kernels {
  // y[i] = act(((x[i] - m) * r + t) * w[i] + b[i] + res?[i]), i < n. `stream`: y with
  // non-temporal stores where they apply (float32; see cpu/simd.h).
  void (*apply_run)(T* y, const T* x, const T* res, const float* w, const float* b, int64_t n,
                    float m, float r, float t, Activation act, bool stream);
  // Over i < n <= kRunChunk: *sum_g = sum(g * w), *sum_gxc = sum(g * w * (x - m)); writes g to
  // gout when not null; when col_g is not null, adds g to col_g[i] and g * (x - m) * r to
  // col_gxhat[i] (float column partials of dbias and dweight).
  void (*grad_run)(const T* dy, const Upstream<T>& up, const T* x, const float* w,
                   const float* bias, T* gout, int64_t n, float m, float r, float* col_g,
                   float* col_gxhat, double* sum_g, double* sum_gxc);
  // dx[i] = a * w[i] * g[i] + b * (x[i] - m) + c + add?[i] (a: the row's rstd; add: RMSNorm's
  // dsum_out, null for none). `stream` as above.
  void (*dx_run)(T* dx, const T* dy, const Upstream<T>& up, const T* x, const float* w,
                 const float* bias, int64_t n, float a, float b, float m, float c, const T* add,
                 bool stream);
  // out[i] = a[i] + b[i], summed in float and rounded once (RMSNorm's fused residual add).
  void (*add_run)(T* out, const T* a, const T* b, int64_t n);
};

}  // namespace normkit::cpu::ln
#endif

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {
namespace {

template <class D>
using V = hn::Vec<D>;

// The gradient the normalization sees: dy, zeroed where the ReLU's output was not positive.
template <bool kMask, class D, typename T>
HWY_INLINE V<D> MaskedGradient(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT mask) {
  const auto g = LoadF(d, dy);
  if constexpr (!kMask) return g;
  else return hn::IfThenElseZero(hn::Gt(LoadF(d, mask), hn::Zero(d)), g);
}

// g at i through the epilogue with xc = x - m there: relu's mask (kMask), or silu's
// z = xc * r * w + bias + residual? recomputed (kSilu; the forward's t is 0 for a float mean).
// Both decided once per call, outside the loops.
template <bool kMask, bool kSilu, class D, typename T>
HWY_INLINE V<D> UpstreamAt(D d, const T* HWY_RESTRICT dy, const Upstream<T>& up, int64_t i,
                           V<D> xc, V<D> r, const float* HWY_RESTRICT w,
                           const float* HWY_RESTRICT bias) {
  if constexpr (kSilu) {
    auto z = hn::MulAdd(hn::Mul(xc, r), hn::LoadU(d, w + i), hn::LoadU(d, bias + i));
    if (up.residual) z = hn::Add(z, LoadF(d, up.residual + i));
    return hn::Mul(LoadF(d, dy + i), SiluDerivative(d, z));
  } else {
    (void)xc, (void)r, (void)w, (void)bias;
    return MaskedGradient<kMask>(d, dy + i, kMask ? up.mask + i : nullptr);
  }
}

// f(std::bool_constant<mask>, std::bool_constant<silu>) for up's epilogue.
template <typename T, class F>
HWY_INLINE void WithUpstream(const Upstream<T>& up, F&& f) {
  if (up.mask) return f(std::true_type(), std::false_type());
  if (up.silu) return f(std::false_type(), std::true_type());
  f(std::false_type(), std::false_type());
}

// ---- elementwise steps, the same for a full vector and a one-lane tail ----

template <bool kResidual, int kAct, bool kStream = false, class D, typename T>
HWY_INLINE void ApplyStep(D d, T* HWY_RESTRICT y, const T* HWY_RESTRICT x,
                          const T* HWY_RESTRICT res, const float* HWY_RESTRICT w,
                          const float* HWY_RESTRICT b, V<D> m, V<D> r, V<D> t) {
  auto v = hn::MulAdd(hn::MulAdd(hn::Sub(LoadF(d, x), m), r, t), hn::LoadU(d, w), hn::LoadU(d, b));
  if constexpr (kResidual) v = hn::Add(v, LoadF(d, res));
  StoreOut<kStream>(Activate<kAct>(d, v), d, y);
}

// kStream: y with non-temporal stores (see ForEachInRun).
template <bool kResidual, int kRelu, bool kStream, typename T>
void ApplyRunT(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, const T* HWY_RESTRICT res,
               const float* HWY_RESTRICT w, const float* HWY_RESTRICT b, int64_t n, float m,
               float r, float t) {
  ForEachInRun<kStream>(y, n, [&](auto d, int64_t i, auto stream) {
    // No offset is applied to an absent residual (null).
    ApplyStep<kResidual, kRelu, decltype(stream)::value>(
        d, y + i, x + i, kResidual ? res + i : res, w + i, b + i, hn::Set(d, m), hn::Set(d, r),
        hn::Set(d, t));
  });
}

template <typename T>
void ApplyRun(T* y, const T* x, const T* res, const float* w, const float* b, int64_t n, float m,
              float r, float t, Activation act, bool stream) {
  WithStream<T>(stream, [&](auto kS) {
    WithActivation(act, [&](auto kA) {
      constexpr bool S = decltype(kS)::value;
      constexpr int A = decltype(kA)::value;
      res ? ApplyRunT<true, A, S>(y, x, res, w, b, n, m, r, t)
          : ApplyRunT<false, A, S>(y, x, res, w, b, n, m, r, t);
    });
  });
}

// One step of the backward's first pass: row sums into (sg, sx), column partials in memory.
template <bool kMask, bool kSilu, bool kColumns, class D, typename T>
HWY_INLINE void GradStep(D d, const T* HWY_RESTRICT dy, const Upstream<T>& up, int64_t i,
                         const T* HWY_RESTRICT x, const float* HWY_RESTRICT w,
                         const float* HWY_RESTRICT bias, T* HWY_RESTRICT gout,
                         float* HWY_RESTRICT col_g, float* HWY_RESTRICT col_gxhat, V<D> m, V<D> r,
                         V<D>& sg, V<D>& sx) {
  const auto xc = hn::Sub(LoadF(d, x + i), m);
  const auto g = UpstreamAt<kMask, kSilu>(d, dy, up, i, xc, r, w, bias);
  if (gout) StoreF(g, d, gout + i);
  w += i;
  col_g = col_g ? col_g + i : col_g;
  col_gxhat = col_gxhat ? col_gxhat + i : col_gxhat;
  const auto gw = hn::Mul(g, hn::LoadU(d, w));
  sg = hn::Add(sg, gw);
  sx = hn::MulAdd(gw, xc, sx);
  if constexpr (kColumns) {
    hn::StoreU(hn::Add(hn::LoadU(d, col_g), g), d, col_g);
    hn::StoreU(hn::MulAdd(hn::Mul(g, xc), r, hn::LoadU(d, col_gxhat)), d, col_gxhat);
  }
}

template <bool kMask, bool kSilu, bool kColumns, typename T>
void GradRunT(const T* HWY_RESTRICT dy, const Upstream<T>& up, const T* HWY_RESTRICT x,
              const float* HWY_RESTRICT w, const float* HWY_RESTRICT bias, T* HWY_RESTRICT gout,
              int64_t n, float m, float r, float* HWY_RESTRICT col_g,
              float* HWY_RESTRICT col_gxhat, double* sum_g, double* sum_gxc) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto vm = hn::Set(d, m), vr = hn::Set(d, r);
  auto g0 = hn::Zero(d), g1 = hn::Zero(d), x0 = hn::Zero(d), x1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    GradStep<kMask, kSilu, kColumns>(d, dy, up, i, x, w, bias, gout, col_g, col_gxhat, vm, vr, g0, x0);
    GradStep<kMask, kSilu, kColumns>(d, dy, up, i + N, x, w, bias, gout, col_g, col_gxhat, vm, vr, g1,
                              x1);
  }
  for (; i + N <= n; i += N)
    GradStep<kMask, kSilu, kColumns>(d, dy, up, i, x, w, bias, gout, col_g, col_gxhat, vm, vr, g0, x0);
  auto tg = hn::Zero(d1), tx = hn::Zero(d1);
  const auto vm1 = hn::Set(d1, m), vr1 = hn::Set(d1, r);
  for (; i < n; ++i)
    GradStep<kMask, kSilu, kColumns>(d1, dy, up, i, x, w, bias, gout, col_g, col_gxhat, vm1, vr1, tg,
                              tx);
  *sum_g = SumLanes(d, hn::Add(g0, g1)) + double(hn::GetLane(tg));
  *sum_gxc = SumLanes(d, hn::Add(x0, x1)) + double(hn::GetLane(tx));
}

template <typename T>
void GradRun(const T* dy, const Upstream<T>& up, const T* x, const float* w, const float* bias,
             T* gout, int64_t n, float m, float r, float* col_g, float* col_gxhat, double* sum_g,
             double* sum_gxc) {
  WithUpstream(up, [&](auto kMask, auto kSilu) {
    constexpr bool M = decltype(kMask)::value, U = decltype(kSilu)::value;
    col_g ? GradRunT<M, U, true>(dy, up, x, w, bias, gout, n, m, r, col_g, col_gxhat, sum_g, sum_gxc)
          : GradRunT<M, U, false>(dy, up, x, w, bias, gout, n, m, r, col_g, col_gxhat, sum_g, sum_gxc);
  });
}

// kAdd: dx and dsum_out (`add`) summed in float, rounded once. Without it, LayerNorm's bits.
template <bool kMask, bool kSilu, bool kAdd, bool kStream = false, class D, typename T>
HWY_INLINE void DxStep(D d, T* dx, const T* HWY_RESTRICT dy, const Upstream<T>& up, int64_t i,
                       const T* HWY_RESTRICT x, const float* HWY_RESTRICT w,
                       const float* HWY_RESTRICT bias, const T* add, V<D> a, V<D> b, V<D> m,
                       V<D> c) {
  const auto xc = hn::Sub(LoadF(d, x + i), m);
  const auto g = UpstreamAt<kMask, kSilu>(d, dy, up, i, xc, a, w, bias);
  auto v = hn::MulAdd(hn::Mul(a, hn::LoadU(d, w + i)), g, hn::MulAdd(b, xc, c));
  if constexpr (kAdd) v = hn::Add(v, LoadF(d, add + i));
  StoreOut<kStream>(v, d, dx + i);
}

// kStream: dx with non-temporal stores (see ForEachInRun). dx may be add's memory (each lane
// reads add before it writes dx), so neither is restrict.
template <bool kMask, bool kSilu, bool kAdd, bool kStream, typename T>
void DxRunT(T* dx, const T* HWY_RESTRICT dy, const Upstream<T>& up, const T* HWY_RESTRICT x,
            const float* HWY_RESTRICT w, const float* HWY_RESTRICT bias, int64_t n, float a,
            float b, float m, float c, const T* add) {
  ForEachInRun<kStream>(dx, n, [&](auto d, int64_t i, auto stream) {
    DxStep<kMask, kSilu, kAdd, decltype(stream)::value>(d, dx, dy, up, i, x, w, bias, add,
                                                        hn::Set(d, a), hn::Set(d, b),
                                                        hn::Set(d, m), hn::Set(d, c));
  });
}

template <typename T>
void DxRun(T* dx, const T* dy, const Upstream<T>& up, const T* x, const float* w,
           const float* bias, int64_t n, float a, float b, float m, float c, const T* add,
           bool stream) {
  WithStream<T>(stream, [&](auto kS) {
    WithUpstream(up, [&](auto kMask, auto kSilu) {
      constexpr bool M = decltype(kMask)::value, U = decltype(kSilu)::value,
                     S = decltype(kS)::value;
      add ? DxRunT<M, U, true, S>(dx, dy, up, x, w, bias, n, a, b, m, c, add)
          : DxRunT<M, U, false, S>(dx, dy, up, x, w, bias, n, a, b, m, c, add);
    });
  });
}

// out may be the memory of a or b (each lane reads both before it writes).
template <typename T>
void AddRun(T* out, const T* a, const T* b, int64_t n) {
  ForEachInRun<false>(out, n, [&](auto d, int64_t i, auto) {
    StoreF(hn::Add(LoadF(d, a + i), LoadF(d, b + i)), d, out + i);
  });
}

template <typename T>
const ln::Kernels<T>* KernelTable() {
  static const ln::Kernels<T> k{&ApplyRun<T>, &GradRun<T>, &DxRun<T>, &AddRun<T>};
  return &k;
}

}  // namespace

const ln::Kernels<float>* LayerNormKernelsF32() { return KernelTable<float>(); }
const ln::Kernels<bf16>* LayerNormKernelsBF16() { return KernelTable<bf16>(); }
const ln::Kernels<f16>* LayerNormKernelsF16() { return KernelTable<f16>(); }

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(LayerNormKernelsF32);
HWY_EXPORT(LayerNormKernelsBF16);
HWY_EXPORT(LayerNormKernelsF16);

namespace {

template <typename T>
const ln::Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(LayerNormKernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(LayerNormKernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(LayerNormKernelsF16)();
}

// Forward: rows up to cached_unit_bytes() are normalized right after their own statistics, from
// the per-core cache, when there are at least this many rows to share.
constexpr int64_t kCachedMinRows = 8;
// Backward: rows per unit of the first pass (its float column partials sum at most this many
// terms before they are added in double).
constexpr int64_t kRowBlock = 64;
// Backward: rows up to cached_block_bytes() get dx right after their row sums, from cache (dy, x,
// the mask and dx of a row together stay well inside L2), when there are at least this many row
// blocks to share.
constexpr int64_t kCachedMinRowBlocks = 4;

}  // namespace

LayerNormScratch layer_norm_scratch(const LayerNormShape& t) {
  LayerNormScratch p;
  if (t.rows <= 0 || t.cols <= 0) return p;
  p.pieces = std::max<int64_t>(run_piece_count(t.cols), 1);
  p.row_blocks = (t.rows + kRowBlock - 1) / kRowBlock;
  ScratchLayout l;
  p.weight = l.add<float>(t.cols);
  p.bias = l.add<float>(t.cols);
  const std::size_t common = l.mark();
  p.moments = l.add<Moments>(t.rows);
  p.piece_moments = l.add<Moments>(runs_moments_scratch_size(t.rows, t.cols));
  p.tail = l.add<float>(t.rows);
  l.rewind(common);
  p.partials = l.add<double>(2, t.rows, p.pieces);
  p.coefficients = l.add<float>(2, t.rows);
  p.columns = l.add<float>(2, p.row_blocks, t.cols);
  p.bytes = l.workspace_bytes();
  return p;
}

namespace {

// v (length cols, logical order; null: `fill`) in the order the row is stored. Logical-order
// vectors are used in place.
const float* memory_order(const float* v, float fill, const LayerNormShape& t, float* out) {
  if (v && t.channels <= 0) return v;
  if (!v) {
    std::fill(out, out + t.cols, fill);
  } else {
    for (int64_t j = 0; j < t.cols; ++j) out[j] = v[plan::layer_norm_logical_index(t, j)];
  }
  return out;
}

// m = float(mean), r = float(rstd), t = -(mean - m) * rstd: the part of the mean float m cannot
// hold, so ((x - m) * r + t) is accurate whatever the offset (x - m is exact or nearly).
struct RowCoef {
  float m, r, t;
};
inline RowCoef fold(const Moments& mo, double eps) {
  const double r = 1.0 / std::sqrt(mo.variance() + eps);
  const float mf = float(mo.mean);  // 0 for an empty row
  return {mf, float(r), float(-(mo.mean - double(mf)) * r)};
}
// RMSNorm: no mean to take off, and mean(x^2) = var + mean^2, a sum of two non-negative terms,
// so the moments LayerNorm already computes give it without cancellation (and without the
// overflow of a float x^2).
inline RowCoef fold_rms(const Moments& mo, double eps) {
  return {0.0f, float(1.0 / std::sqrt(mo.variance() + mo.mean * mo.mean + eps)), 0.0f};
}
inline RowCoef fold(const Moments& mo, double eps, bool centered) {
  return centered ? fold(mo, eps) : fold_rms(mo, eps);
}

}  // namespace

// The forward is a plan, chosen once per call (plan_layer_norm, below), over two phases: each row's
// statistics (pieces of kRunChunk merged in order, cpu/moments.h) folded into its coefficients, and
// the output pass. Both schedules give the same bits (run_moments equals the ordered merge of its
// pieces; the same fold and elementwise kernel).
namespace {

using ForwardSchedule = LayerNormForwardSchedule;

ForwardSchedule plan_forward(const LayerNormShape& t, int64_t value_bytes) {
  return t.rows >= kCachedMinRows && t.cols * value_bytes <= cached_unit_bytes()
             ? ForwardSchedule::cached_rows
             : ForwardSchedule::two_phase;
}

}  // namespace

// Both ops: `centered` is LayerNorm; without it (RMSNorm) the mean is 0, bias null and mean not
// written (null).
template <typename T>
void norm_forward(const LayerNormPlan& plan, double eps, bool centered,
                  const ForwardEpilogueOf<T>& epi, const T* x, const float* weight,
                  const float* bias, T* y, float* mean, float* rstd,
                  std::span<std::byte> workspace) {
  const LayerNormShape& t = plan.shape;
  const int num_threads = plan.num_threads;
  const bool parallel = plan.parallel;
  const int64_t rows = t.rows, cols = t.cols;
  if (rows <= 0) return;
  if (cols <= 0) {  // empty rows: mean 0 and rstd NaN, as torch
    const RowCoef f = fold(Moments{}, eps, centered);
    for (int64_t i = 0; i < rows; ++i) {
      if (mean) mean[i] = f.m;
      rstd[i] = f.r;
    }
    return;
  }
  const LayerNormScratch& p = plan.scratch;
  std::byte* base = scratch_base(workspace, p.bytes);
  const float* w = memory_order(weight, 1.0f, t, scratch_part<float>(base, p.weight));
  const float* b = memory_order(bias, 0.0f, t, scratch_part<float>(base, p.bias));
  const auto& k = kernels<T>();
  const T* res = epi.residual;
  const bool stream = streams_output<T>(rows * cols);  // y with non-temporal stores

  switch (plan.forward) {
    case ForwardSchedule::cached_rows:
      // Two rows' statistics side by side where they fit; a row's output right after.
      for_each_run_moments(x, rows, cols, cached_unit_bytes(), num_threads, parallel, stream,
                           [&](int64_t row, const Moments& mo) {
        const int64_t at = row * cols;
        const RowCoef f = fold(mo, eps, centered);
        if (mean) mean[row] = f.m;
        rstd[row] = f.r;
        k.apply_run(y + at, x + at, res ? res + at : nullptr, w, b, cols, f.m, f.r, f.t, epi.activation,
                    stream);
      });
      return;

    case ForwardSchedule::two_phase: {
      Moments* mo = scratch_part<Moments>(base, p.moments);
      runs_moments(x, rows, cols, mo, parallel ? num_threads : 1,
                   scratch_part<Moments>(base, p.piece_moments));
      float* tail = scratch_part<float>(base, p.tail);
      for (int64_t row = 0; row < rows; ++row) {
        const RowCoef f = fold(mo[row], eps, centered);
        if (mean) mean[row] = f.m;
        rstd[row] = f.r;
        tail[row] = f.t;
      }
      const RowPieces rp(rows, cols);
      parallel_for(rp.units, num_threads, parallel, stream, [&](int64_t u) {
        rp.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
          const int64_t at = row * cols + lo;
          k.apply_run(y + at, x + at, res ? res + at : nullptr, w + lo, b + lo, hi - lo,
                      mean ? mean[row] : 0.0f, rstd[row], tail[row], epi.activation, stream);
        });
      });
      return;
    }
  }
}

// Per row, over its M elements, with g the incoming gradient after the epilogue's mask and
// gw = g * w[j]:
//   dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))
//      = rstd * w[j] * g + b * (x - mean) + c, with
//   b = -rstd^3 / M * sum(gw * (x - mean))   (through rstd)
//   c = -rstd / M * sum(gw)                  (through mean)
//   dweight[j] = sum over rows of g * xhat,  dbias[j] = sum over rows of g.
//
// The backward is a plan, chosen once per call (plan_layer_norm, below), over four phases: the sums
// of each row piece (with the float column partials of its block of kRowBlock rows), the dx
// coefficients of a row, dx, and dweight and dbias from the column partials in row-block order.
// Both schedules run the same phase functions on the same pieces, so which one runs changes no bit.
namespace {

using BackwardSchedule = LayerNormBackwardSchedule;

BackwardSchedule plan_backward(const LayerNormScratch& p, const LayerNormShape& t,
                               int64_t value_bytes) {
  return p.row_blocks >= kCachedMinRowBlocks && t.cols * value_bytes <= cached_block_bytes()
             ? BackwardSchedule::cached_row_blocks
             : BackwardSchedule::two_phase;
}

// One backward call: its arguments, its scratch, and the phases over them.
template <typename T>
struct LayerNormBackward {
  T* dx;
  const T* dy;
  const T* x;
  const float* mean;
  const float* rstd;
  const float* w;  // weight in memory order
  const float* bias;  // silu: the forward's bias in memory order
  Upstream<T> up;     // how g is made from dy (relu's mask, or silu's z)
  T* gout;            // dresidual: receives g
  int64_t rows, cols, pieces;
  bool want_columns;  // dweight or dbias asked for
  bool stream;        // dx with non-temporal stores
  double* pg;         // per (row, piece): sum(g * w), sum(g * w * (x - mean))
  double* px;
  float* cb;  // per row: dx = rstd * w[j] * g + cb * (x - mean) + cc
  float* cc;
  float* colg;  // per (row block, column): float partials of sum(g), sum(g * xhat)
  float* colx;
  const T* dsum = nullptr;  // RMSNorm's dsum_out, added to dx (null: none)
  const ln::Kernels<T>& k = kernels<T>();
  // RMSNorm (mean null): the mean is 0.
  float mean_of(int64_t row) const { return mean ? mean[row] : 0.0f; }
  // With dresidual written, dx reads g back from it (one stream instead of dy and y or the
  // residual) where that is exact: g is dy or 0 (relu, none), or float32 (silu). A 16-bit g
  // would be a rounding the sums did not see, so silu then recomputes it.
  bool g_stored = gout && (!up.silu || std::is_same_v<T, float>);
  const T* gin = g_stored ? gout : dy;
  Upstream<T> dx_up = g_stored ? Upstream<T>{} : up;

  // ---- phase 1: piece `piece` of `row` in row block rb: its row sums, its column partials ----
  void clear_columns(int64_t rb, int64_t lo, int64_t hi) {
    if (!want_columns) return;
    std::fill(colg + rb * cols + lo, colg + rb * cols + hi, 0.0f);
    std::fill(colx + rb * cols + lo, colx + rb * cols + hi, 0.0f);
  }
  void row_piece_sums(int64_t rb, int64_t row, int64_t piece) {
    const int64_t lo = piece * kRunChunk, hi = std::min(cols, lo + kRunChunk);
    const int64_t at = row * cols + lo;
    float* ug = want_columns ? colg + rb * cols + lo : nullptr;
    float* ux = want_columns ? colx + rb * cols + lo : nullptr;
    k.grad_run(dy + at, up.at(at), x + at, w + lo, bias ? bias + lo : nullptr, gout ? gout + at : nullptr,
               hi - lo, mean_of(row), rstd[row], ug, ux, &pg[row * pieces + piece],
               &px[row * pieces + piece]);
  }

  // ---- phase 2: a row's dx coefficients, from its pieces' sums in piece order ----
  void row_coefficients(int64_t row) {
    double sg = 0, sx = 0;
    for (int64_t q = 0; q < pieces; ++q) sg += pg[row * pieces + q], sx += px[row * pieces + q];
    const double r = rstd[row];
    cb[row] = float(-r * r * r * sx / double(cols));
    cc[row] = mean ? float(-r * sg / double(cols)) : 0.0f;  // no mean, no term through it
  }

  // ---- phase 3: dx of piece [lo, hi) of a row ----
  void row_dx(int64_t row, int64_t lo, int64_t hi) {
    const int64_t at = row * cols + lo;
    k.dx_run(dx + at, gin + at, dx_up.at(at), x + at, w + lo, bias ? bias + lo : nullptr, hi - lo, rstd[row],
             cb[row], mean_of(row), cc[row], dsum ? dsum + at : nullptr, stream);
  }

  // ---- phase 4: column j's dweight and dbias, the row blocks' partials added in order ----
  void column_gradients(const LayerNormShape& t, int64_t row_blocks, float* dweight,
                        float* dbias, int64_t j) {
    double sg = 0, sx = 0;
    for (int64_t rb = 0; rb < row_blocks; ++rb) {
      sg += double(colg[rb * cols + j]);
      sx += double(colx[rb * cols + j]);
    }
    const int64_t logical = plan::layer_norm_logical_index(t, j);
    if (dweight) dweight[logical] = float(sx);
    if (dbias) dbias[logical] = float(sg);
  }
};

}  // namespace

// Both ops: RMSNorm passes mean and dbias null, and its dsum_out as dsum (else null).
template <typename T>
void norm_backward(const LayerNormPlan& plan, const BackwardEpilogueOf<T>& epi, const T* dy,
                   const T* x, const float* mean, const float* rstd, const float* weight,
                   const T* dsum, T* dx, float* dweight, float* dbias,
                   std::span<std::byte> workspace) {
  const LayerNormShape& t = plan.shape;
  const int num_threads = plan.num_threads;
  const bool parallel = plan.parallel;
  const int64_t rows = t.rows, cols = t.cols;
  if (rows <= 0 || cols <= 0) {  // no rows: the parameter gradients are empty sums
    for (int64_t j = 0; j < cols; ++j) {
      if (dweight) dweight[j] = 0.0f;
      if (dbias) dbias[j] = 0.0f;
    }
    return;
  }
  const LayerNormScratch& p = plan.scratch;
  std::byte* base = scratch_base(workspace, p.bytes);
  const int64_t pieces = p.pieces, row_blocks = p.row_blocks;
  double* pg = scratch_part<double>(base, p.partials);
  float* cb = scratch_part<float>(base, p.coefficients);
  float* colg = scratch_part<float>(base, p.columns);
  LayerNormBackward<T> b{dx, dy, x, mean, rstd,
                         memory_order(weight, 1.0f, t, scratch_part<float>(base, p.weight)),
                         epi.silu() ? memory_order(epi.bias, 0.0f, t, scratch_part<float>(base, p.bias))
                                    : nullptr,
                         {epi.relu() ? epi.y : nullptr, epi.silu(), epi.silu() ? epi.residual : nullptr},
                         epi.dresidual, rows, cols, pieces,
                         dweight || dbias, streams_output<T>(rows * cols), pg,
                         pg + rows * pieces, cb, cb + rows, colg, colg + row_blocks * cols};
  b.dsum = dsum;

  switch (plan.backward) {
    case BackwardSchedule::cached_row_blocks:
      parallel_for(row_blocks, num_threads, parallel, b.stream, [&](int64_t rb) {
        b.clear_columns(rb, 0, cols);
        for (int64_t row = rb * kRowBlock; row < std::min(rows, (rb + 1) * kRowBlock); ++row) {
          for (int64_t q = 0; q < pieces; ++q) b.row_piece_sums(rb, row, q);
          b.row_coefficients(row);
          b.row_dx(row, 0, cols);
        }
      });
      break;
    case BackwardSchedule::two_phase: {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel)
      for (int64_t u = 0; u < row_blocks * pieces; ++u) {
        const int64_t rb = u / pieces, q = u % pieces;
        b.clear_columns(rb, q * kRunChunk, std::min(cols, (q + 1) * kRunChunk));
        for (int64_t row = rb * kRowBlock; row < std::min(rows, (rb + 1) * kRowBlock); ++row)
          b.row_piece_sums(rb, row, q);
      }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && rows > 1)
      for (int64_t row = 0; row < rows; ++row) b.row_coefficients(row);
      const RowPieces rp(rows, cols);
      parallel_for(rp.units, num_threads, parallel, b.stream, [&](int64_t u) {
        rp.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) { b.row_dx(row, lo, hi); });
      });
      break;
    }
  }

  if (!b.want_columns) return;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (parallel && cols > 1)
  for (int64_t j = 0; j < cols; ++j) b.column_gradients(t, row_blocks, dweight, dbias, j);
}

template <typename T>
void layer_norm_forward(const LayerNormPlan& plan, double eps, const ForwardEpilogueOf<T>& epi,
                        const T* x, const float* weight, const float* bias, T* y, float* mean,
                        float* rstd, std::span<std::byte> workspace) {
  norm_forward(plan, eps, true, epi, x, weight, bias, y, mean, rstd, workspace);
}

template <typename T>
void layer_norm_backward(const LayerNormPlan& plan, const BackwardEpilogueOf<T>& epi, const T* dy,
                         const T* x, const float* mean, const float* rstd, const float* weight,
                         T* dx, float* dweight, float* dbias, std::span<std::byte> workspace) {
  norm_backward(plan, epi, dy, x, mean, rstd, weight, static_cast<const T*>(nullptr), dx,
                dweight, dbias, workspace);
}

template <typename T>
void rms_norm_forward(const LayerNormPlan& plan, double eps, const ForwardEpilogueOf<T>& epi,
                      const T* x, const float* weight, const T* residual_in, T* y, float* rstd,
                      T* sum_out, std::span<std::byte> workspace) {
  const LayerNormShape& t = plan.shape;
  if (residual_in && t.rows > 0 && t.cols > 0) {
    // h first, in its own pass: the statistics and y must see h rounded as sum_out holds it.
    const auto& k = kernels<T>();
    const RowPieces rp(t.rows, t.cols);
    parallel_for(rp.units, plan.num_threads, plan.parallel, false, [&](int64_t u) {
      rp.for_unit(u, [&](int64_t row, int64_t, int64_t lo, int64_t hi) {
        const int64_t at = row * t.cols + lo;
        k.add_run(sum_out + at, x + at, residual_in + at, hi - lo);
      });
    });
    x = sum_out;
  }
  norm_forward(plan, eps, false, epi, x, weight, nullptr, y, nullptr, rstd, workspace);
}

template <typename T>
void rms_norm_backward(const LayerNormPlan& plan, const BackwardEpilogueOf<T>& epi, const T* dy,
                       const T* x, const float* rstd, const float* weight, const T* dsum_out,
                       T* dx, float* dweight, std::span<std::byte> workspace) {
  norm_backward(plan, epi, dy, x, nullptr, rstd, weight, dsum_out, dx, dweight, nullptr,
                workspace);
}

LayerNormPlan plan_layer_norm(const LayerNormShape& shape, int64_t value_bytes, int num_threads) {
  LayerNormPlan plan;
  plan.shape = shape;
  plan.num_threads = num_threads;
  plan.parallel = runs_in_parallel(shape.rows * shape.cols, num_threads);
  plan.scratch = layer_norm_scratch(shape);
  plan.forward = plan_forward(shape, value_bytes);
  plan.backward = plan_backward(plan.scratch, shape, value_bytes);
  return plan;
}

#define NORMKIT_LAYER_NORM_INSTANTIATE(T)                                                      \
  template void layer_norm_forward<T>(const LayerNormPlan&, double, const ForwardEpilogueOf<T>&, \
                                      const T*, const float*, const float*, T*, float*, float*, \
                                      std::span<std::byte>);                                    \
  template void layer_norm_backward<T>(const LayerNormPlan&, const BackwardEpilogueOf<T>&,      \
                                       const T*, const T*, const float*, const float*,          \
                                       const float*, T*, float*, float*, std::span<std::byte>); \
  template void rms_norm_forward<T>(const LayerNormPlan&, double, const ForwardEpilogueOf<T>&,   \
                                    const T*, const float*, const T*, T*, float*, T*,           \
                                    std::span<std::byte>);                                      \
  template void rms_norm_backward<T>(const LayerNormPlan&, const BackwardEpilogueOf<T>&,        \
                                     const T*, const T*, const float*, const float*, const T*,  \
                                     T*, float*, std::span<std::byte>);
NORMKIT_LAYER_NORM_INSTANTIATE(float)
NORMKIT_LAYER_NORM_INSTANTIATE(bf16)
NORMKIT_LAYER_NORM_INSTANTIATE(f16)
#undef NORMKIT_LAYER_NORM_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
