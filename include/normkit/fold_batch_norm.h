#pragma once
// BatchNorm folding: a convolution or linear layer followed by an inference BatchNorm is one
// convolution or linear layer. With scale[c] = bn_weight[c] / sqrt(running_var[c] + eps):
//   folded_weight[c, ...] = layer_weight[c, ...] * scale[c]
//   folded_bias[c]        = (layer_bias[c] - running_mean[c]) * scale[c] + bn_bias[c]
// (torch.nn.utils.fusion.fuse_conv_bn_weights). Each value is computed in double from the float32
// inputs and rounded to float32 once.
//
// The op touches each weight once (O(weights), done once per model, not per batch), so it has a
// single implementation, the double-precision reference (src/ref/fold_batch_norm.cpp): there is
// no separate fast path, no threading, and no Context.
#include <cstdint>
#include <span>

#include "normkit/error.h"

namespace normkit {

struct FoldBatchNormParams {
  double eps = 1e-5;  // the BatchNorm's eps
};

// layer_weight: the layer's weight, (out_channels, ...) stored densely with the output channel
// outermost (a conv's (C_out, C_in / groups, *kernel) or a linear layer's (C_out, C_in)): its
// length is out_channels * K, K values per output channel.
// Reads layer_weight, layer_bias (optional, length out_channels; absent = 0), running_mean and
// running_var (required, length out_channels), bn_weight (optional; absent = 1) and bn_bias
// (optional; absent = 0).
// Overwrites folded_weight (layer_weight's length, same layout) and folded_bias (required, length
// out_channels: the folded layer has a bias even when the original had none).
// In place: folded_weight may be layer_weight itself, and folded_bias may be one of the
// per-channel inputs itself (the same data and length); every value is read before the one
// output element that depends on it is written. Any other overlap between an output and an input,
// or between the two outputs, throws.
// Throws normkit::Error, before writing anything, on: out_channels < 0, a layer_weight length
// that is not a multiple of out_channels (or not 0 when out_channels is 0), a vector of length
// != out_channels, a missing running statistic or output, folded_weight's length != layer_weight's,
// eps negative or not finite, a running_var element negative or NaN, running_var[c] + eps == 0
// (the scale would be infinite), a forbidden overlap.
void fold_batch_norm(const FoldBatchNormParams& params, std::span<const float> layer_weight,
                     int64_t out_channels, std::span<const float> layer_bias,
                     std::span<const float> running_mean, std::span<const float> running_var,
                     std::span<const float> bn_weight, std::span<const float> bn_bias,
                     std::span<float> folded_weight, std::span<float> folded_bias);

}  // namespace normkit
