#include "ref/batch_renorm.h"

#include <algorithm>
#include <cmath>

#include "common/dtype.h"
#include "ref/activation.h"
#include "ref/element_access.h"

namespace normkit::ref {
namespace {

using plan::BackwardEpilogueOf;
using plan::BatchNormShape;
using plan::ForwardEpilogueOf;

using access::at;
using access::load;
using access::offset;
using access::store;

}  // namespace

template <typename A, typename P>
void batch_renorm_forward_training(const BatchNormShape& sh, double eps, double momentum,
                                   double r_max, double d_max,
                                   const ForwardEpilogueOf<A>& epilogue, const A* x,
                                   const P* weight, const P* bias, A* y, P* save_mean,
                                   P* save_invstd, P* save_r, P* save_d, P* running_mean,
                                   P* running_var) {
  const int64_t count = sh.batch * sh.spatial;
  if (count == 0) return;
  for (int64_t c = 0; c < sh.channels; ++c) {
    double sum = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) sum += load(x, offset(sh, n, c, s));
    const double mean = sum / count;
    double squares = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const double d = load(x, offset(sh, n, c, s)) - mean;
        squares += d * d;
      }
    const double sigma = std::sqrt(squares / count + eps);
    // r and d against the running statistics before this batch updates them.
    const double sigma_run = std::sqrt(static_cast<double>(running_var[c]) + eps);
    const double r = std::clamp(sigma / sigma_run, 1.0 / r_max, r_max);
    const double d = std::clamp((mean - static_cast<double>(running_mean[c])) / sigma_run,
                                -d_max, d_max);
    const double w = at(weight, c, 1.0), b = at(bias, c, 0.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        double v = w * ((load(x, i) - mean) / sigma * r + d) + b;
        if (epilogue.residual) v += load(epilogue.residual, i);
        store(y, i, activate(epilogue.activation, v));
      }
    save_mean[c] = static_cast<P>(mean);
    save_invstd[c] = static_cast<P>(1.0 / sigma);
    save_r[c] = static_cast<P>(r);
    save_d[c] = static_cast<P>(d);
    const double unbiased = squares / (count - 1);
    running_mean[c] = static_cast<P>((1 - momentum) * running_mean[c] + momentum * mean);
    running_var[c] = static_cast<P>((1 - momentum) * running_var[c] + momentum * unbiased);
  }
}

// With g the upstream gradient (dy times the epilogue's activation derivative at
// z = weight * (xhat * r + d) + bias + residual), xhat = (x - mean) * invstd, M values:
//   dbias   = sum(g)
//   dweight = sum(g * (xhat * r + d))
//   dx = weight * r * invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M)
// i.e. BatchNorm's dx with the weight weight * r: r and d carry no gradient.
template <typename A, typename P>
void batch_renorm_backward_training(const BatchNormShape& sh,
                                    const BackwardEpilogueOf<A>& e, const A* dy, const A* x,
                                    const P* save_mean, const P* save_invstd, const P* save_r,
                                    const P* save_d, const P* weight, A* dx, P* dweight,
                                    P* dbias) {
  const int64_t count = sh.batch * sh.spatial;
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mean = count ? static_cast<double>(save_mean[c]) : 0.0;
    const double invstd = count ? static_cast<double>(save_invstd[c]) : 0.0;
    const double r = count ? static_cast<double>(save_r[c]) : 0.0;
    const double d = count ? static_cast<double>(save_d[c]) : 0.0;
    const double w = at(weight, c, 1.0);
    auto upstream = [&](int64_t i) {
      double g = load(dy, i);
      if (e.relu() && !(load(e.y, i) > 0)) g = 0;
      if (e.silu()) {
        double z = w * ((load(x, i) - mean) * invstd * r + d) + (e.bias ? double(e.bias[c]) : 0.0);
        if (e.residual) z += load(e.residual, i);
        g *= silu_derivative(z);
      }
      return g;
    };
    double sum_g = 0, sum_g_xhat = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double g = upstream(i);
        sum_g += g;
        sum_g_xhat += g * ((load(x, i) - mean) * invstd);
      }
    if (dbias) dbias[c] = static_cast<P>(sum_g);
    if (dweight) dweight[c] = static_cast<P>(r * sum_g_xhat + d * sum_g);
    if (count == 0) continue;
    const double scale = w * r * invstd;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double g = upstream(i);
        const double xhat = (load(x, i) - mean) * invstd;
        store(dx, i, scale * (g - sum_g / count - xhat * sum_g_xhat / count));
        if (e.dresidual) store(e.dresidual, i, g);
      }
  }
}

#define NORMKIT_INSTANTIATE(A, P)                                                              \
  template void batch_renorm_forward_training<A, P>(                                           \
      const BatchNormShape&, double, double, double, double, const ForwardEpilogueOf<A>&,      \
      const A*, const P*, const P*, A*, P*, P*, P*, P*, P*, P*);                               \
  template void batch_renorm_backward_training<A, P>(                                          \
      const BatchNormShape&, const BackwardEpilogueOf<A>&, const A*, const A*, const P*,       \
      const P*, const P*, const P*, const P*, A*, P*, P*);
NORMKIT_INSTANTIATE(float, float)
NORMKIT_INSTANTIATE(double, double)
NORMKIT_INSTANTIATE(bf16, float)
NORMKIT_INSTANTIATE(f16, float)
#undef NORMKIT_INSTANTIATE

}  // namespace normkit::ref
