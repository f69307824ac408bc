#include "preflight.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "dist.h"
#include "io/io_error.h"
#include "normkit/error.h"

namespace normkit::train {
namespace {

namespace fs = std::filesystem;

// Whether a file can be created in `dir`: creates one and removes it. errno-style code or 0.
int probe_folder(const fs::path& dir) {
  std::string name = (dir / ".normkit-train-probe-XXXXXX").string();
  const int fd = ::mkstemp(name.data());
  if (fd < 0) return errno;
  ::close(fd);
  ::unlink(name.c_str());
  return 0;
}

std::string gib(double bytes) {
  char b[64];
  if (!std::isfinite(bytes) || bytes > 9.2e18)
    std::snprintf(b, sizeof b, "more than 8 EiB");
  else if (bytes >= 1024.0 * 1024 * 1024)
    std::snprintf(b, sizeof b, "%.1f GiB", bytes / (1024.0 * 1024 * 1024));
  else
    std::snprintf(b, sizeof b, "%.0f MiB", std::ceil(bytes / (1024.0 * 1024)));
  return b;
}

std::string join(const std::vector<int>& v) {
  std::string s;
  for (int x : v) {
    if (!s.empty()) s += ',';
    s += std::to_string(x);
  }
  return s;
}

// The value of `key` in /proc/meminfo, in bytes; 0 when absent.
uint64_t meminfo(const std::string& key) {
  std::ifstream in("/proc/meminfo");
  std::string name, unit;
  uint64_t value = 0;
  while (in >> name >> value) {
    std::getline(in, unit);
    if (name == key + ":") return value * 1024;  // kB
  }
  return 0;
}

// A number from a cgroup v2 file; 0 when absent or "max".
uint64_t cgroup_value(const std::string& file) {
  std::ifstream in("/sys/fs/cgroup/" + file);
  std::string v;
  if (!(in >> v) || v == "max") return 0;
  try {
    return std::stoull(v);
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace

void check_output_file(const std::string& option, const std::string& path) {
  if (path.empty()) return;
  const std::string what = option + " " + path + ": ";
  std::error_code ec;
  if (fs::is_directory(path, ec))
    throw IoError(what + "is a folder; give the name of a file in it");
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  if (!fs::exists(dir, ec))
    throw IoError(what + "the folder " + dir.string() +
                  " does not exist; create it first or choose another path");
  if (!fs::is_directory(dir, ec))
    throw IoError(what + dir.string() + " is not a folder; choose another path");
  if (const int e = probe_folder(dir))
    throw IoError(what + "cannot create files in " + dir.string() + " (" + std::strerror(e) +
                  "); choose a writable folder");
}

void check_output_folder(const std::string& option, const std::string& path) {
  const std::string what = option + " " + path + ": ";
  if (path.empty()) throw IoError(option + ": give a folder");
  std::error_code ec;
  fs::path dir = path;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw IoError(what + "exists and is not a folder; choose another path");
  // The nearest existing ancestor is where the folder would be created.
  while (!fs::exists(dir, ec)) {
    const fs::path parent = dir.parent_path();
    if (parent.empty() || parent == dir) {
      dir = ".";
      break;
    }
    dir = parent;
  }
  if (!fs::is_directory(dir, ec))
    throw IoError(what + dir.string() + " is not a folder; choose another path");
  if (const int e = probe_folder(dir))
    throw IoError(what + "cannot create files in " + dir.string() + " (" + std::strerror(e) +
                  "); choose a writable folder");
}

uint64_t available_memory_bytes() {
  if (const char* v = std::getenv("NORMKIT_TRAIN_AVAILABLE_MEMORY")) {
    try {
      return std::stoull(v);
    } catch (const std::exception&) {
    }
  }
  uint64_t avail = meminfo("MemAvailable");
  if (avail == 0) {
    const long pages = ::sysconf(_SC_AVPHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) avail = static_cast<uint64_t>(pages) * static_cast<uint64_t>(page);
  }
  const uint64_t limit = cgroup_value("memory.max"), used = cgroup_value("memory.current");
  if (limit > 0) avail = std::min(avail == 0 ? limit : avail, limit > used ? limit - used : 0);
  return avail;
}

MemoryEstimate estimate_run_memory(const TrainConfig& config, int64_t rows, int64_t cols,
                                   int64_t test_images) {
  int64_t eval_n = rows > 0 ? std::min<int64_t>(config.eval_batch, std::max<int64_t>(test_images, 1)) : 0;
  // SyncBN's evaluation with batch statistics normalizes batches of all devices' images.
  if (rows > 0 && config.sync_bn && config.eval_batch_stats)
    eval_n = std::max<int64_t>(eval_n, std::min<int64_t>(global_batch(config), std::max<int64_t>(test_images, 1)));
  MemoryEstimate e = estimate_memory(config.model, config.batch, eval_n, rows, cols, config.threads);
  // Precise BN statistics: train-mode forwards of precise_bn_batch images on device 0.
  if (rows > 0 && has_batch_statistics(config.model.norm) && config.precise_bn_images > 0) {
    const int64_t n = std::min<int64_t>(config.precise_bn_batch, config.precise_bn_images);
    const MemoryEstimate p = estimate_memory(config.model, n, n, rows, cols, config.threads);
    e.activations = std::max(e.activations, p.activations);
  }
  // This process's other devices: each a replica of the model with its own activations for its
  // `batch` images (device 0 alone evaluates), and the gradient exchange's buffers: this
  // process's devices' gradients and, with several processes, every device's.
  const int local = std::max(1, config.devices / std::max(1, dist::size()));
  if (local > 1) {
    const MemoryEstimate d = estimate_memory(config.model, config.batch, 0, rows, cols, config.threads);
    e.parameters += (local - 1) * d.parameters;
    e.activations += (local - 1) * d.activations;
    e.workspace += (local - 1) * d.workspace;
  }
  if (config.devices > 1)
    e.workspace += 4.0 * e.parameter_count * (local + (dist::size() > 1 ? config.devices : 0));
  // A checkpoint: the tensors copied, then encoded (value and momentum, twice), or read back.
  if (rows > 0 && (!config.checkpoint_path.empty() || !config.resume_path.empty()))
    e.workspace += 3.0 * 2.0 * 4.0 * e.parameter_count;
  // The input batches (training and evaluation).
  e.activations += 4.0 * (static_cast<double>(local) * config.batch + static_cast<double>(eval_n)) *
                   static_cast<double>(rows) * static_cast<double>(cols);
  return e;
}

void check_fits_in_memory(const TrainConfig& config, int64_t rows, int64_t cols,
                          int64_t test_images, int runs_at_once, double data_bytes_per_run) {
  const MemoryEstimate e = estimate_run_memory(config, rows, cols, test_images);
  const double per_run = e.total() + data_bytes_per_run;
  const double need = per_run * std::max(runs_at_once, 1);
  const uint64_t avail = available_memory_bytes();
  if (avail == 0 || need <= static_cast<double>(avail)) return;
  // Name the options behind the largest part.
  std::string change;
  const std::string widths = "--widths (" + join(config.model.widths) + ")";
  if (e.parameters >= e.activations && e.parameters >= e.workspace)
    change = "lower " + widths + " or --blocks-per-stage (" +
             std::to_string(config.model.blocks_per_stage) + ")";
  else if (e.activations >= e.workspace)
    change = "lower --batch (" + std::to_string(config.batch) + ")" +
             (config.devices > 1 ? ", --devices (" + std::to_string(config.devices) + ")" : std::string()) +
             (config.eval_batch > config.batch
                  ? ", --eval-batch (" + std::to_string(config.eval_batch) + ")"
                  : std::string()) +
             (config.model.blocks_per_stage > 1
                  ? ", " + widths + " or --blocks-per-stage (" +
                        std::to_string(config.model.blocks_per_stage) + ")"
                  : " or " + widths);
  else
    change = "lower --threads (" + std::to_string(config.threads) + ") or " + widths;
  if (runs_at_once > 1)
    change += ", or train fewer runs at once (--jobs " + std::to_string(runs_at_once) + ")";
  const std::string what = rows > 0 ? "this configuration" : "this model";
  const std::string need_text = gib(need);
  const bool several = runs_at_once > 1 || data_bytes_per_run > 0;
  throw Error(what + (std::isdigit(static_cast<unsigned char>(need_text[0])) ? " needs about " : " needs ") +
              need_text +
              (runs_at_once > 1 ? " for " + std::to_string(runs_at_once) + " runs at once" : "") +
              " (parameters and optimizer state " + gib(e.parameters) +
              (rows > 0 ? ", activations " + gib(e.activations) + " at --batch " +
                              std::to_string(config.batch) + ", workspace " + gib(e.workspace)
                        : std::string()) +
              (data_bytes_per_run > 0 ? ", data " + gib(data_bytes_per_run) : std::string()) +
              (several ? " per run" : "") + "), but " + gib(static_cast<double>(avail)) +
              " of memory is available; " + change);
}

void check_fits_data(const TrainConfig& config, const Data& data) {
  const int64_t train_count =
      config.limit_train < 0 ? data.train.count : std::min(config.limit_train, data.train.count);
  if (global_batch(config) <= train_count) return;
  const bool limited = config.limit_train > 0;
  if (config.devices > 1)
    throw Error("--devices " + std::to_string(config.devices) + " x --batch " +
                std::to_string(config.batch) + " = " + std::to_string(global_batch(config)) +
                " images per step is more than the " + std::to_string(train_count) +
                " training images" +
                (limited ? " that --limit-train " + std::to_string(config.limit_train) + " leaves"
                         : " in " + config.data_dir) +
                "; lower --devices or --batch" +
                (limited && train_count == config.limit_train ? ", or raise --limit-train" : ""));
  throw Error("--batch " + std::to_string(config.batch) + " is larger than the " +
              std::to_string(train_count) + " training images" +
              (limited ? " that --limit-train " + std::to_string(config.limit_train) + " leaves"
                       : " in " + config.data_dir) +
              "; lower --batch" +
              (limited && train_count == config.limit_train ? " or raise --limit-train" : ""));
}

}  // namespace normkit::train
