#include "report.h"

#include "candidate.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <ostream>
#include <stdexcept>

namespace normkit::bench {
namespace {

std::string fmt(const char* format, double v) {
  if (!std::isfinite(v)) return "-";
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string pad(const std::string& s, std::size_t width, bool left = false) {
  if (s.size() >= width) return s;
  return left ? s + std::string(width - s.size(), ' ') : std::string(width - s.size(), ' ') + s;
}

// Whether any case at `threads` timed the passes yardstick.
bool has_passes(const std::vector<CaseResult>& results, int threads) {
  for (const auto& r : results) {
    const CandidateResult* p = r.find("passes");
    if (r.threads == threads && p && p->timed) return true;
  }
  return false;
}

double geomean(const std::vector<double>& v) {
  if (v.empty()) return NAN;
  double s = 0;
  for (double x : v) s += std::log(x);
  return std::exp(s / static_cast<double>(v.size()));
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char ch : s) out += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return out + "\"";
}

// "torch dx 3.1e-02" for each candidate whose check failed or errored.
std::string check_column(const CaseResult& r) {
  std::string out;
  for (const auto& c : r.candidates) {
    if (c.status == "ok" || c.status == "unchecked" || c.status.rfind("skipped", 0) == 0) continue;
    if (!out.empty()) out += "; ";
    if (c.status == "MISMATCH")
      out += "MISMATCH " + c.name + " " + c.check.worst + " " + fmt("%.1e", c.check.max_error);
    else
      out += c.name + " " + c.status;
  }
  bool any_unchecked = false;
  for (const auto& c : r.candidates) any_unchecked |= c.status == "unchecked";
  return out.empty() ? (any_unchecked ? "unchecked" : "ok") : out;
}

}  // namespace

const CandidateResult* CaseResult::find(const std::string& name) const {
  for (const auto& c : candidates)
    if (c.name == name) return &c;
  return nullptr;
}

double CaseResult::ratio_to_copy(const std::string& name) const {
  const CandidateResult* copy = find("copy");
  const CandidateResult* c = find(name);
  if (!copy || !c || !copy->timed || !c->usable()) return NAN;
  return c->timing.median_seconds / copy->timing.median_seconds;
}

double CaseResult::normkit_speedup_over(const std::string& name) const {
  const CandidateResult* nk = find("normkit");
  const CandidateResult* c = find(name);
  if (!nk || !c || !nk->usable() || !c->usable()) return NAN;
  return c->timing.median_seconds / nk->timing.median_seconds;
}

const Target* target_for(const Case& c) {
  static const Target forward{"training forward <= 1.3x copy", 1.3};
  static const Target inference{"inference forward <= 1.1x copy", 1.1};
  static const Target forward_backward{"forward+backward <= 3.0x copy", 3.0};
  // Fused epilogues move more bytes than the copy of x: no target, the anchors compare.
  if (c.bytes() < (std::size_t{1} << 20) || c.epilogue != Epilogue::none) return nullptr;
  switch (c.op) {
    case Op::forward: return &forward;
    case Op::forward_inference: return &inference;
    case Op::forward_backward: return &forward_backward;
    case Op::backward: return nullptr;
  }
  return nullptr;
}

void print_tables(std::ostream& os, const std::vector<CaseResult>& results,
                  const std::vector<int>& threads, const std::vector<std::string>& anchors) {
  for (int t : threads) {
    os << "\n== " << t << (t == 1 ? " thread" : " threads")
       << ": median ms per call; x/copy = time over a same-thread copy of the input bytes"
          " (* misses its target); vs X = X's time over normkit's ==\n";
    const bool passes = has_passes(results, t);
    if (passes)
      os << "   passes/copy = the op's passes over memory alone over the copy; nk/passes = "
            "normkit's time over theirs\n";
    std::string header = pad("op", 14, true) + pad("shape", 24, true) + pad("fmt", 6, true) +
                         pad("dtype", 5, true) + pad("MB", 8) + pad("copy", 9) +
                         pad("normkit", 9) + pad("GB/s", 7) + pad("nk/copy", 9);
    if (passes) header += pad("passes/copy", 13) + pad("nk/passes", 11);
    for (const auto& a : anchors) header += pad(a + "/copy", 13);
    for (const auto& a : anchors) header += pad("vs " + a, 11);
    header += "  check";
    std::string set;
    for (const auto& r : results) {
      if (r.threads != t) continue;
      if (r.c.set != set) {
        set = r.c.set;
        os << "\n[" << set << "]\n" << header << "\n";
      }
      const CandidateResult* copy = r.find("copy");
      const CandidateResult* nk = r.find("normkit");
      const bool nk_ok = nk && nk->usable();
      const double ratio = r.ratio_to_copy("normkit");
      const Target* target = target_for(r.c);
      std::string ratio_s = fmt("%.2f", ratio);
      if (target && std::isfinite(ratio) && ratio > target->max_ratio_to_copy) ratio_s += "*";
      std::string line = pad(r.c.op_name(), 14, true) + pad(r.c.shape_name(), 24, true) +
                         pad(r.c.format_name(), 6, true) + pad(dtype_name(r.c.dtype), 5, true) +
                         pad(fmt("%.1f", r.c.bytes() / 1e6), 8) +
                         pad(copy && copy->timed ? fmt("%.3f", copy->timing.median_seconds * 1e3)
                                                 : "-",
                             9) +
                         pad(nk_ok ? fmt("%.3f", nk->timing.median_seconds * 1e3) : "-", 9) +
                         pad(nk_ok ? fmt("%.1f", r.c.traffic_bytes() / nk->timing.median_seconds /
                                                     1e9)
                                   : "-",
                             7) +
                         pad(ratio_s, 9);
      if (passes)
        line += pad(fmt("%.2f", r.ratio_to_copy("passes")), 13) +
                pad(fmt("%.2f", ratio / r.ratio_to_copy("passes")), 11);
      for (const auto& a : anchors) line += pad(fmt("%.2f", r.ratio_to_copy(a)), 13);
      for (const auto& a : anchors) {
        const double s = r.normkit_speedup_over(a);
        line += pad(std::isfinite(s) ? fmt("%.2f", s) + "x" : "-", 11);
      }
      os << line << "  " << check_column(r) << "\n";
    }
  }
}

void print_summary(std::ostream& os, const std::vector<CaseResult>& results,
                   const std::vector<int>& threads, const std::vector<std::string>& anchors) {
  for (int t : threads) {
    os << "\n== summary, " << t << (t == 1 ? " thread" : " threads") << " ==\n";
    for (const auto& a : anchors) {
      std::vector<double> all;
      std::map<std::string, std::vector<double>> by_op;
      std::vector<std::pair<double, std::string>> slower;
      for (const auto& r : results) {
        if (r.threads != t) continue;
        const double s = r.normkit_speedup_over(a);
        if (!std::isfinite(s)) continue;
        all.push_back(s);
        by_op[r.c.op_name()].push_back(s);
        if (s < 1) slower.emplace_back(s, r.c.label());
      }
      if (all.empty()) continue;
      os << "normkit vs " << a << ": geometric mean speedup " << fmt("%.2f", geomean(all))
         << "x over " << all.size() << " cases (";
      bool first = true;
      for (const auto& [op, v] : by_op) {
        os << (first ? "" : ", ") << op << " " << fmt("%.2f", geomean(v)) << "x";
        first = false;
      }
      os << ")\n";
      std::sort(slower.begin(), slower.end());
      os << "  slower than " << a << " in " << slower.size() << " cases"
         << (slower.empty() ? "" : ":") << "\n";
      for (const auto& [s, label] : slower)
        os << "    " << label << ": " << a << " is " << fmt("%.2f", 1 / s) << "x faster\n";
    }
    // Targets, on shapes >= 1 MB.
    std::map<std::string, std::pair<int, int>> met;  // what -> (met, total)
    std::vector<std::pair<double, std::string>> misses;
    for (const auto& r : results) {
      if (r.threads != t) continue;
      const Target* target = target_for(r.c);
      const double ratio = r.ratio_to_copy("normkit");
      if (!target || !std::isfinite(ratio)) continue;
      auto& m = met[target->what];
      ++m.second;
      if (ratio <= target->max_ratio_to_copy) {
        ++m.first;
      } else {
        misses.emplace_back(ratio / target->max_ratio_to_copy,
                            r.c.label() + ": " + fmt("%.2f", ratio) + "x copy, target " +
                                fmt("%.1f", target->max_ratio_to_copy) + " (" +
                                fmt("%+.0f", 100 * (ratio / target->max_ratio_to_copy - 1)) +
                                "%)");
      }
    }
    for (const auto& [what, m] : met)
      os << "target " << what << " (shapes >= 1 MB): met in " << m.first << " of " << m.second
         << " cases\n";
    if (has_passes(results, t)) {
      // Where the time goes beyond the memory passes themselves.
      std::map<std::string, std::vector<double>> over_passes, passes_to_copy;
      for (const auto& r : results) {
        const double nk = r.ratio_to_copy("normkit"), p = r.ratio_to_copy("passes");
        if (r.threads != t || !target_for(r.c) || !std::isfinite(nk) || !std::isfinite(p))
          continue;
        over_passes[r.c.op_name()].push_back(nk / p);
        passes_to_copy[r.c.op_name()].push_back(p);
      }
      for (const auto& [op, v] : over_passes)
        os << "passes, " << op << " (shapes >= 1 MB, " << v.size() << " cases): median "
           << fmt("%.2f", median(passes_to_copy[op])) << "x copy; normkit median "
           << fmt("%.2f", median(v)) << "x passes\n";
    }
    std::sort(misses.rbegin(), misses.rend());
    if (!misses.empty()) os << "  misses, worst first:\n";
    for (const auto& [over, text] : misses) os << "    " << text << "\n";
  }
}

void write_csv(const std::string& path, const std::vector<CaseResult>& results) {
  std::ofstream f(path);
  if (!f) throw std::runtime_error("cannot write " + path);
  f << "set,op,shape,format,dtype,bytes,threads,candidate,status,max_error,worst_output,"
       "median_ms,min_ms,reps,calls_per_sample,gb_per_s,ratio_to_copy,normkit_speedup,note\n";
  for (const auto& r : results) {
    for (const auto& c : r.candidates) {
      const bool timed = c.timed;
      f << csv_field(r.c.set) << ',' << r.c.op_name() << ',' << csv_field(r.c.shape_name())
        << ',' << r.c.format_name() << ',' << dtype_name(r.c.dtype) << ',' << r.c.bytes() << ','
        << r.threads << ',' << c.name << ',' << csv_field(c.status) << ','
        << (c.checked ? fmt("%.3e", c.check.max_error) : "") << ',' << c.check.worst << ','
        << (timed ? fmt("%.6f", c.timing.median_seconds * 1e3) : "") << ','
        << (timed ? fmt("%.6f", c.timing.min_seconds * 1e3) : "") << ','
        << (timed ? std::to_string(c.timing.reps) : "") << ','
        << (timed ? std::to_string(c.timing.calls_per_sample) : "") << ','
        << (timed ? fmt("%.3f", (c.name == "copy" ? 2.0 * r.c.bytes() : r.c.traffic_bytes()) /
                                    c.timing.median_seconds / 1e9)
                  : "")
        << ',' << (timed ? fmt("%.4f", r.ratio_to_copy(c.name)) : "") << ','
        << (c.name != "normkit" && !is_yardstick(c.name)
                ? fmt("%.4f", r.normkit_speedup_over(c.name))
                : "")
        << ',' << csv_field(c.note) << '\n';
    }
  }
}

}  // namespace normkit::bench
