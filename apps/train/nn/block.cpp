#include "nn/block.h"

#include <algorithm>
#include <limits>

#include "normkit/error.h"

namespace normkit::train {

ResidualBlock::ResidualBlock(const std::string& name, int in_channels, int out_channels,
                             int stride, NormKind kind, int groups, bool relu)
    : conv1_(name + ".conv1", in_channels, out_channels, 3, stride),
      conv2_(name + ".conv2", out_channels, out_channels, 3, 1),
      norm1_(name + ".norm1", kind, out_channels, groups, false, relu),
      norm2_(name + ".norm2", kind, out_channels, groups, true, false),
      relu_(relu) {
  if (stride != 1 || in_channels != out_channels) {
    shortcut_conv_ =
        std::make_unique<Conv2d>(name + ".shortcut.conv", in_channels, out_channels, 1, stride);
    shortcut_norm_ = std::make_unique<Norm>(name + ".shortcut.norm", kind, out_channels, groups,
                                            false, false);
  }
}

void ResidualBlock::init(Rng& rng) {
  conv1_.init(rng);
  conv2_.init(rng);
  if (shortcut_conv_) shortcut_conv_->init(rng);
}

const Tensor& ResidualBlock::forward(const Tensor& x, Mode mode) {
  x_ = &x;
  const Tensor& branch = norm2_.forward(conv2_.forward(norm1_.forward(conv1_.forward(x), mode)), mode);
  const Tensor& skip =
      shortcut_conv_ ? shortcut_norm_->forward(shortcut_conv_->forward(x), mode) : x;
  if (!skip.same_shape(branch))
    throw Error("ResidualBlock: shortcut and branch shapes differ");
  out_.resize_like(branch);
  const float* a = branch.ptr();
  const float* b = skip.ptr();
  float* o = out_.ptr();
  const int64_t total = out_.numel();
  const float floor = relu_ ? 0.0f : -std::numeric_limits<float>::infinity();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < total; ++i) o[i] = std::max(a[i] + b[i], floor);
  return out_;
}

const Tensor& ResidualBlock::backward(const Tensor& dy) {
  dsum_.resize_like(out_);
  {
    const float* g = dy.ptr();
    const float* o = out_.ptr();
    float* d = dsum_.ptr();
    const int64_t total = out_.numel();
    const bool relu = relu_;
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < total; ++i) d[i] = !relu || o[i] > 0.0f ? g[i] : 0.0f;
  }
  const Tensor& dbranch =
      conv1_.backward(norm1_.backward(conv2_.backward(norm2_.backward(dsum_))));
  const Tensor& dskip =
      shortcut_conv_ ? shortcut_conv_->backward(shortcut_norm_->backward(dsum_)) : dsum_;
  dx_.resize_like(*x_);
  const float* a = dbranch.ptr();
  const float* b = dskip.ptr();
  float* d = dx_.ptr();
  const int64_t total = dx_.numel();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < total; ++i) d[i] = a[i] + b[i];
  return dx_;
}

std::vector<Param*> ResidualBlock::params() {
  std::vector<Param*> p{&conv1_.weight};
  for (Param* q : norm1_.params()) p.push_back(q);
  p.push_back(&conv2_.weight);
  for (Param* q : norm2_.params()) p.push_back(q);
  if (shortcut_conv_) {
    p.push_back(&shortcut_conv_->weight);
    for (Param* q : shortcut_norm_->params()) p.push_back(q);
  }
  return p;
}

void ResidualBlock::relu_outputs(std::vector<const Tensor*>& out) const {
  out.push_back(&norm1_.output());
  out.push_back(&out_);
}

std::vector<Buffer> ResidualBlock::buffers() {
  std::vector<Buffer> b = norm1_.buffers();
  for (const Buffer& q : norm2_.buffers()) b.push_back(q);
  if (shortcut_norm_)
    for (const Buffer& q : shortcut_norm_->buffers()) b.push_back(q);
  return b;
}

}  // namespace normkit::train
