// The residual block and the whole model: backward by finite differences for every parameter
// (each norm kind), init rules, determinism, and a loss that falls on a small synthetic problem.
#include <gtest/gtest.h>

#include <set>

#include "nn/model.h"
#include "nn/parallel.h"
#include "nn/sgd.h"
#include "nn_test_util.h"
#include "normkit/error.h"

namespace normkit::train::test {
namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}
bool is_norm_weight(const Param& p) {
  return p.name.find("norm") != std::string::npos && ends_with(p.name, ".weight");
}
bool is_norm_bias(const Param& p) {
  return p.name.find("norm") != std::string::npos && ends_with(p.name, ".bias");
}

std::vector<uint8_t> pattern_of(const std::vector<const Tensor*>& outputs) {
  std::vector<uint8_t> p;
  for (const Tensor* t : outputs) append_pattern(p, *t);
  return p;
}

struct BlockCase {
  NormKind kind;
  int in, out, stride;
  bool relu;
};

class BlockTest : public ::testing::TestWithParam<BlockCase> {};

TEST_P(BlockTest, BackwardMatchesFiniteDifferences) {
  set_threads(1);  // the math; TrainingIsBitwiseReproducibleAcrossThreadCounts checks threads
  const BlockCase bc = GetParam();
  std::mt19937_64 rng(41);
  ResidualBlock block("b", bc.in, bc.out, bc.stride, bc.kind, 2, bc.relu);
  Rng init(7);
  block.init(init);
  // Non-zero gammas everywhere, so every parameter has a gradient to check.
  for (Param* p : block.params())
    if (is_norm_weight(*p)) p->value = random_vector(p->size(), rng, 0.3, 1.0);
  // With ReLUs, few units keep the finite differences clear of the kinks; without, the block is
  // smooth and any size works.
  Tensor x = bc.relu ? random_tensor(2, 3, 2, bc.in, rng) : random_tensor(2, 5, 6, bc.in, rng);
  const Tensor& y0 = block.forward(x, Mode::train);
  const std::vector<float> r = random_vector(static_cast<size_t>(y0.numel()), rng);
  Tensor dy;
  dy.resize_like(y0);
  dy.data = r;
  const Tensor& dx = block.backward(dy);
  const std::vector<float> dx_copy(dx.data.begin(), dx.data.begin() + dx.numel());
  std::vector<std::vector<float>> grads;
  for (Param* p : block.params()) grads.push_back(p->grad);
  auto loss = [&] { return dot(block.forward(x, Mode::train), r); };
  std::function<std::vector<uint8_t>()> pattern;
  if (bc.relu)
    pattern = [&] {
      std::vector<const Tensor*> outs;
      block.relu_outputs(outs);
      return pattern_of(outs);
    };
  const double h = 1e-3;
  EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, x.data, dx_copy, h), 3e-2, "dx");
  const auto params = block.params();
  for (size_t i = 0; i < params.size(); ++i)
    EXPECT_GRADIENT_CLOSE(finite_difference(loss, pattern, params[i]->value, grads[i], h), 3e-2,
                          params[i]->name);
}

INSTANTIATE_TEST_SUITE_P(Blocks, BlockTest,
                         ::testing::Values(BlockCase{NormKind::batch, 4, 4, 1, false},
                                           BlockCase{NormKind::batch, 2, 4, 2, false},
                                           BlockCase{NormKind::group, 4, 4, 1, false},
                                           BlockCase{NormKind::group, 2, 4, 2, false},
                                           BlockCase{NormKind::none, 2, 4, 2, false},
                                           BlockCase{NormKind::batch, 2, 2, 1, true},
                                           BlockCase{NormKind::batch, 2, 4, 2, true},
                                           BlockCase{NormKind::group, 2, 4, 2, true}),
                         [](const auto& info) {
                           return std::string(to_string(info.param.kind)) +
                                  (info.param.stride == 2 ? "_projection" : "_identity") +
                                  (info.param.relu ? "_relu" : "_linear");
                         });

ModelConfig small_config(NormKind kind) {
  ModelConfig c;
  c.norm = kind;
  c.groups = 2;
  c.widths = {4, 6};
  c.in_channels = 2;
  c.classes = 5;
  return c;
}

class ModelTest : public ::testing::TestWithParam<NormKind> {};

// The whole network with identity activations (smooth, so every difference is exact to
// rounding): checks how the layers are wired, the residual sums and the shortcut. The ReLU
// masks themselves are checked by the block and norm tests.
TEST_P(ModelTest, BackwardMatchesFiniteDifferences) {
  set_threads(1);
  std::mt19937_64 rng(42);
  ModelConfig config = small_config(GetParam());
  config.relu = false;
  Model model(config);
  model.init(5);
  for (Param* p : model.params()) {
    if (is_norm_weight(*p)) p->value = random_vector(p->size(), rng, 0.3, 1.0);
    if (is_norm_bias(*p)) p->value = random_vector(p->size(), rng, 0.3);
  }
  Tensor x = random_tensor(3, 6, 7, 2, rng);
  const uint8_t labels[3] = {4, 0, 2};
  SoftmaxCrossEntropy ce;
  ce.forward(model.forward(x, Mode::train), labels);
  model.backward(ce.gradient());
  std::vector<std::vector<float>> grads;
  for (Param* p : model.params()) grads.push_back(p->grad);
  auto loss = [&] { return ce.forward(model.forward(x, Mode::train), labels); };
  const auto params = model.params();
  for (size_t i = 0; i < params.size(); ++i) {
    // A sample of each parameter's elements keeps the test fast.
    std::vector<size_t> idx;
    for (size_t j = 0; j < params[i]->size(); j += 1 + params[i]->size() / 12) idx.push_back(j);
    EXPECT_GRADIENT_CLOSE(finite_difference(loss, {}, params[i]->value, grads[i], 2e-3, idx),
                          3e-2, params[i]->name);
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, ModelTest,
                         ::testing::Values(NormKind::batch, NormKind::group, NormKind::layer,
                                           NormKind::instance, NormKind::none),
                         [](const auto& info) { return std::string(to_string(info.param)); });

TEST(Model, DefaultShapeInitAndNames) {
  Model model(ModelConfig{});
  EXPECT_GT(model.parameter_count(), 70000);
  EXPECT_LT(model.parameter_count(), 90000);
  model.init(1);
  std::set<std::string> names;
  for (Param* p : model.params()) {
    EXPECT_TRUE(names.insert(p->name).second) << "duplicate " << p->name;
    const bool last_norm = p->name.find(".norm2.weight") != std::string::npos;
    if (is_norm_weight(*p))
      for (float v : p->value) EXPECT_EQ(v, last_norm ? 0.0f : 1.0f) << p->name;
  }
  EXPECT_EQ(model.buffers().size(), 2u * 9);  // stem + 3 blocks x 2 + 2 shortcuts = 9 BNs
  // He init (fan_out): the sample standard deviation of a large conv is near sqrt(2 / fan_out).
  for (Param* p : model.params())
    if (p->name == "stage3.block1.conv2.weight") {
      double ss = 0;
      for (float v : p->value) ss += static_cast<double>(v) * v;
      EXPECT_NEAR(std::sqrt(ss / p->size()), std::sqrt(2.0 / (64 * 9)), 0.003);
    }
  ModelConfig bad;
  bad.norm = NormKind::group;
  bad.groups = 3;
  EXPECT_THROW(Model{bad}, normkit::Error);
}

// Five classes of 8x8 two-channel images: a class-specific pattern plus noise.
struct Synthetic {
  Tensor images;
  std::vector<uint8_t> labels;
};

Synthetic synthetic(int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::mt19937_64 proto_rng(99);
  const Tensor protos = random_tensor(5, 8, 8, 2, proto_rng);
  Synthetic s;
  s.images = random_tensor(count, 8, 8, 2, rng, 0.7);
  for (int i = 0; i < count; ++i) {
    s.labels.push_back(static_cast<uint8_t>(rng() % 5));
    for (int j = 0; j < 128; ++j) s.images.data[i * 128 + j] += protos.data[s.labels[i] * 128 + j];
  }
  return s;
}

double train_steps(Model& model, const Synthetic& data, int steps, int batch, double* first_loss) {
  SoftmaxCrossEntropy ce;
  Tensor x;
  double loss = 0;
  for (int s = 0; s < steps; ++s) {
    const int start = (s * batch) % static_cast<int>(data.labels.size());
    x.resize(batch, 8, 8, 2);
    std::copy_n(data.images.data.begin() + start * 128, batch * 128, x.data.begin());
    loss = ce.forward(model.forward(x, Mode::train), data.labels.data() + start);
    if (s == 0 && first_loss) *first_loss = loss;
    model.backward(ce.gradient());
    sgd_step(model.params(), 0.05, SgdConfig{});
  }
  return loss;
}

TEST(Model, LossFallsOnASyntheticProblem) {
  set_threads(1);
  for (NormKind kind : {NormKind::batch, NormKind::group}) {
    Model model(small_config(kind));
    model.init(3);
    const Synthetic train = synthetic(256, 1), test = synthetic(200, 2);
    double first = 0;
    train_steps(model, train, 96, 16, &first);
    SoftmaxCrossEntropy ce;
    const double test_loss = ce.forward(model.forward(test.images, Mode::eval), test.labels.data());
    EXPECT_LT(test_loss, 0.3 * first) << to_string(kind);
    // Chance is 40 of 200.
    EXPECT_GT(ce.correct(), 140) << to_string(kind) << ": accuracy " << ce.correct() << "/200";
  }
}

TEST(Model, TrainingIsBitwiseReproducibleAcrossThreadCounts) {
  const Synthetic train = synthetic(64, 4);
  std::vector<std::vector<float>> finals;
  for (int t : {1, 2}) {
    set_threads(t);
    Model model(small_config(NormKind::batch));
    model.init(8);
    train_steps(model, train, 10, 8, nullptr);
    std::vector<float> all;
    for (Param* p : model.params()) all.insert(all.end(), p->value.begin(), p->value.end());
    for (const Buffer& b : model.buffers()) all.insert(all.end(), b.values->begin(), b.values->end());
    finals.push_back(all);
  }
  set_threads(1);
  EXPECT_TRUE(finals[0] == finals[1]);
}

}  // namespace
}  // namespace normkit::train::test
