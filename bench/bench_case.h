#pragma once
// A benchmark case: one op of one normalization on one shape, memory format and dtype, and the
// shape sets it is drawn from (real networks: ResNet-50, Stable Diffusion's UNet, a 3D UNet,
// transformers, a detector's heads).
#include <cstdint>
#include <string>
#include <vector>

#include "normkit/tensor.h"

namespace normkit::bench {

enum class Family {
  batch_norm,
  group_norm,
  layer_norm,
  instance_norm,
  rms_norm,
  layer_norm2d,   // over C of (N, C, *spatial), ConvNeXt's LayerNorm2d
  weight_std,     // a conv weight (C_out, C_in, *kernel) standardized per output channel
  frn,            // Filter Response Normalization with TLU
  evonorm_s0,     // EvoNorm-S0, with `groups` groups
  batch_renorm,   // Batch Renormalization (Ioffe 2017)
};

enum class Op {
  forward,            // training-mode forward (batch statistics); the only forward of GN, LN, IN
  forward_inference,  // batch norm with running statistics (also batch renorm's inference)
  backward,           // backward of the training forward
  forward_backward,   // training forward, then its backward
};

// What follows the normalization in the same pass: a ResNet block's end is
// y = relu(norm(x) + residual), whose backward also writes the residual's gradient; a diffusion
// UNet's or VAE's GroupNorm is followed by y = silu(norm(x)), whose backward recomputes
// norm(x) from x (no tensor more than the plain op's).
enum class Epilogue { none, add_relu, silu };

struct Case {
  std::string set;  // the shape set it belongs to, e.g. "resnet50-bn-n32"
  Family family = Family::group_norm;
  Op op = Op::forward;
  Epilogue epilogue = Epilogue::none;
  // (N, C, *spatial); for layer and RMS norm (rows, cols) with the last dim normalized.
  bool rows() const { return family == Family::layer_norm || family == Family::rms_norm; }
  std::vector<int64_t> shape;
  int64_t groups = 1;  // group norm and EvoNorm-S0 only
  MemoryFormat format = MemoryFormat::channels_first;
  DType dtype = DType::float32;

  int64_t numel() const;
  int64_t batch() const { return shape[0]; }
  int64_t channels() const { return shape[1]; }
  int64_t spatial_size() const;
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * element_size(dtype); }
  // Bytes an ideal kernel moves: forward reads x and writes y (2x), backward reads dy and x and
  // writes dx (3x), forward+backward 5x; with add+relu the forward also reads the residual (3x)
  // and the backward also reads y and writes the residual's gradient (5x; both: 8x); silu moves
  // what the plain op moves.
  // GB/s are computed from this.
  double traffic_bytes() const;
  std::string op_name() const;      // "bn.fwd_train", "gn.bwd", "bn+add+relu.fwd_train", ...
  std::string shape_name() const;   // "32x64x112x112"
  std::string format_name() const;  // "nchw", "nhwc", "ncdhw", "rows", ...
  std::string label() const;        // everything above, for --filter and messages
};

const char* family_name(Family f);
const char* dtype_name(DType d);

// Names of the shape sets, in the order they run; "smoke" (tiny odd shapes) is not in the default.
std::vector<std::string> all_set_names();
std::vector<std::string> default_set_names();

// The cases of the named sets for the given dtypes, all ops and both memory formats.
// `quick` keeps a few representative shapes of each set.
std::vector<Case> make_cases(const std::vector<std::string>& sets, const std::vector<DType>& dtypes,
                             bool quick);

}  // namespace normkit::bench
