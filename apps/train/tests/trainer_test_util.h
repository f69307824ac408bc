#pragma once
// What the trainer's tests share: a tiny synthetic dataset and a tiny configuration that trains
// on it in milliseconds.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>
#include <string>

#include "trainer.h"

namespace normkit::train {

// Three classes of 8x8 images: a class-specific pattern plus noise, already standardized.
inline Dataset synthetic(int64_t count, uint64_t seed) {
  std::mt19937_64 rng(seed), proto_rng(77);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> protos(3 * 64);
  for (float& v : protos) v = d(proto_rng);
  Dataset s;
  s.count = count;
  s.rows = s.cols = 8;
  s.num_classes = 3;
  for (int64_t i = 0; i < count; ++i) {
    const uint8_t label = static_cast<uint8_t>(rng() % 3);
    s.labels.push_back(label);
    for (int j = 0; j < 64; ++j) s.images.push_back(protos[label * 64 + j] + 0.8f * d(rng));
  }
  return s;
}

inline Data tiny_data() {
  Data d;
  d.train = synthetic(50, 1);  // 12 steps of 4 per epoch, 2 images left over
  d.test = synthetic(30, 2);
  return d;
}

inline TrainConfig tiny_config(NormKind kind, const std::string& checkpoint) {
  TrainConfig c;
  c.model.norm = kind;
  c.model.groups = 2;
  c.model.widths = {4, 8};
  c.batch = 4;
  c.epochs = 3;
  c.threads = 1;
  c.seed = 11;
  c.checkpoint_path = checkpoint;
  c.curve_points = 10;
  return c;
}

inline std::string temp_path(const std::string& name) {
  return (std::filesystem::path(::testing::TempDir()) / name).string();
}

}  // namespace normkit::train
