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
// Compilers without _Float16 on this target (clang before 15 on x86) convert in software,
// with the same results: exact widening, round to nearest even, NaN kept and made quiet.
#if defined(__FLT16_MANT_DIG__)
#define NORMKIT_HAS_FLOAT16 1
#else
#define NORMKIT_HAS_FLOAT16 0
#endif

inline float to_float(f16 v) {
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
#if NORMKIT_HAS_FLOAT16
  return float(std::bit_cast<_Float16>(bits));
#else
  const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1Fu;
  const uint32_t mantissa = bits & 0x3FFu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(std::bit_cast<uint32_t>(magnitude) | sign);
  }
  if (exponent == 0x1F) {  // Inf, or NaN made quiet
    return std::bit_cast<float>(sign | 0x7F800000u | (mantissa << 13) |
                                (mantissa != 0 ? 0x400000u : 0u));
  }
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
#endif
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
#if NORMKIT_HAS_FLOAT16
  const uint16_t bits = std::bit_cast<uint16_t>(_Float16(v));
#else
  const uint32_t b = std::bit_cast<uint32_t>(v);
  const uint32_t magnitude = b & 0x7FFFFFFFu;
  uint16_t bits = uint16_t((b >> 16) & 0x8000u);
  if (magnitude > 0x7F800000u) {  // NaN: keep the payload's top, force quiet
    bits |= uint16_t(0x7E00u | ((magnitude >> 13) & 0x3FFu));
  } else if (magnitude >= 0x477FF000u) {  // from 65520 (halfway past 65504, the largest) up
    bits |= 0x7C00u;
  } else if (magnitude < 0x38800000u) {  // below 2^-14: subnormal; x * 2^24 is exact
    const float scaled = std::bit_cast<float>(magnitude) * 0x1p24f;
    float whole = float(uint32_t(scaled));  // truncation, then to nearest even by hand
    const float rest = scaled - whole;
    if (rest > 0.5f || (rest == 0.5f && (uint32_t(whole) & 1u))) whole += 1.0f;
    bits |= uint16_t(whole);  // 1024 is the smallest normal, correctly encoded
  } else {
    const uint32_t mantissa = magnitude & 0x7FFFFFu;
    uint32_t half = (((magnitude >> 23) - 112) << 10) | (mantissa >> 13);
    const uint32_t rest = mantissa & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // carries into the exponent
    bits |= uint16_t(half);
  }
#endif
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
