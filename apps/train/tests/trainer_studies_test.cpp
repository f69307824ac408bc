// The options for the papers' other claims: the initialization scale, dropout, weight decay, the
// train/test gap, and fine-tuning on other classes from another run's checkpoint, with BN, frozen
// BN or GN. Each is held against a computation by hand (an SGD step, a dropout mask, an
// evaluation, a BN layer in eval mode) or against the same run interrupted and resumed; dropout's
// masks are checked to depend on the image's place in the epoch alone, not on the devices.
#include <gtest/gtest.h>

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <filesystem>
#include <limits>
#include <memory>
#include <random>

#include "io/safetensors.h"
#include "nn/sgd.h"
#include "normkit/error.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train {
namespace {

ModelConfig tiny_model(NormKind kind) {
  ModelConfig mc = tiny_config(kind, "").model;
  mc.in_channels = 1;
  mc.classes = 3;
  return mc;
}

template <typename F> void expect_error(F f, const std::string& words) {
  try {
    f();
    ADD_FAILURE() << "accepted; expected: " << words;
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
  }
}

// ---- --init-scale -----------------------------------------------------------------------------

TEST(InitScale, MultipliesEveryConvolutionAndClassifierWeightAndNothingElse) {
  for (double scale : {0.1, 3.0}) {
    ModelConfig mc = tiny_model(NormKind::batch);
    Model plain(mc);
    plain.init(5);
    mc.init_scale = scale;
    Model scaled(mc);
    scaled.init(5);
    const std::vector<Param*> a = plain.params(), b = scaled.params();
    ASSERT_EQ(a.size(), b.size());
    int scaled_tensors = 0;
    for (size_t p = 0; p < a.size(); ++p) {
      const std::string& name = a[p]->name;
      const bool weight = name.find("conv") != std::string::npos || name == "fc.weight";
      scaled_tensors += weight;
      for (size_t i = 0; i < a[p]->size(); ++i) {
        const float want = weight ? static_cast<float>(a[p]->value[i] * scale) : a[p]->value[i];
        ASSERT_EQ(b[p]->value[i], want) << name << "[" << i << "]";
      }
    }
    // The stem, two convolutions per block, one shortcut (widths 4, 8), the classifier.
    EXPECT_EQ(scaled_tensors, 1 + 2 * 2 + 1 + 1);
  }
  ModelConfig bad = tiny_model(NormKind::batch);
  bad.init_scale = 0;
  expect_error([&] { Model m(bad); }, "init scale");
}

// ---- --dropout --------------------------------------------------------------------------------

Tensor random_features(int64_t n, int64_t c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d;
  Tensor x;
  x.resize(n, 1, 1, c);
  for (float& v : x.data) v = d(rng);
  return x;
}

TEST(Dropout, KeepsOneMinusPScaledAndZeroesTheRestKeyedBySample) {
  const double p = 0.3;
  Dropout drop(p);
  const int64_t n = 7, c = 301;
  const Tensor x = random_features(n, c, 1);
  std::vector<uint64_t> keys(n);
  for (int64_t i = 0; i < n; ++i) keys[i] = 1000 + 17 * i;
  Tensor y = drop.forward(x, keys);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < c; ++j) {
      const float got = y.data[i * c + j];
      if (drop.keeps(keys[i], j)) {
        ++kept;
        ASSERT_EQ(got, x.data[i * c + j] * scale);
      } else {
        ASSERT_EQ(got, 0.0f);
      }
    }
  // 2107 Bernoulli(0.7) draws: within 5 standard deviations (about 105) of the mean.
  const double mean = (1 - p) * n * c, sd = std::sqrt(p * (1 - p) * n * c);
  EXPECT_NEAR(static_cast<double>(kept), mean, 5 * sd);

  // The gradient is the same mask and scale.
  const Tensor dy = random_features(n, c, 2);
  const Tensor dx = drop.backward(dy);
  for (int64_t i = 0; i < n * c; ++i)
    ASSERT_EQ(dx.data[i], y.data[i] == 0.0f && x.data[i] != 0.0f ? 0.0f : dy.data[i] * scale);

  // A sample's mask follows its key to any batch and position.
  Tensor one;
  one.resize(1, 1, 1, c);
  std::copy_n(x.data.begin() + 4 * c, c, one.data.begin());
  const Tensor y4 = drop.forward(one, {keys[4]});
  for (int64_t j = 0; j < c; ++j) ASSERT_EQ(y4.data[j], y.data[4 * c + j]);

  expect_error([&] { drop.forward(x, {1, 2}); }, "2 sample keys for 7 samples");
  expect_error([] { Dropout d(1.0); }, "must be in [0, 1)");
  expect_error([] { Dropout d(-0.1); }, "must be in [0, 1)");
}

TEST(Dropout, OnlyInTrainingAndEveryImageKeyDiffers) {
  ModelConfig mc = tiny_model(NormKind::group);
  Model plain(mc);
  plain.init(3);
  mc.dropout = 0.5;
  Model dropped(mc);
  dropped.init(3);
  Tensor x;
  x.resize(4, 8, 8, 1);
  std::mt19937_64 rng(9);
  std::normal_distribution<float> d;
  for (float& v : x.data) v = d(rng);
  const Tensor a = plain.forward(x, Mode::eval);
  EXPECT_EQ(dropped.forward(x, Mode::eval).data, a.data);  // no dropout in evaluation
  expect_error([&] { dropped.forward(x, Mode::train); }, "0 sample keys for 4 samples");
  dropped.set_dropout_keys({image_key(1, 0, 0), image_key(1, 0, 1), image_key(1, 0, 2), image_key(1, 0, 3)});
  EXPECT_NE(dropped.forward(x, Mode::train).data, plain.forward(x, Mode::train).data);
  // Keys differ by seed, epoch and position.
  EXPECT_NE(image_key(1, 0, 0), image_key(2, 0, 0));
  EXPECT_NE(image_key(1, 0, 0), image_key(1, 1, 0));
  EXPECT_NE(image_key(1, 0, 0), image_key(1, 0, 1));
}

TrainConfig study_config(NormKind kind, int devices, int batch, const std::string& checkpoint) {
  TrainConfig c = tiny_config(kind, checkpoint);
  c.devices = devices;
  c.batch = batch;
  c.epochs = 1;
  c.curve_points = 1000;  // a point per step
  c.lr_decay_at = {};
  return c;
}

TEST(Dropout, MasksFollowTheImageNotTheDevice) {
  // GN is per sample: K devices of N images are one device of K * N images, dropout included,
  // up to the order of the loss's mean; with masks keyed by device or batch slot they would differ.
  const Data data = tiny_data();
  std::vector<double> losses;
  for (auto [devices, batch] : {std::pair{4, 2}, {1, 8}, {2, 4}}) {
    TrainConfig c = study_config(NormKind::group, devices, batch, "");
    c.model.dropout = 0.4;
    const TrainOutcome o = train_run(c, data);
    losses.push_back(o.run.loss_curve_loss.at(0));
  }
  EXPECT_NEAR(losses[0], losses[1], 1e-12 * std::abs(losses[1]));
  EXPECT_NEAR(losses[2], losses[1], 1e-12 * std::abs(losses[1]));
  TrainConfig none = study_config(NormKind::group, 1, 8, "");
  EXPECT_GT(std::abs(train_run(none, data).run.loss_curve_loss.at(0) - losses[1]), 1e-6);
}

// ---- --weight-decay ---------------------------------------------------------------------------

TEST(WeightDecay, OneStepIsSgdWithThatDecayOnEveryParameter) {
  const Data data = tiny_data();
  for (double decay : {0.0, 0.05}) {
    const std::string ck = temp_path("decay_" + std::to_string(decay) + ".safetensors");
    TrainConfig c = study_config(NormKind::batch, 1, 4, ck);
    c.weight_decay = decay;
    c.stop_after_steps = 1;
    train_run(c, data);
    // By hand: the first 4 images of the permutation, forward, backward, SGD with that decay.
    Model m(tiny_model(NormKind::batch));
    m.init(c.seed);
    const std::vector<int64_t> perm = epoch_permutation(c.seed, 0, data.train.count);
    Tensor x;
    x.resize(4, 8, 8, 1);
    std::vector<uint8_t> labels(4);
    for (int i = 0; i < 4; ++i) {
      std::copy_n(data.train.image(perm[i]), 64, x.data.data() + i * 64);
      labels[i] = data.train.labels[perm[i]];
    }
    SoftmaxCrossEntropy ce;
    ce.forward(m.forward(x, Mode::train), labels.data());
    m.backward(ce.gradient());
    sgd_step(m.params(), c.lr_base * 4 / 32.0, SgdConfig{.weight_decay = decay});
    const SafetensorsFile got = load_safetensors(ck);
    for (Param* p : m.params())
      EXPECT_TRUE(got.tensors.at("param/" + p->name).bytes == make_f32(p->value).bytes) << p->name;
    EXPECT_EQ(got.metadata.at("weight_decay"), decay == 0 ? "0" : "0.050000000000000003");
  }
  TrainConfig bad = study_config(NormKind::batch, 1, 4, "");
  bad.weight_decay = -1e-4;
  expect_error([&] { validate(bad); }, "--weight-decay -0.0001: must be zero or a positive number");
}

// ---- --eval-train-images ----------------------------------------------------------------------

// The model a checkpoint holds.
std::unique_ptr<Model> model_of(const ModelConfig& mc, const std::string& path) {
  auto m = std::make_unique<Model>(mc);
  const SafetensorsFile f = load_safetensors(path);
  for (Param* p : m->params()) get_f32_into(f, "param/" + p->name, p->value);
  for (const Buffer& b : m->buffers()) get_f32_into(f, "buffer/" + b.name, *b.values);
  return m;
}

TEST(EvalTrainImages, IsTheFinalModelsEvaluationOfTheFirstTrainingImages) {
  const Data data = tiny_data();
  const std::string ck = temp_path("gap.safetensors");
  TrainConfig c = study_config(NormKind::batch, 1, 4, ck);
  c.eval_train_images = 37;
  c.eval_batch = 10;  // batches of 10, 10, 10, 7
  const TrainOutcome o = train_run(c, data);
  auto m = model_of(tiny_model(NormKind::batch), ck);
  const Evaluation want = evaluate(*m, data.train, 37, 10, Mode::eval);
  EXPECT_EQ(o.run.train_error_eval, want.error);
  EXPECT_EQ(o.run.train_loss_eval, want.loss);
  EXPECT_EQ(o.run.eval_train_images, 37);
  // Not measured by default.
  TrainConfig off = study_config(NormKind::batch, 1, 4, "");
  EXPECT_TRUE(std::isnan(train_run(off, data).run.train_error_eval));
  c.eval_train_images = 51;
  expect_error([&] { train_run(c, data); }, "--eval-train-images 51: the run has 50 training images");
  c.eval_train_images = -1;
  expect_error([&] { validate(c); }, "--eval-train-images -1");
}

// ---- --classes --------------------------------------------------------------------------------

void write_gz(const std::filesystem::path& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  gzclose(f);
}

std::vector<uint8_t> idx(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> b{0, 0, 0x08, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims)
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<uint8_t>(d >> s));
  b.insert(b.end(), data.begin(), data.end());
  return b;
}

// An MNIST-format folder of 3x3 images whose pixels all equal 10 * label + index % 10.
std::string labeled_folder(const std::string& name, const std::vector<uint8_t>& train_labels,
                           const std::vector<uint8_t>& test_labels) {
  const std::filesystem::path dir = temp_path(name);
  std::filesystem::create_directories(dir);
  for (const auto& [split, labels] : {std::pair{"train", &train_labels}, {"t10k", &test_labels}}) {
    std::vector<uint8_t> images;
    for (size_t i = 0; i < labels->size(); ++i)
      images.insert(images.end(), 9, static_cast<uint8_t>(10 * (*labels)[i] + i % 10));
    const auto n = static_cast<uint32_t>(labels->size());
    write_gz(dir / (std::string(split) + "-images-idx3-ubyte.gz"), idx({n, 3, 3}, images));
    write_gz(dir / (std::string(split) + "-labels-idx1-ubyte.gz"), idx({n}, *labels));
  }
  return dir.string();
}

TEST(Classes, KeepTheirImagesInFileOrderThenTheLimits) {
  const std::vector<uint8_t> train{3, 0, 7, 3, 9, 0, 0, 3, 1, 7, 3, 0}, test{0, 1, 2, 3, 7, 7, 9};
  const std::string dir = labeled_folder("classes_data", train, test);
  const Data all = load_data(dir, -1, -1);
  const Data d = load_data(dir, 4, -1, {0, 3});
  // Filtered first, then the first 4 of the kept: file positions 0, 1, 3, 5.
  ASSERT_EQ(d.train.count, 4);
  EXPECT_EQ(d.train.labels, (std::vector<uint8_t>{3, 0, 3, 0}));
  ASSERT_EQ(d.test.count, 2);
  EXPECT_EQ(d.test.labels, (std::vector<uint8_t>{0, 3}));
  EXPECT_EQ(d.train.num_classes, all.train.num_classes);  // the classifier keeps 10 outputs
  // Standardized by the kept training images alone: (30, 1, 33, 5) / 255.
  const std::vector<double> raw{30, 1, 33, 5};
  double mean = 0, var = 0;
  for (double v : raw) mean += v / 255 / 4;
  for (double v : raw) var += (v / 255 - mean) * (v / 255 - mean) / 4;
  for (int i = 0; i < 4; ++i)
    EXPECT_NEAR(d.train.images[i * 9], (raw[i] / 255 - mean) / std::sqrt(var), 1e-5) << i;
  // The test split: positions 0 and 3, standardized alike.
  EXPECT_NEAR(d.test.images[9], (33.0 / 255 - mean) / std::sqrt(var), 1e-5);
  // A class with no training image, a bad class, a class named twice.
  expect_error([&] { load_data(dir, -1, -1, {5}); }, "--classes 5: no training image");
  expect_error([&] { load_data(dir, -1, -1, {0, -1}); }, "--classes 0,-1: each class must be a label");
  TrainConfig c = study_config(NormKind::batch, 1, 2, "");
  c.classes = {0, 256};
  expect_error([&] { validate(c); }, "--classes 0,256: each class must be a label in [0, 255]");
  c.classes = {3, 0, 3};
  expect_error([&] { validate(c); }, "names class 3 twice");
  // A run with classes refuses data that was not filtered for them.
  c.classes = {0, 3};
  c.limit_test = 3;
  expect_error([&] { train_run(c, all); }, "--classes 0,3: the data holds an image of label 7");
  // The epoch's permutation is over the kept images: 4 images, 2 steps of 2.
  c.limit_train = c.limit_test = -1;
  c.model.widths = {4};
  const TrainOutcome o = train_run(c, d);
  EXPECT_EQ(o.train_images, 4);
  EXPECT_EQ(o.steps, 2);
  EXPECT_EQ(o.run.classes, (std::vector<int>{0, 3}));
}

// ---- --init-from and --norm frozen ------------------------------------------------------------

// A BN, GN or frozen-BN run of 2 epochs, checkpointed at its end.
std::string pretrained(NormKind kind, const std::string& name, int batch = 4) {
  const std::string ck = temp_path(name + ".safetensors");
  TrainConfig c = study_config(kind, 1, batch, ck);
  c.epochs = 2;
  train_run(c, tiny_data());
  return ck;
}

TEST(InitFrom, CopiesEveryWeightAndStatisticBitwiseButTheHead) {
  const std::string source = pretrained(NormKind::batch, "init_source_bn", 8);
  const SafetensorsFile f = load_safetensors(source);
  for (NormKind kind : {NormKind::batch, NormKind::frozen}) {
    TrainConfig c = study_config(kind, 1, 2, "");
    c.seed = 99;
    c.model.in_channels = 1;
    c.model.classes = 3;
    Model fresh(c.model);
    fresh.init(c.seed);
    Model m(c.model);
    m.init(c.seed);
    init_from_checkpoint(source, c, m);
    int copied = 0;
    for (Param* p : m.params()) {
      const std::string& name = p->name;
      if (name.rfind("fc.", 0) == 0) {
        // The new task's head: this run's own initialization.
        const auto fresh_params = fresh.params();
        const auto it = std::find_if(fresh_params.begin(), fresh_params.end(),
                                     [&](Param* q) { return q->name == name; });
        EXPECT_EQ(p->value, (*it)->value) << name;
        EXPECT_FALSE(make_f32(p->value).bytes == f.tensors.at("param/" + name).bytes) << name;
      } else {
        EXPECT_TRUE(make_f32(p->value).bytes == f.tensors.at("param/" + name).bytes) << name;
        ++copied;
      }
      EXPECT_EQ(p->momentum, std::vector<float>(p->size(), 0.0f)) << name;
    }
    for (const Buffer& b : m.buffers()) {
      // BN's statistics are buffers; frozen BN's weight and bias too, from BN's parameters.
      const std::string key = f.tensors.count("buffer/" + b.name) ? "buffer/" : "param/";
      EXPECT_TRUE(make_f32(*b.values).bytes == f.tensors.at(key + b.name).bytes) << b.name;
      ++copied;
    }
    // Every tensor of the checkpoint but the head's two, in one place or the other.
    int checkpoint_tensors = 0;
    for (const auto& [name, t] : f.tensors)
      checkpoint_tensors += (name.rfind("param/", 0) == 0 || name.rfind("buffer/", 0) == 0) &&
                            name.find("/fc.") == std::string::npos;
    EXPECT_EQ(copied, checkpoint_tensors) << to_string(kind);
  }
}

TEST(InitFrom, RefusesAnotherModelShapeOrNormFamilyByName) {
  const std::string bn = pretrained(NormKind::batch, "init_refuse_bn");
  const std::string gn = pretrained(NormKind::group, "init_refuse_gn");
  const Data data = tiny_data();
  auto run = [&](NormKind kind, const std::string& from, auto change) {
    TrainConfig c = study_config(kind, 1, 2, "");
    c.init_from = from;
    change(c);
    train_run(c, data);
  };
  auto same = [](TrainConfig&) {};
  expect_error([&] { run(NormKind::batch, bn, [](TrainConfig& c) { c.model.widths = {4, 16}; }); },
               "widths = 4,8, this run has widths = 4,16 (--widths)");
  expect_error([&] { run(NormKind::batch, bn, [](TrainConfig& c) { c.model.blocks_per_stage = 2; }); },
               "(--blocks-per-stage)");
  expect_error([&] { run(NormKind::group, bn, same); }, "norm = bn, this run has norm = gn (--norm)");
  expect_error([&] { run(NormKind::group, gn, [](TrainConfig& c) { c.model.groups = 4; }); },
               "groups = 2, this run has groups = 4 (--groups)");
  expect_error([&] { run(NormKind::frozen, gn, same); },
               "--norm frozen freezes a BatchNorm checkpoint's layers, and it has norm = gn");
  expect_error([&] { run(NormKind::batch, temp_path("no_such.safetensors"), same); },
               "cannot start from --init-from");
  // Another batch, lr, devices or classes is the point, and is accepted.
  EXPECT_NO_THROW(run(NormKind::batch, bn, [](TrainConfig& c) { c.lr_base = 0.01; c.devices = 2; }));
  // Frozen needs a checkpoint to freeze; --init-from does not go with --resume.
  TrainConfig frozen = study_config(NormKind::frozen, 1, 2, "");
  expect_error([&] { validate(frozen); }, "--norm frozen: freezes a trained BatchNorm");
  frozen.init_from = bn;
  frozen.resume_path = bn;
  expect_error([&] { validate(frozen); }, "give one of them");
}

TEST(FrozenBatchNorm, IsTheBatchNormLayersEvalOutputAndTrainsNothing) {
  // A BN layer with statistics from a few training forwards and a random affine.
  Norm bn("n", NormKind::batch, 5, 0, false, true);
  Norm frozen("n", NormKind::frozen, 5, 0, false, true);
  EXPECT_TRUE(frozen.params().empty());
  std::mt19937_64 rng(4);
  std::normal_distribution<float> d(0.5f, 2.0f);
  Tensor x, residual;
  for (int k = 0; k < 3; ++k) {
    x.resize(3, 7, 5, 5);
    for (float& v : x.data) v = d(rng);
    bn.forward(x, Mode::train);
  }
  for (float& v : bn.weight.value) v = d(rng);
  for (float& v : bn.bias.value) v = d(rng);
  const std::vector<Buffer> from = bn.buffers();
  std::vector<Buffer> to = frozen.buffers();
  ASSERT_EQ(to.size(), 4u);
  for (const Buffer& b : to) {
    // By name: weight and bias are BN's parameters, the statistics its buffers.
    if (b.name == "n.weight") *b.values = bn.weight.value;
    if (b.name == "n.bias") *b.values = bn.bias.value;
    for (const Buffer& f : from)
      if (f.name == b.name) *b.values = *f.values;
  }
  residual.resize(3, 7, 5, 5);
  for (float& v : residual.data) v = d(rng);
  for (float& v : x.data) v = d(rng);
  const std::vector<float> want = bn.forward(x, Mode::eval, &residual).data;
  for (Mode mode : {Mode::train, Mode::eval, Mode::eval_batch_stats})
    EXPECT_EQ(frozen.forward(x, mode, &residual).data, want);
  // Its backward gives dx and the residual's gradient and changes nothing of it.
  const std::vector<float> before = frozen.weight.value;
  Tensor dy;
  dy.resize_like(x);
  for (float& v : dy.data) v = d(rng);
  frozen.forward(x, Mode::train, &residual);
  const Tensor& dx = frozen.backward(dy);
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t c = i % 5;
    const double a = bn.weight.value[c] / std::sqrt(double(bn.running_var()[c]) + 1e-5);
    const double g = want[i] > 0 ? dy.data[i] : 0.0;
    ASSERT_NEAR(dx.data[i], g * a, 1e-5 * (1 + std::abs(g * a))) << i;
    ASSERT_EQ(frozen.residual_grad().data[i], static_cast<float>(g)) << i;
  }
  EXPECT_EQ(frozen.weight.value, before);
  EXPECT_EQ(frozen.running_mean(), bn.running_mean());
}

TEST(FrozenBatchNorm, FineTuningKeepsEveryFrozenTensorAndResumesBitForBit) {
  const std::string source = pretrained(NormKind::batch, "frozen_source", 8);
  const Data data = tiny_data();
  TrainConfig whole = study_config(NormKind::frozen, 2, 2, temp_path("frozen_whole.safetensors"));
  whole.init_from = source;
  whole.epochs = 2;
  whole.model.dropout = 0.2;
  whole.weight_decay = 1e-3;
  const TrainOutcome a = train_run(whole, data);
  EXPECT_EQ(a.run.norm, "frozen");
  EXPECT_EQ(a.run.init_from, source);
  EXPECT_FALSE(a.run.test_error_batch_stats.has_value());
  // Every frozen BN tensor ends as the source checkpoint had it; the convolutions trained.
  const SafetensorsFile src = load_safetensors(source), end = load_safetensors(whole.checkpoint_path);
  int frozen_tensors = 0;
  for (const auto& [name, t] : end.tensors) {
    if (name.rfind("buffer/", 0) != 0) continue;
    const std::string layer_tensor = name.substr(7);
    const std::string key = src.tensors.count(name) ? name : "param/" + layer_tensor;
    EXPECT_TRUE(t.bytes == src.tensors.at(key).bytes) << name;
    ++frozen_tensors;
  }
  EXPECT_EQ(frozen_tensors, 4 * 6);  // stem, 2 + 2 block norms, 1 shortcut: 4 tensors each
  EXPECT_FALSE(end.tensors.at("param/stem.conv.weight").bytes == src.tensors.at("param/stem.conv.weight").bytes);
  EXPECT_EQ(end.tensors.count("param/stem.norm.weight"), 0u);
  EXPECT_EQ(end.metadata.at("init_from"), source);
  EXPECT_EQ(end.metadata.at("norm"), "frozen");

  // Interrupted and resumed (with --resume alone): the same bits.
  TrainConfig part = whole;
  part.checkpoint_path = temp_path("frozen_part.safetensors");
  part.stop_after_steps = 15;  // inside the second epoch (12 steps of 2 x 2 images)
  train_run(part, data);
  part.stop_after_steps = -1;
  part.init_from.clear();
  part.resume_path = part.checkpoint_path;
  const TrainOutcome b = train_run(part, data);
  EXPECT_EQ(a.run.loss_curve_loss, b.run.loss_curve_loss);
  EXPECT_EQ(a.run.test_error, b.run.test_error);
  EXPECT_EQ(b.run.init_from, source);  // carried by the checkpoint
  const SafetensorsFile cb = load_safetensors(part.checkpoint_path);
  for (const auto& [name, t] : end.tensors)
    if (name.rfind("param/", 0) == 0 || name.rfind("momentum/", 0) == 0 || name.rfind("buffer/", 0) == 0)
      EXPECT_TRUE(cb.tensors.at(name).bytes == t.bytes) << name;
}

// ---- the checkpoint identity ------------------------------------------------------------------

TEST(StudyOptions, ResumeWithAnotherValueIsRefusedNamingTheOption) {
  const Data data = tiny_data();
  TrainConfig c = study_config(NormKind::group, 1, 4, temp_path("identity.safetensors"));
  c.epochs = 2;
  c.model.dropout = 0.25;
  c.model.init_scale = 2;
  c.weight_decay = 0.01;
  c.eval_train_images = 8;
  c.stop_after_steps = 3;
  train_run(c, data);
  c.stop_after_steps = -1;
  c.resume_path = c.checkpoint_path;
  const std::vector<std::pair<std::string, std::function<void(TrainConfig&)>>> changes{
      {"--dropout", [](TrainConfig& t) { t.model.dropout = 0.5; }},
      {"--init-scale", [](TrainConfig& t) { t.model.init_scale = 1; }},
      {"--weight-decay", [](TrainConfig& t) { t.weight_decay = 1e-4; }},
      {"--eval-train-images", [](TrainConfig& t) { t.eval_train_images = 0; }},
      {"--classes", [](TrainConfig& t) { t.classes = {0, 1, 2}; }}};
  for (const auto& [option, change] : changes) {
    TrainConfig other = c;
    change(other);
    expect_error([&] { train_run(other, data); }, "(" + option + ")");
  }
  // The same values resume, and the run ends as an uninterrupted one.
  const TrainOutcome resumed = train_run(c, data);
  TrainConfig whole = c;
  whole.resume_path.clear();
  whole.checkpoint_path = temp_path("identity_whole.safetensors");
  const TrainOutcome a = train_run(whole, data);
  EXPECT_EQ(resumed.run.loss_curve_loss, a.run.loss_curve_loss);
  EXPECT_EQ(resumed.run.train_error_eval, a.run.train_error_eval);
  EXPECT_EQ(resumed.run.train_loss_eval, a.run.train_loss_eval);
}

TEST(StudyOptions, DefaultsLeaveTheCheckpointMetadataAsItWas) {
  const std::string ck = temp_path("defaults.safetensors");
  TrainConfig c = study_config(NormKind::batch, 1, 4, ck);
  c.stop_after_steps = 1;
  train_run(c, tiny_data());
  const SafetensorsFile f = load_safetensors(ck);
  for (const char* key : {"init_scale", "dropout", "weight_decay", "eval_train_images", "classes", "init_from"})
    EXPECT_EQ(f.metadata.count(key), 0u) << key;
}

}  // namespace
}  // namespace normkit::train
