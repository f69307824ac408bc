// IDX reader: files written here byte by byte (plain and gzip), every malformation the reader
// promises to catch, and a smoke check on the installed Fashion-MNIST when it is present.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <array>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "io/idx.h"
#include "io/io_error.h"
#include "normkit/error.h"

namespace fs = std::filesystem;
using normkit::train::Dataset;
using normkit::train::IoError;
using normkit::train::load_mnist;
using normkit::train::read_idx_ubyte;

namespace {

std::vector<uint8_t> idx_bytes(const std::vector<uint32_t>& dims, const std::vector<uint8_t>& data,
                               uint8_t type = 0x08) {
  std::vector<uint8_t> out = {0, 0, type, static_cast<uint8_t>(dims.size())};
  for (uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(d >> shift));
  }
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

void write_plain(const fs::path& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_gz(const fs::path& path, const std::vector<uint8_t>& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
            static_cast<int>(bytes.size()));
  gzclose(f);
}

std::vector<uint8_t> read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

std::vector<uint8_t> random_bytes(size_t n, uint32_t seed, int max_value = 255) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> dist(0, max_value);
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(dist(rng));
  return v;
}

class IdxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("normkit_io_idx_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  // Writes a split with `count` random images of rows x cols and labels in 0..classes-1.
  void write_split(const std::string& split, uint32_t count, uint32_t rows, uint32_t cols,
                   bool gz, int classes = 10) {
    pixels_ = random_bytes(size_t{count} * rows * cols, 7 + count);
    labels_ = random_bytes(count, 11 + count, classes - 1);
    const auto images = idx_bytes({count, rows, cols}, pixels_);
    const auto labels = idx_bytes({count}, labels_);
    const std::string ext = gz ? ".gz" : "";
    auto write = gz ? write_gz : write_plain;
    write(dir_ / (split + "-images-idx3-ubyte" + ext), images);
    write(dir_ / (split + "-labels-idx1-ubyte" + ext), labels);
  }

  void expect_matches(const Dataset& ds, int64_t count, int64_t rows, int64_t cols) {
    ASSERT_EQ(ds.count, count);
    EXPECT_EQ(ds.channels, 1);
    EXPECT_EQ(ds.rows, rows);
    EXPECT_EQ(ds.cols, cols);
    ASSERT_EQ(ds.images.size(), static_cast<size_t>(count * rows * cols));
    ASSERT_EQ(ds.labels.size(), static_cast<size_t>(count));
    for (size_t i = 0; i < ds.images.size(); ++i) {
      ASSERT_EQ(ds.images[i], static_cast<float>(pixels_[i]) / 255.0f) << "pixel " << i;
    }
    for (int64_t i = 0; i < count; ++i) ASSERT_EQ(ds.labels[i], labels_[i]) << "label " << i;
  }

  // Expects `fn` to throw IoError whose message contains every string in `parts`.
  template <class Fn>
  void expect_io_error(Fn fn, const std::vector<std::string>& parts) {
    try {
      fn();
      ADD_FAILURE() << "no IoError thrown";
    } catch (const IoError& e) {
      const std::string msg = e.what();
      for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << msg << "\nlacks: " << p;
    }
  }

  fs::path dir_;
  std::vector<uint8_t> pixels_, labels_;
};

TEST_F(IdxTest, ReadsPlainFilesWithOddSizes) {
  write_split("train", 13, 5, 7, /*gz=*/false);
  expect_matches(load_mnist(dir_.string(), "train"), 13, 5, 7);
}

TEST_F(IdxTest, ReadsGzipFiles) {
  write_split("t10k", 29, 28, 28, /*gz=*/true);
  const Dataset ds = load_mnist(dir_.string(), "t10k");
  expect_matches(ds, 29, 28, 28);
  EXPECT_EQ(ds.image(3), ds.images.data() + 3 * 28 * 28);
}

TEST_F(IdxTest, ScalesExtremesToZeroAndOne) {
  pixels_ = {0, 255, 128, 1};
  labels_ = {4};
  write_plain(dir_ / "train-images-idx3-ubyte", idx_bytes({1, 2, 2}, pixels_));
  write_plain(dir_ / "train-labels-idx1-ubyte", idx_bytes({1}, labels_));
  const Dataset ds = load_mnist(dir_.string(), "train");
  EXPECT_EQ(ds.images[0], 0.0f);
  EXPECT_EQ(ds.images[1], 1.0f);
  EXPECT_EQ(ds.num_classes, 5);
}

TEST_F(IdxTest, PrefersGzipAndAcceptsDottedNames) {
  write_split("train", 6, 3, 4, /*gz=*/false);
  fs::rename(dir_ / "train-images-idx3-ubyte", dir_ / "train-images.idx3-ubyte");
  fs::rename(dir_ / "train-labels-idx1-ubyte", dir_ / "train-labels.idx1-ubyte");
  expect_matches(load_mnist(dir_.string(), "train"), 6, 3, 4);
  // A gzip file of a different size beside it wins.
  const auto plain_pixels = pixels_;
  write_split("train", 9, 3, 4, /*gz=*/true);
  expect_matches(load_mnist(dir_.string(), "train"), 9, 3, 4);
  EXPECT_NE(plain_pixels.size(), pixels_.size());
}

TEST_F(IdxTest, LimitKeepsTheFirstExamplesAndClassesOfTheWholeFile) {
  write_split("train", 40, 4, 4, /*gz=*/true, /*classes=*/10);
  const Dataset full = load_mnist(dir_.string(), "train");
  const Dataset first = load_mnist(dir_.string(), "train", 3);
  ASSERT_EQ(first.count, 3);
  ASSERT_EQ(first.images.size(), 3u * 16);
  for (size_t i = 0; i < first.images.size(); ++i) EXPECT_EQ(first.images[i], full.images[i]);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(first.labels[i], full.labels[i]);
  EXPECT_EQ(first.num_classes, full.num_classes);
  EXPECT_EQ(load_mnist(dir_.string(), "train", 1000).count, 40);
  EXPECT_EQ(load_mnist(dir_.string(), "train", 0).count, 0);
}

TEST_F(IdxTest, MissingFilesNameThePathAndTheFix) {
  const std::string missing = (dir_ / "nowhere").string();
  expect_io_error([&] { load_mnist(missing, "train"); },
                  {missing + "/train-images-idx3-ubyte.gz", "sudo apt-get install dataset-fashion-mnist",
                   "--data DIR"});
  write_split("train", 5, 2, 2, false);
  fs::remove(dir_ / "train-labels-idx1-ubyte");
  expect_io_error([&] { load_mnist(dir_.string(), "train"); }, {"train-labels-idx1-ubyte.gz"});
}

TEST_F(IdxTest, UnknownSplitIsAnArgumentError) {
  write_split("train", 5, 2, 2, false);
  EXPECT_THROW(load_mnist(dir_.string(), "test"), normkit::Error);
}

TEST_F(IdxTest, RejectsBadMagicAndType) {
  const fs::path p = dir_ / "x.idx";
  auto bytes = idx_bytes({3}, {1, 2, 3});
  bytes[0] = 0x1f;
  write_plain(p, bytes);
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {p.string(), "bad magic number 0x1F00"});
  write_gz(p, idx_bytes({3}, {1, 2, 3}, /*type=*/0x0D));
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {p.string(), "element type 0x0D"});
  write_plain(p, idx_bytes({3, 0}, {}));
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {"dimension 1 is 0"});
  write_plain(p, idx_bytes({0xFFFFFFFF, 0xFFFFFFFF}, {}));
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {"implausible"});
}

TEST_F(IdxTest, RejectsTruncatedPlainAndGzipFiles) {
  const fs::path p = dir_ / "x.idx";
  const auto bytes = idx_bytes({50, 6, 6}, random_bytes(1800, 3));
  for (size_t cut : {size_t{2}, size_t{9}, bytes.size() - 1, bytes.size() / 2}) {
    write_plain(p, std::vector<uint8_t>(bytes.begin(), bytes.begin() + cut));
    expect_io_error([&] { read_idx_ubyte(p.string()); }, {p.string(), "truncated"});
  }
  // A gzip stream cut short, as an interrupted download leaves it.
  write_gz(p, bytes);
  auto gz = read_file(p);
  ASSERT_GT(gz.size(), 100u);
  write_plain(p, std::vector<uint8_t>(gz.begin(), gz.begin() + gz.size() / 2));
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {p.string(), "truncated"});
  // A complete stream with a payload shorter than the header says.
  write_gz(p, std::vector<uint8_t>(bytes.begin(), bytes.end() - 36));
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {p.string(), "truncated data"});
}

// A damaged header that claims billions of elements in a file of a few bytes is reported as
// truncated without first allocating what the header claims (found by fuzz/fuzz_idx).
TEST_F(IdxTest, HugeClaimInATinyFileIsTruncatedNotAnAllocation) {
  const fs::path p = dir_ / "x.idx";
  const auto bytes = idx_bytes({2, 3, 0x2f000003u}, random_bytes(18, 5));
  write_plain(p, bytes);
  expect_io_error([&] { read_idx_ubyte(p.string()); },
                  {p.string(), "truncated data: 18 of 4731174930 bytes"});
  write_gz(p, bytes);
  expect_io_error([&] { read_idx_ubyte(p.string()); },
                  {p.string(), "truncated data: 18 of 4731174930 bytes"});
}

TEST_F(IdxTest, RejectsTrailingBytes) {
  const fs::path p = dir_ / "x.idx";
  auto bytes = idx_bytes({4}, {1, 2, 3, 4});
  bytes.push_back(9);
  write_plain(p, bytes);
  expect_io_error([&] { read_idx_ubyte(p.string()); }, {p.string(), "after the 4 elements"});
}

TEST_F(IdxTest, RejectsMismatchedOrSwappedFiles) {
  write_plain(dir_ / "train-images-idx3-ubyte", idx_bytes({4, 2, 2}, random_bytes(16, 1)));
  write_plain(dir_ / "train-labels-idx1-ubyte", idx_bytes({5}, random_bytes(5, 2, 9)));
  expect_io_error([&] { load_mnist(dir_.string(), "train"); }, {"4 images", "5 labels"});
  write_plain(dir_ / "train-labels-idx1-ubyte", idx_bytes({4, 2, 2}, random_bytes(16, 1)));
  expect_io_error([&] { load_mnist(dir_.string(), "train"); }, {"labels must have 1 dimension"});
  write_plain(dir_ / "train-images-idx3-ubyte", idx_bytes({4}, random_bytes(4, 1)));
  expect_io_error([&] { load_mnist(dir_.string(), "train"); }, {"images must have 3 dimensions"});
}

TEST(IdxRealData, FashionMnistWhenInstalled) {
  const std::string dir = normkit::train::kDefaultMnistDir;
  if (!fs::exists(fs::path(dir) / "t10k-labels-idx1-ubyte.gz")) {
    GTEST_SKIP() << "dataset-fashion-mnist is not installed";
  }
  for (const auto& [split, count] : {std::pair<std::string, int64_t>{"train", 60000}, {"t10k", 10000}}) {
    const Dataset ds = load_mnist(dir, split);
    ASSERT_EQ(ds.count, count);
    EXPECT_EQ(ds.rows, 28);
    EXPECT_EQ(ds.cols, 28);
    EXPECT_EQ(ds.num_classes, 10);
    // Fashion-MNIST is balanced: every class has a tenth of each split.
    std::array<int64_t, 10> per_class{};
    for (uint8_t l : ds.labels) {
      ASSERT_LT(l, 10);
      ++per_class[l];
    }
    for (int64_t n : per_class) EXPECT_EQ(n, count / 10) << split;
    float lo = 1, hi = 0;
    for (float v : ds.images) lo = std::min(lo, v), hi = std::max(hi, v);
    EXPECT_EQ(lo, 0.0f);
    EXPECT_EQ(hi, 1.0f);
  }
}

}  // namespace
