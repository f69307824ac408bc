#pragma once
// Runs the (norm, batch) trainings of a sweep as child processes of normkit-train, `jobs` at a
// time, each an ordinary `normkit-train run ... --metrics-out FILE` whose output goes to its own
// log. Separate processes keep every run's threads, OpenBLAS state and normkit workspaces apart,
// and a run gives the same bits whether it ran alone or beside another.
#include <functional>
#include <string>
#include <vector>

#include "io/results.h"

namespace normkit::train {

struct SweepJob {
  std::string label;              // e.g. "bn b=2"
  std::vector<std::string> args;  // the arguments after the program name ("run", "--norm", ...)
  std::string metrics_path;       // the run's --metrics-out file
  std::string log_path;           // its stdout and stderr
  double images = 1;              // training images the run processes: its share of the work
};

// The time a sweep has left, from the work done so far: elapsed * (total - done) / done, work
// counted in training images (runs differ in size: epochs, and the images their steps use).
// NaN when nothing is done yet (no rate to go by); 0 when done >= total. Pure.
double sweep_seconds_left(double elapsed_seconds, double images_done, double images_total);

// The line a sweep writes when its k-th of n runs finished and stderr is not a terminal:
// "[k/n] label: test error 12.34%, elapsed 1m 05s, about 2m 10s left" ("time left unknown" for
// a NaN estimate). Pure.
std::string sweep_finished_line(size_t k, size_t n, const std::string& label, double test_error,
                                double elapsed_seconds, double seconds_left);

// Starts the jobs in order, at most `jobs` at once, and calls done(index, result) as each one
// finishes (in finishing order). On a terminal, keeps a status line of the running jobs on
// stderr with the estimated time left (sweep_seconds_left, the running jobs counted by the
// progress in their logs); otherwise writes sweep_finished_line for each finished run. Throws IoError naming the job and its log when a child cannot be started or fails.
void run_sweep_jobs(const std::vector<SweepJob>& jobs_list, int jobs,
                    const std::function<void(size_t, const RunResult&)>& done);

}  // namespace normkit::train
