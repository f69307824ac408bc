#include "nn/conv.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "nn/kernels.h"
#include "nn/parallel.h"
#include "normkit/error.h"

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
  x_ = &x;
  const int64_t oh = out_size(x.h), ow = out_size(x.w), rows = oh * ow;
  const int64_t piece = std::min(rows, piece_rows());
  y_.resize(x.n, oh, ow, out_);
  const int t = static_cast<int>(std::min<int64_t>(threads(), std::max<int64_t>(x.n, 1)));
  if (scratch_.size() < static_cast<size_t>(threads())) scratch_.resize(threads());
  for (int i = 0; i < t; ++i) scratch(i).col.resize(static_cast<size_t>(piece * k_));
#pragma omp parallel num_threads(t)
  {
    const int id = omp_get_thread_num();
    float* col = scratch(id).col.data();
    for (int64_t n = x.n * id / t; n < x.n * (id + 1) / t; ++n)
      for (int64_t p = 0; p < rows; p += piece) {
        const int64_t m = std::min(piece, rows - p);
        gemm_serial(false, true, m, out_, k_, image_col(x, n, col, p, p + m), k_,
                    weight.value.data(), k_, 0.0f, y_.ptr() + (n * rows + p) * out_, out_);
      }
  }
  return y_;
}

const Tensor& Conv2d::backward(const Tensor& dy, bool need_dx, const Tensor* add_to) {
  const Tensor& x = *x_;
  if (!dy.same_shape(y_))
    throw Error("Conv2d " + weight.name + ": backward dy shape does not match the forward output");
  if (add_to && !add_to->same_shape(x))
    throw Error("Conv2d " + weight.name + ": backward add_to shape does not match the input");
  const int64_t rows = y_.h * y_.w, image = x.h * x.w * in_;
  const int64_t piece = std::min(rows, piece_rows());
  const int64_t slots = std::max<int64_t>(1, std::min(x.n, kMaxSlots));
  const int t = static_cast<int>(std::min<int64_t>(threads(), slots));
  for (int i = 0; i < t; ++i) {
    scratch(i).col.resize(static_cast<size_t>(piece * k_));
    scratch(i).dcol.resize(static_cast<size_t>(piece * k_));
  }
  if (slot_dweight_.size() < static_cast<size_t>(slots - 1)) slot_dweight_.resize(slots - 1);
  for (int64_t i = 0; i + 1 < slots; ++i) slot_dweight_[i].resize(weight.size());
  if (need_dx) dx_.resize_like(x);
  else dx_.resize(0, 0, 0, 0);
  const bool direct = kernel_ == 1 && stride_ == 1;
  const kernels::ConvGeometry geo = geometry(x);
#pragma omp parallel for num_threads(t) schedule(static, 1)
  for (int64_t slot = 0; slot < slots; ++slot) {
    Scratch& s = scratch(omp_get_thread_num());
    float* dw = slot == 0 ? weight.grad.data() : slot_dweight_[slot - 1].data();
    const int64_t begin = x.n * slot / slots, end = x.n * (slot + 1) / slots;
    if (begin == end) std::fill(dw, dw + weight.size(), 0.0f);
    for (int64_t n = begin; n < end; ++n) {
      float* dxn = need_dx ? dx_.ptr() + n * image : nullptr;
      if (need_dx) kernels::copy_or_zero(dxn, add_to ? add_to->ptr() + n * image : nullptr, image);
      for (int64_t p = 0; p < rows; p += piece) {
        const int64_t m = std::min(piece, rows - p);
        const float* g = dy.ptr() + (n * rows + p) * out_;
        gemm_serial(true, false, out_, k_, m, g, out_, image_col(x, n, s.col.data(), p, p + m), k_,
                    n == begin && p == 0 ? 0.0f : 1.0f, dw, k_);
        if (!need_dx) continue;
        if (direct) {  // dx rows are the col rows: accumulate straight into them
          gemm_serial(false, false, m, k_, out_, g, out_, weight.value.data(), k_, 1.0f,
                      dxn + p * k_, k_);
        } else {
          gemm_serial(false, false, m, k_, out_, g, out_, weight.value.data(), k_, 0.0f,
                      s.dcol.data(), k_);
          kernels::col2im_add(geo, s.dcol.data(), dxn, p, p + m);
        }
      }
    }
  }
  // The slots' partial weight gradients, added in slot order.
  float* dw = weight.grad.data();
  for (int64_t i = 0; i + 1 < slots; ++i) {
    const float* p = slot_dweight_[i].data();
    for (size_t j = 0; j < weight.size(); ++j) dw[j] += p[j];
  }
  return dx_;
}

}  // namespace normkit::train
