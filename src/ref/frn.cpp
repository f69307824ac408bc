#include "ref/frn.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ref/group_norm.h"  // widen, narrow

namespace normkit::ref {
namespace {

// Index of the logical (n, c, s) element in memory.
int64_t at(const plan::GroupNormShape& t, int64_t n, int64_t c, int64_t s) {
  return t.format == MemoryFormat::channels_first ? (n * t.channels + c) * t.spatial + s
                                                  : (n * t.spatial + s) * t.channels + c;
}

}  // namespace

void frn_forward(const plan::GroupNormShape& t, double eps, const TensorView& x,
                 const float* weight, const float* bias, const float* tau, const TensorView& y,
                 float* rstd) {
  const int64_t count = t.batch * t.channels * t.spatial;
  const std::vector<double> xd = widen(x, count);
  std::vector<double> yd(std::size_t(count), 0.0);
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t c = 0; c < t.channels; ++c) {
      double squares = 0;
      for (int64_t s = 0; s < t.spatial; ++s) squares += xd[at(t, n, c, s)] * xd[at(t, n, c, s)];
      const double r = t.spatial > 0 ? 1.0 / std::sqrt(squares / double(t.spatial) + eps)
                                     : std::numeric_limits<double>::quiet_NaN();
      rstd[n * t.channels + c] = float(r);
      for (int64_t s = 0; s < t.spatial; ++s) {
        const int64_t i = at(t, n, c, s);
        const double z = xd[i] * r * weight[c] + bias[c];
        yd[i] = z < double(tau[c]) ? double(tau[c]) : z;
      }
    }
  narrow(yd, y);
}

void frn_backward(const plan::GroupNormShape& t, const TensorView& dy, const TensorView& x,
                  const float* rstd, const float* weight, const float* bias, const float* tau,
                  const TensorView& dx, float* dweight, float* dbias, float* dtau, float* deps) {
  const int64_t count = t.batch * t.channels * t.spatial;
  const std::vector<double> xd = widen(x, count), dyd = widen(dy, count);
  std::vector<double> dxd(std::size_t(count), 0.0);
  std::vector<double> dw(std::size_t(t.channels), 0.0), db(dw), dt(dw), de(dw);
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t c = 0; c < t.channels; ++c) {
      const double r = rstd[n * t.channels + c], w = weight[c];
      // g: dy where the max took z (ties included), else 0; the rest goes to tau.
      auto g_at = [&](int64_t i, double* to_tau) {
        const double z = xd[i] * r * w + bias[c];
        const bool below = z < double(tau[c]);
        if (to_tau) *to_tau += below ? dyd[i] : 0.0;
        return below ? 0.0 : dyd[i];
      };
      double sum_g = 0, sum_gx = 0;
      for (int64_t s = 0; s < t.spatial; ++s) {
        const int64_t i = at(t, n, c, s);
        const double g = g_at(i, &dt[c]);
        sum_g += g;
        sum_gx += g * xd[i];
      }
      db[c] += sum_g;
      dw[c] += sum_gx * r;
      // d rstd / d eps = -rstd^3 / 2, and z depends on eps only through rstd.
      de[c] += -0.5 * w * r * r * r * sum_gx;
      // d rstd / d x_s = -rstd^3 x_s / S: dx = w r g - x w r^3 sum(g x) / S.
      const double b = -w * r * r * r * sum_gx / double(t.spatial);
      for (int64_t s = 0; s < t.spatial; ++s) {
        const int64_t i = at(t, n, c, s);
        dxd[i] = w * r * g_at(i, nullptr) + b * xd[i];
      }
    }
  narrow(dxd, dx);
  for (int64_t c = 0; c < t.channels; ++c) {
    if (dweight) dweight[c] = float(dw[c]);
    if (dbias) dbias[c] = float(db[c]);
    if (dtau) dtau[c] = float(dt[c]);
    if (deps) deps[c] = float(de[c]);
  }
}

}  // namespace normkit::ref
