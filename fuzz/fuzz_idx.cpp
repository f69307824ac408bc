// IDX file bytes (plain or gzip) into read_idx_ubyte, which takes a path: each input is written
// to one file in a private directory first. The reader returns an array whose size matches its
// header or throws IoError.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "io/idx.h"
#include "io/io_error.h"

namespace {

std::string input_path() {
  const char* tmp = std::getenv("TMPDIR");
  std::string dir = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") +
                    "/normkit_fuzz_idx_XXXXXX";
  if (mkdtemp(dir.data()) == nullptr) std::abort();
  return dir + "/input";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = input_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    const normkit::train::IdxArray array = normkit::train::read_idx_ubyte(path);
    size_t elements = 1;
    for (int64_t d : array.dims) elements *= static_cast<size_t>(d);
    if (array.dims.empty() || elements != array.data.size()) std::abort();
  } catch (const normkit::train::IoError&) {
  }
  return 0;
}
