#include "trainer.h"

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <sstream>

#include "devices.h"
#include "dist.h"
#include "io/io_error.h"
#include "io/safetensors.h"
#include "nn/parallel.h"
#include "nn/profile.h"
#include "nn/rng.h"
#include "nn/sgd.h"
#include "normkit/error.h"
#include "preflight.h"

namespace normkit::train {
namespace {

// The checkpoint's layout version. A checkpoint must also carry its checksum (the safetensors
// "crc32" metadata): a file without one cannot be told apart from a damaged one.
constexpr const char* kCheckpointFormatPrefix = "normkit-train checkpoint ";
constexpr const char* kCheckpointFormat = "normkit-train checkpoint 1";

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::string fmt(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

template <typename T> std::string join(const std::vector<T>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ',';
    s += fmt(static_cast<double>(v[i]));
  }
  return s;
}

// Everything a checkpoint must agree with to be resumed: what shapes the model, the data order
// or the schedule. Key -> (value, the option that sets it).
std::vector<std::pair<std::string, std::pair<std::string, std::string>>> run_identity(
    const TrainConfig& c, int64_t train_images) {
  const bool brn = c.model.norm == NormKind::batch_renorm;
  return {{"norm", {to_string(c.model.norm), "--norm"}},
          {"groups", {uses_groups(c.model.norm) ? std::to_string(c.model.groups) : "-", "--groups"}},
          {"widths", {join(c.model.widths), "--widths"}},
          {"blocks_per_stage", {std::to_string(c.model.blocks_per_stage), "--blocks-per-stage"}},
          {"batch", {std::to_string(c.batch), "--batch"}},
          {"epochs", {std::to_string(c.epochs), "--epochs"}},
          {"lr_base", {fmt(c.lr_base), "--lr-base"}},
          {"lr_decay_at", {join(c.lr_decay_at), "--lr-decay-at"}},
          {"seed", {std::to_string(c.seed), "--seed"}},
          {"train_images", {std::to_string(train_images), "--limit-train"}},
          {"devices", {std::to_string(c.devices), "--devices"}},
          {"sync_bn", {c.sync_bn ? "1" : "0", "--sync-bn"}},
          {"crop_pad", {std::to_string(c.crop_pad), "--crop-pad"}},
          {"hflip", {c.hflip ? "1" : "0", "--hflip"}},
          {"lr_warmup", {fmt(c.lr_warmup), "--warmup"}},
          {"init_scale", {fmt(c.model.init_scale), "--init-scale"}},
          {"dropout", {fmt(c.model.dropout), "--dropout"}},
          {"weight_decay", {fmt(c.weight_decay), "--weight-decay"}},
          {"eval_train_images", {std::to_string(c.eval_train_images), "--eval-train-images"}},
          {"classes", {c.classes.empty() ? "all" : join(c.classes), "--classes"}},
          {"renorm_r_max", {brn ? fmt(c.renorm_r_max) : "-", "--renorm-r-max"}},
          {"renorm_d_max", {brn ? fmt(c.renorm_d_max) : "-", "--renorm-d-max"}},
          {"renorm_warmup", {brn ? fmt(c.renorm_warmup) : "-", "--renorm-warmup"}}};
}

// Identity keys a checkpoint carries only when they differ from these values, so that a
// one-device checkpoint has exactly the bytes it had before devices existed.
const char* identity_default(const std::string& key) {
  if (key == "devices") return "1";
  if (key == "sync_bn") return "0";
  if (key == "crop_pad" || key == "hflip" || key == "lr_warmup") return "0";
  if (key == "init_scale") return "1";
  if (key == "dropout") return "0";
  if (key == "weight_decay") return "0.0001";  // fmt(1e-4)
  if (key == "eval_train_images") return "0";
  if (key == "classes") return "all";
  if (key.rfind("renorm_", 0) == 0) return "-";  // the norms other than brn
  return nullptr;
}

// The checkpoint a fine-tuning run started from: informational, for the metrics, and not part
// of the identity (a resumed run does not repeat --init-from).
constexpr const char* kInitFromKey = "init_from";

// The loop's position and running statistics: everything besides the model and the optimizer
// that a resumed run needs to continue bit for bit.
struct LoopState {
  int epoch = 0;              // 0-based, the epoch in progress
  int64_t step = 0;           // next step within the epoch
  int64_t global_step = 0;    // steps done
  std::vector<int64_t> permutation;  // of the epoch in progress
  double epoch_loss_sum = 0;  // over the images of the epoch so far
  int64_t epoch_correct = 0, epoch_seen = 0;
  double segment_loss_sum = 0;  // since the last curve point
  int64_t segment_steps = 0;
  std::vector<int64_t> curve_step;
  std::vector<double> curve_loss;
  std::vector<EpochRecord> history;  // finished epochs
};

template <typename F> std::vector<double> column(const std::vector<EpochRecord>& h, F f) {
  std::vector<double> v;
  for (const EpochRecord& e : h) v.push_back(f(e));
  return v;
}

void save_checkpoint(const std::string& path, const TrainConfig& config, int64_t train_images,
                     Model& model, const LoopState& s) {
  TensorMap t;
  for (Param* p : model.params()) {
    t["param/" + p->name] = make_f32(p->value);
    t["momentum/" + p->name] = make_f32(p->momentum);
  }
  for (const Buffer& b : model.buffers()) t["buffer/" + b.name] = make_f32(*b.values);
  t["position/epoch"] = make_i64_scalar(s.epoch);
  t["position/step"] = make_i64_scalar(s.step);
  t["position/global_step"] = make_i64_scalar(s.global_step);
  t["position/permutation"] = make_i64(s.permutation);
  t["stats/epoch_loss_sum"] = make_f64_scalar(s.epoch_loss_sum);
  t["stats/epoch_correct"] = make_i64_scalar(s.epoch_correct);
  t["stats/epoch_seen"] = make_i64_scalar(s.epoch_seen);
  t["stats/segment_loss_sum"] = make_f64_scalar(s.segment_loss_sum);
  t["stats/segment_steps"] = make_i64_scalar(s.segment_steps);
  t["curve/step"] = make_i64(s.curve_step);
  t["curve/loss"] = make_f64(s.curve_loss);
  const auto& h = s.history;
  t["history/lr"] = make_f64(column(h, [](const EpochRecord& e) { return e.lr; }));
  t["history/train_loss"] = make_f64(column(h, [](const EpochRecord& e) { return e.train_loss; }));
  t["history/train_error"] = make_f64(column(h, [](const EpochRecord& e) { return e.train_error; }));
  t["history/seconds"] = make_f64(column(h, [](const EpochRecord& e) { return e.seconds; }));
  t["history/images_per_s"] = make_f64(column(h, [](const EpochRecord& e) { return e.images_per_s; }));
  Metadata meta{{"format", kCheckpointFormat},
                {"lr_next", fmt(learning_rate(config, s.global_step,
                                              train_images / global_batch(config) * config.epochs))}};
  for (const auto& [key, value] : run_identity(config, train_images)) {
    const char* fallback = identity_default(key);
    if (fallback == nullptr || value.first != fallback) meta[key] = value.first;
  }
  if (!config.init_from.empty()) meta[kInitFromKey] = config.init_from;
  save_safetensors(path, t, meta, Checksum::crc32);
}

void load_checkpoint(const std::string& path, const TrainConfig& config, int64_t train_images,
                     Model& model, LoopState& s, std::string* init_from = nullptr) {
  const std::string keep =
      "; this run did not start. Resume from an intact copy, or start over without --resume";
  SafetensorsFile f;
  try {
    f = load_safetensors(path);
  } catch (const IoError& e) {
    throw IoError(std::string("cannot resume: ") + e.what() + keep);
  }
  auto meta = [&](const std::string& key) {
    const auto it = f.metadata.find(key);
    const char* fallback = identity_default(key);
    if (it == f.metadata.end()) return std::string(fallback ? fallback : "(absent)");
    return it->second;
  };
  const std::string format = meta("format");
  if (format != kCheckpointFormat) {
    if (format.rfind(kCheckpointFormatPrefix, 0) == 0)
      throw IoError("cannot resume from " + path + ": it was written by another version of "
                    "normkit-train (format '" + format + "'; this one reads '" +
                    kCheckpointFormat + "')" + keep);
    throw IoError("cannot resume from " + path + ": it is not a normkit-train checkpoint (format '" +
                  format + "', expected '" + kCheckpointFormat + "')" + keep);
  }
  if (!f.checksum_verified)
    throw IoError("cannot resume from " + path + ": it carries no checksum (\"" + kChecksumKey +
                  "\" metadata), so damage cannot be ruled out; it was written by an older "
                  "normkit-train or its header was altered" + keep);
  for (const auto& [key, value] : run_identity(config, train_images))
    if (meta(key) != value.first)
      throw IoError("cannot resume from " + path + ": it was written with " + key + " = " +
                    meta(key) + ", this run has " + key + " = " + value.first + " (" +
                    value.second + "); resume with the options the checkpoint was written with");
  // Read everything first, then assign, so a bad file leaves the model untouched.
  const std::vector<Param*> params = model.params();
  const std::vector<Buffer> bufs = model.buffers();
  std::vector<std::vector<float>> values, momenta, buffers;
  for (Param* p : params) {
    values.emplace_back(p->size());
    momenta.emplace_back(p->size());
    get_f32_into(f, "param/" + p->name, values.back());
    get_f32_into(f, "momentum/" + p->name, momenta.back());
  }
  for (const Buffer& b : bufs) {
    buffers.emplace_back(b.values->size());
    get_f32_into(f, "buffer/" + b.name, buffers.back());
  }
  LoopState r;
  r.epoch = static_cast<int>(get_i64_scalar(f, "position/epoch"));
  r.step = get_i64_scalar(f, "position/step");
  r.global_step = get_i64_scalar(f, "position/global_step");
  r.permutation = get_i64(f, "position/permutation");
  r.epoch_loss_sum = get_f64_scalar(f, "stats/epoch_loss_sum");
  r.epoch_correct = get_i64_scalar(f, "stats/epoch_correct");
  r.epoch_seen = get_i64_scalar(f, "stats/epoch_seen");
  r.segment_loss_sum = get_f64_scalar(f, "stats/segment_loss_sum");
  r.segment_steps = get_i64_scalar(f, "stats/segment_steps");
  r.curve_step = get_i64(f, "curve/step");
  r.curve_loss = get_f64(f, "curve/loss");
  const std::vector<double> lr = get_f64(f, "history/lr"), tl = get_f64(f, "history/train_loss"),
                            te = get_f64(f, "history/train_error"),
                            sec = get_f64(f, "history/seconds"),
                            ips = get_f64(f, "history/images_per_s");
  const int64_t steps_per_epoch = train_images / global_batch(config);
  const bool lengths_ok = r.curve_loss.size() == r.curve_step.size() && tl.size() == lr.size() &&
                          te.size() == lr.size() && sec.size() == lr.size() &&
                          ips.size() == lr.size() && static_cast<int64_t>(lr.size()) == r.epoch;
  const bool perm_ok = static_cast<int64_t>(r.permutation.size()) == train_images &&
                       std::all_of(r.permutation.begin(), r.permutation.end(),
                                   [&](int64_t i) { return i >= 0 && i < train_images; });
  if (!lengths_ok || !perm_ok || r.epoch < 0 || r.epoch > config.epochs || r.step < 0 ||
      r.step >= steps_per_epoch || r.global_step != r.epoch * steps_per_epoch + r.step)
    throw IoError("cannot resume from " + path + ": its position (epoch " +
                  std::to_string(r.epoch) + ", step " + std::to_string(r.step) +
                  "), permutation or history is not consistent with this run");
  for (size_t i = 0; i < lr.size(); ++i) {
    EpochRecord e;
    e.epoch = static_cast<int>(i) + 1;
    e.lr = lr[i];
    e.train_loss = tl[i];
    e.train_error = te[i];
    e.seconds = sec[i];
    e.images_per_s = ips[i];
    r.history.push_back(e);
  }
  for (size_t i = 0; i < params.size(); ++i) {
    params[i]->value = std::move(values[i]);
    params[i]->momentum = std::move(momenta[i]);
  }
  for (size_t i = 0; i < bufs.size(); ++i) *bufs[i].values = std::move(buffers[i]);
  s = std::move(r);
  if (init_from && f.metadata.count(kInitFromKey)) *init_from = f.metadata.at(kInitFromKey);
}

// BN and frozen BN are one family: the same tensors under the same names.
std::string norm_family(const std::string& norm) { return norm == "frozen" ? "bn" : norm; }

// Device 0's buffers to the other replicas of this process, then every parameter value to every
// replica and process.
void share_with_replicas(std::vector<std::unique_ptr<Model>>& replicas) {
  for (size_t d = 1; d < replicas.size(); ++d) {
    const std::vector<Buffer> from = replicas[0]->buffers(), to = replicas[d]->buffers();
    for (size_t i = 0; i < from.size(); ++i) *to[i].values = *from[i].values;
  }
  broadcast_values(replicas);
}

// Each split's images of `classes` alone, in file order, then the first `limit` of them.
void keep_classes(Dataset& d, const std::vector<int>& classes, int64_t limit, const char* split) {
  std::vector<bool> wanted(256, false);
  for (int c : classes) {
    if (c < 0 || c > 255)
      throw Error("--classes " + join(classes) + ": each class must be a label in [0, 255]");
    wanted[static_cast<size_t>(c)] = true;
  }
  const int64_t image = d.image_size();
  int64_t kept = 0;
  for (int64_t i = 0; i < d.count && (limit < 0 || kept < limit); ++i) {
    if (!wanted[d.labels[static_cast<size_t>(i)]]) continue;
    std::copy_n(d.images.data() + i * image, image, d.images.data() + kept * image);
    d.labels[static_cast<size_t>(kept++)] = d.labels[static_cast<size_t>(i)];
  }
  if (kept == 0) throw Error("--classes " + join(classes) + ": no " + split + " image has one of these labels");
  d.count = kept;
  d.images.resize(static_cast<size_t>(kept * image));
  d.labels.resize(static_cast<size_t>(kept));
}

void standardize(std::vector<float>& v, float mean, float stddev) {
  const float inv = 1.0f / stddev;
  for (float& e : v) e = (e - mean) * inv;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// CPU time of the whole process (every thread), user + system.
double process_cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  auto sec = [](const timeval& t) { return static_cast<double>(t.tv_sec) + 1e-6 * t.tv_usec; };
  return sec(u.ru_utime) + sec(u.ru_stime);
}

// NORMKIT_TRAIN_PROFILE in the environment: "cpu" prints the measured steps' wall and CPU time
// to stderr when the loop ends; any other value but "0" also times the loop's phases and prints
// where the time went (nn/profile.h).
enum class ProfileLevel { off, cpu, phases };
ProfileLevel profile_requested() {
  const char* v = std::getenv("NORMKIT_TRAIN_PROFILE");
  if (v == nullptr || *v == '\0' || std::string(v) == "0") return ProfileLevel::off;
  return std::string(v) == "cpu" ? ProfileLevel::cpu : ProfileLevel::phases;
}

// The data a run with classes and eval_train_images needs: the images of those classes alone
// (load_data's), and at least eval_train_images training images.
void check_study_data(const TrainConfig& c, const Data& data, int64_t train_count,
                      int64_t test_count) {
  if (c.eval_train_images > train_count)
    throw Error("--eval-train-images " + std::to_string(c.eval_train_images) + ": the run has " +
                std::to_string(train_count) + " training images; choose at most that many");
  if (c.classes.empty()) return;
  std::vector<bool> wanted(256, false);
  for (int k : c.classes) wanted[static_cast<size_t>(k)] = true;
  for (const auto& [split, count] : {std::pair{&data.train, train_count}, {&data.test, test_count}})
    for (int64_t i = 0; i < count; ++i)
      if (!wanted[split->labels[static_cast<size_t>(i)]])
        throw Error("--classes " + join(c.classes) + ": the data holds an image of label " +
                    std::to_string(split->labels[static_cast<size_t>(i)]) +
                    "; load it with load_data(..., classes)");
}

}  // namespace

void validate(const TrainConfig& c) {
  auto bad = [](const std::string& option, const std::string& value, const std::string& why) {
    throw Error(option + " " + value + ": " + why);
  };
  if (c.batch < 1) bad("--batch", std::to_string(c.batch), "must be >= 1");
  if (c.devices < 1)
    bad("--devices", std::to_string(c.devices), "must be >= 1 (the logical devices of a step)");
  if (c.devices % dist::size() != 0)
    bad("--devices", std::to_string(c.devices),
        "is not a multiple of the " + std::to_string(dist::size()) +
            " processes this run was started as (mpirun -np " + std::to_string(dist::size()) +
            "); choose --devices a multiple of " + std::to_string(dist::size()) +
            ", or start as many processes as divide it");
  if (c.sync_bn && c.model.norm == NormKind::batch_renorm)
    bad("--sync-bn", "with --norm brn",
        "is not supported: Batch Renorm measures each device's batch against the running "
        "statistics; use --norm bn for SyncBN, or drop --sync-bn");
  if (c.sync_bn && c.model.norm != NormKind::batch)
    bad("--sync-bn", "with --norm " + std::string(to_string(c.model.norm)),
        "synchronizes BatchNorm only; use --norm bn, or drop --sync-bn");
  if (c.epochs < 1) bad("--epochs", std::to_string(c.epochs), "must be >= 1");
  if (!(c.lr_base > 0) || !std::isfinite(c.lr_base))
    bad("--lr-base", fmt(c.lr_base), "must be a positive number");
  if (c.threads < 1) bad("--threads", std::to_string(c.threads), "must be >= 1");
  if (c.limit_train == 0) bad("--limit-train", "0", "must be positive (or negative for all)");
  if (c.limit_test == 0) bad("--limit-test", "0", "must be positive (or negative for all)");
  if (c.eval_batch < 1) bad("--eval-batch", std::to_string(c.eval_batch), "must be >= 1");
  if (c.checkpoint_every < 0)
    bad("--checkpoint-every", std::to_string(c.checkpoint_every), "must be >= 0");
  if (c.checkpoint_every > 0 && c.checkpoint_path.empty())
    bad("--checkpoint-every", std::to_string(c.checkpoint_every), "needs --checkpoint FILE");
  if (c.stop_after_steps >= 0 && c.checkpoint_path.empty())
    bad("--stop-after-steps", std::to_string(c.stop_after_steps), "needs --checkpoint FILE");
  if (c.warmup_steps < 0) bad("--warmup-steps", std::to_string(c.warmup_steps), "must be >= 0");
  if (c.crop_pad < 0) bad("--crop-pad", std::to_string(c.crop_pad), "must be >= 0 (0: no crop)");
  if (!(c.lr_warmup >= 0 && c.lr_warmup < 1))
    bad("--warmup", fmt(c.lr_warmup), "must be a fraction of all steps in [0, 1) (0: no warm-up)");
  if (c.precise_bn_images < 0)
    bad("--precise-bn-images", std::to_string(c.precise_bn_images), "must be >= 0 (0: off)");
  if (c.precise_bn_images == 1)
    bad("--precise-bn-images", "1", "must be >= 2 (an unbiased variance needs two images) or 0 (off)");
  if (c.precise_bn_batch < 2)
    bad("--precise-bn-batch", std::to_string(c.precise_bn_batch),
        "must be >= 2 (an unbiased variance needs two images)");
  if (!(c.renorm_r_max >= 1) || !std::isfinite(c.renorm_r_max))
    bad("--renorm-r-max", fmt(c.renorm_r_max), "must be a number >= 1 (1: r = 1, no scale correction)");
  if (!(c.renorm_d_max >= 0) || !std::isfinite(c.renorm_d_max))
    bad("--renorm-d-max", fmt(c.renorm_d_max), "must be a number >= 0 (0: d = 0, no shift correction)");
  if (!(c.renorm_warmup >= 0 && c.renorm_warmup <= 1))
    bad("--renorm-warmup", fmt(c.renorm_warmup), "must be a fraction of all steps in [0, 1] (0: no warm-up)");
  if (c.model.norm != NormKind::batch_renorm) {
    const TrainConfig defaults;
    const std::string with = "with --norm " + std::string(to_string(c.model.norm));
    if (c.renorm_r_max != defaults.renorm_r_max)
      bad("--renorm-r-max " + fmt(c.renorm_r_max), with, "is for --norm brn only");
    if (c.renorm_d_max != defaults.renorm_d_max)
      bad("--renorm-d-max " + fmt(c.renorm_d_max), with, "is for --norm brn only");
    if (c.renorm_warmup != defaults.renorm_warmup)
      bad("--renorm-warmup " + fmt(c.renorm_warmup), with, "is for --norm brn only");
  }
  for (double f : c.lr_decay_at)
    if (!(f > 0 && f < 1)) bad("--lr-decay-at", fmt(f), "each fraction must be in (0, 1)");
  if (!(c.model.init_scale > 0) || !std::isfinite(c.model.init_scale))
    bad("--init-scale", fmt(c.model.init_scale), "must be a positive number");
  if (!(c.model.dropout >= 0 && c.model.dropout < 1))
    bad("--dropout", fmt(c.model.dropout), "must be in [0, 1)");
  if (!(c.weight_decay >= 0) || !std::isfinite(c.weight_decay))
    bad("--weight-decay", fmt(c.weight_decay), "must be zero or a positive number");
  if (c.eval_train_images < 0)
    bad("--eval-train-images", std::to_string(c.eval_train_images), "must be >= 0 (0: off)");
  for (size_t i = 0; i < c.classes.size(); ++i) {
    if (c.classes[i] < 0 || c.classes[i] > 255)
      bad("--classes", join(c.classes), "each class must be a label in [0, 255]");
    if (std::count(c.classes.begin(), c.classes.begin() + static_cast<std::ptrdiff_t>(i), c.classes[i]))
      bad("--classes", join(c.classes), "names class " + std::to_string(c.classes[i]) + " twice");
  }
  if (!c.init_from.empty() && !c.resume_path.empty())
    bad("--init-from", c.init_from,
        "starts a new run from another run's weights, --resume continues a run; give one of them "
        "(a fine-tuning run resumes with --resume alone)");
  if (c.model.norm == NormKind::frozen && c.init_from.empty() && c.resume_path.empty())
    bad("--norm", "frozen",
        "freezes a trained BatchNorm's statistics and affine; give --init-from a --norm bn "
        "checkpoint (or --resume a frozen run)");
  // Before check_config, which builds normkit's layers for every width.
  check_fits_in_memory(c, 0, 0, 0);
  check_config(c.model);
}

Data load_data(const std::string& dir, int64_t limit_train, int64_t limit_test,
               const std::vector<int>& classes) {
  Data d;
  // With classes, the limits count the kept images.
  d.train = load_mnist(dir, "train", classes.empty() ? limit_train : -1);
  d.test = load_mnist(dir, "t10k", classes.empty() ? limit_test : -1);
  if (!classes.empty()) {
    keep_classes(d.train, classes, limit_train, "training");
    keep_classes(d.test, classes, limit_test, "test");
  }
  if (d.train.rows != d.test.rows || d.train.cols != d.test.cols)
    throw IoError("the training and test images in " + dir + " differ in size");
  double s = 0, ss = 0;
  for (float v : d.train.images) s += v;
  const double mean = s / static_cast<double>(d.train.images.size());
  for (float v : d.train.images) ss += (v - mean) * (v - mean);
  d.mean = static_cast<float>(mean);
  d.stddev = static_cast<float>(std::sqrt(ss / static_cast<double>(d.train.images.size())));
  if (!(d.stddev > 0)) d.stddev = 1.0f;
  standardize(d.train.images, d.mean, d.stddev);
  standardize(d.test.images, d.mean, d.stddev);
  return d;
}

std::vector<int64_t> epoch_permutation(uint64_t seed, int epoch, int64_t count) {
  std::vector<int64_t> perm(static_cast<size_t>(count));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  Rng rng(splitmix64(seed ^ splitmix64(static_cast<uint64_t>(epoch) + 1)));
  rng.shuffle(perm);
  return perm;
}

uint64_t image_key(uint64_t seed, int epoch, int64_t position) {
  // Salted apart from epoch_permutation's stream.
  const uint64_t run = splitmix64(seed ^ 0x6A09E667F3BCC909ull);
  return splitmix64(splitmix64(run ^ static_cast<uint64_t>(epoch)) ^ static_cast<uint64_t>(position));
}

int64_t global_batch(const TrainConfig& c) { return int64_t{c.devices} * c.batch; }

std::pair<double, double> renorm_limits(const TrainConfig& c, int64_t step, int64_t total_steps) {
  const double warmup_steps = c.renorm_warmup * static_cast<double>(total_steps);
  if (!(static_cast<double>(step) < warmup_steps)) return {c.renorm_r_max, c.renorm_d_max};
  const double f = static_cast<double>(step) / warmup_steps;
  return {1.0 + (c.renorm_r_max - 1.0) * f, c.renorm_d_max * f};
}

double learning_rate(const TrainConfig& c, int64_t step, int64_t total_steps) {
  double lr = c.lr_base * static_cast<double>(global_batch(c)) / 32.0;
  const double warmup_steps = c.lr_warmup * static_cast<double>(total_steps);
  if (c.lr_warmup > 0 && global_batch(c) > 32 && static_cast<double>(step) < warmup_steps)
    lr = c.lr_base + (lr - c.lr_base) * (static_cast<double>(step) / warmup_steps);
  for (double f : c.lr_decay_at)
    if (static_cast<double>(step) >= f * static_cast<double>(total_steps)) lr *= 0.1;
  return lr;
}

void augment_image(const float* image, int64_t rows, int64_t cols, int64_t channels, int crop_pad,
                   bool hflip, float background, uint64_t seed, int epoch, int64_t position,
                   float* out) {
  const int64_t row_size = cols * channels;
  if (crop_pad == 0 && !hflip) {
    std::copy_n(image, rows * row_size, out);
    return;
  }
  // A stream of its own per image, apart from the permutation's (another constant mixed in).
  Rng rng(splitmix64(splitmix64(seed ^ 0x6A09E667F3BCC909ull) ^
                     splitmix64((static_cast<uint64_t>(epoch) << 40) ^ static_cast<uint64_t>(position))));
  const int64_t span = 2 * int64_t{crop_pad} + 1;
  // The window's top-left corner in the padded image, minus the padding: -P..P.
  const int64_t dy = crop_pad > 0 ? static_cast<int64_t>(rng.below(static_cast<uint64_t>(span))) - crop_pad : 0;
  const int64_t dx = crop_pad > 0 ? static_cast<int64_t>(rng.below(static_cast<uint64_t>(span))) - crop_pad : 0;
  const bool flip = hflip && rng.uniform() < 0.5;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sr = r + dy;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t sc = (flip ? cols - 1 - c : c) + dx;
      float* o = out + r * row_size + c * channels;
      if (sr < 0 || sr >= rows || sc < 0 || sc >= cols) {
        std::fill_n(o, channels, background);
      } else {
        std::copy_n(image + sr * row_size + sc * channels, channels, o);
      }
    }
  }
}

void precise_statistics(Model& model, const Dataset& data, int64_t count, int batch) {
  if (count < 2 || batch < 2)
    throw Error("precise_statistics: count " + std::to_string(count) + " and batch " +
                std::to_string(batch) + " must be >= 2 (an unbiased variance needs two images)");
  const int64_t n = std::min<int64_t>(batch, count);
  const int64_t batches = count / n;
  const int64_t image = data.image_size();
  model.set_sync({});
  model.set_cumulative_average(true);
  Tensor x;
  x.resize(n, data.rows, data.cols, data.channels);
  // Dropout comes after every norm layer, so its masks do not touch the statistics; any keys do.
  const std::vector<uint64_t> keys(static_cast<size_t>(n), 0);
  for (int64_t b = 0; b < batches; ++b) {
    std::copy_n(data.images.data() + b * n * image, n * image, x.data.data());
    model.set_dropout_keys(keys);
    model.forward(x, Mode::train);
  }
  model.set_cumulative_average(false);
}

Evaluation evaluate(Model& model, const Dataset& data, int64_t count, int batch, Mode mode) {
  Tensor x;
  SoftmaxCrossEntropy ce;
  double loss_sum = 0;
  int64_t correct = 0;
  const int64_t image = data.image_size();
  for (int64_t start = 0; start < count; start += batch) {
    const int64_t n = std::min<int64_t>(batch, count - start);
    x.resize(n, data.rows, data.cols, data.channels);
    std::copy_n(data.images.data() + start * image, n * image, x.data.data());
    loss_sum += ce.forward(model.forward(x, mode), data.labels.data() + start) * n;
    correct += ce.correct();
  }
  return {loss_sum / count, 100.0 * (1.0 - static_cast<double>(correct) / count)};
}

// A parameter's values come from the checkpoint's parameter or buffer of that name (frozen BN's
// weight and bias are buffers), a buffer's likewise.
void init_from_checkpoint(const std::string& path, const TrainConfig& config, Model& model) {
  const std::string where = "cannot start from --init-from " + path + ": ";
  SafetensorsFile f;
  try {
    f = load_safetensors(path);
  } catch (const IoError& e) {
    throw IoError("cannot start from --init-from: " + std::string(e.what()));
  }
  auto meta = [&](const std::string& key) {
    const auto it = f.metadata.find(key);
    const char* fallback = identity_default(key);
    if (it == f.metadata.end()) return std::string(fallback ? fallback : "(absent)");
    return it->second;
  };
  if (meta("format") != kCheckpointFormat)
    throw IoError(where + "it is not a checkpoint of this normkit-train (format '" + meta("format") +
                  "', expected '" + kCheckpointFormat + "')");
  if (!f.checksum_verified)
    throw IoError(where + "it carries no checksum, so damage cannot be ruled out");
  const std::string norm = to_string(config.model.norm);
  if (config.model.norm == NormKind::frozen && norm_family(meta("norm")) != "bn")
    throw IoError(where + "--norm frozen freezes a BatchNorm checkpoint's layers, and it has norm = " +
                  meta("norm") + "; start from a --norm bn checkpoint");
  for (const auto& [key, value] : run_identity(config, 0)) {
    if (key != "norm" && key != "groups" && key != "widths" && key != "blocks_per_stage") continue;
    const bool same = key == "norm" ? norm_family(meta(key)) == norm_family(value.first)
                                    : meta(key) == value.first;
    if (!same)
      throw IoError(where + "its model has " + key + " = " + meta(key) + ", this run has " + key +
                    " = " + value.first + " (" + value.second + "); the model shape and norm "
                    "family must match");
  }
  auto read = [&](const std::string& name, std::vector<float>& into) {
    const std::string as_param = "param/" + name, as_buffer = "buffer/" + name;
    get_f32_into(f, f.tensors.count(as_param) ? as_param : as_buffer, into);
  };
  // Read everything first, then assign.
  const std::vector<Param*> params = model.params();
  const std::vector<Buffer> bufs = model.buffers();
  std::vector<std::vector<float>> values(params.size()), buffers(bufs.size());
  for (size_t i = 0; i < params.size(); ++i) {
    values[i] = params[i]->value;
    if (params[i]->name.rfind("fc.", 0) != 0) read(params[i]->name, values[i]);
  }
  for (size_t i = 0; i < bufs.size(); ++i) {
    buffers[i].resize(bufs[i].values->size());
    read(bufs[i].name, buffers[i]);
  }
  for (size_t i = 0; i < params.size(); ++i) params[i]->value = std::move(values[i]);
  for (size_t i = 0; i < bufs.size(); ++i) *bufs[i].values = std::move(buffers[i]);
}

TrainOutcome train_run(const TrainConfig& config, const Data& data, ProgressBar* progress,
                       const std::string& label) {
  validate(config);
  set_threads(config.threads);
  const Dataset& train = data.train;
  const int64_t train_count =
      config.limit_train < 0 ? train.count : std::min(config.limit_train, train.count);
  const int64_t test_count =
      config.limit_test < 0 ? data.test.count : std::min(config.limit_test, data.test.count);
  check_fits_data(config, data);
  check_study_data(config, data, train_count, test_count);
  check_fits_in_memory(config, train.rows, train.cols, test_count);
  // This process's devices: the rank-th run of devices / processes consecutive ones.
  const bool lead = dist::rank() == 0;
  if (!lead) progress = nullptr;
  const int local_devices = config.devices / dist::size();
  DeviceGroup group(dist::rank() * local_devices, local_devices, config.devices);
  const int64_t batch = global_batch(config);
  const int64_t steps_per_epoch = train_count / batch;
  const int64_t total_steps = steps_per_epoch * config.epochs;

  TrainConfig cfg = config;
  cfg.model.in_channels = static_cast<int>(train.channels);
  cfg.model.classes = std::max(train.num_classes, data.test.num_classes);
  // One replica per device, all initialized alike; replicas[0] is the optimizer's and the
  // checkpoint's, and on process 0 it is device 0, whose running statistics are evaluated.
  std::vector<std::unique_ptr<Model>> replicas;
  for (int d = 0; d < local_devices; ++d) {
    replicas.push_back(std::make_unique<Model>(cfg.model));
    replicas.back()->init(config.seed);
    if (config.sync_bn)
      replicas.back()->set_sync({group.exchange(d), (group.first() + d) * int64_t{config.batch}, batch});
  }
  Model& model = *replicas[0];
  const std::vector<Param*> params = model.params();

  // A run killed while writing its checkpoint leaves a temporary beside it (the checkpoint
  // itself is intact: the temporary replaces it only once complete).
  if (lead && !config.checkpoint_path.empty()) remove_stale_temporaries(config.checkpoint_path);
  LoopState s;
  std::string init_from = config.init_from;  // of this run, or of the run it resumes
  if (!config.resume_path.empty()) {
    load_checkpoint(config.resume_path, cfg, train_count, model, s, &init_from);
    for (size_t d = 1; d < replicas.size(); ++d) {
      const std::vector<Buffer> from = model.buffers(), to = replicas[d]->buffers();
      for (size_t i = 0; i < from.size(); ++i) *to[i].values = *from[i].values;
    }
    broadcast_values(replicas);
  } else {
    if (!config.init_from.empty()) {
      init_from_checkpoint(config.init_from, cfg, model);
      share_with_replicas(replicas);
    }
    s.permutation = epoch_permutation(config.seed, 0, train_count);
  }
  cfg.init_from = init_from;  // carried into this run's checkpoints

  TrainOutcome out;
  RunResult& res = out.run;
  res.norm = to_string(cfg.model.norm);
  res.groups = uses_groups(cfg.model.norm) ? cfg.model.groups : 0;
  res.batch = config.batch;
  res.devices = config.devices;
  res.sync_bn = config.sync_bn;
  res.epochs = config.epochs;
  {
    // The scaled rate the run trains at, also with a warm-up that starts lower.
    TrainConfig peak = config;
    peak.lr_warmup = 0;
    res.lr = learning_rate(peak, 0, total_steps);
  }
  res.seed = config.seed;
  res.crop_pad = config.crop_pad;
  res.hflip = config.hflip;
  res.lr_warmup = config.lr_warmup;
  res.init_scale = config.model.init_scale;
  res.dropout = config.model.dropout;
  res.weight_decay = config.weight_decay;
  res.eval_train_images = config.eval_train_images;
  res.classes = config.classes;
  res.init_from = init_from;
  if (cfg.model.norm == NormKind::batch_renorm)
    res.renorm = {config.renorm_r_max, config.renorm_d_max, config.renorm_warmup};
  out.train_images = train_count;
  out.test_images = test_count;
  out.steps = total_steps;
  out.parameters = model.parameter_count();

  // The loss curve: point k (1-based) is the mean loss of the steps after point k - 1 up to step
  // k * total_steps / points, so every point averages an equal share of the run (shares differ
  // by at most one step; no short last segment).
  const int64_t curve_points =
      std::min<int64_t>(std::max(1, config.curve_points), std::max<int64_t>(1, total_steps));
  auto curve_end = [&](std::size_t k) { return int64_t(k) * total_steps / curve_points; };
  const int64_t image = train.image_size();
  // Each device's batch, labels, loss head and result.
  struct Device {
    Tensor x;
    std::vector<uint8_t> labels;
    std::vector<uint64_t> dropout_keys;
    SoftmaxCrossEntropy ce;
    double loss = 0;
  };
  std::vector<Device> devices(static_cast<size_t>(local_devices));
  for (Device& dv : devices) {
    dv.x.resize(config.batch, train.rows, train.cols, train.channels);
    dv.labels.resize(static_cast<size_t>(config.batch));
  }
  std::vector<float> gradient_send, gradient_receive;
  const bool augmented = config.crop_pad > 0 || config.hflip;
  // The standardized value of a zero pixel, computed as load_data standardizes.
  const float background = (0.0f - data.mean) * (1.0f / data.stddev);
  const SgdConfig sgd{.weight_decay = config.weight_decay};
  using clock = std::chrono::steady_clock;
  const auto t_start = clock::now();
  auto t_epoch = t_start, t_measure = t_start;
  int64_t steps_here = 0, epoch_steps_here = 0;
  bool stopped = false;
  const ProfileLevel profiling = lead ? profile_requested() : ProfileLevel::off;
  profile::set_enabled(profiling == ProfileLevel::phases && !config.sync_bn);
  profile::reset();
  double cpu_measure = process_cpu_seconds();
  double exchange_seconds = 0;  // the gradient and loss exchange between processes
  double sync_seconds_before = 0;  // SyncBN's exchanges before the measured steps
  uint64_t sync_doubles_before = 0;

  while (s.epoch < config.epochs) {
    dist::test_failure_point(s.global_step);
    if (s.step == 0) {
      s.epoch_loss_sum = 0;
      s.epoch_correct = s.epoch_seen = 0;
    }
    if (epoch_steps_here == 0) {
      t_epoch = clock::now();
      if (progress) progress->begin_epoch(s.epoch + 1, config.epochs, steps_per_epoch, label);
    }
    const double lr = learning_rate(config, s.global_step, total_steps);
    if (config.model.norm == NormKind::batch_renorm) {
      const auto [r_max, d_max] = renorm_limits(config, s.global_step, total_steps);
      for (auto& replica : replicas) replica->set_renorm_limits(r_max, d_max);
    }
    const int64_t* step_images = s.permutation.data() + s.step * batch;
    group.run(config.sync_bn, [&](int d) {
      Device& dv = devices[static_cast<size_t>(d)];
      {
        const profile::Scope timed(profile::Phase::batch);
        const int64_t* idx = step_images + (group.first() + d) * int64_t{config.batch};
        for (int i = 0; i < config.batch; ++i) {
          if (augmented) {
            const int64_t position = s.step * batch + (group.first() + d) * int64_t{config.batch} + i;
            augment_image(train.images.data() + idx[i] * image, train.rows, train.cols, train.channels,
                          config.crop_pad, config.hflip, background, config.seed, s.epoch, position,
                          dv.x.data.data() + i * image);
          } else {
            std::copy_n(train.images.data() + idx[i] * image, image, dv.x.data.data() + i * image);
          }
          dv.labels[i] = train.labels[idx[i]];
        }
      }
      Model& m = *replicas[static_cast<size_t>(d)];
      if (config.model.dropout > 0) {
        // Keyed by the image's position in the epoch's permutation, not by device or batch.
        const int64_t first = s.step * batch + (group.first() + d) * int64_t{config.batch};
        dv.dropout_keys.resize(static_cast<size_t>(config.batch));
        for (int i = 0; i < config.batch; ++i)
          dv.dropout_keys[static_cast<size_t>(i)] = image_key(config.seed, s.epoch, first + i);
        m.set_dropout_keys(dv.dropout_keys);
      }
      const Tensor& logits = m.forward(dv.x, Mode::train);
      {
        const profile::Scope timed(profile::Phase::head);
        dv.loss = dv.ce.forward(logits, dv.labels.data());
      }
      m.backward(dv.ce.gradient());
    });
    // The step's loss and correct count, summed over all devices in device order.
    double loss;
    int64_t correct = 0;
    {
      const auto t_exchange = clock::now();
      std::vector<double> mine;
      for (const Device& dv : devices) mine.insert(mine.end(), {dv.loss, static_cast<double>(dv.ce.correct())});
      const std::vector<double> all = dist::allgather_doubles(mine);
      loss = all[0];
      for (int d = 1; d < config.devices; ++d) loss += all[2 * static_cast<size_t>(d)];
      if (config.devices > 1) loss /= config.devices;
      for (int d = 0; d < config.devices; ++d)
        correct += static_cast<int64_t>(all[2 * static_cast<size_t>(d) + 1]);
      const profile::Scope timed(profile::Phase::optimizer);
      combine_gradients(replicas, config.devices, gradient_send, gradient_receive);
      exchange_seconds += seconds_since(t_exchange);
    }
    {
      const profile::Scope timed(profile::Phase::optimizer);
      sgd_step(params, lr, sgd);
      broadcast_values(replicas);
    }
    ++s.global_step;
    ++s.step;
    if (++steps_here == config.warmup_steps) {
      t_measure = clock::now();
      cpu_measure = process_cpu_seconds();
      exchange_seconds = 0;
      sync_seconds_before = group.exchange_seconds();
      sync_doubles_before = group.exchanged_doubles();
      profile::reset();
    }
    ++epoch_steps_here;
    s.epoch_loss_sum += loss * static_cast<double>(batch);
    s.epoch_correct += correct;
    s.epoch_seen += batch;
    s.segment_loss_sum += loss;
    ++s.segment_steps;
    if (s.global_step == curve_end(s.curve_step.size() + 1)) {
      s.curve_step.push_back(s.global_step);
      s.curve_loss.push_back(s.segment_loss_sum / s.segment_steps);
      s.segment_loss_sum = 0;
      s.segment_steps = 0;
    }
    if (progress) progress->add_step(batch, loss, correct);
    if (s.step == steps_per_epoch) {
      EpochRecord e;
      e.epoch = s.epoch + 1;
      e.lr = learning_rate(config, s.epoch * steps_per_epoch, total_steps);
      e.train_loss = s.epoch_loss_sum / s.epoch_seen;
      e.train_error = 100.0 * (1.0 - static_cast<double>(s.epoch_correct) / s.epoch_seen);
      e.seconds = seconds_since(t_epoch);
      e.images_per_s = epoch_steps_here * batch / std::max(e.seconds, 1e-9);
      s.history.push_back(e);
      if (progress) progress->end_epoch();
      epoch_steps_here = 0;
      s.step = 0;
      if (++s.epoch < config.epochs)
        s.permutation = epoch_permutation(config.seed, s.epoch, train_count);
    }
    const bool stop_now = config.stop_after_steps >= 0 &&
                          s.global_step >= config.stop_after_steps && s.epoch < config.epochs;
    const bool periodic =
        config.checkpoint_every > 0 && s.global_step % config.checkpoint_every == 0;
    if (lead && (epoch_steps_here == 0 || periodic || stop_now) && !config.checkpoint_path.empty())
      save_checkpoint(config.checkpoint_path, cfg, train_count, model, s);
    if (stop_now) {
      stopped = true;
      break;
    }
  }
  if (progress && epoch_steps_here > 0) progress->end_epoch();
  const double train_seconds = seconds_since(t_start);
  if (profiling != ProfileLevel::off) {
    profile::set_enabled(false);
    const int64_t images =
        (steps_here > config.warmup_steps ? steps_here - config.warmup_steps : steps_here) * batch;
    const double cpu = process_cpu_seconds() - cpu_measure;
    const double wall = steps_here > config.warmup_steps ? seconds_since(t_measure) : train_seconds;
    if (profiling == ProfileLevel::phases && !config.sync_bn)
      std::fprintf(stderr, "%s", profile::report(cpu, images).c_str());
    std::fprintf(stderr, "measured: %lld images, wall %.3f s, CPU %.3f s, %d thread(s): %.1f images/s, %.1f images per CPU-second\n",
                 static_cast<long long>(images), wall, cpu, config.threads,
                 images / std::max(wall, 1e-9), images / std::max(cpu, 1e-9));
    if (config.devices > 1 || dist::size() > 1) {
      const double steps = static_cast<double>(
          std::max<int64_t>(1, steps_here > config.warmup_steps ? steps_here - config.warmup_steps : steps_here));
      const double gradient_bytes = 4.0 * static_cast<double>(out.parameters) * config.devices;
      std::fprintf(stderr, "devices: %d on %d process(es); %.3f ms per step, of which %.3f ms (%.1f%%) combining losses and gradients (%.0f bytes of gradients gathered per process)",
                   config.devices, dist::size(), 1e3 * wall / steps, 1e3 * exchange_seconds / steps,
                   100.0 * exchange_seconds / std::max(wall, 1e-9), gradient_bytes);
      if (config.sync_bn) {
        const double sync = group.exchange_seconds() - sync_seconds_before;
        std::fprintf(stderr, " and %.3f ms (%.1f%%) in SyncBN exchanges (%.0f bytes of partials gathered per process)",
                     1e3 * sync / steps, 100.0 * sync / std::max(wall, 1e-9),
                     8.0 * static_cast<double>(group.exchanged_doubles() - sync_doubles_before) / steps);
      }
      std::fprintf(stderr, "\n");
    }
  }
  const int64_t measured = steps_here > config.warmup_steps ? steps_here - config.warmup_steps : steps_here;
  res.images_per_s = measured * batch /
                     std::max(steps_here > config.warmup_steps ? seconds_since(t_measure) : train_seconds, 1e-9);
  res.train_loss = s.history.empty() ? kNoValue : s.history.back().train_loss;
  res.history = s.history;
  res.loss_curve_step = s.curve_step;
  res.loss_curve_loss = s.curve_loss;
  out.finished = !stopped;
  // Every process holds the same model: the parameters are the same by construction, the
  // running statistics are device 0's.
  if (dist::size() > 1)
    for (const Buffer& b : model.buffers())
      dist::broadcast(b.values->data(), b.values->size() * sizeof(float), 0);
  if (!stopped && lead) {
    const auto t_eval = clock::now();
    const Evaluation e = evaluate(model, data.test, test_count, config.eval_batch, Mode::eval);
    res.test_loss = e.loss;
    res.test_error = e.error;
    if (has_batch_statistics(cfg.model.norm) && config.eval_batch_stats)
      res.test_error_batch_stats =
          evaluate(model, data.test, test_count, config.sync_bn ? static_cast<int>(batch) : config.batch,
                   Mode::eval_batch_stats).error;
    if (has_batch_statistics(cfg.model.norm) && std::min(config.precise_bn_images, train_count) >= 2) {
      // On copies of device 0's running statistics, given back afterwards: the checkpoint's and
      // the model's stay the trained ones.
      const std::vector<Buffer> bufs = model.buffers();
      std::vector<std::vector<float>> kept;
      for (const Buffer& b : bufs) kept.push_back(*b.values);
      precise_statistics(model, train, std::min(config.precise_bn_images, train_count),
                         config.precise_bn_batch);
      res.test_error_precise =
          evaluate(model, data.test, test_count, config.eval_batch, Mode::eval).error;
      for (size_t i = 0; i < bufs.size(); ++i) *bufs[i].values = kept[i];
      if (config.sync_bn)
        model.set_sync({group.exchange(0), group.first() * int64_t{config.batch}, batch});
    }
    if (config.eval_train_images > 0) {
      // The train/test gap: training images through the evaluation's model and mode.
      const Evaluation t =
          evaluate(model, train, config.eval_train_images, config.eval_batch, Mode::eval);
      res.train_loss_eval = t.loss;
      res.train_error_eval = t.error;
    }
    out.eval_seconds = seconds_since(t_eval);
    if (!res.history.empty()) {
      res.history.back().test_loss = res.test_loss;
      res.history.back().test_error = res.test_error;
      if (res.test_error_batch_stats) res.history.back().test_error_batch_stats = *res.test_error_batch_stats;
    }
  }
  res.seconds = seconds_since(t_start);
  return out;
}

}  // namespace normkit::train
