#pragma once
// What a run and a sweep leave behind: results.csv (one row per run), results.md (tables like
// the GroupNorm paper's: test error by normalization and batch size) and per-run metrics JSON
// (--metrics-out). scripts/plot_sweep.py draws the figures from these files.
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace normkit::train {

inline constexpr double kNoValue = std::numeric_limits<double>::quiet_NaN();

// One epoch of a run. Values not measured are NaN (written as empty CSV cells / JSON null).
struct EpochRecord {
  int epoch = 0;                               // 1-based
  double lr = kNoValue;                        // learning rate during the epoch
  double train_loss = kNoValue;                // mean over the epoch's training images
  double train_error = kNoValue;               // percent, over the epoch's training images
  double test_loss = kNoValue;                 // after the epoch
  double test_error = kNoValue;                // percent, BN with running statistics
  double test_error_batch_stats = kNoValue;    // percent, BN with batch statistics
  double seconds = kNoValue;                   // training time of the epoch
  double images_per_s = kNoValue;              // training throughput of the epoch
};

struct RunResult {
  std::string norm;         // "bn", "gn", "ln", "in", "none" or "frozen"
  int groups = 0;           // GN's number of groups; 0 for the other norms
  int batch = 0;            // images per step and device
  int devices = 1;          // logical devices per step (each `batch` images)
  bool sync_bn = false;     // BN statistics over all devices of a step
  int epochs = 0;
  double lr = kNoValue;     // initial learning rate used (lr_base * devices * batch / 32)
  uint64_t seed = 0;
  double train_loss = kNoValue;   // last epoch
  double test_loss = kNoValue;    // final model
  double test_error = kNoValue;   // percent, final model (BN with running statistics)
  // Percent, final model with BN normalizing by the test batch's own statistics (test batches of
  // the training batch size); absent for norms without running statistics.
  std::optional<double> test_error_batch_stats;
  // Percent, final model with BN's precise statistics (recomputed after training with the final
  // weights over training images); absent when not computed.
  std::optional<double> test_error_precise;
  int crop_pad = 0;         // training augmentation: random crop of the padded image; 0: off
  bool hflip = false;       // training augmentation: random left-right flip
  double lr_warmup = 0;     // fraction of all steps of linear lr warm-up; 0: off
  double images_per_s = kNoValue; // training throughput over the run
  double seconds = kNoValue;      // wall time of the run
  std::vector<EpochRecord> history;
  // Optional finer training-loss curve (e.g. running mean every k steps) for loss plots.
  std::vector<int64_t> loss_curve_step;
  std::vector<double> loss_curve_loss;
  // The studies' options (trainer.h; these defaults are the batch-size experiment's) and the
  // train/test gap: percent error and mean loss of the first eval_train_images training images
  // evaluated like the test images at the end (NaN when not measured).
  double init_scale = 1, dropout = 0, weight_decay = 1e-4;
  int64_t eval_train_images = 0;
  std::vector<int> classes;  // the labels trained and tested on; empty: all
  std::string init_from;     // the checkpoint the run started from; empty: none
  double train_error_eval = kNoValue, train_loss_eval = kNoValue;
  // brn's options (trainer.h's renorm_*); absent for the other norms.
  struct Renorm {
    double r_max = 3, d_max = 5, warmup = 0.25;
  };
  std::optional<Renorm> renorm;
};

// "BN", "BRN", "GN (G=8)", "LN", "IN", "none", "frozen BN"; another norm name is shown upper-case.
std::string norm_label(const std::string& norm, int groups);

// ---- results.csv ----------------------------------------------------------------------------
// Header: norm,groups,devices,batch,epochs,lr,seed,train_loss,test_loss,test_error,
//         test_error_batch_stats,test_error_precise,images_per_s,seconds,sync_bn (0 or 1),
//         train_error_eval,train_loss_eval
// and, only when some run's init_scale, dropout or weight_decay differs from its default (1, 0,
// 1e-4), the three columns init_scale,dropout,weight_decay at the end;
// then one row per run, in order; norm is "syncbn" for BN runs with sync_bn (read back as bn
// with sync_bn). An absent test_error_precise is an empty cell. Numbers have 6 significant
// digits (seed exactly); NaN and an
// absent test_error_batch_stats are empty cells; groups is empty when 0. Pure.
std::string results_csv(const std::vector<RunResult>& runs);
// Writes results_csv(runs) to `path` (replacing it whole). Throws IoError naming the path.
void write_results_csv(const std::string& path, const std::vector<RunResult>& runs);
// Reads a file written by write_results_csv (history and loss curves are not in it). Throws
// IoError naming the path and line for a missing file, a different header, a wrong cell count or
// a cell that is not a number. Files with the earlier headers (before test_error_precise, and
// before train_error_eval and train_loss_eval) are read too, by column name (the missing values
// are then absent or NaN; missing study options are their defaults).
std::vector<RunResult> read_results_csv(const std::string& path);

// ---- results.md -----------------------------------------------------------------------------
// Markdown with, for `runs`: (1) test error (%) with rows = norm (norm_label, in order of first
// appearance; with ", lr base L" added when the runs use more than one lr_base = lr * 32 / batch,
// and ", init scale S", ", dropout P", ", weight decay W" when they use more than one of those)
// and columns = batch sizes (largest first), (2) when any run has batch-statistics results, a
// table comparing BN's test error with running vs batch statistics, (3) the last epoch's
// training loss, where a non-finite loss shows as "diverged", (4) training images/s, (5) when any
// run has train_error_eval, the train/test gap: error on the training images evaluated like the
// test images beside the test error, all in the same layout. A cell with several runs (seeds)
// shows "mean ± sd (n=k)", sd the sample standard deviation, and the first table's caption says
// so; a missing cell shows "—". The runs with precise BN statistics add a "precise statistics"
// row to table (2). When some cell has several runs, (6) lists every run (label, batch, seed,
// errors, loss, images/s). `notes`, if not empty, is a paragraph under the title. Pure.
std::string results_markdown(const std::vector<RunResult>& runs, const std::string& notes = {});

// ---- summary.csv ----------------------------------------------------------------------------
// One row per cell (a row of the tables at one batch size: the runs that differ in seed alone),
// in table order: norm ("syncbn" for SyncBN),groups,devices,batch,lr,n (runs), then for each of
// test_error, test_error_batch_stats, test_error_precise: _mean,_std (sample, n - 1; empty
// below two values),_min,_max over the cell's finite values (empty when none); then, as in
// results.csv, init_scale,dropout,weight_decay when some run differs from their defaults (a cell
// holds the runs of one value of each). Pure.
std::string summary_csv(const std::vector<RunResult>& runs);
// Writes summary_csv(runs) to `path`. Throws IoError naming the path.
void write_summary_csv(const std::string& path, const std::vector<RunResult>& runs);

// Writes results_markdown(runs, notes) to `path`. Throws IoError naming the path.
void write_results_markdown(const std::string& path, const std::vector<RunResult>& runs,
                            const std::string& notes = {});

// ---- metrics JSON (--metrics-out) -----------------------------------------------------------
// One object: norm, groups, batch, epochs, lr, seed, train_loss, test_loss, test_error,
// test_error_batch_stats, [test_error_precise, when computed,] images_per_s, seconds (numbers;
// NaN and absent as null), then
// "history": {"epoch": [...], "lr": [...], "train_loss": [...], "train_error": [...],
// "test_loss": [...], "test_error": [...], "test_error_batch_stats": [...], "seconds": [...],
// "images_per_s": [...]} (one entry per epoch), "loss_curve": {"step": [...], "loss": [...]},
// and, unless the run had one device without sync_bn, "devices" and "sync_bn" (true/false); then
// each study option that differs from its default: "init_scale", "dropout", "weight_decay",
// "eval_train_images", "classes" (array), "init_from" (string); and, when measured,
// "train_error_eval" and "train_loss_eval"; "crop_pad", "hflip" and "lr_warmup" when not 0 /
// false; "renorm_r_max", "renorm_d_max" and "renorm_warmup" for brn runs. A default run's file
// is what it was before them.
// Pure; throws normkit::Error when loss_curve_step and loss_curve_loss differ in length.
std::string metrics_json(const RunResult& run);
// Writes metrics_json(run) to `path`. Throws IoError naming the path.
void write_metrics_json(const std::string& path, const RunResult& run);
// Reads a file written by write_metrics_json. Throws IoError naming the path when it is missing,
// not JSON, or lacks a field or has one of the wrong type.
RunResult read_metrics_json(const std::string& path);

}  // namespace normkit::train
