#pragma once
// 2-D convolution over NHWC activations, no bias (every convolution feeds a norm layer), padding
// kernel/2, as im2col + GEMM (OpenBLAS's sgemm), one image at a time:
//   col[(oh, ow), (kh, kw, ci)] = x[n, oh*stride - pad + kh, ow*stride - pad + kw, ci] (0 outside)
//   y[n, (oh, ow), co] = sum_k col[., k] * weight[co, k]        weight: (C_out, kh, kw, C_in)
// Backward, per image: dweight += dy_n^T col, dcol = dy_n weight, dx_n = col2im(dcol) (added
// tap by tap in a fixed order).
// A stride-1 convolution with kernel > 1 and at least kMinShiftedChannels input channels takes
// another route with the same GEMM: on the zero-padded image each kernel tap is a matrix of
// consecutive pixels, so forward, dweight and dx are kernel^2 GEMMs each over the padded image
// itself (see conv.cpp), and neither im2col nor col2im runs. The padded images of the batch are
// kept from forward to backward.
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

  // On: Weight Standardization (Qiao et al. 2019, normkit/weight_standardization.h, eps 1e-5):
  // forward convolves with each output channel's weights standardized over the rest, and
  // backward runs through WS's backward, so weight (the raw values) stays the parameter and
  // weight.grad its gradient.
  void set_standardize(bool on) { standardize_ = on; }
  bool standardize() const { return standardize_; }
  // The weights the convolution applies: the standardized ones of the last forward, or weight.
  const float* used_weight() const {
    return standardize_ ? ws_weight_.data() : weight.value.data();
  }

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
  // The tap-by-tap route (stride 1). Below 4 input channels one im2col GEMM beats kernel^2
  // GEMMs of inner dimension C_in (the first layer, on 1 channel).
  static constexpr int kMinShiftedChannels = 4;
  bool shifted() const { return stride_ == 1 && kernel_ > 1 && in_ >= kMinShiftedChannels; }
  void forward_shifted(const Tensor& x, int threads);
  void backward_shifted(const Tensor& dy, bool need_dx, const Tensor* add_to, int64_t slots,
                        int threads);
  // Floats of an (h, w, c) image padded by pad_ on every side, plus slack (kernels::pad_image).
  int64_t padded_floats(int64_t h, int64_t w, int64_t c) const;
  // Where tap (kh, kw) = (tap / kernel, tap % kernel) starts, in pixels, in a padded image of
  // rows wp wide.
  int64_t tap_shift(int64_t tap, int64_t wp) const { return tap / kernel_ * wp + tap % kernel_; }
  // The weight-gradient accumulator of batch slot `slot` (slot 0: weight.grad itself), zeroed
  // when the slot holds no image (its partial is still added).
  float* slot_dweight(int64_t slot, bool empty);
  void add_slot_dweights(int64_t slots);
  // Per-thread scratch, grown once.
  struct Scratch {
    std::vector<float> col, dcol;
    std::vector<float> grid, dy_pad;  // the tap-by-tap route's output grid and padded dy
  };
  static constexpr int64_t kMaxSlots = 8;
  Scratch& scratch(int thread);
  // The backward's loop over batch slots: images [begin, end) of `images` for each of `slots`
  // slots, on `threads` threads, calling body(scratch, begin, end, dw) with the thread's scratch
  // and the slot's weight-gradient accumulator.
  template <class Body>
  void for_each_slot(int64_t images, int64_t slots, int threads, const Body& body);

  void standardize_backward();
  static constexpr double kWsEps = 1e-5;
  bool standardize_ = false;
  std::vector<float> ws_weight_, ws_mean_, ws_rstd_, ws_dweight_;

  int in_, out_, kernel_, stride_, pad_;
  int64_t k_;  // kernel * kernel * in_channels: the GEMM's inner dimension
  const Tensor* x_ = nullptr;
  std::vector<Scratch> scratch_;
  std::vector<std::vector<float>> slot_dweight_;  // slots 1..; slot 0 is weight.grad
  std::vector<float> x_pad_;     // the tap-by-tap route: forward's padded images, for backward
  std::vector<float> weight_t_;  // forward's weight, transposed
  Tensor y_, dx_;
};

}  // namespace normkit::train
