#pragma once
// The basic residual block (He et al. 2016):
//   out = relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))
// conv1 is 3x3 with the block's stride, conv2 3x3 stride 1; the shortcut is the identity, or a
// 1x1 convolution + norm when the stride or width changes. norm2's gamma starts at 0, so each
// block starts as (nearly) the identity (Goyal et al. 2017, as in the GroupNorm paper).
#include <memory>
#include <string>
#include <vector>

#include "nn/conv.h"
#include "nn/norm.h"

namespace normkit::train {

class ResidualBlock {
 public:
  // relu = false replaces both ReLUs by the identity (a smooth network for gradient checks).
  ResidualBlock(const std::string& name, int in_channels, int out_channels, int stride,
                NormKind kind, int groups, bool relu = true);
  void init(Rng& rng);
  // Reads x, which must stay unchanged until backward. Returns the block's output, owned here.
  const Tensor& forward(const Tensor& x, Mode mode);
  // Overwrites the gradients of every parameter of the block. Returns dx, owned here.
  const Tensor& backward(const Tensor& dy);

  std::vector<Param*> params();
  std::vector<Param*> conv_weights();  // conv1's, conv2's and the shortcut's, if any
  std::vector<Buffer> buffers();
  void set_sync(const SyncBatchNorm& sync);  // every norm of the block (Norm::set_sync)
  void set_cumulative_average(bool on);      // every norm of the block (Norm::set_cumulative_average)
  void set_renorm_limits(double r_max, double d_max);  // every norm (Norm::set_renorm_limits)
  // The outputs of the block's ReLUs in the last forward (tests check which side of each kink
  // a finite difference stays on).
  void relu_outputs(std::vector<const Tensor*>& out) const;

 private:
  Conv2d conv1_, conv2_;
  Norm norm1_, norm2_;
  std::unique_ptr<Conv2d> shortcut_conv_;
  std::unique_ptr<Norm> shortcut_norm_;
  const Tensor* x_ = nullptr;
};

}  // namespace normkit::train
