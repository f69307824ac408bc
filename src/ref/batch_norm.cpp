#include "ref/batch_norm.h"

#include <cmath>
#include <vector>

#include "ref/activation.h"
#include "ref/element_access.h"

namespace normkit::ref {
namespace {

using access::at;
using access::load;
using access::offset;
using access::store;

// The forward epilogue on the normalized value v of element i.
template <typename A>
double finish(const ForwardEpilogueOf<A>& e, int64_t i, double v) {
  if (e.residual) v += load(e.residual, i);
  return activate(e.activation, v);
}

// The gradient the normalization sees at element i of channel c, whose forward normalized with
// mean, invstd and weight w: silu recomputes z = (x - mean) * invstd * w + bias + residual.
template <typename A>
double upstream(const BackwardEpilogueOf<A>& e, const A* dy, const A* x, int64_t i, int64_t c,
                double mean, double invstd, double w) {
  double g = load(dy, i);
  if (e.relu() && !(load(e.y, i) > 0)) g = 0;
  if (e.silu()) {
    double z = (load(x, i) - mean) * invstd * w + (e.bias ? double(e.bias[c]) : 0.0);
    if (e.residual) z += load(e.residual, i);
    g *= silu_derivative(z);
  }
  return g;
}

}  // namespace

template <typename A, typename P>
void batch_norm_forward_training(const BatchNormShape& sh, double eps, double momentum,
                                 const ForwardEpilogueOf<A>& epilogue, const A* x,
                                 const P* weight, const P* bias, A* y, P* save_mean,
                                 P* save_invstd, P* running_mean, P* running_var) {
  const int64_t count = sh.batch * sh.spatial;
  if (count == 0) return;
  for (int64_t c = 0; c < sh.channels; ++c) {
    // Two passes: the mean, then the centred sum of squares (never E[x^2] - E[x]^2).
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
    const double var = squares / count;
    const double invstd = 1.0 / std::sqrt(var + eps);
    const double w = at(weight, c, 1.0), b = at(bias, c, 0.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        store(y, i, finish(epilogue, i, (load(x, i) - mean) * invstd * w + b));
      }
    save_mean[c] = static_cast<P>(mean);
    save_invstd[c] = static_cast<P>(invstd);
    if (running_mean) {
      // The running variance takes the unbiased estimate, as torch does.
      const double unbiased = squares / (count - 1);
      running_mean[c] = static_cast<P>((1 - momentum) * running_mean[c] + momentum * mean);
      running_var[c] = static_cast<P>((1 - momentum) * running_var[c] + momentum * unbiased);
    }
  }
}

template <typename A, typename P>
void batch_norm_forward_inference(const BatchNormShape& sh, double eps,
                                  const ForwardEpilogueOf<A>& epilogue, const A* x,
                                  const P* weight, const P* bias, const P* running_mean,
                                  const P* running_var, A* y) {
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mean = running_mean[c];
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + eps);
    const double w = at(weight, c, 1.0), b = at(bias, c, 0.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        store(y, i, finish(epilogue, i, (load(x, i) - mean) * invstd * w + b));
      }
  }
}

// With g the upstream gradient (dy times the epilogue's activation derivative), xhat = (x - mean) * invstd
// and M = N * S values per channel:
//   dbias   = sum(g)
//   dweight = sum(g * xhat)
//   dx = weight * invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M)
// where the two subtracted terms are the gradient through the mean and through the variance.
template <typename A, typename P>
void batch_norm_backward_training(const BatchNormShape& sh, const BackwardEpilogueOf<A>& epilogue,
                                  const A* dy, const A* x, const P* save_mean,
                                  const P* save_invstd, const P* weight, A* dx, P* dweight,
                                  P* dbias) {
  const int64_t count = sh.batch * sh.spatial;
  for (int64_t c = 0; c < sh.channels; ++c) {
    double sum_dy = 0, sum_dy_xhat = 0;
    const double mean = count ? static_cast<double>(save_mean[c]) : 0.0;
    const double invstd = count ? static_cast<double>(save_invstd[c]) : 0.0;
    const double w = at(weight, c, 1.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double g = upstream(epilogue, dy, x, i, c, mean, invstd, w);
        sum_dy += g;
        sum_dy_xhat += g * ((load(x, i) - mean) * invstd);
      }
    if (dbias) dbias[c] = static_cast<P>(sum_dy);
    if (dweight) dweight[c] = static_cast<P>(sum_dy_xhat);
    if (count == 0) continue;
    const double scale = w * invstd;
    const double mean_dy = sum_dy / count, mean_dy_xhat = sum_dy_xhat / count;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double g = upstream(epilogue, dy, x, i, c, mean, invstd, w);
        const double xhat = (load(x, i) - mean) * invstd;
        store(dx, i, scale * (g - mean_dy - xhat * mean_dy_xhat));
        if (epilogue.dresidual) store(epilogue.dresidual, i, g);
      }
  }
}

template <typename A, typename P>
void batch_norm_backward_inference(const BatchNormShape& sh, double eps,
                                   const BackwardEpilogueOf<A>& epilogue, const A* dy,
                                   const A* x, const P* running_mean, const P* running_var,
                                   const P* weight, A* dx, P* dweight, P* dbias) {
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mean = running_mean[c];
    const double invstd = 1.0 / std::sqrt(static_cast<double>(running_var[c]) + eps);
    const double scale = at(weight, c, 1.0) * invstd;
    double sum_dy = 0, sum_dy_xhat = 0;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double g = upstream(epilogue, dy, x, i, c, mean, invstd, at(weight, c, 1.0));
        sum_dy += g;
        sum_dy_xhat += g * ((load(x, i) - mean) * invstd);
        store(dx, i, g * scale);
        if (epilogue.dresidual) store(epilogue.dresidual, i, g);
      }
    if (dbias) dbias[c] = static_cast<P>(sum_dy);
    if (dweight) dweight[c] = static_cast<P>(sum_dy_xhat);
  }
}

#define NORMKIT_INSTANTIATE(A, P)                                                              \
  template void batch_norm_forward_training<A, P>(const BatchNormShape&, double, double,       \
                                                  const ForwardEpilogueOf<A>&, const A*,       \
                                                  const P*, const P*, A*, P*, P*, P*, P*);     \
  template void batch_norm_forward_inference<A, P>(const BatchNormShape&, double,              \
                                                   const ForwardEpilogueOf<A>&, const A*,      \
                                                   const P*, const P*, const P*, const P*, A*); \
  template void batch_norm_backward_training<A, P>(const BatchNormShape&,                      \
                                                   const BackwardEpilogueOf<A>&, const A*,     \
                                                   const A*, const P*, const P*, const P*, A*, \
                                                   P*, P*);                                    \
  template void batch_norm_backward_inference<A, P>(const BatchNormShape&, double,             \
                                                    const BackwardEpilogueOf<A>&, const A*,    \
                                                    const A*, const P*, const P*, const P*,    \
                                                    A*, P*, P*);
NORMKIT_INSTANTIATE(float, float)
NORMKIT_INSTANTIATE(double, double)
NORMKIT_INSTANTIATE(bf16, float)
NORMKIT_INSTANTIATE(f16, float)
#undef NORMKIT_INSTANTIATE

template <typename A>
void batch_norm_sample_statistics(const BatchNormShape& sh, const A* x, double* mean,
                                  double* m2) {
  if (sh.spatial == 0) return;
  for (int64_t n = 0; n < sh.batch; ++n)
    for (int64_t c = 0; c < sh.channels; ++c) {
      double sum = 0;
      for (int64_t s = 0; s < sh.spatial; ++s) sum += load(x, offset(sh, n, c, s));
      const double mu = sum / double(sh.spatial);
      double squares = 0;
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const double d = load(x, offset(sh, n, c, s)) - mu;
        squares += d * d;
      }
      mean[n * sh.channels + c] = mu;
      m2[n * sh.channels + c] = squares;
    }
}

template <typename A>
void batch_norm_sample_gradients(const BatchNormShape& sh, const BackwardEpilogueOf<A>& epilogue,
                                 const A* dy, const A* x, const float* mean, double* sum_g,
                                 double* sum_g_xmu) {
  for (int64_t n = 0; n < sh.batch; ++n)
    for (int64_t c = 0; c < sh.channels; ++c) {
      double sg = 0, sgx = 0;
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        // The steps refuse silu, so g needs no z here.
        const double g = upstream(epilogue, dy, x, i, c, 0.0, 0.0, 0.0);
        sg += g;
        sgx += g * (load(x, i) - double(mean[c]));
      }
      sum_g[n * sh.channels + c] = sg;
      sum_g_xmu[n * sh.channels + c] = sgx;
    }
}

template <typename A>
void batch_norm_normalize(const BatchNormShape& sh, const ForwardEpilogueOf<A>& epilogue,
                          const A* x, const float* weight, const float* bias, const float* mean,
                          const float* invstd, A* y) {
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mu = mean[c], is = invstd[c];
    const double w = at(weight, c, 1.0), b = at(bias, c, 0.0);
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        store(y, i, finish(epilogue, i, (load(x, i) - mu) * is * w + b));
      }
  }
}

// As batch_norm_backward_training, with the sums over the global batch given:
//   dx = weight * invstd * (g - sum(g) / M - (x - mean) * invstd^2 * sum(g * (x - mean)) / M)
template <typename A>
void batch_norm_backward_dx(const BatchNormShape& sh, const BackwardEpilogueOf<A>& epilogue,
                            double count, const A* dy, const A* x, const float* mean,
                            const float* invstd, const float* weight, const double* sum_g,
                            const double* sum_g_xmu, A* dx) {
  for (int64_t c = 0; c < sh.channels; ++c) {
    const double mu = mean[c], is = invstd[c];
    const double scale = at(weight, c, 1.0) * is;
    const double mean_g = sum_g[c] / count, mean_gx = sum_g_xmu[c] / count;
    for (int64_t n = 0; n < sh.batch; ++n)
      for (int64_t s = 0; s < sh.spatial; ++s) {
        const int64_t i = offset(sh, n, c, s);
        const double g = upstream(epilogue, dy, x, i, c, mu, is, at(weight, c, 1.0));
        const double d = load(x, i) - mu;
        store(dx, i, scale * (g - mean_g - d * is * is * mean_gx));
        if (epilogue.dresidual) store(epilogue.dresidual, i, g);
      }
  }
}

#define NORMKIT_INSTANTIATE_STEPS(A)                                                           \
  template void batch_norm_sample_statistics<A>(const BatchNormShape&, const A*, double*,      \
                                                double*);                                      \
  template void batch_norm_sample_gradients<A>(const BatchNormShape&,                          \
                                               const BackwardEpilogueOf<A>&, const A*,         \
                                               const A*, const float*, double*, double*);      \
  template void batch_norm_normalize<A>(const BatchNormShape&, const ForwardEpilogueOf<A>&,    \
                                        const A*, const float*, const float*, const float*,    \
                                        const float*, A*);                                     \
  template void batch_norm_backward_dx<A>(const BatchNormShape&, const BackwardEpilogueOf<A>&, \
                                          double, const A*, const A*, const float*,            \
                                          const float*, const float*, const double*,           \
                                          const double*, A*);
NORMKIT_INSTANTIATE_STEPS(float)
NORMKIT_INSTANTIATE_STEPS(bf16)
NORMKIT_INSTANTIATE_STEPS(f16)
#undef NORMKIT_INSTANTIATE_STEPS

}  // namespace normkit::ref
