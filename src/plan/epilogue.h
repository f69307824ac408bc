#pragma once
// The fused epilogues of normkit/epilogue.h as the kernels take them: typed pointers into
// validated tensors of the activation type T. One pair for every op and backend.
//   forward:  y = relu?(normalized + residual?)
//   backward: g = relu ? dy * (y > 0) : dy; dresidual (when wanted) = g; dx from g
#include "normkit/epilogue.h"

namespace normkit::plan {

template <typename T>
struct ForwardEpilogueOf {
  bool relu = false;
  const T* residual = nullptr;  // null: no residual; else shaped like x

  static ForwardEpilogueOf from(const ForwardEpilogue& e) {
    return {e.relu, e.residual.template as<const T>()};
  }
};

template <typename T>
struct BackwardEpilogueOf {
  bool relu = false;
  const T* y = nullptr;    // the forward's output, read only with relu
  T* dresidual = nullptr;  // null: not wanted

  static BackwardEpilogueOf from(const BackwardEpilogue& e) {
    return {e.relu, e.relu ? e.y.template as<const T>() : nullptr, e.dresidual.template as<T>()};
  }
};

}  // namespace normkit::plan
