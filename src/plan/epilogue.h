#pragma once
// The fused epilogues of normkit/epilogue.h as the kernels take them: typed pointers into
// validated tensors of the activation type T. One pair for every op and backend.
//   forward:  y = act(normalized + residual?), act none, relu or silu
//   backward: g = dy * act'(z); dresidual (when wanted) = g; dx from g. relu reads the
//             forward's y; silu recomputes z = normalized + residual? from x, the statistics,
//             weight, bias and residual.
#include "normkit/epilogue.h"

namespace normkit::plan {

template <typename T>
struct ForwardEpilogueOf {
  Activation activation = Activation::none;
  const T* residual = nullptr;  // null: no residual; else shaped like x

  static ForwardEpilogueOf from(const ForwardEpilogue& e) {
    return {e.activation, e.residual.template as<const T>()};
  }
};

template <typename T>
struct BackwardEpilogueOf {
  Activation activation = Activation::none;
  const T* y = nullptr;         // the forward's output, read only with relu
  const T* residual = nullptr;  // the forward's residual, read only with silu (null: none)
  const float* bias = nullptr;  // the forward's bias, read only with silu (null: none)
  T* dresidual = nullptr;       // null: not wanted

  bool relu() const { return activation == Activation::relu; }
  bool silu() const { return activation == Activation::silu; }

  static BackwardEpilogueOf from(const BackwardEpilogue& e) {
    const bool relu = e.activation == Activation::relu, silu = e.activation == Activation::silu;
    return {e.activation, relu ? e.y.template as<const T>() : nullptr,
            silu ? e.residual.template as<const T>() : nullptr,
            silu && !e.bias.empty() ? e.bias.data() : nullptr, e.dresidual.template as<T>()};
  }
};

}  // namespace normkit::plan
