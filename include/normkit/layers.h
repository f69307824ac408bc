#pragma once
// Layer objects in the manner of torch.nn modules: each owns its parameters (weight = 1,
// bias = 0, length C, present when affine), their gradients, and for BatchNorm and InstanceNorm
// (with track_running_stats) the running statistics (running_mean = 0, running_var = 1,
// num_batches_tracked = 0). They are thin: every computation is one of the free functions,
// except NoNorm's bias add (the no-normalization baseline, which has no free function).
//
// Contract shared by all layers:
// - Mode: a layer starts in training mode (as torch's). train() / eval() switch it explicitly;
//   the mode is never guessed from the input. GroupNorm and LayerNorm compute the same in both.
// - forward(x, y) reads x and overwrites y (x's shape and format). It keeps a view of x and the
//   statistics it used, for backward: x must stay alive and unchanged, and y must not alias x,
//   until the matching backward (which also reads weight and, after an eval forward, the
//   running statistics: update them after backward). Running statistics are updated in place in
//   training mode.
// - backward(dy, dx) is the gradient of the most recent forward (in the mode that forward ran
//   in, whatever the mode is now). It reads dy (x's shape and format), overwrites dx and
//   OVERWRITES weight_grad and bias_grad (it does not add to them; nothing needs zeroing).
// - Every layer also has the fused epilogue of a ResNet block (epilogue.h): forward(x, epilogue,
//   y) and backward(dy, dx, dresidual), the same for all of them (NormLayer).
// - Public members are plain data: an optimizer updates weight and bias from weight_grad and
//   bias_grad directly; their lengths must not be changed. In `options`, eps, momentum and
//   eval_batch_stats may be changed between calls; affine and track_running_stats are read by
//   the constructor only.
// - Throws normkit::Error on bad arguments (x's channel count != the layer's, a bad shape, a
//   backward with no forward before it, ...) before changing anything the caller can see.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "normkit/context.h"
#include "normkit/epilogue.h"
#include "normkit/tensor.h"

namespace normkit {

// Layer options (outside the classes so that `= {}` default arguments work); defaults are torch's.
struct BatchNormOptions {
  double eps = 1e-5;
  std::optional<double> momentum = 0.1;  // in [0, 1]; nullopt: cumulative moving average
  bool affine = true;
  bool track_running_stats = true;
  // Eval mode normalizes with each batch's own statistics even when running statistics are
  // tracked (they are then neither used nor updated): evaluating a model trained with small
  // batches as it was trained. Not in torch, whose eval always uses tracked statistics.
  bool eval_batch_stats = false;
};

struct GroupNormOptions {  // also LayerNorm's
  double eps = 1e-5;
  bool affine = true;
};

struct FrozenBatchNormOptions {
  double eps = 1e-5;  // torchvision.ops.FrozenBatchNorm2d's default
  // Whether backward computes weight_grad and bias_grad (read by the constructor only). Off, as
  // torchvision's, whose weight and bias are buffers with no gradient; backward then does not
  // read x. On: fine-tuning the affine part while the statistics stay frozen.
  bool parameter_grads = false;
};

struct InstanceNormOptions {
  double eps = 1e-5;
  std::optional<double> momentum = 0.1;  // in [0, 1]; nullopt: cumulative moving average
  bool affine = false;
  bool track_running_stats = false;
};

// What every normalization layer offers; a model can hold any of them through this interface.
class NormLayer {
 public:
  virtual ~NormLayer() = default;

  // forward(x, {}, y): no residual, no activation.
  void forward(const TensorView& x, const TensorView& y) { forward(x, {}, y); }
  // backward(dy, dx, {}): the residual's gradient is not written.
  void backward(const TensorView& dy, const TensorView& dx) { backward(dy, dx, {}); }

  // The forward with the fused epilogue: y = act(norm(x) + residual?) in one pass (epilogue.h).
  // Reads x and epilogue.residual (absent, or x's shape, format and dtype); overwrites y. With
  // relu, y is also kept for the backward (its sign is the ReLU's mask); with silu, the residual
  // is (the backward recomputes z from x, the statistics, weight, bias and it). What is kept must
  // stay unchanged until the backward, like x. Throws as forward(x, y), and on a residual
  // unlike x.
  void forward(const TensorView& x, const ForwardEpilogue& epilogue, const TensorView& y);
  // The backward through the last forward's epilogue (whichever forward overload ran): with
  // g = dy * act'(z) (epilogue.h; silu reads the layer's current bias as the forward's, like its
  // weight), overwrites dx, weight_grad and bias_grad from g as
  // backward(dy, dx) does, and dresidual (optional: TensorView{} for none; else x's shape and
  // format) with g. Throws as backward(dy, dx) (a backward with no forward before it included),
  // and on a dresidual unlike the last forward's x.
  void backward(const TensorView& dy, const TensorView& dx, const TensorView& dresidual);

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool is_training() const { return training_; }

  int64_t num_channels() const { return num_channels_; }
  bool affine() const { return affine_; }

  // Length C when affine, empty otherwise.
  std::vector<float> weight, bias;
  std::vector<float> weight_grad, bias_grad;

  // Threads and backend used by forward and backward.
  Context context;

 protected:
  NormLayer(const char* name, int64_t num_channels, bool affine);
  // x has rank 2..5, C == num_channels() and a dtype the layer accepts; throws naming the
  // layer otherwise.
  void check_input(const char* method, const TensorView& x) const;
  // Whether x may also be bfloat16 or float16 (else float32 only).
  virtual bool accepts_16bit_activations() const { return false; }
  // A forward ran before, and dy and dx have the shape of its x.
  void check_backward(const TensorView& dy, const TensorView& dx) const;

  // The layer's own op calls, after NormLayer checked x (forward) or that a forward ran and dy
  // and dx are like its x (backward). forward_op keeps what its backward needs (statistics, the
  // mode used) only once the op succeeded; backward_op reads saved_x_.
  virtual void forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                          const TensorView& y) = 0;
  virtual void backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                           const TensorView& dx) = 0;

  const char* name_;
  int64_t num_channels_;
  bool affine_;
  bool training_ = true;
  TensorView saved_x_;  // the input of the last forward; rank 0 before the first

 private:
  Activation used_activation_ = Activation::none;
  TensorView saved_y_;         // the last forward's output when it applied a ReLU
  TensorView saved_residual_;  // the last forward's residual when it applied a SiLU
};

// torch.nn.BatchNorm{1,2,3}d. Training mode: normalizes with the batch statistics and, with
// track_running_stats, first increments num_batches_tracked and then updates the running
// statistics with factor momentum (or 1 / num_batches_tracked when momentum is nullopt: the
// cumulative average). An empty batch (N = 0) still increments num_batches_tracked and leaves
// the running statistics unchanged, as torch 1.13. Eval mode: normalizes with the running
// statistics when track_running_stats (and not options.eval_batch_stats), else with the batch
// statistics (updating nothing).
class BatchNorm : public NormLayer {
 public:
  using Options = BatchNormOptions;
  // Throws normkit::Error on num_features < 0, bad eps or momentum.
  explicit BatchNorm(int64_t num_features, Options options = {});

  // forward throws, among the rest, torch's "Expected more than 1 value per channel when
  // training" when batch statistics are used with N * spatial == 1.

  Options options;
  // Length C when track_running_stats, empty otherwise.
  std::vector<float> running_mean, running_var;
  int64_t num_batches_tracked = 0;

 private:
  void forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                  const TensorView& y) override;
  void backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                   const TensorView& dx) override;

  bool track_running_stats_;
  bool used_batch_stats_ = true;
  double used_eps_ = 1e-5;
  std::vector<float> save_mean_, save_invstd_;
};

// torchvision.ops.FrozenBatchNorm2d (any rank 2..5): BatchNorm with fixed statistics, i.e. the
// per-channel affine map y = x * a[c] + b[c] with a = weight / sqrt(running_var + eps) and
// b = bias - running_mean * a, for detection and segmentation at one or two images per device,
// where batch statistics are meaningless. Train and eval compute the same, and nothing is ever
// updated. It is BatchNorm's inference op (batch_norm_forward_inference and
// batch_norm_backward_inference), every dtype, memory format and fused epilogue included.
// weight (1), bias (0), running_mean (0) and running_var (1) have length C and are plain data
// to load from a trained model. backward: dx = g * a[c], where g is dy through the epilogue; no
// gradient for the statistics. weight_grad and bias_grad have length C and are overwritten only
// with options.parameter_grads; otherwise they are empty (torchvision has no such gradients)
// and x is not read by backward.
class FrozenBatchNorm : public NormLayer {
 public:
  using Options = FrozenBatchNormOptions;
  // Throws normkit::Error on num_features < 0, bad eps.
  explicit FrozenBatchNorm(int64_t num_features, Options options = {});

  Options options;
  std::vector<float> running_mean, running_var;

 private:
  bool accepts_16bit_activations() const override { return true; }
  void forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                  const TensorView& y) override;
  void backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                   const TensorView& dx) override;

  double used_eps_ = 1e-5;
};

// torch.nn.GroupNorm(num_groups, num_channels): statistics per (sample, group), affine per
// channel. No running statistics; train and eval compute the same. When context.workspace is
// empty, the layer passes a workspace of its own (group_norm_workspace_size bytes, allocated on
// the first call and grown for a larger input), so later calls allocate nothing.
class GroupNorm : public NormLayer {
 public:
  using Options = GroupNormOptions;
  // Throws normkit::Error on num_groups <= 0, num_channels % num_groups != 0, bad eps.
  GroupNorm(int64_t num_groups, int64_t num_channels, Options options = {});

  int64_t num_groups() const { return num_groups_; }
  Options options;

 protected:
  GroupNorm(const char* name, int64_t num_groups, int64_t num_channels, Options options);

 private:
  void forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                  const TensorView& y) override;
  void backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                   const TensorView& dx) override;

  int64_t num_groups_;
  std::vector<float> mean_, rstd_;
  std::vector<std::byte> workspace_;
};

// The LayerNorm of the GroupNorm paper: each sample normalized over all its channels and
// positions (GroupNorm with one group), affine per channel (not per element, unlike
// torch.nn.LayerNorm; for that see layer_norm_forward).
class LayerNorm : public GroupNorm {
 public:
  explicit LayerNorm(int64_t num_channels, Options options = {})
      : GroupNorm("LayerNorm", 1, num_channels, options) {}
};

// torch.nn.InstanceNorm{1,2,3}d: each (sample, channel) normalized over its positions. Defaults
// are torch's (affine = false, track_running_stats = false). Training mode, or eval without
// track_running_stats: instance statistics; running statistics (when tracked, in training mode)
// updated with the batch average of the instance means and unbiased variances. Eval with
// track_running_stats: normalizes with the running statistics.
// Differences from torch 1.13: momentum = nullopt (cumulative average, factor
// 1 / num_batches_tracked) is accepted (torch rejects None for InstanceNorm), and
// num_batches_tracked counts training forwards with tracking (torch leaves it at 0).
// Workspace: as GroupNorm's, instance_norm_workspace_size bytes.
class InstanceNorm : public NormLayer {
 public:
  using Options = InstanceNormOptions;
  // Throws normkit::Error on num_features < 0, bad eps or momentum.
  explicit InstanceNorm(int64_t num_features, Options options = {});

  // forward throws "Expected more than 1 spatial element when training" when instance
  // statistics are used with a spatial size of 1.

  Options options;
  std::vector<float> running_mean, running_var;  // length C when tracked, else empty
  int64_t num_batches_tracked = 0;

 private:
  void forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                  const TensorView& y) override;
  void backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                   const TensorView& dx) override;

  bool track_running_stats_;
  bool used_input_stats_ = true;
  std::vector<float> mean_, rstd_;
  std::vector<std::byte> workspace_;
};

// No normalization: y = x + bias per channel, with the same fused epilogue as the layers above
// (a baseline to compare them with, in the same interface). bias has length C and starts at 0;
// there is no weight (affine() is false; weight and weight_grad are empty). Train and eval
// compute the same. backward: dx = g, bias_grad[c] = the sum of g over the batch and the
// positions, in double, in an order fixed by the shape alone (the same bits for any thread
// count). Activations are float32.
class NoNorm : public NormLayer {
 public:
  // Throws normkit::Error on num_channels < 0.
  explicit NoNorm(int64_t num_channels);

 private:
  void forward_op(const TensorView& x, const ForwardEpilogue& epilogue,
                  const TensorView& y) override;
  void backward_op(const BackwardEpilogue& epilogue, const TensorView& dy,
                   const TensorView& dx) override;

  std::vector<double> partial_;  // per-chunk sums of the bias gradient
};

}  // namespace normkit
