#pragma once
// The activations of the fused epilogues (normkit/epilogue.h) in double, for every reference.
#include <cmath>

#include "normkit/epilogue.h"

namespace normkit::ref {

inline double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// act(z). relu keeps NaN (as torch): only values below zero become zero.
inline double activate(Activation a, double z) {
  if (a == Activation::relu) return z < 0 ? 0.0 : z;
  if (a == Activation::silu) return z * sigmoid(z);
  return z;
}

// silu'(z) = s + z * s * (1 - s) = s * (1 + z * (1 - s)), s = sigmoid(z).
inline double silu_derivative(double z) {
  const double s = sigmoid(z);
  return s * (1.0 + z * (1.0 - s));
}

}  // namespace normkit::ref
