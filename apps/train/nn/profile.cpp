#include "nn/profile.h"

#include <array>
#include <chrono>
#include <cstdio>
#include <memory>
#include <mutex>
#include <vector>

namespace normkit::train::profile {
namespace detail {
bool g_enabled = false;
}

namespace {

constexpr int kPhases = static_cast<int>(Phase::count);
constexpr int kFirstConvPhase = static_cast<int>(Phase::im2col);

struct Totals {
  std::array<int64_t, kPhases> ns{};
};

// Every thread's totals, registered on the thread's first Scope; never freed (a handful of
// threads per process).
std::mutex g_mutex;
std::vector<std::unique_ptr<Totals>> g_all;

Totals& local() {
  thread_local Totals* mine = [] {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_all.push_back(std::make_unique<Totals>());
    return g_all.back().get();
  }();
  return *mine;
}

}  // namespace

void set_enabled(bool on) { detail::g_enabled = on; }

void reset() {
  std::lock_guard<std::mutex> lock(g_mutex);
  for (auto& t : g_all) t->ns.fill(0);
}

double seconds(Phase phase) {
  std::lock_guard<std::mutex> lock(g_mutex);
  int64_t ns = 0;
  for (const auto& t : g_all) ns += t->ns[static_cast<int>(phase)];
  return static_cast<double>(ns) * 1e-9;
}

const char* name(Phase phase) {
  switch (phase) {
    case Phase::batch: return "batch assembly";
    case Phase::conv_forward: return "conv forward";
    case Phase::conv_backward: return "conv backward";
    case Phase::norm_forward: return "norm forward";
    case Phase::norm_backward: return "norm backward";
    case Phase::head: return "pool, linear, loss";
    case Phase::optimizer: return "optimizer";
    case Phase::im2col: return "im2col, padding";
    case Phase::gemm_forward: return "sgemm forward";
    case Phase::gemm_dweight: return "sgemm dW";
    case Phase::gemm_dx: return "sgemm dX";
    case Phase::col2im: return "col2im, copy-out";
    case Phase::conv_other: return "conv other";
    case Phase::count: break;
  }
  return "?";
}

int64_t Scope::now() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void Scope::add(Phase phase, int64_t ns) { local().ns[static_cast<int>(phase)] += ns; }

std::string report(double cpu_seconds, int64_t images) {
  std::string out;
  char line[160];
  double step_total = 0, conv_total = 0;
  for (int i = 0; i < kPhases; ++i)
    (i < kFirstConvPhase ? step_total : conv_total) += seconds(static_cast<Phase>(i));
  const double per_k = images > 0 ? 1000.0 / static_cast<double>(images) : 0.0;
  const double scale = step_total > 0 ? cpu_seconds / step_total : 0.0;
  std::snprintf(line, sizeof line, "%-22s %8s %14s\n", "step phase", "share",
                "CPU s / 1000 img");
  out += line;
  for (int i = 0; i < kFirstConvPhase; ++i) {
    const double s = seconds(static_cast<Phase>(i));
    std::snprintf(line, sizeof line, "%-22s %7.1f%% %14.3f\n", name(static_cast<Phase>(i)),
                  step_total > 0 ? 100.0 * s / step_total : 0.0, s * scale * per_k);
    out += line;
  }
  std::snprintf(line, sizeof line, "%-22s %8s %14s\n", "conv phase (threads)", "share",
                "thread-s / 1000 img (wall)");
  out += line;
  for (int i = kFirstConvPhase; i < kPhases; ++i) {
    const double s = seconds(static_cast<Phase>(i));
    std::snprintf(line, sizeof line, "%-22s %7.1f%% %14.3f\n", name(static_cast<Phase>(i)),
                  conv_total > 0 ? 100.0 * s / conv_total : 0.0, s * per_k);
    out += line;
  }
  std::snprintf(line, sizeof line, "timed: steps %.3f s, conv threads %.3f s; CPU %.3f s\n",
                step_total, conv_total, cpu_seconds);
  out += line;
  return out;
}

}  // namespace normkit::train::profile
