// Public BatchNorm folding: validate every argument, then run the double-precision reference.
#include "normkit/fold_batch_norm.h"

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>

#include "common/validate.h"
#include "ref/fold_batch_norm.h"

namespace normkit {
namespace {

using detail::check_length;
using detail::fail;
using detail::format_number;

// Whether two vectors share any byte (empty ones share none). std::less gives a total order on
// unrelated pointers.
bool overlaps(std::span<const float> a, std::span<const float> b) {
  if (a.empty() || b.empty()) return false;
  const std::less<const float*> less;
  return less(a.data(), b.data() + b.size()) && less(b.data(), a.data() + a.size());
}

bool same(std::span<const float> a, std::span<const float> b) {
  return a.data() == b.data() && a.size() == b.size();
}

// An output may be exactly one of the inputs it is computed elementwise from (in place), and
// must touch no other input.
void check_overlap(const char* fn, const char* out_name, std::span<const float> out,
                   const char* in_name, std::span<const float> in, bool in_place_allowed) {
  if (!overlaps(out, in) || (in_place_allowed && same(out, in))) return;
  fail(fn, std::string(out_name) + " overlaps " + in_name +
               (in_place_allowed ? " without being the same memory (in place needs exactly the "
                                   "same data and length)"
                                 : "; they must be separate memory"));
}

}  // namespace

void fold_batch_norm(const FoldBatchNormParams& params, std::span<const float> layer_weight,
                     int64_t out_channels, std::span<const float> layer_bias,
                     std::span<const float> running_mean, std::span<const float> running_var,
                     std::span<const float> bn_weight, std::span<const float> bn_bias,
                     std::span<float> folded_weight, std::span<float> folded_bias) {
  const char* fn = "fold_batch_norm";
  if (out_channels < 0)
    fail(fn, "out_channels must be >= 0, got " + std::to_string(out_channels));
  const auto weight_length = static_cast<int64_t>(layer_weight.size());
  if (out_channels == 0 ? weight_length != 0 : weight_length % out_channels != 0)
    fail(fn, "layer_weight has " + std::to_string(weight_length) +
                 " elements, expected a multiple of out_channels = " +
                 std::to_string(out_channels) + " (out_channels * elements per output channel)");
  const int64_t per_channel = out_channels == 0 ? 0 : weight_length / out_channels;
  if (layer_weight.data() == nullptr && weight_length != 0)
    fail(fn, "layer_weight is null with a nonzero length");
  check_length(fn, "layer_bias", layer_bias, out_channels, "out_channels", false);
  check_length(fn, "running_mean", running_mean, out_channels, "out_channels", true);
  check_length(fn, "running_var", running_var, out_channels, "out_channels", true);
  check_length(fn, "bn_weight", bn_weight, out_channels, "out_channels", false);
  check_length(fn, "bn_bias", bn_bias, out_channels, "out_channels", false);
  check_length(fn, "folded_bias", folded_bias, out_channels, "out_channels", true);
  if (static_cast<int64_t>(folded_weight.size()) != weight_length ||
      (folded_weight.data() == nullptr && weight_length != 0))
    fail(fn, "folded_weight has " + std::to_string(folded_weight.size()) +
                 " elements, expected layer_weight's " + std::to_string(weight_length));
  detail::check_eps(fn, params.eps);
  for (int64_t c = 0; c < out_channels; ++c) {
    const double var = running_var[c];
    // Negative or NaN variance is corrupt statistics; folding it would hide that in the weights.
    if (!(var >= 0))
      fail(fn, "running_var[" + std::to_string(c) + "] = " + format_number(var) +
                   ", expected >= 0");
    if (!(var + params.eps > 0))
      fail(fn, "running_var[" + std::to_string(c) + "] + eps = 0 (eps = " +
                   format_number(params.eps) + "): the scale would be infinite");
  }

  check_overlap(fn, "folded_weight", folded_weight, "folded_bias", folded_bias, false);
  check_overlap(fn, "folded_weight", folded_weight, "layer_weight", layer_weight, true);
  const std::pair<const char*, std::span<const float>> per_channel_inputs[] = {
      {"layer_bias", layer_bias}, {"running_mean", running_mean}, {"running_var", running_var},
      {"bn_weight", bn_weight},   {"bn_bias", bn_bias}};
  for (const auto& [name, in] : per_channel_inputs) {
    check_overlap(fn, "folded_weight", folded_weight, name, in, false);
    check_overlap(fn, "folded_bias", folded_bias, name, in, true);
  }
  check_overlap(fn, "folded_bias", folded_bias, "layer_weight", layer_weight, false);

  if (out_channels == 0) return;
  ref::fold_batch_norm<float>(params.eps, out_channels, per_channel, layer_weight.data(),
                              layer_bias.data(), running_mean.data(), running_var.data(),
                              bn_weight.data(), bn_bias.data(), folded_weight.data(),
                              folded_bias.data());
}

}  // namespace normkit
