// Shared Highway helpers for the CPU kernels: activations of any dtype (float32, bfloat16,
// float16) loaded as float32 lanes and stored back, plus fixed-order lane sums.
//
// Use (one .cpp per op, compiled once per SIMD target by Highway's foreach_target):
//   #undef HWY_TARGET_INCLUDE
//   #define HWY_TARGET_INCLUDE "cpu/my_op.cpp"
//   #include <hwy/foreach_target.h>  // re-includes this file once per target
//   #include <hwy/highway.h>
//   #include "cpu/simd.h"             // per-target section, include after highway.h
//   HWY_BEFORE_NAMESPACE();
//   namespace normkit::cpu::HWY_NAMESPACE { ... kernels using LoadF / StoreF ... }
//   HWY_AFTER_NAMESPACE();
//   #if HWY_ONCE
//   namespace normkit::cpu { HWY_EXPORT(Kernel); ... HWY_DYNAMIC_DISPATCH(Kernel)(args) ... }
//   #endif
//
// Rounding: StoreF rounds to nearest even for every dtype and target (Highway 1.0.3's own
// bfloat16 demotion truncates, and its float16 emulation below AVX2 mishandles Inf/NaN, so
// those cases go through the scalar conversions of common/dtype.h). Results may differ between
// targets (lane counts change summation order), never between thread counts.
//
// This header has per-target include guards (it is re-included by foreach_target).
#include "cpu/streaming.h"  // kStreamBytes, kMinStreamRun, streams_output: which outputs stream

#if defined(NORMKIT_CPU_SIMD_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NORMKIT_CPU_SIMD_H_
#undef NORMKIT_CPU_SIMD_H_
#else
#define NORMKIT_CPU_SIMD_H_
#endif

#include <hwy/cache_control.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "normkit/epilogue.h"

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Full float32 vector and a one-lane one for loop tails: the tail runs the same operations
// (incl. fused multiply-adds) lane by lane, so a value does not depend on where a tail starts.
using DF = hn::ScalableTag<float>;
using D1 = hn::CappedTag<float, 1>;

// True where the target converts float16 in hardware with correct rounding and specials.
#undef NORMKIT_SIMD_NATIVE_F16
#if HWY_TARGET <= HWY_AVX2 || HWY_ARCH_ARM
#define NORMKIT_SIMD_NATIVE_F16 1
#else
#define NORMKIT_SIMD_NATIVE_F16 0
#endif

// Loads Lanes(d) activations from p (unaligned) as float32 lanes.
template <class D>
HWY_INLINE hn::Vec<D> LoadF(D d, const float* HWY_RESTRICT p) {
  return hn::LoadU(d, p);
}
template <class D>
HWY_INLINE hn::Vec<D> LoadF(D d, const bf16* HWY_RESTRICT p) {
  const hn::Rebind<uint16_t, D> du16;
  const hn::Rebind<uint32_t, D> du32;
  const auto bits = hn::PromoteTo(du32, hn::LoadU(du16, reinterpret_cast<const uint16_t*>(p)));
  return hn::BitCast(d, hn::ShiftLeft<16>(bits));
}
template <class D>
HWY_INLINE hn::Vec<D> LoadF(D d, const f16* HWY_RESTRICT p) {
#if NORMKIT_SIMD_NATIVE_F16
  const hn::Rebind<hwy::float16_t, D> dh;
  return hn::PromoteTo(d, hn::LoadU(dh, p));
#else
  HWY_ALIGN float buf[hn::MaxLanes(d)];
  for (size_t i = 0; i < hn::Lanes(d); ++i) buf[i] = to_float(p[i]);
  return hn::Load(d, buf);
#endif
}

// Stores the Lanes(d) lanes of v to p (unaligned), rounded to nearest even for 16-bit types.
template <class D>
HWY_INLINE void StoreF(hn::Vec<D> v, D d, float* HWY_RESTRICT p) {
  hn::StoreU(v, d, p);
}
template <class D>
HWY_INLINE void StoreF(hn::Vec<D> v, D /* d */, bf16* HWY_RESTRICT p) {
  const hn::RebindToUnsigned<D> du32;
  const hn::RebindToSigned<D> di32;
  const hn::Rebind<uint16_t, D> du16;
  auto bits = hn::BitCast(du32, v);
  const auto rounded = hn::Add(bits, hn::Add(hn::Set(du32, 0x7FFFu),
                                             hn::And(hn::ShiftRight<16>(bits), hn::Set(du32, 1u))));
  const auto quiet_nan = hn::Or(bits, hn::Set(du32, 0x00400000u));
  bits = hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(v)), quiet_nan, rounded);
  // Values after the shift fit in 16 bits, so the saturating demotion is exact.
  const auto top = hn::BitCast(di32, hn::ShiftRight<16>(bits));
  hn::StoreU(hn::DemoteTo(du16, top), du16, reinterpret_cast<uint16_t*>(p));
}
template <class D>
HWY_INLINE void StoreF(hn::Vec<D> v, D d, f16* HWY_RESTRICT p) {
#if NORMKIT_SIMD_NATIVE_F16
  (void)d;
  const hn::Rebind<hwy::float16_t, D> dh;
  hn::StoreU(hn::DemoteTo(dh, v), dh, p);
#else
  HWY_ALIGN float buf[hn::MaxLanes(d)];
  hn::Store(v, d, buf);
  for (size_t i = 0; i < hn::Lanes(d); ++i) p[i] = from_float<f16>(buf[i]);
#endif
}

// ---- non-temporal stores for large outputs ----
// An output larger than the caches is not read back from them; an ordinary store first reads
// each line it writes (three memory transfers per byte instead of two), a non-temporal store
// does not, and leaves the cached inputs in place. Used for float32 outputs of at least
// kStreamBytes, on full vectors at aligned addresses; the elementwise arithmetic is the same,
// so the bits are. The loops below do not fence what they stream: the thread fences once after
// its share of the pass (cpu/parallel.h), before the threads' barrier.

// Whether float vectors can be streamed on this target.
constexpr bool kCanStream = hn::MaxLanes(DF()) > 1;

// Whether an output of `elements` values of T is written with non-temporal stores.
template <typename T>
bool Streams(int64_t elements) {
  return kCanStream && std::is_same_v<T, float> && normkit::cpu::streams_output<T>(elements);
}

// Stores v at p: non-temporal with kStream (for a float32 output and a full vector, p aligned
// to it), else as StoreF.
template <bool kStream, class D, typename T>
HWY_INLINE void StoreOut(hn::Vec<D> v, D d, T* HWY_RESTRICT p) {
  if constexpr (kStream && kCanStream && std::is_same_v<T, float> && !std::is_same_v<D, D1>)
    hn::Stream(v, d, p);
  else
    StoreF(v, d, p);
}

// Elements from p to the first address aligned for a vector store (at most n).
template <typename T>
int64_t ToAligned(const T* p, int64_t n) {
  const uintptr_t align = hn::Lanes(DF()) * sizeof(float);
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) % align;
  return off == 0 ? 0 : std::min<int64_t>(n, int64_t((align - off) / sizeof(T)));
}

// Whether a run of n values from p is streamed (when its pass streams).
template <typename T>
bool StreamsRun(const T* p, int64_t n) {
  return n >= kMinStreamRun || (ToAligned(p, n) == 0 && n % int64_t(hn::Lanes(DF())) == 0);
}

// Whether rows of `channels` values from p can be streamed: every vector store aligned.
template <typename T>
bool RowsAligned(const T* p, int64_t channels) {
  return channels % int64_t(hn::Lanes(DF())) == 0 && ToAligned(p, 1) == 0;
}

// f(std::true_type()) when stream (and T can stream), else f(std::false_type()): streaming
// instantiations exist for float32 only.
template <typename T, class F>
void WithStream(bool stream, F&& f) {
  if constexpr (kCanStream && std::is_same_v<T, float>) {
    if (stream) return f(std::true_type());
  }
  f(std::false_type());
}

// ---- the loops of the elementwise passes ----
// Each pass is a step over one vector or one lane, called as step(d, i, stream): d is DF for a
// full vector and D1 for a single value, `stream` a std::bool_constant saying whether that store
// may be non-temporal. The loops below own the order of the steps and the alignment head, so
// every op streams the same way; a pass that streams runs inside cpu/parallel.h's loops, which
// fence.

// Steps over i in [0, n) of a run that writes `out`. With kStream: one-lane steps up to the
// first aligned vector of out, then streamed vectors; a run StreamsRun refuses is stored
// normally, unless kAnyLength (the caller has decided that this run streams).
template <bool kStream, bool kAnyLength = false, typename T, class Step>
HWY_INLINE void ForEachInRun(T* out, int64_t n, const Step& step) {
  if constexpr (kStream && !kAnyLength)
    if (!StreamsRun(out, n)) return ForEachInRun<false>(out, n, step);
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const std::bool_constant<kStream> vector_store;
  const std::false_type lane_store;
  int64_t i = 0;
  if constexpr (kStream)
    for (const int64_t head = ToAligned(out, n); i < head; ++i) step(d1, i, lane_store);
  for (; i + 2 * N <= n; i += 2 * N) {
    step(d, i, vector_store);
    step(d, i + N, vector_store);
  }
  if (i + N <= n) {
    step(d, i, vector_store);
    i += N;
  }
  for (; i < n; ++i) step(d1, i, lane_store);
}

// Steps over `rows` contiguous rows of `channels` values that write `out` (channels-last):
// called as step(d, o, c, stream) with o the row's offset and c the channel. With kStream the
// rows are streamed when every vector store is aligned (RowsAligned), else stored normally.
template <bool kStream, typename T, class Step>
HWY_INLINE void ForEachInRows(T* out, int64_t rows, int64_t channels, const Step& step) {
  if constexpr (kStream)
    if (!RowsAligned(out, channels)) return ForEachInRows<false>(out, rows, channels, step);
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const std::bool_constant<kStream> vector_store;
  const std::false_type lane_store;
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t o = k * channels;
    int64_t c = 0;
    for (; c + N <= channels; c += N) step(d, o, c, vector_store);
    for (; c < channels; ++c) step(d1, o, c, lane_store);
  }
}

// ---- the activations of the fused epilogues (normkit/epilogue.h) ----

// relu that keeps NaN (as torch): only values below zero become zero.
template <class D>
HWY_INLINE hn::Vec<D> Relu(D d, hn::Vec<D> v) {
  return hn::IfThenZeroElse(hn::Lt(v, hn::Zero(d)), v);
}

// sigmoid(z) = 1 / (1 + e^-z) and 1 - sigmoid(z), both from t = e^-|z| in (0, 1] (Highway's
// Exp, 1 ulp; valid for any argument <= 0, so no overflow): 1 / (1 + t) and t / (1 + t), the
// larger for z >= 0. Neither is a difference, so neither cancels (1 - s computed as a difference
// would lose the digits of silu' at large z). A few ulps each (the tests hold silu and its
// derivative to 3e-7 relative of double's). NaN in, NaN out through the z * ... of Silu and
// SiluDerivative.
template <class D>
HWY_INLINE void SigmoidAndComplement(D d, hn::Vec<D> z, hn::Vec<D>& s, hn::Vec<D>& one_minus_s) {
  const auto one = hn::Set(d, 1.0f);
  const auto t = hn::Exp(d, hn::Neg(hn::Abs(z)));
  const auto large = hn::Div(one, hn::Add(one, t));
  const auto small = hn::Mul(t, large);
  const auto negative = hn::Lt(z, hn::Zero(d));
  s = hn::IfThenElse(negative, small, large);
  one_minus_s = hn::IfThenElse(negative, large, small);
}

// silu(z) = z * sigmoid(z).
template <class D>
HWY_INLINE hn::Vec<D> Silu(D d, hn::Vec<D> z) {
  hn::Vec<D> s, c;
  SigmoidAndComplement(d, z, s, c);
  return hn::Mul(z, s);
}

// silu'(z) = s * (1 + z * (1 - s)), s = sigmoid(z).
template <class D>
HWY_INLINE hn::Vec<D> SiluDerivative(D d, hn::Vec<D> z) {
  hn::Vec<D> s, c;
  SigmoidAndComplement(d, z, s, c);
  return hn::Mul(s, hn::MulAdd(z, c, hn::Set(d, 1.0f)));
}

// The forward epilogue's activation (kAct: an Activation as int) on z.
template <int kAct, class D>
HWY_INLINE hn::Vec<D> Activate(D d, hn::Vec<D> z) {
  if constexpr (kAct == int(Activation::relu)) return Relu(d, z);
  else if constexpr (kAct == int(Activation::silu)) return Silu(d, z);
  else return z;
}

// f(std::integral_constant<int, a>) for the activation a: the forward's leaf loops are
// instantiated per activation.
template <class F>
HWY_INLINE void WithActivation(Activation a, F&& f) {
  if (a == Activation::relu) return f(std::integral_constant<int, int(Activation::relu)>());
  if (a == Activation::silu) return f(std::integral_constant<int, int(Activation::silu)>());
  f(std::integral_constant<int, int(Activation::none)>());
}

// Sum of the lanes of v in double, in an order fixed for a target: the two halves promoted
// and added, then Highway's SumOfLanes tree. A float converts to double exactly, so the sum is
// exact (and any order gives the same bits) whenever the lanes' exponents lie within 2^25 of
// each other; the tree keeps the dependent adds to log2(lanes) rather than one per lane.
template <class D>
HWY_INLINE double SumLanes(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(d) == 1) {
    return double(hn::GetLane(v));
  } else {
#if HWY_TARGET == HWY_SCALAR
    return double(hn::GetLane(v));
#else
    const hn::Repartition<double, D> dd;
    const hn::Half<D> dh;
    const auto halves =
        hn::Add(hn::PromoteTo(dd, hn::LowerHalf(dh, v)), hn::PromoteTo(dd, hn::UpperHalf(dh, v)));
    return hn::GetLane(hn::SumOfLanes(dd, halves));
#endif
  }
}

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
