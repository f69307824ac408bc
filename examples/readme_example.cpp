// Normalizes one small tensor through the installed library and checks the result.
#include <cmath>
#include <cstdio>
#include <vector>

#include "normkit/group_norm.h"

int main() {
  std::vector<float> x = {1, 2, 3, 4, 10, 20, 30, 40}, y(8), mean(2), rstd(2);
  normkit::group_norm_forward({.num_groups = 1}, normkit::TensorView(x.data(), {2, 2, 2}), {}, {},
                              normkit::TensorView(y.data(), {2, 2, 2}), mean, rstd);
  double sum = 0, sq = 0;
  for (int i = 0; i < 4; ++i) sum += y[i], sq += y[i] * y[i];
  bool ok = std::fabs(mean[0] - 2.5f) < 1e-6f && std::fabs(sum) < 1e-5 && std::fabs(sq - 4) < 1e-3;
  std::printf("consumer: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
