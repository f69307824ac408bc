// FrozenBatchNorm: forward and backward against a float64 computation of the per-channel affine
// map y = x * a[c] + b[c] (torchvision.ops.FrozenBatchNorm2d's formula), for every activation
// dtype, both memory formats, ranks 2 to 5 with odd sizes, with and without the fused epilogue
// and the parameter gradients; train and eval alike; nothing updated; x not read by a backward
// without parameter gradients; rejected arguments.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "normkit/layers.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit {
namespace {

using test::expect_error;
using test::from_format;
using test::random_normal;
using test::to_format;

// Relative size of one rounding of the activation type.
template <typename A> double unit_roundoff() {
  if constexpr (std::is_same_v<A, float>) return 0x1p-24;
  if constexpr (std::is_same_v<A, bf16>) return 0x1p-9;
  return 0x1p-12;
}

template <typename A> std::vector<A> stored(const std::vector<float>& logical) {
  std::vector<A> out(logical.size());
  for (std::size_t i = 0; i < logical.size(); ++i) out[i] = from_float<A>(logical[i]);
  return out;
}
template <typename A> std::vector<float> loaded(const std::vector<A>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_float(v[i]);
  return out;
}

struct Shape {
  std::vector<int64_t> dims;
  int64_t n() const { return dims[0]; }
  int64_t c() const { return dims[1]; }
  int64_t s() const {
    int64_t s = 1;
    for (std::size_t i = 2; i < dims.size(); ++i) s *= dims[i];
    return s;
  }
  int64_t numel() const { return n() * c() * s(); }
};

const Shape kShapes[] = {{{3, 5}}, {{2, 7, 9}}, {{2, 3, 5, 7}}, {{1, 3, 2, 3, 5}}, {{1, 1, 1}}};

// Random frozen statistics and parameters, as loaded from a trained model.
void load_random_model(FrozenBatchNorm& layer, std::mt19937_64& rng) {
  const int64_t c = layer.num_channels();
  layer.weight = random_normal(c, rng, 1.0, 0.5);
  layer.bias = random_normal(c, rng, 0.0, 0.5);
  layer.running_mean = random_normal(c, rng, 0.3, 1.0);
  std::uniform_real_distribution<double> u(0.2, 3.0);
  for (auto& v : layer.running_var) v = float(u(rng));
}

template <typename A>
void check_case(std::mt19937_64& rng, const Shape& sh, MemoryFormat format, bool epilogue,
                bool parameter_grads) {
  const int64_t N = sh.n(), C = sh.c(), S = sh.s(), count = sh.numel();
  const std::string what = std::string(to_string(dtype_of<A>())) + " " + to_string(format) +
                           " rank " + std::to_string(sh.dims.size()) +
                           (epilogue ? " residual+relu" : "") +
                           (parameter_grads ? " parameter_grads" : "");
  FrozenBatchNorm layer(C, {.eps = 1e-3, .parameter_grads = parameter_grads});
  load_random_model(layer, rng);
  const FrozenBatchNorm before = layer;

  // Logical (channels-first) values, exactly representable in A.
  const std::vector<float> x_l = loaded(stored<A>(random_normal(count, rng, 0.3, 1.5)));
  const std::vector<float> r_l = loaded(stored<A>(random_normal(count, rng, 0.0, 1.0)));
  const std::vector<float> dy_l = loaded(stored<A>(random_normal(count, rng, 0.0, 1.0)));
  const std::vector<A> x = to_format(stored<A>(x_l), N, C, S, format);
  const std::vector<A> residual = to_format(stored<A>(r_l), N, C, S, format);
  const std::vector<A> dy = to_format(stored<A>(dy_l), N, C, S, format);
  std::vector<A> y(count, from_float<A>(std::nanf(""))), y_eval = y;
  std::vector<A> dx = y, dresidual = y;
  const int rank = int(sh.dims.size());
  auto view = [&](const std::vector<A>& v) {
    return TensorView(v.data(), dtype_of<A>(), rank, sh.dims.data(), format);
  };
  ForwardEpilogue fe;
  if (epilogue) fe = {.activation = Activation::relu, .residual = view(residual)};

  layer.eval();
  layer.forward(view(x), fe, view(y_eval));
  layer.train();
  layer.forward(view(x), fe, view(y));
  ASSERT_TRUE(test::bitwise_equal(loaded(y), loaded(y_eval))) << what << ": train != eval";
  EXPECT_EQ(layer.running_mean, before.running_mean) << what;
  EXPECT_EQ(layer.running_var, before.running_var) << what;
  if (parameter_grads) {
    layer.weight_grad.assign(C, std::nanf(""));
    layer.bias_grad.assign(C, std::nanf(""));
  } else {
    EXPECT_TRUE(layer.weight_grad.empty() && layer.bias_grad.empty()) << what;
  }
  layer.backward(view(dy), view(dx), epilogue ? view(dresidual) : TensorView{});

  const std::vector<float> y_l = from_format(loaded(y), N, C, S, format);
  const std::vector<float> dx_l = from_format(loaded(dx), N, C, S, format);
  const std::vector<float> dres_l = from_format(loaded(dresidual), N, C, S, format);
  const double u = unit_roundoff<A>();
  std::vector<double> dweight(C, 0.0), dbias(C, 0.0), dweight_mag(C, 0.0), dbias_mag(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    const double invstd = 1.0 / std::sqrt(double(layer.running_var[c]) + 1e-3);
    const double a = layer.weight[c] * invstd;
    const double b = layer.bias[c] - layer.running_mean[c] * a;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t i = (n * C + c) * S + s;
        double want = x_l[i] * a + b;
        double size = std::fabs(x_l[i] * a) + std::fabs(layer.running_mean[c] * a) +
                      std::fabs(layer.bias[c]);
        if (epilogue) {
          want = std::max(want + r_l[i], 0.0);
          size += std::fabs(r_l[i]);
        }
        // A few float32 roundings inside, one rounding to A at the end.
        ASSERT_NEAR(y_l[i], want, 2 * u * std::fabs(want) + 1e-6 * size + 1e-30)
            << what << " y[" << i << "]";
        // The ReLU's mask is the sign of the y the forward wrote.
        const double g = epilogue && !(y_l[i] > 0) ? 0.0 : double(dy_l[i]);
        ASSERT_NEAR(dx_l[i], g * a, 2 * u * std::fabs(g * a) + 1e-30) << what << " dx[" << i << "]";
        if (epilogue) ASSERT_EQ(dres_l[i], g) << what << " dresidual[" << i << "]";
        const double xhat = (x_l[i] - double(layer.running_mean[c])) * invstd;
        dweight[c] += g * xhat;
        dbias[c] += g;
        dweight_mag[c] += std::fabs(g * xhat);
        dbias_mag[c] += std::fabs(g);
      }
    if (parameter_grads) {
      EXPECT_NEAR(layer.weight_grad[c], dweight[c], 1e-5 * dweight_mag[c] + 1e-30) << what;
      EXPECT_NEAR(layer.bias_grad[c], dbias[c], 1e-5 * dbias_mag[c] + 1e-30) << what;
    }
  }
}

TEST(FrozenBatchNormLayer, IsTheFrozenAffineMapForEveryDtypeFormatAndEpilogue) {
  std::mt19937_64 rng(17);
  for (const Shape& sh : kShapes)
    for (MemoryFormat format : {MemoryFormat::channels_first, MemoryFormat::channels_last})
      for (bool epilogue : {false, true})
        for (bool grads : {false, true}) {
          check_case<float>(rng, sh, format, epilogue, grads);
          check_case<bf16>(rng, sh, format, epilogue, grads);
          check_case<f16>(rng, sh, format, epilogue, grads);
        }
}

TEST(FrozenBatchNormLayer, StartsAsTorchvisionDoes) {
  FrozenBatchNorm layer(3);
  EXPECT_EQ(layer.options.eps, 1e-5);
  EXPECT_FALSE(layer.options.parameter_grads);
  EXPECT_TRUE(layer.affine());
  EXPECT_EQ(layer.weight, std::vector<float>(3, 1.0f));
  EXPECT_EQ(layer.bias, std::vector<float>(3, 0.0f));
  EXPECT_EQ(layer.running_mean, std::vector<float>(3, 0.0f));
  EXPECT_EQ(layer.running_var, std::vector<float>(3, 1.0f));
  EXPECT_TRUE(layer.weight_grad.empty());
  EXPECT_TRUE(layer.bias_grad.empty());
  FrozenBatchNorm with_grads(3, {.parameter_grads = true});
  EXPECT_EQ(with_grads.weight_grad.size(), 3u);
  EXPECT_EQ(with_grads.bias_grad.size(), 3u);
}

// Without parameter gradients the backward needs only dy and the frozen scale: x may be gone.
TEST(FrozenBatchNormLayer, BackwardWithoutParameterGradsDoesNotReadX) {
  std::mt19937_64 rng(23);
  FrozenBatchNorm layer(5);
  load_random_model(layer, rng);
  std::vector<float> x = random_normal(2 * 5 * 7, rng), y(x.size());
  const std::vector<float> dy = random_normal(x.size(), rng);
  std::vector<float> dx(x.size(), std::nanf(""));
  layer.forward(TensorView(x.data(), {2, 5, 7}), TensorView(y.data(), {2, 5, 7}));
  x.assign(x.size(), std::nanf(""));
  layer.backward(TensorView(dy.data(), {2, 5, 7}), TensorView(dx.data(), {2, 5, 7}));
  for (int64_t n = 0; n < 2; ++n)
    for (int64_t c = 0; c < 5; ++c)
      for (int64_t s = 0; s < 7; ++s) {
        const int64_t i = (n * 5 + c) * 7 + s;
        const double a = layer.weight[c] / std::sqrt(double(layer.running_var[c]) + 1e-5);
        EXPECT_NEAR(dx[i], dy[i] * a, 1e-6 * std::fabs(dy[i] * a)) << i;
      }
}

TEST(FrozenBatchNormLayer, RejectsBadArguments) {
  expect_error([] { FrozenBatchNorm(-1); }, {"FrozenBatchNorm", "num_channels must be >= 0"});
  expect_error([] { FrozenBatchNorm(3, {.eps = -1.0}); },
               {"FrozenBatchNorm", "eps must be finite and >= 0, got -1"});
  FrozenBatchNorm layer(3);
  std::vector<float> x(2 * 4), y(2 * 4, test::kPoison);
  expect_error([&] { layer.forward(TensorView(x.data(), {2, 4}), TensorView(y.data(), {2, 4})); },
               {"FrozenBatchNorm.forward", "x has 4 channels", "expected num_channels = 3"});
  expect_error([&] { layer.backward(TensorView(x.data(), {2, 3}), TensorView(y.data(), {2, 3})); },
               {"FrozenBatchNorm.backward", "called before any forward"});
  layer.options.eps = std::nan("");
  expect_error([&] { layer.forward(TensorView(x.data(), {2, 3}), TensorView(y.data(), {2, 3})); },
               {"eps must be finite and >= 0, got nan"});
  for (float v : y) EXPECT_EQ(v, test::kPoison);
}

}  // namespace
}  // namespace normkit
