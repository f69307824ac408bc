#include "nn/conv.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "nn/kernels.h"
#include "nn/parallel.h"
#include "nn/profile.h"
#include "normkit/error.h"
#include "normkit/weight_standardization.h"

namespace normkit::train {

Conv2d::Conv2d(const std::string& name, int in_channels, int out_channels, int kernel, int stride)
    : weight(name + ".weight", static_cast<size_t>(std::max(0, out_channels)) *
                                   std::max(0, kernel) * std::max(0, kernel) *
                                   std::max(0, in_channels)),
      in_(in_channels), out_(out_channels), kernel_(kernel), stride_(stride), pad_(kernel / 2),
      k_(static_cast<int64_t>(kernel) * kernel * in_channels) {
  if (in_channels < 1 || out_channels < 1 || kernel < 1 || kernel % 2 == 0 || stride < 1)
    throw Error("Conv2d " + name + ": bad geometry in=" + std::to_string(in_channels) +
                " out=" + std::to_string(out_channels) + " kernel=" + std::to_string(kernel) +
                " stride=" + std::to_string(stride));
}

void Conv2d::init(Rng& rng) {
  const double std_dev = std::sqrt(2.0 / (static_cast<double>(out_) * kernel_ * kernel_));
  for (float& w : weight.value) w = static_cast<float>(std_dev * rng.normal());
}

Conv2d::Scratch& Conv2d::scratch(int thread) { return scratch_[static_cast<size_t>(thread)]; }

kernels::ConvGeometry Conv2d::geometry(const Tensor& x) const {
  return {x.h, x.w, in_, out_size(x.h), out_size(x.w), kernel_, stride_, pad_};
}

int64_t Conv2d::piece_rows() const {
  constexpr int64_t kPieceFloats = 32 * 1024;  // 128 KB of col rows: well inside L2
  return std::max<int64_t>(8, kPieceFloats / k_);
}

const float* Conv2d::image_col(const Tensor& x, int64_t n, float* col, int64_t begin,
                               int64_t end) const {
  const float* image = x.ptr() + n * x.h * x.w * in_;
  if (kernel_ == 1 && stride_ == 1) return image + begin * in_;
  kernels::im2col(geometry(x), image, col, begin, end);
  return col;
}

const Tensor& Conv2d::forward(const Tensor& x) {
  if (x.c != in_)
    throw Error("Conv2d " + weight.name + ": input has " + std::to_string(x.c) +
                " channels, expected " + std::to_string(in_));
  const profile::Scope timed(profile::Phase::conv_forward);
  x_ = &x;
  const int64_t oh = out_size(x.h), ow = out_size(x.w), rows = oh * ow;
  const int64_t piece = std::min(rows, piece_rows());
  y_.resize(x.n, oh, ow, out_);
  const int t = static_cast<int>(std::min<int64_t>(threads(), std::max<int64_t>(x.n, 1)));
  if (scratch_.size() < static_cast<size_t>(threads())) scratch_.resize(threads());
  // weight_t = weight^T, (kh, kw, C_in) x C_out: OpenBLAS's sgemm runs these shapes about 1.5x
  // faster with B untransposed.
  {
    const profile::Scope timed_transpose(profile::Phase::conv_other);
    if (standardize_) {
      // Each output channel's row of k_ values standardized (its order does not matter).
      ws_weight_.resize(weight.size());
      ws_mean_.resize(static_cast<size_t>(out_));
      ws_rstd_.resize(static_cast<size_t>(out_));
      weight_standardization_forward(TensorView(weight.value.data(), {out_, k_}), kWsEps,
                                     TensorView(ws_weight_.data(), {out_, k_}), ws_mean_,
                                     ws_rstd_);
    }
    const float* w = used_weight();
    weight_t_.resize(weight.size());
    for (int64_t co = 0; co < out_; ++co)
      for (int64_t k = 0; k < k_; ++k) weight_t_[k * out_ + co] = w[co * k_ + k];
  }
  if (shifted()) {
    forward_shifted(x, t);
    return y_;
  }
  for (int i = 0; i < t; ++i) scratch(i).col.resize(static_cast<size_t>(piece * k_));
#pragma omp parallel num_threads(t)
  {
    const int id = omp_get_thread_num();
    float* col = scratch(id).col.data();
    for (int64_t n = x.n * id / t; n < x.n * (id + 1) / t; ++n)
      for (int64_t p = 0; p < rows; p += piece) {
        const int64_t m = std::min(piece, rows - p);
        const float* a;
        {
          const profile::Scope timed(profile::Phase::im2col);
          a = image_col(x, n, col, p, p + m);
        }
        const profile::Scope timed(profile::Phase::gemm_forward);
        gemm_serial(false, false, m, out_, k_, a, k_, weight_t_.data(), out_, 0.0f,
                    y_.ptr() + (n * rows + p) * out_, out_);
      }
  }
  return y_;
}

template <class Body>
void Conv2d::for_each_slot(int64_t images, int64_t slots, int threads, const Body& body) {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t slot = 0; slot < slots; ++slot) {
    const int64_t begin = images * slot / slots, end = images * (slot + 1) / slots;
    body(scratch(omp_get_thread_num()), begin, end, slot_dweight(slot, begin == end));
  }
}

const Tensor& Conv2d::backward(const Tensor& dy, bool need_dx, const Tensor* add_to) {
  const profile::Scope timed(profile::Phase::conv_backward);
  const Tensor& x = *x_;
  if (!dy.same_shape(y_))
    throw Error("Conv2d " + weight.name + ": backward dy shape does not match the forward output");
  if (add_to && !add_to->same_shape(x))
    throw Error("Conv2d " + weight.name + ": backward add_to shape does not match the input");
  const int64_t rows = y_.h * y_.w, image = x.h * x.w * in_;
  const int64_t piece = std::min(rows, piece_rows());
  const int64_t slots = std::max<int64_t>(1, std::min(x.n, kMaxSlots));
  const int t = static_cast<int>(std::min<int64_t>(threads(), slots));
  if (scratch_.size() < static_cast<size_t>(t)) scratch_.resize(t);
  if (slot_dweight_.size() < static_cast<size_t>(slots - 1)) slot_dweight_.resize(slots - 1);
  for (int64_t i = 0; i + 1 < slots; ++i) slot_dweight_[i].resize(weight.size());
  if (need_dx) dx_.resize_like(x);
  else dx_.resize(0, 0, 0, 0);
  if (shifted()) {
    backward_shifted(dy, need_dx, add_to, slots, t);
    add_slot_dweights(slots);
    standardize_backward();
    return dx_;
  }
  for (int i = 0; i < t; ++i) {
    scratch(i).col.resize(static_cast<size_t>(piece * k_));
    scratch(i).dcol.resize(static_cast<size_t>(piece * k_));
  }
  const bool direct = kernel_ == 1 && stride_ == 1;
  const kernels::ConvGeometry geo = geometry(x);
  for_each_slot(x.n, slots, t, [&](Scratch& s, int64_t begin, int64_t end, float* dw) {
    for (int64_t n = begin; n < end; ++n) {
      float* dxn = need_dx ? dx_.ptr() + n * image : nullptr;
      if (need_dx) {
        const profile::Scope timed(profile::Phase::conv_other);
        kernels::copy_or_zero(dxn, add_to ? add_to->ptr() + n * image : nullptr, image);
      }
      for (int64_t p = 0; p < rows; p += piece) {
        const int64_t m = std::min(piece, rows - p);
        const float* g = dy.ptr() + (n * rows + p) * out_;
        const float* a;
        {
          const profile::Scope timed(profile::Phase::im2col);
          a = image_col(x, n, s.col.data(), p, p + m);
        }
        {
          const profile::Scope timed(profile::Phase::gemm_dweight);
          gemm_serial(true, false, out_, k_, m, g, out_, a, k_, n == begin && p == 0 ? 0.0f : 1.0f,
                      dw, k_);
        }
        if (!need_dx) continue;
        if (direct) {  // dx rows are the col rows: accumulate straight into them
          const profile::Scope timed(profile::Phase::gemm_dx);
          gemm_serial(false, false, m, k_, out_, g, out_, used_weight(), k_, 1.0f,
                      dxn + p * k_, k_);
        } else {
          {
            const profile::Scope timed(profile::Phase::gemm_dx);
            gemm_serial(false, false, m, k_, out_, g, out_, used_weight(), k_, 0.0f,
                        s.dcol.data(), k_);
          }
          const profile::Scope timed(profile::Phase::col2im);
          kernels::col2im_add(geo, s.dcol.data(), dxn, p, p + m);
        }
      }
    }
  });
  add_slot_dweights(slots);
  standardize_backward();
  return dx_;
}

void Conv2d::standardize_backward() {
  if (!standardize_) return;
  // weight.grad holds the gradient of the standardized weight; through WS's backward to the
  // raw one.
  const profile::Scope timed(profile::Phase::conv_other);
  ws_dweight_ = weight.grad;
  weight_standardization_backward(TensorView(ws_dweight_.data(), {out_, k_}),
                                  TensorView(weight.value.data(), {out_, k_}), ws_mean_, ws_rstd_,
                                  TensorView(weight.grad.data(), {out_, k_}));
}

float* Conv2d::slot_dweight(int64_t slot, bool empty) {
  float* dw = slot == 0 ? weight.grad.data() : slot_dweight_[slot - 1].data();
  if (empty) std::fill(dw, dw + weight.size(), 0.0f);
  return dw;
}

void Conv2d::add_slot_dweights(int64_t slots) {
  // The slots' partial weight gradients, added in slot order.
  const profile::Scope timed(profile::Phase::conv_other);
  float* dw = weight.grad.data();
  for (int64_t i = 0; i + 1 < slots; ++i) {
    const float* p = slot_dweight_[i].data();
    for (size_t j = 0; j < weight.size(); ++j) dw[j] += p[j];
  }
}

// ---- stride 1: the kernel's taps as shifted views of the zero-padded image ----
//
// With x zero-padded by pad pixels into rows of wp = w + 2 pad pixels, output pixel (i, j)'s tap
// (kh, kw) reads padded pixel (i + kh) * wp + (j + kw) = r + kh * wp + kw, r = i * wp + j. Over
// the grid of h * wp rows r (the columns j >= w are scratch, thrown away), each tap is therefore
// a plain (h * wp) x C_in matrix of consecutive padded pixels, and
//   y_grid = sum over taps of x_pad[r + shift(kh, kw)] weight_t[tap]       (C_in x C_out)
// is a sum of kernel^2 GEMMs reading x where it lies, without im2col. Backward the same way:
//   dweight[:, tap, :] = sum over images of dy_grid^T x_pad[r + shift(kh, kw)]
//       (dy_grid: dy padded like x, read from (pad, pad) on; its scratch columns fall on the
//       zero padding, so they add nothing)
//   dx_grid = sum over taps of dy_pad[r + shift(K-1-kh, K-1-kw)] weight[:, tap, :]
//       (the transposed convolution: dx(i, j) = sum dy(i + pad - kh, j + pad - kw) weight[kh, kw])
// Taps are summed in order, images in order within a slot: the same bits for any thread count.

int64_t Conv2d::padded_floats(int64_t h, int64_t w, int64_t c) const {
  return ((h + 2 * pad_) * (w + 2 * pad_) + 2 * pad_) * c;
}

void Conv2d::forward_shifted(const Tensor& x, int t) {
  const int64_t wp = x.w + 2 * pad_, grid = x.h * wp, rows = x.h * x.w;
  const int64_t padded = padded_floats(x.h, x.w, in_), taps = int64_t{kernel_} * kernel_;
  // The padded images stay for backward's weight gradient.
  x_pad_.resize(static_cast<size_t>(x.n * padded));
  for (int i = 0; i < t; ++i) scratch(i).grid.resize(static_cast<size_t>(grid * out_));
#pragma omp parallel num_threads(t)
  {
    const int id = omp_get_thread_num();
    float* y_grid = scratch(id).grid.data();
    for (int64_t n = x.n * id / t; n < x.n * (id + 1) / t; ++n) {
      float* xp = x_pad_.data() + n * padded;
      {
        const profile::Scope timed(profile::Phase::im2col);
        kernels::pad_image(x.ptr() + n * rows * in_, x.h, x.w, in_, pad_, xp);
      }
      {
        const profile::Scope timed(profile::Phase::gemm_forward);
        for (int64_t tap = 0; tap < taps; ++tap)
          gemm_serial(false, false, grid, out_, in_, xp + tap_shift(tap, wp) * in_, in_,
                      weight_t_.data() + tap * in_ * out_, out_, tap == 0 ? 0.0f : 1.0f, y_grid,
                      out_);
      }
      const profile::Scope timed(profile::Phase::col2im);
      kernels::copy_rows(y_.ptr() + n * rows * out_, y_grid, x.h, x.w * out_, wp * out_, nullptr);
    }
  }
}

void Conv2d::backward_shifted(const Tensor& dy, bool need_dx, const Tensor* add_to,
                              int64_t slots, int t) {
  const Tensor& x = *x_;
  const int64_t wp = x.w + 2 * pad_, grid = x.h * wp, rows = x.h * x.w;
  const int64_t padded_x = padded_floats(x.h, x.w, in_), padded_dy = padded_floats(x.h, x.w, out_);
  const int64_t taps = int64_t{kernel_} * kernel_;
  for (int i = 0; i < t; ++i) {
    scratch(i).dy_pad.resize(static_cast<size_t>(padded_dy));
    if (need_dx) scratch(i).grid.resize(static_cast<size_t>(grid * in_));
  }
  for_each_slot(x.n, slots, t, [&](Scratch& s, int64_t begin, int64_t end, float* dw) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xp = x_pad_.data() + n * padded_x;
      float* dyp = s.dy_pad.data();
      {
        const profile::Scope timed(profile::Phase::im2col);
        kernels::pad_image(dy.ptr() + n * rows * out_, x.h, x.w, out_, pad_, dyp);
      }
      {
        const profile::Scope timed(profile::Phase::gemm_dweight);
        const float* dy_grid = dyp + (pad_ * wp + pad_) * out_;
        for (int64_t tap = 0; tap < taps; ++tap)
          gemm_serial(true, false, out_, in_, grid, dy_grid, out_, xp + tap_shift(tap, wp) * in_,
                      in_, n == begin ? 0.0f : 1.0f, dw + tap * in_, k_);
      }
      if (!need_dx) continue;
      float* dx_grid = s.grid.data();
      {
        const profile::Scope timed(profile::Phase::gemm_dx);
        for (int64_t tap = 0; tap < taps; ++tap)
          gemm_serial(false, false, grid, in_, out_, dyp + tap_shift(taps - 1 - tap, wp) * out_,
                      out_, used_weight() + tap * in_, k_, tap == 0 ? 0.0f : 1.0f, dx_grid,
                      in_);
      }
      const profile::Scope timed(profile::Phase::col2im);
      kernels::copy_rows(dx_.ptr() + n * rows * in_, dx_grid, x.h, x.w * in_, wp * in_,
                         add_to ? add_to->ptr() + n * rows * in_ : nullptr);
    }
  });
}

}  // namespace normkit::train
