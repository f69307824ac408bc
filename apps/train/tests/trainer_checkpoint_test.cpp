// Checkpoints that cannot be trusted are refused, naming the file, before the run trains: every
// flipped header byte, data bytes across the file, truncations anywhere, another format version,
// a file without a checksum. The file the damage was copied from still resumes.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "io/io_error.h"
#include "io/safetensors.h"
#include "trainer.h"
#include "trainer_test_util.h"

namespace normkit::train {
namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // ctest runs each test as a process of its own, side by side: names of their own.
    const std::string tag = std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()) +
                            "_" + std::to_string(::getpid());
    good_ = temp_path("good_" + tag + ".safetensors");
    bad_ = temp_path("bad_" + tag + ".safetensors");
    TrainConfig first = tiny_config(NormKind::batch, good_);
    first.stop_after_steps = 7;
    ASSERT_FALSE(train_run(first, data_).finished);
    bytes_ = read_bytes(good_);
    std::memcpy(&header_length_, bytes_.data(), 8);
  }
  void TearDown() override {
    std::filesystem::remove(good_);
    std::filesystem::remove(bad_);
  }

  // Resumes from `bytes` written to bad_; returns the IoError's message ("" when it resumed).
  std::string resume_from(const std::vector<uint8_t>& bytes) {
    write_bytes(bad_, bytes);
    TrainConfig c = tiny_config(NormKind::batch, "");
    c.resume_path = bad_;
    c.epochs = 3;
    try {
      train_run(c, data_);
    } catch (const IoError& e) {
      return e.what();
    }
    return "";
  }

  void expect_refused(const std::vector<uint8_t>& bytes, const std::string& what,
                      const std::string& part = "") {
    const std::string msg = resume_from(bytes);
    ASSERT_FALSE(msg.empty()) << what << ": resumed from a damaged checkpoint";
    EXPECT_NE(msg.find(bad_), std::string::npos) << what << ": " << msg;
    if (!part.empty()) EXPECT_NE(msg.find(part), std::string::npos) << what << ": " << msg;
  }

  const Data data_ = tiny_data();
  std::string good_, bad_;
  std::vector<uint8_t> bytes_;
  uint64_t header_length_ = 0;
};

TEST_F(CheckpointTest, EveryFlippedHeaderByteAndDataByteIsRefused) {
  ASSERT_GT(bytes_.size(), 8 + header_length_ + 1000);
  // Every byte of the length and the header, one bit each (a different bit each time).
  for (size_t at = 0; at < 8 + header_length_; ++at) {
    auto copy = bytes_;
    copy[at] ^= static_cast<uint8_t>(1u << (at % 8));
    expect_refused(copy, "header byte " + std::to_string(at));
  }
  // Data bytes spread over the whole buffer: weights, momenta, statistics, positions.
  for (size_t at = 8 + header_length_; at < bytes_.size(); at += 97) {
    auto copy = bytes_;
    copy[at] ^= 0x01;
    expect_refused(copy, "data byte " + std::to_string(at), "damaged");
  }
  auto last = bytes_;
  last.back() ^= 0x80;
  expect_refused(last, "the last byte", "damaged");
  // The original still resumes.
  EXPECT_EQ(resume_from(bytes_), "");
}

TEST_F(CheckpointTest, TruncationsAreRefused) {
  const size_t size = bytes_.size(), data_begin = 8 + header_length_;
  for (size_t cut : {size_t{0}, size_t{4}, size_t{8}, size_t{9}, data_begin / 2, data_begin - 1,
                     data_begin, data_begin + 1, (data_begin + size) / 2, size - 8, size - 1})
    expect_refused(std::vector<uint8_t>(bytes_.begin(), bytes_.begin() + static_cast<long>(cut)),
                   "cut at " + std::to_string(cut));
  EXPECT_EQ(resume_from(bytes_), "");
}

TEST_F(CheckpointTest, AnotherVersionOrNoChecksumIsRefused) {
  SafetensorsFile f = decode_safetensors(bytes_, good_);
  f.metadata.erase(kChecksumKey);
  Metadata other = f.metadata;
  other["format"] = "normkit-train checkpoint 2";
  expect_refused(encode_safetensors(f.tensors, other, Checksum::crc32), "version 2",
                 "another version of normkit-train");
  other["format"] = "something else";
  expect_refused(encode_safetensors(f.tensors, other, Checksum::crc32), "foreign format",
                 "not a normkit-train checkpoint");
  expect_refused(encode_safetensors(f.tensors, f.metadata), "no checksum", "no checksum");
  // Re-encoded with its checksum it is the same checkpoint and resumes.
  EXPECT_EQ(resume_from(encode_safetensors(f.tensors, f.metadata, Checksum::crc32)), "");
}

}  // namespace
}  // namespace normkit::train
