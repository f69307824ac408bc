#pragma once
// 2-D convolution over NHWC activations, no bias (every convolution feeds a norm layer), padding
// kernel/2, as im2col + one GEMM over the whole batch:
//   col[(n, oh, ow), (kh, kw, ci)] = x[n, oh*stride - pad + kh, ow*stride - pad + kw, ci] (0 outside)
//   y[(n, oh, ow), co] = sum_k col[., k] * weight[co, k]        weight: (C_out, kh, kw, C_in)
// Backward: dweight = dy^T col, dcol = dy weight, dx = col2im(dcol) (a gather, so each dx element
// is summed in a fixed order by one thread).
#include <string>

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
  // Reads dy (shape of y). Overwrites weight.grad. Returns dx, owned here, when need_dx (else
  // an empty tensor: the first layer needs no input gradient).
  const Tensor& backward(const Tensor& dy, bool need_dx = true);

  int in_channels() const { return in_; }
  int out_channels() const { return out_; }
  int64_t out_size(int64_t in_size) const { return (in_size + 2 * pad_ - kernel_) / stride_ + 1; }

  Param weight;

 private:
  int in_, out_, kernel_, stride_, pad_;
  int64_t k_;  // kernel * kernel * in_channels: the GEMM's inner dimension
  const Tensor* x_ = nullptr;
  const float* col_ptr_ = nullptr;  // col_ or x itself for a 1x1 stride-1 conv
  std::vector<float> col_, dcol_;
  Tensor y_, dx_;
};

}  // namespace normkit::train
