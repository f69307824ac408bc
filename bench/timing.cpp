#include "timing.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <thread>

namespace normkit::bench {
namespace {

double now_seconds() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

double time_calls(Candidate& c, int calls) {
  const double t0 = now_seconds();
  for (int i = 0; i < calls; ++i) c.run();
  return (now_seconds() - t0) / calls;
}

}  // namespace

std::vector<Timing> measure_interleaved(const std::vector<Candidate*>& candidates,
                                        const TimingOptions& options) {
  const std::size_t n = candidates.size();
  std::vector<Timing> out(n);
  if (n == 0) return out;
  // Calibration: one timed call each decides how many calls make a sample.
  double rep_seconds = 0;
  std::vector<bool> slow(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double t = time_calls(*candidates[i], 1);
    const int calls = static_cast<int>(
        std::clamp(std::ceil(options.min_sample_seconds / std::max(t, 1e-9)), 1.0, 10000.0));
    out[i].calls_per_sample = calls;
    slow[i] = t > options.slow_call_seconds;
    if (!slow[i]) rep_seconds += calls * t + options.gap_seconds;
  }
  // Cases whose repetition takes over a second settle for 3 repetitions.
  const int floor_reps = rep_seconds > 1.0 ? std::min(3, options.min_reps) : options.min_reps;
  const int budget_reps = static_cast<int>(options.budget_seconds / std::max(rep_seconds, 1e-9));
  const int reps = std::clamp(budget_reps, floor_reps, std::max(floor_reps, options.max_reps));
  std::vector<std::vector<double>> samples(n);
  std::string pool = candidates[n - 1]->thread_pool();
  for (int r = 0; r < reps; ++r) {
    for (std::size_t k = 0; k < n; ++k) {
      const std::size_t i = (k + r) % n;  // rotate who goes first
      if (slow[i] && r >= options.slow_reps) continue;
      const std::string next_pool = candidates[i]->thread_pool();
      const double gap = next_pool == pool ? options.gap_seconds : options.pool_switch_gap_seconds;
      pool = next_pool;
      if (gap > 0) std::this_thread::sleep_for(std::chrono::duration<double>(gap));
      samples[i].push_back(time_calls(*candidates[i], out[i].calls_per_sample));
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    const auto& s = samples[i];
    out[i].median_seconds = median(s);
    out[i].min_seconds = *std::min_element(s.begin(), s.end());
    out[i].reps = static_cast<int>(s.size());
  }
  return out;
}

double median(std::vector<double> values) {
  if (values.empty()) return NAN;
  std::sort(values.begin(), values.end());
  const std::size_t m = values.size();
  return m % 2 ? values[m / 2] : 0.5 * (values[m / 2 - 1] + values[m / 2]);
}

}  // namespace normkit::bench
