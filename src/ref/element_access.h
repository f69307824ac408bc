#pragma once
// Element access shared by the BatchNorm-family references (ref/batch_norm.cpp,
// ref/batch_renorm.cpp): positions in either memory format, optional per-channel vectors, and
// activations widened to double and rounded once on the way back.
#include <cstdint>

#include "common/dtype.h"
#include "plan/shapes.h"

namespace normkit::ref::access {

// Position of element (n, c, s) in either memory format.
inline int64_t offset(const plan::BatchNormShape& sh, int64_t n, int64_t c, int64_t s) {
  return sh.format == MemoryFormat::channels_first ? (n * sh.channels + c) * sh.spatial + s
                                                   : (n * sh.spatial + s) * sh.channels + c;
}

// v[i], or `absent` when the vector is not given.
template <typename T>
double at(const T* v, int64_t i, double absent) {
  return v ? static_cast<double>(v[i]) : absent;
}

// Activations in and out: exact widening to double; one rounding on the way back (16-bit types
// via float, whose extra rounding is far below theirs).
inline double load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline double load(const bf16* p, int64_t i) { return to_float(p[i]); }
inline double load(const f16* p, int64_t i) { return to_float(p[i]); }
inline void store(float* p, int64_t i, double v) { p[i] = static_cast<float>(v); }
inline void store(double* p, int64_t i, double v) { p[i] = v; }
inline void store(bf16* p, int64_t i, double v) { p[i] = from_float<bf16>(static_cast<float>(v)); }
inline void store(f16* p, int64_t i, double v) { p[i] = from_float<f16>(static_cast<float>(v)); }

}  // namespace normkit::ref::access
