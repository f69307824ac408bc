// normkit-bench: for each case of the shape sets, check every candidate's output against
// normkit's reference backend, then time the candidates interleaved, and report each against a
// same-thread copy of the input bytes and against each other.
//
//   normkit-bench [--quick] [--threads 1,2] [--filter REGEX] [--reps N] [--csv FILE]
//                 [--sets a,b] [--dtype f32,bf16] [--check-only] [--no-anchors]
#include <malloc.h>
#include <omp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <regex>
#include <sstream>

#include "bench_case.h"
#include "candidate.h"
#include "normkit/error.h"
#include "report.h"
#include "timing.h"

namespace nb = normkit::bench;

namespace {

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// The 1-minute load average, or -1 when unknown.
double load_average() {
  std::ifstream f("/proc/loadavg");
  double load = -1;
  f >> load;
  return load;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

normkit::DType parse_dtype(const std::string& s) {
  if (s == "f32" || s == "float32") return normkit::DType::float32;
  if (s == "bf16" || s == "bfloat16") return normkit::DType::bfloat16;
  if (s == "f16" || s == "float16") return normkit::DType::float16;
  throw CLI::ValidationError("--dtype", "unknown dtype '" + s + "' (f32, bf16, f16)");
}

double tolerance_for(normkit::DType d) { return d == normkit::DType::float32 ? 1e-3 : 2e-2; }

// Runs f, turning an exception into a status string ("" when it returned normally).
template <typename F> std::string guarded(F&& f) {
  try {
    f();
    return "";
  } catch (const normkit::Error& e) {
    return std::string("normkit::Error: ") + e.what();
  } catch (const std::exception& e) {
    // First line only: PyTorch's errors carry a stack trace.
    const std::string what = e.what();
    return what.substr(0, what.find('\n'));
  }
}

}  // namespace

int main(int argc, char** argv) {
  // libgomp's idle workers spin for a long time after each parallel region; with oneDNN on its
  // own TBB pool, they would hold a core while oneDNN's sample runs (measured: oneDNN's
  // two-thread times doubled). A short spin keeps the workers hot within a call and asleep
  // between candidates. libgomp reads this when it loads, so the program restarts itself once.
  if (nb::onednn_has_own_thread_pool() && !std::getenv("GOMP_SPINCOUNT") &&
      !std::getenv("OMP_WAIT_POLICY")) {
    setenv("GOMP_SPINCOUNT", "10000", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: run on with the default
  }
  CLI::App app{"normkit-bench: normalization kernels against a copy of the same bytes, PyTorch "
               "and oneDNN; each output is checked against normkit's reference before timing"};
  bool quick = false, check_only = false, no_anchors = false, system_malloc = false,
       with_passes = false;
  std::string threads_arg, filter, csv, sets_arg, dtype_arg = "f32";
  nb::TimingOptions timing;
  timing.max_reps = 0;
  double gap_ms = timing.gap_seconds * 1e3;
  app.add_flag("--quick", quick, "A few shapes of each set and a smaller time budget");
  app.add_option("--threads", threads_arg,
                 "Comma-separated thread counts (default: 1 and all cores)");
  app.add_option("--filter", filter,
                 "Only cases whose label matches this regex (label: set op shape format dtype, "
                 "e.g. 'sd-unet-gn gn.fwd ')");
  app.add_option("--reps", timing.max_reps,
                 "Repetitions per candidate (default 21, quick 9); slow cases use fewer, never "
                 "below 5");
  app.add_option("--budget", timing.budget_seconds,
                 "Seconds of timing per case and thread count that decide the repetitions");
  app.add_option("--gap-ms", gap_ms, "Idle milliseconds before each timed sample");
  double switch_gap_ms = timing.pool_switch_gap_seconds * 1e3;
  app.add_option("--switch-gap-ms", switch_gap_ms,
                 "Idle milliseconds before a sample on another thread pool (OpenMP, TBB) than the "
                 "previous one");
  app.add_option("--csv", csv, "Write one row per case, thread count and candidate");
  app.add_option("--sets", sets_arg,
                 "Comma-separated shape sets (default: all but smoke). Sets: " +
                     [] {
                       std::string s;
                       for (const auto& n : nb::all_set_names()) s += (s.empty() ? "" : ", ") + n;
                       return s;
                     }());
  app.add_option("--dtype", dtype_arg, "Comma-separated activation dtypes: f32, bf16, f16");
  app.add_flag("--check-only", check_only, "Check every candidate, time nothing");
  app.add_flag("--no-anchors", no_anchors, "Leave PyTorch and oneDNN out even if built in");
  app.add_flag("--passes", with_passes,
               "Also time the op's passes over memory without its arithmetic (float32): the "
               "least a kernel of its kind moves, as a second yardstick");
  std::string only;
  app.add_option("--candidates", only,
                 "Comma-separated candidates to run besides the copy (normkit, torch, onednn)");
  app.add_flag("--system-malloc", system_malloc,
               "Keep glibc's default of returning large blocks to the OS on free (PyTorch then "
               "pays page faults for each output it allocates above 32 MB)");
  CLI11_PARSE(app, argc, argv);

  if (!system_malloc) {
    // PyTorch allocates its outputs on every call. With glibc's defaults, blocks above the
    // mmap threshold are mapped and unmapped per call and every page faults anew; a caching
    // allocator (jemalloc, tcmalloc, as PyTorch recommends on CPU) avoids that. Keep freed
    // memory in the heap so the anchor is measured at its best.
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
  }

  std::vector<int> threads;
  if (threads_arg.empty()) {
    threads.push_back(1);
    if (omp_get_num_procs() > 1) threads.push_back(omp_get_num_procs());
  } else {
    for (const auto& t : split(threads_arg)) {
      const int n = std::stoi(t);
      if (n < 1) {
        std::cerr << "--threads: counts must be >= 1\n";
        return 2;
      }
      threads.push_back(n);
    }
  }
  std::vector<normkit::DType> dtypes;
  std::vector<std::string> sets = sets_arg.empty() ? nb::default_set_names() : split(sets_arg);
  std::vector<nb::Case> cases;
  try {
    for (const auto& d : split(dtype_arg)) dtypes.push_back(parse_dtype(d));
    cases = nb::make_cases(sets, dtypes, quick);
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  if (!filter.empty()) {
    const std::regex re(filter);
    std::erase_if(cases, [&](const nb::Case& c) { return !std::regex_search(c.label(), re); });
  }
  if (timing.max_reps <= 0) timing.max_reps = quick ? 9 : 21;
  if (quick && !app.count("--budget")) timing.budget_seconds = 0.25;
  timing.gap_seconds = gap_ms * 1e-3;
  timing.pool_switch_gap_seconds = switch_gap_ms * 1e-3;

  // Candidates: the yardsticks first, then normkit, then the anchors that are built in.
  std::vector<std::unique_ptr<nb::Candidate>> candidates;
  candidates.push_back(nb::make_copy_candidate());
  if (with_passes) candidates.push_back(nb::make_passes_candidate());
  candidates.push_back(nb::make_normkit_candidate(normkit::Backend::cpu));
  std::vector<std::string> anchors;
  if (!no_anchors) {
    for (auto make : {nb::make_torch_candidate, nb::make_onednn_candidate}) {
      if (auto c = make()) {
        anchors.push_back(c->name());
        candidates.push_back(std::move(c));
      }
    }
  }
  if (!only.empty()) {
    const auto keep = split(only);
    std::erase_if(candidates, [&](const auto& c) {
      return !nb::is_yardstick(c->name()) &&
             std::find(keep.begin(), keep.end(), c->name()) == keep.end();
    });
    std::erase_if(anchors, [&](const std::string& a) {
      return std::find(keep.begin(), keep.end(), a) == keep.end();
    });
  }
  auto reference = nb::make_normkit_candidate(normkit::Backend::reference);

  std::cout << "normkit-bench\n  cpu: " << cpu_model() << ", " << omp_get_num_procs()
            << " cores\n  threads: ";
  for (std::size_t i = 0; i < threads.size(); ++i) std::cout << (i ? "," : "") << threads[i];
  std::cout << "\n  anchors: "
            << (anchors.empty() ? "none (configure with -DNORMKIT_BENCH_ANCHORS=ON)" : "");
  if (!no_anchors && !nb::torch_version().empty())
    std::cout << "PyTorch " << nb::torch_version() << "; ";
  if (!no_anchors && !nb::onednn_version().empty())
    std::cout << "oneDNN " << nb::onednn_version();
  if (const char* spin = std::getenv("GOMP_SPINCOUNT")) std::cout << "\n  GOMP_SPINCOUNT=" << spin;
  const double load = load_average();
  if (load >= 0) {
    std::cout << "\n  load average: " << load;
    // Other runnable processes take cores from the timed threads: multi-threaded timings (OpenMP
    // barriers waiting on a descheduled thread) suffer most.
    if (load > 0.5) std::cout << " (other processes are running: timings will be noisy)";
  }
  std::cout << "\n  cases: " << cases.size() << (quick ? " (quick)" : "") << ", "
            << (check_only ? "check only" : "max reps " + std::to_string(timing.max_reps))
            << "\n";
  std::cout.flush();

  std::vector<nb::CaseResult> results;
  int mismatches = 0, errors = 0;
  for (std::size_t ci = 0; ci < cases.size(); ++ci) {
    const nb::Case& c = cases[ci];
    nb::CaseData data(c);

    // The truth: the reference backend, once per case.
    nb::Outputs truth;
    std::string ref_status = guarded([&] {
      const std::string why = reference->prepare(c, data);
      if (!why.empty()) throw std::runtime_error(why);
      reference->set_threads(1);
      reference->run();
      reference->collect(truth);
    });
    reference->release();
    if (!ref_status.empty())
      std::cerr << "[" << ci + 1 << "/" << cases.size() << "] " << c.label()
                << ": no reference, outputs unchecked (" << ref_status << ")\n";

    for (int t : threads) {
      nb::CaseResult result;
      result.c = c;
      result.threads = t;
      std::vector<nb::Candidate*> timed;
      for (auto& cand : candidates) {
        nb::CandidateResult cr;
        cr.name = cand->name();
        std::string why;
        std::string err = guarded([&] { why = cand->prepare(c, data); });
        if (!err.empty() || !why.empty()) {
          // normkit refusing a case it should run is an error; an anchor without the op is not.
          const bool is_normkit = cr.name == "normkit";
          cr.status = (is_normkit || !err.empty() ? "error: " : "skipped: ") + err + why;
          if (is_normkit) ++errors;
          cand->release();
          result.candidates.push_back(cr);
          continue;
        }
        cr.note = cand->note();
        nb::Outputs got;
        err = guarded([&] {
          cand->set_threads(t);
          cand->run();
          cand->collect(got);
        });
        if (!err.empty()) {
          cr.status = "error: " + err;
          if (cr.name == "normkit" || nb::is_yardstick(cr.name)) ++errors;
          cand->release();
          result.candidates.push_back(cr);
          continue;
        }
        if (!nb::is_yardstick(cr.name)) {
          if (ref_status.empty()) {
            cr.check = nb::compare(got, truth, tolerance_for(c.dtype),
                                   /*relu_masked=*/c.epilogue == nb::Epilogue::add_relu ||
                                       c.family == nb::Family::frn);
            cr.checked = cr.check.compared;
            if (cr.check.kink_flips > 0)
              cr.note += (cr.note.empty() ? "" : "; ") + std::to_string(cr.check.kink_flips) +
                         " ReLU-mask elements at 0 differ";
            if (!cr.check.ok) {
              cr.status = "MISMATCH";
              ++mismatches;
              std::cerr << "\n!!! MISMATCH: " << cr.name << " on " << c.label() << " with " << t
                        << " threads: " << cr.check.worst << " max error "
                        << cr.check.max_error << " (relative to max |reference|; tolerance "
                        << tolerance_for(c.dtype) << ")\n\n";
            }
          } else {
            cr.status = "unchecked";
          }
        }
        result.candidates.push_back(cr);
        timed.push_back(cand.get());
      }
      if (!check_only) {
        const auto timings = nb::measure_interleaved(timed, timing);
        for (std::size_t k = 0, i = 0; i < result.candidates.size(); ++i) {
          auto& cr = result.candidates[i];
          if (k < timed.size() && timed[k]->name() == cr.name) {
            cr.timing = timings[k++];
            cr.timed = true;
          }
        }
      }
      for (auto& cand : candidates) cand->release();

      // Progress: one line per case and thread count.
      std::fprintf(stderr, "[%zu/%zu] %s, %d thr:", ci + 1, cases.size(), c.label().c_str(), t);
      for (const auto& cr : result.candidates) {
        if (cr.timed)
          std::fprintf(stderr, " %s %.3f ms%s", cr.name.c_str(), cr.timing.median_seconds * 1e3,
                       cr.status == "ok" || cr.status == "unchecked" ? "" : " (!)");
        else
          std::fprintf(stderr, " %s %s", cr.name.c_str(), cr.status.c_str());
      }
      std::fprintf(stderr, "\n");
      results.push_back(std::move(result));
    }
  }

  if (!check_only) {
    nb::print_tables(std::cout, results, threads, anchors);
    nb::print_summary(std::cout, results, threads, anchors);
  }
  if (!csv.empty()) {
    try {
      nb::write_csv(csv, results);
      std::cout << "\nCSV: " << csv << "\n";
    } catch (const std::exception& e) {
      std::cerr << e.what() << "\n";
      return 2;
    }
  }
  std::cout << "\nchecks: " << mismatches << " mismatches, " << errors << " errors\n";
  return mismatches || errors ? 1 : 0;
}
