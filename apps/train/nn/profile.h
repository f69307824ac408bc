#pragma once
// Optional per-phase timing of the training loop (`normkit-train run --profile`): where a step's
// time goes, to decide what to make faster. Off by default; a Scope then costs one branch.
//
// Two levels. The step phases (batch assembly, convolution forward / backward, norm forward /
// backward, the head, the optimizer) are timed on the thread that runs the loop and cover a whole
// step between them. The convolution's inner phases (im2col, the three GEMMs, col2im, ...) run
// on the engine's threads inside a convolution; each thread times its own and the report adds
// them up (thread-seconds). Timing is steady_clock (a few dozen ns per read): on one thread and
// a busy machine, time taken by other processes falls on whichever phase was running, so the
// report's fractions are what to trust, and the caller measures CPU time for the totals.
#include <cstdint>
#include <string>

namespace normkit::train::profile {

enum class Phase : int {
  // Step phases (the loop's thread).
  batch,          // copying the batch's images and labels
  conv_forward,
  conv_backward,
  norm_forward,   // normkit's norm passes with the fused epilogue
  norm_backward,
  head,           // pooling, the linear layer, the loss
  optimizer,
  // Convolution phases (every engine thread, added up).
  im2col,         // im2col, and the tap-by-tap route's zero-padded copies of x and dy
  gemm_forward,   // y from x and the weight
  gemm_dweight,   // the weight gradient
  gemm_dx,        // dx, or its patches dcol
  col2im,         // dcol added back onto dx; the tap-by-tap route's copies of y and dx
  conv_other,     // dx initialization, the weight transpose, the weight gradient slots' sum
  count
};

namespace detail {
extern bool g_enabled;
}
inline bool enabled() { return detail::g_enabled; }
void set_enabled(bool on);
// Clears every thread's totals (call outside parallel regions).
void reset();
// Seconds accumulated in `phase`, over every thread (call outside parallel regions).
double seconds(Phase phase);
const char* name(Phase phase);

// Times its own lifetime into `phase` on the calling thread when enabled.
class Scope {
 public:
  explicit Scope(Phase phase) : phase_(phase), start_(enabled() ? now() : -1) {}
  ~Scope() {
    if (start_ >= 0) add(phase_, now() - start_);
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  static int64_t now();  // nanoseconds, steady_clock
  static void add(Phase phase, int64_t ns);
  Phase phase_;
  int64_t start_;
};

// A table of both levels: each step phase's share of the steps' timed total and, scaled by
// cpu_seconds / that total, CPU seconds per 1000 images; each convolution phase's share of the
// convolution threads' time. cpu_seconds: the process's CPU time over the same steps.
std::string report(double cpu_seconds, int64_t images);

}  // namespace normkit::train::profile
