// The trainer: a run stopped at a checkpoint and resumed ends bit for bit where an uninterrupted
// run ends (weights, momentum, running statistics, metrics); same seed, same run; mismatched
// options are refused by name; the learning-rate schedule.
#include <gtest/gtest.h>

#include <filesystem>
#include <random>

#include "io/io_error.h"
#include "io/safetensors.h"
#include "normkit/error.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train {
namespace {

// The tensors of a checkpoint that hold the model and optimizer state.
TensorMap state_of(const std::string& path) {
  TensorMap out;
  for (auto& [name, t] : load_safetensors(path).tensors)
    if (name.rfind("param/", 0) == 0 || name.rfind("momentum/", 0) == 0 ||
        name.rfind("buffer/", 0) == 0)
      out[name] = t;
  return out;
}

void expect_same_state(const std::string& a, const std::string& b) {
  const TensorMap ta = state_of(a), tb = state_of(b);
  ASSERT_EQ(ta.size(), tb.size());
  ASSERT_GT(ta.size(), 20u);
  for (const auto& [name, t] : ta) {
    ASSERT_TRUE(tb.count(name)) << name;
    EXPECT_TRUE(t.bytes == tb.at(name).bytes) << name << " differs";
  }
}

void expect_same_metrics(const RunResult& a, const RunResult& b) {
  EXPECT_EQ(a.train_loss, b.train_loss);
  EXPECT_EQ(a.test_loss, b.test_loss);
  EXPECT_EQ(a.test_error, b.test_error);
  EXPECT_EQ(a.test_error_batch_stats.has_value(), b.test_error_batch_stats.has_value());
  if (a.test_error_batch_stats && b.test_error_batch_stats)
    EXPECT_EQ(*a.test_error_batch_stats, *b.test_error_batch_stats);
  EXPECT_EQ(a.loss_curve_step, b.loss_curve_step);
  EXPECT_EQ(a.loss_curve_loss, b.loss_curve_loss);
  ASSERT_EQ(a.history.size(), b.history.size());
  for (size_t i = 0; i < a.history.size(); ++i) {
    EXPECT_EQ(a.history[i].train_loss, b.history[i].train_loss);
    EXPECT_EQ(a.history[i].train_error, b.history[i].train_error);
    EXPECT_EQ(a.history[i].lr, b.history[i].lr);
  }
}

class ResumeTest : public ::testing::TestWithParam<std::tuple<NormKind, int64_t>> {};

TEST_P(ResumeTest, ResumedRunEndsBitForBitLikeAnUninterruptedOne) {
  const auto [kind, stop] = GetParam();
  const std::string tag = std::string(to_string(kind)) + "_" + std::to_string(stop);
  const Data data = tiny_data();
  const std::string whole = temp_path("whole_" + tag + ".safetensors");
  const std::string part = temp_path("part_" + tag + ".safetensors");
  const std::string resumed = temp_path("resumed_" + tag + ".safetensors");

  const TrainOutcome a = train_run(tiny_config(kind, whole), data);
  ASSERT_TRUE(a.finished);
  EXPECT_EQ(a.steps, 36);

  TrainConfig first = tiny_config(kind, part);
  first.stop_after_steps = stop;
  const TrainOutcome b = train_run(first, data);
  EXPECT_FALSE(b.finished);

  TrainConfig second = tiny_config(kind, resumed);
  second.resume_path = part;
  second.threads = 2;  // a resumed run may use another thread count: results do not depend on it
  const TrainOutcome c = train_run(second, data);
  ASSERT_TRUE(c.finished);

  expect_same_state(whole, resumed);
  expect_same_metrics(a.run, c.run);
  // And the stopped run really was somewhere else.
  const TensorMap stopped = state_of(part), done = state_of(whole);
  EXPECT_FALSE(stopped.at("param/fc.weight").bytes == done.at("param/fc.weight").bytes);
}

// Mid-epoch, at an epoch boundary, one step before the end.
INSTANTIATE_TEST_SUITE_P(Stops, ResumeTest,
                         ::testing::Combine(::testing::Values(NormKind::batch, NormKind::group),
                                            ::testing::Values(int64_t{7}, int64_t{12}, int64_t{35})));

// The newer arms: tau, v and the raw weights of standardized convolutions resume too.
INSTANTIATE_TEST_SUITE_P(Arms, ResumeTest,
                         ::testing::Combine(::testing::Values(NormKind::group_ws, NormKind::frn,
                                                              NormKind::evonorm,
                                                              NormKind::batch_renorm),
                                            ::testing::Values(int64_t{7}, int64_t{12})));

TEST(Trainer, CheckpointsHoldTheArmsOwnParameters) {
  const Data data = tiny_data();
  for (NormKind kind : {NormKind::frn, NormKind::evonorm}) {
    const std::string path = temp_path(std::string("arm_") + to_string(kind) + ".safetensors");
    train_run(tiny_config(kind, path), data);
    const TensorMap state = state_of(path);
    const std::string extra = kind == NormKind::frn ? ".tau" : ".v";
    // The TLU (the gate) after stem.norm and each block's norm1, none where a sum follows.
    EXPECT_TRUE(state.count("param/stem.norm" + extra)) << path;
    EXPECT_TRUE(state.count("param/stage1.block1.norm1" + extra)) << path;
    EXPECT_TRUE(state.count("momentum/stage1.block1.norm1" + extra)) << path;
    EXPECT_FALSE(state.count("param/stage1.block1.norm2" + extra)) << path;
    EXPECT_FALSE(state.count("param/stage2.block1.shortcut.norm" + extra)) << path;
    // A checkpoint of one arm starts a run of the same arm, not of another norm family.
    TrainConfig next = tiny_config(kind, "");
    next.init_from = path;
    next.epochs = 1;
    EXPECT_TRUE(train_run(next, data).finished);
    TrainConfig other = tiny_config(kind == NormKind::frn ? NormKind::evonorm : NormKind::frn, "");
    other.init_from = path;
    EXPECT_THROW(train_run(other, data), IoError);
    std::filesystem::remove(path);
  }
}

// brn: bn's running statistics under bn's names; the renorm options are the run's identity, so
// a resume with other limits or warm-up is refused by name. (Stops 7 of 36 steps is within the
// default warm-up's 9: the resume above continues the limits' ramp from the global step.)
TEST(Trainer, BrnCheckpointsHoldBnStatisticsAndItsOptions) {
  const Data data = tiny_data();
  const std::string path = temp_path("brn_identity.safetensors");
  TrainConfig first = tiny_config(NormKind::batch_renorm, path);
  first.stop_after_steps = 5;
  EXPECT_FALSE(train_run(first, data).finished);
  const TensorMap state = state_of(path);
  EXPECT_TRUE(state.count("buffer/stem.norm.running_mean")) << path;
  EXPECT_TRUE(state.count("buffer/stage1.block1.norm2.running_var")) << path;
  const auto& meta = load_safetensors(path).metadata;
  EXPECT_EQ(meta.at("renorm_r_max"), "3");
  EXPECT_EQ(meta.at("renorm_warmup"), "0.25");
  for (int which = 0; which < 3; ++which) {
    TrainConfig other = tiny_config(NormKind::batch_renorm, "");
    other.resume_path = path;
    const char* option = which == 0 ? "--renorm-r-max" : which == 1 ? "--renorm-d-max" : "--renorm-warmup";
    (which == 0 ? other.renorm_r_max : which == 1 ? other.renorm_d_max : other.renorm_warmup) = which == 2 ? 0.5 : 2;
    try {
      train_run(other, data);
      ADD_FAILURE() << option << " was not refused";
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(option), std::string::npos) << e.what();
    }
  }
  // A bn checkpoint carries none of them: its bytes are what they were.
  const std::string bn = temp_path("bn_identity.safetensors");
  TrainConfig plain = tiny_config(NormKind::batch, bn);
  plain.stop_after_steps = 5;
  train_run(plain, data);
  EXPECT_FALSE(load_safetensors(bn).metadata.count("renorm_r_max"));
  std::filesystem::remove(path);
  std::filesystem::remove(bn);
}

TEST(Trainer, SameSeedSameRunOtherSeedOtherRun) {
  const Data data = tiny_data();
  const std::string p1 = temp_path("seed_a.safetensors"), p2 = temp_path("seed_b.safetensors"),
                    p3 = temp_path("seed_c.safetensors");
  const TrainOutcome a = train_run(tiny_config(NormKind::batch, p1), data);
  const TrainOutcome b = train_run(tiny_config(NormKind::batch, p2), data);
  expect_same_state(p1, p2);
  expect_same_metrics(a.run, b.run);
  TrainConfig other = tiny_config(NormKind::batch, p3);
  other.seed = 12;
  train_run(other, data);
  EXPECT_FALSE(state_of(p1).at("param/fc.weight").bytes == state_of(p3).at("param/fc.weight").bytes);
}

TEST(Trainer, ReportsWhatItMeasured) {
  const Data data = tiny_data();
  const TrainOutcome o = train_run(tiny_config(NormKind::batch, ""), data);
  EXPECT_EQ(o.train_images, 50);
  EXPECT_EQ(o.test_images, 30);
  EXPECT_EQ(o.run.history.size(), 3u);
  EXPECT_TRUE(o.run.test_error_batch_stats.has_value());
  EXPECT_GE(o.run.test_error, 0.0);
  EXPECT_LE(o.run.test_error, 100.0);
  EXPECT_GT(o.run.images_per_s, 0.0);
  // The loss curve: 10 points over the 36 steps, each the mean of 3 or 4 of them, together
  // every step once (weighted by its share, the points give the epochs' mean losses back).
  const auto& steps = o.run.loss_curve_step;
  ASSERT_EQ(steps.size(), 10u);
  ASSERT_EQ(o.run.loss_curve_loss.size(), 10u);
  EXPECT_EQ(steps.back(), 36);
  double curve_sum = 0, epoch_sum = 0;
  for (size_t k = 0; k < steps.size(); ++k) {
    const int64_t share = steps[k] - (k == 0 ? 0 : steps[k - 1]);
    EXPECT_TRUE(share == 3 || share == 4) << "point " << k << " covers " << share << " steps";
    curve_sum += share * o.run.loss_curve_loss[k];
  }
  for (const auto& e : o.run.history) epoch_sum += 12 * e.train_loss;
  EXPECT_NEAR(curve_sum, epoch_sum, 1e-9 * epoch_sum);
  EXPECT_DOUBLE_EQ(o.run.lr, 0.1 * 4 / 32);
  // The loss fell: the last epoch's mean is below the first's.
  EXPECT_LT(o.run.history.back().train_loss, o.run.history.front().train_loss);
  // More points asked for than there are steps: one point per step.
  TrainConfig fine = tiny_config(NormKind::group, "");
  fine.curve_points = 50;
  const TrainOutcome g = train_run(fine, data);
  EXPECT_FALSE(g.run.test_error_batch_stats.has_value());
  ASSERT_EQ(g.run.loss_curve_step.size(), 36u);
  for (size_t k = 0; k < 36; ++k) EXPECT_EQ(g.run.loss_curve_step[k], int64_t(k) + 1);
}

TEST(Trainer, RefusesACheckpointOfAnotherRun) {
  const Data data = tiny_data();
  const std::string path = temp_path("other.safetensors");
  TrainConfig first = tiny_config(NormKind::batch, path);
  first.stop_after_steps = 5;
  train_run(first, data);
  TrainConfig second = tiny_config(NormKind::batch, "");
  second.resume_path = path;
  second.batch = 5;
  try {
    train_run(second, data);
    FAIL() << "no error";
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("--batch"), std::string::npos) << msg;
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
  }
  second = tiny_config(NormKind::group, "");
  second.resume_path = path;
  EXPECT_THROW(train_run(second, data), IoError);
}

TEST(Trainer, LearningRateScheduleAndOptionChecks) {
  TrainConfig c;
  c.batch = 8;
  c.lr_base = 0.1;
  c.lr_decay_at = {0.5, 0.75};
  EXPECT_DOUBLE_EQ(learning_rate(c, 0, 100), 0.025);
  EXPECT_DOUBLE_EQ(learning_rate(c, 49, 100), 0.025);
  EXPECT_DOUBLE_EQ(learning_rate(c, 50, 100), 0.0025);
  EXPECT_NEAR(learning_rate(c, 75, 100), 0.00025, 1e-15);
  TrainConfig bad;
  bad.model.norm = NormKind::group;
  bad.model.groups = 3;
  EXPECT_THROW(validate(bad), normkit::Error);
  bad = TrainConfig{};
  bad.stop_after_steps = 3;  // without --checkpoint
  EXPECT_THROW(validate(bad), normkit::Error);
  bad = TrainConfig{};
  bad.lr_decay_at = {1.5};
  EXPECT_THROW(validate(bad), normkit::Error);
}

}  // namespace
}  // namespace normkit::train
