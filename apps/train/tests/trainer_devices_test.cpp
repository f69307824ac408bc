// Logical devices: a step of K devices is, bit for bit, K replicas that each run forward and
// backward on their own images, whose gradients are summed in device order and divided by K,
// then one SGD step (computed here by hand with the engine's layers); K = 1 is the
// single-device step. BN per device differs from one device of K * N images, GN does not (it
// is per sample); synchronized BN agrees with one device of K * N images within float
// tolerance. A run of several devices resumes exactly; bad device options are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <memory>

#include "io/safetensors.h"
#include "nn/sgd.h"
#include "preflight.h"
#include "normkit/error.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train {
namespace {

// After one step of `config` on `data`, by hand: the parameter values and device 0's buffers.
TensorMap one_step_by_hand(const TrainConfig& config, const Data& data) {
  ModelConfig mc = config.model;
  mc.in_channels = 1;
  mc.classes = 3;
  const int64_t count = config.limit_train < 0 ? data.train.count : config.limit_train;
  const std::vector<int64_t> perm = epoch_permutation(config.seed, 0, count);
  const int64_t image = data.train.image_size(), n = config.batch;
  std::vector<std::unique_ptr<Model>> devices;
  for (int d = 0; d < config.devices; ++d) {
    devices.push_back(std::make_unique<Model>(mc));
    Model& m = *devices.back();
    m.init(config.seed);
    Tensor x;
    x.resize(n, data.train.rows, data.train.cols, 1);
    std::vector<uint8_t> labels(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at = perm[static_cast<size_t>(d * n + i)];
      std::copy_n(data.train.images.data() + at * image, image, x.data.data() + i * image);
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
  sgd_step(params, config.lr_base * static_cast<double>(config.devices * config.batch) / 32.0, SgdConfig{});
  TensorMap out;
  for (Param* p : params) out["param/" + p->name] = make_f32(p->value);
  for (const Buffer& b : devices[0]->buffers()) out["buffer/" + b.name] = make_f32(*b.values);
  return out;
}

TrainConfig devices_config(NormKind kind, int devices, int batch, const std::string& checkpoint) {
  TrainConfig c = tiny_config(kind, checkpoint);
  c.devices = devices;
  c.batch = batch;
  c.epochs = 1;
  c.curve_points = 1000;  // a point per step: curve_loss[0] is the first step's loss
  c.lr_decay_at = {};
  return c;
}

class DeviceStepTest : public ::testing::TestWithParam<std::tuple<NormKind, int>> {};

TEST_P(DeviceStepTest, IsTheDevicesMeanGradientSummedInDeviceOrder) {
  const auto [kind, devices] = GetParam();
  const Data data = tiny_data();
  const std::string ck = temp_path("devices_step_" + std::string(to_string(kind)) + "_" +
                                   std::to_string(devices) + ".safetensors");
  TrainConfig c = devices_config(kind, devices, 4, ck);
  c.stop_after_steps = 1;
  train_run(c, data);
  const TensorMap want = one_step_by_hand(c, data);
  const SafetensorsFile got = load_safetensors(ck);
  ASSERT_GT(want.size(), 10u);
  for (const auto& [name, t] : want) {
    ASSERT_TRUE(got.tensors.count(name)) << name;
    EXPECT_TRUE(got.tensors.at(name).bytes == t.bytes) << name << " differs";
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, DeviceStepTest,
                         ::testing::Combine(::testing::Values(NormKind::batch, NormKind::group),
                                            ::testing::Values(1, 2, 3)));
// The newer arms have no batch statistics: per-replica parameters as gn's, nothing exchanged.
INSTANTIATE_TEST_SUITE_P(Arms, DeviceStepTest,
                         ::testing::Combine(::testing::Values(NormKind::group_ws, NormKind::frn,
                                                              NormKind::evonorm),
                                            ::testing::Values(2, 3)));

// The first step's loss and device 0's running statistics after it.
struct FirstStep {
  double loss = 0;
  std::vector<float> running_mean;
};
FirstStep first_step(TrainConfig c, const Data& data, const std::string& tag) {
  c.checkpoint_path = temp_path("first_step_" + tag + ".safetensors");
  c.stop_after_steps = 1;
  const TrainOutcome o = train_run(c, data);
  FirstStep f;
  EXPECT_EQ(o.run.loss_curve_loss.size(), 1u);
  f.loss = o.run.loss_curve_loss.at(0);
  const SafetensorsFile ck = load_safetensors(c.checkpoint_path);
  if (c.model.norm == NormKind::batch) f.running_mean = get_f32(ck, "buffer/stem.norm.running_mean");
  return f;
}

TEST(Devices, PerDeviceBatchNormIsNotOneBigBatchButGroupNormIs) {
  const Data data = tiny_data();
  for (NormKind kind : {NormKind::batch, NormKind::group, NormKind::group_ws, NormKind::frn,
                        NormKind::evonorm}) {
    const std::string tag = to_string(kind);
    const FirstStep four = first_step(devices_config(kind, 4, 2, ""), data, tag + "_4x2");
    const FirstStep one = first_step(devices_config(kind, 1, 8, ""), data, tag + "_1x8");
    if (kind == NormKind::batch) {
      // Statistics over 2 images per device against over 8.
      EXPECT_GT(std::abs(four.loss - one.loss), 1e-4 * std::abs(one.loss));
      double diff = 0;
      for (size_t i = 0; i < one.running_mean.size(); ++i)
        diff = std::max(diff, double(std::abs(four.running_mean[i] - one.running_mean[i])));
      EXPECT_GT(diff, 1e-4);
    } else {
      // Per sample: the same logits, the mean taken in another order.
      EXPECT_NEAR(four.loss, one.loss, 1e-12 * std::abs(one.loss));
    }
  }
}

TEST(Devices, SynchronizedBatchNormAgreesWithOneBigBatch) {
  const Data data = tiny_data();
  TrainConfig sync = devices_config(NormKind::batch, 4, 2, "");
  sync.sync_bn = true;
  const FirstStep four = first_step(sync, data, "sync_4x2");
  const FirstStep one = first_step(devices_config(NormKind::batch, 1, 8, ""), data, "sync_1x8");
  EXPECT_NEAR(four.loss, one.loss, 1e-5 * std::abs(one.loss));
  ASSERT_EQ(four.running_mean.size(), one.running_mean.size());
  for (size_t i = 0; i < one.running_mean.size(); ++i)
    EXPECT_NEAR(four.running_mean[i], one.running_mean[i], 1e-5) << i;
}

TEST(Devices, ResumedRunEndsBitForBitLikeAnUninterruptedOne) {
  const Data data = tiny_data();
  for (bool sync : {false, true}) {
    const std::string tag = sync ? "sync" : "per_device";
    TrainConfig whole = devices_config(NormKind::batch, 3, 4, temp_path("dev_whole_" + tag + ".safetensors"));
    whole.epochs = 2;
    whole.sync_bn = sync;
    const TrainOutcome a = train_run(whole, data);
    TrainConfig part = whole;
    part.checkpoint_path = temp_path("dev_part_" + tag + ".safetensors");
    part.stop_after_steps = 5;  // inside the second epoch (4 steps of 12 images per epoch)
    train_run(part, data);
    part.stop_after_steps = -1;
    part.resume_path = part.checkpoint_path;
    const TrainOutcome b = train_run(part, data);
    EXPECT_EQ(a.run.train_loss, b.run.train_loss) << tag;
    EXPECT_EQ(a.run.test_error, b.run.test_error) << tag;
    EXPECT_EQ(a.run.loss_curve_loss, b.run.loss_curve_loss) << tag;
    const SafetensorsFile ca = load_safetensors(whole.checkpoint_path), cb = load_safetensors(part.checkpoint_path);
    for (const auto& [name, t] : ca.tensors)
      if (name.rfind("param/", 0) == 0 || name.rfind("momentum/", 0) == 0 || name.rfind("buffer/", 0) == 0)
        EXPECT_TRUE(cb.tensors.at(name).bytes == t.bytes) << tag << " " << name;
    // A checkpoint of 3 devices is refused by a run of 1, by name.
    TrainConfig other = part;
    other.devices = 1;
    try {
      train_run(other, data);
      ADD_FAILURE() << "resumed with another device count";
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find("--devices"), std::string::npos) << e.what();
    }
  }
}

TEST(Devices, MemoryPreflightCountsEveryDeviceOfTheProcess) {
  TrainConfig one = devices_config(NormKind::batch, 1, 16, "");
  one.model.widths = {16, 32, 64};
  TrainConfig four = one;
  four.devices = 4;
  const MemoryEstimate e1 = estimate_run_memory(one, 28, 28, 100);
  const MemoryEstimate e4 = estimate_run_memory(four, 28, 28, 100);
  // Three more replicas, each with the activations of its own 16 images.
  const MemoryEstimate replica = estimate_memory(one.model, 16, 0, 28, 28, one.threads);
  EXPECT_GE(e4.activations, e1.activations + 3 * replica.activations);
  EXPECT_GE(e4.parameters, e1.parameters + 3 * replica.parameters);
  // Room for one device but not for four: refused, naming --devices.
  ::setenv("NORMKIT_TRAIN_AVAILABLE_MEMORY",
           std::to_string(static_cast<uint64_t>((e1.total() + e4.total()) / 2)).c_str(), 1);
  EXPECT_NO_THROW(check_fits_in_memory(one, 28, 28, 100));
  try {
    check_fits_in_memory(four, 28, 28, 100);
    ADD_FAILURE() << "four devices fit";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--devices (4)"), std::string::npos) << e.what();
  }
  ::unsetenv("NORMKIT_TRAIN_AVAILABLE_MEMORY");
}

void expect_refused(const TrainConfig& c, const std::string& words) {
  try {
    validate(c);
    check_fits_data(c, tiny_data());
    ADD_FAILURE() << "accepted; expected: " << words;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(words), std::string::npos) << e.what();
  }
}

TEST(Devices, BadOptionsAreRefusedByName) {
  expect_refused(devices_config(NormKind::batch, 0, 4, ""), "--devices 0: must be >= 1");
  TrainConfig gn = devices_config(NormKind::group, 2, 4, "");
  gn.sync_bn = true;
  expect_refused(gn, "--sync-bn with --norm gn");
  // 13 devices of 4 images are more than the 50 training images.
  expect_refused(devices_config(NormKind::batch, 13, 4, ""), "--devices 13 x --batch 4 = 52");
}

}  // namespace
}  // namespace normkit::train
