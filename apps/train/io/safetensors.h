#pragma once
// Reader and writer for the safetensors format (https://github.com/huggingface/safetensors):
//
//   8 bytes   N, the header length, unsigned little-endian
//   N bytes   JSON object: {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]},
//             ..., "__metadata__": {"key": "value", ...}}, padded with spaces
//   rest      the byte buffer; tensor bytes are buffer[b, e), little-endian, row-major
//
// The buffer is covered exactly by the tensors, without holes or overlaps. A shape of [] is a
// scalar (one element); a dimension of 0 gives an empty tensor. Checkpoints of normkit-train are
// small, so files are read and written whole.
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

namespace normkit::train {

struct TensorEntry {
  std::string dtype;           // "F32", "F64", "I64", "U8", ... (see dtype_size)
  std::vector<int64_t> shape;  // {} for a scalar
  std::vector<uint8_t> bytes;  // numel() * dtype_size(dtype) bytes, little-endian, row-major

  int64_t numel() const;  // product of shape (1 for a scalar); -1 for a negative dimension
};

using TensorMap = std::map<std::string, TensorEntry>;
using Metadata = std::map<std::string, std::string>;

// An optional integrity check of the whole file, kept inside the format so that the file stays
// valid safetensors for every other reader: the metadata key "crc32" holds eight lowercase hex
// digits, the CRC-32 (zlib's crc32, the gzip/PNG polynomial) of every byte of the file as
// written with those eight digits set to "00000000". It covers the length prefix, the header
// (every tensor's name, dtype, shape and offsets, the other metadata, the padding) and the data.
enum class Checksum { none, crc32 };
inline constexpr const char* kChecksumKey = "crc32";

struct SafetensorsFile {
  std::string path;  // where it was read from, for messages
  TensorMap tensors;
  Metadata metadata;  // includes "crc32" when the file carries a checksum
  bool checksum_verified = false;  // the file carries a crc32 and it matched

  // Returns the tensor called `name`. Throws IoError naming the file and the tensor when absent.
  const TensorEntry& at(const std::string& name) const;
};

// Bytes per element of a safetensors dtype: BOOL, U8, I8, F8_E5M2, F8_E4M3 (1), I16, U16, F16,
// BF16 (2), I32, U32, F32 (4), I64, U64, F64 (8). Throws normkit::Error for any other string.
size_t dtype_size(const std::string& dtype);

// Writes `tensors` and `metadata` to `path` atomically: the bytes go to a temporary file beside
// it, which is flushed to disk and then renamed over `path`, so a crash leaves either the old
// file or the new one, never half of one. Tensors are laid out largest dtype first, then by
// name, so every tensor is aligned to its element size when the file is mapped.
// The directory is synced after the rename, so the new name itself survives a power loss.
// With Checksum::crc32 the file carries the "crc32" metadata described above.
// Throws normkit::Error, before creating any file, when a name is empty or "__metadata__", a
// dtype is unknown, a dimension is negative, bytes.size() != numel * dtype_size, or a checksum
// is asked for and `metadata` already has the key "crc32"; throws IoError naming the path when
// the file cannot be written (the temporary is removed).
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const Metadata& metadata = {}, Checksum checksum = Checksum::none);

// Removes what save_safetensors(path) left behind when its process was killed mid-write: files
// "<path>.tmp-<pid>" beside `path` whose process no longer exists (another process's temporary
// is left alone). Returns how many it removed; errors are ignored.
int remove_stale_temporaries(const std::string& path);

// Encodes the same bytes save_safetensors writes. Same argument checks.
std::vector<uint8_t> encode_safetensors(const TensorMap& tensors, const Metadata& metadata = {},
                                        Checksum checksum = Checksum::none);

// Reads the file at `path` and returns its tensors and metadata. Throws IoError naming the path
// and the problem when the file cannot be read or is not valid safetensors: shorter than 8 bytes,
// header length over 100 MB or past the end of the file, header not a JSON object, unknown dtype,
// negative dimension, data_offsets not two ordered integers, a tensor's size not equal to
// numel * dtype size, holes or overlaps between tensors, bytes after the last tensor,
// "__metadata__" not a map of strings, or a "crc32" metadata value that is not eight lowercase
// hex digits or does not match the file (checked before the tensors, so a damaged file is
// reported as damaged). A file without "crc32" loads with checksum_verified = false.
SafetensorsFile load_safetensors(const std::string& path);

// Decodes bytes in memory; `source` names them in messages. Same checks as load_safetensors.
SafetensorsFile decode_safetensors(std::span<const uint8_t> bytes, const std::string& source);

// ---- Conversions between tensors and plain vectors (host is little-endian) ------------------
// Each make_* returns a fresh entry; with an explicit shape it throws normkit::Error when the
// product of `shape` differs from values.size(). Without one the tensor is 1-D.
TensorEntry make_f32(std::span<const float> values);
TensorEntry make_f32(const std::vector<int64_t>& shape, std::span<const float> values);
TensorEntry make_f64(std::span<const double> values);
TensorEntry make_i64(std::span<const int64_t> values);
TensorEntry make_u64(std::span<const uint64_t> values);
TensorEntry make_i64_scalar(int64_t value);  // shape {}
TensorEntry make_f64_scalar(double value);   // shape {}

// Each get_* returns the values of tensor `name` of `file`. Throws IoError naming the file and
// the tensor when it is absent or has another dtype.
std::vector<float> get_f32(const SafetensorsFile& file, const std::string& name);
std::vector<double> get_f64(const SafetensorsFile& file, const std::string& name);
std::vector<int64_t> get_i64(const SafetensorsFile& file, const std::string& name);
std::vector<uint64_t> get_u64(const SafetensorsFile& file, const std::string& name);
// Scalars: also accept a tensor of shape [1]; throw IoError for more than one element.
int64_t get_i64_scalar(const SafetensorsFile& file, const std::string& name);
double get_f64_scalar(const SafetensorsFile& file, const std::string& name);

// Overwrites `out` with the F32 tensor `name`, e.g. a layer's existing weight buffer. Throws
// IoError (out untouched) when the tensor is absent, not F32, or does not have out.size()
// elements, naming both sizes.
void get_f32_into(const SafetensorsFile& file, const std::string& name, std::span<float> out);

}  // namespace normkit::train
