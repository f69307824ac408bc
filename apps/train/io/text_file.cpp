#include "io/text_file.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "io/io_error.h"

namespace normkit::train {

void write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    throw IoError(path + ": cannot create it (" + std::strerror(errno) +
                  "); check that the directory exists and is writable");
  }
  // Flushed to disk before the rename: after a crash the file is the old one or the new one.
  const bool written = std::fwrite(text.data(), 1, text.size(), f) == text.size() &&
                       std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int write_errno = errno;
  if (std::fclose(f) != 0 || !written) {
    const int e = written ? errno : write_errno;
    std::remove(tmp.c_str());
    throw IoError(path + ": writing failed (" + std::strerror(e) + "); is the disk full?");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    throw IoError(path + ": cannot replace it (" + std::strerror(e) + ")");
  }
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw IoError(path + ": cannot open (" + std::strerror(errno) + ")");
  const std::streamoff size = in.tellg();
  std::string text(size > 0 ? static_cast<size_t>(size) : 0, '\0');
  in.seekg(0);
  if (size < 0 || !in.read(text.data(), static_cast<std::streamsize>(text.size())))
    throw IoError(path + ": reading failed (" + std::strerror(errno) + ")");
  return text;
}

}  // namespace normkit::train
