#include "cpu/cache.h"

#include <unistd.h>

#include <cstdlib>

namespace normkit::cpu {
namespace {

constexpr int64_t kFallbackL2Bytes = int64_t(1) << 20;
// Below this a reported size is not a real L2 (some virtual machines report 0 or a few bytes).
constexpr int64_t kMinL2Bytes = int64_t(64) << 10;

int64_t detect_l2_bytes() {
  if (const char* forced = std::getenv("NORMKIT_L2_CACHE_BYTES")) {
    char* end = nullptr;
    const long long v = std::strtoll(forced, &end, 10);
    if (end != forced && *end == '\0' && v >= kMinL2Bytes) return v;
  }
#ifdef _SC_LEVEL2_CACHE_SIZE
  const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (reported >= kMinL2Bytes) return reported;
#endif
  return kFallbackL2Bytes;
}

}  // namespace

int64_t l2_cache_bytes() {
  static const int64_t bytes = detect_l2_bytes();
  return bytes;
}

}  // namespace normkit::cpu
