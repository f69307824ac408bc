#include "ref/layer_norm.h"

#include <cmath>
#include <limits>
#include <vector>

#include "ref/activation.h"
#include "ref/group_norm.h"  // widen, narrow

namespace normkit::ref {

template <typename T>
void layer_norm_forward(const LayerNormShape& t, double eps, const T* x, const T* weight,
                        const T* bias, T* y, T* mean, T* rstd) {
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
void layer_norm_backward(const LayerNormShape& t, const T* dy, const T* x, const T* mean,
                         const T* rstd, const T* weight, T* dx, T* dweight, T* dbias) {
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

#define NORMKIT_REF_LAYER_NORM(T)                                                             \
  template void layer_norm_forward<T>(const LayerNormShape&, double, const T*, const T*,       \
                                      const T*, T*, T*, T*);                                   \
  template void layer_norm_backward<T>(const LayerNormShape&, const T*, const T*, const T*,    \
                                       const T*, const T*, T*, T*, T*);
NORMKIT_REF_LAYER_NORM(float)
NORMKIT_REF_LAYER_NORM(double)
#undef NORMKIT_REF_LAYER_NORM

namespace {

// Empty for an absent vector (nothing reads it), so an empty x with a huge C allocates nothing.
std::vector<double> widen_floats(const float* p, int64_t n) {
  if (!p) return {};
  std::vector<double> v(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[std::size_t(i)] = double(p[i]);
  return v;
}

}  // namespace

void layer_norm_forward(const LayerNormShape& t, double eps, const ForwardEpilogue& e,
                        const TensorView& x, const float* weight, const float* bias,
                        const TensorView& y, float* mean, float* rstd) {
  const int64_t count = t.rows * t.cols;
  const auto xd = widen(x, count), wd = widen_floats(weight, t.cols), bd = widen_floats(bias, t.cols);
  const auto rows = static_cast<std::size_t>(t.rows);
  std::vector<double> yd(xd.size()), md(rows), rd(rows);
  layer_norm_forward<double>(t, eps, xd.data(), weight ? wd.data() : nullptr,
                             bias ? bd.data() : nullptr, yd.data(), md.data(), rd.data());
  if (e.residual.data) {
    const auto r = widen(e.residual, count);
    for (std::size_t i = 0; i < yd.size(); ++i) yd[i] += r[i];
  }
  for (double& v : yd) v = activate(e.activation, v);
  narrow(yd, y);
  for (std::size_t i = 0; i < rows; ++i) {
    mean[i] = float(md[i]);
    rstd[i] = float(rd[i]);
  }
}

void layer_norm_backward(const LayerNormShape& t, const BackwardEpilogue& e, const TensorView& dy,
                         const TensorView& x, const float* mean, const float* rstd,
                         const float* weight, const TensorView& dx, float* dweight,
                         float* dbias) {
  const int64_t count = t.rows * t.cols;
  auto g = widen(dy, count);
  const auto xd = widen(x, count), wd = widen_floats(weight, t.cols);
  const auto md = widen_floats(mean, t.rows), rd = widen_floats(rstd, t.rows);
  if (e.activation == Activation::relu) {
    const auto yd = widen(e.y, count);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = yd[i] > 0 ? g[i] : 0.0;
  } else if (e.activation == Activation::silu) {
    // z recomputed as the forward made it, from the saved statistics.
    const auto r = widen(e.residual, count);  // zeros when absent
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) {
        const int64_t k = layer_norm_logical_index(t, j);
        const auto at = std::size_t(i * t.cols + j);
        const double w = weight ? wd[std::size_t(k)] : 1.0;
        const double b = e.bias.empty() ? 0.0 : double(e.bias[std::size_t(k)]);
        const double z = (xd[at] - md[std::size_t(i)]) * rd[std::size_t(i)] * w + b + r[at];
        g[at] *= silu_derivative(z);
      }
  }
  narrow(g, e.dresidual);
  const auto cols = static_cast<std::size_t>(t.cols);
  std::vector<double> dxd(xd.size()), dwd(cols), dbd(cols);
  layer_norm_backward<double>(t, g.data(), xd.data(), md.data(), rd.data(),
                              weight ? wd.data() : nullptr, dxd.data(), dwd.data(), dbd.data());
  narrow(dxd, dx);
  for (std::size_t j = 0; j < cols; ++j) {
    if (dweight) dweight[j] = float(dwd[j]);
    if (dbias) dbias[j] = float(dbd[j]);
  }
}

}  // namespace normkit::ref
