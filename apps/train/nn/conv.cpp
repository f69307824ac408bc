#include "nn/conv.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "nn/parallel.h"
#include "normkit/error.h"

namespace normkit::train {

Conv2d::Conv2d(const std::string& name, int in_channels, int out_channels, int kernel, int stride)
    : weight(name + ".weight", static_cast<size_t>(out_channels) * kernel * kernel * in_channels),
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

const Tensor& Conv2d::forward(const Tensor& x) {
  if (x.c != in_)
    throw Error("Conv2d " + weight.name + ": input has " + std::to_string(x.c) +
                " channels, expected " + std::to_string(in_));
  x_ = &x;
  const int64_t oh = out_size(x.h), ow = out_size(x.w);
  y_.resize(x.n, oh, ow, out_);
  const int64_t m = y_.pixels();
  if (kernel_ == 1 && stride_ == 1) {
    col_ptr_ = x.ptr();
  } else {
    col_.resize(static_cast<size_t>(m * k_));
    const int64_t rows = x.n * oh;
    const int kernel = kernel_, stride = stride_, pad = pad_;
    const int64_t cin = in_, k = k_;
    const float* xp = x.ptr();
    float* colp = col_.data();
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = r / oh, i = r % oh;
      for (int64_t j = 0; j < ow; ++j) {
        float* dst = colp + ((n * oh + i) * ow + j) * k;
        for (int kh = 0; kh < kernel; ++kh) {
          const int64_t ih = i * stride - pad + kh;
          for (int kw = 0; kw < kernel; ++kw, dst += cin) {
            const int64_t iw = j * stride - pad + kw;
            if (ih < 0 || ih >= x.h || iw < 0 || iw >= x.w)
              std::memset(dst, 0, sizeof(float) * cin);
            else
              std::memcpy(dst, xp + ((n * x.h + ih) * x.w + iw) * cin, sizeof(float) * cin);
          }
        }
      }
    }
    col_ptr_ = col_.data();
  }
  gemm(false, true, m, out_, k_, col_ptr_, k_, weight.value.data(), k_, 0.0f, y_.ptr(), out_);
  return y_;
}

const Tensor& Conv2d::backward(const Tensor& dy, bool need_dx) {
  const Tensor& x = *x_;
  if (!dy.same_shape(y_))
    throw Error("Conv2d " + weight.name + ": backward dy shape does not match the forward output");
  const int64_t m = y_.pixels();
  gemm(true, false, out_, k_, m, dy.ptr(), out_, col_ptr_, k_, 0.0f, weight.grad.data(), k_);
  if (!need_dx) {
    dx_.resize(0, 0, 0, 0);
    return dx_;
  }
  dx_.resize_like(x);
  if (kernel_ == 1 && stride_ == 1) {
    gemm(false, false, m, k_, out_, dy.ptr(), out_, weight.value.data(), k_, 0.0f, dx_.ptr(), k_);
    return dx_;
  }
  dcol_.resize(static_cast<size_t>(m * k_));
  gemm(false, false, m, k_, out_, dy.ptr(), out_, weight.value.data(), k_, 0.0f, dcol_.data(), k_);
  // col2im as a gather: dx[n, ih, iw, :] = sum over the (kh, kw) taps that read it.
  const int64_t oh = y_.h, ow = y_.w, rows = x.n * x.h, cin = in_, k = k_;
  const int kernel = kernel_, stride = stride_, pad = pad_;
  const float* dcol = dcol_.data();
  float* dxp = dx_.ptr();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = r / x.h, ih = r % x.h;
    for (int64_t iw = 0; iw < x.w; ++iw) {
      float* dst = dxp + ((n * x.h + ih) * x.w + iw) * cin;
      std::fill(dst, dst + cin, 0.0f);
      for (int kh = 0; kh < kernel; ++kh) {
        const int64_t ti = ih + pad - kh;
        if (ti < 0 || ti % stride != 0 || ti / stride >= oh) continue;
        for (int kw = 0; kw < kernel; ++kw) {
          const int64_t tj = iw + pad - kw;
          if (tj < 0 || tj % stride != 0 || tj / stride >= ow) continue;
          const float* src = dcol + ((n * oh + ti / stride) * ow + tj / stride) * k +
                             (kh * kernel + kw) * cin;
          for (int64_t c = 0; c < cin; ++c) dst[c] += src[c];
        }
      }
    }
  }
  return dx_;
}

}  // namespace normkit::train
