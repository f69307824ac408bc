#pragma once
// The normalization after each convolution, by kind, on NHWC activations: normkit's layer
// objects (normkit/layers.h), which own the statistics, the running statistics and the fused
// epilogue, behind the trainer's interface:
//   bn: normkit::BatchNorm (batch statistics in training; running statistics, or optionally the
//       batch's, at evaluation), momentum 0.1, eps 1e-5
//   brn: Batch Renormalization (Ioffe 2017): bn's layer, running statistics and evaluation, but
//       training forwards and backwards through normkit's batch_renorm_forward_training /
//       batch_renorm_backward_training, with bn's momentum 0.1 and eps 1e-5 and the clipping
//       limits of set_renorm_limits (r_max 3, d_max 5 until set)
//   gn: normkit::GroupNorm with `groups` groups; ln: normkit::LayerNorm (the paper's, over
//       C, H, W); in: normkit::InstanceNorm (instance statistics in every mode)
//   none: normkit::NoNorm, no normalization, a learned per-channel bias only
//   frozen: normkit::FrozenBatchNorm (eps 1e-5, BN's), a trained BN's running statistics and
//       gamma, beta as a fixed per-channel affine in every mode (as torchvision's
//       FrozenBatchNorm2d when detection fine-tunes at one or two images per device). Nothing
//       of it is trained: params() is empty, and gamma, beta and the statistics are buffers,
//       loaded from a BN checkpoint (trainer.h's init_from) and saved in the run's checkpoints.
//   gn+ws: gn's normkit::GroupNorm; the convolutions standardize their weights (conv.h)
//   frn: normkit's frn_forward/frn_backward (eps 1e-6, fixed), Filter Response Normalization;
//       with the TLU y = max(z, tau) (tau learned, "<layer>.tau") where the norm is followed by
//       a ReLU and no residual, else without it (tau = -inf, as the FRN paper's last norm of
//       a block before the add)
//   evonorm: normkit's evonorm_s0_forward/backward with `groups` groups, eps 1e-5, v learned
//       ("<layer>.v", starting at 1) where the norm is followed by a ReLU and no residual; else
//       the variant without the nonlinearity, x / group_std * gamma + beta, as the same op with
//       v = 0 (sigmoid(0) = 1/2) and weight 2 * gamma, exact
// For frn and evonorm with a residual, the nonlinearity-free variant comes first, then the sum
// and the block's ReLU: y = relu(norm(x) + residual).
// Each kind has a per-channel affine (weight = gamma, bias = beta); `none` has the bias only.
// The ResNet epilogue is part of the layer: y = relu?(norm(x) + residual?), and backward gives
// both dx and the residual's gradient g = relu ? dy * (y > 0) : dy.
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "nn/param.h"
#include "nn/tensor.h"
#include "normkit/layers.h"

namespace normkit::train {

enum class NormKind { batch, group, layer, instance, none, frozen, group_ws, frn, evonorm, batch_renorm };

// "bn", "gn", "ln", "in", "none", "frozen", "gn+ws", "frn", "evonorm", "brn" <-> NormKind. parse throws normkit::Error on anything else.
NormKind parse_norm_kind(const std::string& s);
const char* to_string(NormKind kind);
// Whether the kind cuts channels into --groups groups (gn, gn+ws, evonorm).
bool uses_groups(NormKind kind);
// Whether the convolutions before the norms standardize their weights (gn+ws).
bool standardizes_weights(NormKind kind);
// Whether the kind trains on batch statistics and keeps running statistics for evaluation
// (bn, brn): evaluation with batch statistics and precise statistics apply to it.
bool has_batch_statistics(NormKind kind);

enum class Mode {
  train,             // batch statistics; BN updates its running statistics
  eval,              // BN uses its running statistics; the others are as in training
  eval_batch_stats,  // BN normalizes with each evaluation batch's own statistics
};

// normkit's layer for `kind` on `channels` channels (null for frn and evonorm, which the Norm
// runs on normkit's functions; evonorm's group count is checked as gn's). Throws the layer's
// normkit::Error, prefixed with `name` and the --groups option when it rejects gn's group count.
std::unique_ptr<NormLayer> make_norm_layer(const std::string& name, NormKind kind, int channels,
                                           int groups);

// Synchronized BatchNorm across the logical devices of a step (trainer.h): the device's
// samples are [offset, offset + N) of a global batch of global_batch samples, and exchange
// hands this device's packed partials (normkit/batch_norm_steps.h) to the other devices and
// returns every device's, concatenated. It is called once per training forward and once per
// training backward of each BatchNorm, in the same order on every device.
class DeviceExchange {
 public:
  virtual ~DeviceExchange() = default;
  virtual std::span<const double> exchange(std::span<const double> mine) = 0;
};
struct SyncBatchNorm {
  DeviceExchange* exchange = nullptr;  // null: the device's own statistics
  int64_t offset = 0, global_batch = 0;
};

class Norm {
 public:
  // Throws as make_norm_layer. zero_gamma: weight starts at 0 (the last norm of a residual
  // branch), else 1. residual: forwards add a residual before the ReLU (frn and evonorm then
  // use their variant without the nonlinearity).
  Norm(const std::string& name, NormKind kind, int channels, int groups, bool zero_gamma,
       bool relu, bool residual = false);

  // Reads x (N, H, W, C) and residual (optional, shape of x), which must stay unchanged until
  // backward. Returns y = relu?(norm(x) + residual?), owned here.
  const Tensor& forward(const Tensor& x, Mode mode, const Tensor* residual = nullptr);
  // Reads dy; the last forward must have been Mode::train. Overwrites weight.grad and bias.grad.
  // Returns dx, owned here; when the forward had a residual, residual_grad() is then the
  // residual's gradient.
  const Tensor& backward(const Tensor& dy);
  const Tensor& residual_grad() const { return g_; }

  NormKind kind() const { return kind_; }
  int groups() const { return groups_; }
  // BN only (the other kinds never look across samples): training forwards and backwards use
  // the statistics of the global batch through sync.exchange; weight.grad and bias.grad are
  // then the global sums, the same on every device.
  void set_sync(const SyncBatchNorm& sync);
  // BN only (nothing for the other kinds): on restarts the running statistics as a cumulative
  // average, training forward k = 1, 2, ... weighing its batch's statistics 1 / k, so that after
  // k forwards they are the equal-weight average of the k batches' (precise statistics); off
  // gives the layer back its momentum and batch count.
  // While on, brn's training forwards are bn's (r = 1, d = 0): precise statistics are the
  // statistics of the network as BatchNorm normalizes it in training.
  void set_cumulative_average(bool on);
  // brn only (nothing for the other kinds): r is clipped to [1 / r_max, r_max] and d to
  // [-d_max, d_max] from the next training forward on. Throws normkit::Error on r_max < 1 or
  // d_max < 0 (or NaN), naming the value.
  void set_renorm_limits(double r_max, double d_max);

  std::vector<Param*> params();  // empty for frozen
  // BN's running_mean and running_var; frozen's weight, bias, running_mean and running_var;
  // nothing for the others.
  std::vector<Buffer> buffers();
  const Tensor& output() const { return y_; }  // the last forward's output (for inspection)

  // The optimizer's and the checkpoint's copy of the affine parameters; the layer reads them at
  // each forward and its gradients land in weight.grad and bias.grad.
  Param weight, bias;
  // frn's tau or evonorm's v where the kind's nonlinearity is used (in params() then); else
  // empty.
  Param extra;
  // BN's running statistics (the layer's own); empty for the other kinds.
  const std::vector<float>& running_mean() const;
  const std::vector<float>& running_var() const;

 private:
  NormKind kind_;
  int groups_;  // the group count of gn, ln (1) and in (C); 0 for the others
  bool relu_;
  bool fused_nonlinearity_ = false;  // frn's TLU or evonorm's sigmoid gate
  std::unique_ptr<NormLayer> layer_;
  BatchNorm* batch_norm_ = nullptr;  // layer_ as BN, for its running statistics and eval mode
  FrozenBatchNorm* frozen_ = nullptr;  // layer_ as frozen BN, for its statistics
  bool trained_forward_ = false;
  SyncBatchNorm sync_;
  bool synced_forward_ = false;  // the last forward went through sync_
  std::optional<double> kept_momentum_;  // while set_cumulative_average(true)
  int64_t kept_batches_tracked_ = 0;
  bool cumulative_ = false;
  std::vector<double> partials_, sum_g_, sum_g_xmu_;
  std::vector<float> save_mean_, save_invstd_;
  // brn: the clipping limits, and r and d of the last training forward (renorm_forward_ when
  // that forward went through batch_renorm_forward_training).
  double r_max_ = 3.0, d_max_ = 5.0;
  std::vector<float> save_r_, save_d_;
  bool renorm_forward_ = false;
  // frn and evonorm: the op's saved statistics, constant operands, and the pre-sum output and
  // its gradient when a residual is added after the op.
  std::vector<float> op_mean_, op_rstd_, op_tau_, op_v_, op_weight_, op_dweight_;
  Tensor z_, dz_;
  const Tensor& function_forward(const Tensor& x, const Tensor* residual);
  void renorm_training_forward(const Tensor& x, const Tensor* residual);
  BackwardEpilogue relu_residual_epilogue();
  const Tensor& function_backward(const Tensor& dy);
  const Tensor* x_ = nullptr;
  bool had_residual_ = false;
  Tensor y_, dx_, g_;
};

}  // namespace normkit::train
