#pragma once
// 2-D convolution over NHWC activations, no bias (every convolution feeds a norm layer), padding
// kernel/2, as im2col + GEMM (OpenBLAS's sgemm), one image at a time:
//   col[(oh, ow), (kh, kw, ci)] = x[n, oh*stride - pad + kh, ow*stride - pad + kw, ci] (0 outside)
//   y[n, (oh, ow), co] = sum_k col[., k] * weight[co, k]        weight: (C_out, kh, kw, C_in)
// Backward, per image: dweight += dy_n^T col, dcol = dy_n weight, dx_n = col2im(dcol) (added
// tap by tap in a fixed order).
// Per piece of an image (a few dozen output pixels), the col rows stay in cache between im2col
// and the GEMM; a whole batch's col would be 9x the activations in main memory. The batch is
// cut into min(N, 8) fixed slots of consecutive images; each slot accumulates its own dweight
// and the slots are added in order, so the result does not depend on the thread count.
#include <string>
#include <vector>

#include "nn/kernels.h"
#include "nn/param.h"
#include "nn/rng.h"
#include "nn/tensor.h"

namespace normkit::train {

class Conv2d {
 public:
  Conv2d(const std::string& name, int in_channels, int out_channels, int kernel, int stride);

  // He (Kaiming) normal init, fan_out mode: std = sqrt(2 / (C_out * kernel^2)).
  void init(Rng& rng);

  // Reads x (N, H, W, C_in), which must stay unchanged until backward. Returns y, owned here.
  const Tensor& forward(const Tensor& x);
  // Reads dy (shape of y) and add_to (optional, shape of x). Overwrites weight.grad. Returns
  // dx + add_to, owned here, when need_dx (else an empty tensor: the first layer needs no input
  // gradient).
  const Tensor& backward(const Tensor& dy, bool need_dx = true, const Tensor* add_to = nullptr);

  int in_channels() const { return in_; }
  int out_channels() const { return out_; }
  int64_t out_size(int64_t in_size) const { return (in_size + 2 * pad_ - kernel_) / stride_ + 1; }

  Param weight;

 private:
  // Rows [begin, end) of the col matrix of image n of x, written to col; or x's own rows for a
  // 1x1 stride-1 conv (col unused).
  const float* image_col(const Tensor& x, int64_t n, float* col, int64_t begin, int64_t end) const;
  // Output pixels per piece: an image is processed in pieces whose col rows stay in L1/L2.
  int64_t piece_rows() const;
  kernels::ConvGeometry geometry(const Tensor& x) const;
  // Per-thread scratch, grown once.
  struct Scratch {
    std::vector<float> col, dcol;
  };
  static constexpr int64_t kMaxSlots = 8;
  Scratch& scratch(int thread);

  int in_, out_, kernel_, stride_, pad_;
  int64_t k_;  // kernel * kernel * in_channels: the GEMM's inner dimension
  const Tensor* x_ = nullptr;
  std::vector<Scratch> scratch_;
  std::vector<std::vector<float>> slot_dweight_;  // slots 1..; slot 0 is weight.grad
  Tensor y_, dx_;
};

}  // namespace normkit::train
