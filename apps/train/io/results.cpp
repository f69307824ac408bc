#include "io/results.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/io_error.h"
#include "io/text_file.h"
#include "normkit/error.h"

namespace normkit::train {
namespace {

using json = nlohmann::json;

constexpr const char* kCsvHeader =
    "norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,"
    "test_error_batch_stats,test_error_precise,images_per_s,seconds,sync_bn,train_error_eval,"
    "train_loss_eval";
// Earlier headers, still read (by column name): before precise statistics (devices at the end,
// SyncBN runs named bn), and before the train/test gap's two columns.
constexpr const char* kCsvHeaderBeforePrecise =
    "norm,groups,batch,epochs,lr,seed,train_loss,test_loss,test_error,test_error_batch_stats,"
    "images_per_s,seconds,devices,sync_bn,train_error_eval,train_loss_eval";
constexpr const char* kCsvHeaderBeforeGap =
    "norm,groups,batch,epochs,lr,seed,train_loss,test_loss,test_error,test_error_batch_stats,"
    "images_per_s,seconds,devices,sync_bn";
// Appended to the header (and summary.csv's) only when some run's study option differs from its
// default, so the files of sweeps without them stay what they were.
constexpr const char* kStudyColumns = ",init_scale,dropout,weight_decay";

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// CSV cell: 6 significant digits, empty for NaN.
std::string cell(double v) { return std::isnan(v) ? "" : fmt("%.6g", v); }

std::string csv_quote(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

std::vector<std::string> csv_split(const std::string& line) {
  std::vector<std::string> cells(1);
  bool quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        cells.back() += '"';
        ++i;
      } else if (c == '"') {
        quoted = false;
      } else {
        cells.back() += c;
      }
    } else if (c == '"') {
      quoted = true;
    } else if (c == ',') {
      cells.emplace_back();
    } else {
      cells.back() += c;
    }
  }
  return cells;
}

// The learning rate at batch 32 a run was given (lr = base * devices * batch / 32), rounded to
// 6 significant digits so runs of one sweep compare equal.
double lr_base_of(const RunResult& r) {
  if (!(r.batch > 0) || !(r.devices > 0) || !std::isfinite(r.lr)) return kNoValue;
  return std::strtod(fmt("%.6g", r.lr * 32.0 / (static_cast<double>(r.batch) * r.devices)).c_str(),
                     nullptr);
}

bool same_number(double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); }

bool has_study_options(const RunResult& r) {
  const RunResult defaults;
  return !same_number(r.init_scale, defaults.init_scale) || !same_number(r.dropout, defaults.dropout) ||
         !same_number(r.weight_decay, defaults.weight_decay);
}

bool any_study_options(const std::vector<RunResult>& runs) {
  return std::any_of(runs.begin(), runs.end(), has_study_options);
}

void append_study_cells(std::string& out, double init_scale, double dropout, double weight_decay) {
  for (double v : {init_scale, dropout, weight_decay}) {
    out += ',';
    out += cell(v);
  }
}

// A row of the tables: one normalization configuration at one base learning rate and one
// setting of the studies' options.
struct RowKey {
  std::string norm;
  int groups;
  double lr_base;
  int devices;
  bool sync_bn;
  double init_scale, dropout, weight_decay;
  bool operator==(const RowKey& o) const {
    return norm == o.norm && groups == o.groups && devices == o.devices && sync_bn == o.sync_bn &&
           same_number(lr_base, o.lr_base) && same_number(init_scale, o.init_scale) &&
           same_number(dropout, o.dropout) && same_number(weight_decay, o.weight_decay);
  }
};

RowKey key_of(const RunResult& r) {
  return {r.norm, r.groups, lr_base_of(r), r.devices, r.sync_bn, r.init_scale, r.dropout, r.weight_decay};
}

std::vector<RowKey> row_keys(const std::vector<RunResult>& runs) {
  std::vector<RowKey> keys;
  for (const auto& r : runs) {
    const RowKey k = key_of(r);
    if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
  }
  return keys;
}

// The row's label: the norm, and its base learning rate when the runs use more than one.
std::string row_label(const RowKey& k, const std::vector<RowKey>& keys) {
  const bool several_lr = std::any_of(keys.begin(), keys.end(), [&](const RowKey& o) {
    return !(o.lr_base == keys[0].lr_base || (std::isnan(o.lr_base) && std::isnan(keys[0].lr_base)));
  });
  const bool several_devices = std::any_of(keys.begin(), keys.end(),
                                          [&](const RowKey& o) { return o.devices != keys[0].devices; });
  std::string label = k.sync_bn ? "SyncBN" : norm_label(k.norm, k.groups);
  if ((k.norm == "bn" || k.norm == "brn") && !k.sync_bn && k.devices > 1) label += " (per device)";
  if (several_devices) label += ", " + std::to_string(k.devices) + " device(s)";
  if (several_lr) label += ", lr base " + fmt("%g", k.lr_base);
  auto several = [&](double RowKey::*field) {
    return std::any_of(keys.begin(), keys.end(),
                       [&](const RowKey& o) { return !same_number(o.*field, keys[0].*field); });
  };
  if (several(&RowKey::init_scale)) label += ", init scale " + fmt("%g", k.init_scale);
  if (several(&RowKey::dropout)) label += ", dropout " + fmt("%g", k.dropout);
  if (several(&RowKey::weight_decay)) label += ", weight decay " + fmt("%g", k.weight_decay);
  return label;
}

std::vector<int> batch_columns(const std::vector<RunResult>& runs) {
  std::vector<int> batches;
  for (const auto& r : runs) batches.push_back(r.batch);
  std::sort(batches.begin(), batches.end(), std::greater<>());
  batches.erase(std::unique(batches.begin(), batches.end()), batches.end());
  return batches;
}

// Values of `field` over the runs of row `key` at `batch`: the finite ones, and how many were
// not finite (a diverged run's loss).
struct CellValues {
  std::vector<double> finite;
  size_t non_finite = 0;
};
CellValues cell_values(const std::vector<RunResult>& runs, const RowKey& key, int batch,
                       const std::function<double(const RunResult&)>& field) {
  CellValues v;
  for (const auto& r : runs) {
    if (key_of(r) == key && r.batch == batch) {
      const double x = field(r);
      if (std::isfinite(x)) {
        v.finite.push_back(x);
      } else {
        ++v.non_finite;
      }
    }
  }
  return v;
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / static_cast<double>(v.size());
}

std::string table_cell(const std::vector<double>& v, const char* format) {
  if (v.empty()) return "—";
  const double mean = mean_of(v);
  if (v.size() == 1) return fmt(format, mean);
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  const double sd = std::sqrt(ss / static_cast<double>(v.size() - 1));
  return fmt(format, mean) + " ± " + fmt(format, sd) + " (n=" + std::to_string(v.size()) + ")";
}

// As above; runs whose value is not finite are counted as diverged (only fields that are
// present in every run, such as losses, report them).
std::string table_cell(const CellValues& v, const char* format, bool show_diverged) {
  if (!show_diverged || v.non_finite == 0) return table_cell(v.finite, format);
  if (v.finite.empty()) return v.non_finite == 1 ? "diverged" : "diverged (all " + std::to_string(v.non_finite) + ")";
  return table_cell(v.finite, format) + ", " + std::to_string(v.non_finite) + " diverged";
}

double batch_stats_of(const RunResult& r) { return r.test_error_batch_stats.value_or(kNoValue); }
double precise_of(const RunResult& r) { return r.test_error_precise.value_or(kNoValue); }

// A Markdown table: one row per (label, field) pair, one column per batch size.
struct TableRow {
  std::string label;
  RowKey key;
  std::function<double(const RunResult&)> field;
  bool show_diverged = false;  // a non-finite value means the run diverged
};

std::string table(const std::vector<RunResult>& runs, const std::string& corner,
                  const std::vector<TableRow>& rows, const char* format) {
  const std::vector<int> batches = batch_columns(runs);
  std::string out = "| " + corner + " |";
  std::string rule = "|---|";
  for (int b : batches) {
    out += " batch " + std::to_string(b) + " |";
    rule += "---:|";
  }
  out += "\n" + rule + "\n";
  for (const auto& row : rows) {
    out += "| " + row.label + " |";
    for (int b : batches) {
      out += ' ';
      out += table_cell(cell_values(runs, row.key, b, row.field), format, row.show_diverged);
      out += " |";
    }
    out += "\n";
  }
  return out;
}

// Every run, one row each, in order: the table behind the means of the tables above.
std::string every_run_table(const std::vector<RunResult>& runs, const std::vector<RowKey>& keys) {
  std::string out = "\n## Every run\n\n";
  out += "| norm | batch | seed | test error (%) | with batch stats (%) | with precise stats (%) | "
         "train loss | images/s |\n|---|---:|---:|---:|---:|---:|---:|---:|\n";
  auto value = [](double v, const char* format) { return std::isnan(v) ? std::string("—") : fmt(format, v); };
  for (const RunResult& r : runs) {
    const std::string cells[] = {
        row_label(key_of(r), keys), std::to_string(r.batch), std::to_string(r.seed),
        value(r.test_error, "%.2f"), value(batch_stats_of(r), "%.2f"), value(precise_of(r), "%.2f"),
        std::isfinite(r.train_loss) ? fmt("%.4f", r.train_loss) : std::string("diverged"),
        value(r.images_per_s, "%.0f")};
    out += '|';
    for (const std::string& c : cells) {
      out += ' ';
      out += c;
      out += " |";
    }
    out += '\n';
  }
  return out;
}

json number_or_null(double v) { return std::isfinite(v) ? json(v) : json(nullptr); }

double read_number(const json& j, const std::string& path, const std::string& key) {
  const auto it = j.find(key);
  if (it == j.end()) throw IoError(path + ": metrics JSON lacks \"" + key + "\"");
  if (it->is_null()) return kNoValue;
  if (!it->is_number()) throw IoError(path + ": metrics JSON field \"" + key + "\" is not a number");
  return it->get<double>();
}

std::vector<double> read_array(const json& obj, const std::string& path, const std::string& key) {
  std::vector<double> out;
  const auto it = obj.find(key);
  if (it == obj.end()) return out;
  if (!it->is_array()) throw IoError(path + ": metrics JSON field \"" + key + "\" is not an array");
  for (const auto& v : *it) {
    if (v.is_null()) {
      out.push_back(kNoValue);
    } else if (v.is_number()) {
      out.push_back(v.get<double>());
    } else {
      throw IoError(path + ": metrics JSON array \"" + key + "\" holds a non-number");
    }
  }
  return out;
}

}  // namespace

std::string norm_label(const std::string& norm, int groups) {
  if (norm == "none") return "none";
  if (norm == "frozen") return "frozen BN";
  std::string upper = norm == "evonorm" ? "EvoNorm-S0" : norm;
  if (norm != "evonorm")
    for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if ((norm == "gn" || norm == "gn+ws" || norm == "evonorm") && groups > 0) upper += " (G=" + std::to_string(groups) + ")";
  return upper;
}

// ---- CSV --------------------------------------------------------------------------------------

std::string results_csv(const std::vector<RunResult>& runs) {
  const bool study = any_study_options(runs);
  std::string out = std::string(kCsvHeader) + (study ? kStudyColumns : "") + "\n";
  for (const auto& r : runs) {
    const std::vector<std::string> cells = {
        csv_quote(r.sync_bn ? std::string("syncbn") : r.norm),
        r.groups > 0 ? std::to_string(r.groups) : "",
        std::to_string(r.devices),
        std::to_string(r.batch),
        std::to_string(r.epochs),
        cell(r.lr),
        std::to_string(r.seed),
        cell(r.train_loss),
        cell(r.test_loss),
        cell(r.test_error),
        cell(batch_stats_of(r)),
        cell(precise_of(r)),
        cell(r.images_per_s),
        cell(r.seconds),
        r.sync_bn ? "1" : "0",
        cell(r.train_error_eval),
        cell(r.train_loss_eval)};
    for (size_t i = 0; i < cells.size(); ++i) {
      if (i > 0) out += ',';
      out += cells[i];
    }
    if (study) append_study_cells(out, r.init_scale, r.dropout, r.weight_decay);
    out += "\n";
  }
  return out;
}

void write_results_csv(const std::string& path, const std::vector<RunResult>& runs) {
  write_text_file(path, results_csv(runs));
}

std::vector<RunResult> read_results_csv(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw IoError(path + ": cannot open (" + std::strerror(errno) + ")");
  std::string line;
  const bool got_header = static_cast<bool>(std::getline(in, line));
  if (!got_header || (line != kCsvHeader && line != std::string(kCsvHeader) + kStudyColumns &&
                      line != kCsvHeaderBeforePrecise && line != kCsvHeaderBeforeGap)) {
    throw IoError(path + ": line 1 is not the results.csv header \"" + std::string(kCsvHeader) +
                  "\"; was the file written by normkit-train?");
  }
  // Cells by column name: the headers differ in order and in the columns they have.
  const std::vector<std::string> names = csv_split(line);
  const size_t columns = names.size();
  std::vector<RunResult> runs;
  for (int line_no = 2; std::getline(in, line); ++line_no) {
    if (line.empty()) continue;
    const auto cells = csv_split(line);
    const std::string where = path + ":" + std::to_string(line_no) + ": ";
    if (cells.size() != columns) {
      throw IoError(where + std::to_string(cells.size()) + " cells, expected " +
                    std::to_string(columns));
    }
    // The cell's index, or columns when this header lacks the column (an empty cell).
    auto index_of = [&](const char* name) {
      return static_cast<size_t>(std::find(names.begin(), names.end(), name) - names.begin());
    };
    static const std::string empty;
    auto cell_of = [&](const char* name) -> const std::string& {
      const size_t i = index_of(name);
      return i < columns ? cells[i] : empty;
    };
    auto number = [&](const char* name) {
      const std::string& c = cell_of(name);
      if (c.empty()) return kNoValue;
      char* end = nullptr;
      const double v = std::strtod(c.c_str(), &end);
      if (end != c.c_str() + c.size()) {
        throw IoError(where + "cell " + std::to_string(index_of(name) + 1) + " \"" + c +
                      "\" is not a number");
      }
      return v;
    };
    auto integer = [&](const char* name) -> uint64_t {
      const std::string& c = cell_of(name);
      if (c.empty()) return 0;
      if (!std::all_of(c.begin(), c.end(), [](char ch) { return std::isdigit(static_cast<unsigned char>(ch)); })) {
        throw IoError(where + "cell " + std::to_string(index_of(name) + 1) + " \"" + c + "\" is not a whole number");
      }
      return std::stoull(c);
    };
    RunResult r;
    // SyncBN is BatchNorm with statistics over all devices.
    r.norm = cells[0] == "syncbn" ? "bn" : cells[0];
    r.groups = static_cast<int>(integer("groups"));
    r.devices = static_cast<int>(integer("devices"));
    r.batch = static_cast<int>(integer("batch"));
    r.epochs = static_cast<int>(integer("epochs"));
    r.lr = number("lr");
    r.seed = integer("seed");
    r.train_loss = number("train_loss");
    r.test_loss = number("test_loss");
    r.test_error = number("test_error");
    if (!cell_of("test_error_batch_stats").empty()) r.test_error_batch_stats = number("test_error_batch_stats");
    if (!cell_of("test_error_precise").empty()) r.test_error_precise = number("test_error_precise");
    r.images_per_s = number("images_per_s");
    r.seconds = number("seconds");
    r.sync_bn = integer("sync_bn") != 0 || cells[0] == "syncbn";
    r.train_error_eval = number("train_error_eval");
    r.train_loss_eval = number("train_loss_eval");
    // The studies' options: their defaults where the header lacks them.
    for (auto [name, field] : {std::pair{"init_scale", &RunResult::init_scale},
                               std::pair{"dropout", &RunResult::dropout},
                               std::pair{"weight_decay", &RunResult::weight_decay}})
      if (!cell_of(name).empty()) r.*field = number(name);
    runs.push_back(std::move(r));
  }
  return runs;
}

// ---- Markdown ---------------------------------------------------------------------------------

std::string results_markdown(const std::vector<RunResult>& runs, const std::string& notes) {
  std::string out = "# Results\n\n";
  if (!notes.empty()) out += notes + "\n\n";
  const std::vector<RowKey> keys = row_keys(runs);
  bool repeated = false;
  for (const auto& k : keys) {
    for (int b : batch_columns(runs)) {
      const CellValues v = cell_values(runs, k, b, [](const RunResult& r) { return r.test_error; });
      repeated |= v.finite.size() + v.non_finite > 1;
    }
  }
  auto rows_of = [&](const std::function<double(const RunResult&)>& field, bool show_diverged) {
    std::vector<TableRow> rows;
    for (const auto& k : keys) rows.push_back({row_label(k, keys), k, field, show_diverged});
    return rows;
  };

  out += "## Test error (%) by batch size\n\n";
  out += table(runs, "norm", rows_of([](const RunResult& r) { return r.test_error; }, false), "%.2f");
  if (repeated)
    out += "\nCells with several runs show the mean ± sample std over n seeds (n runs, one per "
           "seed; every run is in the last table).\n";

  std::vector<TableRow> stats_rows;
  for (const auto& k : keys) {
    const bool has = std::any_of(runs.begin(), runs.end(), [&](const RunResult& r) {
      return key_of(r) == k && r.test_error_batch_stats.has_value();
    });
    if (!has) continue;
    const std::string label = row_label(k, keys);
    stats_rows.push_back({label + ", running statistics", k, [](const RunResult& r) { return r.test_error; }});
    stats_rows.push_back({label + ", batch statistics", k, batch_stats_of});
    const bool precise = std::any_of(runs.begin(), runs.end(), [&](const RunResult& r) {
      return key_of(r) == k && r.test_error_precise.has_value();
    });
    if (precise) stats_rows.push_back({label + ", precise statistics", k, precise_of});
  }
  if (!stats_rows.empty()) {
    out += "\n## Test error (%) with running vs batch statistics at test time\n\n";
    out += "Running statistics are the averages gathered in training (the usual inference mode); "
           "batch statistics normalize each test batch (of the training batch size) by its own "
           "mean and variance, as in training; precise statistics (where computed) are recomputed "
           "after training with the final weights, the equal-weight average over batches of "
           "training images of each batch's mean and variance.\n\n";
    out += table(runs, "evaluated with", stats_rows, "%.2f");
  }

  out += "\n## Training loss of the last epoch\n\n";
  out += "Mean softmax cross-entropy over the last epoch's training images; \"diverged\" marks a "
         "run whose loss stopped being a finite number.\n\n";
  out += table(runs, "norm", rows_of([](const RunResult& r) { return r.train_loss; }, true), "%.4f");

  out += "\n## Training speed (images/s)\n\n";
  out += table(runs, "norm", rows_of([](const RunResult& r) { return r.images_per_s; }, false), "%.0f");

  std::vector<TableRow> gap_rows;
  for (const auto& k : keys) {
    const bool has = std::any_of(runs.begin(), runs.end(), [&](const RunResult& r) {
      return key_of(r) == k && std::isfinite(r.train_error_eval);
    });
    if (!has) continue;
    const std::string label = row_label(k, keys);
    gap_rows.push_back({label + ", training images", k, [](const RunResult& r) { return r.train_error_eval; }});
    gap_rows.push_back({label + ", test images", k, [](const RunResult& r) { return r.test_error; }});
  }
  if (!gap_rows.empty()) {
    out += "\n## Train/test gap: error (%) evaluated at the end\n\n";
    out += "The first training images (--eval-train-images) and the test images, both evaluated "
           "by the final model as at test time.\n\n";
    out += table(runs, "evaluated on", gap_rows, "%.2f");
  }
  if (repeated) out += every_run_table(runs, keys);
  return out;
}

std::string summary_csv(const std::vector<RunResult>& runs) {
  const char* errors[] = {"test_error", "test_error_batch_stats", "test_error_precise"};
  const bool study = any_study_options(runs);
  std::string out = "norm,groups,devices,batch,lr,n";
  for (const char* e : errors)
    for (const char* s : {"mean", "std", "min", "max"}) out += std::string(",") + e + "_" + s;
  if (study) out += kStudyColumns;
  out += "\n";
  const std::function<double(const RunResult&)> fields[] = {
      [](const RunResult& r) { return r.test_error; }, batch_stats_of, precise_of};
  for (const RowKey& k : row_keys(runs)) {
    for (int b : batch_columns(runs)) {
      const auto first = std::find_if(runs.begin(), runs.end(),
                                      [&](const RunResult& r) { return key_of(r) == k && r.batch == b; });
      if (first == runs.end()) continue;
      const size_t n = static_cast<size_t>(std::count_if(
          runs.begin(), runs.end(), [&](const RunResult& r) { return key_of(r) == k && r.batch == b; }));
      for (const std::string& c : {csv_quote(k.sync_bn ? std::string("syncbn") : k.norm),
                                   k.groups > 0 ? std::to_string(k.groups) : std::string(),
                                   std::to_string(k.devices), std::to_string(b), cell(first->lr)}) {
        out += c;
        out += ',';
      }
      out += std::to_string(n);
      for (const auto& field : fields) {
        const std::vector<double> v = cell_values(runs, k, b, field).finite;
        const double mean = v.empty() ? kNoValue : mean_of(v);
        double ss = 0;
        for (double x : v) ss += (x - mean) * (x - mean);
        const double sd = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : kNoValue;
        for (double x : {mean, sd, v.empty() ? kNoValue : *std::min_element(v.begin(), v.end()),
                         v.empty() ? kNoValue : *std::max_element(v.begin(), v.end())}) {
          out += ',';
          out += cell(x);
        }
      }
      if (study) append_study_cells(out, k.init_scale, k.dropout, k.weight_decay);
      out += "\n";
    }
  }
  return out;
}

void write_summary_csv(const std::string& path, const std::vector<RunResult>& runs) {
  write_text_file(path, summary_csv(runs));
}

void write_results_markdown(const std::string& path, const std::vector<RunResult>& runs,
                            const std::string& notes) {
  write_text_file(path, results_markdown(runs, notes));
}

// ---- metrics JSON -----------------------------------------------------------------------------

std::string metrics_json(const RunResult& r) {
  if (r.loss_curve_step.size() != r.loss_curve_loss.size()) {
    throw Error("metrics_json: loss_curve_step has " + std::to_string(r.loss_curve_step.size()) +
                " entries but loss_curve_loss has " + std::to_string(r.loss_curve_loss.size()));
  }
  json history = json::object();
  auto column = [&](const char* name, const std::function<double(const EpochRecord&)>& f) {
    json a = json::array();
    for (const auto& e : r.history) a.push_back(number_or_null(f(e)));
    history[name] = std::move(a);
  };
  json epochs = json::array();
  for (const auto& e : r.history) epochs.push_back(e.epoch);
  history["epoch"] = std::move(epochs);
  column("lr", [](const EpochRecord& e) { return e.lr; });
  column("train_loss", [](const EpochRecord& e) { return e.train_loss; });
  column("train_error", [](const EpochRecord& e) { return e.train_error; });
  column("test_loss", [](const EpochRecord& e) { return e.test_loss; });
  column("test_error", [](const EpochRecord& e) { return e.test_error; });
  column("test_error_batch_stats", [](const EpochRecord& e) { return e.test_error_batch_stats; });
  column("seconds", [](const EpochRecord& e) { return e.seconds; });
  column("images_per_s", [](const EpochRecord& e) { return e.images_per_s; });

  json curve_loss = json::array();
  for (double v : r.loss_curve_loss) curve_loss.push_back(number_or_null(v));

  nlohmann::ordered_json j;
  j["norm"] = r.norm;
  j["groups"] = r.groups;
  j["batch"] = r.batch;
  j["epochs"] = r.epochs;
  j["lr"] = number_or_null(r.lr);
  j["seed"] = r.seed;
  j["train_loss"] = number_or_null(r.train_loss);
  j["test_loss"] = number_or_null(r.test_loss);
  j["test_error"] = number_or_null(r.test_error);
  j["test_error_batch_stats"] = number_or_null(batch_stats_of(r));
  // The newer fields only where they say something, so other runs' files stay as they were.
  if (r.test_error_precise) j["test_error_precise"] = number_or_null(*r.test_error_precise);
  j["images_per_s"] = number_or_null(r.images_per_s);
  j["seconds"] = number_or_null(r.seconds);
  j["history"] = history;
  j["loss_curve"] = {{"step", r.loss_curve_step}, {"loss", curve_loss}};
  // Only when not one unsynchronized device, so such a run's file is what it was before
  // devices existed.
  if (r.devices != 1 || r.sync_bn) {
    j["devices"] = r.devices;
    j["sync_bn"] = r.sync_bn;
  }
  if (r.crop_pad != 0) j["crop_pad"] = r.crop_pad;
  if (r.hflip) j["hflip"] = true;
  if (r.lr_warmup != 0) j["lr_warmup"] = r.lr_warmup;
  if (r.renorm) {
    j["renorm_r_max"] = r.renorm->r_max;
    j["renorm_d_max"] = r.renorm->d_max;
    j["renorm_warmup"] = r.renorm->warmup;
  }
  // Likewise each study option only when not its default.
  const RunResult defaults;
  if (r.init_scale != defaults.init_scale) j["init_scale"] = r.init_scale;
  if (r.dropout != defaults.dropout) j["dropout"] = r.dropout;
  if (r.weight_decay != defaults.weight_decay) j["weight_decay"] = r.weight_decay;
  if (r.eval_train_images != 0) j["eval_train_images"] = r.eval_train_images;
  if (!r.classes.empty()) j["classes"] = r.classes;
  if (!r.init_from.empty()) j["init_from"] = r.init_from;
  if (std::isfinite(r.train_error_eval)) j["train_error_eval"] = r.train_error_eval;
  if (std::isfinite(r.train_loss_eval)) j["train_loss_eval"] = r.train_loss_eval;
  return j.dump(2) + "\n";
}

void write_metrics_json(const std::string& path, const RunResult& run) {
  write_text_file(path, metrics_json(run));
}

RunResult read_metrics_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw IoError(path + ": cannot open (" + std::strerror(errno) + ")");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    throw IoError(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object()) throw IoError(path + ": metrics JSON is not an object");
  RunResult r;
  const auto norm = j.find("norm");
  if (norm == j.end() || !norm->is_string()) throw IoError(path + ": metrics JSON lacks string \"norm\"");
  r.norm = norm->get<std::string>();
  auto whole = [&](const char* key) {
    const double v = read_number(j, path, key);
    if (!(v >= 0) || v != std::floor(v)) {
      throw IoError(path + ": metrics JSON field \"" + key + "\" is not a whole number");
    }
    return v;
  };
  r.groups = static_cast<int>(whole("groups"));
  r.batch = static_cast<int>(whole("batch"));
  r.epochs = static_cast<int>(whole("epochs"));
  const auto seed = j.find("seed");
  if (seed == j.end() || !seed->is_number_unsigned()) {
    throw IoError(path + ": metrics JSON lacks a non-negative integer \"seed\"");
  }
  r.seed = seed->get<uint64_t>();
  r.lr = read_number(j, path, "lr");
  r.train_loss = read_number(j, path, "train_loss");
  r.test_loss = read_number(j, path, "test_loss");
  r.test_error = read_number(j, path, "test_error");
  const double batch_stats = read_number(j, path, "test_error_batch_stats");
  if (std::isfinite(batch_stats)) r.test_error_batch_stats = batch_stats;
  r.images_per_s = read_number(j, path, "images_per_s");
  r.seconds = read_number(j, path, "seconds");
  if (j.contains("test_error_precise")) {
    const double precise = read_number(j, path, "test_error_precise");
    if (std::isfinite(precise)) r.test_error_precise = precise;
  }
  if (const auto p = j.find("crop_pad"); p != j.end()) {
    if (!p->is_number_unsigned())
      throw IoError(path + ": metrics JSON field \"crop_pad\" is not a whole number");
    r.crop_pad = static_cast<int>(p->get<uint64_t>());
  }
  if (const auto h = j.find("hflip"); h != j.end()) {
    if (!h->is_boolean()) throw IoError(path + ": metrics JSON field \"hflip\" is not true or false");
    r.hflip = h->get<bool>();
  }
  if (j.contains("lr_warmup")) r.lr_warmup = read_number(j, path, "lr_warmup");
  if (j.contains("renorm_r_max"))
    r.renorm = RunResult::Renorm{read_number(j, path, "renorm_r_max"),
                                 read_number(j, path, "renorm_d_max"),
                                 read_number(j, path, "renorm_warmup")};
  if (const auto d = j.find("devices"); d != j.end()) {
    if (!d->is_number_unsigned() || d->get<uint64_t>() < 1)
      throw IoError(path + ": metrics JSON field \"devices\" is not a positive whole number");
    r.devices = static_cast<int>(d->get<uint64_t>());
  }
  if (const auto b = j.find("sync_bn"); b != j.end()) {
    if (!b->is_boolean()) throw IoError(path + ": metrics JSON field \"sync_bn\" is not true or false");
    r.sync_bn = b->get<bool>();
  }
  for (const auto& [key, field] : {std::pair{"init_scale", &RunResult::init_scale},
                                   {"dropout", &RunResult::dropout},
                                   {"weight_decay", &RunResult::weight_decay},
                                   {"train_error_eval", &RunResult::train_error_eval},
                                   {"train_loss_eval", &RunResult::train_loss_eval}})
    if (j.contains(key)) r.*field = read_number(j, path, key);
  if (j.contains("eval_train_images"))
    r.eval_train_images = static_cast<int64_t>(whole("eval_train_images"));
  if (const auto c = j.find("classes"); c != j.end()) {
    for (double v : read_array(j, path, "classes")) {
      if (!(v >= 0 && v <= 255) || v != std::floor(v))
        throw IoError(path + ": metrics JSON array \"classes\" holds a non-label");
      r.classes.push_back(static_cast<int>(v));
    }
  }
  if (const auto f = j.find("init_from"); f != j.end()) {
    if (!f->is_string()) throw IoError(path + ": metrics JSON field \"init_from\" is not a string");
    r.init_from = f->get<std::string>();
  }

  if (const auto h = j.find("history"); h != j.end()) {
    if (!h->is_object()) throw IoError(path + ": metrics JSON \"history\" is not an object");
    const auto epoch = read_array(*h, path, "epoch");
    const std::pair<const char*, double EpochRecord::*> fields[] = {
        {"lr", &EpochRecord::lr},
        {"train_loss", &EpochRecord::train_loss},
        {"train_error", &EpochRecord::train_error},
        {"test_loss", &EpochRecord::test_loss},
        {"test_error", &EpochRecord::test_error},
        {"test_error_batch_stats", &EpochRecord::test_error_batch_stats},
        {"seconds", &EpochRecord::seconds},
        {"images_per_s", &EpochRecord::images_per_s}};
    r.history.resize(epoch.size());
    for (size_t i = 0; i < epoch.size(); ++i) r.history[i].epoch = static_cast<int>(epoch[i]);
    for (const auto& [name, member] : fields) {
      const auto values = read_array(*h, path, name);
      if (values.empty()) continue;
      if (values.size() != epoch.size()) {
        throw IoError(path + ": metrics JSON history \"" + std::string(name) + "\" has " +
                      std::to_string(values.size()) + " entries for " +
                      std::to_string(epoch.size()) + " epochs");
      }
      for (size_t i = 0; i < values.size(); ++i) r.history[i].*member = values[i];
    }
  }
  if (const auto c = j.find("loss_curve"); c != j.end()) {
    if (!c->is_object()) throw IoError(path + ": metrics JSON \"loss_curve\" is not an object");
    const auto steps = read_array(*c, path, "step");
    r.loss_curve_loss = read_array(*c, path, "loss");
    if (steps.size() != r.loss_curve_loss.size()) {
      throw IoError(path + ": metrics JSON loss_curve has " + std::to_string(steps.size()) +
                    " steps but " + std::to_string(r.loss_curve_loss.size()) + " losses");
    }
    for (double s : steps) r.loss_curve_step.push_back(static_cast<int64_t>(s));
  }
  return r;
}

}  // namespace normkit::train
