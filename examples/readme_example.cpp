// The README's C++ example: BatchNorm forward and backward in training mode, GroupNorm forward,
// and the same BatchNorm as a layer object, on a channels-last (NHWC) tensor. It checks its own
// results and exits with status 1 if any check fails.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "normkit/normkit.h"

namespace {
int failures = 0;
void check(bool ok, const char* what) {
  std::printf("%-62s %s\n", what, ok ? "ok" : "FAILED");
  failures += ok ? 0 : 1;
}
}  // namespace

int main() {
  using normkit::TensorView;
  const int64_t N = 8, C = 4, H = 5, W = 5, M = N * H * W;  // M values per channel
  const auto nhwc = normkit::MemoryFormat::channels_last;

  std::mt19937 rng(0);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  std::vector<float> x(N * C * H * W), y(x.size());
  for (float& v : x) v = normal(rng);
  // Views describe caller-owned memory; nothing is allocated or copied.
  const TensorView xv(x.data(), {N, C, H, W}, nhwc), yv(y.data(), {N, C, H, W}, nhwc);

  // BatchNorm, training mode: normalizes with the batch statistics, saves them for backward,
  // and updates the running statistics in place.
  std::vector<float> weight(C, 1.0f), bias(C, 0.0f);
  std::vector<float> running_mean(C, 0.0f), running_var(C, 1.0f);
  std::vector<float> save_mean(C), save_invstd(C);
  normkit::batch_norm_forward_training({.eps = 1e-5, .momentum = 0.1}, xv, weight, bias, yv,
                                       save_mean, save_invstd, running_mean, running_var);

  double worst_mean = 0, worst_var = 0;
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, squares = 0;
    for (int64_t i = 0; i < M; ++i) sum += y[i * C + c], squares += y[i * C + c] * y[i * C + c];
    worst_mean = std::fmax(worst_mean, std::fabs(sum / M));
    worst_var = std::fmax(worst_var, std::fabs(squares / M - 1));
  }
  check(worst_mean < 1e-5 && worst_var < 1e-3, "batch_norm: every channel has mean 0, variance 1");
  check(std::fabs(running_mean[0] - 0.1f * save_mean[0]) < 1e-6f,
        "batch_norm: running_mean = 0.9 * 0 + 0.1 * batch mean");

  // Backward of L = sum(y^2) / 2, i.e. dy = y. Normalized outputs are invariant to scaling x, so
  // dx is ~0; dL/dweight = sum(y * xhat) = M; dL/dbias = sum(y) = 0.
  const std::vector<float>& dy = y;
  std::vector<float> dx(x.size()), dweight(C), dbias(C);
  normkit::batch_norm_backward_training({}, TensorView(dy.data(), {N, C, H, W}, nhwc), xv,
                                        save_mean, save_invstd, weight,
                                        TensorView(dx.data(), {N, C, H, W}, nhwc), dweight, dbias);
  double largest_dx = 0;
  for (float v : dx) largest_dx = std::fmax(largest_dx, std::fabs(v));
  check(largest_dx < 1e-4, "batch_norm backward: dx = 0 (scale invariance)");
  check(std::fabs(dweight[0] - M) < 1e-2 * M && std::fabs(dbias[0]) < 1e-3,
        "batch_norm backward: dweight = M, dbias = 0");

  // GroupNorm with 2 groups: statistics per (sample, group), independent of the batch size.
  const int64_t G = 2;
  std::vector<float> mean(N * G), rstd(N * G);
  normkit::group_norm_forward({.num_groups = G, .eps = 1e-5}, xv, weight, bias, yv, mean, rstd);
  double worst_group_mean = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double sum = 0;
      for (int64_t s = 0; s < H * W; ++s)
        for (int64_t c = g * (C / G); c < (g + 1) * (C / G); ++c) sum += y[(n * H * W + s) * C + c];
      worst_group_mean = std::fmax(worst_group_mean, std::fabs(sum / (H * W * C / G)));
    }
  check(worst_group_mean < 1e-5, "group_norm: every (sample, group) has mean 0");

  // The same BatchNorm as a layer object that owns weight, bias and running statistics.
  normkit::BatchNorm bn(C);  // weight 1, bias 0, momentum 0.1, eps 1e-5, training mode
  bn.forward(xv, yv);
  bn.backward(TensorView(dy.data(), {N, C, H, W}, nhwc), TensorView(dx.data(), {N, C, H, W}, nhwc));
  check(bn.running_mean == running_mean && bn.num_batches_tracked == 1,
        "BatchNorm layer: same running statistics, one batch counted");
  check(std::fabs(bn.weight_grad[0] - dweight[0]) < 1e-3f * M,
        "BatchNorm layer: weight_grad as the free function's dweight");
  bn.eval();  // from now on: normalize with the running statistics
  bn.forward(xv, yv);
  const float expected = (x[0] - running_mean[0]) / std::sqrt(running_var[0] + 1e-5f);
  check(std::fabs(y[0] - expected) < 1e-4f, "BatchNorm layer, eval: uses running statistics");

  return failures == 0 ? 0 : 1;
}
