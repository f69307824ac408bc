// normkit-train: trains a small residual CNN on Fashion-MNIST (or any MNIST-format folder) with
// normkit's normalization layers, one run or a sweep over norms and batch sizes.
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "dist.h"
#include "io/io_error.h"
#include "io/progress.h"
#include "io/results.h"
#include "io/text_file.h"
#include "nn/parallel.h"
#include "normkit/error.h"
#include "preflight.h"
#include "sweep.h"
#include "trainer.h"

namespace nt = normkit::train;

namespace {

// Checks with short messages (CLI11's own range checks print the whole double range).
const CLI::Validator kPositive(
    [](std::string& v) {
      try {
        size_t used = 0;
        const double d = std::stod(v, &used);
        if (used == v.size() && d > 0) return std::string();
      } catch (const std::exception&) {
      }
      return "must be a positive number, got '" + v + "'";
    },
    "> 0");
const CLI::Validator kNonNegative(
    [](std::string& v) {
      try {
        size_t used = 0;
        const double d = std::stod(v, &used);
        if (used == v.size() && d >= 0) return std::string();
      } catch (const std::exception&) {
      }
      return "must be zero or positive, got '" + v + "'";
    },
    ">= 0");

// Options shared by run and sweep. `run` takes one value of groups and lr_base; a sweep trains
// every value given (a grid with norms and batch sizes).
struct Common {
  std::vector<int> groups{8};
  int epochs = 3;
  std::vector<double> lr_base{0.1};
  uint64_t seed = 1;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int64_t limit_train = -1, limit_test = -1;
  std::string data = nt::kDefaultMnistDir;
  std::vector<int> widths{16, 32, 64};
  int blocks_per_stage = 1;
  std::vector<double> lr_decay_at{0.5, 0.75};
  int eval_batch = 100;
  bool quiet = false;
  int devices = 1;
  bool sync_bn = false;
  int crop_pad = 0;
  bool hflip = false;
  double lr_warmup = 0;
  int64_t precise_bn_images = 10000;
  int precise_bn_batch = 200;
  double renorm_r_max = 3, renorm_d_max = 5, renorm_warmup = 0.25;
};

void add_common(CLI::App* app, Common& c) {
  app->add_option("--groups", c.groups,
                  "GroupNorm groups (must divide every width); a sweep takes a list, e.g. 1,2,4,8,16")
      ->delimiter(',')->capture_default_str();  // checked by normkit's GroupNorm (nn/norm.cpp)
  app->add_option("--epochs", c.epochs, "epochs (the same for every batch size)")
      ->capture_default_str()->check(kPositive);
  app->add_option("--lr-base", c.lr_base,
                  "learning rate at batch 32; lr = base * batch / 32; a sweep takes a list")
      ->delimiter(',')->capture_default_str()->check(kPositive);
  app->add_option("--seed", c.seed, "seed of the initialization and the data order")->capture_default_str();
  app->add_option("--threads", c.threads, "threads per run (OpenBLAS runs single-threaded inside them)")
      ->capture_default_str()->check(kPositive);
  app->add_option("--limit-train", c.limit_train, "use the first K training images (default: all)")
      ->check(kPositive);
  app->add_option("--limit-test", c.limit_test, "use the first K test images (default: all)")
      ->check(kPositive);
  app->add_option("--data", c.data, "folder with the four MNIST-format IDX files (.gz or plain)")
      ->capture_default_str();
  app->add_option("--widths", c.widths, "channels of each stage, e.g. 16,32,64")
      ->delimiter(',')->capture_default_str()->check(kPositive);
  app->add_option("--blocks-per-stage", c.blocks_per_stage, "residual blocks per stage")
      ->capture_default_str()->check(kPositive);
  app->add_option("--lr-decay-at", c.lr_decay_at,
                  "fractions of all steps where the learning rate is divided by 10")
      ->delimiter(',')->capture_default_str();
  app->add_option("--eval-batch", c.eval_batch, "batch for evaluation with running statistics")
      ->capture_default_str()->check(kPositive);
  app->add_flag("--quiet", c.quiet, "no progress bar");
  app->add_option("--devices", c.devices,
                  "logical devices per step, each training on --batch images of its own (the "
                  "paper's GPUs); under mpirun -np P, P must divide it")
      ->capture_default_str();  // checked by the trainer, with the process count
  app->add_option("--crop-pad", c.crop_pad,
                  "augment training images: pad by P pixels per side with the background (a "
                  "standardized zero pixel) and take a random window of the image's size; 0: off")
      ->capture_default_str()->check(kNonNegative);
  app->add_flag("--hflip", c.hflip, "augment training images: flip left-right with probability 1/2");
  app->add_option("--warmup", c.lr_warmup,
                  "fraction of all steps over which the lr rises linearly from --lr-base to the "
                  "scaled lr (Goyal et al. 2017; nothing to do at a global batch <= 32); 0: off")
      ->capture_default_str()->check(kNonNegative);  // < 1 checked by the trainer
  app->add_option("--precise-bn-images", c.precise_bn_images,
                  "BN: after training, recompute the statistics with the final weights over the "
                  "first M training images and report test_error_precise; 0: off")
      ->capture_default_str()->check(kNonNegative);
  app->add_option("--precise-bn-batch", c.precise_bn_batch,
                  "BN: images per train-mode batch of the precise statistics")
      ->capture_default_str()->check(kPositive);  // >= 2 checked by the trainer
  // brn: checked by the trainer (>= 1, >= 0, [0, 1], and brn only), naming the value.
  app->add_option("--renorm-r-max", c.renorm_r_max,
                  "brn: r is clipped to [1/r_max, r_max] (the paper's 3); with bn's running-average "
                  "momentum 0.1, where the paper's r and d come from those running averages")
      ->capture_default_str();
  app->add_option("--renorm-d-max", c.renorm_d_max,
                  "brn: d is clipped to [-d_max, d_max] (the paper's 5)")->capture_default_str();
  app->add_option("--renorm-warmup", c.renorm_warmup,
                  "brn: fraction of all steps over which r_max grows linearly from 1 and d_max "
                  "from 0 to their values (Ioffe 2017 relaxes them gradually; a quarter of the run "
                  "lets the running averages settle, which momentum 0.1 does in a few tens of "
                  "steps, before they correct the batch); 0: the full limits from the first step")
      ->capture_default_str();
}

// run's options for the studies of the papers' other claims (trainer.h); each default is the
// batch-size experiment's run.
struct Study {
  double init_scale = 1, dropout = 0, weight_decay = 1e-4;
  int64_t eval_train_images = 0;
  std::vector<int> classes;
  std::string init_from;
};

void add_study_options(CLI::App* app, Study& s) {
  app->add_option("--init-scale", s.init_scale,
                  "every convolution's and the classifier's initial weight times S (the "
                  "init-sensitivity study)")
      ->capture_default_str()->check(kPositive);
  app->add_option("--dropout", s.dropout,
                  "dropout probability on the pooled features before the classifier, in training "
                  "only; in [0, 1)")
      ->capture_default_str();  // checked by the trainer
  app->add_option("--weight-decay", s.weight_decay, "SGD's weight decay, on every parameter")
      ->capture_default_str()->check(kNonNegative);
  app->add_option("--eval-train-images", s.eval_train_images,
                  "at the end, evaluate the first M training images like the test images "
                  "(train_error_eval, train_loss_eval); 0: off")
      ->capture_default_str()->check(kNonNegative);
  app->add_option("--classes", s.classes,
                  "train and test on images of these labels alone, e.g. 0,1,2,3,4 (default: all); "
                  "--limit-train/--limit-test count the kept images, in file order; the "
                  "classifier keeps an output per label")
      ->delimiter(',');  // checked by the trainer
  app->add_option("--init-from", s.init_from,
                  "start from another run's checkpoint: its weights and BN running statistics "
                  "(same --widths, --blocks-per-stage, norm family), a new classifier, a fresh "
                  "optimizer; with --norm frozen its BN layers are frozen. Not with --resume")
      ->check(CLI::ExistingFile);
}

// sweep's study options: the first three are grid axes (lists), the other two go to every run.
struct SweepStudy {
  std::vector<double> init_scale{1}, dropout{0}, weight_decay{1e-4};
  int64_t eval_train_images = 0;
  std::vector<int> classes;
};

void add_sweep_study_options(CLI::App* app, SweepStudy& s) {
  app->add_option("--init-scale", s.init_scale,
                  "every convolution's and the classifier's initial weight times S; a list, e.g. "
                  "0.1,1,10, trains each")
      ->delimiter(',')->capture_default_str()->check(kPositive);
  app->add_option("--dropout", s.dropout,
                  "dropout probability before the classifier, in [0, 1); a list trains each")
      ->delimiter(',')->capture_default_str();  // checked by the trainer
  app->add_option("--weight-decay", s.weight_decay, "SGD's weight decay; a list trains each")
      ->delimiter(',')->capture_default_str()->check(kNonNegative);
  app->add_option("--eval-train-images", s.eval_train_images,
                  "every run: at the end, evaluate the first M training images like the test "
                  "images (the train/test gap table); 0: off")
      ->capture_default_str()->check(kNonNegative);
  app->add_option("--classes", s.classes,
                  "every run: train and test on images of these labels alone, e.g. 0,1,2,3,4")
      ->delimiter(',');  // checked by the trainer
}

void apply_study(const Study& s, nt::TrainConfig& t) {
  t.model.init_scale = s.init_scale;
  t.model.dropout = s.dropout;
  t.weight_decay = s.weight_decay;
  t.eval_train_images = s.eval_train_images;
  t.classes = s.classes;
  t.init_from = s.init_from;
}

bool same_file(const std::string& a, const std::string& b) {
  if (a.empty() || b.empty()) return false;
  std::error_code ec;
  return std::filesystem::weakly_canonical(a, ec) == std::filesystem::weakly_canonical(b, ec);
}

std::string number(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%.17g", v);
  return b;
}

// For file names: %g.
std::string number_short(double v) {
  char b[64];
  std::snprintf(b, sizeof b, "%g", v);
  return b;
}

// The options of `c` as normkit-train arguments, for the runs a sweep starts (without --groups
// and --lr-base, which are the job's own).
std::vector<std::string> common_args(const Common& c, int threads) {
  std::string widths, decay;
  for (int w : c.widths) widths += (widths.empty() ? std::string() : std::string(",")) + std::to_string(w);
  for (double f : c.lr_decay_at) decay += (decay.empty() ? std::string() : std::string(",")) + number(f);
  std::vector<std::string> a{"--epochs", std::to_string(c.epochs), "--seed", std::to_string(c.seed),
                             "--threads", std::to_string(threads), "--data", c.data,
                             "--widths", widths, "--blocks-per-stage", std::to_string(c.blocks_per_stage),
                             "--eval-batch", std::to_string(c.eval_batch)};
  if (!c.lr_decay_at.empty()) a.insert(a.end(), {"--lr-decay-at", decay});
  if (c.limit_train > 0) a.insert(a.end(), {"--limit-train", std::to_string(c.limit_train)});
  if (c.limit_test > 0) a.insert(a.end(), {"--limit-test", std::to_string(c.limit_test)});
  a.insert(a.end(), {"--devices", std::to_string(c.devices)});
  if (c.crop_pad > 0) a.insert(a.end(), {"--crop-pad", std::to_string(c.crop_pad)});
  if (c.hflip) a.push_back("--hflip");
  if (c.lr_warmup > 0) a.insert(a.end(), {"--warmup", number(c.lr_warmup)});
  a.insert(a.end(), {"--precise-bn-images", std::to_string(c.precise_bn_images),
                     "--precise-bn-batch", std::to_string(c.precise_bn_batch)});
  return a;
}

nt::TrainConfig make_config(const Common& c, const std::string& norm, int batch, int groups,
                            double lr_base) {
  nt::TrainConfig t;
  t.model.norm = nt::parse_norm_kind(norm);
  t.model.groups = groups;
  t.model.widths = c.widths;
  t.model.blocks_per_stage = c.blocks_per_stage;
  t.batch = batch;
  t.devices = c.devices;
  t.sync_bn = c.sync_bn && t.model.norm == nt::NormKind::batch;
  t.epochs = c.epochs;
  t.lr_base = lr_base;
  t.lr_decay_at = c.lr_decay_at;
  t.seed = c.seed;
  t.threads = c.threads;
  t.limit_train = c.limit_train;
  t.limit_test = c.limit_test;
  t.eval_batch = c.eval_batch;
  t.data_dir = c.data;
  t.crop_pad = c.crop_pad;
  t.hflip = c.hflip;
  t.lr_warmup = c.lr_warmup;
  t.precise_bn_images = c.precise_bn_images;
  t.precise_bn_batch = c.precise_bn_batch;
  // The renorm options are brn's; the other norms keep the defaults (validate refuses others).
  if (t.model.norm == nt::NormKind::batch_renorm) {
    t.renorm_r_max = c.renorm_r_max;
    t.renorm_d_max = c.renorm_d_max;
    t.renorm_warmup = c.renorm_warmup;
  }
  return t;
}

std::string list_of(const std::vector<double>& values, const char* separator) {
  std::string out;
  for (double v : values) out += (out.empty() ? "" : separator) + number_short(v);
  return out;
}

// The paragraph under the title of results.md: what was trained, how long, on what.
std::string sweep_notes(const Common& c, const SweepStudy& study, const nt::Data& data, int jobs,
                        const std::vector<uint64_t>& seeds) {
  std::string widths, lrs, seed_list;
  for (uint64_t s : seeds) seed_list += (seed_list.empty() ? "" : ", ") + std::to_string(s);
  for (int w : c.widths) {
    if (!widths.empty()) widths += '-';
    widths += std::to_string(w);
  }
  for (double l : c.lr_base) {
    char b[32];
    std::snprintf(b, sizeof b, "%g", l);
    lrs += (lrs.empty() ? "" : " or ") + std::string(b);
  }
  // The batch sizes of the tables are per device; with several devices a step is devices x batch.
  std::string devices;
  if (c.devices > 1)
    devices = std::to_string(c.devices) + " devices per step, each of the batch size in images "
              "(BN statistics per device" + std::string(c.sync_bn ? "; the SyncBN rows over all devices" : "") +
              "); ";
  char text[1536];
  std::snprintf(text, sizeof text,
                "Residual CNN (stem %d, widths %s, %d block(s) per stage), %d epoch(s) over %lld "
                "Fashion-MNIST training images, tested on %lld; %sSGD momentum 0.9, weight decay "
                "%s, lr %s x %sbatch / 32, divided by 10 at the listed fractions of the steps; "
                "%s %s; %d thread(s) per run, %d run(s) at a time; %s.",
                c.widths[0], widths.c_str(), c.blocks_per_stage, c.epochs,
                static_cast<long long>(data.train.count), static_cast<long long>(data.test.count),
                devices.c_str(),
                study.weight_decay == std::vector<double>{1e-4} ? "1e-4" : list_of(study.weight_decay, " or ").c_str(),
                lrs.c_str(), c.devices > 1 ? "devices x " : "",
                seeds.size() > 1 ? "seeds" : "seed", seed_list.c_str(), c.threads, jobs,
                nt::blas_description().c_str());
  std::string out = text;
  if (c.crop_pad > 0 || c.hflip)
    out += " Training images augmented:" +
           (c.crop_pad > 0 ? " random crop with " + std::to_string(c.crop_pad) + " pixel(s) of padding" : std::string()) +
           (c.crop_pad > 0 && c.hflip ? "," : "") + (c.hflip ? " random horizontal flip" : "") + ".";
  if (c.lr_warmup > 0) out += " Linear lr warm-up over the first " + number_short(c.lr_warmup) + " of the steps.";
  const Common defaults;
  if (c.renorm_r_max != defaults.renorm_r_max || c.renorm_d_max != defaults.renorm_d_max ||
      c.renorm_warmup != defaults.renorm_warmup)
    out += " BRN with r_max " + number_short(c.renorm_r_max) + ", d_max " +
           number_short(c.renorm_d_max) + ", reached after " + number_short(c.renorm_warmup) +
           " of the steps.";
  if (c.precise_bn_images > 0)
    out += " BN's precise statistics over the first " + std::to_string(c.precise_bn_images) +
           " training images in batches of " + std::to_string(c.precise_bn_batch) + ".";
  if (study.init_scale != std::vector<double>{1})
    out += " Initial weights times " + list_of(study.init_scale, " or ") + ".";
  if (study.dropout != std::vector<double>{0})
    out += " Dropout " + list_of(study.dropout, " or ") + " before the classifier.";
  if (study.eval_train_images > 0)
    out += " The first " + std::to_string(study.eval_train_images) +
           " training images evaluated at the end like the test images.";
  if (!study.classes.empty()) {
    std::string labels;
    for (int k : study.classes) labels += (labels.empty() ? "" : ",") + std::to_string(k);
    out += " Classes " + labels + " only.";
  }
  return out;
}

// An entry of sweep's --norms: NAME or NAME@B1+B2+..., NAME one of bn, gn, ln, in, none, gn+ws,
// frn, evonorm, brn and
// syncbn (BatchNorm with statistics over all devices of a step), the batches restricting the
// arm to those of --batches (empty: all of them).
struct NormArm {
  std::string norm;
  bool sync_bn = false;
  std::vector<int> batches;
};

std::vector<NormArm> parse_norm_arms(const std::vector<std::string>& entries,
                                     const std::vector<int>& batches, int devices) {
  std::vector<NormArm> arms;
  for (const std::string& entry : entries) {
    auto bad = [&](const std::string& why) {
      throw normkit::Error("--norms entry '" + entry + "': " + why);
    };
    NormArm arm;
    const size_t at = entry.find('@');
    arm.norm = entry.substr(0, at);
    if (arm.norm == "syncbn") {
      arm.norm = "bn";
      arm.sync_bn = true;
      if (devices < 2)
        bad("SyncBN synchronizes BatchNorm across devices and needs --devices >= 2 (this sweep "
            "has --devices " + std::to_string(devices) + ")");
    } else if (arm.norm != "bn" && arm.norm != "gn" && arm.norm != "ln" && arm.norm != "in" &&
               arm.norm != "none" && arm.norm != "gn+ws" && arm.norm != "frn" &&
               arm.norm != "evonorm" && arm.norm != "brn") {
      bad("the norm must be bn, gn, ln, in, none, gn+ws, frn, evonorm, brn or syncbn");
    }
    if (at != std::string::npos) {
      const std::string list = entry.substr(at + 1);
      size_t start = 0;
      while (true) {
        const size_t plus = list.find('+', start);
        const std::string b = list.substr(start, plus == std::string::npos ? std::string::npos : plus - start);
        size_t used = 0;
        int value = 0;
        try {
          value = std::stoi(b, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (b.empty() || used != b.size() || value < 1)
          bad("'" + b + "' is not a batch size (write NAME@B or NAME@B1+B2, e.g. syncbn@2+8)");
        if (std::find(batches.begin(), batches.end(), value) == batches.end())
          bad("batch " + b + " is not one of --batches");
        arm.batches.push_back(value);
        if (plus == std::string::npos) break;
        start = plus + 1;
      }
    }
    arms.push_back(arm);
  }
  return arms;
}

nt::ProgressBar make_progress(bool quiet) {
  nt::ProgressOptions o;
  o.mode = quiet ? nt::ProgressMode::silent : nt::ProgressMode::automatic;
  return nt::ProgressBar(o);
}

std::string label_of(const nt::TrainConfig& c) {
  std::string label = c.sync_bn ? "syncbn" : nt::to_string(c.model.norm);
  if (nt::uses_groups(c.model.norm)) label += " G=" + std::to_string(c.model.groups);
  char lr[32];
  std::snprintf(lr, sizeof lr, " lr=%g", c.lr_base);
  return label + (c.devices > 1 ? " " + std::to_string(c.devices) + "x" : std::string(" ")) +
         "b=" + std::to_string(c.batch) + lr;
}

// The sweep's label of a run: label_of and, when the sweep has several of them, the study
// options' values and the seed.
std::vector<uint64_t> g_sweep_seeds;
SweepStudy g_sweep_study;
std::string sweep_label(const nt::TrainConfig& c) {
  std::string label = label_of(c);
  if (g_sweep_study.init_scale.size() > 1) label += " init=" + number_short(c.model.init_scale);
  if (g_sweep_study.dropout.size() > 1) label += " dropout=" + number_short(c.model.dropout);
  if (g_sweep_study.weight_decay.size() > 1) label += " wd=" + number_short(c.weight_decay);
  return label + (g_sweep_seeds.size() > 1 ? " seed=" + std::to_string(c.seed) : std::string());
}

// The training images a run processes (all its steps), the sweep's measure of its work.
double run_images(const nt::TrainConfig& c, const nt::Data& data) {
  const int64_t count = c.limit_train < 0 ? data.train.count : std::min(c.limit_train, data.train.count);
  const int64_t batch = nt::global_batch(c);
  return static_cast<double>(count / batch * batch) * c.epochs;
}

std::string summary(const nt::TrainOutcome& o) {
  const nt::RunResult& r = o.run;
  char line[512];
  const std::string devices =
      r.devices > 1 ? std::to_string(r.devices) + " devices x " : std::string();
  int n = std::snprintf(line, sizeof line, "%s %sbatch %d: train loss %.4f, test error %.2f%%",
                        r.sync_bn ? "SyncBN" : nt::norm_label(r.norm, r.groups).c_str(),
                        devices.c_str(), r.batch, r.train_loss, r.test_error);
  if (r.test_error_batch_stats)
    n += std::snprintf(line + n, sizeof line - n, " (batch statistics: %.2f%%)",
                       *r.test_error_batch_stats);
  if (r.test_error_precise)
    n += std::snprintf(line + n, sizeof line - n, " (precise statistics: %.2f%%)",
                       *r.test_error_precise);
  if (std::isfinite(r.train_error_eval))
    n += std::snprintf(line + n, sizeof line - n, "; %lld training images: error %.2f%%, loss %.4f",
                       static_cast<long long>(r.eval_train_images), r.train_error_eval,
                       r.train_loss_eval);
  std::snprintf(line + n, sizeof line - n, "; %.0f images/s, %.1f s", r.images_per_s, r.seconds);
  return line;
}

}  // namespace

// The error path: one process ends alone; one of several ends the whole job (MPI_Abort), so
// that no peer waits forever in an exchange for it, and says which process it was.
int fail(int code, const char* what) {
  if (nt::dist::size() > 1) {
    std::fprintf(stderr, "normkit-train: rank %d of %d: %s\n", nt::dist::rank(), nt::dist::size(), what);
    std::fflush(stderr);
    nt::dist::abort_job(code);
  }
  std::fprintf(stderr, "normkit-train: %s\n", what);
  return code;
}

int main(int argc, char** argv) {
  nt::ensure_fast_blas_kernels(argv);
  try {
    nt::dist::start(&argc, &argv);
  } catch (const normkit::Error& e) {
    return fail(2, e.what());
  }
  const bool lead = nt::dist::rank() == 0;
  CLI::App app{"normkit-train: the GroupNorm paper's batch-size experiment on Fashion-MNIST"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("normkit-train ") + NORMKIT_VERSION + "; " +
                                        nt::blas_description() +
                                        (nt::dist::built_with_mpi() ? "; MPI: several processes"
                                                                    : "; MPI: none, one process"));

  Common run_opts;
  std::string norm = "bn";
  int batch = 32;
  std::string metrics_out, checkpoint, resume;
  int64_t checkpoint_every = 0, stop_after = -1, warmup_steps = 0;
  CLI::App* run = app.add_subcommand("run", "train and evaluate one model");
  run->add_option("--norm", norm,
                  "bn, gn, ln, in, none, frozen: --init-from's BN layers as fixed affine maps "
                  "(FrozenBatchNorm), not trained; gn+ws: gn with Weight Standardization of every "
                  "conv; frn: Filter Response Normalization + TLU in place of norm + ReLU, FRN "
                  "without the TLU before each residual add and on the shortcut (the add's ReLU "
                  "stays); evonorm: EvoNorm-S0 with --groups in place of norm + ReLU, and "
                  "x / group_std * gamma + beta before each residual add and on the shortcut; "
                  "brn: Batch Renormalization, bn with r, d against the running statistics in "
                  "training (--renorm-*)")
      ->capture_default_str()
      ->check(CLI::IsMember(
          {"bn", "gn", "ln", "in", "none", "frozen", "gn+ws", "frn", "evonorm", "brn"}));
  run->add_option("--batch", batch, "images per batch")->capture_default_str()->check(kPositive);
  add_common(run, run_opts);
  run->add_option("--metrics-out", metrics_out, "write the run's metrics as JSON to FILE");
  run->add_option("--checkpoint", checkpoint, "save a checkpoint (safetensors) at every epoch end");
  run->add_option("--checkpoint-every", checkpoint_every, "also save every N steps")->check(kNonNegative);
  run->add_option("--stop-after-steps", stop_after, "stop after N steps in all (with a checkpoint)")
      ->check(kPositive);
  run->add_option("--resume", resume, "continue exactly from a checkpoint")->check(CLI::ExistingFile);
  run->add_option("--warmup-steps", warmup_steps, "leave the first N steps out of images/s")
      ->check(kNonNegative);
  run->add_flag("--sync-bn", run_opts.sync_bn,
                "BatchNorm statistics over all devices of a step (SyncBN) instead of per device");
  Study study;
  add_study_options(run, study);

  Common sweep_opts;
  std::vector<std::string> norms{"bn", "gn"};
  std::vector<int> batches{32, 16, 8, 4, 2};
  std::vector<uint64_t> seeds;
  std::string out_dir;
  CLI::App* sweep = app.add_subcommand(
      "sweep", "train every (norm, batch) pair; write the tables and every run's metrics");
  sweep->add_option("--norms", norms,
                    "norms to compare: bn, gn, ln, in, none, gn+ws, frn, evonorm, brn (as run's "
                    "--norm), and syncbn (BN with statistics over "
                    "all devices; --devices >= 2); NAME@B1+B2 trains that arm at those of --batches "
                    "only, e.g. bn,gn,syncbn@2+8")
      ->delimiter(',')->capture_default_str();  // checked by parse_norm_arms
  sweep->add_option("--batches", batches, "batch sizes")
      ->delimiter(',')->capture_default_str()->check(kPositive);
  add_common(sweep, sweep_opts);
  SweepStudy sweep_study;
  add_sweep_study_options(sweep, sweep_study);
  sweep->add_option("--seeds", seeds,
                    "seeds, e.g. 1,2,3: every grid point is trained once per seed; the tables show "
                    "mean ± sample std over seeds (--seed S means --seeds S)")
      ->delimiter(',');
  sweep->add_flag("--sync-bn", sweep_opts.sync_bn,
                  "also train every BN point with statistics over all devices (SyncBN rows)");
  sweep->add_option("--out", out_dir,
                    "output folder (results.csv, results.md, summary.csv, runs/; scripts/plot_sweep.py draws "
                    "the figures from it)")
      ->required();
  bool resume_sweep = false;
  sweep->add_flag("--resume", resume_sweep,
                  "keep the runs an earlier sweep into the same --out finished with the same "
                  "arguments (runs/NAME.json beside runs/NAME.args, written after it): they are "
                  "read, not trained again; the others are trained");
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  int jobs = cores;
  sweep->add_option("--jobs", jobs,
                    "runs trained at once, each a process of its own (default: one per core, with "
                    "--threads cores/jobs each)")
      ->capture_default_str()->check(kPositive);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every process parses the same arguments and fails alike; one prints.
    const int code = lead ? app.exit(e) : e.get_exit_code();
    nt::dist::finish();
    return code;
  }

  try {
    if (*sweep && nt::dist::size() > 1)
      throw normkit::Error("sweep was started as " + std::to_string(nt::dist::size()) +
                           " processes (mpirun); start it without mpirun: its runs are "
                           "processes of their own, and --devices trains several devices in each");
    if (*run) {
      for (const char* name : {"--groups", "--lr-base"}) {
        const size_t n = std::string(name) == "--groups" ? run_opts.groups.size() : run_opts.lr_base.size();
        if (n != 1)
          throw normkit::Error(std::string("run takes one ") + name + " value, got " + std::to_string(n) +
                               " (a list of values is for sweep)");
      }
      for (const char* name : {"--renorm-r-max", "--renorm-d-max", "--renorm-warmup"})
        if (run->count(name) && norm != "brn")
          throw normkit::Error(std::string(name) + " " + run->get_option(name)->as<std::string>() +
                               " with --norm " + norm + ": the renorm options are for --norm brn only");
      nt::TrainConfig cfg = make_config(run_opts, norm, batch, run_opts.groups[0], run_opts.lr_base[0]);
      cfg.sync_bn = run_opts.sync_bn;
      cfg.checkpoint_path = checkpoint;
      cfg.checkpoint_every = checkpoint_every;
      cfg.stop_after_steps = stop_after;
      cfg.resume_path = resume;
      cfg.warmup_steps = warmup_steps;
      apply_study(study, cfg);
      // Pre-flight: every option and output before the data is read; the batch against the data
      // and the memory estimate in train_run, before the model is built.
      nt::validate(cfg);
      nt::check_output_file("--metrics-out", metrics_out);
      nt::check_output_file("--checkpoint", checkpoint);
      if (same_file(metrics_out, checkpoint))
        throw normkit::Error("--metrics-out and --checkpoint name the same file " + checkpoint +
                             "; give them different names");
      if (same_file(metrics_out, study.init_from) || same_file(checkpoint, study.init_from))
        throw normkit::Error("--init-from " + study.init_from +
                             " would be overwritten by --metrics-out or --checkpoint; give them other names");
      if (same_file(metrics_out, resume))
        throw normkit::Error("--metrics-out " + metrics_out +
                             " would overwrite the --resume checkpoint; give it another name");
      const nt::Data data = nt::load_data(cfg.data_dir, cfg.limit_train, cfg.limit_test, cfg.classes);
      nt::ProgressBar bar = make_progress(run_opts.quiet || !lead);
      const nt::TrainOutcome o = nt::train_run(cfg, data, &bar, label_of(cfg));
      if (!lead) {
        // Process 0 alone reports and writes.
      } else if (!o.finished) {
        std::printf("stopped after %lld steps; checkpoint in %s\n",
                    static_cast<long long>(stop_after), checkpoint.c_str());
      } else {
        std::printf("%s\n", summary(o).c_str());
      }
      if (lead && !metrics_out.empty()) nt::write_metrics_json(metrics_out, o.run);
    } else if (*sweep) {
      // The grid: norm, then GN's group count, then base lr, then batch size, then seed.
      if (sweep->count("--seeds") && sweep->count("--seed"))
        throw normkit::Error("sweep takes --seeds or --seed, not both (--seed S means --seeds S)");
      if (seeds.empty()) seeds = {sweep_opts.seed};
      g_sweep_seeds = seeds;
      g_sweep_study = sweep_study;
      const std::vector<NormArm> arms = parse_norm_arms(norms, batches, sweep_opts.devices);
      const bool has_brn = std::any_of(arms.begin(), arms.end(), [](const NormArm& a) { return a.norm == "brn"; });
      for (const char* name : {"--renorm-r-max", "--renorm-d-max", "--renorm-warmup"})
        if (sweep->count(name) && !has_brn)
          throw normkit::Error(std::string(name) + " " + sweep->get_option(name)->as<std::string>() +
                               " without a brn arm in --norms: the renorm options are for brn only");
      std::vector<nt::TrainConfig> configs;
      auto same_run = [](const nt::TrainConfig& a, const nt::TrainConfig& b) {
        return a.model.norm == b.model.norm && a.sync_bn == b.sync_bn && a.model.groups == b.model.groups &&
               a.lr_base == b.lr_base && a.batch == b.batch && a.seed == b.seed &&
               a.model.init_scale == b.model.init_scale && a.model.dropout == b.model.dropout &&
               a.weight_decay == b.weight_decay;
      };
      // The study options' axes between the base lr and the batch size.
      struct StudyPoint {
        double init_scale, dropout, weight_decay;
      };
      std::vector<StudyPoint> study_points;
      for (double scale : sweep_study.init_scale)
        for (double dropout : sweep_study.dropout)
          for (double decay : sweep_study.weight_decay) study_points.push_back({scale, dropout, decay});
      for (const NormArm& arm : arms) {
        const std::string& n = arm.norm;
        const bool grouped = n == "gn" || n == "gn+ws" || n == "evonorm";
        const std::vector<int> group_values = grouped ? sweep_opts.groups : std::vector<int>{sweep_opts.groups[0]};
        for (int g : group_values)
          for (double lr : sweep_opts.lr_base)
            for (const StudyPoint& point : study_points)
              for (int b : batches) {
                if (!arm.batches.empty() && std::find(arm.batches.begin(), arm.batches.end(), b) == arm.batches.end())
                  continue;
                // BN's points once per device, and once synchronized with --sync-bn; a syncbn arm
                // synchronized only.
                for (bool sync : {false, true}) {
                  if (arm.sync_bn ? !sync : sync && !(sweep_opts.sync_bn && n == "bn")) continue;
                  for (uint64_t seed : seeds) {
                    nt::TrainConfig cfg = make_config(sweep_opts, n, b, g, lr);
                    cfg.sync_bn = sync;
                    cfg.seed = seed;
                    cfg.model.init_scale = point.init_scale;
                    cfg.model.dropout = point.dropout;
                    cfg.weight_decay = point.weight_decay;
                    cfg.eval_train_images = sweep_study.eval_train_images;
                    cfg.classes = sweep_study.classes;
                    // bn with --sync-bn beside a syncbn arm: each run once.
                    if (std::any_of(configs.begin(), configs.end(),
                                    [&](const nt::TrainConfig& o) { return same_run(o, cfg); }))
                      continue;
                    nt::validate(cfg);
                    configs.push_back(cfg);
                  }
                }
              }
      }
      const bool several_groups =
          sweep_opts.groups.size() > 1 && std::any_of(configs.begin(), configs.end(), [](const nt::TrainConfig& c) {
            return nt::uses_groups(c.model.norm);
          });
      if (!sweep->count("--threads")) sweep_opts.threads = std::max(1, cores / jobs);
      for (nt::TrainConfig& cfg : configs) cfg.threads = sweep_opts.threads;
      // Pre-flight: every run of the grid is checked before the first one starts.
      nt::check_output_folder("--out", out_dir);
      const nt::Data data =
          nt::load_data(sweep_opts.data, sweep_opts.limit_train, sweep_opts.limit_test, sweep_study.classes);
      {
        const int at_once = static_cast<int>(std::min<size_t>(static_cast<size_t>(jobs), configs.size()));
        // Runs in processes of their own each read the data again.
        const double data_bytes =
            at_once > 1 ? 4.0 * static_cast<double>(data.train.images.size() + data.test.images.size()) : 0.0;
        for (const nt::TrainConfig& cfg : configs) {
          nt::check_fits_data(cfg, data);
          nt::check_fits_in_memory(cfg, data.train.rows, data.train.cols, data.test.count, at_once,
                                   data_bytes);
        }
      }
      std::filesystem::create_directories(out_dir + "/runs");
      nt::check_output_file("--out", out_dir + "/runs/probe");
      const std::string notes = sweep_notes(sweep_opts, sweep_study, data, jobs, seeds);
      std::vector<std::optional<nt::RunResult>> slots(configs.size());
      auto record = [&](size_t i, const nt::RunResult& r) {
        slots[i] = r;
        std::vector<nt::RunResult> results;  // in sweep order, the finished ones
        for (const auto& s : slots)
          if (s) results.push_back(*s);
        // Written after every run, so an interrupted sweep keeps what it finished.
        nt::write_results_csv(out_dir + "/results.csv", results);
        nt::write_results_markdown(out_dir + "/results.md", results, notes);
        nt::write_summary_csv(out_dir + "/summary.csv", results);
      };
      // runs/<norm>[_g<G>][_lr<L>][_init<S>][_dropout<P>][_wd<W>]_b<batch>[_s<seed>]: the group
      // count, lr, study options and seed only when the sweep varies them.
      auto run_file = [&](const nt::TrainConfig& cfg, const char* ext) {
        std::string name = cfg.sync_bn ? "syncbn" : nt::to_string(cfg.model.norm);
        if (several_groups && nt::uses_groups(cfg.model.norm)) name += "_g" + std::to_string(cfg.model.groups);
        if (sweep_opts.lr_base.size() > 1) name += "_lr" + number_short(cfg.lr_base);
        if (sweep_study.init_scale.size() > 1) name += "_init" + number_short(cfg.model.init_scale);
        if (sweep_study.dropout.size() > 1) name += "_dropout" + number_short(cfg.model.dropout);
        if (sweep_study.weight_decay.size() > 1) name += "_wd" + number_short(cfg.weight_decay);
        name += "_b" + std::to_string(cfg.batch);
        if (seeds.size() > 1) name += "_s" + std::to_string(cfg.seed);
        return out_dir + "/runs/" + name + ext;
      };
      // A run's arguments as a `normkit-train run` command line, less --metrics-out: how the
      // run is started (jobs > 1), and what runs/NAME.args holds once it finished (--resume).
      const nt::TrainConfig defaults;
      auto run_args = [&](const nt::TrainConfig& cfg) {
        std::vector<std::string> a = {"run", "--norm", nt::to_string(cfg.model.norm), "--batch",
                                      std::to_string(cfg.batch), "--groups",
                                      std::to_string(cfg.model.groups), "--lr-base", number(cfg.lr_base)};
        if (cfg.sync_bn) a.push_back("--sync-bn");
        // brn's own options, where they are not the defaults (the other norms take none).
        if (cfg.renorm_r_max != defaults.renorm_r_max)
          a.insert(a.end(), {"--renorm-r-max", number(cfg.renorm_r_max)});
        if (cfg.renorm_d_max != defaults.renorm_d_max)
          a.insert(a.end(), {"--renorm-d-max", number(cfg.renorm_d_max)});
        if (cfg.renorm_warmup != defaults.renorm_warmup)
          a.insert(a.end(), {"--renorm-warmup", number(cfg.renorm_warmup)});
        Common own = sweep_opts;
        own.seed = cfg.seed;
        for (const std::string& o : common_args(own, sweep_opts.threads)) a.push_back(o);
        // The study options only where set, so other sweeps start their runs as before.
        if (cfg.model.init_scale != defaults.model.init_scale)
          a.insert(a.end(), {"--init-scale", number(cfg.model.init_scale)});
        if (cfg.model.dropout != defaults.model.dropout)
          a.insert(a.end(), {"--dropout", number(cfg.model.dropout)});
        if (cfg.weight_decay != defaults.weight_decay)
          a.insert(a.end(), {"--weight-decay", number(cfg.weight_decay)});
        if (cfg.eval_train_images > 0)
          a.insert(a.end(), {"--eval-train-images", std::to_string(cfg.eval_train_images)});
        if (!cfg.classes.empty()) {
          std::string labels;
          for (int k : cfg.classes) labels += (labels.empty() ? "" : ",") + std::to_string(k);
          a.insert(a.end(), {"--classes", labels});
        }
        return a;
      };
      auto args_text = [&](const nt::TrainConfig& cfg) {
        std::string text;
        for (const std::string& a : run_args(cfg)) text += a + "\n";
        return text;
      };
      // What --resume compares: the arguments less --threads, which changes no bit of a run
      // (so a sweep may be resumed with another --jobs).
      auto fingerprint = [](const std::string& text) {
        std::istringstream in(text);
        std::string line, kept;
        while (std::getline(in, line)) {
          if (line == "--threads") {
            std::getline(in, line);
            continue;
          }
          kept += line + "\n";
        }
        return kept;
      };
      // Plan: with --resume, read the runs an earlier sweep finished with these arguments; train
      // the others, the .args of each removed before the first starts, so that an .args always
      // names a finished run.
      std::vector<size_t> to_train;
      for (size_t i = 0; i < configs.size(); ++i) {
        const std::string args_path = run_file(configs[i], ".args");
        const std::string metrics_path = run_file(configs[i], ".json");
        if (resume_sweep && std::filesystem::exists(args_path) &&
            fingerprint(nt::read_text_file(args_path)) == fingerprint(args_text(configs[i]))) {
          try {
            nt::TrainOutcome o;
            o.run = nt::read_metrics_json(metrics_path);
            std::printf("%s (finished by an earlier sweep: %s)\n", summary(o).c_str(),
                        metrics_path.c_str());
            record(i, o.run);
            continue;
          } catch (const nt::IoError& e) {
            std::printf("%s marks a finished run, but its metrics cannot be read (%s): training it "
                        "again\n", args_path.c_str(), e.what());
          }
        }
        std::filesystem::remove(args_path);
        to_train.push_back(i);
      }
      std::fflush(stdout);
      auto finished = [&](size_t i, const nt::RunResult& r) {
        nt::write_text_file(run_file(configs[i], ".args"), args_text(configs[i]));
        record(i, r);
      };
      if (jobs == 1) {
        nt::ProgressBar bar = make_progress(sweep_opts.quiet);
        std::vector<double> images;
        for (size_t i : to_train) images.push_back(run_images(configs[i], data));
        const auto t0 = std::chrono::steady_clock::now();
        double images_done = 0;
        for (size_t k = 0; k < to_train.size(); ++k) {
          const size_t i = to_train[k];
          const nt::TrainOutcome o = nt::train_run(configs[i], data, &bar, sweep_label(configs[i]));
          bar.message(summary(o));
          images_done += images[k];
          if (!::isatty(STDERR_FILENO)) {
            const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            double total = 0;
            for (double v : images) total += v;
            std::fprintf(stderr, "%s\n", nt::sweep_finished_line(k + 1, to_train.size(), sweep_label(configs[i]),
                                                                 o.run.test_error, elapsed,
                                                                 nt::sweep_seconds_left(elapsed, images_done, total)).c_str());
          }
          nt::write_metrics_json(run_file(configs[i], ".json"), o.run);
          finished(i, o.run);
        }
      } else {
        std::vector<nt::SweepJob> list;
        for (size_t i : to_train) {
          const nt::TrainConfig& cfg = configs[i];
          nt::SweepJob job;
          job.label = sweep_label(cfg);
          job.metrics_path = run_file(cfg, ".json");
          job.log_path = run_file(cfg, ".log");
          job.args = run_args(cfg);
          job.args.insert(job.args.end(), {"--metrics-out", job.metrics_path});
          job.images = run_images(cfg, data);
          list.push_back(job);
        }
        nt::run_sweep_jobs(list, jobs, [&](size_t k, const nt::RunResult& r) {
          nt::TrainOutcome o;
          o.run = r;
          std::printf("%s\n", summary(o).c_str());
          std::fflush(stdout);
          finished(to_train[k], r);
        });
      }
      std::printf("wrote %s/results.csv, %s/results.md, %s/summary.csv and %s/runs/\n"
                  "figures: /usr/bin/python3 scripts/plot_sweep.py %s\n",
                  out_dir.c_str(), out_dir.c_str(), out_dir.c_str(), out_dir.c_str(), out_dir.c_str());
    }
  } catch (const normkit::Error& e) {
    return fail(2, e.what());
  } catch (const nt::IoError& e) {
    return fail(1, e.what());
  } catch (const std::filesystem::filesystem_error& e) {
    return fail(1, e.what());
  } catch (const std::bad_alloc&) {
    // The pre-flight estimate keeps runs inside the memory it saw; other processes may take it.
    return fail(1, "out of memory; lower --batch, --devices, --widths or --blocks-per-stage, "
                   "or free memory");
  } catch (const std::exception& e) {
    return fail(1, e.what());
  }
  nt::dist::finish();
  return 0;
}
