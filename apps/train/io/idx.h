#pragma once
// Reader for the IDX format of MNIST and Fashion-MNIST (LeCun's "idx3-ubyte" / "idx1-ubyte"),
// gzip-compressed or plain: zlib's gzread passes plain files through unchanged.
//
// IDX layout: bytes 0-1 are zero, byte 2 is the element type (0x08 = unsigned byte, the only
// type MNIST uses and the only one read here), byte 3 the number of dimensions; then one
// big-endian uint32 per dimension; then the elements, row-major.
#include <cstdint>
#include <string>
#include <vector>

namespace normkit::train {

// Where Debian's dataset-fashion-mnist package puts the four files.
inline constexpr const char* kDefaultMnistDir = "/usr/share/datasets/fashion-mnist";

// One IDX file of unsigned bytes.
struct IdxArray {
  std::vector<int64_t> dims;  // e.g. {60000, 28, 28} for images, {60000} for labels
  std::vector<uint8_t> data;  // product(dims) bytes, row-major
};

// Reads the whole file at `path` (.gz or plain; the gzip magic decides, not the name).
// Returns a fresh IdxArray. Throws IoError naming the path when the file cannot be opened,
// the magic number is wrong, the element type is not unsigned byte, a dimension is zero or the
// element count is implausible (> 2^34), the payload is shorter than the header promises
// (truncated download), there are bytes after the payload, or the gzip stream is corrupt.
IdxArray read_idx_ubyte(const std::string& path);

// A split of an MNIST-format dataset as float32 images in NCHW order.
struct Dataset {
  int64_t count = 0;     // number of examples N
  int64_t channels = 1;  // always 1 (grayscale)
  int64_t rows = 0;      // from the file header (28 for MNIST)
  int64_t cols = 0;      // from the file header (28 for MNIST)
  int num_classes = 0;   // largest label + 1 (10 for Fashion-MNIST)
  std::vector<float> images;   // count * channels * rows * cols values, pixel / 255 in [0, 1]
  std::vector<uint8_t> labels; // count values

  int64_t image_size() const { return channels * rows * cols; }
  const float* image(int64_t i) const { return images.data() + i * image_size(); }
};

// Returns the path of one of the four files: `kind` is "images" or "labels", `split` is "train"
// or "t10k". Looks in `dir` for "<split>-<kind>-idx{3,1}-ubyte.gz", then the same name without
// ".gz", then the dotted variant "<split>-<kind>.idx{3,1}-ubyte" (as unpacked by some tools).
// Reads nothing but the directory. Throws normkit::Error for an unknown split or kind, and
// IoError naming the expected path and how to obtain the files when none of them exists.
std::string find_mnist_file(const std::string& dir, const std::string& split,
                            const std::string& kind);

// Loads split "train" or "t10k" from `dir` (see find_mnist_file). Both files are read and
// checked in full (magic, 3-D images and 1-D labels, equal counts, no truncation); then the first
// `limit` examples (all when limit < 0 or limit > count) are converted. Returns a fresh Dataset.
// Throws normkit::Error for an unknown split, IoError (naming the file and the fix) otherwise.
Dataset load_mnist(const std::string& dir, const std::string& split, int64_t limit = -1);

}  // namespace normkit::train
