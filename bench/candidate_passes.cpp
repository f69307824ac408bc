// The passes yardstick: an op's passes over memory with next to none of its arithmetic.
//
// A normalization whose output needs statistics of its input reads that input twice: once for
// the statistics, once for the output. `passes` does that and nothing more: a vector sum over
// one reduction unit of the op, then y = a*x + b over the same unit, unit after unit. The unit
// is what the op's statistics cover in memory order, so the second read comes from wherever the
// op itself could have it:
//   LayerNorm          a row                    (cols values)
//   GroupNorm          nchw: a group's channels (C/G * spatial); nhwc: a sample (C * spatial)
//   InstanceNorm       nchw: a plane (spatial);                  nhwc: a sample
//   BatchNorm          the whole tensor (every channel's statistics span the batch)
// Per op:
//   training forward   sum(x); y = a*x + b                       (x read twice, y written)
//   inference forward  y = a*x + b                               (x read, y written)
//   backward           sum(dy), sum(dy*x); dx = a*dy + b*x + c    (dy and x read twice, dx written)
//   forward+backward   the forward over the whole slice, then the backward
// The threads split the units (or, with fewer units than threads, the values) into one
// contiguous slice each, as the copy does. Outputs normkit streams (cpu/streaming.h's
// streams_output) are written with non-temporal stores here too. float32 only; no fused
// epilogue.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "candidate_passes.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/cache_control.h>

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "candidate.h"
// The one internal header the benchmark uses, by path: the yardstick streams exactly the outputs
// normkit's kernels stream (cpu/streaming.h), or it would not bound them fairly. Everything else
// goes through the public API.
#include "../src/cpu/streaming.h"

HWY_BEFORE_NAMESPACE();
namespace normkit::bench::passes::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;

float AddLanes(DF d, hn::Vec<DF> v) { return hn::GetLane(hn::SumOfLanes(d, v)); }

// Stores v at p: non-temporal when asked for and p is aligned to a vector.
template <bool kStream>
HWY_INLINE void Put(DF d, hn::Vec<DF> v, float* p, bool aligned) {
  if (kStream && aligned) hn::Stream(v, d, p); else hn::StoreU(v, d, p);
}

// Whether p is aligned for a vector store (normkit's kernels stream only such stores).
bool Aligned(const float* p) {
  return reinterpret_cast<uintptr_t>(p) % (hn::Lanes(DF()) * sizeof(float)) == 0;
}

// Sum of n floats, four accumulators so that the adds' latency does not bound the loop.
float Sum(const float* HWY_RESTRICT x, int64_t n) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    s0 = hn::Add(s0, hn::LoadU(d, x + i));
    s1 = hn::Add(s1, hn::LoadU(d, x + i + N));
    s2 = hn::Add(s2, hn::LoadU(d, x + i + 2 * N));
    s3 = hn::Add(s3, hn::LoadU(d, x + i + 3 * N));
  }
  for (; i + N <= n; i += N) s0 = hn::Add(s0, hn::LoadU(d, x + i));
  float s = AddLanes(d, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3)));
  for (; i < n; ++i) s += x[i];
  return s;
}

// y[i] = a*x[i] + b, i < n.
template <bool kStream>
void Scale(const float* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n, float a, float b) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  const bool aligned = Aligned(y);
  const auto va = hn::Set(d, a), vb = hn::Set(d, b);
  int64_t i = 0;
  for (; i + N <= n; i += N)
    Put<kStream>(d, hn::MulAdd(va, hn::LoadU(d, x + i), vb), y + i, aligned);
  for (; i < n; ++i) y[i] = a * x[i] + b;
}

// One thread's slice of n values, unit by unit.
template <bool kStream>
void ForwardT(const float* x, float* y, int64_t n, int64_t unit) {
  for (int64_t i = 0; i < n; i += unit) {
    const int64_t m = std::min(unit, n - i);
    // The output pass depends on the unit's statistics, as a normalization's does.
    const float s = Sum(x + i, m);
    Scale<kStream>(x + i, y + i, m, 0.5f + 0.0f * s, 0.25f);
  }
}

template <bool kStream>
void BackwardT(const float* dy, const float* x, float* dx, int64_t n, int64_t unit) {
  const DF d;
  const int64_t N = int64_t(hn::Lanes(d));
  for (int64_t i = 0; i < n; i += unit) {
    const int64_t m = std::min(unit, n - i);
    const float* g = dy + i;
    const float* v = x + i;
    float* out = dx + i;
    auto g0 = hn::Zero(d), g1 = hn::Zero(d), p0 = hn::Zero(d), p1 = hn::Zero(d);
    int64_t k = 0;
    for (; k + 2 * N <= m; k += 2 * N) {
      const auto a = hn::LoadU(d, g + k), b = hn::LoadU(d, g + k + N);
      g0 = hn::Add(g0, a);
      g1 = hn::Add(g1, b);
      p0 = hn::MulAdd(a, hn::LoadU(d, v + k), p0);
      p1 = hn::MulAdd(b, hn::LoadU(d, v + k + N), p1);
    }
    float sg = AddLanes(d, hn::Add(g0, g1)), sp = AddLanes(d, hn::Add(p0, p1));
    for (; k < m; ++k) sg += g[k], sp += g[k] * v[k];
    const float a = 0.5f + 0.0f * sg, b = 0.0f * sp - 0.125f, c = 0.0625f;
    const auto va = hn::Set(d, a), vb = hn::Set(d, b), vc = hn::Set(d, c);
    const bool aligned = Aligned(out);
    k = 0;
    for (; k + N <= m; k += N)
      Put<kStream>(d, hn::MulAdd(va, hn::LoadU(d, g + k), hn::MulAdd(vb, hn::LoadU(d, v + k), vc)),
                   out + k, aligned);
    for (; k < m; ++k) out[k] = a * g[k] + (b * v[k] + c);
  }
}

void Forward(const float* x, float* y, int64_t n, int64_t unit, bool stream) {
  if (stream) {
    ForwardT<true>(x, y, n, unit);
    hwy::FlushStream();
  } else {
    ForwardT<false>(x, y, n, unit);
  }
}
void Inference(const float* x, float* y, int64_t n, bool stream) {
  if (stream) {
    Scale<true>(x, y, n, 0.5f, 0.25f);
    hwy::FlushStream();
  } else {
    Scale<false>(x, y, n, 0.5f, 0.25f);
  }
}
void Backward(const float* dy, const float* x, float* dx, int64_t n, int64_t unit, bool stream) {
  if (stream) {
    BackwardT<true>(dy, x, dx, n, unit);
    hwy::FlushStream();
  } else {
    BackwardT<false>(dy, x, dx, n, unit);
  }
}

}  // namespace normkit::bench::passes::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::bench {
namespace passes {
HWY_EXPORT(Forward);
HWY_EXPORT(Inference);
HWY_EXPORT(Backward);
}  // namespace passes

namespace {

// Values one reduction unit of the case's op covers, contiguous in memory (see the top).
int64_t reduction_unit(const Case& c) {
  const bool last = c.format == MemoryFormat::channels_last;
  switch (c.family) {
    case Family::layer_norm:
    case Family::rms_norm: return c.shape.back();
    case Family::group_norm:
      return (last ? c.channels() : c.channels() / c.groups) * c.spatial_size();
    case Family::instance_norm: return (last ? c.channels() : 1) * c.spatial_size();
    case Family::batch_norm:
    case Family::batch_renorm: return c.numel();
    // A sample's plane, vectorized across positions; channels-last: a position's C values.
    case Family::layer_norm2d: return last ? c.channels() : c.channels() * c.spatial_size();
    case Family::weight_std: return c.numel() / c.batch();  // an output channel's values
    case Family::frn: return (last ? c.channels() : 1) * c.spatial_size();
    case Family::evonorm_s0:
      return (last ? c.channels() : c.channels() / c.groups) * c.spatial_size();
  }
  return c.numel();
}

class PassesCandidate final : public Candidate {
 public:
  std::string name() const override { return "passes"; }
  std::string prepare(const Case& c, const CaseData& data) override {
    if (c.dtype != DType::float32) return "float32 only";
    if (c.epilogue != Epilogue::none) return "no fused epilogue";
    op_ = c.op;
    n_ = c.numel();
    unit_ = std::max<int64_t>(1, reduction_unit(c));
    x_ = data.x.as<float>();
    dy_ = data.dy.as<float>();
    y_ = Buffer(std::size_t(n_) * sizeof(float));
    dx_ = Buffer(std::size_t(n_) * sizeof(float));
    std::fill(y_.as<float>(), y_.as<float>() + n_, 0.f);  // first touch, untimed
    std::fill(dx_.as<float>(), dx_.as<float>() + n_, 0.f);
    stream_ = cpu::streams_output<float>(n_);
    return "";
  }
  void set_threads(int threads) override { threads_ = threads; }
  void run() override {
    const float* x = x_;
    const float* dy = dy_;
    float* y = y_.as<float>();
    float* dx = dx_.as<float>();
    const int64_t n = n_, units = (n_ + unit_ - 1) / unit_;
#pragma omp parallel num_threads(threads_)
    {
      const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
      // Whole units per thread; with fewer units than threads, slices of 64 values and one
      // unit per slice (the statistics then need a merge, which is not counted).
      int64_t b, e, unit = unit_;
      if (units >= nt) {
        b = std::min(n, units * t / nt * unit_);
        e = std::min(n, units * (t + 1) / nt * unit_);
      } else {
        const int64_t lines = (n + 63) / 64;
        b = std::min(n, lines * t / nt * 64);
        e = std::min(n, lines * (t + 1) / nt * 64);
        unit = std::max<int64_t>(1, e - b);
      }
      if (e > b) {
        const int64_t m = e - b;
        switch (op_) {
          case Op::forward:
            HWY_DYNAMIC_DISPATCH(passes::Forward)(x + b, y + b, m, unit, stream_);
            break;
          case Op::forward_inference:
            HWY_DYNAMIC_DISPATCH(passes::Inference)(x + b, y + b, m, stream_);
            break;
          case Op::backward:
            HWY_DYNAMIC_DISPATCH(passes::Backward)(dy + b, x + b, dx + b, m, unit, stream_);
            break;
          case Op::forward_backward:
            HWY_DYNAMIC_DISPATCH(passes::Forward)(x + b, y + b, m, unit, stream_);
            HWY_DYNAMIC_DISPATCH(passes::Backward)(dy + b, x + b, dx + b, m, unit, stream_);
            break;
        }
      }
    }
  }
  // Nothing to compare with the reference; instead every value it should have written is
  // checked here (throws on the first one that is not), so a slice or tail left out shows.
  void collect(Outputs&) override {
    const bool fwd = op_ != Op::backward, bwd = op_ == Op::backward || op_ == Op::forward_backward;
    const float* y = y_.as<float>();
    const float* dx = dx_.as<float>();
    for (int64_t i = 0; i < n_; ++i) {
      // The multiplications are exact, so fused or not these round the same.
      if (fwd && y[i] != 0.5f * x_[i] + 0.25f) fail("y", i);
      if (bwd && dx[i] != 0.5f * dy_[i] + (-0.125f * x_[i] + 0.0625f)) fail("dx", i);
    }
  }
  void release() override {
    y_ = Buffer();
    dx_ = Buffer();
  }

 private:
  Op op_ = Op::forward;
  int64_t n_ = 0, unit_ = 1;
  const float* x_ = nullptr;
  const float* dy_ = nullptr;
  Buffer y_, dx_;
  bool stream_ = false;
  int threads_ = 1;

  [[noreturn]] void fail(const char* what, int64_t i) const {
    throw std::runtime_error(std::string("passes: ") + what + "[" + std::to_string(i) +
                             "] not written as expected");
  }
};

}  // namespace

std::unique_ptr<Candidate> make_passes_candidate() { return std::make_unique<PassesCandidate>(); }

}  // namespace normkit::bench
#endif  // HWY_ONCE
