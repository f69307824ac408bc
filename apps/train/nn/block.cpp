#include "nn/block.h"

#include "normkit/error.h"

namespace normkit::train {

ResidualBlock::ResidualBlock(const std::string& name, int in_channels, int out_channels,
                             int stride, NormKind kind, int groups, bool relu)
    : conv1_(name + ".conv1", in_channels, out_channels, 3, stride),
      conv2_(name + ".conv2", out_channels, out_channels, 3, 1),
      norm1_(name + ".norm1", kind, out_channels, groups, false, relu),
      // The block's sum and final ReLU are norm2's epilogue.
      norm2_(name + ".norm2", kind, out_channels, groups, true, relu, true) {
  conv1_.set_standardize(standardizes_weights(kind));
  conv2_.set_standardize(standardizes_weights(kind));
  if (stride != 1 || in_channels != out_channels) {
    shortcut_conv_ =
        std::make_unique<Conv2d>(name + ".shortcut.conv", in_channels, out_channels, 1, stride);
    shortcut_norm_ = std::make_unique<Norm>(name + ".shortcut.norm", kind, out_channels, groups,
                                            false, false);
    shortcut_conv_->set_standardize(standardizes_weights(kind));
  }
}

void ResidualBlock::init(Rng& rng) {
  conv1_.init(rng);
  conv2_.init(rng);
  if (shortcut_conv_) shortcut_conv_->init(rng);
}

std::vector<Param*> ResidualBlock::conv_weights() {
  std::vector<Param*> out{&conv1_.weight, &conv2_.weight};
  if (shortcut_conv_) out.push_back(&shortcut_conv_->weight);
  return out;
}

const Tensor& ResidualBlock::forward(const Tensor& x, Mode mode) {
  x_ = &x;
  const Tensor& skip =
      shortcut_conv_ ? shortcut_norm_->forward(shortcut_conv_->forward(x), mode) : x;
  const Tensor& h = norm1_.forward(conv1_.forward(x), mode);
  return norm2_.forward(conv2_.forward(h), mode, &skip);
}

const Tensor& ResidualBlock::backward(const Tensor& dy) {
  const Tensor& d2 = norm2_.backward(dy);
  const Tensor& g = norm2_.residual_grad();  // the sum's gradient, masked by the final ReLU
  // dx = dbranch + dskip: the shortcut's gradient goes first, conv1's col2im adds onto it.
  const Tensor& dskip = shortcut_conv_ ? shortcut_conv_->backward(shortcut_norm_->backward(g)) : g;
  return conv1_.backward(norm1_.backward(conv2_.backward(d2)), true, &dskip);
}

void ResidualBlock::relu_outputs(std::vector<const Tensor*>& out) const {
  out.push_back(&norm1_.output());
  out.push_back(&norm2_.output());
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


std::vector<Buffer> ResidualBlock::buffers() {
  std::vector<Buffer> b = norm1_.buffers();
  for (const Buffer& q : norm2_.buffers()) b.push_back(q);
  if (shortcut_norm_)
    for (const Buffer& q : shortcut_norm_->buffers()) b.push_back(q);
  return b;
}

}  // namespace normkit::train

namespace normkit::train {

void ResidualBlock::set_sync(const SyncBatchNorm& sync) {
  norm1_.set_sync(sync);
  norm2_.set_sync(sync);
  if (shortcut_norm_) shortcut_norm_->set_sync(sync);
}

void ResidualBlock::set_renorm_limits(double r_max, double d_max) {
  norm1_.set_renorm_limits(r_max, d_max);
  norm2_.set_renorm_limits(r_max, d_max);
  if (shortcut_norm_) shortcut_norm_->set_renorm_limits(r_max, d_max);
}

void ResidualBlock::set_cumulative_average(bool on) {
  norm1_.set_cumulative_average(on);
  norm2_.set_cumulative_average(on);
  if (shortcut_norm_) shortcut_norm_->set_cumulative_average(on);
}

}  // namespace normkit::train
