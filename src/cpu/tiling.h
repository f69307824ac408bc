#pragma once
// How contiguous rows are cut into work units: the one tiling of the channels-first GroupNorm
// and InstanceNorm planes and of LayerNorm's rows. A function of the shape only, like every
// split of the CPU kernels: pieces start at multiples of kRunChunk (cpu/moments.h), so a piece's
// partial statistics are the same whichever thread computes them.
#include <algorithm>
#include <cstdint>

#include "cpu/moments.h"

namespace normkit::cpu {

// Whether a call over `elements` values wakes its threads: smaller ones are not worth it.
inline bool runs_in_parallel(int64_t elements, int num_threads) {
  constexpr int64_t kParallelMin = 8192;
  return num_threads > 1 && elements >= kParallelMin;
}

// `rows` contiguous rows of `len` elements, cut into kRunChunk pieces. A unit is one piece of a
// long row, or several whole short rows.
struct RowPieces {
  int64_t rows, len, pieces, stride, rows_per_unit, units;
  RowPieces(int64_t rows_, int64_t len_) : rows(rows_), len(len_) {
    pieces = run_piece_count(len);
    stride = std::max<int64_t>(pieces, 1);
    rows_per_unit = pieces > 1 ? 1 : std::max<int64_t>(1, kRunChunk / std::max<int64_t>(len, 1));
    units = pieces > 1 ? rows * pieces : (rows + rows_per_unit - 1) / rows_per_unit;
  }
  // f(row, piece, begin, end) for each piece in unit u.
  template <typename F>
  void for_unit(int64_t u, F&& f) const {
    if (pieces > 1) {
      const int64_t row = u / pieces, k = u % pieces, lo = k * kRunChunk;
      f(row, k, lo, std::min(len, lo + kRunChunk));
      return;
    }
    const int64_t end = std::min(rows, (u + 1) * rows_per_unit);
    for (int64_t row = u * rows_per_unit; row < end; ++row) f(row, int64_t(0), int64_t(0), len);
  }
};

}  // namespace normkit::cpu
