#include "nn/model.h"

#include <algorithm>
#include <cmath>

#include "nn/profile.h"
#include "normkit/error.h"

namespace normkit::train {
namespace {
const ModelConfig& checked(const ModelConfig& c) {
  if (c.widths.empty()) throw Error("model: the width list is empty");
  for (int w : c.widths)
    if (w < 1) throw Error("model: width " + std::to_string(w) + " must be >= 1");
  if (c.blocks_per_stage < 1)
    throw Error("model: blocks per stage must be >= 1, got " + std::to_string(c.blocks_per_stage));
  if (c.classes < 1 || c.in_channels < 1) throw Error("model: classes and in_channels must be >= 1");
  if (!(c.init_scale > 0) || !std::isfinite(c.init_scale))
    throw Error("model: init scale " + std::to_string(c.init_scale) + " must be a positive number");
  if (!(c.dropout >= 0 && c.dropout < 1))
    throw Error("model: dropout " + std::to_string(c.dropout) + " must be in [0, 1)");
  return c;
}
}  // namespace

void check_config(const ModelConfig& config) {
  checked(config);
  // Named as the first norm of that width the constructor builds.
  for (size_t s = 0; s < config.widths.size(); ++s)
    make_norm_layer(s == 0 ? "stem.norm" : "stage" + std::to_string(s + 1) + ".block1.norm1",
                    config.norm, config.widths[s], config.groups);
}

MemoryEstimate estimate_memory(const ModelConfig& config, int64_t batch, int64_t eval_batch,
                               int64_t rows, int64_t cols, int threads) {
  // Mirrors the constructor and the layers' buffers (conv.h, norm.h, layers.h); floats counted
  // in double.
  MemoryEstimate e;
  if (config.widths.empty() || config.blocks_per_stage < 1 ||
      *std::min_element(config.widths.begin(), config.widths.end()) < 1)
    return e;  // the constructor's checks say what is wrong
  const double n_train = static_cast<double>(std::max<int64_t>(batch, 1));
  const double n_max = std::max(n_train, static_cast<double>(eval_batch));
  const double t = std::min(static_cast<double>(std::max(threads, 1)), n_max);
  const double slots = std::min(n_train, 8.0);
  const bool spatial = rows > 0 && cols > 0;
  double h = static_cast<double>(rows), w = static_cast<double>(cols);
  auto conv = [&](double in, double out, int kernel, int stride, bool need_dx) {
    const double k = double(kernel) * kernel * in, pad = kernel / 2;
    e.parameter_count += out * k;
    e.parameters += 4.0 * out * k * (4.0 + (slots - 1.0));  // value, grad, momentum, transpose
    if (!spatial) return;
    const double ho = std::floor((h + 2 * pad - kernel) / stride) + 1;
    const double wo = std::floor((w + 2 * pad - kernel) / stride) + 1;
    const double padded = ((h + 2 * pad) * (w + 2 * pad) + 2 * pad);
    const bool shifted = stride == 1 && kernel > 1 && in >= 4;
    e.activations += 4.0 * (n_max * ho * wo * out + (need_dx ? n_train * h * w * in : 0.0) +
                            (shifted ? n_max * padded * in : 0.0));
    const double piece = std::min(ho * wo, std::max(8.0, std::floor(32768.0 / k)));
    e.workspace += 4.0 * t * (2 * piece * k + h * (w + 2 * pad) * std::max(in, out) + padded * out);
    h = ho;
    w = wo;
  };
  auto norm = [&](double c) {
    e.parameter_count += 2 * c;
    e.parameters += 4.0 * c * (3.0 * 2 + 4);  // the trainer's weight and bias; the layer's four
    if (spatial) e.activations += 4.0 * (n_max * h * w * c + 2 * n_train * h * w * c + 2 * n_max * c);
  };
  double in = config.in_channels;
  conv(in, config.widths[0], 3, 1, false);
  norm(config.widths[0]);
  in = config.widths[0];
  auto block = [&](double out, int stride) {
    const double h_in = h, w_in = w;
    conv(in, out, 3, stride, true);
    norm(out);
    conv(out, out, 3, 1, true);
    norm(out);
    if (stride != 1 || in != out) {
      const double h_out = h, w_out = w;
      h = h_in;
      w = w_in;
      conv(in, out, 1, stride, true);
      norm(out);
      h = h_out;
      w = w_out;
    }
    in = out;
  };
  for (size_t s = 0; s < config.widths.size(); ++s) {
    block(config.widths[s], s > 0 ? 2 : 1);
    if (config.blocks_per_stage < 2) continue;
    // The stage's other blocks are alike (stride 1, width in = out): one, times their count.
    const MemoryEstimate before = e;
    block(config.widths[s], 1);
    const double more = config.blocks_per_stage - 2.0;
    e.parameters += more * (e.parameters - before.parameters);
    e.activations += more * (e.activations - before.activations);
    e.workspace += more * (e.workspace - before.workspace);
    e.parameter_count += more * (e.parameter_count - before.parameter_count);
  }
  const double classes = config.classes;
  e.parameter_count += in * classes + classes;
  e.parameters += 4.0 * 3.0 * (in * classes + classes);
  if (spatial) e.activations += 4.0 * (n_max * in * 2 + n_train * h * w * in + 2 * n_max * classes);
  return e;
}

Model::Model(const ModelConfig& config)
    : config_(checked(config)),
      stem_conv_("stem.conv", config.in_channels, config.widths[0], 3, 1),
      stem_norm_("stem.norm", config.norm, config.widths[0], config.groups, false, config.relu),
      fc_("fc", config.widths.back(), config.classes) {
  stem_conv_.set_standardize(standardizes_weights(config.norm));
  if (config.dropout > 0) dropout_ = std::make_unique<Dropout>(config.dropout);
  int in = config.widths[0];
  for (size_t s = 0; s < config.widths.size(); ++s)
    for (int b = 0; b < config.blocks_per_stage; ++b) {
      const int stride = (s > 0 && b == 0) ? 2 : 1;
      const std::string name = "stage" + std::to_string(s + 1) + ".block" + std::to_string(b + 1);
      blocks_.push_back(std::make_unique<ResidualBlock>(name, in, config.widths[s], stride,
                                                        config.norm, config.groups, config.relu));
      in = config.widths[s];
    }
}

namespace {
void scale(std::vector<float>& v, double s) {
  for (float& e : v) e = static_cast<float>(e * s);
}
}  // namespace

void Model::init(uint64_t seed) {
  Rng rng(seed);
  stem_conv_.init(rng);
  for (auto& b : blocks_) b->init(rng);
  fc_.init(rng);
  if (config_.init_scale == 1) return;
  scale(stem_conv_.weight.value, config_.init_scale);
  for (auto& b : blocks_)
    for (Param* w : b->conv_weights()) scale(w->value, config_.init_scale);
  scale(fc_.weight.value, config_.init_scale);
}

const Tensor& Model::forward(const Tensor& images, Mode mode) {
  const Tensor* h = &stem_norm_.forward(stem_conv_.forward(images), mode);
  for (auto& b : blocks_) h = &b->forward(*h, mode);
  const profile::Scope timed(profile::Phase::head);
  dropped_out_ = dropout_ && mode == Mode::train;
  if (dropped_out_) return fc_.forward(dropout_->forward(pool_.forward(*h), dropout_keys_));
  return fc_.forward(pool_.forward(*h));
}

void Model::backward(const Tensor& dlogits) {
  const Tensor* g;
  {
    const profile::Scope timed(profile::Phase::head);
    g = dropped_out_ ? &pool_.backward(dropout_->backward(fc_.backward(dlogits)))
                     : &pool_.backward(fc_.backward(dlogits));
  }
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) g = &(*it)->backward(*g);
  stem_conv_.backward(stem_norm_.backward(*g), false);
}

std::vector<Param*> Model::params() {
  std::vector<Param*> p{&stem_conv_.weight};
  for (Param* q : stem_norm_.params()) p.push_back(q);
  for (auto& b : blocks_)
    for (Param* q : b->params()) p.push_back(q);
  p.push_back(&fc_.weight);
  p.push_back(&fc_.bias);
  return p;
}

std::vector<Buffer> Model::buffers() {
  std::vector<Buffer> out = stem_norm_.buffers();
  for (auto& b : blocks_)
    for (const Buffer& q : b->buffers()) out.push_back(q);
  return out;
}

void Model::set_sync(const SyncBatchNorm& sync) {
  if (config_.norm != NormKind::batch) return;
  stem_norm_.set_sync(sync);
  for (auto& b : blocks_) b->set_sync(sync);
}

void Model::set_renorm_limits(double r_max, double d_max) {
  stem_norm_.set_renorm_limits(r_max, d_max);
  for (auto& b : blocks_) b->set_renorm_limits(r_max, d_max);
}

void Model::set_cumulative_average(bool on) {
  stem_norm_.set_cumulative_average(on);
  for (auto& b : blocks_) b->set_cumulative_average(on);
}

std::vector<const Tensor*> Model::relu_outputs() const {
  std::vector<const Tensor*> out{&stem_norm_.output()};
  for (const auto& b : blocks_) b->relu_outputs(out);
  return out;
}

int64_t Model::parameter_count() {
  int64_t n = 0;
  for (Param* p : params()) n += static_cast<int64_t>(p->size());
  return n;
}

}  // namespace normkit::train
