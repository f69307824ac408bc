#include "ref/layer_norm.h"

#include <cmath>
#include <limits>

namespace normkit::ref {

template <typename T>
void layer_norm_forward(T* y, T* mean, T* rstd, const T* x, const T* weight, const T* bias,
                        const LayerNormShape& t, double eps) {
  const double count = double(t.cols);
  for (int64_t i = 0; i < t.rows; ++i) {
    const T* xr = x + i * t.cols;
    T* yr = y + i * t.cols;
    double mu = 0, var = std::numeric_limits<double>::quiet_NaN();
    if (t.cols > 0) {
      double sum = 0;
      for (int64_t j = 0; j < t.cols; ++j) sum += double(xr[j]);
      mu = sum / count;
      double sq = 0;
      for (int64_t j = 0; j < t.cols; ++j) sq += (double(xr[j]) - mu) * (double(xr[j]) - mu);
      var = sq / count;
    }
    const double r = 1.0 / std::sqrt(var + eps);
    mean[i] = T(mu);
    rstd[i] = T(r);
    for (int64_t j = 0; j < t.cols; ++j) {
      const int64_t k = layer_norm_logical_index(t, j);
      const double w = weight ? double(weight[k]) : 1.0, b = bias ? double(bias[k]) : 0.0;
      yr[j] = T((double(xr[j]) - mu) * r * w + b);
    }
  }
}

// With xhat = (x - mean) * rstd and g = dy * w over the row's M elements:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   dweight[k] = sum over rows of dy * xhat,   dbias[k] = sum over rows of dy
template <typename T>
void layer_norm_backward(T* dx, T* dweight, T* dbias, const T* dy, const T* x, const T* mean,
                         const T* rstd, const T* weight, const LayerNormShape& t) {
  const double count = double(t.cols);
  for (int64_t i = 0; i < t.rows; ++i) {
    const T *xr = x + i * t.cols, *dyr = dy + i * t.cols;
    T* dxr = dx + i * t.cols;
    const double mu = double(mean[i]), r = double(rstd[i]);
    double mean_g = 0, mean_g_xhat = 0;
    for (int64_t j = 0; j < t.cols; ++j) {
      const double w = weight ? double(weight[layer_norm_logical_index(t, j)]) : 1.0;
      const double g = double(dyr[j]) * w;
      mean_g += g;
      mean_g_xhat += g * (double(xr[j]) - mu) * r;
    }
    mean_g /= count;
    mean_g_xhat /= count;
    for (int64_t j = 0; j < t.cols; ++j) {
      const double w = weight ? double(weight[layer_norm_logical_index(t, j)]) : 1.0;
      const double xhat = (double(xr[j]) - mu) * r;
      dxr[j] = T(r * (double(dyr[j]) * w - mean_g - xhat * mean_g_xhat));
    }
  }
  if (!dweight && !dbias) return;
  for (int64_t j = 0; j < t.cols; ++j) {
    double sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t i = 0; i < t.rows; ++i) {
      const double d = double(dy[i * t.cols + j]);
      sum_dy += d;
      sum_dy_xhat += d * (double(x[i * t.cols + j]) - double(mean[i])) * double(rstd[i]);
    }
    const int64_t k = layer_norm_logical_index(t, j);
    if (dweight) dweight[k] = T(sum_dy_xhat);
    if (dbias) dbias[k] = T(sum_dy);
  }
}

#define NORMKIT_REF_LAYER_NORM(T)                                                              \
  template void layer_norm_forward<T>(T*, T*, T*, const T*, const T*, const T*,                \
                                      const LayerNormShape&, double);                          \
  template void layer_norm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,     \
                                       const T*, const LayerNormShape&);
NORMKIT_REF_LAYER_NORM(float)
NORMKIT_REF_LAYER_NORM(double)
#undef NORMKIT_REF_LAYER_NORM

}  // namespace normkit::ref
