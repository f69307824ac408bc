#pragma once
// Results of a run: the table, the summary against the performance targets, and the CSV.
#include <iosfwd>
#include <string>
#include <vector>

#include "bench_case.h"
#include "data.h"
#include "timing.h"

namespace normkit::bench {

struct CandidateResult {
  std::string name;
  std::string status = "ok";  // ok | MISMATCH | skipped: why | error: what
  CheckResult check;
  bool checked = false;
  bool timed = false;
  Timing timing;
  std::string note;
  bool usable() const { return timed && (status == "ok" || status == "unchecked"); }
};

struct CaseResult {
  Case c;
  int threads = 1;
  std::vector<CandidateResult> candidates;
  const CandidateResult* find(const std::string& name) const;
  // Median time of `name` over the copy's, or NaN when either was not timed.
  double ratio_to_copy(const std::string& name) const;
  // Median time of `name` over normkit's: how many times faster normkit is.
  double normkit_speedup_over(const std::string& name) const;
};

// The performance targets: ratio to a same-thread copy of the input bytes, on shapes >= 1 MB.
struct Target {
  const char* what;
  double max_ratio_to_copy;
};
// The target for a case, or null when none applies (backward alone, small shapes).
const Target* target_for(const Case& c);

// One table per thread count, rows grouped by shape set.
void print_tables(std::ostream& os, const std::vector<CaseResult>& results,
                  const std::vector<int>& threads, const std::vector<std::string>& anchors);
// Geometric means vs the anchors, and every case that misses a target, per thread count.
void print_summary(std::ostream& os, const std::vector<CaseResult>& results,
                   const std::vector<int>& threads, const std::vector<std::string>& anchors);
// One row per case, thread count and candidate.
void write_csv(const std::string& path, const std::vector<CaseResult>& results);

}  // namespace normkit::bench
