#pragma once
// A candidate: something that performs a case's operation (normkit, PyTorch's ATen, oneDNN) or
// a yardstick (a copy of the input bytes; the op's passes over memory). The driver prepares it
// for a case, sets its thread count, runs it once and checks what it produced against normkit's
// reference backend (a yardstick checks itself), then times run() interleaved with the others.
#include <memory>
#include <string>
#include <vector>

#include "bench_case.h"
#include "data.h"
#include "normkit/context.h"

namespace normkit::bench {

class Candidate {
 public:
  virtual ~Candidate() = default;
  virtual std::string name() const = 0;
  // Allocates what the case needs and keeps pointers into `data` (which outlives the case).
  // Returns "" when ready, or why this candidate does not do this case (e.g. no such op).
  // Any one-time work that is not part of the timed op happens here (a backward-only case runs
  // the forward here to get the saved statistics; PyTorch builds its autograd graph here).
  virtual std::string prepare(const Case& c, const CaseData& data) = 0;
  virtual void set_threads(int threads) = 0;
  // One call of the timed operation.
  virtual void run() = 0;
  // After run(): results as float in the case's element order, named y, mean, rstd,
  // running_mean, running_var, dx, dweight, dbias (each only if the candidate produces it).
  virtual void collect(Outputs& out) = 0;
  // Frees what prepare allocated.
  virtual void release() = 0;
  // What the candidate picked for the prepared case (oneDNN's implementation name), or "".
  virtual std::string note() const { return {}; }
  // The thread pool it runs on. Going from one pool to another, the timer waits until the
  // previous pool's workers have stopped spinning, so they do not compete for the cores.
  virtual std::string thread_pool() const { return "openmp"; }
};

// The yardstick: the input bytes copied to another buffer by the same number of threads.
std::unique_ptr<Candidate> make_copy_candidate();
// The least memory work of the case's op: its passes over the data with next to none of the
// arithmetic (candidate_passes.cpp). A second yardstick, float32 only.
std::unique_ptr<Candidate> make_passes_candidate();
// Whether a candidate is a yardstick (copy, passes): timed, nothing to check.
inline bool is_yardstick(const std::string& name) { return name == "copy" || name == "passes"; }
// normkit's public API with the given backend (cpu: timed; reference: the truth).
std::unique_ptr<Candidate> make_normkit_candidate(Backend backend);

// Anchors, compiled in with NORMKIT_BENCH_ANCHORS. Each returns null when not compiled in.
std::unique_ptr<Candidate> make_torch_candidate();
std::unique_ptr<Candidate> make_onednn_candidate();
// Whether oneDNN is compiled in and runs on a thread pool of its own (TBB) rather than OpenMP's.
bool onednn_has_own_thread_pool();
// Versions of the anchors for the report ("" when not compiled in).
std::string torch_version();
std::string onednn_version();

}  // namespace normkit::bench
