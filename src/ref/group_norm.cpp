#include "ref/group_norm.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/dtype.h"
#include "ref/activation.h"

namespace normkit::ref {
namespace {

// Memory index of logical element (n, c, s).
int64_t index_of(const GroupNormShape& t, int64_t n, int64_t c, int64_t s) {
  return t.format == MemoryFormat::channels_first ? (n * t.channels + c) * t.spatial + s
                                                  : (n * t.spatial + s) * t.channels + c;
}

}  // namespace

template <typename T>
void group_norm_forward(const GroupNormShape& t, double eps, const T* x, const T* weight,
                        const T* bias, T* y, T* mean, T* rstd, T* variance) {
  const int64_t per_group = t.channels / t.groups;
  const double count = double(per_group * t.spatial);
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t g = 0; g < t.groups; ++g) {
      const int64_t c0 = g * per_group, c1 = c0 + per_group;
      double mu = 0, var = std::numeric_limits<double>::quiet_NaN();
      if (count > 0) {
        // Two passes: the mean, then the centred sum of squares.
        double sum = 0;
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t s = 0; s < t.spatial; ++s) sum += double(x[index_of(t, n, c, s)]);
        mu = sum / count;
        double sq = 0;
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t s = 0; s < t.spatial; ++s) {
            const double d = double(x[index_of(t, n, c, s)]) - mu;
            sq += d * d;
          }
        var = sq / count;
      }
      const double r = 1.0 / std::sqrt(var + eps);
      mean[n * t.groups + g] = T(mu);
      rstd[n * t.groups + g] = T(r);
      if (variance) variance[n * t.groups + g] = T(var);
      for (int64_t c = c0; c < c1; ++c) {
        const double w = weight ? double(weight[c]) : 1.0, b = bias ? double(bias[c]) : 0.0;
        for (int64_t s = 0; s < t.spatial; ++s) {
          const int64_t i = index_of(t, n, c, s);
          y[i] = T((double(x[i]) - mu) * r * w + b);
        }
      }
    }
}

template <typename T>
void group_norm_apply(const GroupNormShape& t, const T* x, const T* mean, const T* rstd,
                      const T* weight, const T* bias, T* y) {
  const int64_t per_group = t.channels / t.groups;
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t c = 0; c < t.channels; ++c) {
      const int64_t ng = n * t.groups + c / per_group;
      const double mu = double(mean[ng]), r = double(rstd[ng]);
      const double w = weight ? double(weight[c]) : 1.0, b = bias ? double(bias[c]) : 0.0;
      for (int64_t s = 0; s < t.spatial; ++s) {
        const int64_t i = index_of(t, n, c, s);
        y[i] = T((double(x[i]) - mu) * r * w + b);
      }
    }
}

// With xhat = (x - mean) * rstd, y = xhat * w + b and g = dy * w, over the M elements of a group:
//   dxhat = g
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (mean and rstd depend on x)
//   dx = rstd * g                                           (stats_are_constants)
//   dweight[c] = sum over n, s of dy * xhat,   dbias[c] = sum over n, s of dy
template <typename T>
void group_norm_backward(const GroupNormShape& t, bool stats_are_constants, const T* dy,
                         const T* x, const T* mean, const T* rstd, const T* weight, T* dx,
                         T* dweight, T* dbias) {
  const int64_t per_group = t.channels / t.groups;
  const double count = double(per_group * t.spatial);
  for (int64_t n = 0; n < t.batch; ++n)
    for (int64_t g = 0; g < t.groups; ++g) {
      const int64_t c0 = g * per_group, c1 = c0 + per_group;
      const double mu = double(mean[n * t.groups + g]), r = double(rstd[n * t.groups + g]);
      double mean_g = 0, mean_g_xhat = 0;
      if (!stats_are_constants) {
        for (int64_t c = c0; c < c1; ++c) {
          const double w = weight ? double(weight[c]) : 1.0;
          for (int64_t s = 0; s < t.spatial; ++s) {
            const int64_t i = index_of(t, n, c, s);
            const double gi = double(dy[i]) * w;
            mean_g += gi;
            mean_g_xhat += gi * (double(x[i]) - mu) * r;
          }
        }
        mean_g /= count;
        mean_g_xhat /= count;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const double w = weight ? double(weight[c]) : 1.0;
        for (int64_t s = 0; s < t.spatial; ++s) {
          const int64_t i = index_of(t, n, c, s);
          const double xhat = (double(x[i]) - mu) * r;
          dx[i] = T(r * (double(dy[i]) * w - mean_g - xhat * mean_g_xhat));
        }
      }
    }
  for (int64_t c = 0; c < t.channels; ++c) {
    double sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t n = 0; n < t.batch; ++n) {
      const int64_t ng = n * t.groups + c / per_group;
      const double mu = double(mean[ng]), r = double(rstd[ng]);
      for (int64_t s = 0; s < t.spatial; ++s) {
        const int64_t i = index_of(t, n, c, s);
        sum_dy += double(dy[i]);
        sum_dy_xhat += double(dy[i]) * (double(x[i]) - mu) * r;
      }
    }
    if (dweight) dweight[c] = T(sum_dy_xhat);
    if (dbias) dbias[c] = T(sum_dy);
  }
}

#define NORMKIT_REF_GROUP_NORM(T)                                                              \
  template void group_norm_forward<T>(const GroupNormShape&, double, const T*, const T*,        \
                                      const T*, T*, T*, T*, T*);                               \
  template void group_norm_apply<T>(const GroupNormShape&, const T*, const T*, const T*,       \
                                    const T*, const T*, T*);                                   \
  template void group_norm_backward<T>(const GroupNormShape&, bool, const T*, const T*,        \
                                       const T*, const T*, const T*, T*, T*, T*);
NORMKIT_REF_GROUP_NORM(float)
NORMKIT_REF_GROUP_NORM(double)
#undef NORMKIT_REF_GROUP_NORM

std::vector<double> widen(const TensorView& t, int64_t count) {
  std::vector<double> v(std::size_t(std::max<int64_t>(count, 0)));
  if (!t.data) return v;
  visit_dtype(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* p = t.as<const T>();
    for (std::size_t i = 0; i < v.size(); ++i) v[i] = double(to_float(p[i]));
  });
  return v;
}

void narrow(const std::vector<double>& v, const TensorView& t) {
  if (!t.data) return;
  visit_dtype(t.dtype, [&](auto tag) {
    using T = decltype(tag);
    T* p = t.as<T>();
    // Through float: a double -> 16-bit rounding directly could differ from double -> float ->
    // 16-bit only in double-rounding ties, which the tests' tolerances cover either way.
    for (std::size_t i = 0; i < v.size(); ++i) p[i] = from_float<T>(float(v[i]));
  });
}

namespace {

// Empty for an absent vector (nothing reads it), so an empty x with a huge C allocates nothing.
std::vector<double> widen_floats(const float* p, int64_t n) {
  if (!p) return {};
  std::vector<double> v(static_cast<std::size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[std::size_t(i)] = double(p[i]);
  return v;
}

void apply_forward_epilogue(std::vector<double>& y, const ForwardEpilogue& e, int64_t count) {
  if (e.residual.data) {
    const auto r = widen(e.residual, count);
    for (std::size_t i = 0; i < y.size(); ++i) y[i] += r[i];
  }
  for (double& v : y) v = activate(e.activation, v);
}

}  // namespace

void group_norm_forward(const GroupNormShape& t, double eps, const ForwardEpilogue& e,
                        const TensorView& x, const float* weight, const float* bias,
                        const TensorView& y, float* mean, float* rstd, float* variance) {
  const int64_t count = t.batch * t.channels * t.spatial, ng = t.batch * t.groups;
  const auto xd = widen(x, count), wd = widen_floats(weight, t.channels), bd = widen_floats(bias, t.channels);
  const auto size = static_cast<std::size_t>(ng);
  std::vector<double> yd(xd.size()), md(size), rd(size), vd(size);
  group_norm_forward<double>(t, eps, xd.data(), weight ? wd.data() : nullptr,
                             bias ? bd.data() : nullptr, yd.data(), md.data(), rd.data(), vd.data());
  apply_forward_epilogue(yd, e, count);
  narrow(yd, y);
  for (int64_t i = 0; i < ng; ++i) {
    mean[i] = float(md[i]);
    rstd[i] = float(rd[i]);
    if (variance) variance[i] = float(vd[i]);
  }
}

void group_norm_apply(const GroupNormShape& t, const ForwardEpilogue& e, const TensorView& x,
                      const float* mean, const float* rstd, const float* weight,
                      const float* bias, const TensorView& y) {
  const int64_t count = t.batch * t.channels * t.spatial, ng = t.batch * t.groups;
  const auto xd = widen(x, count), wd = widen_floats(weight, t.channels), bd = widen_floats(bias, t.channels);
  const auto md = widen_floats(mean, ng), rd = widen_floats(rstd, ng);
  std::vector<double> yd(xd.size());
  group_norm_apply<double>(t, xd.data(), md.data(), rd.data(), weight ? wd.data() : nullptr,
                           bias ? bd.data() : nullptr, yd.data());
  apply_forward_epilogue(yd, e, count);
  narrow(yd, y);
}

void group_norm_backward(const GroupNormShape& t, bool stats_are_constants,
                         const BackwardEpilogue& e, const TensorView& dy, const TensorView& x,
                         const float* mean, const float* rstd, const float* weight,
                         const TensorView& dx, float* dweight, float* dbias) {
  const int64_t count = t.batch * t.channels * t.spatial, ng = t.batch * t.groups;
  auto g = widen(dy, count);
  const auto xd = widen(x, count), wd = widen_floats(weight, t.channels);
  const auto md = widen_floats(mean, ng), rd = widen_floats(rstd, ng);
  if (e.activation == Activation::relu) {
    const auto yd = widen(e.y, count);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = yd[i] > 0 ? g[i] : 0.0;
  } else if (e.activation == Activation::silu) {
    // z recomputed as the forward made it, from the saved statistics.
    const auto bd = widen_floats(e.bias.empty() ? nullptr : e.bias.data(), t.channels);
    std::vector<double> z(xd.size());
    group_norm_apply<double>(t, xd.data(), md.data(), rd.data(), weight ? wd.data() : nullptr,
                             e.bias.empty() ? nullptr : bd.data(), z.data());
    const auto r = widen(e.residual, count);  // zeros when absent
    for (std::size_t i = 0; i < g.size(); ++i) g[i] *= silu_derivative(z[i] + r[i]);
  }
  narrow(g, e.dresidual);
  const auto channels = static_cast<std::size_t>(t.channels);
  std::vector<double> dxd(xd.size()), dwd(channels), dbd(channels);
  group_norm_backward<double>(t, stats_are_constants, g.data(), xd.data(), md.data(), rd.data(),
                              weight ? wd.data() : nullptr, dxd.data(), dwd.data(), dbd.data());
  narrow(dxd, dx);
  for (int64_t c = 0; c < t.channels; ++c) {
    if (dweight) dweight[c] = float(dwd[c]);
    if (dbias) dbias[c] = float(dbd[c]);
  }
}

}  // namespace normkit::ref
