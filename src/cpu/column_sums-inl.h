// The column-sums kernels of the CPU ops: two sums per column of a block of rows, vectorized
// across columns (and three, for FRN's and EvoNorm-S0's gradient sums). BatchNorm's per-channel
// statistics and gradient sums over rows (channels-last data, or channels-first data with short
// planes) run it; they differ only in the per-element terms and in where a column's float sums
// go.
//
// Include after cpu/simd.h from a .cpp compiled per target by Highway's foreach_target (this
// header has per-target include guards).
#if defined(NORMKIT_CPU_COLUMN_SUMS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef NORMKIT_CPU_COLUMN_SUMS_INL_H_
#undef NORMKIT_CPU_COLUMN_SUMS_INL_H_
#else
#define NORMKIT_CPU_COLUMN_SUMS_INL_H_
#endif

#include <hwy/highway.h>

#include <cstdint>

#include "cpu/simd.h"

HWY_BEFORE_NAMESPACE();
namespace normkit::cpu::HWY_NAMESPACE {

// The terms of the statistics: s1 += x - center, s2 += (x - center)^2, with center a pivot near
// the column's mean (so the float terms are at the scale of the spread, not of the offset).
// Terms types take (d, x, dy, mask, center, s1, s2, za, zb) (za, zb: per-column coefficients
// some gradient terms read); these ignore dy, mask, za and zb.
struct ShiftedTerms {
  template <class D, typename T>
  HWY_INLINE static void Step(D d, const T* HWY_RESTRICT x, const T*, const T*,
                              hn::Vec<D> center, hn::Vec<D>& s1, hn::Vec<D>& s2, hn::Vec<D>,
                              hn::Vec<D>) {
    const auto v = hn::Sub(LoadF(d, x), center);
    s1 = hn::Add(s1, v);
    s2 = hn::MulAdd(v, v, s2);
  }
};

// Over `rows` rows (row k at offset k * stride from x, dy and mask; dy and mask may be null when
// Terms does not read them) of `width` columns, each column j's two sums in float, started at
// zero and added with Terms::Step in row order, centers[j] its center; then
// out(d, j, s1, s2) with the sums of the Lanes(d) columns from j. Columns go four vectors at a
// time (each row's piece is 4 * Lanes contiguous values, which the hardware prefetchers follow
// better than one vector per row), then one vector, then one lane: a column's arithmetic is the
// same in every lane and in the tail. The float sums see `rows` terms: keep it small.
// za, zb (null: zeros) are per-column coefficients handed to the terms, like centers.
template <class Terms, typename T, class Out>
HWY_INLINE void ColumnSums(const T* HWY_RESTRICT x, const T* HWY_RESTRICT dy,
                           const T* HWY_RESTRICT mask, int64_t rows, int64_t width,
                           int64_t stride, const float* HWY_RESTRICT centers, const Out& out,
                           const float* HWY_RESTRICT za = nullptr,
                           const float* HWY_RESTRICT zb = nullptr) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  const auto at = [](const T* p, int64_t o) -> const T* { return p ? p + o : nullptr; };
  const auto load = [](auto dd, const float* p, int64_t j) {
    return p ? hn::LoadU(dd, p + j) : hn::Zero(dd);
  };
  auto columns = [&](auto dd, int64_t j0) {
    const auto vc = hn::LoadU(dd, centers + j0);
    const auto va = load(dd, za, j0), vb = load(dd, zb, j0);
    auto a = hn::Zero(dd), b = hn::Zero(dd);
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t o = k * stride + j0;
      Terms::Step(dd, x + o, at(dy, o), at(mask, o), vc, a, b, va, vb);
    }
    out(dd, j0, a, b);
  };
  int64_t j = 0;
  for (; j + 4 * N <= width; j += 4 * N) {
    const auto c0 = hn::LoadU(d, centers + j), c1 = hn::LoadU(d, centers + j + N);
    const auto c2 = hn::LoadU(d, centers + j + 2 * N), c3 = hn::LoadU(d, centers + j + 3 * N);
    const auto za0 = load(d, za, j), za1 = load(d, za, j + N), za2 = load(d, za, j + 2 * N),
               za3 = load(d, za, j + 3 * N);
    const auto zb0 = load(d, zb, j), zb1 = load(d, zb, j + N), zb2 = load(d, zb, j + 2 * N),
               zb3 = load(d, zb, j + 3 * N);
    auto a0 = hn::Zero(d), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t o = k * stride + j;
      Terms::Step(d, x + o, at(dy, o), at(mask, o), c0, a0, b0, za0, zb0);
      Terms::Step(d, x + o + N, at(dy, o + N), at(mask, o + N), c1, a1, b1, za1, zb1);
      Terms::Step(d, x + o + 2 * N, at(dy, o + 2 * N), at(mask, o + 2 * N), c2, a2, b2, za2,
                  zb2);
      Terms::Step(d, x + o + 3 * N, at(dy, o + 3 * N), at(mask, o + 3 * N), c3, a3, b3, za3,
                  zb3);
    }
    out(d, j, a0, b0);
    out(d, j + N, a1, b1);
    out(d, j + 2 * N, a2, b2);
    out(d, j + 3 * N, a3, b3);
  }
  for (; j + N <= width; j += N) columns(d, j);
  for (; j < width; ++j) columns(d1, j);
}

// Three sums per column of `width` columns over `rows` rows (row r at offset r * stride), for
// the gradient sums of FRN and EvoNorm-S0 over channels-last data: per block of `block_rows`
// rows, each column's float sums start at zero and are added in row order, then added in double
// to sums[k * width + j] (k < 3). make_step(dd, j) loads column j's coefficients and returns
// step(o, s0, s1, s2), which adds the terms of the element at offset o. Columns go one vector,
// then one lane, at a time: a column's arithmetic is the same in every lane and in the tail.
template <class MakeStep>
HWY_INLINE void ThreeColumnSums(int64_t rows, int64_t width, int64_t stride, int64_t block_rows,
                                double* HWY_RESTRICT sums, const MakeStep& make_step) {
  const DF d;
  const D1 d1;
  const int64_t N = int64_t(hn::Lanes(d));
  auto columns = [&](auto dd, int64_t j, int64_t r0, int64_t block) {
    const auto step = make_step(dd, j);
    auto s0 = hn::Zero(dd), s1 = s0, s2 = s0;
    for (int64_t r = r0; r < r0 + block; ++r) step(r * stride + j, s0, s1, s2);
    HWY_ALIGN float buf[3][hn::MaxLanes(DF())];
    hn::StoreU(s0, dd, buf[0]);
    hn::StoreU(s1, dd, buf[1]);
    hn::StoreU(s2, dd, buf[2]);
    for (int k = 0; k < 3; ++k)
      for (size_t l = 0; l < hn::Lanes(dd); ++l)
        sums[k * width + j + int64_t(l)] += double(buf[k][l]);
  };
  for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
    const int64_t block = rows - r0 < block_rows ? rows - r0 : block_rows;
    int64_t j = 0;
    for (; j + N <= width; j += N) columns(d, j, r0, block);
    for (; j < width; ++j) columns(d1, j, r0, block);
  }
}

}  // namespace normkit::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
