#include "ref/evonorm.h"

#include <cmath>
#include <cstdint>
#include <vector>

#include "ref/group_norm.h"  // the statistics, widen, narrow

namespace normkit::ref {
namespace {

int64_t at(const plan::GroupNormShape& t, int64_t n, int64_t c, int64_t s) {
  return t.format == MemoryFormat::channels_first ? (n * t.channels + c) * t.spatial + s
                                                  : (n * t.spatial + s) * t.channels + c;
}

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

}  // namespace

void evonorm_s0_forward(const plan::GroupNormShape& t, double eps, const TensorView& x,
                        const float* v, const float* weight, const float* bias,
                        const TensorView& y, float* mean, float* rstd) {
  const int64_t count = t.batch * t.channels * t.spatial, G = t.groups;
  const std::vector<double> xd = widen(x, count);
  // GroupNorm's statistics in double (its y is not needed).
  std::vector<double> unused(static_cast<std::size_t>(count));
  std::vector<double> mu(static_cast<std::size_t>(t.batch * G)), rs(mu);
  group_norm_forward<double>(t, eps, xd.data(), nullptr, nullptr, unused.data(), mu.data(),
                             rs.data());
  std::vector<double> yd(static_cast<std::size_t>(count));
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t c = 0; c < t.channels; ++c) {
      const double r = rs[n * G + c / (t.channels / G)];
      for (int64_t s = 0; s < t.spatial; ++s) {
        const int64_t i = at(t, n, c, s);
        yd[i] = xd[i] * sigmoid(v[c] * xd[i]) * r * weight[c] + bias[c];
      }
    }
  for (int64_t i = 0; i < t.batch * G; ++i) mean[i] = float(mu[i]), rstd[i] = float(rs[i]);
  narrow(yd, y);
}

void evonorm_s0_backward(const plan::GroupNormShape& t, const TensorView& dy,
                         const TensorView& x, const float* mean, const float* rstd,
                         const float* v, const float* weight, const TensorView& dx, float* dv,
                         float* dweight, float* dbias) {
  const int64_t count = t.batch * t.channels * t.spatial, G = t.groups;
  const int64_t per_group = t.channels / G;
  const std::vector<double> xd = widen(x, count), dyd = widen(dy, count);
  std::vector<double> dxd(static_cast<std::size_t>(count));
  std::vector<double> gv(static_cast<std::size_t>(t.channels)), gw(gv), gb(gv);
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const double r = rstd[n * G + g], mu = mean[n * G + g];
      const double M = double(per_group * t.spatial);
      // dL/drstd of the group: sum of dy * weight * h.
      double through_rstd = 0;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c)
        for (int64_t s = 0; s < t.spatial; ++s) {
          const int64_t i = at(t, n, c, s);
          const double sg = sigmoid(v[c] * xd[i]), h = xd[i] * sg;
          through_rstd += dyd[i] * weight[c] * h;
          gb[c] += dyd[i];
          gw[c] += dyd[i] * h * r;
          gv[c] += dyd[i] * weight[c] * r * xd[i] * xd[i] * sg * (1 - sg);
        }
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c)
        for (int64_t s = 0; s < t.spatial; ++s) {
          const int64_t i = at(t, n, c, s);
          const double sg = sigmoid(v[c] * xd[i]);
          // h' = s (1 + v x (1 - s)); d rstd / d x = -rstd^3 (x - mean) / M.
          dxd[i] = dyd[i] * weight[c] * r * sg * (1 + v[c] * xd[i] * (1 - sg)) -
                   r * r * r * (xd[i] - mu) / M * through_rstd;
        }
    }
  narrow(dxd, dx);
  for (int64_t c = 0; c < t.channels; ++c) {
    if (dv) dv[c] = float(gv[c]);
    if (dweight) dweight[c] = float(gw[c]);
    if (dbias) dbias[c] = float(gb[c]);
  }
}

}  // namespace normkit::ref
