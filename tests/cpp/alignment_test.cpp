// Results do not depend on where the tensors lie in memory. Every op (BatchNorm, GroupNorm,
// InstanceNorm with and without input statistics, LayerNorm), run on the same values
// placed at other offsets from a 64-byte boundary (inputs and outputs shifted by different
// amounts, so vector loads, the one-lane heads of streamed outputs and the checks for aligned
// channels-last rows all change), writes the same bits as with every tensor aligned. The shapes
// include outputs of 16 MiB and more, which are written with non-temporal stores from their
// first aligned vector on, and planes short enough for BatchNorm's slab pass.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "normkit/normkit.h"
#include "test_util.h"

namespace normkit::test {
namespace {

constexpr int kVectorFloats = 16;  // floats in the widest vector (64 bytes)

// A tensor's values, `shift` (modulo a vector) floats past a 64-byte boundary; poison around
// them.
class Placed {
 public:
  Placed(const std::vector<float>& values, int shift)
      : size_(values.size()), buffer_(values.size() + 2 * kVectorFloats, kPoison) {
    const auto address = reinterpret_cast<std::uintptr_t>(buffer_.data());
    const std::size_t skip = (64 - address % 64) % 64 / sizeof(float);
    data_ = buffer_.data() + skip + shift % kVectorFloats;
    std::copy(values.begin(), values.end(), data_);
  }
  Placed(std::size_t size, int shift) : Placed(poisoned(size), shift) {}

  float* data() { return data_; }
  std::vector<float> values() const { return {data_, data_ + size_}; }
  // Nothing written outside the tensor.
  bool surroundings_intact() const {
    const float* begin = data_;
    const float* end = data_ + size_;
    auto poison = [](float v) { return v == kPoison; };
    return std::all_of(buffer_.data(), begin, poison) &&
           std::all_of(end, buffer_.data() + buffer_.size(), poison);
  }

 private:
  std::size_t size_;
  std::vector<float> buffer_;
  float* data_;
};

// Shifts (in floats) of the inputs and of the outputs; the first is the aligned baseline.
const std::pair<int, int> kShifts[] = {{0, 0}, {1, 5}, {3, 0}, {0, 7}, {8, 15}, {15, 1}};

// Activations (N, C, spatial...) or LayerNorm rows (dims = {rows, cols}).
struct Problem {
  std::vector<int64_t> dims;
  MemoryFormat format = MemoryFormat::channels_first;
  int64_t groups = 1;  // GroupNorm only
  std::vector<float> x, r, dy, w, b;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
  TensorView view(float* p) const {
    return TensorView(p, DType::float32, int(dims.size()), dims.data(), format);
  }
  std::string name() const {
    std::string s;
    for (int64_t d : dims) s += (s.empty() ? "" : "x") + std::to_string(d);
    return s + (format == MemoryFormat::channels_last ? " channels-last" : " channels-first");
  }
};

Problem make_problem(std::vector<int64_t> dims, MemoryFormat format, int64_t groups,
                     uint64_t seed) {
  Problem p;
  p.dims = std::move(dims);
  p.format = format;
  p.groups = groups;
  std::mt19937_64 rng(seed);
  const auto n = std::size_t(p.numel());
  p.x = random_normal(n, rng, 0.5, 2.0);
  p.r = random_normal(n, rng);
  p.dy = random_normal(n, rng);
  p.w = random_normal(std::size_t(p.dims[1]), rng, 1.0, 0.5);
  p.b = random_normal(std::size_t(p.dims[1]), rng);
  return p;
}

// A problem's x, residual and dy, each at its own offset from `in`.
struct PlacedInputs {
  PlacedInputs(const Problem& p, int in) : x(p.x, in), r(p.r, in + 5), dy(p.dy, in + 9) {}
  Placed x, r, dy;
};

// The activation of the fused epilogue the *_outputs functions run (relu, or silu in the
// *Silu* tests).
Activation fused_activation = Activation::relu;

// The backward's epilogue for the fused forward's: relu's mask from y, or silu's residual and
// bias (its z recomputed); dres (null: none) receives the residual's gradient.
BackwardEpilogue fused_backward(const Problem& p, PlacedInputs& src, Placed& y, Placed* dres) {
  BackwardEpilogue e{.activation = fused_activation};
  if (fused_activation == Activation::relu) e.y = p.view(y.data());
  if (fused_activation == Activation::silu) e.residual = p.view(src.r.data()), e.bias = p.b;
  if (dres) e.dresidual = p.view(dres->data());
  return e;
}

// Sets fused_activation for the life of a test.
struct FusedActivation {
  explicit FusedActivation(Activation a) { fused_activation = a; }
  ~FusedActivation() { fused_activation = Activation::relu; }
};

// Every output of one op's calls: activations in memory order, then the vectors.
using Outputs = std::vector<std::vector<float>>;

// Runs `body(p, input, output)` (which places its tensors with the shifts it is given and returns
// its outputs) at every shift pair; each must equal the aligned run's bits.
template <class Body>
void expect_same_bits(const Problem& p, const char* op, Body body) {
  const Outputs aligned = body(p, 0, 0);
  for (const auto& outputs : aligned)
    ASSERT_FALSE(contains_poison(outputs)) << op << " " << p.name();
  for (const auto& [in, out] : kShifts) {
    const Outputs shifted = body(p, in, out);
    ASSERT_EQ(shifted.size(), aligned.size());
    for (std::size_t k = 0; k < aligned.size(); ++k)
      EXPECT_TRUE(bitwise_equal(shifted[k], aligned[k]))
          << op << " " << p.name() << ": output " << k << " differs with inputs shifted by "
          << in << " and outputs by " << out << " floats";
  }
}

Outputs batch_norm_outputs(const Problem& p, int in, int out) {
  const auto n = std::size_t(p.numel());
  const auto C = std::size_t(p.dims[1]);
  PlacedInputs src(p, in);
  Placed y(n, out), dx(n, out + 3), dres(n, out + 11);
  Placed y_infer(n, out + 6);
  std::vector<float> mean(C), invstd(C), running_mean(C, 0.25f), running_var(C, 2.0f), dw(C),
      db(C);

  BatchNormParams training;
  training.epilogue = {fused_activation, p.view(src.r.data())};
  batch_norm_forward_training(training, p.view(src.x.data()), p.w, p.b, p.view(y.data()), mean,
                              invstd, running_mean, running_var);
  const BackwardEpilogue backward = fused_backward(p, src, y, &dres);
  batch_norm_backward_training({.epilogue = backward}, p.view(src.dy.data()),
                               p.view(src.x.data()), mean, invstd, p.w, p.view(dx.data()), dw, db);
  batch_norm_forward_inference(BatchNormParams{}, p.view(src.x.data()), p.w, p.b, running_mean,
                               running_var, p.view(y_infer.data()));
  for (const Placed* t : {&y, &dx, &dres, &y_infer}) EXPECT_TRUE(t->surroundings_intact());
  return {y.values(), dx.values(), dres.values(), y_infer.values(), mean, invstd,
          running_mean, running_var, dw, db};
}

Outputs group_norm_outputs(const Problem& p, int in, int out) {
  const auto n = std::size_t(p.numel());
  const auto C = std::size_t(p.dims[1]);
  const auto stats = std::size_t(p.dims[0] * p.groups);
  PlacedInputs src(p, in);
  Placed y(n, out), dx(n, out + 3), dres(n, out + 11);
  Placed y_plain(n, out + 6), dx_plain(n, out + 13);
  std::vector<float> mean(stats), rstd(stats), dw(C), db(C), dw_plain(C);

  GroupNormParams fused{p.groups};
  fused.epilogue = {fused_activation, p.view(src.r.data())};
  group_norm_forward(fused, p.view(src.x.data()), p.w, p.b, p.view(y.data()), mean, rstd);
  const BackwardEpilogue backward = fused_backward(p, src, y, &dres);
  group_norm_backward({p.groups, backward}, p.view(src.dy.data()), p.view(src.x.data()), mean,
                      rstd, p.w, p.view(dx.data()), dw, db);
  const GroupNormParams plain{p.groups};
  group_norm_forward(plain, p.view(src.x.data()), p.w, p.b, p.view(y_plain.data()), mean, rstd);
  group_norm_backward({p.groups}, p.view(src.dy.data()), p.view(src.x.data()), mean, rstd, p.w,
                      p.view(dx_plain.data()), dw_plain, {});
  for (const Placed* t : {&y, &dx, &dres, &y_plain, &dx_plain})
    EXPECT_TRUE(t->surroundings_intact());
  return {y.values(), dx.values(), dres.values(), y_plain.values(), dx_plain.values(),
          mean,       rstd,        dw,           db,         dw_plain};
}

Outputs instance_norm_outputs(const Problem& p, int in, int out) {
  const auto n = std::size_t(p.numel());
  const auto C = std::size_t(p.dims[1]);
  const auto stats = std::size_t(p.dims[0]) * C;
  PlacedInputs src(p, in);
  Placed y(n, out), dx(n, out + 3), y_eval(n, out + 6);
  std::vector<float> mean(stats), rstd(stats), eval_mean(stats), eval_rstd(stats),
      running_mean(C, 0.25f), running_var(C, 2.0f), dw(C), db(C);

  // Training with running statistics and the add+ReLU epilogue, its backward, then inference
  // from the updated running statistics (a different output pass).
  InstanceNormParams training;
  training.epilogue = {fused_activation, p.view(src.r.data())};
  instance_norm_forward(training, p.view(src.x.data()), p.w, p.b, running_mean, running_var,
                        p.view(y.data()), mean, rstd);
  const BackwardEpilogue backward = fused_backward(p, src, y, nullptr);
  instance_norm_backward({true, backward}, p.view(src.dy.data()), p.view(src.x.data()), mean,
                         rstd, p.w, p.view(dx.data()), dw, db);
  InstanceNormParams eval;
  eval.use_input_stats = false;
  instance_norm_forward(eval, p.view(src.x.data()), p.w, p.b, running_mean, running_var,
                        p.view(y_eval.data()), eval_mean, eval_rstd);
  for (const Placed* t : {&y, &dx, &y_eval}) EXPECT_TRUE(t->surroundings_intact());
  return {y.values(), dx.values(), y_eval.values(), mean, rstd, running_mean, running_var, dw, db};
}

Outputs layer_norm_outputs(const Problem& p, int in, int out) {
  const auto n = std::size_t(p.numel());
  const auto rows = std::size_t(p.dims[0]), cols = std::size_t(p.dims[1]);
  PlacedInputs src(p, in);
  Placed y(n, out), dx(n, out + 3), dres(n, out + 11);
  Placed y_plain(n, out + 6), dx_plain(n, out + 13);
  std::vector<float> mean(rows), rstd(rows), dw(cols), db(cols), db_plain(cols);

  LayerNormParams fused{1};
  fused.epilogue = {fused_activation, p.view(src.r.data())};
  layer_norm_forward(fused, p.view(src.x.data()), p.w, p.b, p.view(y.data()), mean, rstd);
  const BackwardEpilogue backward = fused_backward(p, src, y, &dres);
  layer_norm_backward({1, backward}, p.view(src.dy.data()), p.view(src.x.data()), mean, rstd, p.w,
                      p.view(dx.data()), dw, db);
  const LayerNormParams plain{1};
  layer_norm_forward(plain, p.view(src.x.data()), p.w, p.b, p.view(y_plain.data()), mean, rstd);
  layer_norm_backward({1}, p.view(src.dy.data()), p.view(src.x.data()), mean, rstd, {},
                      p.view(dx_plain.data()), {}, db_plain);
  for (const Placed* t : {&y, &dx, &dres, &y_plain, &dx_plain})
    EXPECT_TRUE(t->surroundings_intact());
  return {y.values(), dx.values(), dres.values(), y_plain.values(), dx_plain.values(),
          mean,       rstd,        dw,           db,         db_plain};
}

const MemoryFormat kFormats[] = {MemoryFormat::channels_first, MemoryFormat::channels_last};

TEST(Alignment, BatchNormSameBitsAtAnyOffset) {
  const std::vector<std::vector<int64_t>> shapes = {
      {3, 5, 7, 9}, {2, 48, 13, 11}, {5, 19, 37}, {4, 64, 128, 128}, {64, 1344, 7, 7}};
  uint64_t seed = 1;
  for (const auto& dims : shapes)
    for (MemoryFormat format : kFormats)
      expect_same_bits(make_problem(dims, format, 1, seed++), "batch_norm", batch_norm_outputs);
}

TEST(Alignment, GroupNormSameBitsAtAnyOffset) {
  const std::vector<std::pair<std::vector<int64_t>, int64_t>> shapes = {
      {{3, 6, 7, 9}, 3}, {{2, 48, 13, 11}, 8}, {{5, 19, 37}, 19},
      {{4, 64, 128, 128}, 32}, {{64, 1344, 7, 7}, 32}};
  uint64_t seed = 100;
  for (const auto& [dims, groups] : shapes)
    for (MemoryFormat format : kFormats)
      expect_same_bits(make_problem(dims, format, groups, seed++), "group_norm",
                       group_norm_outputs);
}

TEST(Alignment, InstanceNormSameBitsAtAnyOffset) {
  const std::vector<std::vector<int64_t>> shapes = {
      {3, 5, 7, 9}, {2, 24, 4, 6, 10}, {4, 64, 128, 128}};
  uint64_t seed = 300;
  for (const auto& dims : shapes)
    for (MemoryFormat format : kFormats)
      expect_same_bits(make_problem(dims, format, 1, seed++), "instance_norm",
                       instance_norm_outputs);
}

TEST(Alignment, LayerNormSameBitsAtAnyOffset) {
  // Short rows (normalized right after their statistics), long rows cut into pieces, and
  // outputs of 16 MiB and more of both kinds.
  const std::vector<std::vector<int64_t>> shapes = {
      {3, 37}, {50, 1000}, {7, 40001}, {4099, 1031}, {5, 850001}};
  uint64_t seed = 200;
  for (const auto& dims : shapes)
    expect_same_bits(make_problem(dims, MemoryFormat::channels_first, 0, seed++), "layer_norm",
                     layer_norm_outputs);
}

// The silu epilogue (z recomputed in both backward passes from x, the residual and the
// coefficients) on the shapes above without the largest of each op.
TEST(Alignment, SiluEpilogueSameBitsAtAnyOffset) {
  const FusedActivation silu(Activation::silu);
  uint64_t seed = 400;
  for (MemoryFormat format : kFormats) {
    for (const auto& dims : std::vector<std::vector<int64_t>>{{3, 5, 7, 9}, {4, 64, 128, 128}})
      expect_same_bits(make_problem(dims, format, 1, seed++), "batch_norm", batch_norm_outputs);
    for (const auto& [dims, groups] : std::vector<std::pair<std::vector<int64_t>, int64_t>>{
             {{3, 6, 7, 9}, 3}, {{2, 48, 13, 11}, 8}, {{4, 64, 128, 128}, 32}})
      expect_same_bits(make_problem(dims, format, groups, seed++), "group_norm",
                       group_norm_outputs);
    expect_same_bits(make_problem({2, 24, 4, 6, 10}, format, 1, seed++), "instance_norm",
                     instance_norm_outputs);
  }
  for (const auto& dims : std::vector<std::vector<int64_t>>{{3, 37}, {7, 40001}, {4099, 1031}})
    expect_same_bits(make_problem(dims, MemoryFormat::channels_first, 0, seed++), "layer_norm",
                     layer_norm_outputs);
}

}  // namespace
}  // namespace normkit::test
