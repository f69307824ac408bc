// Conv2d: forward against a direct float64 convolution; backward by finite differences; the
// same bits for every thread count.
#include <gtest/gtest.h>

#include "nn/conv.h"
#include "nn/parallel.h"
#include "normkit/error.h"
#include "nn_test_util.h"

namespace normkit::train::test {
namespace {

struct Geometry {
  int n, h, w, cin, cout, kernel, stride;
};

// y[n, oh, ow, co] = sum over (kh, kw, ci) of x[n, oh*s - p + kh, ow*s - p + kw, ci] * w[co, kh, kw, ci]
std::vector<double> direct_conv(const Geometry& g, const Tensor& x, const std::vector<float>& w,
                                int64_t oh, int64_t ow) {
  const int pad = g.kernel / 2;
  std::vector<double> y(static_cast<size_t>(g.n * oh * ow * g.cout), 0.0);
  for (int n = 0; n < g.n; ++n)
    for (int64_t i = 0; i < oh; ++i)
      for (int64_t j = 0; j < ow; ++j)
        for (int co = 0; co < g.cout; ++co) {
          double s = 0;
          for (int kh = 0; kh < g.kernel; ++kh)
            for (int kw = 0; kw < g.kernel; ++kw) {
              const int64_t ih = i * g.stride - pad + kh, iw = j * g.stride - pad + kw;
              if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
              for (int ci = 0; ci < g.cin; ++ci)
                s += static_cast<double>(x.data[((n * g.h + ih) * g.w + iw) * g.cin + ci]) *
                     w[((co * g.kernel + kh) * g.kernel + kw) * g.cin + ci];
            }
          y[((n * oh + i) * ow + j) * g.cout + co] = s;
        }
  return y;
}

class ConvTest : public ::testing::TestWithParam<Geometry> {
 protected:
  // One thread: these check the math; SameBitsForEveryThreadCount checks the threading.
  void SetUp() override { set_threads(1); }
};

TEST_P(ConvTest, ForwardMatchesDirectConvolution) {
  const Geometry g = GetParam();
  std::mt19937_64 rng(11);
  Conv2d conv("c", g.cin, g.cout, g.kernel, g.stride);
  conv.weight.value = random_vector(conv.weight.size(), rng);
  const Tensor x = random_tensor(g.n, g.h, g.w, g.cin, rng);
  const Tensor& y = conv.forward(x);
  const int64_t oh = (g.h + 2 * (g.kernel / 2) - g.kernel) / g.stride + 1;
  const int64_t ow = (g.w + 2 * (g.kernel / 2) - g.kernel) / g.stride + 1;
  ASSERT_EQ(y.n, g.n);
  ASSERT_EQ(y.h, oh);
  ASSERT_EQ(y.w, ow);
  ASSERT_EQ(y.c, g.cout);
  const std::vector<double> want = direct_conv(g, x, conv.weight.value, oh, ow);
  double err = 0;
  for (size_t i = 0; i < want.size(); ++i) err = std::max(err, std::fabs(y.data[i] - want[i]));
  EXPECT_LT(err, 1e-5 * std::sqrt(static_cast<double>(g.kernel * g.kernel * g.cin)));
}

TEST_P(ConvTest, BackwardMatchesFiniteDifferences) {
  const Geometry g = GetParam();
  std::mt19937_64 rng(12);
  Conv2d conv("c", g.cin, g.cout, g.kernel, g.stride);
  conv.weight.value = random_vector(conv.weight.size(), rng);
  Tensor x = random_tensor(g.n, g.h, g.w, g.cin, rng);
  const Tensor& y0 = conv.forward(x);
  const std::vector<float> r = random_vector(static_cast<size_t>(y0.numel()), rng);
  Tensor dy;
  dy.resize_like(y0);
  dy.data = r;
  // Poison the outputs: every element must be overwritten.
  std::fill(conv.weight.grad.begin(), conv.weight.grad.end(), 1e30f);
  const Tensor& dx = conv.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  const std::vector<float> dw_copy = conv.weight.grad;
  ASSERT_EQ(dx.numel(), x.numel());
  auto loss = [&] { return dot(conv.forward(x), r); };
  // Convolution is linear in x and in w, so a large step is exact up to rounding.
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, x.data, dx_copy, 1e-2), 1e-3, "dx");
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, conv.weight.value, dw_copy, 1e-2), 1e-3, "dw");
}

TEST_P(ConvTest, SameBitsForEveryThreadCount) {
  const Geometry g = GetParam();
  std::mt19937_64 rng(13);
  Conv2d conv("c", g.cin, g.cout, g.kernel, g.stride);
  conv.weight.value = random_vector(conv.weight.size(), rng);
  const Tensor x = random_tensor(g.n, g.h, g.w, g.cin, rng);
  std::vector<std::vector<float>> results;
  for (int t : {1, 2, 3, 5}) {
    set_threads(t);
    const Tensor& y = conv.forward(x);
    std::vector<float> all(y.data.begin(), y.data.begin() + y.numel());
    Tensor dy;
    dy.resize_like(y);
    std::mt19937_64 rng_dy(5);
    dy.data = random_vector(static_cast<size_t>(y.numel()), rng_dy);
    std::fill(conv.weight.grad.begin(), conv.weight.grad.end(), 1e30f);  // must be overwritten
    const Tensor& dx = conv.backward(dy);
    all.insert(all.end(), dx.data.begin(), dx.data.begin() + dx.numel());
    all.insert(all.end(), conv.weight.grad.begin(), conv.weight.grad.end());
    results.push_back(all);
  }
  set_threads(1);
  for (size_t i = 1; i < results.size(); ++i)
    EXPECT_TRUE(results[i] == results[0]) << "configuration " << i << " differs";
}

TEST_P(ConvTest, BackwardAddsOntoAGivenGradient) {
  const Geometry g = GetParam();
  std::mt19937_64 rng(14);
  Conv2d conv("c", g.cin, g.cout, g.kernel, g.stride);
  conv.weight.value = random_vector(conv.weight.size(), rng);
  const Tensor x = random_tensor(g.n, g.h, g.w, g.cin, rng);
  const Tensor& y = conv.forward(x);
  Tensor dy = random_tensor(y.n, y.h, y.w, y.c, rng);
  const Tensor base = random_tensor(x.n, x.h, x.w, x.c, rng);
  const Tensor plain = conv.backward(dy);  // a copy
  const std::vector<float> dw = conv.weight.grad;
  const Tensor& sum = conv.backward(dy, true, &base);
  ASSERT_TRUE(sum.same_shape(x));
  for (int64_t i = 0; i < x.numel(); ++i)
    ASSERT_NEAR(sum.data[i], plain.data[i] + base.data[i], 1e-5 * (1 + std::fabs(plain.data[i])));
  EXPECT_EQ(conv.weight.grad, dw);
  Tensor wrong;
  wrong.resize(x.n, x.h + 1, x.w, x.c);
  EXPECT_THROW(conv.backward(dy, true, &wrong), normkit::Error);
}

// Odd sizes; the kernels and strides the model uses; a batch whose GEMM is split over threads.
// Stride 1 with fewer than 4 input channels runs im2col, with 4 or more the tap-by-tap route: also
// with a single output channel, with a 5x5 kernel (padding 2) and with 24 channels.
INSTANTIATE_TEST_SUITE_P(Geometries, ConvTest,
                         ::testing::Values(Geometry{2, 7, 5, 3, 5, 3, 1},
                                           Geometry{2, 5, 6, 4, 1, 3, 1},
                                           Geometry{2, 7, 6, 5, 4, 5, 1},
                                           Geometry{3, 5, 4, 24, 5, 3, 1},
                                           Geometry{3, 9, 6, 4, 6, 3, 2},
                                           Geometry{2, 7, 8, 3, 4, 1, 2},
                                           Geometry{2, 5, 5, 6, 3, 1, 1},
                                           Geometry{1, 6, 7, 1, 8, 3, 1},
                                           Geometry{4, 12, 11, 8, 16, 3, 1}));

TEST(Conv, RejectsBadGeometryAndInput) {
  EXPECT_THROW(Conv2d("c", 0, 4, 3, 1), normkit::Error);
  EXPECT_THROW(Conv2d("c", 2, 4, 2, 1), normkit::Error);
  EXPECT_THROW(Conv2d("c", 2, 4, 3, 0), normkit::Error);
  Conv2d conv("c", 3, 4, 3, 1);
  Tensor x;
  x.resize(1, 4, 4, 2);
  EXPECT_THROW(conv.forward(x), normkit::Error);
}

}  // namespace
}  // namespace normkit::train::test
