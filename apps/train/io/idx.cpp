#include "io/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>

#include "io/io_error.h"
#include "normkit/error.h"

namespace normkit::train {
namespace {

constexpr const char* kDamagedFix =
    "the file is damaged or not an MNIST IDX file; replace it (for Fashion-MNIST: "
    "sudo apt-get install --reinstall dataset-fashion-mnist)";

// No real IDX file comes near this; a header that claims more is garbage, not a big dataset.
constexpr int64_t kMaxElements = int64_t{1} << 34;

struct GzCloser {
  void operator()(gzFile_s* f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

std::string zlib_message(gzFile f) {
  int code = Z_OK;
  const char* msg = gzerror(f, &code);
  if (code == Z_ERRNO) return std::strerror(errno);
  return msg != nullptr && *msg != '\0' ? msg : "no zlib error";
}

// Reads up to `size` bytes; returns how many arrived. Short only at end of data.
size_t read_bytes(gzFile f, const std::string& path, uint8_t* out, size_t size) {
  constexpr size_t kChunk = size_t{1} << 24;  // gzread takes an unsigned int
  size_t done = 0;
  while (done < size) {
    const unsigned want = static_cast<unsigned>(std::min(kChunk, size - done));
    const int got = gzread(f, out + done, want);
    if (got < 0) {
      throw IoError(path + ": read failed (" + zlib_message(f) + "); " + kDamagedFix);
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

std::string truncated(const std::string& path, const std::string& what, size_t got,
                      size_t expected, gzFile f) {
  int code = Z_OK;
  gzerror(f, &code);
  std::string detail = code == Z_BUF_ERROR ? " (the gzip stream ends early)" : "";
  return path + ": truncated " + what + ": " + std::to_string(got) + " of " +
         std::to_string(expected) + " bytes" + detail + "; " + kDamagedFix;
}

std::string expected_names(const std::string& dir) {
  return "install Debian's dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist), "
         "which puts the files in " + std::string(kDefaultMnistDir) +
         ", or pass --data DIR with train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
         "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (gzip or plain) in DIR "
         "(looked in " + dir + ")";
}

}  // namespace

IdxArray read_idx_ubyte(const std::string& path) {
  GzFile file(gzopen(path.c_str(), "rb"));
  if (!file) {
    throw IoError(path + ": cannot open (" + std::strerror(errno) + ")");
  }
  gzbuffer(file.get(), 1 << 17);

  uint8_t magic[4];
  const size_t got_magic = read_bytes(file.get(), path, magic, 4);
  if (got_magic < 4) throw IoError(truncated(path, "header", got_magic, 4, file.get()));
  if (magic[0] != 0 || magic[1] != 0) {
    char hex[16];
    std::snprintf(hex, sizeof hex, "0x%02X%02X%02X%02X", magic[0], magic[1], magic[2], magic[3]);
    throw IoError(path + ": bad magic number " + hex +
                  " (an IDX file starts with two zero bytes); " + kDamagedFix);
  }
  if (magic[2] != 0x08) {
    char hex[8];
    std::snprintf(hex, sizeof hex, "0x%02X", magic[2]);
    throw IoError(path + ": element type " + hex +
                  " is not unsigned byte (0x08), the only type MNIST files use; " + kDamagedFix);
  }
  const int rank = magic[3];
  if (rank < 1) throw IoError(path + ": header declares 0 dimensions; " + kDamagedFix);

  IdxArray array;
  std::vector<uint8_t> raw_dims(static_cast<size_t>(rank) * 4);
  const size_t got_dims = read_bytes(file.get(), path, raw_dims.data(), raw_dims.size());
  if (got_dims < raw_dims.size()) {
    throw IoError(truncated(path, "header", 4 + got_dims, 4 + raw_dims.size(), file.get()));
  }
  int64_t elements = 1;
  for (int d = 0; d < rank; ++d) {
    const uint8_t* b = raw_dims.data() + 4 * d;
    const int64_t dim = (int64_t{b[0]} << 24) | (int64_t{b[1]} << 16) | (int64_t{b[2]} << 8) | b[3];
    if (dim == 0) {
      throw IoError(path + ": dimension " + std::to_string(d) + " is 0; " + kDamagedFix);
    }
    if (elements > kMaxElements / dim) {
      throw IoError(path + ": header declares an implausible size (more than 2^34 elements); " +
                    kDamagedFix);
    }
    elements *= dim;
    array.dims.push_back(dim);
  }

  // The header's count is a claim until the bytes arrive: the buffer grows with the data read
  // (doubling, from 64 KiB), so a damaged header of a few bytes cannot make the reader allocate
  // gigabytes.
  const size_t expected = static_cast<size_t>(elements);
  size_t got = 0;
  while (got < expected) {
    const size_t step = std::min(std::max(got, size_t{1} << 16), expected - got);
    array.data.resize(got + step);
    const size_t arrived = read_bytes(file.get(), path, array.data.data() + got, step);
    got += arrived;
    if (arrived < step) break;
  }
  if (got < expected) throw IoError(truncated(path, "data", got, expected, file.get()));
  uint8_t extra;
  if (read_bytes(file.get(), path, &extra, 1) != 0) {
    throw IoError(path + ": unexpected bytes after the " + std::to_string(elements) +
                  " elements the header declares; " + kDamagedFix);
  }
  return array;
}

std::string find_mnist_file(const std::string& dir, const std::string& split,
                            const std::string& kind) {
  if (split != "train" && split != "t10k") {
    throw Error("load_mnist: split must be \"train\" or \"t10k\", got \"" + split + "\"");
  }
  if (kind != "images" && kind != "labels") {
    throw Error("find_mnist_file: kind must be \"images\" or \"labels\", got \"" + kind + "\"");
  }
  const std::string idx = kind == "images" ? "idx3-ubyte" : "idx1-ubyte";
  const std::filesystem::path base(dir);
  const std::string name = split + "-" + kind + "-" + idx;
  const std::string candidates[] = {name + ".gz", name, split + "-" + kind + "." + idx};
  for (const std::string& candidate : candidates) {
    std::error_code ec;
    const std::filesystem::path p = base / candidate;
    if (std::filesystem::is_regular_file(p, ec)) return p.string();
  }
  throw IoError((base / candidates[0]).string() + " not found (nor " + candidates[1] +
                "): " + expected_names(dir));
}

Dataset load_mnist(const std::string& dir, const std::string& split, int64_t limit) {
  const std::string images_path = find_mnist_file(dir, split, "images");
  const std::string labels_path = find_mnist_file(dir, split, "labels");
  const IdxArray images = read_idx_ubyte(images_path);
  const IdxArray labels = read_idx_ubyte(labels_path);

  if (images.dims.size() != 3) {
    throw IoError(images_path + ": images must have 3 dimensions (count, rows, cols), the header "
                  "declares " + std::to_string(images.dims.size()) +
                  "; is this a labels file? " + kDamagedFix);
  }
  if (labels.dims.size() != 1) {
    throw IoError(labels_path + ": labels must have 1 dimension (count), the header declares " +
                  std::to_string(labels.dims.size()) + "; is this an images file? " + kDamagedFix);
  }
  if (images.dims[0] != labels.dims[0]) {
    throw IoError(images_path + " holds " + std::to_string(images.dims[0]) + " images but " +
                  labels_path + " holds " + std::to_string(labels.dims[0]) +
                  " labels; the two files must come from the same split and release");
  }

  Dataset ds;
  ds.rows = images.dims[1];
  ds.cols = images.dims[2];
  ds.count = limit < 0 ? images.dims[0] : std::min<int64_t>(limit, images.dims[0]);
  const size_t values = static_cast<size_t>(ds.count * ds.image_size());
  ds.images.resize(values);
  for (size_t i = 0; i < values; ++i) ds.images[i] = static_cast<float>(images.data[i]) / 255.0f;
  ds.labels.assign(labels.data.begin(), labels.data.begin() + ds.count);
  // Classes come from the whole file so a small limit cannot shrink the classifier.
  const uint8_t max_label = *std::max_element(labels.data.begin(), labels.data.end());
  ds.num_classes = max_label + 1;
  return ds;
}

}  // namespace normkit::train
