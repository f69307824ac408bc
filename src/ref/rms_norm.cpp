#include "ref/rms_norm.h"

#include <cmath>
#include <limits>
#include <vector>

#include "ref/activation.h"
#include "ref/group_norm.h"  // widen, narrow

namespace normkit::ref {

template <typename T>
void rms_norm_forward(const LayerNormShape& t, double eps, const T* x, const T* weight, T* y,
                      T* rstd) {
  for (int64_t i = 0; i < t.rows; ++i) {
    const T* xr = x + i * t.cols;
    T* yr = y + i * t.cols;
    double ms = std::numeric_limits<double>::quiet_NaN();
    if (t.cols > 0) {
      double sq = 0;
      for (int64_t j = 0; j < t.cols; ++j) sq += double(xr[j]) * double(xr[j]);
      ms = sq / double(t.cols);
    }
    const double r = 1.0 / std::sqrt(ms + eps);
    rstd[i] = T(r);
    for (int64_t j = 0; j < t.cols; ++j) {
      const double w = weight ? double(weight[plan::layer_norm_logical_index(t, j)]) : 1.0;
      yr[j] = T(double(xr[j]) * r * w);
    }
  }
}

template <typename T>
void rms_norm_backward(const LayerNormShape& t, const T* dy, const T* x, const T* rstd,
                       const T* weight, T* dx, T* dweight) {
  for (int64_t i = 0; i < t.rows; ++i) {
    const T *xr = x + i * t.cols, *dyr = dy + i * t.cols;
    T* dxr = dx + i * t.cols;
    const double r = double(rstd[i]);
    double mean_g_xhat = 0;
    for (int64_t j = 0; j < t.cols; ++j) {
      const double w = weight ? double(weight[plan::layer_norm_logical_index(t, j)]) : 1.0;
      mean_g_xhat += double(dyr[j]) * w * double(xr[j]) * r;
    }
    mean_g_xhat /= double(t.cols);
    for (int64_t j = 0; j < t.cols; ++j) {
      const double w = weight ? double(weight[plan::layer_norm_logical_index(t, j)]) : 1.0;
      dxr[j] = T(r * (double(dyr[j]) * w - double(xr[j]) * r * mean_g_xhat));
    }
  }
  if (!dweight) return;
  for (int64_t j = 0; j < t.cols; ++j) {
    double sum = 0;
    for (int64_t i = 0; i < t.rows; ++i)
      sum += double(dy[i * t.cols + j]) * double(x[i * t.cols + j]) * double(rstd[i]);
    dweight[plan::layer_norm_logical_index(t, j)] = T(sum);
  }
}

#define NORMKIT_REF_RMS_NORM(T)                                                               \
  template void rms_norm_forward<T>(const LayerNormShape&, double, const T*, const T*, T*, T*); \
  template void rms_norm_backward<T>(const LayerNormShape&, const T*, const T*, const T*,      \
                                     const T*, T*, T*);
NORMKIT_REF_RMS_NORM(float)
NORMKIT_REF_RMS_NORM(double)
#undef NORMKIT_REF_RMS_NORM

namespace {

std::vector<double> widen_floats(const float* p, int64_t n) {
  if (!p) return {};
  return std::vector<double>(p, p + n);
}

}  // namespace

void rms_norm_forward(const LayerNormShape& t, double eps, const ForwardEpilogue& e,
                      const TensorView& x, const float* weight, const TensorView& residual_in,
                      const TensorView& y, float* rstd, const TensorView& sum_out) {
  const int64_t count = t.rows * t.cols;
  auto xd = widen(x, count);
  if (residual_in.data) {
    // h as sum_out holds it (rounded to the activation dtype) is what gets normalized.
    const auto rd = widen(residual_in, count);
    for (std::size_t i = 0; i < xd.size(); ++i) xd[i] += rd[i];
    narrow(xd, sum_out);
    xd = widen(sum_out, count);
  }
  const auto wd = widen_floats(weight, t.cols);
  std::vector<double> yd(xd.size()), rd(static_cast<std::size_t>(t.rows));
  rms_norm_forward<double>(t, eps, xd.data(), weight ? wd.data() : nullptr, yd.data(), rd.data());
  if (e.residual.data) {
    const auto r = widen(e.residual, count);
    for (std::size_t i = 0; i < yd.size(); ++i) yd[i] += r[i];
  }
  for (double& v : yd) v = activate(e.activation, v);
  narrow(yd, y);
  for (std::size_t i = 0; i < rd.size(); ++i) rstd[i] = float(rd[i]);
}

void rms_norm_backward(const LayerNormShape& t, const BackwardEpilogue& e, const TensorView& dy,
                       const TensorView& x, const float* rstd, const float* weight,
                       const TensorView& dsum_out, const TensorView& dx, float* dweight) {
  const int64_t count = t.rows * t.cols;
  auto g = widen(dy, count);
  const auto xd = widen(x, count), wd = widen_floats(weight, t.cols);
  const auto rd = widen_floats(rstd, t.rows);
  if (e.activation == Activation::relu) {
    const auto yd = widen(e.y, count);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = yd[i] > 0 ? g[i] : 0.0;
  } else if (e.activation == Activation::silu) {
    const auto r = widen(e.residual, count);  // zeros when absent
    for (int64_t i = 0; i < t.rows; ++i)
      for (int64_t j = 0; j < t.cols; ++j) {
        const auto at = std::size_t(i * t.cols + j);
        const double w = weight ? wd[std::size_t(plan::layer_norm_logical_index(t, j))] : 1.0;
        g[at] *= silu_derivative(xd[at] * rd[std::size_t(i)] * w + r[at]);
      }
  }
  narrow(g, e.dresidual);
  std::vector<double> dxd(xd.size()), dwd(static_cast<std::size_t>(t.cols));
  rms_norm_backward<double>(t, g.data(), xd.data(), rd.data(), weight ? wd.data() : nullptr,
                            dxd.data(), dwd.data());
  if (dsum_out.data) {
    const auto ds = widen(dsum_out, count);
    for (std::size_t i = 0; i < dxd.size(); ++i) dxd[i] += ds[i];
  }
  narrow(dxd, dx);
  if (dweight)
    for (std::size_t j = 0; j < dwd.size(); ++j) dweight[j] = float(dwd[j]);
}

}  // namespace normkit::ref
