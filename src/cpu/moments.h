#pragma once
// The statistics of the CPU ops' contiguous runs: a mergeable (count, mean, M2) triple and the
// per-chunk kernels that produce it. GroupNorm and InstanceNorm (channels-first groups) and
// LayerNorm (rows) compute their mean and variance here, and GroupNorm merges its channels-last
// column statistics with these Moments. BatchNorm's statistics, and the column sums of
// channels-last data, are shifted sums of the same kind (sum of x - pivot and of its square,
// the pivot near the mean) summed per channel by their own kernels: cpu/column_sums-inl.h for
// BatchNorm's columns, BatchNorm's run sums for its runs, cpu/group_norm.cpp's ColumnMoments
// for GroupNorm's columns.
//
// Why this shape:
// - Never E[x^2] - E[x]^2: that cancels catastrophically when |mean| >> std. Each chunk is
//   summed twice while it is in cache: first the shifted sum of (x - pivot) for the mean, then
//   the centred sums of d = x - mean and d^2, from which M2 = sum(d^2) - sum(d)^2 / n (the
//   corrected two-pass algorithm, which also removes the error of the float mean).
// - Within a chunk the sums are float32 in several independent SIMD accumulators (Highway,
//   dispatched at run time to the best target: no accumulator sees more than ~128 terms);
//   chunks are merged in double with Chan's formula.
// - x may be float32, bfloat16 or float16 (common/dtype.h); every sum is float32 or wider, so
//   float16 squares cannot overflow.
// - Chunk boundaries depend only on the shape, and merges happen in a fixed order, so a result
//   is bitwise identical whatever the number of threads that computed the chunks.
#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/dtype.h"
#include "cpu/parallel.h"

namespace normkit::cpu {

// The Highway target (HWY_AVX3, HWY_AVX2, ...) the kernels dispatch to now: the best the CPU
// supports, or the one a test forced with hwy::SetSupportedTargetsForTest.
int64_t simd_target();

// count, mean and M2 = sum((x - mean)^2) of a set of values.
struct Moments {
  double count = 0;
  double mean = 0;
  double m2 = 0;

  // Biased (population) variance; NaN for an empty set.
  double variance() const {
    return count > 0 ? m2 / count : std::numeric_limits<double>::quiet_NaN();
  }
  // Unbiased (sample) variance; NaN for fewer than two values.
  double unbiased_variance() const {
    return count > 1 ? m2 / (count - 1) : std::numeric_limits<double>::quiet_NaN();
  }
};

// Moments of the union of the two sets (Chan, Golub & LeVeque). Rounding depends on the order:
// callers merge in an order fixed by the shape.
inline Moments merge(const Moments& a, const Moments& b) {
  if (b.count == 0) return a;
  if (a.count == 0) return b;
  const double n = a.count + b.count;
  const double delta = b.mean - a.mean;
  const double wb = b.count / n;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.count * wb};
}

// A contiguous run is cut into pieces of kRunChunk floats starting at its first element; each
// piece is one in-cache chunk.
inline constexpr int64_t kRunChunk = 2048;

// Moments of x[0 .. n). Equal, bitwise, to merging left to right the run_moments of the pieces
// x[k * kRunChunk .. min(n, (k + 1) * kRunChunk)), so callers may compute the pieces on
// different threads and merge them in order. n == 0 gives count 0.
// T is float, bf16 or f16 (all three instantiated), as for the functions below.
template <typename T>
Moments run_moments(const T* x, int64_t n);

// out[0] = run_moments(a, n) and out[1] = run_moments(b, n), bitwise, computed side by side (the
// two runs' loads and dependent sums overlap).
template <typename T>
void run_pair_moments(const T* a, const T* b, int64_t n, Moments* out);

// Over the threads as parallel_for (cpu/parallel.h; `stream`: f writes with non-temporal
// stores), calls f(i, m) for each of `runs` contiguous runs of `length` values (run i at
// x + i * length), m being run_moments of run i, bitwise. Runs go two at a time through
// run_pair_moments when there are two per thread and both runs fit `cache_bytes` together, so
// that f's second read of a run still finds it in cache; except runs of kAloneMinLength values
// up to a chunk, which go one at a time (see below).
//
// Pairs overlap two runs' dependent sums and reductions: short runs are bound by those (FRN's
// 14x14 planes: 1.18x slower alone) and multi-chunk runs gain too, but LayerNorm's rows of
// 768-1024 values took 1.2-1.4x as long paired on the 2-core AMD EPYC of docs/benchmarks.md
// (normkit-bench, two threads, interleaved builds).
inline constexpr int64_t kAloneMinLength = 512;

template <typename T, class F>
void for_each_run_moments(const T* x, int64_t runs, int64_t length, int64_t cache_bytes,
                          int num_threads, bool parallel, bool stream, const F& f) {
  const bool alone = length >= kAloneMinLength && length < kRunChunk;
  const int64_t per = !alone && runs >= 2 * int64_t(std::max(num_threads, 1)) &&
                              2 * length * int64_t(sizeof(T)) <= cache_bytes
                          ? 2
                          : 1;
  parallel_for((runs + per - 1) / per, num_threads, parallel, stream, [&](int64_t unit) {
    const int64_t i0 = per * unit, count = std::min(per, runs - i0);
    Moments m[2];
    if (count == 2) run_pair_moments(x + i0 * length, x + (i0 + 1) * length, length, m);
    else m[0] = run_moments(x + i0 * length, length);
    for (int64_t j = 0; j < count; ++j) f(i0 + j, m[j]);
  });
}

// Number of kRunChunk pieces of a run of n floats (0 for n == 0).
inline int64_t run_piece_count(int64_t n) { return (n + kRunChunk - 1) / kRunChunk; }

// Rows of a channels-last block whose gradient sums accumulate in float (GroupNorm): about
// kRunChunk elements, between 16 and 128 rows. A function of the shape only.
inline int64_t block_rows(int64_t channels) {
  int64_t r = channels > 0 ? kRunChunk / channels : 128;
  return r < 16 ? 16 : (r > 128 ? 128 : r);
}

// Moments of `runs` contiguous runs of `length` floats (run i starts at x + i * length), using up
// to num_threads threads over (run, piece) units; out[i] == run_moments(x + i * length, length)
// bitwise, for any thread count. scratch: runs_moments_scratch_size(runs, length) Moments (the
// caller's op carves them from its own scratch).
template <typename T>
void runs_moments(const T* x, int64_t runs, int64_t length, Moments* out, int num_threads,
                  Moments* scratch);
inline int64_t runs_moments_scratch_size(int64_t runs, int64_t length) {
  const int64_t pieces = run_piece_count(length);
  return pieces > 1 ? runs * pieces : 0;
}

}  // namespace normkit::cpu
