#include "nn/model.h"

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

Model::Model(const ModelConfig& config)
    : config_(checked(config)),
      stem_conv_("stem.conv", config.in_channels, config.widths[0], 3, 1),
      stem_norm_("stem.norm", config.norm, config.widths[0], config.groups, false, config.relu),
      fc_("fc", config.widths.back(), config.classes) {
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

void Model::init(uint64_t seed) {
  Rng rng(seed);
  stem_conv_.init(rng);
  for (auto& b : blocks_) b->init(rng);
  fc_.init(rng);
}

const Tensor& Model::forward(const Tensor& images, Mode mode) {
  const Tensor* h = &stem_norm_.forward(stem_conv_.forward(images), mode);
  for (auto& b : blocks_) h = &b->forward(*h, mode);
  const profile::Scope timed(profile::Phase::head);
  return fc_.forward(pool_.forward(*h));
}

void Model::backward(const Tensor& dlogits) {
  const Tensor* g;
  {
    const profile::Scope timed(profile::Phase::head);
    g = &pool_.backward(fc_.backward(dlogits));
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
