#pragma once
// Interleaved timing: every repetition times each candidate once, in a rotating order, so slow
// drifts of the machine (frequency, other tenants) hit all candidates alike.
#include <vector>

#include "candidate.h"

namespace normkit::bench {

struct TimingOptions {
  int max_reps = 21;             // repetitions per candidate, lowered for slow cases...
  int min_reps = 5;              // ...but never below this
  double budget_seconds = 0.6;   // target time for all repetitions of one case
  double min_sample_seconds = 2e-3;  // a sample repeats a short call until it lasts this long
  double gap_seconds = 1e-3;     // idle time before each sample
  // Idle time before a sample on another thread pool than the previous sample's (libgomp's
  // workers spin a while after a parallel region before they sleep, and could take cores from
  // TBB's). Measured here: oneDNN's times were the same with 1, 30 and 100 ms, so it is short.
  double pool_switch_gap_seconds = 2e-3;
  // A candidate whose single call takes longer (oneDNN's reference-only group-norm backward, for
  // one) is timed in the first `slow_reps` repetitions only: far off the floor, it needs no
  // precision, and would otherwise take most of the run.
  double slow_call_seconds = 0.25;
  int slow_reps = 2;
};

struct Timing {
  double median_seconds = 0;  // per call
  double min_seconds = 0;
  int reps = 0;  // samples taken
  int calls_per_sample = 0;
};

// Median of the values (the mean of the two middle ones for an even count); NaN for none.
double median(std::vector<double> values);

// Times run() of each candidate (all already prepared, threads set, and run once).
std::vector<Timing> measure_interleaved(const std::vector<Candidate*>& candidates,
                                        const TimingOptions& options);

}  // namespace normkit::bench
