// Channels-first LayerNorm2d CPU kernels: SIMD leaf loops per Highway target over a block of
// neighbouring positions (lanes are positions, the loop over c strides by the spatial size),
// threading below (HWY_ONCE section).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/layer_norm2d.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/layer_norm2d.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifndef NORMKIT_CPU_LAYER_NORM2D_KERNELS_
#define NORMKIT_CPU_LAYER_NORM2D_KERNELS_
namespace normkit::cpu::ln2d {

// The leaf loops of one SIMD target for activations of type T, over the `len` positions of a
// block: x[c * stride + k] is channel c of position k, c < channels, k < len.
template <typename T>
struct Kernels {
  // Writes mean[k], rstd[k] and y.
  void (*forward_block)(const T* x, const float* w, const float* b, T* y, float* mean,
                        float* rstd, int64_t channels, int64_t stride, int64_t len, double eps);
  // Writes dx from dy, x and the block's mean and rstd.
  void (*backward_block)(const T* dy, const T* x, const float* mean, const float* rstd,
                         const float* w, T* dx, int64_t channels, int64_t stride, int64_t len);
  // Over s < n: *dw += sum(dy * (x - m[s]) * r[s]), *db += sum(dy) (each row's sums in float,
  // lane order fixed for a target, added in double).
  void (*param_row)(const T* dy, const T* x, const float* m, const float* r, int64_t n,
                    double* dw, double* db);
};

}  // namespace normkit::cpu::ln2d
#endif

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {
namespace {

// step(d, k) for full vectors of positions, then one-lane steps for the tail: every lane runs
// the same operations, so a position's value does not depend on where the vectors end.
template <class Step>
HWY_INLINE void ForPositions(int64_t len, const Step& step) {
  const DF df;
  const int64_t lanes = int64_t(hn::Lanes(df));
  int64_t k = 0;
  for (; k + lanes <= len; k += lanes) step(df, k);
  for (; k < len; ++k) step(D1(), k);
}

template <typename T>
void ForwardBlock(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                  int64_t C, int64_t S, int64_t len, double eps) {
  ForPositions(len, [&](auto d, int64_t k) {
    auto acc = hn::Zero(d);
    for (int64_t c = 0; c < C; ++c) acc = hn::Add(acc, LoadF(d, x + c * S + k));
    const auto m = hn::Mul(acc, hn::Set(d, 1.0f / float(C)));
    // The centered second pass (not E[x^2] - E[x]^2): exact for any offset of the values; it
    // reads the block again from cache.
    auto sq = hn::Zero(d);
    for (int64_t c = 0; c < C; ++c) {
      const auto dev = hn::Sub(LoadF(d, x + c * S + k), m);
      sq = hn::MulAdd(dev, dev, sq);
    }
    hn::StoreU(m, d, mean + k);
    HWY_ALIGN float var[hn::MaxLanes(d)];
    hn::Store(sq, d, var);
    for (size_t i = 0; i < hn::Lanes(d); ++i)
      rstd[k + int64_t(i)] = float(1.0 / std::sqrt(double(var[i]) / double(C) + eps));
    const auto r = hn::LoadU(d, rstd + k);
    for (int64_t c = 0; c < C; ++c) {
      const auto xhat = hn::Mul(hn::Sub(LoadF(d, x + c * S + k), m), r);
      const auto out = hn::MulAdd(xhat, hn::Set(d, w ? w[c] : 1.0f), hn::Set(d, b ? b[c] : 0.0f));
      StoreF(out, d, y + c * S + k);
    }
  });
}

// dx = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat)), gw = dy * w[c]: the direct path,
// the path through the mean, the path through rstd.
template <typename T>
void BackwardBlock(const T* dy, const T* x, const float* mean, const float* rstd, const float* w,
                   T* dx, int64_t C, int64_t S, int64_t len) {
  ForPositions(len, [&](auto d, int64_t k) {
    const auto m = hn::LoadU(d, mean + k), r = hn::LoadU(d, rstd + k);
    auto sum_gw = hn::Zero(d), sum_gw_xhat = hn::Zero(d);
    for (int64_t c = 0; c < C; ++c) {
      const auto gw = hn::Mul(LoadF(d, dy + c * S + k), hn::Set(d, w ? w[c] : 1.0f));
      const auto xhat = hn::Mul(hn::Sub(LoadF(d, x + c * S + k), m), r);
      sum_gw = hn::Add(sum_gw, gw);
      sum_gw_xhat = hn::MulAdd(gw, xhat, sum_gw_xhat);
    }
    const auto inv_c = hn::Set(d, 1.0f / float(C));
    const auto a = hn::Mul(sum_gw, inv_c), bterm = hn::Mul(sum_gw_xhat, inv_c);
    for (int64_t c = 0; c < C; ++c) {
      const auto gw = hn::Mul(LoadF(d, dy + c * S + k), hn::Set(d, w ? w[c] : 1.0f));
      const auto xhat = hn::Mul(hn::Sub(LoadF(d, x + c * S + k), m), r);
      StoreF(hn::Mul(r, hn::NegMulAdd(xhat, bterm, hn::Sub(gw, a))), d, dx + c * S + k);
    }
  });
}

template <typename T>
void ParamRow(const T* dy, const T* x, const float* m, const float* r, int64_t n, double* dw,
              double* db) {
  const DF df;
  const int64_t lanes = int64_t(hn::Lanes(df));
  auto vdw = hn::Zero(df), vdb = hn::Zero(df);
  int64_t s = 0;
  for (; s + lanes <= n; s += lanes) {
    const auto g = LoadF(df, dy + s);
    const auto xhat = hn::Mul(hn::Sub(LoadF(df, x + s), hn::LoadU(df, m + s)), hn::LoadU(df, r + s));
    vdw = hn::MulAdd(g, xhat, vdw);
    vdb = hn::Add(vdb, g);
  }
  float tail_dw = 0, tail_db = 0;
  for (; s < n; ++s) {
    const float g = to_float(dy[s]);
    tail_dw += g * ((to_float(x[s]) - m[s]) * r[s]);
    tail_db += g;
  }
  *dw += SumLanes(df, vdw) + double(tail_dw);
  *db += SumLanes(df, vdb) + double(tail_db);
}

template <typename T>
const ln2d::Kernels<T>* KernelTable() {
  static const ln2d::Kernels<T> k{&ForwardBlock<T>, &BackwardBlock<T>, &ParamRow<T>};
  return &k;
}

}  // namespace

const ln2d::Kernels<float>* LayerNorm2dKernelsF32() { return KernelTable<float>(); }
const ln2d::Kernels<bf16>* LayerNorm2dKernelsBF16() { return KernelTable<bf16>(); }
const ln2d::Kernels<f16>* LayerNorm2dKernelsF16() { return KernelTable<f16>(); }

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(LayerNorm2dKernelsF32);
HWY_EXPORT(LayerNorm2dKernelsBF16);
HWY_EXPORT(LayerNorm2dKernelsF16);

namespace {

template <typename T>
const ln2d::Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(LayerNorm2dKernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(LayerNorm2dKernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(LayerNorm2dKernelsF16)();
}

// A block: positions [s0, s0 + len) of sample n.
struct Block {
  int64_t n, s0, len;
};

Block block_of(const LayerNorm2dShape& t, int64_t i) {
  const int64_t per_sample = (t.spatial + kPositionBlock - 1) / kPositionBlock;
  const int64_t n = i / per_sample, s0 = (i % per_sample) * kPositionBlock;
  return {n, s0, std::min(kPositionBlock, t.spatial - s0)};
}

int64_t block_count(const LayerNorm2dShape& t) {
  return t.batch * ((t.spatial + kPositionBlock - 1) / kPositionBlock);
}

// Enough work to wake the threads.
bool worth_sharing(const LayerNorm2dShape& t) {
  return t.batch * t.channels * t.spatial >= (int64_t(1) << 15);
}

}  // namespace

template <typename T>
void layer_norm2d_forward(const LayerNorm2dShape& t, int num_threads, double eps, const T* x,
                          const float* weight, const float* bias, T* y, float* mean,
                          float* rstd) {
  const int64_t C = t.channels, S = t.spatial;
  if (C == 0) {  // nothing to normalize: as the reference (and torch), mean 0 and rstd NaN
    std::fill(mean, mean + t.batch * S, 0.0f);
    std::fill(rstd, rstd + t.batch * S, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const ln2d::Kernels<T>& k = kernels<T>();
  parallel_for(block_count(t), num_threads, worth_sharing(t), false, [&](int64_t i) {
    const Block b = block_of(t, i);
    const int64_t at = b.n * C * S + b.s0;
    k.forward_block(x + at, weight, bias, y + at, mean + b.n * S + b.s0, rstd + b.n * S + b.s0,
                    C, S, b.len, eps);
  });
}

template <typename T>
void layer_norm2d_backward(const LayerNorm2dShape& t, int num_threads, const T* dy, const T* x,
                           const float* mean, const float* rstd, const float* weight, T* dx,
                           float* dweight, float* dbias) {
  const int64_t C = t.channels, S = t.spatial;
  const bool share = worth_sharing(t);
  const ln2d::Kernels<T>& k = kernels<T>();
  parallel_for(block_count(t), num_threads, share, false, [&](int64_t i) {
    const Block b = block_of(t, i);
    const int64_t at = b.n * C * S + b.s0;
    k.backward_block(dy + at, x + at, mean + b.n * S + b.s0, rstd + b.n * S + b.s0, weight,
                     dx + at, C, S, b.len);
  });
  if (!dweight && !dbias) return;
  // Per channel, by one thread, sample by sample in order: the same bits for any thread count.
  parallel_for(C, num_threads, share, false, [&](int64_t c) {
    double dw = 0, db = 0;
    for (int64_t n = 0; n < t.batch; ++n)
      k.param_row(dy + (n * C + c) * S, x + (n * C + c) * S, mean + n * S, rstd + n * S, S, &dw,
                  &db);
    if (dweight) dweight[c] = float(dw);
    if (dbias) dbias[c] = float(db);
  });
}

#define NORMKIT_CPU_LAYER_NORM2D(T)                                                            \
  template void layer_norm2d_forward<T>(const LayerNorm2dShape&, int, double, const T*,        \
                                        const float*, const float*, T*, float*, float*);       \
  template void layer_norm2d_backward<T>(const LayerNorm2dShape&, int, const T*, const T*,     \
                                         const float*, const float*, const float*, T*, float*, \
                                         float*);
NORMKIT_CPU_LAYER_NORM2D(float)
NORMKIT_CPU_LAYER_NORM2D(bf16)
NORMKIT_CPU_LAYER_NORM2D(f16)
#undef NORMKIT_CPU_LAYER_NORM2D

}  // namespace normkit::cpu
#endif  // HWY_ONCE
