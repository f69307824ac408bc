#pragma once
// Element types of activations and their scalar conversions to and from float32.
// Storage types are Highway's 16-bit structs so the same pointers feed the SIMD kernels
// (src/cpu/simd.h). Conversions round to nearest even, keep NaN a NaN (quiet) and Inf an Inf,
// and handle subnormals: the scalar reference and every SIMD target agree on them.
#include <bit>
#include <cstdint>
#include <cstring>

#include <hwy/base.h>

#include "normkit/tensor.h"

namespace normkit {

using bf16 = hwy::bfloat16_t;
using f16 = hwy::float16_t;

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return std::bit_cast<float>(uint32_t(v.bits) << 16); }
inline float to_float(f16 v) {
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
  return float(std::bit_cast<_Float16>(bits));
}

template <typename T> T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline bf16 from_float<bf16>(float v) {
  uint32_t b = std::bit_cast<uint32_t>(v);
  bf16 r;
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) {  // NaN: keep sign and payload top, force quiet
    r.bits = uint16_t((b >> 16) | 0x40);
    return r;
  }
  b += 0x7FFFu + ((b >> 16) & 1u);  // round to nearest even
  r.bits = uint16_t(b >> 16);
  return r;
}
template <> inline f16 from_float<f16>(float v) {
  const uint16_t bits = std::bit_cast<uint16_t>(_Float16(v));
  f16 r;
  std::memcpy(&r, &bits, 2);
  return r;
}

// Rounds v to type T and back (the value a T tensor would hold).
template <typename T> float round_to(float v) { return to_float(from_float<T>(v)); }

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::float32; }
template <> constexpr DType dtype_of<bf16>() { return DType::bfloat16; }
template <> constexpr DType dtype_of<f16>() { return DType::float16; }

// Calls f(T{}) with T the storage type of `dtype`.
template <typename F>
decltype(auto) visit_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::bfloat16: return f(bf16{});
    case DType::float16: return f(f16{});
    default: return f(float{});
  }
}

}  // namespace normkit
