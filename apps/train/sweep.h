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

// Starts the jobs in order, at most `jobs` at once, and calls done(index, result) as each one
// finishes (in finishing order). On a terminal, keeps a status line of the running jobs on
// stderr with the estimated time left (io/progress.h's sweep_seconds_left, the running jobs counted by the
// progress in their logs); otherwise writes sweep_finished_line for each finished run. Throws IoError naming the job and its log when a child cannot be started or fails.
void run_sweep_jobs(const std::vector<SweepJob>& jobs_list, int jobs,
                    const std::function<void(size_t, const RunResult&)>& done);

}  // namespace normkit::train
