#include "ref/batch_norm.h"

#include <cmath>
#include <vector>

namespace normkit::ref {
namespace {

// Position of element (n, c, s) in either memory format.
int64_t offset(const BatchNormShape& sh, int64_t n, int64_t c, int64_t s) {
  return sh.format == MemoryFormat::channels_first ? (n * sh.channels + c) * sh.spatial + s
                                                   : (n * sh.spatial + s) * sh.channels + c;
}

template <typename T>
double at(const T* v, int64_t i, double absent) {
  return v ? static_cast<double>(v[i]) : absent;
}

}  // namespace

template <typename T>
void batch_norm_forward_training(T* y, T* save_mean, T* save_invstd, T* running_mean,
                                 T* running_var, const T* x, const T* weight, const T* bias,
                                 const BatchNormShape& sh, double eps, double momentum) {
  const int64_t count = sh.batch * sh.spatial;
  if (count == 0) return;
  for (int64_t c = 0; c < sh.channels; ++c) {
    // Two passes: the mean, then the centred sum of squares (never E[x^2] - E[x]^2).
    double sum = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) sum += x[offset(sh, n, c, s)];
    const double mean = sum / count;
    double squares = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const double d = x[offset(sh, n, c, s)] - mean;
        squares += d * d;
      }
    const double var = squares / count;
    const double invstd = 1.0 / std::sqrt(var + eps);
    const double w = at(weight, c, 1.0), b = at(bias, c, 0.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        y[i] = static_cast<T>((x[i] - mean) * invstd * w + b);
      }
    save_mean[c] = static_cast<T>(mean);
    save_invstd[c] = static_cast<T>(invstd);
    if (running_mean) {
      // The running variance takes the unbiased estimate, as torch does.
      const double unbiased = squares / (count - 1);
      running_mean[c] = static_cast<T>((1 - momentum) * running_mean[c] + momentum * mean);
      running_var[c] = static_cast<T>((1 - momentum) * running_var[c] + momentum * unbiased);
    }
  }
}

template <typename T>
void batch_norm_forward_inference(T* y, const T* x, const T* weight, const T* bias,
                                  const T* running_mean, const T* running_var,
                                  const BatchNormShape& sh, double eps) {
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mean = running_mean[c];
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + eps);
    const double w = at(weight, c, 1.0), b = at(bias, c, 0.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        y[i] = static_cast<T>((x[i] - mean) * invstd * w + b);
      }
  }
}

// With xhat = (x - mean) * invstd and M = N * S values per channel:
//   dbias   = sum(dy)
//   dweight = sum(dy * xhat)
//   dx = weight * invstd * (dy - sum(dy) / M - xhat * sum(dy * xhat) / M)
// where the two subtracted terms are the gradient through the mean and through the variance.
template <typename T>
void batch_norm_backward_training(T* dx, T* dweight, T* dbias, const T* dy, const T* x,
                                  const T* save_mean, const T* save_invstd, const T* weight,
                                  const BatchNormShape& sh) {
  const int64_t count = sh.batch * sh.spatial;
  for (int64_t c = 0; c < sh.channels; ++c) {
    double sum_dy = 0, sum_dy_xhat = 0;
    const double mean = count ? static_cast<double>(save_mean[c]) : 0.0;
    const double invstd = count ? static_cast<double>(save_invstd[c]) : 0.0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        sum_dy += dy[i];
        sum_dy_xhat += dy[i] * ((x[i] - mean) * invstd);
      }
    if (dbias) dbias[c] = static_cast<T>(sum_dy);
    if (dweight) dweight[c] = static_cast<T>(sum_dy_xhat);
    if (count == 0) continue;
    const double scale = at(weight, c, 1.0) * invstd;
    const double mean_dy = sum_dy / count, mean_dy_xhat = sum_dy_xhat / count;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double xhat = (x[i] - mean) * invstd;
        dx[i] = static_cast<T>(scale * (dy[i] - mean_dy - xhat * mean_dy_xhat));
      }
  }
}

template <typename T>
void batch_norm_backward_inference(T* dx, T* dweight, T* dbias, const T* dy, const T* x,
                                   const T* running_mean, const T* running_var, const T* weight,
                                   const BatchNormShape& sh, double eps) {
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mean = running_mean[c];
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + eps);
    const double scale = at(weight, c, 1.0) * invstd;
    double sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        sum_dy += dy[i];
        sum_dy_xhat += dy[i] * ((x[i] - mean) * invstd);
        dx[i] = static_cast<T>(dy[i] * scale);
      }
    if (dbias) dbias[c] = static_cast<T>(sum_dy);
    if (dweight) dweight[c] = static_cast<T>(sum_dy_xhat);
  }
}

#define NORMKIT_INSTANTIATE(T)                                                                  \
  template void batch_norm_forward_training<T>(T*, T*, T*, T*, T*, const T*, const T*,         \
                                               const T*, const BatchNormShape&, double, double); \
  template void batch_norm_forward_inference<T>(T*, const T*, const T*, const T*, const T*,    \
                                                const T*, const BatchNormShape&, double);       \
  template void batch_norm_backward_training<T>(T*, T*, T*, const T*, const T*, const T*,      \
                                                const T*, const T*, const BatchNormShape&);     \
  template void batch_norm_backward_inference<T>(T*, T*, T*, const T*, const T*, const T*,     \
                                                 const T*, const T*, const BatchNormShape&,     \
                                                 double);
NORMKIT_INSTANTIATE(float)
NORMKIT_INSTANTIATE(double)
#undef NORMKIT_INSTANTIATE

}  // namespace normkit::ref
