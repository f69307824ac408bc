#pragma once
// Activation storage for the training engine: an owning NHWC float buffer.
//
// Every activation in the engine is channels-last (N, H, W, C): a 3x3 convolution over a whole
// batch is then one im2col plus one GEMM, and normkit's kernels take the same bytes as a
// channels_last TensorView. Buffers only grow: resize() to a smaller batch keeps the capacity, so a
// training step after the first allocates nothing.
#include <cstdint>
#include <vector>

#include "normkit/tensor.h"

namespace normkit::train {

struct Tensor {
  int64_t n = 0, h = 0, w = 0, c = 0;
  std::vector<float> data;

  void resize(int64_t batch, int64_t height, int64_t width, int64_t channels) {
    n = batch;
    h = height;
    w = width;
    c = channels;
    data.resize(static_cast<size_t>(n * h * w * c));
  }
  template <typename T> void resize_like(const T& o) { resize(o.n, o.h, o.w, o.c); }
  int64_t numel() const { return n * h * w * c; }
  int64_t pixels() const { return n * h * w; }  // rows of the (N*H*W, C) matrix
  float* ptr() { return data.data(); }
  const float* ptr() const { return data.data(); }
  bool same_shape(const Tensor& o) const { return n == o.n && h == o.h && w == o.w && c == o.c; }

  // The same bytes as normkit sees them: logical (N, C, H, W), channels_last.
  TensorView view() const {
    return TensorView(data.data(), {n, c, h, w}, MemoryFormat::channels_last);
  }
};

}  // namespace normkit::train
