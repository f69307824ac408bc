// The pre-flight checks: output paths probed without leaving files, memory estimated from the
// options (close to what a run holds, no overflow for absurd shapes), refusals that name the
// option to change, and a batch larger than the data.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>

#include "io/io_error.h"
#include "normkit/error.h"
#include "preflight.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train {
namespace {

namespace fs = std::filesystem;

size_t entries(const fs::path& dir) {
  size_t n = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir)) ++n;
  return n;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

TEST(Preflight, OutputPathsAreProbedWithoutLeavingFiles) {
  const fs::path dir = fs::path(::testing::TempDir()) / ("preflight_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir / "sub");
  check_output_file("--metrics-out", (dir / "m.json").string());
  check_output_folder("--out", (dir / "new" / "deeper").string());
  check_output_folder("--out", (dir / "sub").string());
  EXPECT_EQ(entries(dir), 1u);
  EXPECT_EQ(entries(dir / "sub"), 0u);
  EXPECT_FALSE(fs::exists(dir / "m.json"));
  EXPECT_FALSE(fs::exists(dir / "new"));

  const std::string missing = (dir / "absent" / "m.json").string();
  std::string msg = error_of([&] { check_output_file("--metrics-out", missing); });
  EXPECT_NE(msg.find("--metrics-out " + missing), std::string::npos) << msg;
  EXPECT_NE(msg.find("does not exist"), std::string::npos) << msg;
  msg = error_of([&] { check_output_file("--checkpoint", (dir / "sub").string()); });
  EXPECT_NE(msg.find("--checkpoint"), std::string::npos) << msg;
  EXPECT_NE(msg.find("is a folder"), std::string::npos) << msg;
  std::ofstream(dir / "file") << "x";
  msg = error_of([&] { check_output_file("--checkpoint", (dir / "file" / "c.st").string()); });
  EXPECT_NE(msg.find("not a folder"), std::string::npos) << msg;
  msg = error_of([&] { check_output_folder("--out", (dir / "file").string()); });
  EXPECT_NE(msg.find("--out"), std::string::npos) << msg;
  msg = error_of([&] { check_output_folder("--out", (dir / "file" / "x" / "y").string()); });
  EXPECT_NE(msg.find("not a folder"), std::string::npos) << msg;
  if (::geteuid() != 0) {  // root writes anywhere
    fs::permissions(dir / "sub", fs::perms::owner_read | fs::perms::owner_exec);
    msg = error_of([&] { check_output_file("--metrics-out", (dir / "sub" / "m.json").string()); });
    EXPECT_NE(msg.find("cannot create files"), std::string::npos) << msg;
    fs::permissions(dir / "sub", fs::perms::owner_all);
  }
  EXPECT_EQ(entries(dir / "sub"), 0u);
  fs::remove_all(dir);
}

TEST(Preflight, MemoryEstimateGrowsWithTheOptionsAndNeverOverflows) {
  ModelConfig m;
  const MemoryEstimate base = estimate_memory(m, 32, 100, 28, 28, 2);
  EXPECT_GT(base.parameters, 0);
  EXPECT_GT(base.activations, base.parameters);  // a small model: activations dominate
  // The default model has about 0.08 M parameters.
  EXPECT_NEAR(base.parameter_count, 0.08e6, 0.01e6);
  EXPECT_GT(estimate_memory(m, 64, 1, 28, 28, 2).activations,
            1.8 * estimate_memory(m, 32, 1, 28, 28, 2).activations);
  ModelConfig deep = m;
  deep.blocks_per_stage = 3;
  EXPECT_NEAR(estimate_memory(deep, 32, 100, 28, 28, 2).parameter_count,
              Model(deep).parameter_count(), 1.0);
  EXPECT_NEAR(base.parameter_count, Model(m).parameter_count(), 1.0);
  // Parameters alone need no image size.
  const MemoryEstimate params_only = estimate_memory(m, 32, 0, 0, 0, 2);
  EXPECT_EQ(params_only.activations, 0);
  EXPECT_EQ(params_only.parameters, base.parameters);
  // Absurd shapes: large finite numbers, computed at once (no loop over 2^31 blocks).
  ModelConfig huge = m;
  huge.widths = {2147483647};
  huge.blocks_per_stage = 2147483647;
  const auto t0 = std::chrono::steady_clock::now();
  const MemoryEstimate e = estimate_memory(huge, 2147483647, 2147483647, 65536, 65536, 1 << 20);
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 1.0);
  EXPECT_TRUE(std::isfinite(e.total()));
  EXPECT_GT(e.total(), 1e30);
}

TEST(Preflight, TooLargeIsRefusedNamingTheOptionBeforeAnyAllocation) {
  // Each case: the option that is too large and the message must name it; validate() refuses
  // the parameter-bound ones before building even a layer.
  TrainConfig deep;
  deep.model.blocks_per_stage = 100000;
  std::string msg = error_of([&] { validate(deep); });
  EXPECT_NE(msg.find("--blocks-per-stage (100000)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("of memory is available"), std::string::npos) << msg;
  TrainConfig wide;
  wide.model.widths = {2000000000};
  wide.model.norm = NormKind::group;
  wide.model.groups = 8;
  msg = error_of([&] { validate(wide); });
  EXPECT_NE(msg.find("--widths (2000000000)"), std::string::npos) << msg;
  TrainConfig big_batch;
  big_batch.batch = 1 << 30;
  validate(big_batch);  // the parameters fit; the activations need the image size
  msg = error_of([&] { check_fits_in_memory(big_batch, 28, 28, 10000); });
  EXPECT_NE(msg.find("--batch (1073741824)"), std::string::npos) << msg;
  // Several runs at once: the message says so and offers --jobs.
  TrainConfig plain;
  const double one = estimate_run_memory(plain, 28, 28, 10000).total();
  ::setenv("NORMKIT_TRAIN_AVAILABLE_MEMORY", std::to_string(static_cast<uint64_t>(1.5 * one)).c_str(), 1);
  check_fits_in_memory(plain, 28, 28, 10000, 1);
  msg = error_of([&] { check_fits_in_memory(plain, 28, 28, 10000, 2); });
  ::unsetenv("NORMKIT_TRAIN_AVAILABLE_MEMORY");
  EXPECT_NE(msg.find("--jobs 2"), std::string::npos) << msg;
  EXPECT_GT(available_memory_bytes(), 0u);
}

TEST(Preflight, ABatchLargerThanTheDataIsRefusedBeforeTraining) {
  const Data data = tiny_data();  // 50 training images
  TrainConfig c = tiny_config(NormKind::group, "");
  c.batch = 51;
  std::string msg = error_of([&] { check_fits_data(c, data); });
  EXPECT_NE(msg.find("--batch 51"), std::string::npos) << msg;
  EXPECT_NE(msg.find("50 training images"), std::string::npos) << msg;
  c.batch = 20;
  c.limit_train = 10;
  msg = error_of([&] { train_run(c, data); });
  EXPECT_NE(msg.find("--limit-train 10"), std::string::npos) << msg;
  c.batch = 50;
  c.limit_train = -1;
  check_fits_data(c, data);
}

}  // namespace
}  // namespace normkit::train
