#include "ref/layer_norm2d.h"

#include <cmath>
#include <limits>
#include <vector>

#include "ref/group_norm.h"  // widen, narrow

namespace normkit::ref {

template <typename T>
void layer_norm2d_forward(const LayerNorm2dShape& t, double eps, const T* x, const T* weight,
                          const T* bias, T* y, T* mean, T* rstd) {
  const int64_t C = t.channels, S = t.spatial;
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t s = 0; s < S; ++s) {
      const T* xp = x + n * C * S + s;  // x[n, c, s] = xp[c * S]
      double m = 0, var = 0;
      for (int64_t c = 0; c < C; ++c) m += double(xp[c * S]);
      m = C > 0 ? m / double(C) : 0.0;
      for (int64_t c = 0; c < C; ++c) var += (double(xp[c * S]) - m) * (double(xp[c * S]) - m);
      const double r = C > 0 ? 1.0 / std::sqrt(var / double(C) + eps)
                             : std::numeric_limits<double>::quiet_NaN();
      mean[n * S + s] = T(m);
      rstd[n * S + s] = T(r);
      for (int64_t c = 0; c < C; ++c) {
        const double w = weight ? double(weight[c]) : 1.0, b = bias ? double(bias[c]) : 0.0;
        y[n * C * S + c * S + s] = T((double(xp[c * S]) - m) * r * w + b);
      }
    }
}

template <typename T>
void layer_norm2d_backward(const LayerNorm2dShape& t, const T* dy, const T* x, const T* mean,
                           const T* rstd, const T* weight, T* dx, T* dweight, T* dbias) {
  const int64_t C = t.channels, S = t.spatial;
  std::vector<double> dw(std::size_t(C), 0.0), db(std::size_t(C), 0.0);
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t base = n * C * S + s;
      const double m = double(mean[n * S + s]), r = double(rstd[n * S + s]);
      double sum_gw = 0, sum_gw_xhat = 0;
      for (int64_t c = 0; c < C; ++c) {
        const double w = weight ? double(weight[c]) : 1.0;
        const double g = double(dy[base + c * S]), xhat = (double(x[base + c * S]) - m) * r;
        sum_gw += g * w;
        sum_gw_xhat += g * w * xhat;
        dw[std::size_t(c)] += g * xhat;
        db[std::size_t(c)] += g;
      }
      for (int64_t c = 0; c < C; ++c) {
        const double w = weight ? double(weight[c]) : 1.0;
        const double g = double(dy[base + c * S]), xhat = (double(x[base + c * S]) - m) * r;
        dx[base + c * S] = T(r * (g * w - sum_gw / double(C) - xhat * sum_gw_xhat / double(C)));
      }
    }
  for (int64_t c = 0; c < C; ++c) {
    if (dweight) dweight[c] = T(dw[std::size_t(c)]);
    if (dbias) dbias[c] = T(db[std::size_t(c)]);
  }
}

#define NORMKIT_REF_LAYER_NORM2D(T)                                                            \
  template void layer_norm2d_forward<T>(const LayerNorm2dShape&, double, const T*, const T*,   \
                                        const T*, T*, T*, T*);                                 \
  template void layer_norm2d_backward<T>(const LayerNorm2dShape&, const T*, const T*, const T*, \
                                         const T*, const T*, T*, T*, T*);
NORMKIT_REF_LAYER_NORM2D(float)
NORMKIT_REF_LAYER_NORM2D(double)
#undef NORMKIT_REF_LAYER_NORM2D

namespace {

std::vector<double> widen_floats(const float* p, int64_t n) {
  return p ? std::vector<double>(p, p + n) : std::vector<double>{};
}
const double* or_null(const std::vector<double>& v) { return v.empty() ? nullptr : v.data(); }
void store(const std::vector<double>& v, float* out) {
  if (out)
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = float(v[i]);
}

}  // namespace

void layer_norm2d_forward(const LayerNorm2dShape& t, double eps, const TensorView& x,
                          const float* weight, const float* bias, const TensorView& y,
                          float* mean, float* rstd) {
  const int64_t count = t.batch * t.channels * t.spatial, positions = t.batch * t.spatial;
  const std::vector<double> xd = widen(x, count), w = widen_floats(weight, t.channels),
                            b = widen_floats(bias, t.channels);
  std::vector<double> yd(static_cast<std::size_t>(count)), m(static_cast<std::size_t>(positions)), r(static_cast<std::size_t>(positions));
  layer_norm2d_forward<double>(t, eps, xd.data(), or_null(w), or_null(b), yd.data(), m.data(),
                               r.data());
  narrow(yd, y);
  store(m, mean);
  store(r, rstd);
}

void layer_norm2d_backward(const LayerNorm2dShape& t, const TensorView& dy, const TensorView& x,
                           const float* mean, const float* rstd, const float* weight,
                           const TensorView& dx, float* dweight, float* dbias) {
  const int64_t count = t.batch * t.channels * t.spatial, positions = t.batch * t.spatial;
  const std::vector<double> dyd = widen(dy, count), xd = widen(x, count),
                            m = widen_floats(mean, positions), r = widen_floats(rstd, positions),
                            w = widen_floats(weight, t.channels);
  std::vector<double> dxd(static_cast<std::size_t>(count)), dw(static_cast<std::size_t>(t.channels)),
      db(static_cast<std::size_t>(t.channels));
  layer_norm2d_backward<double>(t, dyd.data(), xd.data(), or_null(m), or_null(r), or_null(w),
                                dxd.data(), dw.data(), db.data());
  narrow(dxd, dx);
  if (dweight) store(dw, dweight);
  if (dbias) store(db, dbias);
}

}  // namespace normkit::ref
