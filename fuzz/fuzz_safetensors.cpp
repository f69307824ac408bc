// Checkpoint bytes into the safetensors decoder: it returns a file or throws IoError, whatever
// the bytes claim (offsets past the end, overlaps, unknown dtypes, huge shapes, deep JSON).
#include <cstddef>
#include <cstdint>
#include <span>

#include "io/io_error.h"
#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    normkit::train::decode_safetensors(std::span<const uint8_t>(data, size), "fuzz");
  } catch (const normkit::train::IoError&) {
  }
  return 0;
}
