#pragma once
// One training run of normkit-train: data, the SGD loop with the GroupNorm paper's recipe,
// evaluation, checkpoints and metrics.
//
// Recipe: SGD momentum 0.9, weight decay 1e-4 on every parameter, lr = lr_base * B / 32 with B
// the global batch (devices * batch images per step), divided by 10 at each of lr_decay_at
// (fractions of all steps), the same epochs for every batch size; the last partial batch of an
// epoch is dropped (a BN statistic over one image is not the experiment). Images are
// standardized with the training split's mean and standard deviation. Each epoch visits the
// training images in a Fisher-Yates permutation drawn from mt19937_64(seed, epoch): the order is
// a function of (seed, epoch) alone.
//
// Logical devices (the GroupNorm paper's "batch size per GPU"): with devices = K, a step takes
// the next K * batch images of the permutation and device d the d-th contiguous `batch` of
// them. Each device is a replica of the model that runs forward and backward on its own images
// (convolutions and everything per sample on the device), so BatchNorm's statistics are the
// device's own (the paper's per-GPU BN), or, with sync_bn, the whole step's through the
// library's BatchNorm steps (normkit/batch_norm_steps.h). The loss is each device's mean over
// its images; the step's gradient is the devices' gradients summed in device order 0..K-1 and
// divided by K, i.e. the gradient of the mean loss over the K * batch images, and one SGD step
// follows. Hence the lr rule above: the linear scaling rule on the global batch, which is the
// paper's (lr 0.1 * N / 32 on 8 GPUs of N images is 0.1 * 8N / 256); with K = 1 it is the
// single-device rule unchanged.
// Evaluation uses device 0's running statistics (as data-parallel PyTorch does; with sync_bn
// they are the same on every device), and BN's evaluation with batch statistics uses batches
// of the images one normalization saw in training: `batch`, or devices * batch with sync_bn.
// devices = 1 runs exactly the single-device code path: the same bits as before devices existed.
//
// Processes (dist.h): under mpirun -np P (P dividing K) each process holds the K / P
// consecutive devices rank * K / P ..., reads only their images of every step, and the devices'
// gradients, losses and BN partials are exchanged so that every process computes the same sums
// in the same order: losses, errors, curves and checkpoints are bitwise the same for any P (and
// any thread count). Process 0 alone shows progress, evaluates and writes checkpoints.
//
// Augmentation (crop_pad, hflip; off by default): each training image of a step is, before the
// device sees it, zero-padded by crop_pad pixels per side and cropped back to its size at a
// random offset, then flipped left-right with probability 1/2 (augment_image). The draw is a
// function of (seed, epoch, the image's position in the epoch's permutation) alone, so the bits
// stay independent of devices, processes, threads and resuming. Test images are never augmented.
//
// Learning-rate warm-up (lr_warmup = F > 0): over the first F of all steps the rate rises
// linearly from lr_base to lr_base * B / 32 (Goyal et al. 2017, gradual warm-up); where B <= 32
// there is nothing to warm up. The decays of lr_decay_at apply on top, as without warm-up.
//
// Batch Renormalization (norm brn): each step's r_max and d_max are renorm_limits at the global
// step, set on every replica before its forward; evaluation is BN's.
//
// Precise BN statistics (precise_bn_images > 0, bn and brn runs; Wu & Johnson 2021): after training,
// every BN layer's statistics are recomputed with the final weights (precise_statistics) and
// the test set is evaluated with them (test_error_precise). The running statistics the run
// trained, which the checkpoint holds, are left as they were.
//
// Studies of the papers' other claims (each option's default is the run above, bit for bit):
// model.init_scale multiplies every initial convolution and classifier weight; model.dropout
// drops pooled features in training, the mask of an image a function of (seed, epoch, the
// image's position in the epoch's permutation) alone (image_key), so runs stay the same bits
// for any devices, processes, threads and resumption; weight_decay is SGD's on every parameter;
// eval_train_images evaluates the first M training images in eval mode at the end (the
// train/test gap: train_error_eval, train_loss_eval). Fine-tuning on a shifted task: `classes`
// keeps the images of those labels alone (load_data filters first, then takes the first
// limit_train / limit_test of what is left; the permutation is over those), the classifier keeps
// its outputs for every label; init_from starts from another run's checkpoint (any batch,
// devices, lr or classes, but the same widths, blocks and norm family) with its weights and
// running statistics, except the classifier, which starts from this run's own initialization
// (the new task's head), and a fresh optimizer; with norm frozen every BN layer of that
// checkpoint becomes a FrozenBatchNorm (nn/norm.h), nothing of it trained. init_from starts a
// run; resume_path continues one (a fine-tuning run resumes with resume_path alone).
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "io/idx.h"
#include "io/progress.h"
#include "io/results.h"
#include "nn/model.h"

namespace normkit::train {

struct TrainConfig {
  ModelConfig model;
  int batch = 32;                       // images per device and step
  int devices = 1;                      // logical devices per step (devices * batch images)
  bool sync_bn = false;                 // BN statistics over all devices of a step
  int epochs = 3;
  double lr_base = 0.1;                 // lr at batch 32
  std::vector<double> lr_decay_at{0.5, 0.75};
  uint64_t seed = 1;
  int threads = 2;
  int64_t limit_train = -1;             // first K training images (< 0: all)
  int64_t limit_test = -1;              // first K test images (< 0: all)
  int eval_batch = 100;                 // batch for evaluation with running statistics
  bool eval_batch_stats = true;         // BN: also evaluate with batches of `batch` images
  std::string data_dir = kDefaultMnistDir;
  std::string checkpoint_path;          // written at each epoch end (and every checkpoint_every)
  int64_t checkpoint_every = 0;         // steps between checkpoints; 0: epoch ends only
  std::string resume_path;              // continue from this checkpoint
  int64_t stop_after_steps = -1;        // stop (after checkpointing) at this global step
  int curve_points = 200;               // train-loss curve resolution over the whole run
  int64_t warmup_steps = 0;             // steps left out of the images/s measurement
  int crop_pad = 0;                     // random crop of the image padded by this much; 0: off
  bool hflip = false;                   // random left-right flip with probability 1/2
  double lr_warmup = 0;                 // fraction of all steps of linear lr warm-up; 0: off
  int64_t precise_bn_images = 10000;    // BN: first M training images for precise statistics
  int precise_bn_batch = 200;           // images per train-mode forward of precise statistics
  // The studies (see above); init_scale and dropout are model.init_scale and model.dropout.
  double weight_decay = 1e-4;           // SGD's, on every parameter
  int64_t eval_train_images = 0;        // at the end, evaluate the first M training images; 0: off
  std::vector<int> classes;             // train and test on these labels alone; empty: all
  std::string init_from;                // start from this checkpoint's weights, a new head
  // brn (Batch Renormalization) only; see renorm_limits.
  double renorm_r_max = 3;              // r's final clipping limit, >= 1
  double renorm_d_max = 5;              // d's final clipping limit, >= 0
  double renorm_warmup = 0.25;          // fraction of all steps over which the limits grow
};

// Throws normkit::Error naming the option on an invalid value or combination (brn's
// renorm_r_max < 1, renorm_d_max < 0, renorm_warmup outside [0, 1], or any of them off its
// default with a norm other than brn, sync_bn with brn; devices < 1, a
// device count the process count does not divide, sync_bn without BatchNorm, init_scale not
// positive, dropout outside [0, 1), weight_decay < 0, eval_train_images < 0, a class outside
// [0, 255] or given twice, init_from with resume_path, frozen without init_from or resume_path,
// crop_pad < 0, lr_warmup outside [0, 1), precise_bn_images < 0 or 1, precise_bn_batch < 2),
// a group count
// normkit's layers reject, or a model whose parameters and optimizer state alone exceed the
// available memory (preflight.h). Allocates nothing large.
void validate(const TrainConfig& config);

// What a run leaves: io's RunResult (the results.csv row and the metrics JSON: per-epoch
// history, the training-loss curve, BN's test error with running and with batch statistics)
// plus what the trainer knows about itself.
struct TrainOutcome {
  RunResult run;
  int64_t train_images = 0, test_images = 0, steps = 0, parameters = 0;
  double eval_seconds = 0;
  bool finished = true;  // false when stop_after_steps ended the run before its last step
};

// Training and test data, standardized. Loaded once and shared by the runs of a sweep.
struct Data {
  Dataset train, test;
  float mean = 0, stddev = 1;  // of the training split, before standardization
};

// Loads train and t10k from config.data_dir (IoError naming the file and the fix when missing).
// With `classes`, each split keeps the images of those labels alone, in file order, and then the
// first limit_train / limit_test of them; the standardization is that of the kept training
// images; num_classes stays the files' (the classifier's outputs). Throws normkit::Error naming
// --classes when a class has no training image.
Data load_data(const std::string& dir, int64_t limit_train, int64_t limit_test,
               const std::vector<int>& classes = {});

// Runs one training as configured (resuming when resume_path is set) and evaluates it.
// `data` must hold at least the configured limits. Reports each step to `progress` when given.
// Before it builds the model, throws normkit::Error on bad options, a batch larger than the
// training images, or a run whose estimated memory exceeds what is available (preflight.h), and
// IoError on an unreadable, damaged (checksum), unchecksummed or mismatched checkpoint (to
// resume from, or to start from with init_from: another model shape or norm family is refused,
// naming it). With classes, `data` must come from load_data with those classes (normkit::Error
// otherwise).
// Checkpoints carry a CRC-32 and replace the previous one atomically (io/safetensors.h).
TrainOutcome train_run(const TrainConfig& config, const Data& data, ProgressBar* progress = nullptr,
                       const std::string& label = {});

// init_from: overwrites every parameter and buffer of `model` (built from config.model) but the
// classifier's (fc.weight, fc.bias: the new task's head, left as they are) with the values in
// the normkit-train checkpoint at `path`; momentum is not read. Throws IoError naming the file
// when it is unreadable, damaged or not a checkpoint, and naming the option when its widths,
// blocks per stage, groups (gn) or norm family (bn and frozen are one) differ from config's,
// or, with norm frozen, when it is not a BatchNorm checkpoint; leaves `model` untouched then.
void init_from_checkpoint(const std::string& path, const TrainConfig& config, Model& model);

// The order in which epoch `epoch` visits `count` training images: a function of (seed, epoch)
// alone. Step s of the epoch takes entries [s * B, (s + 1) * B), B = global_batch(config), and
// device d the d-th `batch` of them.
std::vector<int64_t> epoch_permutation(uint64_t seed, int epoch, int64_t count);

// The key of the dropout mask of the image at `position` of epoch `epoch`'s permutation.
uint64_t image_key(uint64_t seed, int epoch, int64_t position);

// brn's clipping limits (r_max, d_max) at global step `step` of `total_steps` (Ioffe 2017
// relaxes them gradually from plain BatchNorm): with W = renorm_warmup * total_steps and
// step < W, r_max = 1 + (renorm_r_max - 1) * step / W and d_max = renorm_d_max * step / W; from
// step W on (and always when W = 0) renorm_r_max and renorm_d_max. A function of the global step
// alone, so a resumed run sees the same limits.
std::pair<double, double> renorm_limits(const TrainConfig& config, int64_t step,
                                        int64_t total_steps);

// Images per step over all devices: devices * batch.
int64_t global_batch(const TrainConfig& config);

// The learning rate at global step `step` of `total_steps`: lr_base * B / 32 (B the global
// batch), during the warm-up (step < lr_warmup * total_steps, B > 32) lr_base + (lr_base * B / 32
// - lr_base) * step / (lr_warmup * total_steps) instead, then divided by 10 for each fraction f
// of lr_decay_at with step >= f * total_steps.
double learning_rate(const TrainConfig& config, int64_t step, int64_t total_steps);

// Writes to `out` (rows * cols * channels floats, NHWC; may not alias `image`) training image
// `image` as augmented for position `position` of epoch `epoch`'s permutation: a copy when
// crop_pad = 0 and !hflip; else the image padded with `background` by crop_pad pixels on each
// side, the rows x cols window at offsets (dy, dx) in [0, 2 * crop_pad] drawn uniformly, then,
// with hflip, mirrored left-right with probability 1/2. The draws are a function of (seed, epoch,
// position) alone. The trainer pads with the standardized value of a zero pixel, the images'
// background, so the padding looks like the border the images already have.
void augment_image(const float* image, int64_t rows, int64_t cols, int64_t channels, int crop_pad,
                   bool hflip, float background, uint64_t seed, int epoch, int64_t position,
                   float* out);

// Precise BN statistics: overwrites every BN layer's running mean and variance with the
// equal-weight average, over the train-mode forwards of consecutive batches of `batch` of the
// first `count` images of `data` (count / batch full batches; one batch of `count` when count <
// batch), of each batch's mean and unbiased variance, the layer's inputs computed with the
// model's current weights. Reads nothing else of the running statistics; changes nothing but
// them (the layers' momentum is left as it was). Takes the model off SyncBN (set_sync) for the
// forwards: the caller restores it. Throws normkit::Error when count < 2 or batch < 2.
void precise_statistics(Model& model, const Dataset& data, int64_t count, int batch);

// Evaluates on `images` in batches of `batch` images in the given mode. Returns mean loss and
// error percent.
struct Evaluation {
  double loss = 0, error = 0;
};
Evaluation evaluate(Model& model, const Dataset& data, int64_t count, int batch, Mode mode);

}  // namespace normkit::train
