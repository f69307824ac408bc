// BatchNorm on the CPU (see batch_norm.h): per-channel reductions over (N, spatial) cut into
// units fixed by the shape, merged per channel in a fixed order; elementwise passes with
// per-channel coefficients folded in double. Written once with Highway and compiled for every
// SIMD target; the best one the CPU supports is chosen at run time.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/batch_norm.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "cpu/batch_norm.h"
#include "cpu/cache.h"
#include "cpu/scratch.h"
#include "cpu/parallel.h"
#include "cpu/simd.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <utility>

#ifndef NORMKIT_CPU_BATCH_NORM_ONCE_
#define NORMKIT_CPU_BATCH_NORM_ONCE_
namespace normkit::cpu::bn {

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
// Values each float accumulator of a contiguous run's sums adds up before its lanes are added to
// a double: short enough that float rounding stays near 1e-6 relative on every target.
constexpr int64_t kChunk = 512;
// Rows of a column-form block whose sums accumulate in float before going to double.
constexpr int64_t kColumnRows = 64;
// A thread runs a channel's reduction and elementwise pass back to back when the channel's
// re-read inputs (x; or dy, x and y) fit in cached_unit_bytes() (cpu/cache.h).
// In that schedule a thread takes channels one at a time when a channel's runs are at least
// kBlockRunBytes long; shorter ones in blocks of channels whose runs of one sample make about
// that many contiguous bytes: one stream for the prefetchers instead of a short run per channel
// (a run of 7x7 floats is three cache lines). A channel at a time keeps the second pass in L1
// where it can.
constexpr int64_t kBlockRunBytes = 4096;
constexpr int64_t kMaxBlockChannels = 64;
// Streamed forward passes (outputs of kStreamBytes and more) over channels-first planes shorter
// than kMinStreamRun values, for at least kSlabMinBatch samples, go slab by slab: the planes of
// a block of channels of one sample are contiguous, so with the per-channel coefficients spread
// over the slab's values one vector loop covers them (whole vectors to stream, no one-lane
// tail per plane), the spread paid once per block for all samples. Not for outputs that stay
// in cache: there the two loads of spread coefficients per vector cost more than the tails.
// A slab holds at most kSlabValues values.
constexpr int64_t kSlabValues = 4096;
constexpr int64_t kSlabMinBatch = 4;
// Re-read bytes of a block of several channels, at most: cached_block_bytes() (cpu/cache.h).

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// How a per-channel reduction is cut into units. A function of the shape only: this is what
// makes every result independent of the thread count.
//
// Column form (channels-last, S == 1, or channels-first with short runs): the data is a matrix
// of `rows` rows, row r at x + r * row_stride, each channel owning `cols_per_channel`
// consecutive columns. A unit is (row group, channel block); row groups are the slots.
// Run form (channels-first, runs of S >= kMinRunLength): channel c is N runs of S values. A
// unit is (channel, slot), the slot covering `samples_per_unit` whole runs, or, for runs longer
// than kUnitElements, one `segment_length` piece of one run.
struct Plan {
  bool column_form = true;
  int64_t channels = 0;
  int64_t slots = 0;  // partial results per channel
  int64_t units = 0;
  // column form
  int64_t rows = 0, row_stride = 0, cols_per_channel = 1;
  int64_t channels_per_block = 0, channel_blocks = 0, rows_per_group = 0, block_rows = 0;
  // run form
  int64_t batch = 0, spatial = 0, samples_per_unit = 0, segment_length = 0, segments = 0;
};

inline bool reads_as_rows(const BatchNormShape& sh) {
  return sh.format == MemoryFormat::channels_last || sh.spatial == 1;
}

inline Plan make_plan(const BatchNormShape& sh) {
  Plan p;
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
void for_each_run_piece(const Plan& p, int64_t k, F f) {
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
inline Block column_block(const Plan& p, int64_t u) {
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

// Whether the channel-at-a-time schedule runs: channels-first runs, enough channels to share
// among the threads, and a channel's re-read inputs fit in cache. Either schedule gives the
// same bits, so this may depend on the thread count.
inline bool channel_local(const Plan& p, const BatchNormShape& sh, int64_t bytes_per_value,
                          int num_threads) {
  return !p.column_form && sh.channels >= 2 * int64_t(num_threads) &&
         sh.batch * sh.spatial * bytes_per_value <= cached_unit_bytes();
}

// Channels per block of that schedule (see kBlockRunBytes): at least one; at most as many as
// fit in cached_block_bytes() together, leaving two blocks per thread. `run_bytes`: bytes of one
// value of x; `bytes_per_value`: of all the inputs read twice.
inline int64_t local_block_channels(const BatchNormShape& sh, int64_t run_bytes,
                                    int64_t bytes_per_value, int num_threads) {
  const int64_t want = ceil_div(kBlockRunBytes, sh.spatial * run_bytes);
  const int64_t fit = cached_block_bytes() / (sh.batch * sh.spatial * bytes_per_value);
  const int64_t share = ceil_div(sh.channels, 2 * int64_t(std::max(num_threads, 1)));
  return std::max<int64_t>(1, std::min({want, kMaxBlockChannels, fit, share}));
}

// Two sums over a set of values of one channel, each in double:
//   statistics: first = sum(x - pivot), second = sum((x - pivot)^2)
//   gradients:  first = sum(g),         second = sum(g * (x - mean))
// Partial sums of pieces fixed by the shape are added in a fixed order: no division per piece.
struct PairSums {
  double first = 0;
  double second = 0;
};

// Room for up to kCap objects of type U on the stack, each constructed only when used: an
// array of kCap would construct (zero) every one of them on every call.
template <typename U, int64_t kCap>
class StackSlots {
 public:
  template <class... Args>
  U& emplace(int64_t i, Args&&... args) {
    return *new (raw_ + i * sizeof(U)) U(std::forward<Args>(args)...);
  }
  U& operator[](int64_t i) { return *std::launder(reinterpret_cast<U*>(raw_ + i * sizeof(U))); }
  void destroy(int64_t i) { (*this)[i].~U(); }

 private:
  alignas(U) unsigned char raw_[kCap * sizeof(U)];
};

// Scratch layout (cpu/scratch.h): partial sums (slots * C) and four arrays of C floats.
struct ScratchParts {
  std::size_t partial = 0, coefficients = 0;
  std::size_t bytes = 0;  // ScratchLayout::workspace_bytes()
};

inline ScratchParts scratch_parts(const BatchNormShape& sh) {
  ScratchParts p;
  if (sh.batch * sh.channels * sh.spatial == 0) return p;
  ScratchLayout l;
  p.partial = l.add<PairSums>(make_plan(sh).slots, sh.channels);
  p.coefficients = l.add<float>(4, sh.channels);
  p.bytes = l.workspace_bytes();
  return p;
}

struct Scratch {
  PairSums* partial;    // slots * C
  float* coefficients;  // 4 * C
};

inline Scratch carve(const BatchNormShape& sh, std::span<std::byte> workspace) {
  const ScratchParts p = scratch_parts(sh);
  std::byte* base = scratch_base(workspace, p.bytes);
  return {scratch_part<PairSums>(base, p.partial), scratch_part<float>(base, p.coefficients)};
}

}  // namespace normkit::cpu::bn
#endif  // NORMKIT_CPU_BATCH_NORM_ONCE_

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {
namespace {

using namespace normkit::cpu::bn;

template <class D>
using V = hn::Vec<D>;

// ---- elementwise steps, the same for a full vector and a one-lane tail ----


// y = relu?(x * a + b + residual?)
template <bool kResidual, bool kRelu, bool kStream = false, class D, typename T>
HWY_INLINE void ForwardStep(D d, const T* HWY_RESTRICT x, const T* HWY_RESTRICT r,
                            T* HWY_RESTRICT y, V<D> a, V<D> b) {
  auto v = hn::MulAdd(LoadF(d, x), a, b);
  if constexpr (kResidual) v = hn::Add(v, LoadF(d, r));
  // Not Max(v, 0): a NaN stays a NaN, as in torch's relu.
  if constexpr (kRelu) v = hn::IfThenZeroElse(hn::Lt(v, hn::Zero(d)), v);
  StoreOut<kStream>(v, d, y);
}

// The gradient the normalization sees: dy, zeroed where the ReLU's output was not positive.
template <bool kRelu, class D, typename T>
HWY_INLINE V<D> Upstream(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT y) {
  const auto g = LoadF(d, dy);
  if constexpr (kRelu) return hn::IfThenElseZero(hn::Gt(LoadF(d, y), hn::Zero(d)), g);
  return g;
}

// dx = g * p + (x - m) * q + r (kX), or g * p (no x: the inference backward); dresidual = g.
// kStream: dx (not dresidual, whose alignment may differ) with non-temporal stores.
template <bool kRelu, bool kDresidual, bool kX, bool kStream = false, class D, typename T>
HWY_INLINE void BackwardStep(D d, const T* HWY_RESTRICT dy, const T* HWY_RESTRICT x,
                             const T* HWY_RESTRICT y, T* HWY_RESTRICT dx, T* HWY_RESTRICT dres,
                             V<D> p, V<D> q, V<D> r, V<D> m) {
  const auto g = Upstream<kRelu>(d, dy, y);
  if constexpr (kDresidual) StoreF(g, d, dres);
  if constexpr (kX)
    StoreOut<kStream>(hn::MulAdd(g, p, hn::MulAdd(hn::Sub(LoadF(d, x), m), q, r)), d, dx);
  else
    StoreOut<kStream>(hn::Mul(g, p), d, dx);
}

template <typename T>
const T* at(const T* p, int64_t i) {
  return p ? p + i : nullptr;
}
template <typename T>
T* at(T* p, int64_t i) {
  return p ? p + i : nullptr;
}

// ---- elementwise passes over one run (one channel) or a block of rows (all channels) ----

// kStream: y with non-temporal stores (see ForEachInRun).
template <bool kResidual, bool kRelu, bool kStream = false, typename T>
void ForwardRun(const T* x, const T* r, T* y, int64_t n, float a, float b) {
  ForEachInRun<kStream>(y, n, [&](auto d, int64_t i, auto stream) {
    ForwardStep<kResidual, kRelu, decltype(stream)::value>(d, x + i, at(r, i), y + i,
                                                           hn::Set(d, a), hn::Set(d, b));
  });
}

// y = epilogue(x * a[i] + b[i]) over a contiguous slab of n values with coefficients per value;
// each value's arithmetic is ForwardRun's. kStream: y with non-temporal stores, whatever the
// slab's length.
template <bool kResidual, bool kRelu, bool kStream = false, typename T>
void ForwardSlab(const T* x, const T* r, T* y, int64_t n, const float* a, const float* b) {
  ForEachInRun<kStream, true>(y, n, [&](auto d, int64_t i, auto stream) {
    ForwardStep<kResidual, kRelu, decltype(stream)::value>(
        d, x + i, at(r, i), y + i, hn::LoadU(d, a + i), hn::LoadU(d, b + i));
  });
}

// The forward's elementwise pass over channels [c0, c1) of every sample, slab by slab (see
// kSlabValues; (c1 - c0) * S <= kSlabValues); a[c - c0], b[c - c0] are channel c's.
template <bool kResidual, bool kRelu, typename T>
void ForwardSlabs(const BatchNormShape& sh, const T* x, const T* r, T* y, int64_t c0, int64_t c1,
                  const float* a, const float* b, bool stream) {
  const int64_t S = sh.spatial, n_values = (c1 - c0) * S;
  float sa[kSlabValues], sb[kSlabValues];  // read with unaligned loads
  for (int64_t c = c0; c < c1; ++c) {
    std::fill(sa + (c - c0) * S, sa + (c - c0 + 1) * S, a[c - c0]);
    std::fill(sb + (c - c0) * S, sb + (c - c0 + 1) * S, b[c - c0]);
  }
  WithStream<T>(stream, [&](auto kS) {
    for (int64_t n = 0; n < sh.batch; ++n) {
      const int64_t o = (n * sh.channels + c0) * S;
      ForwardSlab<kResidual, kRelu, decltype(kS)::value>(x + o, at(r, o), y + o, n_values, sa,
                                                         sb);
    }
  });
}

// Whether the forward's elementwise pass goes slab by slab (see kSlabValues).
inline bool by_slabs(const BatchNormShape& sh, bool stream) {
  return stream && !reads_as_rows(sh) && sh.spatial < kMinStreamRun &&
         sh.batch >= kSlabMinBatch;
}

// kStream: y with non-temporal stores where its rows allow (see ForEachInRows).
template <bool kResidual, bool kRelu, bool kStream = false, typename T>
void ForwardRows(const T* x, const T* r, T* y, int64_t rows, int64_t C, const float* a,
                 const float* b) {
  ForEachInRows<kStream>(y, rows, C, [&](auto d, int64_t o, int64_t j, auto stream) {
    ForwardStep<kResidual, kRelu, decltype(stream)::value>(
        d, x + o + j, at(r, o + j), y + o + j, hn::LoadU(d, a + j), hn::LoadU(d, b + j));
  });
}

// kStream: dx with non-temporal stores (see ForEachInRun).
template <bool kRelu, bool kDresidual, bool kX, bool kStream = false, typename T>
void BackwardRun(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t n, float p,
                 float q, float r, float m) {
  ForEachInRun<kStream>(dx, n, [&](auto d, int64_t i, auto stream) {
    BackwardStep<kRelu, kDresidual, kX, decltype(stream)::value>(
        d, dy + i, at(x, i), at(y, i), dx + i, at(dres, i), hn::Set(d, p), hn::Set(d, q),
        hn::Set(d, r), hn::Set(d, m));
  });
}

// kStream: dx with non-temporal stores where its rows allow (see ForEachInRows).
template <bool kRelu, bool kDresidual, bool kX, bool kStream = false, typename T>
void BackwardRows(const T* dy, const T* x, const T* y, T* dx, T* dres, int64_t rows, int64_t C,
                  const float* p, const float* q, const float* r, const float* m) {
  ForEachInRows<kStream>(dx, rows, C, [&](auto d, int64_t o, int64_t j, auto stream) {
    BackwardStep<kRelu, kDresidual, kX, decltype(stream)::value>(
        d, dy + o + j, at(x, o + j), at(y, o + j), dx + o + j, at(dres, o + j),
        hn::LoadU(d, p + j), hn::LoadU(d, q + j), hn::LoadU(d, r + j), hn::LoadU(d, m + j));
  });
}

// ---- sums of a run or of a block of columns ----

// The per-element terms of the two sums (see PairSums): shifted statistics, or gradients.
struct StatTerms {
  template <class D, typename T>
  HWY_INLINE static void Step(D d, const T* HWY_RESTRICT x, const T*, const T*, hn::Vec<D> pivot,
                              hn::Vec<D>& s1, hn::Vec<D>& s2) {
    const auto v = hn::Sub(LoadF(d, x), pivot);
    s1 = hn::Add(s1, v);
    s2 = hn::MulAdd(v, v, s2);
  }
};
template <bool kRelu>
struct GradTerms {
  template <class D, typename T>
  HWY_INLINE static void Step(D d, const T* HWY_RESTRICT x, const T* HWY_RESTRICT dy,
                              const T* HWY_RESTRICT y, hn::Vec<D> center, hn::Vec<D>& s1,
                              hn::Vec<D>& s2) {
    const auto g = Upstream<kRelu>(d, dy, y);
    s1 = hn::Add(s1, g);
    s2 = hn::MulAdd(g, hn::Sub(LoadF(d, x), center), s2);
  }
};

// Sums over contiguous runs (x, and dy/y for gradients) added one after another: float vector
// accumulators (two per sum, and one-lane ones for each run's tail) carried from run to run and
// added to `out` in double once kChunk values are pending, and at the end. Where the flushes
// fall depends only on the run lengths, so both schedules get the same bits.
template <class Terms, typename T>
class RunSums {
 public:
  RunSums(float center, PairSums& out) : center_(center), out_(out) { Store(Acc()); }
  ~RunSums() {
    Acc acc = Load();
    Flush(acc);
  }

  void Add(const T* x, const T* dy, const T* y, int64_t n) {
    const int64_t N = int64_t(hn::Lanes(d_));
    // The accumulators in locals while adding (registers); between calls in plain float
    // arrays, so that the object needs no vector alignment (it may live in stack scratch).
    Acc acc = Load();
    const auto vc = hn::Set(d_, center_);
    const auto vc1 = hn::Set(d1_, center_);
    for (int64_t start = 0; start < n; start += kChunk) {
      const int64_t len = std::min(kChunk, n - start);
      const T* v = x + start;
      const T* g = at(dy, start);
      const T* w = at(y, start);
      int64_t i = 0;
      for (; i + 2 * N <= len; i += 2 * N) {
        Terms::Step(d_, v + i, at(g, i), at(w, i), vc, acc.a0, acc.b0);
        Terms::Step(d_, v + i + N, at(g, i + N), at(w, i + N), vc, acc.a1, acc.b1);
      }
      for (; i + N <= len; i += N) Terms::Step(d_, v + i, at(g, i), at(w, i), vc, acc.a0, acc.b0);
      for (; i < len; ++i) Terms::Step(d1_, v + i, at(g, i), at(w, i), vc1, acc.at, acc.bt);
      pending_ += len;
      if (pending_ >= kChunk) Flush(acc);
    }
    Store(acc);
  }

 private:
  static constexpr std::size_t kLanes = hn::MaxLanes(DF());
  struct Acc {
    Acc() : a0(hn::Zero(DF())), a1(a0), b0(a0), b1(a0), at(hn::Zero(D1())), bt(at) {}
    hn::Vec<DF> a0, a1, b0, b1;
    hn::Vec<D1> at, bt;
  };
  Acc Load() const {
    Acc a;
    a.a0 = hn::LoadU(d_, s_a0_), a.a1 = hn::LoadU(d_, s_a1_);
    a.b0 = hn::LoadU(d_, s_b0_), a.b1 = hn::LoadU(d_, s_b1_);
    a.at = hn::LoadU(d1_, &s_at_), a.bt = hn::LoadU(d1_, &s_bt_);
    return a;
  }
  void Store(const Acc& a) {
    hn::StoreU(a.a0, d_, s_a0_), hn::StoreU(a.a1, d_, s_a1_);
    hn::StoreU(a.b0, d_, s_b0_), hn::StoreU(a.b1, d_, s_b1_);
    hn::StoreU(a.at, d1_, &s_at_), hn::StoreU(a.bt, d1_, &s_bt_);
  }

  void Flush(Acc& acc) {
    if (pending_ == 0) return;
    out_.first += SumLanes(d_, hn::Add(acc.a0, acc.a1)) + double(hn::GetLane(acc.at));
    out_.second += SumLanes(d_, hn::Add(acc.b0, acc.b1)) + double(hn::GetLane(acc.bt));
    acc = Acc();
    pending_ = 0;
  }

  DF d_;
  D1 d1_;
  float center_;
  float s_a0_[kLanes], s_a1_[kLanes], s_b0_[kLanes], s_b1_[kLanes], s_at_, s_bt_;
  int64_t pending_ = 0;
  PairSums& out_;
};

// Column sums over `rows` rows (row k at offset k * row_stride) of `width` columns, in float:
// s1[j], s2[j] with centers[j] the column's pivot (statistics) or mean (gradients). Vectorized
// across columns; every column's arithmetic is the same whatever its lane.
template <class Terms, typename T>
void BlockSums(const T* x, const T* dy, const T* y, int64_t rows, int64_t width,
               int64_t row_stride, const float* centers, float* s1, float* s2) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  auto columns = [&](auto dd, int64_t j0) {
    const auto vc = hn::LoadU(dd, centers + j0);
    auto a = hn::Zero(dd), b = hn::Zero(dd);
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t o = k * row_stride + j0;
      Terms::Step(dd, x + o, at(dy, o), at(y, o), vc, a, b);
    }
    hn::StoreU(a, dd, s1 + j0);
    hn::StoreU(b, dd, s2 + j0);
  };
  int64_t j = 0;
  // Four vectors of columns at a time: each row's piece is 4 * N contiguous values, which the
  // hardware prefetchers follow better than one vector per row.
  for (; j + 4 * N <= width; j += 4 * N) {
    const auto c0 = hn::LoadU(d, centers + j), c1 = hn::LoadU(d, centers + j + N);
    const auto c2 = hn::LoadU(d, centers + j + 2 * N), c3 = hn::LoadU(d, centers + j + 3 * N);
    auto a0 = hn::Zero(d), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t o = k * row_stride + j;
      Terms::Step(d, x + o, at(dy, o), at(y, o), c0, a0, b0);
      Terms::Step(d, x + o + N, at(dy, o + N), at(y, o + N), c1, a1, b1);
      Terms::Step(d, x + o + 2 * N, at(dy, o + 2 * N), at(y, o + 2 * N), c2, a2, b2);
      Terms::Step(d, x + o + 3 * N, at(dy, o + 3 * N), at(y, o + 3 * N), c3, a3, b3);
    }
    hn::StoreU(a0, d, s1 + j), hn::StoreU(a1, d, s1 + j + N);
    hn::StoreU(a2, d, s1 + j + 2 * N), hn::StoreU(a3, d, s1 + j + 3 * N);
    hn::StoreU(b0, d, s2 + j), hn::StoreU(b1, d, s2 + j + N);
    hn::StoreU(b2, d, s2 + j + 2 * N), hn::StoreU(b3, d, s2 + j + 3 * N);
  }
  for (; j + N <= width; j += N) columns(d, j);
  for (; j < width; ++j) columns(d1, j);
}

// ---- per-channel sums of one unit, shared by both schedules ----

// total[c - c0] += the sums of channel c over run-form slot k, for the channels [c0, c1) of a
// block (one channel, in the two-phase schedule), center[c - c0] subtracted from x. Sample by
// sample; each channel has its own RunSums, so its runs are added in slot order with the same
// flushes whatever the block, and each channel's sums are the same bits in both schedules.
template <class Terms, typename T>
void BlockSlotSums(const Plan& p, const T* x, const T* dy, const T* y, const float* center,
                   int64_t C, int64_t c0, int64_t c1, int64_t k, PairSums* total) {
  StackSlots<PairSums, kMaxBlockChannels> part;
  StackSlots<RunSums<Terms, T>, kMaxBlockChannels> sums;
  for (int64_t i = 0; i < c1 - c0; ++i) sums.emplace(i, center[i], part.emplace(i));
  for_each_run_piece(p, k, [&](int64_t n, int64_t begin, int64_t length) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t o = (n * C + c) * p.spatial + begin;
      sums[c - c0].Add(x + o, at(dy, o), at(y, o), length);
    }
  });
  for (int64_t i = 0; i < c1 - c0; ++i) {
    sums.destroy(i);  // flushes into part
    total[i].first += part[i].first;
    total[i].second += part[i].second;
  }
}

// ---- two-phase passes: work-sharing loops, called by every thread of one parallel region per
// call (or by the one thread of a serial call); each ends with the loop's barrier ----

// partial[k * C + c]: the sums of channel c over slot k; center[c] is subtracted from x.
template <class Terms, typename T>
void Partials(const Plan& p, const T* x, const T* dy, const T* y, const float* center, int64_t C,
              PairSums* partial) {
  if (p.column_form) {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < p.units; ++u) {
      const Block b = column_block(p, u);
      const int64_t cps = p.cols_per_channel, width = (b.c1 - b.c0) * cps;
      float centers[kBlockColumns];
      for (int64_t c = b.c0; c < b.c1; ++c)
        for (int64_t j = 0; j < cps; ++j) centers[(c - b.c0) * cps + j] = center[c];
      PairSums* acc = partial + b.slot * C;
      for (int64_t c = b.c0; c < b.c1; ++c) acc[c] = {};
      float s1[kBlockColumns], s2[kBlockColumns];
      for (int64_t r = b.r0; r < b.r1; r += p.block_rows) {
        const int64_t n_rows = std::min(p.block_rows, b.r1 - r);
        const int64_t o = r * p.row_stride + b.c0 * cps;
        BlockSums<Terms>(x + o, at(dy, o), at(y, o), n_rows, width, p.row_stride, centers, s1, s2);
        for (int64_t c = b.c0; c < b.c1; ++c)
          for (int64_t j = 0; j < cps; ++j) {
            acc[c].first += s1[(c - b.c0) * cps + j];
            acc[c].second += s2[(c - b.c0) * cps + j];
          }
      }
    }
  } else {
#pragma omp for schedule(static)
    for (int64_t u = 0; u < p.units; ++u) {
      const int64_t c = u / p.slots, k = u % p.slots;
      PairSums& out = partial[k * C + c];
      out = {};
      BlockSlotSums<Terms>(p, x, dy, y, center + c, C, c, c + 1, k, &out);
    }
  }
}

// Per-channel sums over every slot, added in slot order; then done(c, sums) for each channel,
// on the thread that merged it.
template <class Terms, typename T, class Done>
void Reduce(const Plan& p, const T* x, const T* dy, const T* y, const float* center, int64_t C,
            PairSums* partial, Done&& done) {
  Partials<Terms>(p, x, dy, y, center, C, partial);
#pragma omp for schedule(static)
  for (int64_t c = 0; c < C; ++c) {
    PairSums s;
    for (int64_t k = 0; k < p.slots; ++k) {
      s.first += partial[k * C + c].first;
      s.second += partial[k * C + c].second;
    }
    done(c, s);
  }
}

// The statistics' shift for channel c: the float mean of its first (up to) 16 values in (n, s)
// order. Near the channel's mean, so that x - pivot is small and exact where x has a large
// offset, and a function of the data and shape only.
template <typename T>
float ChannelPivot(const T* x, const BatchNormShape& sh, int64_t c) {
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

// Mean and biased / unbiased variance from the shifted sums of M values.
struct Stats {
  double mean, variance, unbiased;
};
inline Stats stats_of(const PairSums& s, float pivot, double count) {
  double m2 = s.second - s.first * (s.first / count);
  if (m2 < 0) m2 = 0;  // rounding only; NaN passes through
  return {double(pivot) + s.first / count, m2 / count, m2 / (count - 1)};
}

// ---- elementwise passes over the whole tensor ----

// Calls run(c, offset, length) over channels-first runs (pieces of one (n, c) plane), or
// rows(offset, row_count) over blocks of channels-last rows; pieces fixed by the shape, shared
// among the threads of the region (barrier included). `stream`: the calls may write with
// non-temporal stores, which each thread fences after its share.
template <class RunFn, class RowsFn>
void ForEachPiece(const BatchNormShape& sh, bool stream, RunFn run, RowsFn rows) {
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

template <bool kResidual, bool kRelu, typename T>
void ApplyForward(const ForwardJob& job, const float* a, const float* b) {
  const auto& sh = job.shape;
  const T* x = static_cast<const T*>(job.x);
  const T* r = static_cast<const T*>(job.residual);
  T* y = static_cast<T*>(job.y);
  const bool stream = Streams<T>(sh.batch * sh.channels * sh.spatial);
  if (by_slabs(sh, stream)) {
    const int64_t per = std::max<int64_t>(1, kSlabValues / sh.spatial);
    for_in_region(ceil_div(sh.channels, per), stream, [&](int64_t k) {
      const int64_t c0 = k * per;
      ForwardSlabs<kResidual, kRelu>(sh, x, r, y, c0, std::min(sh.channels, c0 + per), a + c0,
                                     b + c0, stream);
    });
    return;
  }
  WithStream<T>(stream, [&](auto kS) {
    constexpr bool S = decltype(kS)::value;
    ForEachPiece(
        sh, stream,
        [&](int64_t c, int64_t o, int64_t length) {
          ForwardRun<kResidual, kRelu, S>(x + o, at(r, o), y + o, length, a[c], b[c]);
        },
        [&](int64_t o, int64_t row_count) {
          ForwardRows<kResidual, kRelu, S>(x + o, at(r, o), y + o, row_count, sh.channels, a, b);
        });
  });
}

// Folds the statistics into y = x * a + b: b uses the rounded a, so that x == mean maps to
// bias up to the rounding of the two float operations.
inline void fold(double mean, double invstd, const ForwardJob& job, int64_t c, float& a,
                 float& b) {
  a = float(invstd * (job.weight ? job.weight[c] : 1.0f));
  b = float((job.bias ? job.bias[c] : 0.0f) - mean * double(a));
}

template <bool kResidual, bool kRelu, typename T>
void ForwardTrainingT(const ForwardJob& job, float* save_mean, float* save_invstd,
                      float* running_mean, float* running_var, double momentum, int num_threads,
                      const Scratch& scratch) {
  const auto& sh = job.shape;
  const int64_t C = sh.channels;
  const Plan plan = make_plan(sh);
  const T* x = static_cast<const T*>(job.x);
  const T* r = static_cast<const T*>(job.residual);
  T* y = static_cast<T*>(job.y);
  const double count = double(sh.batch * sh.spatial);
  auto finish = [&](int64_t c, const PairSums& sums, float pivot, float& a, float& b) {
    const Stats st = stats_of(sums, pivot, count);
    const double invstd = 1.0 / std::sqrt(st.variance + job.eps);
    save_mean[c] = float(st.mean);
    save_invstd[c] = float(invstd);
    if (running_mean) {
      running_mean[c] = float((1 - momentum) * running_mean[c] + momentum * st.mean);
      running_var[c] = float((1 - momentum) * running_var[c] + momentum * st.unbiased);
    }
    fold(st.mean, invstd, job, c, a, b);
  };
  const T* none = nullptr;

  const int64_t bytes = int64_t(sizeof(T)) * (kResidual ? 2 : 1);
  if (channel_local(plan, sh, bytes, num_threads)) {
    // Each block of channels: its statistics, then its elementwise pass while its runs are in
    // cache.
    const int64_t S = sh.spatial, B = local_block_channels(sh, sizeof(T), bytes, num_threads);
    const bool stream = Streams<T>(sh.batch * C * S);
    parallel_for(ceil_div(C, B), num_threads, worth_threads(num_threads, C * S * sh.batch), stream,
                 [&](int64_t block) {
      const int64_t c0 = block * B, c1 = std::min(C, c0 + B);
      float pivot[kMaxBlockChannels], a[kMaxBlockChannels], b[kMaxBlockChannels];
      StackSlots<PairSums, kMaxBlockChannels> sums;
      for (int64_t c = c0; c < c1; ++c) {
        pivot[c - c0] = ChannelPivot(x, sh, c);
        sums.emplace(c - c0);
      }
      for (int64_t k = 0; k < plan.slots; ++k)
        BlockSlotSums<StatTerms>(plan, x, none, none, pivot, C, c0, c1, k, &sums[0]);
      for (int64_t c = c0; c < c1; ++c)
        finish(c, sums[c - c0], pivot[c - c0], a[c - c0], b[c - c0]);
      if (c1 - c0 > 1 && (c1 - c0) * S <= kSlabValues && by_slabs(sh, stream)) {
        ForwardSlabs<kResidual, kRelu>(sh, x, r, y, c0, c1, a, b, stream);
        return;
      }
      for (int64_t n = 0; n < sh.batch; ++n)
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t o = (n * C + c) * S;
          WithStream<T>(stream, [&](auto kS) {
            ForwardRun<kResidual, kRelu, decltype(kS)::value>(x + o, at(r, o), y + o, S,
                                                               a[c - c0], b[c - c0]);
          });
        }
    });
    return;
  }

  float* a = scratch.coefficients;
  float* b = a + C;
  float* pivot = b + C;
  // One parallel region: pivots, partial sums, per-channel merge and fold, output pass.
  const bool parallel = worth_threads(num_threads, sh.batch * C * sh.spatial);
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c) pivot[c] = ChannelPivot(x, sh, c);
    Reduce<StatTerms>(plan, x, none, none, pivot, C, scratch.partial,
                      [&](int64_t c, const PairSums& sums) {
                        finish(c, sums, pivot[c], a[c], b[c]);
                      });
    ApplyForward<kResidual, kRelu, T>(job, a, b);
  }
}

// Calls f.template operator()<T, kResidual, kRelu>() for the job's dtype and epilogue.
template <class F>
void VisitForward(const ForwardJob& job, F&& f) {
  visit_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool res = job.residual != nullptr;
    if (res && job.relu) f.template operator()<T, true, true>();
    else if (res) f.template operator()<T, true, false>();
    else if (job.relu) f.template operator()<T, false, true>();
    else f.template operator()<T, false, false>();
  });
}

// ---- backward ----

// With g the masked dy, xhat = (x - mean) * invstd, M values per channel, p = weight * invstd:
//   dbias = sum(g), dweight = sum(g * xhat) = invstd * sum(g * (x - mean))
//   dx = p * (g - sum(g) / M - xhat * sum(g * xhat) / M)
//      = g * p + (x - mean) * q + r,   q = -p * invstd^2 * sum(g * (x - mean)) / M
//                                      r = -p * sum(g) / M
// the q term being the gradient through the variance and r the one through the mean.
struct BackwardCoefficients {
  float p, q, r;
};
inline BackwardCoefficients backward_coefficients(const BackwardJob& job, int64_t c,
                                                  const PairSums& s, double invstd,
                                                  double count) {
  const double pc = (job.weight ? job.weight[c] : 1.0f) * invstd;
  if (job.dbias) job.dbias[c] = float(s.first);
  if (job.dweight) job.dweight[c] = float(s.second * invstd);
  return {float(pc), float(-pc * invstd * invstd * s.second / count),
          float(-pc * s.first / count)};
}

template <bool kRelu, bool kDresidual, typename T>
void BackwardTrainingT(const BackwardJob& job, const float* save_mean, const float* save_invstd,
                       int num_threads, const Scratch& scratch) {
  const auto& sh = job.shape;
  const int64_t C = sh.channels, count = sh.batch * sh.spatial;
  const Plan plan = make_plan(sh);
  const T* dy = static_cast<const T*>(job.dy);
  const T* x = static_cast<const T*>(job.x);
  const T* y = kRelu ? static_cast<const T*>(job.y) : nullptr;
  T* dx = static_cast<T*>(job.dx);
  T* dres = static_cast<T*>(job.dresidual);

  const int64_t reread = int64_t(sizeof(T)) * (kRelu ? 3 : 2);
  if (channel_local(plan, sh, reread, num_threads)) {
    const int64_t S = sh.spatial, B = local_block_channels(sh, sizeof(T), reread, num_threads);
    const bool stream = Streams<T>(count * C);
    parallel_for(ceil_div(C, B), num_threads, worth_threads(num_threads, C * count), stream,
                 [&](int64_t block) {
      const int64_t c0 = block * B, c1 = std::min(C, c0 + B);
      StackSlots<PairSums, kMaxBlockChannels> s;
      BackwardCoefficients k[kMaxBlockChannels];
      for (int64_t c = c0; c < c1; ++c) s.emplace(c - c0);
      for (int64_t slot = 0; slot < plan.slots; ++slot)
        BlockSlotSums<GradTerms<kRelu>>(plan, x, dy, y, save_mean + c0, C, c0, c1, slot, &s[0]);
      for (int64_t c = c0; c < c1; ++c)
        k[c - c0] = backward_coefficients(job, c, s[c - c0], save_invstd[c], double(count));
      for (int64_t n = 0; n < sh.batch; ++n)
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t o = (n * C + c) * S;
          const BackwardCoefficients& kc = k[c - c0];
          WithStream<T>(stream, [&](auto kS) {
            BackwardRun<kRelu, kDresidual, true, decltype(kS)::value>(
                dy + o, x + o, at(y, o), dx + o, at(dres, o), S, kc.p, kc.q, kc.r, save_mean[c]);
          });
        }
    });
    return;
  }

  float* p = scratch.coefficients;
  float* q = p + C;
  float* r = q + C;
  const bool stream = Streams<T>(count * C);
  // One parallel region: partial sums, per-channel merge and coefficients, dx pass.
#pragma omp parallel num_threads(num_threads) if (worth_threads(num_threads, count * C))
  {
    Reduce<GradTerms<kRelu>>(plan, x, dy, y, save_mean, C, scratch.partial,
                             [&](int64_t c, const PairSums& sums) {
                               const auto k = backward_coefficients(job, c, sums, save_invstd[c],
                                                                    double(count));
                               p[c] = k.p, q[c] = k.q, r[c] = k.r;
                             });
    WithStream<T>(stream, [&](auto kS) {
      constexpr bool S = decltype(kS)::value;
      ForEachPiece(
          sh, stream,
          [&](int64_t c, int64_t o, int64_t length) {
            BackwardRun<kRelu, kDresidual, true, S>(dy + o, x + o, at(y, o), dx + o, at(dres, o),
                                                    length, p[c], q[c], r[c], save_mean[c]);
          },
          [&](int64_t o, int64_t row_count) {
            BackwardRows<kRelu, kDresidual, true, S>(dy + o, x + o, at(y, o), dx + o,
                                                     at(dres, o), row_count, C, p, q, r,
                                                     save_mean);
          });
    });
  }
}

template <bool kRelu, bool kDresidual, typename T>
void BackwardInferenceT(const BackwardJob& job, const float* running_mean,
                        const float* running_var, double eps, int num_threads,
                        const Scratch& scratch) {
  const auto& sh = job.shape;
  const int64_t C = sh.channels, total = sh.batch * C * sh.spatial;
  const T* dy = static_cast<const T*>(job.dy);
  const T* x = static_cast<const T*>(job.x);
  const T* y = kRelu ? static_cast<const T*>(job.y) : nullptr;
  T* dx = static_cast<T*>(job.dx);
  T* dres = static_cast<T*>(job.dresidual);
  float* p = scratch.coefficients;
  const Plan plan = make_plan(sh);
#pragma omp parallel num_threads(num_threads) if (worth_threads(num_threads, total))
  {
#pragma omp for schedule(static)
    for (int64_t c = 0; c < C; ++c)
      p[c] = float((job.weight ? job.weight[c] : 1.0f) / std::sqrt(double(running_var[c]) + eps));
    if (job.dweight || job.dbias)
      Reduce<GradTerms<kRelu>>(plan, x, dy, y, running_mean, C, scratch.partial,
                               [&](int64_t c, const PairSums& sums) {
                                 if (job.dbias) job.dbias[c] = float(sums.first);
                                 if (job.dweight)
                                   job.dweight[c] = float(
                                       sums.second / std::sqrt(double(running_var[c]) + eps));
                               });
    ForEachPiece(
        sh, /*stream=*/false,
        [&](int64_t c, int64_t o, int64_t length) {
          BackwardRun<kRelu, kDresidual, false>(dy + o, static_cast<const T*>(nullptr),
                                                at(y, o), dx + o, at(dres, o), length, p[c], 0.f,
                                                0.f, 0.f);
        },
        [&](int64_t o, int64_t row_count) {
          BackwardRows<kRelu, kDresidual, false>(dy + o, static_cast<const T*>(nullptr),
                                                 at(y, o), dx + o, at(dres, o), row_count, C, p,
                                                 p, p, p);
        });
  }
}

template <class F>
void VisitBackward(const BackwardJob& job, F&& f) {
  visit_dtype(job.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool dres = job.dresidual != nullptr;
    if (job.relu && dres) f.template operator()<T, true, true>();
    else if (job.relu) f.template operator()<T, true, false>();
    else if (dres) f.template operator()<T, false, true>();
    else f.template operator()<T, false, false>();
  });
}

}  // namespace

// ---- per-target entry points ----

void ForwardTraining(const ForwardJob& job, float* save_mean, float* save_invstd,
                     float* running_mean, float* running_var, double momentum, int num_threads,
                     std::span<std::byte> workspace) {
  const Scratch scratch = carve(job.shape, workspace);
  VisitForward(job, [&]<typename T, bool kResidual, bool kRelu>() {
    ForwardTrainingT<kResidual, kRelu, T>(job, save_mean, save_invstd, running_mean, running_var,
                                          momentum, num_threads, scratch);
  });
}

void ForwardInference(const ForwardJob& job, const float* running_mean, const float* running_var,
                      int num_threads, std::span<std::byte> workspace) {
  const Scratch scratch = carve(job.shape, workspace);
  const int64_t C = job.shape.channels;
  float* a = scratch.coefficients;
  float* b = a + C;
  const int64_t total = job.shape.batch * C * job.shape.spatial;
  VisitForward(job, [&]<typename T, bool kResidual, bool kRelu>() {
#pragma omp parallel num_threads(num_threads) if (worth_threads(num_threads, total))
    {
#pragma omp for schedule(static)
      for (int64_t c = 0; c < C; ++c)
        fold(running_mean[c], 1.0 / std::sqrt(double(running_var[c]) + job.eps), job, c, a[c],
             b[c]);
      ApplyForward<kResidual, kRelu, T>(job, a, b);
    }
  });
}

void BackwardTraining(const BackwardJob& job, const float* save_mean, const float* save_invstd,
                      int num_threads, std::span<std::byte> workspace) {
  const Scratch scratch = carve(job.shape, workspace);
  VisitBackward(job, [&]<typename T, bool kRelu, bool kDresidual>() {
    BackwardTrainingT<kRelu, kDresidual, T>(job, save_mean, save_invstd, num_threads, scratch);
  });
}

void BackwardInference(const BackwardJob& job, const float* running_mean,
                       const float* running_var, double eps, int num_threads,
                       std::span<std::byte> workspace) {
  const Scratch scratch = carve(job.shape, workspace);
  VisitBackward(job, [&]<typename T, bool kRelu, bool kDresidual>() {
    BackwardInferenceT<kRelu, kDresidual, T>(job, running_mean, running_var, eps, num_threads,
                                             scratch);
  });
}

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace normkit::cpu {

HWY_EXPORT(ForwardTraining);
HWY_EXPORT(ForwardInference);
HWY_EXPORT(BackwardTraining);
HWY_EXPORT(BackwardInference);

std::size_t workspace_size(const BatchNormShape& shape) { return bn::scratch_parts(shape).bytes; }

namespace {
bool empty(const BatchNormShape& sh) { return sh.batch * sh.channels * sh.spatial == 0; }
}  // namespace

void batch_norm_forward_training(const ForwardJob& job, float* save_mean, float* save_invstd,
                                 float* running_mean, float* running_var, double momentum,
                                 int num_threads, std::span<std::byte> workspace) {
  if (empty(job.shape)) return;
  HWY_DYNAMIC_DISPATCH(ForwardTraining)(job, save_mean, save_invstd, running_mean, running_var,
                                        momentum, num_threads, workspace);
}

void batch_norm_forward_inference(const ForwardJob& job, const float* running_mean,
                                  const float* running_var, int num_threads,
                                  std::span<std::byte> workspace) {
  if (empty(job.shape)) return;
  HWY_DYNAMIC_DISPATCH(ForwardInference)(job, running_mean, running_var, num_threads, workspace);
}

void batch_norm_backward_training(const BackwardJob& job, const float* save_mean,
                                  const float* save_invstd, int num_threads,
                                  std::span<std::byte> workspace) {
  if (empty(job.shape)) return;
  HWY_DYNAMIC_DISPATCH(BackwardTraining)(job, save_mean, save_invstd, num_threads, workspace);
}

void batch_norm_backward_inference(const BackwardJob& job, const float* running_mean,
                                   const float* running_var, double eps, int num_threads,
                                   std::span<std::byte> workspace) {
  if (empty(job.shape)) return;
  HWY_DYNAMIC_DISPATCH(BackwardInference)(job, running_mean, running_var, eps, num_threads,
                                          workspace);
}

}  // namespace normkit::cpu
#endif  // HWY_ONCE
