// The GroupNorm paper's protocol in the trainer: augmentation drawn from (seed, epoch, position)
// alone (a crop window of the padded image and a flip, checked against an explicit padding
// here; one step of two augmented devices computed by hand; the same bits for any thread count
// and after resuming), the learning-rate warm-up against its formula, precise BN statistics
// against a float64 recomputation and leaving the trained running statistics as they were,
// and the checkpoint refusing another augmentation or warm-up by name.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <tuple>

#include "io/safetensors.h"
#include "nn/conv.h"
#include "nn/parallel.h"
#include "nn/sgd.h"
#include "normkit/error.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train {
namespace {

TrainConfig protocol_config(NormKind kind, const std::string& checkpoint) {
  TrainConfig c = tiny_config(kind, checkpoint);
  c.crop_pad = 2;
  c.hflip = true;
  return c;
}

// ---- learning rate ------------------------------------------------------------------------

TEST(LearningRate, WarmUpRisesLinearlyFromTheBaseToTheScaledRate) {
  TrainConfig c;
  c.lr_base = 0.1;
  c.batch = 32;
  c.devices = 4;  // global batch 128: scaled rate 0.4
  c.lr_decay_at = {0.5};
  c.lr_warmup = 0.25;
  const int64_t total = 100;  // warm-up over steps [0, 25)
  EXPECT_DOUBLE_EQ(learning_rate(c, 0, total), 0.1);
  for (int64_t s : {1, 7, 13, 24})
    EXPECT_NEAR(learning_rate(c, s, total), 0.1 + 0.3 * static_cast<double>(s) / 25.0, 1e-15) << s;
  EXPECT_DOUBLE_EQ(learning_rate(c, 25, total), 0.4);
  EXPECT_DOUBLE_EQ(learning_rate(c, 49, total), 0.4);
  EXPECT_NEAR(learning_rate(c, 50, total), 0.04, 1e-15);
  // A decay inside the warm-up applies to the warmed-up rate.
  c.lr_decay_at = {0.1};
  EXPECT_NEAR(learning_rate(c, 10, total), (0.1 + 0.3 * 10.0 / 25.0) * 0.1, 1e-15);
}

TEST(LearningRate, WarmUpChangesNothingAtAGlobalBatchOf32OrLessOrWhenOff) {
  for (auto [devices, batch] : {std::pair{1, 32}, std::pair{2, 16}, std::pair{1, 8}}) {
    TrainConfig off;
    off.devices = devices;
    off.batch = batch;
    TrainConfig on = off;
    on.lr_warmup = 0.5;
    for (int64_t s = 0; s < 100; s += 7)
      EXPECT_EQ(learning_rate(on, s, 100), learning_rate(off, s, 100)) << devices << "x" << batch;
  }
  TrainConfig big;
  big.batch = 64;
  EXPECT_EQ(learning_rate(big, 3, 100), 0.2);  // lr_warmup 0: the scaled rate from step 0
}

// ---- augmentation -------------------------------------------------------------------------

// The image padded by p pixels on each side with `background`, (rows + 2p) x (cols + 2p).
std::vector<float> padded(const std::vector<float>& image, int rows, int cols, int p, float background) {
  std::vector<float> out(static_cast<size_t>((rows + 2 * p) * (cols + 2 * p)), background);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) out[(r + p) * (cols + 2 * p) + c + p] = image[r * cols + c];
  return out;
}

// The (y, x, flip) for which `out` is the window at (y, x) of the padded image, flipped or not;
// (-1, -1, false) when none is.
std::tuple<int, int, bool> window_of(const std::vector<float>& out, const std::vector<float>& pad,
                                     int rows, int cols, int p) {
  for (int y = 0; y <= 2 * p; ++y)
    for (int x = 0; x <= 2 * p; ++x)
      for (bool flip : {false, true}) {
        bool same = true;
        for (int r = 0; r < rows && same; ++r)
          for (int c = 0; c < cols && same; ++c)
            same = out[r * cols + c] == pad[(r + y) * (cols + 2 * p) + x + (flip ? cols - 1 - c : c)];
        if (same) return {y, x, flip};
      }
  return {-1, -1, false};
}

TEST(Augmentation, IsAWindowOfThePaddedImageFlippedHalfTheTime) {
  const int rows = 7, cols = 9, p = 3;  // odd sizes, not square
  std::mt19937_64 rng(5);
  std::normal_distribution<float> d;
  std::vector<float> image(rows * cols);
  for (float& v : image) v = d(rng);  // distinct values: the window is unambiguous
  const float background = -0.4242f;
  const std::vector<float> pad = padded(image, rows, cols, p, background);
  std::map<std::pair<int, int>, int> offsets;
  int flips = 0;
  const int draws = 4000;
  for (int64_t position = 0; position < draws; ++position) {
    std::vector<float> out(image.size(), std::nanf(""));
    augment_image(image.data(), rows, cols, 1, p, true, background, 7, 2, position, out.data());
    const auto [y, x, flip] = window_of(out, pad, rows, cols, p);
    ASSERT_GE(y, 0) << "position " << position << " is no window of the padded image";
    ++offsets[{y, x}];
    flips += flip;
    // A function of (seed, epoch, position) alone.
    std::vector<float> again(image.size());
    augment_image(image.data(), rows, cols, 1, p, true, background, 7, 2, position, again.data());
    ASSERT_EQ(out, again);
  }
  // Every offset of the (2p + 1)^2 occurs, about equally often; flips about half the time.
  ASSERT_EQ(offsets.size(), 49u);
  for (const auto& [at, n] : offsets) EXPECT_NEAR(n, draws / 49.0, 5 * std::sqrt(draws / 49.0)) << at.first << "," << at.second;
  EXPECT_NEAR(flips, draws / 2.0, 5 * std::sqrt(draws / 4.0));
}

TEST(Augmentation, OffIsACopyAndEachOptionAlone) {
  const int rows = 5, cols = 6;
  std::vector<float> image(rows * cols * 2);  // two channels: a pixel moves as a whole
  for (size_t i = 0; i < image.size(); ++i) image[i] = static_cast<float>(i) + 0.5f;
  std::vector<float> out(image.size(), std::nanf(""));
  augment_image(image.data(), rows, cols, 2, 0, false, 0.0f, 1, 0, 3, out.data());
  EXPECT_EQ(out, image);
  // Flip only: the image or its mirror, and both occur.
  std::set<bool> seen;
  for (int64_t position = 0; position < 64; ++position) {
    augment_image(image.data(), rows, cols, 2, 0, true, 0.0f, 1, 0, position, out.data());
    bool mirrored = true, same = out == image;
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c)
        for (int ch = 0; ch < 2; ++ch)
          mirrored &= out[(r * cols + c) * 2 + ch] == image[(r * cols + cols - 1 - c) * 2 + ch];
    ASSERT_TRUE(same || mirrored) << position;
    seen.insert(mirrored);
  }
  EXPECT_EQ(seen.size(), 2u);
  // Crop only: never flipped (on one channel, against the padded image).
  std::vector<float> one(image.begin(), image.begin() + rows * cols);
  const std::vector<float> pad = padded(one, rows, cols, 1, -1.0f);
  std::vector<float> o1(one.size());
  for (int64_t position = 0; position < 64; ++position) {
    augment_image(one.data(), rows, cols, 1, 1, false, -1.0f, 1, 0, position, o1.data());
    const auto [y, x, flip] = window_of(o1, pad, rows, cols, 1);
    ASSERT_GE(y, 0);
    EXPECT_FALSE(flip) << position;
  }
  // Another seed or epoch draws otherwise.
  std::vector<float> a(one.size()), b(one.size()), e(one.size());
  int differ_seed = 0, differ_epoch = 0;
  for (int64_t position = 0; position < 32; ++position) {
    augment_image(one.data(), rows, cols, 1, 2, true, 0.0f, 1, 0, position, a.data());
    augment_image(one.data(), rows, cols, 1, 2, true, 0.0f, 2, 0, position, b.data());
    augment_image(one.data(), rows, cols, 1, 2, true, 0.0f, 1, 1, position, e.data());
    differ_seed += a != b;
    differ_epoch += a != e;
  }
  EXPECT_GT(differ_seed, 16);
  EXPECT_GT(differ_epoch, 16);
}

// One step of `config` (augmentation on) computed by hand: device d's image i is the
// permutation's entry d * batch + i, augmented for that position of epoch 0.
TensorMap augmented_step_by_hand(const TrainConfig& config, const Data& data) {
  ModelConfig mc = config.model;
  mc.in_channels = 1;
  mc.classes = 3;
  const std::vector<int64_t> perm = epoch_permutation(config.seed, 0, data.train.count);
  const int64_t image = data.train.image_size(), n = config.batch;
  const float background = (0.0f - data.mean) * (1.0f / data.stddev);
  std::vector<std::unique_ptr<Model>> devices;
  for (int d = 0; d < config.devices; ++d) {
    devices.push_back(std::make_unique<Model>(mc));
    Model& m = *devices.back();
    m.init(config.seed);
    Tensor x;
    x.resize(n, data.train.rows, data.train.cols, 1);
    std::vector<uint8_t> labels(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t position = d * n + i, at = perm[static_cast<size_t>(position)];
      augment_image(data.train.images.data() + at * image, data.train.rows, data.train.cols, 1,
                    config.crop_pad, config.hflip, background, config.seed, 0, position,
                    x.data.data() + i * image);
      labels[static_cast<size_t>(i)] = data.train.labels[static_cast<size_t>(at)];
    }
    SoftmaxCrossEntropy ce;
    ce.forward(m.forward(x, Mode::train), labels.data());
    m.backward(ce.gradient());
  }
  const std::vector<Param*> params = devices[0]->params();
  for (size_t p = 0; p < params.size(); ++p) {
    std::vector<float>& g = params[p]->grad;
    for (int d = 1; d < config.devices; ++d)
      for (size_t i = 0; i < g.size(); ++i) g[i] += devices[d]->params()[p]->grad[i];
    if (config.devices > 1)
      for (float& v : g) v /= static_cast<float>(config.devices);
  }
  sgd_step(params, learning_rate(config, 0, 1), SgdConfig{});
  TensorMap out;
  for (Param* p : params) out["param/" + p->name] = make_f32(p->value);
  for (const Buffer& b : devices[0]->buffers()) out["buffer/" + b.name] = make_f32(*b.values);
  return out;
}

TEST(Augmentation, AStepOfAugmentedDevicesIsTheHandComputedOne) {
  Data data = tiny_data();
  data.mean = 0.25f;  // a background that is not 0
  data.stddev = 2.0f;
  for (int devices : {1, 2}) {
    const std::string ck = temp_path("protocol_step_" + std::to_string(devices) + ".safetensors");
    TrainConfig c = protocol_config(NormKind::batch, ck);
    c.devices = devices;
    c.epochs = 1;
    c.lr_decay_at = {};
    c.stop_after_steps = 1;
    train_run(c, data);
    const TensorMap expected = augmented_step_by_hand(c, data);
    const SafetensorsFile f = load_safetensors(ck);
    for (const auto& [name, t] : expected)
      EXPECT_TRUE(f.tensors.at(name).bytes == t.bytes) << devices << " device(s): " << name;
  }
}

TEST(Augmentation, TheSameBitsForAnyThreadCountAndAfterResuming) {
  const Data data = tiny_data();
  for (int devices : {1, 2}) {
    const std::string tag = std::to_string(devices);
    TrainConfig whole = protocol_config(NormKind::batch, temp_path("aug_whole_" + tag + ".safetensors"));
    whole.devices = devices;
    whole.batch = 4 / devices;
    whole.lr_warmup = 0.3;
    whole.epochs = 2;
    const TrainOutcome a = train_run(whole, data);
    TrainConfig threads = whole;
    threads.threads = 3;
    threads.checkpoint_path = temp_path("aug_threads_" + tag + ".safetensors");
    const TrainOutcome t = train_run(threads, data);
    EXPECT_EQ(a.run.loss_curve_loss, t.run.loss_curve_loss) << tag;
    EXPECT_EQ(a.run.test_error_precise, t.run.test_error_precise) << tag;
    TrainConfig part = whole;
    part.checkpoint_path = temp_path("aug_part_" + tag + ".safetensors");
    part.stop_after_steps = 17;  // inside the second epoch (12 steps per epoch)
    train_run(part, data);
    part.stop_after_steps = -1;
    part.resume_path = part.checkpoint_path;
    const TrainOutcome b = train_run(part, data);
    EXPECT_EQ(a.run.train_loss, b.run.train_loss) << tag;
    EXPECT_EQ(a.run.loss_curve_loss, b.run.loss_curve_loss) << tag;
    EXPECT_EQ(a.run.test_error, b.run.test_error) << tag;
    const SafetensorsFile ca = load_safetensors(whole.checkpoint_path), cb = load_safetensors(part.checkpoint_path);
    for (const auto& [name, tensor] : ca.tensors)
      if (name.rfind("param/", 0) == 0 || name.rfind("buffer/", 0) == 0)
        EXPECT_TRUE(cb.tensors.at(name).bytes == tensor.bytes) << tag << " " << name;
    // Augmentation changes the run.
    TrainConfig plain = whole;
    plain.crop_pad = 0;
    plain.hflip = false;
    plain.checkpoint_path = temp_path("aug_plain_" + tag + ".safetensors");
    EXPECT_NE(train_run(plain, data).run.loss_curve_loss, a.run.loss_curve_loss) << tag;
  }
}

TEST(Augmentation, ACheckpointRefusesAnotherAugmentationOrWarmUpByName) {
  const Data data = tiny_data();
  TrainConfig c = protocol_config(NormKind::group, temp_path("aug_identity.safetensors"));
  c.lr_warmup = 0.2;
  c.stop_after_steps = 3;
  train_run(c, data);
  c.stop_after_steps = -1;
  c.resume_path = c.checkpoint_path;
  for (const char* option : {"--crop-pad", "--hflip", "--warmup"}) {
    TrainConfig other = c;
    if (std::string(option) == "--crop-pad") other.crop_pad = 1;
    if (std::string(option) == "--hflip") other.hflip = false;
    if (std::string(option) == "--warmup") other.lr_warmup = 0;
    try {
      train_run(other, data);
      ADD_FAILURE() << "resumed with another " << option;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(option), std::string::npos) << e.what();
    }
  }
  EXPECT_NO_THROW(train_run(c, data));
}

TEST(Augmentation, BadOptionsAreRefusedByName) {
  auto refused = [](TrainConfig c, const std::string& words) {
    try {
      validate(c);
      ADD_FAILURE() << "accepted; expected: " << words;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
    }
  };
  TrainConfig c = tiny_config(NormKind::batch, "");
  TrainConfig bad = c;
  bad.crop_pad = -1;
  refused(bad, "--crop-pad -1");
  bad = c;
  bad.lr_warmup = 1;
  refused(bad, "--warmup 1");
  bad = c;
  bad.precise_bn_batch = 1;
  refused(bad, "--precise-bn-batch 1");
  bad = c;
  bad.precise_bn_images = -3;
  refused(bad, "--precise-bn-images -3");
}

// ---- precise BN statistics ----------------------------------------------------------------

ModelConfig small_model() {
  ModelConfig mc;
  mc.norm = NormKind::batch;
  mc.widths = {4, 8};
  mc.in_channels = 1;
  mc.classes = 3;
  return mc;
}

Dataset first_images(const Dataset& d, int64_t from, int64_t count) {
  Dataset s = d;
  s.count = count;
  s.images.assign(d.images.begin() + from * d.image_size(), d.images.begin() + (from + count) * d.image_size());
  s.labels.assign(d.labels.begin() + from, d.labels.begin() + from + count);
  return s;
}

std::map<std::string, std::vector<float>> buffers_of(Model& m) {
  std::map<std::string, std::vector<float>> out;
  for (const Buffer& b : m.buffers()) out[b.name] = *b.values;
  return out;
}

TEST(PreciseStatistics, OneBatchGivesThatBatchsMeanAndUnbiasedVarianceInFloat64) {
  const Data data = tiny_data();
  Model m(small_model());
  m.init(3);
  const int n = 13;  // odd
  precise_statistics(m, data.train, n, n);
  // The stem norm's input is the stem convolution's output: recomputed here with the model's
  // weights, its statistics in float64.
  Conv2d conv("stem.conv", 1, 4, 3, 1);
  for (Param* p : m.params())
    if (p->name == conv.weight.name) conv.weight.value = p->value;
  Tensor x;
  x.resize(n, data.train.rows, data.train.cols, 1);
  std::copy_n(data.train.images.data(), n * data.train.image_size(), x.data.data());
  const Tensor& y = conv.forward(x);
  const auto got = buffers_of(m);
  const std::vector<float>* mean = nullptr;
  const std::vector<float>* var = nullptr;
  for (const auto& [name, v] : got) {
    if (name.rfind("stem", 0) == 0 && name.find("running_mean") != std::string::npos) mean = &v;
    if (name.rfind("stem", 0) == 0 && name.find("running_var") != std::string::npos) var = &v;
  }
  ASSERT_TRUE(mean && var);
  const int64_t count = y.pixels();
  for (int64_t c = 0; c < y.c; ++c) {
    double s = 0;
    for (int64_t i = 0; i < count; ++i) s += y.data[static_cast<size_t>(i * y.c + c)];
    const double mu = s / static_cast<double>(count);
    double ss = 0;
    for (int64_t i = 0; i < count; ++i) {
      const double dv = y.data[static_cast<size_t>(i * y.c + c)] - mu;
      ss += dv * dv;
    }
    const double variance = ss / static_cast<double>(count - 1);
    EXPECT_NEAR((*mean)[c], mu, 1e-5 * (1 + std::abs(mu))) << c;
    EXPECT_NEAR((*var)[c], variance, 1e-5 * (1 + variance)) << c;
  }
}

TEST(PreciseStatistics, SeveralBatchesAverageTheBatchesWithEqualWeight) {
  const Data data = tiny_data();
  const int batch = 7, batches = 3;  // 21 images of the 50; a partial last batch is left out
  Model all(small_model());
  all.init(4);
  precise_statistics(all, data.train, batch * batches + 5, batch);
  std::map<std::string, std::vector<double>> mean_of_batches;
  for (int b = 0; b < batches; ++b) {
    Model one(small_model());
    one.init(4);
    precise_statistics(one, first_images(data.train, b * batch, batch), batch, batch);
    for (const auto& [name, v] : buffers_of(one)) {
      auto& acc = mean_of_batches[name];
      acc.resize(v.size());
      for (size_t i = 0; i < v.size(); ++i) acc[i] += v[i] / batches;
    }
  }
  const auto got = buffers_of(all);
  ASSERT_FALSE(got.empty());
  for (const auto& [name, v] : got)
    for (size_t i = 0; i < v.size(); ++i)
      EXPECT_NEAR(v[i], mean_of_batches[name][i], 1e-5 * (1 + std::abs(mean_of_batches[name][i]))) << name << " " << i;
}

TEST(PreciseStatistics, TheSameBitsForAnyThreadCountAndTheMomentumComesBack) {
  const Data data = tiny_data();
  Model a(small_model()), b(small_model()), reference(small_model());
  for (Model* m : {&a, &b, &reference}) m->init(6);
  set_threads(1);
  precise_statistics(a, data.train, 40, 10);
  set_threads(3);
  precise_statistics(b, data.train, 40, 10);
  set_threads(1);
  EXPECT_EQ(buffers_of(a), buffers_of(b));
  // Given back the reference's running statistics, a training forward updates them as the
  // reference's: momentum 0.1 again.
  const auto kept = buffers_of(reference);
  for (const Buffer& buf : a.buffers()) *buf.values = kept.at(buf.name);
  Tensor x;
  x.resize(8, data.train.rows, data.train.cols, 1);
  std::copy_n(data.train.images.data(), x.numel(), x.data.data());
  a.forward(x, Mode::train);
  reference.forward(x, Mode::train);
  EXPECT_EQ(buffers_of(a), buffers_of(reference));
  EXPECT_THROW(precise_statistics(a, data.train, 40, 1), Error);
}

TEST(PreciseStatistics, ARunReportsThemAndKeepsItsTrainedRunningStatistics) {
  const Data data = tiny_data();
  for (bool sync : {false, true}) {
    const std::string tag = sync ? "sync" : "plain";
    TrainConfig off = tiny_config(NormKind::batch, temp_path("precise_off_" + tag + ".safetensors"));
    off.precise_bn_images = 0;
    off.devices = sync ? 2 : 1;
    off.batch = sync ? 2 : 4;
    off.sync_bn = sync;
    const TrainOutcome a = train_run(off, data);
    EXPECT_FALSE(a.run.test_error_precise.has_value());
    TrainConfig on = off;
    on.precise_bn_images = 30;
    on.precise_bn_batch = 10;
    on.checkpoint_path = temp_path("precise_on_" + tag + ".safetensors");
    const TrainOutcome b = train_run(on, data);
    ASSERT_TRUE(b.run.test_error_precise.has_value()) << tag;
    EXPECT_EQ(a.run.test_error, b.run.test_error) << tag;
    EXPECT_EQ(a.run.test_error_batch_stats, b.run.test_error_batch_stats) << tag;
    const SafetensorsFile ca = load_safetensors(off.checkpoint_path), cb = load_safetensors(on.checkpoint_path);
    for (const auto& [name, t] : ca.tensors)
      if (name.rfind("buffer/", 0) == 0) EXPECT_TRUE(cb.tensors.at(name).bytes == t.bytes) << tag << " " << name;
    // The precise statistics are those of the final model over the first 30 images: a model
    // with the checkpoint's weights, evaluated with them, gives the same test error.
    Model m(small_model());
    for (Param* p : m.params()) get_f32_into(cb, "param/" + p->name, p->value);
    precise_statistics(m, data.train, 30, 10);
    EXPECT_EQ(evaluate(m, data.test, data.test.count, on.eval_batch, Mode::eval).error, *b.run.test_error_precise) << tag;
  }
  // Not for the norms without running statistics.
  TrainConfig gn = tiny_config(NormKind::group, "");
  gn.epochs = 1;
  EXPECT_FALSE(train_run(gn, data).run.test_error_precise.has_value());
}

}  // namespace
}  // namespace normkit::train
