#include "io/safetensors.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string_view>
#include <nlohmann/json.hpp>

#include "io/io_error.h"
#include "normkit/error.h"

// The format is little-endian; so are all hosts normkit builds for. A big-endian port would
// byte-swap in the make_*/get_* helpers.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes little-endian");

namespace normkit::train {
namespace {

using json = nlohmann::json;

// The reference implementation refuses headers above this size; so do we.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

struct DtypeInfo {
  const char* name;
  size_t size;
};
constexpr DtypeInfo kDtypes[] = {
    {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
    {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
    {"U32", 4},  {"F32", 4}, {"I64", 8}, {"U64", 8},     {"F64", 8},
};

// 0 for an unknown dtype.
size_t find_dtype_size(const std::string& dtype) {
  for (const auto& d : kDtypes) {
    if (dtype == d.name) return d.size;
  }
  return 0;
}

// Product of dims, or -1 on a negative dimension or overflow past 2^62.
int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > (int64_t{1} << 62) / d) return -1;
    n *= d;
  }
  return n;
}

// Whether `size` bytes are exactly `numel` elements of `elem` bytes (no overflow possible).
bool holds(uint64_t size, int64_t numel, size_t elem) {
  return numel >= 0 && size % elem == 0 && size / elem == static_cast<uint64_t>(numel);
}

std::string bytes_needed(int64_t numel, size_t elem) {
  if (numel < 0 || numel > std::numeric_limits<int64_t>::max() / static_cast<int64_t>(elem)) {
    return "more than 2^62";
  }
  return std::to_string(numel * static_cast<int64_t>(elem));
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void validate_for_save(const TensorMap& tensors) {
  for (const auto& [name, t] : tensors) {
    if (name.empty() || name == "__metadata__") {
      throw Error("save_safetensors: tensor name \"" + name + "\" is reserved or empty");
    }
    const size_t elem = find_dtype_size(t.dtype);
    if (elem == 0) {
      throw Error("save_safetensors: tensor \"" + name + "\" has unknown dtype \"" + t.dtype + "\"");
    }
    const int64_t n = checked_numel(t.shape);
    if (n < 0) {
      throw Error("save_safetensors: tensor \"" + name + "\" has invalid shape " +
                  shape_string(t.shape));
    }
    if (!holds(t.bytes.size(), n, elem)) {
      throw Error("save_safetensors: tensor \"" + name + "\" of dtype " + t.dtype + " and shape " +
                  shape_string(t.shape) + " needs " + bytes_needed(n, elem) + " bytes, has " +
                  std::to_string(t.bytes.size()));
    }
  }
}

template <class T>
TensorEntry make_entry(const char* dtype, std::vector<int64_t> shape, std::span<const T> values) {
  TensorEntry t;
  t.dtype = dtype;
  t.shape = std::move(shape);
  t.bytes.resize(values.size_bytes());
  if (!values.empty()) std::memcpy(t.bytes.data(), values.data(), values.size_bytes());
  return t;
}

template <class T>
std::vector<T> get_values(const SafetensorsFile& file, const std::string& name, const char* dtype) {
  const TensorEntry& t = file.at(name);
  if (t.dtype != dtype) {
    throw IoError(file.path + ": tensor \"" + name + "\" has dtype " + t.dtype + ", expected " +
                  dtype + "; the file was written by a different program or version");
  }
  std::vector<T> out(t.bytes.size() / sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
  return out;
}

template <class T>
T get_scalar(const SafetensorsFile& file, const std::string& name, const char* dtype) {
  const std::vector<T> v = get_values<T>(file, name, dtype);
  if (v.size() != 1) {
    throw IoError(file.path + ": tensor \"" + name + "\" should hold one value, holds " +
                  std::to_string(v.size()));
  }
  return v[0];
}

// The checksum's field as it appears in the header JSON; its eight digits follow the prefix.
std::string checksum_field(const std::string& digits) {
  return std::string("\"") + kChecksumKey + "\":\"" + digits + "\"";
}
constexpr size_t kChecksumDigits = 8;
const std::string kChecksumPlaceholder(kChecksumDigits, '0');

// Where the checksum's digits start in `header` (text of the header JSON), or npos when the
// field does not occur exactly once.
size_t find_checksum_digits(std::string_view header, const std::string& digits) {
  const std::string field = checksum_field(digits);
  const size_t at = header.find(field);
  if (at == std::string_view::npos || header.find(field, at + 1) != std::string_view::npos)
    return std::string_view::npos;
  return at + field.size() - 1 - kChecksumDigits;
}

// CRC-32 of `bytes` with the checksum digits at `digits_at` read as "00000000".
uint32_t file_crc32(std::span<const uint8_t> bytes, size_t digits_at) {
  const auto* zeros = reinterpret_cast<const Bytef*>(kChecksumPlaceholder.data());
  uLong crc = crc32_z(0L, Z_NULL, 0);
  crc = crc32_z(crc, bytes.data(), digits_at);
  crc = crc32_z(crc, zeros, kChecksumDigits);
  crc = crc32_z(crc, bytes.data() + digits_at + kChecksumDigits,
                bytes.size() - digits_at - kChecksumDigits);
  return static_cast<uint32_t>(crc);
}

std::string hex32(uint32_t v) {
  char b[16];
  std::snprintf(b, sizeof b, "%08x", v);
  return b;
}

bool is_checksum_digits(const std::string& s) {
  return s.size() == kChecksumDigits && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

// Writes all of `bytes` to `fd`, retrying short writes.
bool write_all(int fd, const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

int64_t TensorEntry::numel() const { return checked_numel(shape); }

const TensorEntry& SafetensorsFile::at(const std::string& name) const {
  const auto it = tensors.find(name);
  if (it == tensors.end()) {
    throw IoError(path + ": no tensor \"" + name + "\" (the file holds " +
                  std::to_string(tensors.size()) +
                  " tensors); was it written for a different model or configuration?");
  }
  return it->second;
}

size_t dtype_size(const std::string& dtype) {
  const size_t s = find_dtype_size(dtype);
  if (s == 0) throw Error("dtype_size: unknown safetensors dtype \"" + dtype + "\"");
  return s;
}

std::vector<uint8_t> encode_safetensors(const TensorMap& tensors, const Metadata& metadata,
                                        Checksum checksum) {
  validate_for_save(tensors);
  if (checksum == Checksum::crc32 && metadata.count(kChecksumKey))
    throw Error(std::string("save_safetensors: the metadata key \"") + kChecksumKey +
                "\" is the checksum's; choose another name");
  // Largest element first, then by name: each tensor starts at a multiple of its element size.
  std::vector<const TensorMap::value_type*> order;
  for (const auto& kv : tensors) order.push_back(&kv);
  std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return find_dtype_size(a->second.dtype) > find_dtype_size(b->second.dtype);
  });

  json header = json::object();
  uint64_t offset = 0;
  for (const auto* kv : order) {
    const TensorEntry& t = kv->second;
    header[kv->first] = {{"dtype", t.dtype},
                         {"shape", t.shape},
                         {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  Metadata meta = metadata;
  if (checksum == Checksum::crc32) meta[kChecksumKey] = kChecksumPlaceholder;
  if (!meta.empty()) header["__metadata__"] = meta;
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // keeps the buffer 8-byte aligned

  std::vector<uint8_t> out(8 + text.size() + offset);
  const uint64_t length = text.size();
  std::memcpy(out.data(), &length, 8);
  std::memcpy(out.data() + 8, text.data(), text.size());
  uint8_t* data = out.data() + 8 + text.size();
  for (const auto* kv : order) {
    const auto& bytes = kv->second.bytes;
    if (!bytes.empty()) std::memcpy(data, bytes.data(), bytes.size());
    data += bytes.size();
  }
  if (checksum == Checksum::crc32) {
    const size_t at = find_checksum_digits(text, kChecksumPlaceholder);
    if (at == std::string::npos)
      throw Error("save_safetensors: a metadata string imitates the checksum field");
    const std::string digits = hex32(file_crc32(out, 8 + at));
    std::memcpy(out.data() + 8 + at, digits.data(), kChecksumDigits);
  }
  return out;
}

namespace {
// Makes a rename inside `path`'s directory durable.
void sync_directory_of(const std::string& path) {
  std::filesystem::path dir = std::filesystem::path(path).parent_path();
  if (dir.empty()) dir = ".";
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // the file is in place; only its durability across a power loss is less
  ::fsync(fd);
  ::close(fd);
}
}  // namespace

void save_safetensors(const std::string& path, const TensorMap& tensors, const Metadata& metadata,
                      Checksum checksum) {
  const std::vector<uint8_t> bytes = encode_safetensors(tensors, metadata, checksum);
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    throw IoError(path + ": cannot create " + tmp + " (" + std::strerror(errno) +
                  "); check that the directory exists and is writable");
  }
  const bool written = write_all(fd, bytes.data(), bytes.size()) && ::fsync(fd) == 0;
  const int saved_errno = errno;
  const bool closed = ::close(fd) == 0;
  if (!written || !closed) {
    ::unlink(tmp.c_str());
    throw IoError(path + ": writing " + tmp + " failed (" +
                  std::strerror(written ? errno : saved_errno) + "); is the disk full?");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw IoError(path + ": cannot replace it with " + tmp + " (" + std::strerror(e) + ")");
  }
  sync_directory_of(path);
}

int remove_stale_temporaries(const std::string& path) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  const std::string prefix = target.filename().string() + ".tmp-";
  fs::path dir = target.parent_path();
  if (dir.empty()) dir = ".";
  int removed = 0;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string pid = name.substr(prefix.size());
    if (pid.size() > 9 || pid.find_first_not_of("0123456789") != std::string::npos) continue;
    if (::kill(static_cast<pid_t>(std::stol(pid)), 0) == 0 || errno != ESRCH) continue;
    if (fs::remove(it->path(), ec)) ++removed;
  }
  return removed;
}

SafetensorsFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw IoError(path + ": cannot open (" + std::strerror(errno) + ")");
  }
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw IoError(path + ": read failed");
  return decode_safetensors(bytes, path);
}

SafetensorsFile decode_safetensors(std::span<const uint8_t> bytes, const std::string& source) {
  const std::string bad = source + ": not a valid safetensors file: ";
  if (bytes.size() < 8) {
    throw IoError(bad + "only " + std::to_string(bytes.size()) +
                  " bytes, shorter than the 8-byte header length");
  }
  uint64_t header_length;
  std::memcpy(&header_length, bytes.data(), 8);
  if (header_length > kMaxHeaderBytes) {
    throw IoError(bad + "header length " + std::to_string(header_length) +
                  " exceeds the 100 MB limit");
  }
  if (header_length > bytes.size() - 8) {
    throw IoError(bad + "header length " + std::to_string(header_length) + " runs past the end of "
                  "the " + std::to_string(bytes.size()) + "-byte file (truncated?)");
  }
  const auto* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  if (header_length == 0 || header_begin[0] != '{') {
    throw IoError(bad + "header does not start with '{'");
  }
  json header;
  try {
    header = json::parse(header_begin, header_begin + header_length);
  } catch (const json::exception& e) {
    throw IoError(bad + "header is not valid JSON (" + e.what() + ")");
  }
  if (!header.is_object()) throw IoError(bad + "header is not a JSON object");

  SafetensorsFile file;
  file.path = source;
  // The checksum first: a damaged file is reported as damaged, whatever else it breaks.
  const auto meta_it = header.find("__metadata__");
  if (meta_it != header.end() && meta_it->is_object()) {
    const auto crc_it = meta_it->find(kChecksumKey);
    if (crc_it != meta_it->end()) {
      const std::string stored = crc_it->is_string() ? crc_it->get<std::string>() : crc_it->dump();
      const size_t at = is_checksum_digits(stored)
                            ? find_checksum_digits(std::string_view(header_begin, header_length), stored)
                            : std::string::npos;
      if (at == std::string::npos)
        throw IoError(source + ": damaged: its checksum field (\"" + kChecksumKey + "\": " +
                      crc_it->dump() + ") is not eight hex digits in the header's own form");
      const std::string computed = hex32(file_crc32(bytes, 8 + at));
      if (computed != stored)
        throw IoError(source + ": damaged or truncated: CRC-32 of its " +
                      std::to_string(bytes.size()) + " bytes is " + computed +
                      ", the file records " + stored);
      file.checksum_verified = true;
    }
  }
  const uint64_t buffer_size = bytes.size() - 8 - header_length;
  const uint8_t* buffer = bytes.data() + 8 + header_length;
  struct Span {
    uint64_t begin, end;
    const std::string* name;
  };
  std::vector<Span> spans;

  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      if (!info.is_object()) throw IoError(bad + "\"__metadata__\" is not an object");
      for (const auto& [key, value] : info.items()) {
        if (!value.is_string()) {
          throw IoError(bad + "\"__metadata__\" value of \"" + key + "\" is not a string");
        }
        file.metadata[key] = value.get<std::string>();
      }
      continue;
    }
    const std::string where = bad + "tensor \"" + name + "\": ";
    if (!info.is_object()) throw IoError(where + "entry is not an object");
    const auto dtype = info.find("dtype");
    const auto shape = info.find("shape");
    const auto offsets = info.find("data_offsets");
    if (dtype == info.end() || !dtype->is_string()) throw IoError(where + "missing string \"dtype\"");
    if (shape == info.end() || !shape->is_array()) throw IoError(where + "missing array \"shape\"");
    if (offsets == info.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      throw IoError(where + "\"data_offsets\" must be two non-negative integers");
    }
    TensorEntry t;
    t.dtype = dtype->get<std::string>();
    const size_t elem = find_dtype_size(t.dtype);
    if (elem == 0) throw IoError(where + "unknown dtype \"" + t.dtype + "\"");
    for (const auto& d : *shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > (uint64_t{1} << 62)) {
        // Names the dimension rather than printing the shape: printing recurses, and a shape
        // nested a million arrays deep would overflow the stack.
        throw IoError(where + "shape dimension " + std::to_string(t.shape.size()) + " is " +
                      (d.is_number() ? d.dump() : std::string("a JSON ") + d.type_name()) +
                      ", not a non-negative integer");
      }
      t.shape.push_back(d.get<int64_t>());
    }
    const int64_t n = checked_numel(t.shape);
    const uint64_t begin = (*offsets)[0].get<uint64_t>();
    const uint64_t end = (*offsets)[1].get<uint64_t>();
    if (begin > end || end > buffer_size) {
      throw IoError(where + "data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                    "] out of the " + std::to_string(buffer_size) + "-byte data buffer");
    }
    if (!holds(end - begin, n, elem)) {
      throw IoError(where + "dtype " + t.dtype + " and shape " + shape_string(t.shape) +
                    " need " + bytes_needed(n, elem) + " bytes, data_offsets give " +
                    std::to_string(end - begin));
    }
    t.bytes.assign(buffer + begin, buffer + end);
    auto [it, inserted] = file.tensors.emplace(name, std::move(t));
    spans.push_back({begin, end, &it->first});
  }

  // The tensors must tile the buffer exactly: no holes, no overlaps, nothing after the last.
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (const Span& s : spans) {
    if (s.begin != expected) {
      throw IoError(bad + "tensor \"" + *s.name + "\" starts at byte " + std::to_string(s.begin) +
                    " of the data buffer, expected " + std::to_string(expected) +
                    (s.begin < expected ? " (overlap)" : " (hole)"));
    }
    expected = s.end;
  }
  if (expected != buffer_size) {
    throw IoError(bad + "the tensors cover " + std::to_string(expected) + " of the " +
                  std::to_string(buffer_size) + " data bytes");
  }
  return file;
}

TensorEntry make_f32(std::span<const float> values) {
  return make_entry<float>("F32", {static_cast<int64_t>(values.size())}, values);
}

TensorEntry make_f32(const std::vector<int64_t>& shape, std::span<const float> values) {
  const int64_t n = checked_numel(shape);
  if (n < 0 || static_cast<uint64_t>(n) != values.size()) {
    throw Error("make_f32: shape " + shape_string(shape) + " does not hold " +
                std::to_string(values.size()) + " values");
  }
  return make_entry<float>("F32", shape, values);
}

TensorEntry make_f64(std::span<const double> values) {
  return make_entry<double>("F64", {static_cast<int64_t>(values.size())}, values);
}

TensorEntry make_i64(std::span<const int64_t> values) {
  return make_entry<int64_t>("I64", {static_cast<int64_t>(values.size())}, values);
}

TensorEntry make_u64(std::span<const uint64_t> values) {
  return make_entry<uint64_t>("U64", {static_cast<int64_t>(values.size())}, values);
}

TensorEntry make_i64_scalar(int64_t value) {
  return make_entry<int64_t>("I64", {}, std::span<const int64_t>(&value, 1));
}

TensorEntry make_f64_scalar(double value) {
  return make_entry<double>("F64", {}, std::span<const double>(&value, 1));
}

std::vector<float> get_f32(const SafetensorsFile& file, const std::string& name) {
  return get_values<float>(file, name, "F32");
}

std::vector<double> get_f64(const SafetensorsFile& file, const std::string& name) {
  return get_values<double>(file, name, "F64");
}

std::vector<int64_t> get_i64(const SafetensorsFile& file, const std::string& name) {
  return get_values<int64_t>(file, name, "I64");
}

std::vector<uint64_t> get_u64(const SafetensorsFile& file, const std::string& name) {
  return get_values<uint64_t>(file, name, "U64");
}

int64_t get_i64_scalar(const SafetensorsFile& file, const std::string& name) {
  return get_scalar<int64_t>(file, name, "I64");
}

double get_f64_scalar(const SafetensorsFile& file, const std::string& name) {
  return get_scalar<double>(file, name, "F64");
}

void get_f32_into(const SafetensorsFile& file, const std::string& name, std::span<float> out) {
  const TensorEntry& t = file.at(name);
  if (t.dtype != "F32") {
    throw IoError(file.path + ": tensor \"" + name + "\" has dtype " + t.dtype +
                  ", expected F32; the file was written by a different program or version");
  }
  if (t.bytes.size() != out.size_bytes()) {
    throw IoError(file.path + ": tensor \"" + name + "\" holds " +
                  std::to_string(t.bytes.size() / 4) + " values, the model expects " +
                  std::to_string(out.size()) + "; was it written for a different configuration?");
  }
  if (!out.empty()) std::memcpy(out.data(), t.bytes.data(), t.bytes.size());
}

}  // namespace normkit::train
