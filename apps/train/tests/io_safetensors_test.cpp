// safetensors: a file assembled here byte by byte, round trips of every helper, the layout the
// writer promises (alignment, padding, tiling), atomic replacement, corrupt files, and the CRC-32
// checksum: every flipped bit and every truncation of a checksummed file is caught.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "io/io_error.h"
#include "io/safetensors.h"
#include "normkit/error.h"

namespace fs = std::filesystem;
using namespace normkit::train;
using json = nlohmann::json;

namespace {

std::vector<uint8_t> with_header(const std::string& header, const std::vector<uint8_t>& data) {
  const uint64_t n = header.size();
  std::vector<uint8_t> out(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));  // little-endian
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<long>(header.size()));
  return out;
}

void write_file(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

std::vector<uint8_t> read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Expects decoding `bytes` to throw IoError whose message contains `part`.
void expect_corrupt(const std::vector<uint8_t>& bytes, const std::string& part) {
  try {
    decode_safetensors(bytes, "ckpt.safetensors");
    ADD_FAILURE() << "accepted; expected an error containing: " << part;
  } catch (const IoError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("ckpt.safetensors"), std::string::npos) << msg;
    EXPECT_NE(msg.find(part), std::string::npos) << msg << "\nlacks: " << part;
  }
}

class SafetensorsFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("normkit_io_st_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
};

TEST(Safetensors, ReadsAFileAssembledByHand) {
  // F32 [1, -2], I64 scalar -3, U8 [2, 1] {7, 9}, metadata {"format": "pt"}.
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("n":{"dtype":"I64","shape":[],"data_offsets":[8,16]},)"
      R"("u":{"shape":[2,1],"dtype":"U8","data_offsets":[16,18]},)"
      R"("__metadata__":{"format":"pt"}}   )";
  const std::vector<uint8_t> data = {0x00, 0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0,
                                     0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 7, 9};
  const SafetensorsFile f = decode_safetensors(with_header(header, data), "hand");
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(get_f32(f, "a"), (std::vector<float>{1.0f, -2.0f}));
  EXPECT_EQ(f.at("a").shape, (std::vector<int64_t>{2}));
  EXPECT_EQ(get_i64_scalar(f, "n"), -3);
  EXPECT_TRUE(f.at("n").shape.empty());
  EXPECT_EQ(f.at("u").dtype, "U8");
  EXPECT_EQ(f.at("u").shape, (std::vector<int64_t>{2, 1}));
  EXPECT_EQ(f.at("u").bytes, (std::vector<uint8_t>{7, 9}));
  EXPECT_EQ(f.metadata, (Metadata{{"format", "pt"}}));
}

TEST(Safetensors, WriterLayoutFollowsTheFormat) {
  TensorMap m;
  const std::vector<float> w = {1.5f, -0.25f, 3.0f};  // 12 bytes: would misalign a following I64
  m["w"] = make_f32(w);
  m["step"] = make_i64_scalar(1234567890123LL);
  m["flag"] = TensorEntry{"U8", {1}, {1}};
  m["z"] = make_f32({0, 4}, std::span<const float>());
  const auto bytes = encode_safetensors(m, {{"norm", "gn"}, {"groups", "8"}});

  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= uint64_t{bytes[i]} << (8 * i);
  ASSERT_LE(8 + n, bytes.size());
  EXPECT_EQ((8 + n) % 8, 0u) << "data buffer must start 8-byte aligned";
  const std::string text(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  EXPECT_EQ(text.front(), '{');
  EXPECT_EQ(text.find_last_not_of(' '), text.rfind('}')) << "padding must be spaces";
  const json h = json::parse(text);
  EXPECT_EQ(h["__metadata__"], (json{{"norm", "gn"}, {"groups", "8"}}));
  const uint8_t* data = bytes.data() + 8 + n;
  uint64_t covered = 0;
  for (const auto& [name, t] : m) {
    const json& e = h.at(name);
    EXPECT_EQ(e["dtype"], t.dtype);
    EXPECT_EQ(e["shape"].get<std::vector<int64_t>>(), t.shape);
    const uint64_t b = e["data_offsets"][0], end = e["data_offsets"][1];
    EXPECT_EQ(b % dtype_size(t.dtype), 0u) << name << " misaligned";
    ASSERT_EQ(end - b, t.bytes.size());
    EXPECT_TRUE(std::equal(t.bytes.begin(), t.bytes.end(), data + b)) << name;
    covered += end - b;
  }
  EXPECT_EQ(covered, bytes.size() - 8 - n);
  // Little-endian on disk: 1234567890123 = 0x0000011F71FB04CB.
  const uint64_t step_begin = h["step"]["data_offsets"][0];
  EXPECT_EQ(data[step_begin], 0xCB);
  EXPECT_EQ(data[step_begin + 5], 0x01);
}

TEST_F(SafetensorsFileTest, RoundTripsEveryHelperBitExactly) {
  std::mt19937 rng(5);
  std::normal_distribution<float> dist;
  std::vector<float> weight(3 * 5 * 7);
  for (float& v : weight) v = dist(rng);
  weight[0] = -0.0f;
  weight[1] = std::numeric_limits<float>::quiet_NaN();
  weight[2] = std::numeric_limits<float>::infinity();
  weight[3] = std::numeric_limits<float>::denorm_min();
  const std::vector<double> history = {0.5, 1e-300, -7.25};
  const std::vector<int64_t> order = {4, -1, 0, std::numeric_limits<int64_t>::min()};
  const std::vector<uint64_t> rng_state = {~uint64_t{0}, 42};

  TensorMap m;
  m["conv.weight"] = make_f32({3, 5, 7}, weight);
  m["history"] = make_f64(history);
  m["order"] = make_i64(order);
  m["rng"] = make_u64(rng_state);
  m["epoch"] = make_i64_scalar(-17);
  m["lr"] = make_f64_scalar(0.0125);
  m["empty"] = make_f32(std::span<const float>());
  const Metadata meta = {{"norm", "bn"}, {"note", "quotes \" and \\ and \xc3\xa9"}};
  const fs::path p = dir_ / "ckpt.safetensors";
  save_safetensors(p.string(), m, meta);

  const SafetensorsFile f = load_safetensors(p.string());
  EXPECT_EQ(f.path, p.string());
  EXPECT_EQ(f.metadata, meta);
  ASSERT_EQ(f.tensors.size(), m.size());
  for (const auto& [name, t] : m) {
    EXPECT_EQ(f.at(name).dtype, t.dtype) << name;
    EXPECT_EQ(f.at(name).shape, t.shape) << name;
    EXPECT_EQ(f.at(name).bytes, t.bytes) << name;
  }
  const std::vector<float> back = get_f32(f, "conv.weight");
  ASSERT_EQ(back.size(), weight.size());
  for (size_t i = 0; i < weight.size(); ++i) {
    EXPECT_EQ(std::bit_cast<uint32_t>(back[i]), std::bit_cast<uint32_t>(weight[i])) << i;
  }
  EXPECT_EQ(get_f64(f, "history"), history);
  EXPECT_EQ(get_i64(f, "order"), order);
  EXPECT_EQ(get_u64(f, "rng"), rng_state);
  EXPECT_EQ(get_i64_scalar(f, "epoch"), -17);
  EXPECT_EQ(get_f64_scalar(f, "lr"), 0.0125);
  EXPECT_TRUE(get_f32(f, "empty").empty());
  EXPECT_EQ(f.at("conv.weight").numel(), 105);

  std::vector<float> into(weight.size(), 123.0f);
  get_f32_into(f, "conv.weight", into);
  EXPECT_EQ(std::memcmp(into.data(), weight.data(), weight.size() * 4), 0);
}

TEST_F(SafetensorsFileTest, HelpersRejectMissingOrMismatchedTensors) {
  TensorMap m;
  m["w"] = make_f32(std::vector<float>{1, 2, 3});
  m["v"] = make_i64(std::vector<int64_t>{1, 2});
  const fs::path p = dir_ / "c.safetensors";
  save_safetensors(p.string(), m);
  const SafetensorsFile f = load_safetensors(p.string());
  EXPECT_TRUE(f.metadata.empty());
  try {
    f.at("bias");
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("\"bias\""), std::string::npos);
    EXPECT_NE(std::string(e.what()).find(p.string()), std::string::npos);
  }
  EXPECT_THROW(get_i64(f, "w"), IoError);
  EXPECT_THROW(get_i64_scalar(f, "v"), IoError);  // two values
  std::vector<float> wrong(4, 9.0f);
  EXPECT_THROW(get_f32_into(f, "w", wrong), IoError);
  EXPECT_EQ(wrong, std::vector<float>(4, 9.0f)) << "out must stay untouched on error";
}

TEST_F(SafetensorsFileTest, BadArgumentsThrowBeforeAnyFileExists) {
  const fs::path p = dir_ / "never.safetensors";
  const auto expect_rejected = [&](const TensorMap& m) {
    EXPECT_THROW(save_safetensors(p.string(), m), normkit::Error);
    EXPECT_TRUE(fs::is_empty(dir_));
  };
  expect_rejected({{"w", TensorEntry{"F32", {2}, std::vector<uint8_t>(7)}}});
  expect_rejected({{"w", TensorEntry{"F17", {2}, std::vector<uint8_t>(8)}}});
  expect_rejected({{"w", TensorEntry{"U8", {-1}, {}}}});
  expect_rejected({{"", make_i64_scalar(1)}});
  expect_rejected({{"__metadata__", make_i64_scalar(1)}});
  EXPECT_THROW(make_f32({2, 2}, std::vector<float>(3)), normkit::Error);
  EXPECT_THROW(dtype_size("float32"), normkit::Error);
  EXPECT_EQ(dtype_size("BF16"), 2u);
}

TEST_F(SafetensorsFileTest, SaveReplacesAtomicallyAndLeavesNoTemporaries) {
  const fs::path p = dir_ / "ckpt.safetensors";
  save_safetensors(p.string(), {{"x", make_i64_scalar(1)}});
  save_safetensors(p.string(), {{"x", make_i64_scalar(2)}, {"y", make_i64_scalar(3)}});
  EXPECT_EQ(get_i64_scalar(load_safetensors(p.string()), "x"), 2);
  size_t files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 1u) << "a temporary file was left behind";

  // A failed replace (the target is a non-empty directory) keeps the target and cleans up.
  const fs::path blocker = dir_ / "blocker";
  fs::create_directories(blocker / "inside");
  EXPECT_THROW(save_safetensors(blocker.string(), {{"x", make_i64_scalar(1)}}), IoError);
  EXPECT_TRUE(fs::is_directory(blocker / "inside"));
  files = 0;
  for ([[maybe_unused]] const auto& e : fs::directory_iterator(dir_)) ++files;
  EXPECT_EQ(files, 2u);
  // A missing directory is an IoError naming the path.
  const std::string nowhere = (dir_ / "no" / "such" / "c.safetensors").string();
  try {
    save_safetensors(nowhere, {{"x", make_i64_scalar(1)}});
    ADD_FAILURE();
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find(nowhere), std::string::npos) << e.what();
  }
  EXPECT_THROW(load_safetensors((dir_ / "absent").string()), IoError);
}

TEST(Safetensors, RejectsCorruptHeaders) {
  const std::vector<uint8_t> eight(8, 0);
  expect_corrupt({1, 2, 3}, "shorter than the 8-byte header length");
  auto huge = with_header("{}", {});
  huge[4] = 1;  // 2^32 + 2 bytes of header
  expect_corrupt(huge, "exceeds the 100 MB limit");
  auto past = with_header("{}", {});
  past[0] = 3;
  expect_corrupt(past, "runs past the end");
  expect_corrupt(with_header("[1]", {}), "does not start with '{'");
  expect_corrupt(with_header("{\"a\":", {}), "not valid JSON");
  expect_corrupt(with_header(R"({"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}})", eight),
                 "unknown dtype \"F33\"");
  expect_corrupt(with_header(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", eight),
                 "not a non-negative integer");
  expect_corrupt(with_header(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", eight),
                 "not a non-negative integer");
  expect_corrupt(with_header(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4]}})", eight),
                 "data_offsets");
  expect_corrupt(with_header(R"({"a":{"dtype":"F32","shape":[1]}})", eight), "data_offsets");
  expect_corrupt(with_header(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", eight), "dtype");
  expect_corrupt(with_header(R"({"a":[1]})", eight), "not an object");
  expect_corrupt(with_header(R"({"__metadata__":{"k":1}})", {}), "is not a string");
  expect_corrupt(with_header(R"({"__metadata__":[]})", {}), "\"__metadata__\" is not an object");
}

// A shape nested a million arrays deep (a 2 MB header, well inside the limit) is an error
// naming the dimension, not a stack overflow while printing it (found by fuzz/fuzz_safetensors).
TEST(Safetensors, DeeplyNestedShapeIsAnErrorNotAStackOverflow) {
  const size_t depth = 1000000;
  const std::string header = R"({"a":{"dtype":"F32","shape":)" + std::string(depth, '[') +
                             std::string(depth, ']') + R"(,"data_offsets":[0,0]}})";
  expect_corrupt(with_header(header, {}), "shape dimension 0 is a JSON array");
  expect_corrupt(with_header(R"({"a":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,0]}})", {}),
                 "shape dimension 1 is -3, not a non-negative integer");
}

TEST(Safetensors, RejectsOffsetsThatDoNotTileTheBuffer) {
  const std::vector<uint8_t> eight(8, 0);
  const auto tensor = [](const char* name, const char* dtype, const char* shape, int b, int e) {
    return "\"" + std::string(name) + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
           ",\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
  };
  expect_corrupt(with_header("{" + tensor("a", "F32", "[1]", 4, 12) + "}", eight), "out of the 8-byte");
  expect_corrupt(with_header("{" + tensor("a", "F32", "[1]", 4, 0) + "}", eight), "out of the");
  expect_corrupt(with_header("{" + tensor("a", "F32", "[3]", 0, 8) + "}", eight), "need 12 bytes");
  expect_corrupt(with_header("{" + tensor("a", "I64", "[]", 0, 4) + "}", eight), "need 8 bytes");
  expect_corrupt(with_header("{" + tensor("a", "F32", "[1]", 4, 8) + "}", eight), "(hole)");
  expect_corrupt(with_header("{" + tensor("a", "F32", "[2]", 0, 8) + "," +
                             tensor("b", "F32", "[1]", 4, 8) + "}", eight), "(overlap)");
  expect_corrupt(with_header("{" + tensor("a", "F32", "[1]", 0, 4) + "}", eight),
                 "cover 4 of the 8 data bytes");
  expect_corrupt(with_header("{" + tensor("a", "F32", "[4611686018427387904,4]", 0, 8) + "}", eight),
                 "more than 2^62");
  // An empty tensor needs no bytes and may sit anywhere inside the tiling.
  const auto ok = decode_safetensors(
      with_header("{" + tensor("a", "F32", "[2]", 0, 8) + "," + tensor("e", "F32", "[0,3]", 8, 8) +
                  "}", eight), "ok");
  EXPECT_EQ(ok.at("e").numel(), 0);
}

TEST(Safetensors, TruncationAndByteFlipsNeverGoUnnoticedOrCrash) {
  TensorMap m;
  std::vector<float> w(37);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.1f * static_cast<float>(i);
  m["w"] = make_f32(w);
  m["step"] = make_i64_scalar(9);
  const auto bytes = encode_safetensors(m, {{"k", "v"}});
  for (size_t cut = 0; cut < bytes.size(); ++cut) {
    EXPECT_THROW(decode_safetensors(std::span(bytes.data(), cut), "cut"), IoError) << cut;
  }
  // Random flips in the header either still decode (e.g. a changed letter in a name) or throw
  // IoError; nothing else may happen.
  std::mt19937 rng(1);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  for (int trial = 0; trial < 2000; ++trial) {
    auto copy = bytes;
    const size_t at = 8 + rng() % n;
    copy[at] = static_cast<uint8_t>(rng());
    try {
      decode_safetensors(copy, "flip");
    } catch (const IoError&) {
    }
  }
}

}  // namespace

namespace {

// A file with a checksum, as the trainer writes its checkpoints.
std::vector<uint8_t> checksummed_file() {
  TensorMap m;
  std::vector<float> w(37);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 0.1f * static_cast<float>(i);
  m["w"] = make_f32(w);
  m["step"] = make_i64_scalar(9);
  return encode_safetensors(m, {{"k", "v"}, {"format", "test 1"}}, Checksum::crc32);
}

TEST(SafetensorsChecksum, IsAMetadataStringOtherReadersSeeAsSuch) {
  const auto bytes = checksummed_file();
  const SafetensorsFile f = decode_safetensors(bytes, "ok");
  EXPECT_TRUE(f.checksum_verified);
  ASSERT_EQ(f.metadata.count(kChecksumKey), 1u);
  const std::string crc = f.metadata.at(kChecksumKey);
  EXPECT_EQ(crc.size(), 8u);
  EXPECT_EQ(crc.find_first_not_of("0123456789abcdef"), std::string::npos) << crc;
  EXPECT_EQ(f.metadata.at("k"), "v");
  // The header is still plain safetensors JSON: metadata strings only, tensors as before.
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  const json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  EXPECT_TRUE(header["__metadata__"][kChecksumKey].is_string());
  EXPECT_EQ(header["w"]["dtype"], "F32");
  // The documented scheme: zlib's CRC-32 of the file with the digits read as zeros.
  auto zeroed = bytes;
  const std::string text(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  const size_t at = 8 + text.find("\"crc32\":\"") + 9;
  std::fill_n(zeroed.begin() + static_cast<long>(at), 8, '0');
  char expected[16];
  std::snprintf(expected, sizeof expected, "%08lx",
                crc32(0L, zeroed.data(), static_cast<uInt>(zeroed.size())));
  EXPECT_EQ(crc, expected);
  // Without a checksum: loads, unverified.
  EXPECT_FALSE(decode_safetensors(encode_safetensors({{"x", make_i64_scalar(1)}}), "plain")
                   .checksum_verified);
  EXPECT_THROW(encode_safetensors({{"x", make_i64_scalar(1)}}, {{kChecksumKey, "1"}}, Checksum::crc32),
               normkit::Error);
}

TEST(SafetensorsChecksum, EveryFlippedBitIsDamageOrALostChecksum) {
  const auto bytes = checksummed_file();
  for (size_t at = 0; at < bytes.size(); ++at)
    for (int bit = 0; bit < 8; bit += 3) {
      auto copy = bytes;
      copy[at] ^= static_cast<uint8_t>(1u << bit);
      try {
        const SafetensorsFile f = decode_safetensors(copy, "ckpt.safetensors");
        // Only a flip inside the key's name can hide the checksum; nothing loads as verified.
        EXPECT_FALSE(f.checksum_verified) << "byte " << at << " bit " << bit;
      } catch (const IoError& e) {
        EXPECT_NE(std::string(e.what()).find("ckpt.safetensors"), std::string::npos) << e.what();
      }
    }
  // A flip in the data, or in a tensor's offsets, is named as damage.
  auto data_flip = bytes;
  data_flip[bytes.size() - 3] ^= 0x10;
  expect_corrupt(data_flip, "damaged or truncated");
  auto digit = bytes;
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  const std::string text(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  digit[8 + text.find("\"crc32\":\"") + 9] ^= 0x40;  // a digit becomes a letter outside a-f
  expect_corrupt(digit, "checksum field");
}

TEST(SafetensorsChecksum, TruncationAnywhereIsAnError) {
  const auto bytes = checksummed_file();
  for (size_t cut = 0; cut < bytes.size(); ++cut)
    EXPECT_THROW(decode_safetensors(std::span(bytes.data(), cut), "cut"), IoError) << cut;
  // Cut in the data: the checksum names it.
  expect_corrupt(std::vector<uint8_t>(bytes.begin(), bytes.end() - 4), "damaged or truncated");
}

TEST(SafetensorsChecksum, SaveAndLoadKeepIt) {
  const fs::path dir = fs::temp_directory_path() / ("normkit_io_st_crc_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string p = (dir / "c.safetensors").string();
  save_safetensors(p, {{"x", make_i64_scalar(5)}}, {{"a", "b"}}, Checksum::crc32);
  const SafetensorsFile f = load_safetensors(p);
  EXPECT_TRUE(f.checksum_verified);
  EXPECT_EQ(get_i64_scalar(f, "x"), 5);
  fs::remove_all(dir);
}

}  // namespace

namespace {

TEST(Safetensors, StaleTemporariesOfDeadWritersAreRemoved) {
  const fs::path dir = fs::temp_directory_path() / ("normkit_io_st_tmp_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string p = (dir / "c.safetensors").string();
  save_safetensors(p, {{"x", make_i64_scalar(5)}});
  // A pid past the kernel's maximum (2^22) belongs to no process; ours is alive.
  std::ofstream(p + ".tmp-4999999") << "half";
  std::ofstream(p + ".tmp-" + std::to_string(::getpid())) << "in progress";
  std::ofstream(p + ".tmp-x1") << "not ours";
  std::ofstream((dir / "other.safetensors.tmp-4999999").string()) << "another file's";
  EXPECT_EQ(remove_stale_temporaries(p), 1);
  EXPECT_FALSE(fs::exists(p + ".tmp-4999999"));
  EXPECT_TRUE(fs::exists(p + ".tmp-" + std::to_string(::getpid())));
  EXPECT_TRUE(fs::exists(p + ".tmp-x1"));
  EXPECT_TRUE(fs::exists(dir / "other.safetensors.tmp-4999999"));
  EXPECT_EQ(get_i64_scalar(load_safetensors(p), "x"), 5);
  fs::remove_all(dir);
}

}  // namespace
