#pragma once
// The residual CNN: stem conv 3x3 + norm + ReLU, stages of basic blocks (the first block of every
// stage after the first has stride 2), global average pooling, dropout in training (when
// dropout > 0), a linear classifier.
// Default (widths 16, 32, 64, one block per stage): about 0.08 M parameters.
#include <memory>
#include <string>
#include <vector>

#include "nn/block.h"
#include "nn/layers.h"

namespace normkit::train {

struct ModelConfig {
  NormKind norm = NormKind::batch;
  int groups = 8;                    // the group count of gn, gn+ws and evonorm
  std::vector<int> widths{16, 32, 64};
  int blocks_per_stage = 1;
  int in_channels = 1;
  int classes = 10;
  bool relu = true;  // false: identity activations, a smooth network for gradient checks
  double init_scale = 1;  // every convolution's and the linear layer's initial weight times this
  double dropout = 0;     // dropout probability on the pooled features in training; 0: none
};

// Throws normkit::Error on what Model's constructor rejects (its own options, and a norm that
// normkit's layers reject for some width), without building the model.
void check_config(const ModelConfig& config);

// The memory a training run of this model holds at its peak, estimated from the configuration
// alone (nothing is allocated), in bytes as doubles: a configuration too large for any machine
// gives a large number, never an overflow.
//   parameters:  each parameter's value, gradient and momentum; each convolution's transposed
//                weight and its per-batch-slot weight-gradient copies; normkit's layer copies
//   activations: what each layer keeps between forward and backward, for `batch` images (the
//                forward buffers grow to max(batch, eval_batch), the evaluation's batch)
//   workspace:   the convolutions' per-thread scratch
// rows = cols = 0 counts the parameters alone (what the options fix before the data is read).
struct MemoryEstimate {
  double parameters = 0, activations = 0, workspace = 0;
  double parameter_count = 0;  // the model's parameters (floats), for checkpoint sizes
  double total() const { return parameters + activations + workspace; }
};
MemoryEstimate estimate_memory(const ModelConfig& config, int64_t batch, int64_t eval_batch,
                               int64_t rows, int64_t cols, int threads);

class Model {
 public:
  // Throws normkit::Error on an empty width list, a width < 1, blocks_per_stage < 1, a group
  // count that does not divide a width (gn), init_scale not positive, or dropout outside [0, 1).
  explicit Model(const ModelConfig& config);

  // He init for convolutions, PyTorch's default for the linear layer (its weight and bias), each
  // weight then times init_scale (skipped at 1: the same bits as without it); norms start at
  // gamma 1, beta 0, except the last norm of each residual branch (gamma 0). Deterministic in seed.
  void init(uint64_t seed);

  // Reads images (N, H, W, in_channels), which must stay unchanged until backward. Returns the
  // logits (N, 1, 1, classes), owned here. With dropout > 0, a Mode::train forward uses the keys
  // of the last set_dropout_keys (one per image, Dropout in layers.h; throws normkit::Error when
  // their count is not N).
  const Tensor& forward(const Tensor& images, Mode mode);
  // The dropout masks' keys of the next training forward's images, in batch order.
  void set_dropout_keys(std::vector<uint64_t> keys) { dropout_keys_ = std::move(keys); }
  // Reads the gradient of the loss with respect to the logits. Overwrites every parameter's grad.
  void backward(const Tensor& dlogits);

  std::vector<Param*> params();
  std::vector<Buffer> buffers();
  // Synchronizes every BatchNorm of the model across logical devices (Norm::set_sync); a
  // default SyncBatchNorm returns them to the device's own statistics.
  void set_sync(const SyncBatchNorm& sync);
  // Every BatchNorm of the model (Norm::set_cumulative_average); nothing for the other norms.
  void set_cumulative_average(bool on);
  // Every norm of the model (Norm::set_renorm_limits: brn's clipping limits; nothing for the
  // other norms).
  void set_renorm_limits(double r_max, double d_max);
  int64_t parameter_count();
  std::vector<const Tensor*> relu_outputs() const;  // of the last forward, for inspection
  const ModelConfig& config() const { return config_; }

 private:
  ModelConfig config_;
  Conv2d stem_conv_;
  Norm stem_norm_;
  std::vector<std::unique_ptr<ResidualBlock>> blocks_;
  GlobalAvgPool pool_;
  std::unique_ptr<Dropout> dropout_;  // null when config.dropout is 0
  std::vector<uint64_t> dropout_keys_;
  bool dropped_out_ = false;  // the last forward went through dropout_
  Linear fc_;
};

}  // namespace normkit::train
