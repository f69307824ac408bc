#pragma once
// How the backward leaf loops of every op make the gradient g their normalization sees from dy,
// through the forward's fused epilogue (normkit/epilogue.h). The pointers lie at the same offset
// as dy's; the op's loops recompute silu's z with the coefficients of its own forward.
#include <cstdint>

namespace normkit::cpu {

template <typename T>
struct Upstream {
  const T* mask = nullptr;      // relu: the forward's y; g = mask > 0 ? dy : 0
  bool silu = false;            // silu: g = dy * silu'(z), z = normalized + residual?
  const T* residual = nullptr;  // silu: the forward's residual (null: none)

  Upstream at(int64_t i) const {
    return {mask ? mask + i : nullptr, silu, residual ? residual + i : nullptr};
  }
};

}  // namespace normkit::cpu
