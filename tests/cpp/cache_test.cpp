// The cache budgets come from the machine, or from NORMKIT_L2_CACHE_BYTES when it is set.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <cstdint>
#include <string>

#include "cpu/cache.h"

namespace normkit::cpu {
namespace {

TEST(CacheBudgets, L2IsTheForcedOrTheReportedSize) {
  const int64_t l2 = l2_cache_bytes();
  if (const char* forced = std::getenv("NORMKIT_L2_CACHE_BYTES")) {
    EXPECT_EQ(l2, std::stoll(forced));
  } else if (sysconf(_SC_LEVEL2_CACHE_SIZE) >= (64 << 10)) {
    EXPECT_EQ(l2, sysconf(_SC_LEVEL2_CACHE_SIZE));
  } else {
    EXPECT_EQ(l2, int64_t(1) << 20);  // the fallback
  }
  EXPECT_EQ(cached_unit_bytes(), l2);
  EXPECT_EQ(cached_block_bytes(), l2 / 4);
}

}  // namespace
}  // namespace normkit::cpu
