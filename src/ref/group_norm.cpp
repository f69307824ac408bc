#include "ref/group_norm.h"

#include <cmath>
#include <limits>

namespace normkit::ref {
namespace {

// Memory index of logical element (n, c, s).
int64_t index_of(const GroupNormShape& t, int64_t n, int64_t c, int64_t s) {
  return t.format == MemoryFormat::channels_first ? (n * t.channels + c) * t.spatial + s
                                                  : (n * t.spatial + s) * t.channels + c;
}

}  // namespace

template <typename T>
void group_norm_forward(T* y, T* mean, T* rstd, const T* x, const T* weight, const T* bias,
                        const GroupNormShape& t, double eps, T* variance) {
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
void group_norm_apply(T* y, const T* x, const T* mean, const T* rstd, const T* weight,
                      const T* bias, const GroupNormShape& t) {
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
void group_norm_backward(T* dx, T* dweight, T* dbias, const T* dy, const T* x, const T* mean,
                         const T* rstd, const T* weight, const GroupNormShape& t,
                         bool stats_are_constants) {
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
  template void group_norm_forward<T>(T*, T*, T*, const T*, const T*, const T*,                \
                                      const GroupNormShape&, double, T*);                      \
  template void group_norm_apply<T>(T*, const T*, const T*, const T*, const T*, const T*,      \
                                    const GroupNormShape&);                                    \
  template void group_norm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const T*,     \
                                       const T*, const GroupNormShape&, bool);
NORMKIT_REF_GROUP_NORM(float)
NORMKIT_REF_GROUP_NORM(double)
#undef NORMKIT_REF_GROUP_NORM

}  // namespace normkit::ref
