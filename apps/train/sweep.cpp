#include "sweep.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <cstring>
#include <fstream>
#include <map>
#include <thread>

#include "io/io_error.h"
#include "io/progress.h"

extern char** environ;

namespace normkit::train {
namespace {

pid_t spawn(const SweepJob& job) {
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, job.log_path.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, STDOUT_FILENO, STDERR_FILENO);
  std::vector<std::string> args{"normkit-train"};
  args.insert(args.end(), job.args.begin(), job.args.end());
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0)
    throw IoError("sweep: cannot start the run " + job.label + ": " + std::strerror(rc));
  return pid;
}

// Where a child is, from the last progress line of its log: "... | epoch 2/3 [===>   ]
// 4123/10000 | ..." (no bar in a log), the two a/b pairs; zeros where there is none yet.
struct ChildProgress {
  int epoch = 0, epochs = 0;
  long long step = 0, steps = 0;
};

ChildProgress progress_in(const std::string& log) {
  std::ifstream in(log);
  std::string line, last;
  while (std::getline(in, line))
    if (line.find("epoch ") != std::string::npos) last = line;
  ChildProgress p;
  int used = 0;
  const size_t e = last.find("epoch ");
  if (e == std::string::npos ||
      std::sscanf(last.c_str() + e, "epoch %d/%d%n", &p.epoch, &p.epochs, &used) != 2 || p.epochs <= 0)
    return {};
  if (std::sscanf(last.c_str() + e + used, "%*[^0-9]%lld/%lld", &p.step, &p.steps) != 2 || p.steps <= 0)
    p.step = p.steps = 0;
  return p;
}

// "epoch a/b, p%" for the status line (empty if no progress yet).
std::string progress_text(const ChildProgress& p) {
  if (p.epochs <= 0) return {};
  char s[64];
  if (p.steps > 0)
    std::snprintf(s, sizeof s, "epoch %d/%d %lld%%", p.epoch, p.epochs, 100 * p.step / p.steps);
  else
    std::snprintf(s, sizeof s, "epoch %d/%d", p.epoch, p.epochs);
  return s;
}

// The fraction of its run a child has done.
double progress_fraction(const ChildProgress& p) {
  if (p.epochs <= 0 || p.epoch < 1) return 0;
  const double within =
      p.steps > 0 ? std::min(1.0, static_cast<double>(p.step) / static_cast<double>(p.steps)) : 0.0;
  return std::min(1.0, (p.epoch - 1 + within) / p.epochs);
}

}  // namespace

void run_sweep_jobs(const std::vector<SweepJob>& list, int jobs,
                    const std::function<void(size_t, const RunResult&)>& done) {
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  const auto t0 = std::chrono::steady_clock::now();
  std::map<pid_t, size_t> running;
  size_t next = 0, finished = 0;
  double images_total = 0, images_finished = 0;
  for (const SweepJob& job : list) images_total += job.images;
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  // Images trained so far: the finished runs' and the running ones' shares (from their logs), so
  // that runs finishing together do not make the estimate jump.
  auto images_done = [&] {
    double done = images_finished;
    for (const auto& [pid, i] : running) done += list[i].images * progress_fraction(progress_in(list[i].log_path));
    return done;
  };
  auto status = [&] {
    if (!tty) return;
    const double left = sweep_seconds_left(elapsed(), images_done(), images_total);
    std::string s = "sweep " + std::to_string(finished) + "/" + std::to_string(list.size()) +
                    " done, " + format_duration(elapsed()) +
                    (std::isnan(left) ? std::string() : ", about " + format_duration(left) + " left");
    for (const auto& [pid, i] : running) s += " | " + list[i].label + " " + progress_text(progress_in(list[i].log_path));
    std::fprintf(stderr, "\r%-110.110s", s.c_str());
  };
  auto clear = [&] {
    if (tty) std::fprintf(stderr, "\r%110s\r", "");
  };
  while (finished < list.size()) {
    while (next < list.size() && static_cast<int>(running.size()) < jobs) {
      running[spawn(list[next])] = next;
      ++next;
    }
    int wstatus = 0;
    const pid_t pid = ::waitpid(-1, &wstatus, WNOHANG);
    if (pid <= 0) {
      status();
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      continue;
    }
    const auto it = running.find(pid);
    if (it == running.end()) continue;
    const size_t i = it->second;
    running.erase(it);
    ++finished;
    clear();
    if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) {
      for (const auto& [other, j] : running) ::kill(other, SIGTERM);
      for (size_t k = 0; k < running.size(); ++k) ::wait(nullptr);
      throw IoError("sweep: the run " + list[i].label + " failed; see " + list[i].log_path);
    }
    const RunResult result = read_metrics_json(list[i].metrics_path);
    images_finished += list[i].images;
    if (!tty)
      std::fprintf(stderr, "%s\n",
                   sweep_finished_line(finished, list.size(), list[i].label, result.test_error, elapsed(),
                                       sweep_seconds_left(elapsed(), images_done(), images_total)).c_str());
    done(i, result);
  }
  clear();
}

}  // namespace normkit::train
