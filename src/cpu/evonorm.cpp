// EvoNorm-S0 CPU kernels: the passes and the threading below (HWY_ONCE section), SIMD leaf loops
// per Highway target above it.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/evonorm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/evonorm.h"
#include "cpu/moments.h"  // kRunChunk
#include "cpu/parallel.h"
#include "cpu/scratch.h"
#include "cpu/simd.h"
#include "cpu/column_sums-inl.h"  // ThreeColumnSums

#include <algorithm>
#include <cmath>
#include <type_traits>

#ifndef NORMKIT_CPU_EVONORM_KERNELS_
#define NORMKIT_CPU_EVONORM_KERNELS_
namespace normkit::cpu::evo {

// The leaf loops of one SIMD target for activations of type T; s = sigmoid(v x), h = x s.
template <typename T>
struct Kernels {
  // y[i] = h[i] * a + b, i < n.
  void (*gate_run)(T* y, const T* x, int64_t n, float v, float a, float b);
  // The same over `rows` rows of `width` columns (row r at offset r * stride), per column v, a, b.
  void (*gate_rows)(T* y, const T* x, int64_t rows, int64_t width, int64_t stride,
                    const float* v, const float* a, const float* b);
  // Over i < n: sums[0] = sum(dy), sums[1] = sum(dy * h), sums[2] = sum(dy * x^2 s (1 - s))
  // (overwritten).
  void (*grad_sums_run)(const T* dy, const T* x, int64_t n, float v, double* sums);
  // The same per column j < width <= kColumnBlock over `rows` rows, added to sums[k * width + j].
  void (*grad_sums_rows)(const T* dy, const T* x, int64_t rows, int64_t width, int64_t stride,
                         const float* v, double* sums);
  // dx[i] = p * dy[i] * s (1 + v x (1 - s)) + q * (x[i] - m).
  void (*dx_run)(T* dx, const T* dy, const T* x, int64_t n, float v, float p, float q, float m);
  void (*dx_rows)(T* dx, const T* dy, const T* x, int64_t rows, int64_t width, int64_t stride,
                  const float* v, const float* p, const float* q, const float* m);
};

// Columns one channels-last sums unit covers at most: its sums live on the stack.
constexpr int64_t kColumnBlock = 256;
// Rows whose float sums are added in double: few enough that float rounding stays small.
constexpr int64_t kSumRows = 16;
// Values per channels-last elementwise unit (a block of whole rows).
constexpr int64_t kUnitElements = 32768;

}  // namespace normkit::cpu::evo
#endif

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {

template <class D, typename T>
HWY_INLINE void EvoGateStep(D d, T* HWY_RESTRICT y, const T* HWY_RESTRICT x, hn::Vec<D> v,
                            hn::Vec<D> a, hn::Vec<D> b) {
  const auto xv = LoadF(d, x);
  hn::Vec<D> s, c;
  SigmoidAndComplement(d, hn::Mul(v, xv), s, c);
  StoreF(hn::MulAdd(hn::Mul(xv, s), a, b), d, y);
}

template <typename T>
void EvoGateRun(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, int64_t n, float v, float a,
                float b) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    EvoGateStep(d, y + i, x + i, hn::Set(d, v), hn::Set(d, a), hn::Set(d, b));
  for (; i < n; ++i) EvoGateStep(d1, y + i, x + i, hn::Set(d1, v), hn::Set(d1, a), hn::Set(d1, b));
}

template <typename T>
void EvoGateRows(T* HWY_RESTRICT y, const T* HWY_RESTRICT x, int64_t rows, int64_t width,
                 int64_t stride, const float* v, const float* a, const float* b) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    int64_t j = 0;
    for (; j + N <= width; j += N)
      EvoGateStep(d, y + o + j, x + o + j, hn::LoadU(d, v + j), hn::LoadU(d, a + j),
                  hn::LoadU(d, b + j));
    for (; j < width; ++j)
      EvoGateStep(d1, y + o + j, x + o + j, hn::LoadU(d1, v + j), hn::LoadU(d1, a + j),
                  hn::LoadU(d1, b + j));
  }
}

// Adds dy, dy * h and dy * x^2 s (1 - s), the last dy * dh/dv.
template <class D, typename T>
HWY_INLINE void EvoGradStep(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, hn::Vec<D> v,
                            hn::Vec<D>& s0, hn::Vec<D>& s1, hn::Vec<D>& s2) {
  const auto xv = LoadF(d, x), dyv = LoadF(d, dy);
  hn::Vec<D> s, c;
  SigmoidAndComplement(d, hn::Mul(v, xv), s, c);
  s0 = hn::Add(s0, dyv);
  s1 = hn::MulAdd(dyv, hn::Mul(xv, s), s1);
  s2 = hn::MulAdd(hn::Mul(dyv, hn::Mul(xv, xv)), hn::Mul(s, c), s2);
}

template <typename T>
void EvoGradSumsRun(const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, int64_t n, float v,
                    double* sums) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  sums[0] = sums[1] = sums[2] = 0;
  // Pieces of kRunChunk summed in float, added in double.
  for (int64_t p = 0; p < n; p += kRunChunk) {
    const int64_t end = std::min(n, p + kRunChunk);
    auto a0 = hn::Zero(d), a1 = a0, a2 = a0;
    auto t0 = hn::Zero(d1), t1 = t0, t2 = t0;
    int64_t i = p;
    for (; i + N <= end; i += N) EvoGradStep(d, dy + i, x + i, hn::Set(d, v), a0, a1, a2);
    for (; i < end; ++i) EvoGradStep(d1, dy + i, x + i, hn::Set(d1, v), t0, t1, t2);
    sums[0] += SumLanes(d, a0) + double(hn::GetLane(t0));
    sums[1] += SumLanes(d, a1) + double(hn::GetLane(t1));
    sums[2] += SumLanes(d, a2) + double(hn::GetLane(t2));
  }
}

template <typename T>
void EvoGradSumsRows(const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, int64_t rows,
                     int64_t width, int64_t stride, const float* v, double* sums) {
  ThreeColumnSums(rows, width, stride, evo::kSumRows, sums, [&](auto dd, int64_t j) {
    const auto vv = hn::LoadU(dd, v + j);
    return [=](int64_t o, auto& s0, auto& s1, auto& s2) {
      EvoGradStep(dd, dy + o, x + o, vv, s0, s1, s2);
    };
  });
}

template <class D, typename T>
HWY_INLINE void EvoDxStep(D d, T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy,
                          const T* HWY_RESTRICT x, hn::Vec<D> v, hn::Vec<D> p, hn::Vec<D> q,
                          hn::Vec<D> m) {
  const auto xv = LoadF(d, x);
  const auto z = hn::Mul(v, xv);
  hn::Vec<D> s, c;
  SigmoidAndComplement(d, z, s, c);
  const auto gate = hn::Mul(s, hn::MulAdd(z, c, hn::Set(d, 1.0f)));  // d h / d x
  StoreF(hn::MulAdd(hn::Mul(LoadF(d, dy), gate), p, hn::Mul(hn::Sub(xv, m), q)), d, dx);
}

template <typename T>
void EvoDxRun(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x, int64_t n,
              float v, float p, float q, float m) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    EvoDxStep(d, dx + i, dy + i, x + i, hn::Set(d, v), hn::Set(d, p), hn::Set(d, q),
              hn::Set(d, m));
  for (; i < n; ++i)
    EvoDxStep(d1, dx + i, dy + i, x + i, hn::Set(d1, v), hn::Set(d1, p), hn::Set(d1, q),
              hn::Set(d1, m));
}

template <typename T>
void EvoDxRows(T* HWY_RESTRICT dx, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x,
               int64_t rows, int64_t width, int64_t stride, const float* v, const float* p,
               const float* q, const float* m) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * stride;
    int64_t j = 0;
    for (; j + N <= width; j += N)
      EvoDxStep(d, dx + o + j, dy + o + j, x + o + j, hn::LoadU(d, v + j), hn::LoadU(d, p + j),
                hn::LoadU(d, q + j), hn::LoadU(d, m + j));
    for (; j < width; ++j)
      EvoDxStep(d1, dx + o + j, dy + o + j, x + o + j, hn::LoadU(d1, v + j),
                hn::LoadU(d1, p + j), hn::LoadU(d1, q + j), hn::LoadU(d1, m + j));
  }
}

template <typename T>
const evo::Kernels<T>* EvoKernelTable() {
  static const evo::Kernels<T> k{&EvoGateRun<T>,     &EvoGateRows<T>, &EvoGradSumsRun<T>,
                                 &EvoGradSumsRows<T>, &EvoDxRun<T>,    &EvoDxRows<T>};
  return &k;
}
const evo::Kernels<float>* EvoKernelsF32() { return EvoKernelTable<float>(); }
const evo::Kernels<bf16>* EvoKernelsBF16() { return EvoKernelTable<bf16>(); }
const evo::Kernels<f16>* EvoKernelsF16() { return EvoKernelTable<f16>(); }

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(EvoKernelsF32);
HWY_EXPORT(EvoKernelsBF16);
HWY_EXPORT(EvoKernelsF16);

namespace {

using evo::kColumnBlock;

template <typename T>
const evo::Kernels<T>& kernels() {
  if constexpr (std::is_same_v<T, float>) return *HWY_DYNAMIC_DISPATCH(EvoKernelsF32)();
  else if constexpr (std::is_same_v<T, bf16>) return *HWY_DYNAMIC_DISPATCH(EvoKernelsBF16)();
  else return *HWY_DYNAMIC_DISPATCH(EvoKernelsF16)();
}

// The scratch of this file's passes: per-(n, c) coefficients (the forward's a; the backward's
// p, q, m) and the backward's per-(n, c) sums. Laid out over the GroupNorm statistics' scratch,
// which the forward is done with before these parts are written.
struct EvoScratch {
  std::size_t coef = 0, sums = 0, bytes = 0;
};
EvoScratch evo_scratch(const plan::GroupNormShape& t) {
  ScratchLayout s;
  EvoScratch l;
  l.coef = s.add<float>(3, t.batch, t.channels);
  l.sums = s.add<double>(3, t.batch, t.channels);
  l.bytes = s.workspace_bytes();
  return l;
}

// Channels-last elementwise units: blocks of whole rows of one sample.
struct RowUnits {
  int64_t rows, per_sample;
  RowUnits(int64_t spatial, int64_t channels) {
    rows = std::max<int64_t>(1, evo::kUnitElements / std::max<int64_t>(channels, 1));
    per_sample = (spatial + rows - 1) / rows;
  }
};

int64_t column_blocks(int64_t channels) { return (channels + kColumnBlock - 1) / kColumnBlock; }

}  // namespace

std::size_t evonorm_s0_scratch_bytes(const plan::GroupNormShape& shape) {
  return std::max(group_norm_scratch(shape).bytes, evo_scratch(shape).bytes);
}

template <typename T>
void evonorm_s0_forward(const GroupNormPlan& plan, double eps, const T* x, const float* v,
                        const float* weight, const float* bias, T* y, float* mean, float* rstd,
                        std::span<std::byte> workspace) {
  const plan::GroupNormShape& t = plan.shape;
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  group_norm_statistics(plan, eps, x, mean, rstd, nullptr, workspace);
  const auto& k = kernels<T>();
  // a = rstd * weight from the saved float rstd.
  auto scale = [&](int64_t n, int64_t c) { return rstd[n * G + c / per_group] * weight[c]; };
  if (t.format == MemoryFormat::channels_first) {
    parallel_for(N * C, plan.num_threads, plan.parallel, false, [&](int64_t i) {
      const int64_t c = i % C;
      k.gate_run(y + i * S, x + i * S, S, v[c], scale(i / C, c), bias[c]);
    });
    return;
  }
  const EvoScratch l = evo_scratch(t);
  float* a = scratch_part<float>(scratch_base(workspace, evonorm_s0_scratch_bytes(t)), l.coef);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) a[n * C + c] = scale(n, c);
  const RowUnits ru(S, C);
  parallel_for(N * ru.per_sample, plan.num_threads, plan.parallel, false, [&](int64_t u) {
    const int64_t n = u / ru.per_sample, r0 = (u % ru.per_sample) * ru.rows;
    const int64_t at = (n * S + r0) * C;
    k.gate_rows(y + at, x + at, std::min(ru.rows, S - r0), C, C, v, a + n * C, bias);
  });
}

template <typename T>
void evonorm_s0_backward(const GroupNormPlan& plan, const T* dy, const T* x, const float* mean,
                         const float* rstd, const float* v, const float* weight, T* dx,
                         float* dv, float* dweight, float* dbias,
                         std::span<std::byte> workspace) {
  const plan::GroupNormShape& t = plan.shape;
  const int64_t N = t.batch, C = t.channels, S = t.spatial, G = t.groups, per_group = C / G;
  const auto& k = kernels<T>();
  const EvoScratch l = evo_scratch(t);
  std::byte* base = scratch_base(workspace, evonorm_s0_scratch_bytes(t));
  // Per (n, c): sum(dy), sum(dy * h), sum(dy * x^2 s (1 - s)) at sums[3 * (n * C + c) + k].
  double* sums = scratch_part<double>(base, l.sums);
  float* p = scratch_part<float>(base, l.coef);
  float* q = p + N * C;
  float* m = q + N * C;
  const bool channels_first = t.format == MemoryFormat::channels_first;

  if (channels_first) {
    parallel_for(N * C, plan.num_threads, plan.parallel, false, [&](int64_t i) {
      k.grad_sums_run(dy + i * S, x + i * S, S, v[i % C], sums + 3 * i);
    });
  } else {
    const int64_t blocks = column_blocks(C);
    parallel_for(N * blocks, plan.num_threads, plan.parallel, false, [&](int64_t unit) {
      const int64_t n = unit / blocks, c0 = (unit % blocks) * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, C - c0), o = n * S * C + c0;
      double block_sums[3 * kColumnBlock] = {};
      k.grad_sums_rows(dy + o, x + o, S, width, C, v + c0, block_sums);
      for (int64_t j = 0; j < width; ++j)
        for (int q3 = 0; q3 < 3; ++q3) sums[3 * (n * C + c0 + j) + q3] = block_sums[q3 * width + j];
    });
  }

  // Per group, in channel order: the term through rstd, -rstd^3 / M * sum(dy * weight * h).
  const double count = double(per_group * S);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const double r = rstd[n * G + g];
      double through_rstd = 0;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c)
        through_rstd += double(weight[c]) * sums[3 * (n * C + c) + 1];
      const float qg = float(-r * r * r / count * through_rstd);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        p[n * C + c] = float(r * weight[c]);
        q[n * C + c] = qg;
        m[n * C + c] = mean[n * G + g];
      }
    }

  if (channels_first) {
    parallel_for(N * C, plan.num_threads, plan.parallel, false, [&](int64_t i) {
      k.dx_run(dx + i * S, dy + i * S, x + i * S, S, v[i % C], p[i], q[i], m[i]);
    });
  } else {
    const RowUnits ru(S, C);
    parallel_for(N * ru.per_sample, plan.num_threads, plan.parallel, false, [&](int64_t u) {
      const int64_t n = u / ru.per_sample, r0 = (u % ru.per_sample) * ru.rows;
      const int64_t at = (n * S + r0) * C;
      k.dx_rows(dx + at, dy + at, x + at, std::min(ru.rows, S - r0), C, C, v, p + n * C,
                q + n * C, m + n * C);
    });
  }

  // Over n in order: the same bits for any thread count.
  for (int64_t c = 0; c < C; ++c) {
    double gb = 0, gw = 0, gv = 0;
    for (int64_t n = 0; n < N; ++n) {
      const double* s = sums + 3 * (n * C + c);
      const double r = rstd[n * G + c / per_group];
      gb += s[0];
      gw += s[1] * r;
      gv += s[2] * r * double(weight[c]);
    }
    if (dbias) dbias[c] = float(gb);
    if (dweight) dweight[c] = float(gw);
    if (dv) dv[c] = float(gv);
  }
}

#define NORMKIT_EVONORM_INSTANTIATE(T)                                                          \
  template void evonorm_s0_forward<T>(const GroupNormPlan&, double, const T*, const float*,     \
                                      const float*, const float*, T*, float*, float*,           \
                                      std::span<std::byte>);                                    \
  template void evonorm_s0_backward<T>(const GroupNormPlan&, const T*, const T*, const float*,  \
                                       const float*, const float*, const float*, T*, float*,    \
                                       float*, float*, std::span<std::byte>);
NORMKIT_EVONORM_INSTANTIATE(float)
NORMKIT_EVONORM_INSTANTIATE(bf16)
NORMKIT_EVONORM_INSTANTIATE(f16)
#undef NORMKIT_EVONORM_INSTANTIATE

}  // namespace normkit::cpu
#endif  // HWY_ONCE
