#pragma once
// One synchronized BatchNorm training step (forward and backward) over a global batch split
// into pieces, through the public steps of normkit/batch_norm_steps.h, as a caller with several
// pieces (logical devices, ranks) runs them. Shared by the steps tests and the MPI tests, which
// hold the ranks' results bitwise against these.
#include <algorithm>
#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "common/dtype.h"
#include "normkit/batch_norm.h"
#include "normkit/batch_norm_steps.h"
#include "normkit/context.h"
#include "op_test_harness.h"
#include "test_util.h"

namespace normkit::test {

// A global batch: logical sizes, memory format, dtype (activations stored as float32 values
// already rounded to the dtype), and the inputs of a forward and a backward.
struct SyncCase {
  std::vector<int64_t> shape;  // N, C, spatial...
  MemoryFormat format = MemoryFormat::channels_first;
  DType dtype = DType::float32;
  bool relu = false, residual = false, affine = true, running = true, dresidual = false;
  double offset = 0, scale = 1, eps = 1e-5, momentum = 0.1;

  int64_t n() const { return shape[0]; }
  int64_t c() const { return shape[1]; }
  int64_t s() const {
    int64_t r = 1;
    for (std::size_t i = 2; i < shape.size(); ++i) r *= shape[i];
    return r;
  }
  int64_t per_sample() const { return c() * s(); }
  std::vector<int64_t> piece_shape(int64_t count) const {
    std::vector<int64_t> d = shape;
    d[0] = count;
    return d;
  }
};

// The inputs, in memory order; activations are float32 holding values exact in `dtype`.
struct SyncInputs {
  std::vector<float> x, dy, residual, weight, bias, running_mean, running_var;
};

inline float round_to(DType dtype, float v) {
  if (dtype == DType::bfloat16) return to_float(from_float<bf16>(v));
  if (dtype == DType::float16) return to_float(from_float<f16>(v));
  return v;
}

inline SyncInputs make_inputs(const SyncCase& k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::size_t n = std::size_t(k.n() * k.per_sample());
  SyncInputs in;
  in.x = random_normal(n, rng, k.offset, k.scale);
  in.dy = random_normal(n, rng);
  if (k.residual) in.residual = random_normal(n, rng);
  for (auto* v : {&in.x, &in.dy, &in.residual})
    for (float& e : *v) e = round_to(k.dtype, e);
  if (k.affine) {
    in.weight = random_normal(std::size_t(k.c()), rng, 1.0, 0.5);
    in.bias = random_normal(std::size_t(k.c()), rng);
  }
  if (k.running) {
    in.running_mean = random_normal(std::size_t(k.c()), rng);
    in.running_var = random_normal(std::size_t(k.c()), rng, 2.0, 0.1);
  }
  return in;
}

// Everything a training step writes, activations back in float32 (memory order).
struct SyncResult {
  std::vector<float> mean, invstd, running_mean, running_var, y, dx, dresidual, dweight, dbias;
  std::vector<double> sum_g, sum_g_xmu;

  bool operator==(const SyncResult& o) const {
    return bitwise_equal(mean, o.mean) && bitwise_equal(invstd, o.invstd) &&
           bitwise_equal(running_mean, o.running_mean) &&
           bitwise_equal(running_var, o.running_var) && bitwise_equal(y, o.y) &&
           bitwise_equal(dx, o.dx) && bitwise_equal(dresidual, o.dresidual) &&
           bitwise_equal(dweight, o.dweight) && bitwise_equal(dbias, o.dbias) &&
           bitwise_equal(sum_g, o.sum_g) && bitwise_equal(sum_g_xmu, o.sum_g_xmu);
  }
};

// Activation storage of one dtype, converted from and to float32.
struct Activations {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> half;  // bf16 or f16 bits

  Activations(DType d, const std::vector<float>& values) : dtype(d) {
    if (d == DType::float32) {
      f32 = values;
      return;
    }
    half.resize(values.size());
    for (std::size_t i = 0; i < values.size(); ++i) {
      uint16_t bits;
      if (d == DType::bfloat16) {
        const bf16 v = from_float<bf16>(values[i]);
        std::memcpy(&bits, &v, 2);
      } else {
        const f16 v = from_float<f16>(values[i]);
        std::memcpy(&bits, &v, 2);
      }
      half[i] = bits;
    }
  }
  Activations(DType d, std::size_t n, float fill) : Activations(d, std::vector<float>(n, fill)) {}
  void* at(int64_t element) {
    return dtype == DType::float32 ? static_cast<void*>(f32.data() + element)
                                   : static_cast<void*>(half.data() + element);
  }
  std::vector<float> values() const {
    if (dtype == DType::float32) return f32;
    std::vector<float> out(half.size());
    for (std::size_t i = 0; i < half.size(); ++i) {
      if (dtype == DType::bfloat16) {
        bf16 v;
        std::memcpy(&v, &half[i], 2);
        out[i] = to_float(v);
      } else {
        f16 v;
        std::memcpy(&v, &half[i], 2);
        out[i] = to_float(v);
      }
    }
    return out;
  }
};

// One piece of a split: samples [offset, offset + count).
struct Piece {
  int64_t offset, count;
};

// Pieces from their sizes, in order.
inline std::vector<Piece> pieces_of(const std::vector<int64_t>& sizes) {
  std::vector<Piece> out;
  int64_t offset = 0;
  for (int64_t s : sizes) out.push_back({offset, s}), offset += s;
  return out;
}

// Runs forward and backward over the pieces. `order`: the order in which the pieces' packed
// partials are concatenated (empty: in piece order). Outputs start NaN-filled.
inline SyncResult run_steps(const SyncCase& k, const SyncInputs& in,
                            const std::vector<Piece>& pieces, const std::vector<int>& order,
                            const Context& ctx) {
  const int64_t per = k.per_sample(), C = k.c(), N = k.n();
  const std::size_t total = std::size_t(N * per);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  Activations x(k.dtype, in.x), dy(k.dtype, in.dy), residual(k.dtype, in.residual);
  Activations y(k.dtype, total, nan), dx(k.dtype, total, nan), dres(k.dtype, total, nan);
  auto view = [&](Activations& a, const Piece& p) {
    const std::vector<int64_t> d = k.piece_shape(p.count);
    return TensorView(a.at(p.offset * per), k.dtype, int(d.size()), d.data(), k.format);
  };
  const std::vector<float> none;
  SyncResult r;
  r.mean.assign(std::size_t(C), nan);
  r.invstd.assign(std::size_t(C), nan);
  r.running_mean = in.running_mean;
  r.running_var = in.running_var;

  auto concatenated = [&](const std::vector<std::vector<double>>& parts) {
    std::vector<double> all;
    for (std::size_t i = 0; i < parts.size(); ++i) {
      const auto& part = parts[order.empty() ? i : std::size_t(order[i])];
      all.insert(all.end(), part.begin(), part.end());
    }
    return all;
  };

  // Forward.
  std::vector<std::vector<double>> parts;
  for (const Piece& p : pieces) {
    parts.emplace_back(batch_norm_partials_size(p.offset, p.count, C), double(nan));
    batch_norm_statistics_partials(p.offset, view(x, p), parts.back(), ctx);
  }
  BatchNormParams params;
  params.eps = k.eps;
  params.momentum = k.momentum;
  batch_norm_merge_statistics(params, N, concatenated(parts), r.mean, r.invstd,
                              std::span<float>(r.running_mean), std::span<float>(r.running_var));
  for (const Piece& p : pieces) {
    BatchNormParams piece_params = params;
    piece_params.epilogue.activation = k.relu ? Activation::relu : Activation::none;
    if (k.residual) piece_params.epilogue.residual = view(residual, p);
    batch_norm_normalize(piece_params, view(x, p), std::span<const float>(in.weight),
                         std::span<const float>(in.bias), r.mean, r.invstd, view(y, p), ctx);
  }

  // Backward.
  parts.clear();
  for (const Piece& p : pieces) {
    BatchNormBackwardParams bp;
    bp.epilogue.activation = k.relu ? Activation::relu : Activation::none;
    if (k.relu) bp.epilogue.y = view(y, p);
    parts.emplace_back(batch_norm_partials_size(p.offset, p.count, C), double(nan));
    batch_norm_gradient_partials(bp, p.offset, view(dy, p), view(x, p), r.mean, parts.back(),
                                 ctx);
  }
  r.sum_g.assign(std::size_t(C), double(nan));
  r.sum_g_xmu.assign(std::size_t(C), double(nan));
  r.dweight.assign(std::size_t(C), nan);
  r.dbias.assign(std::size_t(C), nan);
  batch_norm_merge_gradients(N, concatenated(parts), r.invstd, r.sum_g, r.sum_g_xmu, r.dweight,
                             r.dbias);
  for (const Piece& p : pieces) {
    BatchNormBackwardParams bp;
    bp.epilogue.activation = k.relu ? Activation::relu : Activation::none;
    if (k.relu) bp.epilogue.y = view(y, p);
    if (k.dresidual) bp.epilogue.dresidual = view(dres, p);
    batch_norm_backward_dx(bp, N, view(dy, p), view(x, p), r.mean, r.invstd,
                           std::span<const float>(in.weight), r.sum_g, r.sum_g_xmu, view(dx, p),
                           ctx);
  }
  r.y = y.values();
  r.dx = dx.values();
  if (k.dresidual) r.dresidual = dres.values();
  return r;
}

// Single-process batch_norm_forward_training and batch_norm_backward_training on the whole
// float32 batch (its own tiling, so the steps agree with it within tolerance, not bitwise).
struct SingleProcessResult {
  std::vector<float> y, dx, mean, invstd, dweight, dbias, running_mean, running_var;
};
inline SingleProcessResult single_process_batch_norm(const SyncCase& k, const SyncInputs& in) {
  const std::size_t total = in.x.size(), C = std::size_t(k.c());
  SingleProcessResult r{std::vector<float>(total), std::vector<float>(total),
                        std::vector<float>(C),     std::vector<float>(C),
                        std::vector<float>(C),     std::vector<float>(C),
                        in.running_mean,           in.running_var};
  BatchNormParams p;
  p.epilogue.activation = k.relu ? Activation::relu : Activation::none;
  if (k.residual) p.epilogue.residual = view_of(in.residual, k.shape, k.format);
  const TensorView xv = view_of(in.x, k.shape, k.format);
  batch_norm_forward_training(p, xv, opt(in.weight), opt(in.bias),
                              view_of(r.y, k.shape, k.format), r.mean, r.invstd,
                              opt(r.running_mean), opt(r.running_var));
  BatchNormBackwardParams bp;
  bp.epilogue.activation = p.epilogue.activation;
  if (k.relu) bp.epilogue.y = view_of(r.y, k.shape, k.format);
  batch_norm_backward_training(bp, view_of(in.dy, k.shape, k.format), xv, r.mean, r.invstd,
                               opt(in.weight), view_of(r.dx, k.shape, k.format), r.dweight,
                               r.dbias);
  return r;
}

}  // namespace normkit::test
