#pragma once
// How much a kernel may re-read from a core's own cache: the one place the CPU kernels learn the
// machine's cache sizes. Read once (the per-core L2 from sysconf, which reads cpuid on x86),
// today's tuning machine's 1 MiB when the system does not say, or NORMKIT_L2_CACHE_BYTES when
// set (for machines that report it wrong, and for tests that force the other schedules).
//
// These budgets only choose between schedules that give the same bits (a unit re-read from cache
// right after its statistics, or statistics of everything first); the tiling that fixes the order
// of every sum is a function of the shape alone and never reads them (the golden_bits tests
// check this with budgets forced from 128 KiB to 32 MiB). The size from which outputs are
// streamed past the cache is kStreamBytes (cpu/streaming.h).
#include <cstdint>

namespace normkit::cpu {

// Bytes of one core's L2 cache.
int64_t l2_cache_bytes();

// Bytes a unit of work re-read right after its statistics may hold (a GroupNorm group, a
// LayerNorm row, a BatchNorm channel's inputs): the L2, which then also holds part of the output.
inline int64_t cached_unit_bytes() { return l2_cache_bytes(); }

// Bytes of a block of several units, or of the several inputs of a backward, re-read together:
// a quarter of the L2, so the block and the output it writes stay well inside it.
inline int64_t cached_block_bytes() { return l2_cache_bytes() / 4; }

}  // namespace normkit::cpu
