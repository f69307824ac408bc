#pragma once
// The shapes every backend computes on, as the api hands them down after validation: src/ref and
// src/cpu both take these, neither borrows the other's. Each describes x as (N, C, S), S the
// product of the spatial dims, stored channels_first (index (n*C + c)*S + s) or channels_last
// (index (n*S + s)*C + c); LayerNorm's as rows of columns.
#include <cstdint>

#include "normkit/tensor.h"

namespace normkit::plan {

struct BatchNormShape {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 1;   // S
  MemoryFormat format = MemoryFormat::channels_first;
};

// Group g of sample n holds channels g*C/G .. (g+1)*C/G - 1; its statistics live at n*G + g.
// InstanceNorm is G = C.
struct GroupNormShape {
  int64_t batch = 0;     // N
  int64_t channels = 0;  // C
  int64_t spatial = 1;   // S
  int64_t groups = 1;    // G, divides C
  MemoryFormat format = MemoryFormat::channels_first;
};

// `rows` rows of `cols` elements, row i at x + i * cols, each normalized over its elements. A row
// is stored in logical order when channels == 0; with channels > 0 it is stored channels-last:
// the logical (c, s) element, c < channels, s < cols / channels, sits at s * channels + c.
struct LayerNormShape {
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t channels = 0;  // 0: rows in logical order; > 0: rows stored channels-last
};

// Logical (weight) index of the element stored at position j of a row.
inline int64_t layer_norm_logical_index(const LayerNormShape& t, int64_t j) {
  if (t.channels <= 0) return j;
  const int64_t spatial = t.cols / t.channels;
  return (j % t.channels) * spatial + j / t.channels;
}

}  // namespace normkit::plan
