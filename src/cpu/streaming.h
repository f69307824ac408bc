#pragma once
// Which outputs the CPU kernels write with non-temporal stores (cpu/simd.h streams them).
//
// A header of its own, with no dependency: the benchmark's passes-over-memory yardstick
// (bench/candidate_passes.cpp) must stream exactly the outputs normkit streams to be a fair
// bound, and it includes this one file by path rather than the library's internals.
#include <cstdint>

namespace normkit::cpu {

// Output bytes from which an elementwise pass writes with non-temporal stores: well beyond a
// core's L2, half the 32 MiB L3 of the machine it was measured on (with a consumer of the
// output: docs/benchmarks.md). Fixed, unlike cpu/cache.h's budgets: the shared L3 that virtual
// machines report is often the host's (320 MiB there), not the part they get.
inline constexpr int64_t kStreamBytes = int64_t(16) << 20;

// Runs shorter than this are streamed only when every vector of theirs is aligned: otherwise
// the one-lane steps up to alignment and the mix of cached and non-temporal stores cost more
// than the stream saves (BatchNorm inference on 14x14 planes took twice as long).
inline constexpr int64_t kMinStreamRun = 1024;

// Whether an output of `elements` values of T is large enough to stream (the kernels stream
// float32 outputs only).
template <typename T>
bool streams_output(int64_t elements) {
  return elements * int64_t(sizeof(T)) >= kStreamBytes;
}

}  // namespace normkit::cpu
